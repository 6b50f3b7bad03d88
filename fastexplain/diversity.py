"""Part diversity (docs/method.md §5, added 2026-11-27): do different filters detect different parts?

Per-filter averages (location instability, part interpretability) cannot see a collapse: F copies of one
stable detector score as well as F distinct ones. These metrics look at pairs of filters instead.

For each image and filter take the peak cell (first row-major argmax) and whether the filter fires
(max > 0). The *co-location* of filters f and g is, among the images where both fire, the fraction in
which their peaks lie within one cell of each other (Chebyshev distance ≤ 1); the metric is its mean over
all pairs f ≠ g (pairs that never fire together are left out of the mean). *Co-location groups*: visit
filters in index order; an unvisited filter f opens a group holding every unvisited g with
co-location(f, g) ≥ 0.8 (f included; a pair that never fires together counts as 0). One group is a total
collapse, F groups are F distinct detectors. *Part coverage*: the histogram of each filter's best part
(the argmax part of part interpretability) and the number of parts that are the best part of at least
two filters. A filter whose hit rate is 0 for every part has no best part: it is counted apart
(``no_part_filters``) instead of being credited to the first part by the argmax's tie rule.

Maps are given as for :mod:`fastexplain.metrics` (a tensor ``[N, F, h, w]`` or a callable returning chunks),
so they are streamed: only the per-image peaks ``[N, F]`` are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metrics import MapSource, peak_statistics

GROUP_THRESHOLD = 0.8      #: co-location at or above which two filters fall in one group
MIN_FILTERS_PER_PART = 2   #: a part is "covered" when it is the best part of at least this many filters


@dataclass
class PartDiversity:
    """Pairwise co-location of filters' peaks, the co-location groups and the best-part histogram."""

    colocation: float          #: mean co-location over pairs f ≠ g (nan with fewer than 2 filters)
    pairwise: Tensor           #: [F, F] float64 co-location, nan where a pair never fires together; diagonal 1
    groups: list[list[int]]    #: filter indices of each co-location group, in visiting order
    group_of: Tensor           #: [F] int64, the group index of each filter
    best_part_histogram: list[int] | None = None  #: [K] filters whose best part is k (None without parts)
    no_part_filters: int = 0   #: filters with a zero hit rate on every part (no best part)
    parts_covered: int | None = None  #: parts that are the best part of ≥ MIN_FILTERS_PER_PART filters
    group_sizes: list[int] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def summary(self) -> dict[str, object]:
        """The JSON-ready figures: co-location, number of groups, group sizes and part coverage."""
        out: dict[str, object] = {"colocation": self.colocation, "colocation_groups": self.num_groups,
                                  "group_sizes": list(self.group_sizes)}
        if self.best_part_histogram is not None:
            out.update(best_part_histogram=list(self.best_part_histogram), no_part_filters=self.no_part_filters,
                       parts_covered=self.parts_covered)
        return out


def colocation_matrix(peak_values: Tensor, peak_cells: Tensor, map_size: tuple[int, int],
                      chunk_size: int = 256) -> Tensor:
    """Co-location of every pair of filters from per-image peaks ``[N, F]`` (values, flat cells): [F, F].

    Entry (f, g) is the fraction of images where both fire (max > 0) whose peaks are within Chebyshev
    distance 1; nan where no image has both firing.
    """
    if peak_values.shape != peak_cells.shape or peak_values.dim() != 2:
        raise ValueError(f"peak values and cells must both be [N, F], got {tuple(peak_values.shape)} and "
                         f"{tuple(peak_cells.shape)}")
    _, w = map_size
    num_filters = peak_values.shape[1]
    both = torch.zeros(num_filters, num_filters, dtype=torch.float64)
    near = torch.zeros(num_filters, num_filters, dtype=torch.float64)
    for start in range(0, peak_values.shape[0], chunk_size):
        fires = (peak_values[start:start + chunk_size] > 0).double()  # [n, F]
        cells = peak_cells[start:start + chunk_size].long()
        rows, cols = cells // w, cells % w
        close = (((rows[:, :, None] - rows[:, None, :]).abs() <= 1)
                 & ((cols[:, :, None] - cols[:, None, :]).abs() <= 1)).double()  # [n, F, F]
        pair_fires = fires[:, :, None] * fires[:, None, :]
        both += pair_fires.sum(0)
        near += (pair_fires * close).sum(0)
    pairwise = torch.where(both > 0, near / both.clamp(min=1), torch.full_like(both, math.nan))
    pairwise.fill_diagonal_(1.0)
    return pairwise


def colocation_groups(pairwise: Tensor, threshold: float = GROUP_THRESHOLD) -> list[list[int]]:
    """Greedy groups in index order: an unvisited f takes every unvisited g with co-location ≥ threshold."""
    filled = torch.nan_to_num(pairwise, nan=0.0)
    visited = torch.zeros(pairwise.shape[0], dtype=torch.bool)
    groups: list[list[int]] = []
    for f in range(pairwise.shape[0]):
        if visited[f]:
            continue
        members = ((filled[f] >= threshold) & ~visited)
        members[f] = True
        visited |= members
        groups.append(torch.nonzero(members).flatten().tolist())
    return groups


def part_diversity(maps: MapSource, best_part: Tensor | None = None, part_hit_rate: Tensor | None = None,
                   num_parts: int | None = None, threshold: float = GROUP_THRESHOLD,
                   chunk_size: int = 256) -> PartDiversity:
    """Part diversity of the filters of ``maps`` [N, F, h, w] (module docstring).

    ``part_hit_rate`` [F, K] (``PartInterpretability.hit_rate``) gives the best-part histogram; filters
    whose hit rate is 0 (or nan) on every part have no best part. ``best_part`` [F] may be given instead
    (then every filter counts, as the argmax says) with ``num_parts`` K.
    """
    peak_values, peak_cells, map_size = peak_statistics(maps, chunk_size)
    pairwise = colocation_matrix(peak_values, peak_cells, map_size)
    num_filters = pairwise.shape[0]
    off_diagonal = pairwise[~torch.eye(num_filters, dtype=torch.bool)]
    finite = off_diagonal[torch.isfinite(off_diagonal)]
    colocation = float(finite.mean()) if finite.numel() else math.nan
    groups = colocation_groups(pairwise, threshold)
    group_of = torch.empty(num_filters, dtype=torch.long)
    for index, members in enumerate(groups):
        group_of[members] = index
    result = PartDiversity(colocation, pairwise, groups, group_of, group_sizes=[len(g) for g in groups])
    if part_hit_rate is not None:
        if part_hit_rate.dim() != 2 or part_hit_rate.shape[0] != num_filters:
            raise ValueError(f"part_hit_rate must be [F={num_filters}, K], got {tuple(part_hit_rate.shape)}")
        filled = torch.nan_to_num(part_hit_rate.double(), nan=0.0)
        best_value, best = filled.max(dim=1)
        best = torch.where(best_value > 0, best, torch.full_like(best, -1))
        num_parts = part_hit_rate.shape[1]
    elif best_part is not None:
        if num_parts is None:
            raise ValueError("part_diversity: give num_parts with best_part")
        best = best_part.long().flatten()
    else:
        return result
    if best.numel() != num_filters:
        raise ValueError(f"best parts are given for {best.numel()} filters, maps have {num_filters}")
    histogram = torch.bincount(best[best >= 0], minlength=int(num_parts)).tolist()
    result.best_part_histogram = histogram
    result.no_part_filters = int((best < 0).sum())
    result.parts_covered = sum(1 for count in histogram if count >= MIN_FILTERS_PER_PART)
    return result
