"""Per-part galleries: for each part, the filter of a layer that detects it, never two of one co-location group.

The rule that ties filters to parts (the same for the performer's filters and the explainer's):

1. **Association.** A filter's part is its *best part* by part interpretability, argmax_k of its hit
   rate for part k (the rule of the best-part histogram), when that hit rate is > 0. A filter with no
   hit on any part — or every filter, when there are no part masks — takes the landmark for which its
   location instability ([ICNN], per filter and landmark) is lowest.
2. **Ranking.** For part k the candidates are the filters associated with k, ranked by their location
   instability for landmark k (lowest first; ties: higher hit rate, then lower index). A filter that is
   unstable or silent for k (no finite value) is not a candidate.
3. **One filter per co-location group.** Parts are served greedily, the most location-stable
   (part, filter) pair first: a part takes its best candidate whose co-location group
   (:mod:`fastexplain.diversity`) has not been shown for another part. A layer whose filters collapsed
   onto one detector (one group) therefore shows one part, and every other part says why it is empty.

Landmark k and part k must be the same part (true of the part world and of CUB, whose part masks are
disks around its landmarks). Without any annotation, :func:`group_representatives` gives one filter per
co-location group instead (the largest groups first).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .report import FilterGallery


@dataclass
class PartChoice:
    """The filter shown for one part (``filter`` None when there is none, with the ``reason``)."""

    part: str
    filter: int | None = None
    group: int | None = None          #: co-location group index of the filter
    group_size: int | None = None     #: filters in that group
    instability: float = math.nan     #: location instability of the filter for this part's landmark
    hit_rate: float = math.nan        #: part-interpretability hit rate of the filter for this part
    candidates: int = 0               #: filters associated with this part (rule 1)
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def associate_filters(per_filter_landmark: Tensor | None, hit_rate: Tensor | None) -> Tensor:
    """Each filter's part index ([F] int64, −1 for none) by rule 1 of the module docstring."""
    if per_filter_landmark is None and hit_rate is None:
        raise ValueError("associate_filters needs per-landmark location instability or part hit rates")
    source = per_filter_landmark if per_filter_landmark is not None else hit_rate
    assert source is not None
    part = torch.full((source.shape[0],), -1, dtype=torch.long)
    if per_filter_landmark is not None:
        stable = torch.nan_to_num(per_filter_landmark.double(), nan=math.inf)
        lowest, where = stable.min(dim=1)
        part = torch.where(torch.isfinite(lowest), where, part)
    if hit_rate is not None:
        hits = torch.nan_to_num(hit_rate.double(), nan=0.0)
        best_value, best = hits.max(dim=1)
        part = torch.where(best_value > 0, best, part)
    return part


def choose_part_filters(part_names: Sequence[str], group_of: Tensor, group_sizes: Sequence[int],
                        per_filter_landmark: Tensor | None = None, hit_rate: Tensor | None = None) -> list[PartChoice]:
    """One :class:`PartChoice` per part by the rule of the module docstring.

    ``per_filter_landmark`` [F, K] is ``LocationInstability.per_filter_landmark``, ``hit_rate`` [F, K]
    ``PartInterpretability.hit_rate``; ``group_of`` [F] and ``group_sizes`` come from
    :func:`fastexplain.diversity.part_diversity`.
    """
    num_parts = len(part_names)
    for name, table in (("per_filter_landmark", per_filter_landmark), ("hit_rate", hit_rate)):
        if table is not None and (table.dim() != 2 or table.shape != (group_of.numel(), num_parts)):
            raise ValueError(f"{name} must be [filters={group_of.numel()}, parts={num_parts}], got {tuple(table.shape)}")
    associated = associate_filters(per_filter_landmark, hit_rate)
    instability = (torch.nan_to_num(per_filter_landmark.double(), nan=math.inf) if per_filter_landmark is not None
                   else torch.zeros(group_of.numel(), num_parts, dtype=torch.float64))
    hits = (torch.nan_to_num(hit_rate.double(), nan=0.0) if hit_rate is not None
            else torch.zeros(group_of.numel(), num_parts, dtype=torch.float64))
    pairs = [(float(instability[f, k]), -float(hits[f, k]), f, k) for f, k in enumerate(associated.tolist())
             if k >= 0 and math.isfinite(float(instability[f, k]))]
    choices = [PartChoice(name, candidates=int((associated == k).sum())) for k, name in enumerate(part_names)]
    shown_groups: dict[int, str] = {}
    for value, negative_hit, f, k in sorted(pairs):
        group = int(group_of[f])
        if choices[k].filter is not None or group in shown_groups:
            continue
        choices[k] = PartChoice(part_names[k], f, group, int(group_sizes[group]), value if per_filter_landmark is not None
                                else math.nan, -negative_hit if hit_rate is not None else math.nan, choices[k].candidates)
        shown_groups[group] = part_names[k]
    for k, choice in enumerate(choices):
        if choice.filter is not None:
            continue
        if choice.candidates == 0:
            choice.reason = "no filter has this as its part"
        else:
            taken = sorted({shown_groups[int(group_of[f])] for f in torch.nonzero(associated == k).flatten().tolist()
                            if int(group_of[f]) in shown_groups})
            choice.reason = (f"its {choice.candidates} filter(s) all co-locate with the filter shown for "
                             f"{', '.join(taken)}" if taken else "no filter is location-stable for it")
    return choices


def group_representatives(groups: Sequence[Sequence[int]], limit: int) -> list[tuple[int, int, int]]:
    """(filter, group index, group size) for the ``limit`` largest groups: each group's first member."""
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), g))[:limit]
    return [(int(groups[g][0]), g, len(groups[g])) for g in order]


def filter_gallery(kind: str, filter_index: int, peaks: Tensor, fetch_maps: Callable[[list[int], int], Tensor],
                   fetch_images: Callable[[list[int]], Tensor], per_filter: int = 6, eligible: Tensor | None = None,
                   caption: str = "", part: str = "", landmarks: Tensor | None = None) -> FilterGallery:
    """The ``per_filter`` images (among ``eligible``, bool [N]) with the largest peak of ``filter_index``.

    ``peaks`` [N] are the filter's max activations; ``fetch_maps(indices, f)`` returns its maps [n, h, w],
    ``fetch_images(indices)`` the images [n, 3, H, W]; ``landmarks`` [N, 2] (x, y px) marks the part.
    """
    pool = torch.arange(peaks.numel()) if eligible is None else torch.nonzero(eligible).flatten()
    order = pool[torch.sort(peaks[pool].float(), descending=True, stable=True).indices[:per_filter]].tolist()
    images = fetch_images(order) if order else torch.zeros(0, 3, 1, 1)
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    maps = fetch_maps(order, filter_index) if order else torch.zeros(0, 1, 1)
    marks = [tuple(float(v) for v in landmarks[i]) for i in order] if landmarks is not None else []
    return FilterGallery(kind, int(filter_index), list(images), [m.float() for m in maps], caption,
                         [float(peaks[i]) for i in order], part=part, landmarks=marks)
