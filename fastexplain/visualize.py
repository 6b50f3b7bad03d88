"""PNG overlays of part maps on images, and ``explain``: a trained explainer's part maps for image files.

``overlay_heatmap`` is the building block (also used by the HTML report): the heat map is normalised by
its maximum (an all-zero map stays zero), upsampled bilinearly to the image, coloured with a matplotlib
colormap and alpha-blended where it is non-zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def overlay_heatmap(image: Tensor, heat: Tensor, *, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """image [3, H, W] in [0, 1] and heat [h, w] (≥ 0) → an RGB uint8 array [H, W, 3] with the heat overlaid."""
    from matplotlib import colormaps

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"overlay_heatmap: image must be [3, H, W], got {tuple(image.shape)}")
    if heat.dim() != 2:
        raise ValueError(f"overlay_heatmap: heat must be [h, w], got {tuple(heat.shape)}")
    H, W = image.shape[1:]
    heat = heat.detach().float().cpu().clamp_min(0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
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


def explain_images(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
                   top: int = 15, device: str | None = None) -> list[Path]:
    """For each image file, write OUT/<stem>_parts.png: its part maps under a trained explainer.

    The performer is rebuilt from the checkpoint's spec (torchvision models only; for a custom performer
    module, call :func:`save_part_maps_png` on ``Explainer(...)(performer.features(x).input)`` yourself).
    """
    from .checkpoint import explainer_from_state, load_checkpoint
    from .data.folders import load_image
    from .performer import Performer

    state = load_checkpoint(checkpoint)
    if state.get("performer") is None:
        raise ValueError("this checkpoint was trained on a custom performer module, which cannot be rebuilt "
                         "from the file; explain its images from Python with the module")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    performer = Performer.from_spec(state["performer"]).to(device)
    explainer = explainer_from_state(state).to(device)
    image_size = int(state.get("image_size", [224])[0])
    written = []
    out_dir = Path(out_dir)
    for image_path in images:
        image = load_image(image_path, image_size)
        with torch.no_grad():
            features = performer.features(image[None].to(device), with_logits=False)
            part_maps = explainer(features.input, compute_loss=False).part_maps[0]
        written.append(save_part_maps_png(image, part_maps.cpu(), out_dir / f"{Path(image_path).stem}_parts.png",
                                          top=top))
    return written
