"""Two terms on the part filters' soft peaks: constellation and crowding (docs/method.md §4, "Project
additions against collapse"; issue 11).

Location instability (docs/method.md §5) asks each part filter to peak at the same place *relative to
the object* in every image where it fires strongly. Without landmarks, the explainer uses its own part
filters as the reference frame: the mean peak position of all M filters in an image stands for the
object, and each filter pays for how much its peak moves around that reference across the batch.

For a batch of maps x [B, M, h, w] (post-ReLU, before the mask):

- soft peak ``z[b, f]`` = Σ_i softmax_i(s · x_bf(i) / max_i x_bf(i)) · i, positions i in fractions of
  the map's height and width (so the term does not depend on the map size), s = ``sharpness`` (10);
- reference ``c[b]`` = mean_f z[b, f] (no gradient: a filter is moved, not the frame);
- offset ``d[b, f]`` = z[b, f] − c[b];
- image weights ``w[b, f]`` = a[b, f]^k / Σ_b' a[b', f]^k with a = max_i x_bf(i) and k = ``selectivity``
  (no gradient): like location instability, which reads each filter's top-activating images, a filter
  is held to its place where it fires strongly and left free where it barely fires;
- spread = mean_f Σ_{axes} Σ_b w[b, f] (d[b, f] − Σ_b' w[b', f] d[b', f])².

With a process group the three weighted batch sums are all-reduced (one differentiable all-reduce),
so every rank computes the spread of the global batch.

The crowding term (:func:`peak_crowding`) is a smooth co-location of the same soft peaks: without it, every
filter gains by moving to the most stable place in the constellation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..parallel import differentiable_sum


def soft_peaks(maps: Tensor, sharpness: float) -> Tensor:
    """[B, M, 2] soft-argmax (row, column) of each map, in fractions of the map's height and width."""
    B, M, h, w = maps.shape
    flat = maps.float().reshape(B, M, h * w)
    peak = flat.amax(dim=-1, keepdim=True).detach().clamp_min(1e-12)
    weights = torch.softmax(sharpness * flat / peak, dim=-1)
    rows = (torch.arange(h, device=maps.device, dtype=torch.float32) + 0.5) / h
    cols = (torch.arange(w, device=maps.device, dtype=torch.float32) + 0.5) / w
    grid = torch.stack([rows.repeat_interleave(w), cols.repeat(h)], dim=-1)  # [hw, 2], row-major
    return weights @ grid


def constellation_spread(maps: Tensor, sharpness: float = 10.0, selectivity: float = 4.0,
                         process_group: Any = None) -> Tensor:
    """Mean over filters of the weighted batch variance of each filter's peak offset from the filters'
    mean peak (module docstring); 0 when every filter keeps its place in the constellation."""
    if maps.dim() != 4:
        raise ValueError(f"constellation_spread: expected maps [B, M, h, w], got shape {tuple(maps.shape)}")
    peaks = soft_peaks(maps, sharpness).double()                          # [B, M, 2]
    offsets = peaks - peaks.mean(dim=1, keepdim=True).detach()
    # float64 weights: a^k neither overflows nor underflows for any float32 activation, and they need no
    # per-rank normalisation (which would break the equality of one process and several)
    weight = maps.detach().double().flatten(2).amax(dim=-1).pow(selectivity).unsqueeze(-1)  # [B, M, 1]
    sums = torch.cat([(weight * offsets).sum(0), (weight * offsets.pow(2)).sum(0), weight.sum(0)], dim=-1)
    sums = differentiable_sum(sums, process_group)                        # [M, 5]
    total = sums[:, 4:].clamp_min(1e-300)
    mean, mean_square = sums[:, 0:2] / total, sums[:, 2:4] / total
    return (mean_square - mean.pow(2)).clamp_min(0).sum(-1).mean().float()


def peak_crowding(maps: Tensor, radius_cells: float = 1.5, sharpness: float = 10.0,
                  process_group: Any = None) -> Tensor:
    """Mean over images and filter pairs f ≠ g of exp(−‖z_f − z_g‖² / (2σ²)), the soft peaks z in cells and
    σ = ``radius_cells``: 1 when two filters peak at the same place, ~0 when they peak ≥ 3σ apart — a smooth
    version of co-location (docs/method.md §5), which the constellation term alone would let grow."""
    if maps.dim() != 4:
        raise ValueError(f"peak_crowding: expected maps [B, M, h, w], got shape {tuple(maps.shape)}")
    B, M, h, w = maps.shape
    cells = soft_peaks(maps, sharpness) * torch.tensor([h, w], device=maps.device, dtype=torch.float32)
    squared = (cells[:, :, None, :] - cells[:, None, :, :]).pow(2).sum(-1)          # [B, M, M]
    kernel = torch.exp(-squared / (2.0 * radius_cells ** 2))
    per_image = (kernel.sum(dim=(1, 2)) - M) / max(M * (M - 1), 1)                 # the diagonal is 1
    sums = differentiable_sum(torch.stack([per_image.sum(), per_image.new_tensor(float(B))]), process_group)
    return sums[0] / sums[1].clamp_min(1.0)
