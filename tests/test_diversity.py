"""Known-answer tests of the part-diversity metrics (docs/method.md §5 "Part diversity")."""
import math

import pytest
import torch

from fastexplain.metrics import check_targets, colocation_groups, colocation_matrix, part_diversity


def _one_hot_maps(cells: torch.Tensor, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Maps [N, F, h, w] that are 1 at the given flat cells [N, F] and 0 elsewhere."""
    N, F = cells.shape
    maps = torch.zeros(N, F, size[0] * size[1])
    maps.scatter_(2, cells.unsqueeze(2), 1.0)
    return maps.view(N, F, *size)


def test_identical_filters_are_one_group_with_colocation_one():
    generator = torch.Generator().manual_seed(0)
    one = torch.rand(30, 1, 8, 8, generator=generator)
    result = part_diversity(one.expand(30, 5, 8, 8).contiguous())
    assert result.colocation == 1.0
    assert result.num_groups == 1 and result.groups == [[0, 1, 2, 3, 4]]
    assert result.group_of.tolist() == [0] * 5


def test_fixed_detectors_far_apart_are_all_distinct():
    cells = torch.tensor([0, 7, 56, 63, 27]).expand(20, 5)  # corners and the centre of an 8×8 map
    result = part_diversity(_one_hot_maps(cells))
    assert result.colocation == 0.0
    assert result.num_groups == 5 and result.group_sizes == [1] * 5


def test_chebyshev_distance_one_counts_as_colocated_and_two_does_not():
    # filter 0 at (3, 3); filter 1 diagonal neighbour (4, 4); filter 2 two rows away (5, 3)
    cells = torch.tensor([3 * 8 + 3, 4 * 8 + 4, 5 * 8 + 3]).expand(4, 3)
    pairwise = part_diversity(_one_hot_maps(cells)).pairwise
    assert pairwise[0, 1] == 1.0 and pairwise[1, 2] == 1.0 and pairwise[0, 2] == 0.0


def test_colocation_counts_only_images_where_both_fire():
    cells = torch.tensor([[0, 0], [0, 0], [0, 63], [0, 63]])
    maps = _one_hot_maps(cells)
    maps[2:, 1] = 0  # filter 1 silent on the images where it would be far away
    values, flat = maps.flatten(2).max(2)
    pairwise = colocation_matrix(values, flat, (8, 8))
    assert pairwise[0, 1] == 1.0
    maps[:, 1] = 0  # never fires: the pair is undefined and left out of the mean
    result = part_diversity(maps)
    assert math.isnan(result.pairwise[0, 1]) and math.isnan(result.colocation)
    assert result.num_groups == 2


def test_groups_are_greedy_in_index_order():
    pairwise = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.85], [0.1, 0.85, 1.0]], dtype=torch.float64)
    assert colocation_groups(pairwise) == [[0, 1], [2]]


def test_part_coverage_histogram_and_no_part_filters():
    cells = torch.tensor([0, 7, 56, 63]).expand(10, 4)
    hit_rate = torch.tensor([[0.5, 0.1], [0.6, 0.0], [0.0, 0.3], [0.0, 0.0]], dtype=torch.float64)
    result = part_diversity(_one_hot_maps(cells), part_hit_rate=hit_rate)
    assert result.best_part_histogram == [2, 1] and result.no_part_filters == 1 and result.parts_covered == 1
    summary = result.summary()
    assert summary["colocation_groups"] == 4 and summary["parts_covered"] == 1


def test_streamed_chunks_give_the_same_result():
    maps = torch.rand(40, 6, 5, 7, generator=torch.Generator().manual_seed(1))
    whole = part_diversity(maps)
    streamed = part_diversity(lambda: iter(maps.split(9)))
    assert torch.equal(torch.nan_to_num(whole.pairwise), torch.nan_to_num(streamed.pairwise))
    assert whole.groups == streamed.groups


def test_bad_hit_rate_shape_is_one_line_error():
    with pytest.raises(ValueError, match="part_hit_rate must be"):
        part_diversity(torch.rand(3, 4, 5, 5), part_hit_rate=torch.zeros(3, 2))


def test_check_targets_has_diversity_rows():
    performer = {"location_instability": 0.1, "part_interpretability": 0.1, "colocation": 0.1}
    explainer = {"location_instability": 0.05, "part_interpretability": 0.2, "colocation": 0.3, "filters": 64,
                 "colocation_groups": 40, "parts_covered": 5, "p": 0.8, "agreement": 0.99}
    rows = {row["name"]: row for row in check_targets(performer, explainer)}
    assert not rows["colocation_ratio"]["passed"] and rows["colocation_ratio"]["value"] == pytest.approx(3.0)
    assert rows["colocation_group_fraction"]["passed"] and rows["parts_covered"]["passed"]
    rows = {row["name"] for row in check_targets(performer, {"p": 0.8})}
    assert "parts_covered" not in rows and "colocation_ratio" not in rows
