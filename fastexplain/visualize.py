"""PNG overlays of part maps on images, and ``explain``: a trained explainer's part maps and part attribution
for image files (docs/cli.md, docs/attribution.md).

``overlay_heatmap`` is the building block (also used by the HTML report): the heat map is normalised by
its maximum (or a given ``vmax``; an all-zero map stays zero), upsampled bilinearly to the image, coloured
with a matplotlib colormap and alpha-blended where it is non-zero. ``save_explanation_png`` draws the
labelled figure of ``fastexplain explain``: the input large, one tile per part filter titled with the filter,
its co-location group and its contribution, on a common colour scale with a colour bar.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .nn.explainer import Explainer
    from .performer import Performer


def overlay_heatmap(image: Tensor, heat: Tensor, *, alpha: float = 0.6, cmap: str = "jet",
                    vmax: float | None = None) -> np.ndarray:
    """image [3, H, W] in [0, 1] and heat [h, w] (≥ 0) → an RGB uint8 array [H, W, 3] with the heat overlaid;
    the heat is divided by ``vmax`` (default: its own maximum) and clipped to [0, 1]."""
    from matplotlib import colormaps

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"overlay_heatmap: image must be [3, H, W], got {tuple(image.shape)}")
    if heat.dim() != 2:
        raise ValueError(f"overlay_heatmap: heat must be [h, w], got {tuple(heat.shape)}")
    H, W = image.shape[1:]
    heat = heat.detach().float().cpu().clamp_min(0)
    peak = float(heat.max()) if vmax is None else float(vmax)
    heat = heat / peak if peak > 0 else torch.zeros_like(heat)
    heat = F.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    colours = torch.from_numpy(colormaps[cmap](heat.numpy())[..., :3]).float()  # [H, W, 3]
    base = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)
    weight = (alpha * heat)[..., None]
    blended = (1 - weight) * base + weight * colours
    return (blended * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def part_map_grid(image: Tensor, part_maps: Tensor, filters: Sequence[int], columns: int = 4,
                  border: int = 2) -> np.ndarray:
    """The image followed by one overlay per filter in ``filters``, on a grid: uint8 [rows·H, cols·W, 3]."""
    tiles = [(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()]
    tiles += [overlay_heatmap(image, part_maps[f]) for f in filters]
    H, W = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (H + border) + border, columns * (W + border) + border, 3), 255, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        top, left = border + r * (H + border), border + c * (W + border)
        grid[top:top + H, left:left + W] = tile
    return grid


def save_part_maps_png(image: Tensor, part_maps: Tensor, path: str | Path, *, top: int = 15,
                       columns: int = 4) -> Path:
    """Write the image and its ``top`` most active part maps ([M, h, w], by peak value) as one PNG grid."""
    from matplotlib.image import imsave

    if part_maps.dim() != 3:
        raise ValueError(f"save_part_maps_png: part_maps must be [M, h, w], got {tuple(part_maps.shape)}")
    peaks = part_maps.detach().float().amax(dim=(1, 2))
    filters = torch.argsort(peaks, descending=True, stable=True)[:max(1, top)].tolist()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, part_map_grid(image, part_maps, filters, columns=columns))
    return path


def save_explanation_png(image: Tensor, part_maps: Tensor, filters: Sequence[int], labels: Sequence[str],
                         path: str | Path, *, title: str = "", columns: int = 5, cmap: str = "jet") -> Path:
    """The labelled explanation figure: the input large on the left, then ``part_maps[f]`` ([M, h, w]) of each
    filter in ``filters`` overlaid on the image with its label, all on one colour scale (a colour bar)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if part_maps.dim() != 3:
        raise ValueError(f"save_explanation_png: part_maps must be [M, h, w], got {tuple(part_maps.shape)}")
    if len(labels) != len(filters):
        raise ValueError(f"save_explanation_png: {len(filters)} filters but {len(labels)} labels")
    filters = list(filters)
    columns = max(1, min(columns, len(filters) or 1))
    rows = max(1, -(-len(filters) // columns))
    vmax = float(part_maps[filters].detach().float().max()) if filters else 0.0
    figure = Figure(figsize=(2.0 * rows + 2.2 * columns + 0.8, 2.3 * rows + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns + rows + 1, width_ratios=[1.0] * rows + [1.0] * columns + [0.08])
    big = figure.add_subplot(grid[:, :rows])
    big.imshow(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
    big.set_title(title or "input", fontsize=10)
    big.axis("off")
    for index, (f, label) in enumerate(zip(filters, labels)):
        r, c = divmod(index, columns)
        axis = figure.add_subplot(grid[r, rows + c])
        axis.imshow(overlay_heatmap(image, part_maps[f], vmax=vmax, cmap=cmap))
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    bar = figure.add_subplot(grid[:, -1])
    figure.colorbar(ScalarMappable(Normalize(0.0, vmax if vmax > 0 else 1.0), colormaps[cmap]), cax=bar,
                    label="part-map activation")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _map_groups(part_maps: Tensor) -> Tensor | None:
    """Co-location group of each filter over the explained images (fastexplain.diversity), None if unavailable."""
    try:
        from .diversity import part_diversity

        return part_diversity(part_maps).group_of
    except Exception:  # noqa: BLE001 - the labels are optional; the maps are still written
        return None


def explain_images(checkpoint: "str | Path | Explainer", images: Sequence[str | Path], out_dir: str | Path, *,
                   top: int = 15, device: str | None = None, performer: "Performer | None" = None,
                   image_size: int | None = None, steps: int = 32, columns: int = 5) -> list[Path]:
    """For each image file write OUT/<stem>_parts.png (the labelled part maps of the ``top`` filters that
    contributed most to the performer's prediction) and OUT/<stem>.json (the class, every filter's
    contribution by :func:`fastexplain.attribute`, the ordinary track's share, the completeness residual).

    ``checkpoint``: a checkpoint path or a trained :class:`Explainer`. ``performer``: the performer object
    (needed for a custom module; by default it is rebuilt from the checkpoint). ``image_size``: images are
    read at this size (default: the checkpoint's). Without a head (feature-only performer) the maps are
    ranked by peak activation and the JSON says why there is no attribution.
    """
    import json

    from .attribution import attribute
    from .checkpoint import explainer_from_state, load_checkpoint
    from .data.folders import load_image
    from .nn.explainer import Explainer
    from .performer import Performer, check_same_performer, performer_identity

    state = None if isinstance(checkpoint, Explainer) else load_checkpoint(checkpoint)
    explainer = checkpoint if state is None else explainer_from_state(state)
    if performer is None:
        if state is None or state.get("performer") is None:
            raise ValueError("the performer cannot be rebuilt (a custom module, or an explainer without its "
                             "checkpoint); pass performer=Performer(model, layer) from Python")
        performer = Performer.from_spec(state["performer"])
    elif state is not None:
        check_same_performer((state.get("extra") or {}).get("performer_identity"), performer_identity(performer),
                             action="explain")
    if image_size is None:
        if state is None or "image_size" not in state:
            raise ValueError("explain_images: pass image_size= (the size the explainer was trained at)")
        image_size = int(state["image_size"][0])
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    performer, explainer = performer.to(device_), explainer.to(device_).eval()
    batch = torch.stack([load_image(path, image_size) for path in images])
    results, maps = [], []
    for start in range(0, len(batch), 8):
        chunk = batch[start:start + 8].to(device_)
        if performer.has_head:
            result = attribute(explainer, performer, chunk, steps=steps)
            results.append(result)
            maps.append(result.part_maps)
        else:
            with torch.no_grad():
                features = performer.features(chunk, with_logits=False)
                maps.append(explainer(features.input, compute_loss=False).part_maps.float().cpu())
    part_maps = torch.cat(maps)
    groups = _map_groups(part_maps)
    written: list[Path] = []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, image_path in enumerate(images):
        stem = Path(image_path).stem
        peaks = part_maps[index].amax(dim=(1, 2))
        group = (lambda f: int(groups[f])) if groups is not None else (lambda f: None)
        if results:
            result, row = results[index // 8], index % 8
            record = result.record(row)
            for entry in record["contributions"]:
                entry.update(group=group(entry["filter"]), peak=float(peaks[entry["filter"]]))
            chosen = [(e["filter"], e["contribution"]) for e in record["contributions"][:max(1, top)]]
            labels = [f"filter {f}" + ("" if group(f) is None else f" · group {group(f)}") + f"\n{c:+.3g}"
                      for f, c in chosen]
            title = (f"class {record['class']}: logit {record['logit']:.3g}\nparts {record['parts_total']:+.3g}, "
                     f"ordinary share {record['ordinary_share']:.0%}")
        else:
            order = torch.argsort(peaks, descending=True, stable=True)[:max(1, top)].tolist()
            chosen = [(f, None) for f in order]
            labels = [f"filter {f}" + ("" if group(f) is None else f" · group {group(f)}") for f in order]
            record = {"class": None, "note": "the performer has no head (feature-only mode), so there is no "
                      "prediction to attribute; the maps are ranked by peak activation",
                      "filters": [{"filter": f, "peak": float(peaks[f]), "group": group(f)} for f in order]}
            title = "input"
        record = {"image": str(image_path), **record}
        written.append(save_explanation_png(batch[index], part_maps[index], [f for f, _ in chosen], labels,
                                            out_dir / f"{stem}_parts.png", title=title, columns=columns))
        json_path = out_dir / f"{stem}.json"
        json_path.write_text(json.dumps(record, indent=2))
        written.append(json_path)
    return written
