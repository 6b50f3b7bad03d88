"""Interpretability metrics of docs/method.md §5, for any layer's maps: performer filters and explainer part filters alike.

All map arguments are ``[N, F, h, w]`` post-ReLU maps for N images and F filters, given either as one
tensor (processed in chunks of images) or as a zero-argument callable that returns a fresh iterable of
``[n, F, h, w]`` chunks (so maps never need to be held in memory at once; part interpretability calls it
three times: to count, to find the thresholds, to score). Image coordinates are pixels, x to the
right, y down, pixel i covering [i, i + 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .receptive_field import CellCenters, proportional_centers

MapSource = Union[Tensor, Callable[[], Iterable[Tensor]]]

# Goals (docs/metrics.md), explainer relative to the performer's own filters at the same layer.
TARGETS: dict[str, tuple[str, float]] = {
    "location_instability_ratio": ("<=", 0.6),
    "part_interpretability_ratio": (">=", 1.5),
    "colocation_ratio": ("<=", 2.0),          # mean pairwise co-location, explainer / performer
    "colocation_group_fraction": (">=", 0.5),  # co-location groups / filters (≥ M/2 groups)
    "parts_covered": (">=", 5),               # parts that are the best part of ≥ 2 filters (part world: 5 of 6)
    "p": (">=", 0.7),
    "agreement": (">=", 0.98),
}


def _chunks(maps: MapSource, chunk_size: int) -> Iterator[Tensor]:
    if callable(maps) and not isinstance(maps, Tensor):
        yield from maps()
        return
    if maps.dim() != 4:
        raise ValueError(f"maps must be [N, F, h, w], got shape {tuple(maps.shape)}")
    for start in range(0, maps.shape[0], chunk_size):
        yield maps[start:start + chunk_size]


def peak_statistics(maps: MapSource, chunk_size: int = 256) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Per (image, filter): the max activation [N,F] (float32), its first row-major argmax cell [N,F], and (h, w)."""
    values, cells, map_size = [], [], None
    for chunk in _chunks(maps, chunk_size):
        n, f, h, w = chunk.shape
        if map_size is not None and map_size != (h, w):
            raise ValueError(f"all map chunks must share one spatial size, got {map_size} and {(h, w)}")
        map_size = (h, w)
        best, where = chunk.detach().reshape(n, f, h * w).float().max(dim=2)
        # torch.max returns *a* maximal index; ties must resolve to the first one in row-major order
        flat = chunk.detach().reshape(n, f, h * w).float()
        first = (flat == best.unsqueeze(2)).float().argmax(dim=2)
        values.append(best)
        cells.append(torch.where(torch.isnan(best), where, first))
    if map_size is None:
        raise ValueError("maps are empty: need at least one image")
    return torch.cat(values), torch.cat(cells), map_size


@dataclass
class LocationInstability:
    """Mean over filters of the mean over landmarks of std(distance / diagonal) (docs/method.md §5; lower is better)."""

    value: float
    per_filter: Tensor  # [F], nan for filters with no valid landmark
    per_filter_landmark: Tensor  # [F, K], nan where fewer than 2 valid images
    centers_method: str
    centers_reason: str | None
    silent_filters: int  # filters whose max activation is 0 on every image (still counted, as in docs/method.md §5)


def location_instability(maps: MapSource, keypoints: Tensor, visible: Tensor, image_size: tuple[int, int],
                         centers: CellCenters | None = None, top: int = 100, chunk_size: int = 256) -> LocationInstability:
    """Location instability of every filter (docs/method.md §5, [ICNN]).

    For filter f and landmark k: among images where k is visible, take the ``top`` images by the
    filter's max activation (ties: lower image index first), map the argmax cell to its image-pixel
    centre (``centers``: from :func:`fastexplain.receptive_field.cell_centers`; None → proportional
    fallback), divide the distance to the landmark by the image diagonal, and take the standard
    deviation (N − 1). (f, k) pairs with fewer than 2 valid images are dropped; average over
    landmarks, then over filters. ``keypoints`` [N,K,2] are (x, y) pixels, ``visible`` [N,K] bool.
    """
    peak_values, peak_cells, (h, w) = peak_statistics(maps, chunk_size)
    N, num_filters = peak_values.shape
    if keypoints.shape[:1] != (N,) or keypoints.shape[-1] != 2 or visible.shape != keypoints.shape[:2]:
        raise ValueError(f"keypoints must be [N={N}, K, 2] and visible [N, K], got {tuple(keypoints.shape)} "
                         f"and {tuple(visible.shape)}")
    if centers is None:
        centers = proportional_centers((h, w), image_size, reason="no centres given")
    if centers.rows.numel() != h or centers.cols.numel() != w:
        raise ValueError(f"centres are for a {centers.rows.numel()}×{centers.cols.numel()} map, maps are {h}×{w}")
    height, width = image_size
    diagonal = math.hypot(height, width)
    centre_y = centers.rows.to(torch.float64)[peak_cells // w]  # [N, F]
    centre_x = centers.cols.to(torch.float64)[peak_cells % w]
    keypoints = keypoints.to(torch.float64)
    visible = visible.bool()
    per_pair = torch.full((num_filters, keypoints.shape[1]), math.nan, dtype=torch.float64)
    for k in range(keypoints.shape[1]):
        valid = torch.nonzero(visible[:, k] & torch.isfinite(keypoints[:, k]).all(dim=1)).flatten()
        if valid.numel() < 2:
            continue
        order = torch.sort(peak_values[valid], dim=0, descending=True, stable=True).indices[:top]  # [t, F]
        images = valid[order]
        dy = keypoints[images, k, 1] - torch.gather(centre_y[valid], 0, order)
        dx = keypoints[images, k, 0] - torch.gather(centre_x[valid], 0, order)
        per_pair[:, k] = (torch.sqrt(dx * dx + dy * dy) / diagonal).std(dim=0, unbiased=True)
    kept = torch.isfinite(per_pair)
    per_filter = torch.where(kept.any(dim=1), torch.nansum(per_pair, dim=1) / kept.sum(dim=1).clamp(min=1),
                             torch.full((num_filters,), math.nan, dtype=torch.float64))
    finite = torch.isfinite(per_filter)
    value = float(per_filter[finite].mean()) if finite.any() else math.nan
    silent = int((peak_values.max(dim=0).values <= 0).sum())
    return LocationInstability(value, per_filter, per_pair, centers.method, centers.reason, silent)


def _masks_for_chunk(part_masks: Tensor | Callable[[int, int], Tensor], start: int, stop: int) -> Tensor:
    return part_masks(start, stop) if callable(part_masks) else part_masks[start:stop]


def activation_thresholds(maps: MapSource, top_fraction: float = 0.005, chunk_size: int = 256) -> Tensor:
    """Per filter, the value T_f such that the top ``top_fraction`` of all positions × images are ≥ T_f ([F])."""
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    chunks = list(_chunks(maps, chunk_size)) if isinstance(maps, Tensor) else None
    total = sum(c.shape[0] * c.shape[2] * c.shape[3] for c in (chunks if chunks is not None else _chunks(maps, chunk_size)))
    keep = max(1, math.ceil(top_fraction * total))
    best: Tensor | None = None
    for chunk in chunks if chunks is not None else _chunks(maps, chunk_size):
        flat = chunk.detach().float().permute(1, 0, 2, 3).reshape(chunk.shape[1], -1)
        candidates = flat if best is None else torch.cat([best, flat], dim=1)
        best = candidates.topk(min(keep, candidates.shape[1]), dim=1).values
    assert best is not None
    return best[:, -1]


UPSAMPLED_ELEMENTS_PER_STEP = 1 << 25  # bounds the upsampled [n, F, H, W] block to ~128 MB of float32


def _split_for_memory(chunk: Tensor, part_masks: Tensor | Callable[[int, int], Tensor]) -> Iterator[Tensor]:
    """Split a map chunk so that its upsampled copy stays under UPSAMPLED_ELEMENTS_PER_STEP elements."""
    size = part_masks.shape[-2:] if isinstance(part_masks, Tensor) else part_masks(0, 1).shape[-2:]
    per_image = chunk.shape[1] * size[0] * size[1]
    yield from chunk.split(max(1, UPSAMPLED_ELEMENTS_PER_STEP // per_image))


@dataclass
class PartInterpretability:
    """Mean over filters of P_f = max_k hit rate (IoU > threshold) for part k (docs/method.md §5; higher is better)."""

    value: float
    per_filter: Tensor  # [F] P_f
    best_part: Tensor  # [F] argmax_k of the hit rate
    hit_rate: Tensor  # [F, K], nan for parts that never appear
    thresholds: Tensor  # [F]
    part_images: Tensor = field(default_factory=lambda: torch.zeros(0))  # [K] images where each part appears


def part_interpretability(maps: MapSource, part_masks: Tensor | Callable[[int, int], Tensor],
                          top_fraction: float = 0.005, iou_threshold: float = 0.2,
                          chunk_size: int = 32, device: torch.device | str | None = None) -> PartInterpretability:
    """Part interpretability (docs/method.md §5, after Bau et al.): top-0.5% regions vs part masks.

    T_f is the top-``top_fraction`` quantile of filter f's activations over all cells and images (on
    the layer's own maps). The map is upsampled bilinearly to the mask size (align_corners=False, so
    cell centres land proportionally) and the region is ``{up ≥ T_f and up > 0}``. For each image,
    IoU of the region with part k's mask; a hit when IoU > ``iou_threshold``. The hit rate of part k
    counts images where part k's mask is non-empty. P_f = max_k hit rate; the value is mean_f P_f.
    ``part_masks`` is bool [N,K,H,W] or a callable ``(start, stop) -> [stop-start, K, H, W]``. With ``device``,
    the upsampling and overlaps run there chunk by chunk (the metric's cost: N·F upsampled maps), counts come back.
    """
    thresholds = activation_thresholds(maps, top_fraction)
    where = thresholds.device if device is None else torch.device(device)
    limits = thresholds.to(where)
    hits: Tensor | None = None
    present: Tensor | None = None
    start = 0
    for chunk in (piece for block in _chunks(maps, chunk_size) for piece in _split_for_memory(block, part_masks)):
        n = chunk.shape[0]
        masks = _masks_for_chunk(part_masks, start, start + n).bool()
        if masks.shape[0] != n:
            raise ValueError(f"part_masks has {masks.shape[0]} images for map images {start}..{start + n}")
        height, width = masks.shape[-2:]
        masks = masks.to(where)
        up = F.interpolate(chunk.detach().to(where).float(), size=(height, width), mode="bilinear", align_corners=False)
        region = ((up >= limits.view(1, -1, 1, 1)) & (up > 0)).flatten(2).float()  # [n, F, P]
        mask_flat = masks.flatten(2).float()  # [n, K, P]
        inter = torch.bmm(region, mask_flat.transpose(1, 2))  # [n, F, K]
        union = region.sum(2, keepdim=True) + mask_flat.sum(2).unsqueeze(1) - inter
        iou = inter / union.clamp(min=1)
        exists = mask_flat.sum(2) > 0  # [n, K]
        chunk_hits = ((iou > iou_threshold) & exists.unsqueeze(1)).sum(0).cpu()
        hits = chunk_hits if hits is None else hits + chunk_hits
        present = exists.sum(0).cpu() if present is None else present + exists.sum(0).cpu()
        start += n
    assert hits is not None and present is not None
    hit_rate = hits.double() / present.double().unsqueeze(0)  # nan where a part never appears
    filled = torch.nan_to_num(hit_rate, nan=-1.0)
    per_filter, best_part = filled.max(dim=1)
    per_filter = per_filter.clamp(min=0)
    return PartInterpretability(float(per_filter.mean()), per_filter, best_part, hit_rate, thresholds, present)


def reconstruction_error(reconstruction: Tensor, target: Tensor, per_image: bool = False) -> Tensor:
    """‖x̂ − x*‖² / ‖x*‖² (docs/method.md §4–5): over the whole batch (ratio of sums), or per image [N]."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ in shape")
    difference = (reconstruction.double() - target.double()).flatten(1).pow(2).sum(1)
    energy = target.double().flatten(1).pow(2).sum(1)
    if per_image:
        return difference / energy.clamp(min=1e-300)
    return difference.sum() / energy.sum().clamp(min=1e-300)


def prediction_agreement(reference_logits: Tensor, other_logits: Tensor) -> float:
    """Fraction of images whose argmax class is the same under both logits [N, classes]."""
    if reference_logits.shape != other_logits.shape:
        raise ValueError(f"logits differ in shape: {tuple(reference_logits.shape)} vs {tuple(other_logits.shape)}")
    return float((reference_logits.argmax(1) == other_logits.argmax(1)).double().mean())


def summarize_p(p: Tensor | float) -> dict[str, float]:
    """Mean, std, min and max of the mixing weight p (a scalar or per-image values)."""
    values = torch.as_tensor(p, dtype=torch.float64).flatten()
    spread = float(values.std()) if values.numel() > 1 else 0.0
    return {"mean": float(values.mean()), "std": spread, "min": float(values.min()), "max": float(values.max())}


class ReconstructionMeter:
    """Streams reconstruction error (ratio of sums), prediction agreement and p over batches."""

    def __init__(self) -> None:
        self.difference, self.energy, self.agree, self.count = 0.0, 0.0, 0, 0
        self.p_values: list[Tensor] = []

    def update(self, reconstruction: Tensor, target: Tensor, reference_logits: Tensor | None = None,
               other_logits: Tensor | None = None, p: Tensor | float | None = None) -> None:
        """Add one batch: features [B, ...], optional logits [B, classes] and p."""
        self.difference += float((reconstruction.double() - target.double()).pow(2).sum())
        self.energy += float(target.double().pow(2).sum())
        if reference_logits is not None and other_logits is not None:
            self.agree += int((reference_logits.argmax(1) == other_logits.argmax(1)).sum())
            self.count += reference_logits.shape[0]
        if p is not None:
            self.p_values.append(torch.as_tensor(p, dtype=torch.float64).detach().flatten())

    def result(self) -> dict[str, float]:
        """``reconstruction_error``, ``agreement`` (nan without logits) and ``p`` (mean; nan without p)."""
        out = {"reconstruction_error": self.difference / self.energy if self.energy > 0 else math.nan,
               "agreement": self.agree / self.count if self.count else math.nan}
        out["p"] = summarize_p(torch.cat(self.p_values))["mean"] if self.p_values else math.nan
        return out


def check_targets(performer: dict[str, float], explainer: dict[str, float]) -> list[dict[str, object]]:
    """Goals (docs/metrics.md) as rows ``{name, value, target, passed}``; a goal whose inputs are missing (e.g. part
    coverage without part annotations) is left out, one whose value is not finite fails."""
    def ratio(key: str) -> float:
        base, mine = performer.get(key, math.nan), explainer.get(key, math.nan)
        return mine / base if base and math.isfinite(base) and math.isfinite(mine) else math.nan

    groups, filters = explainer.get("colocation_groups"), explainer.get("filters")
    values = {
        "location_instability_ratio": ratio("location_instability"),
        "part_interpretability_ratio": ratio("part_interpretability"),
        "colocation_ratio": ratio("colocation") if "colocation" in explainer else None,
        "colocation_group_fraction": groups / filters if groups is not None and filters else None,
        "parts_covered": explainer.get("parts_covered"),
        "p": explainer.get("p", math.nan),
        "agreement": explainer.get("agreement", math.nan),
    }
    rows = []
    for name, (relation, target) in TARGETS.items():
        if values[name] is None:
            continue
        value = float(values[name])
        passed = math.isfinite(value) and (value <= target if relation == "<=" else value >= target)
        rows.append({"name": name, "value": value, "target": f"{relation} {target}", "passed": passed})
    return rows


# Part diversity lives in its own module; it is part of the metrics' public surface.
from .diversity import PartDiversity, colocation_groups, colocation_matrix, part_diversity  # noqa: E402,F401
