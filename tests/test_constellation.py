"""The constellation term (fastexplain/nn/constellation.py): known answers, invariances, gradients."""
from __future__ import annotations

import pytest
import torch

from fastexplain.nn.constellation import constellation_spread, peak_crowding, soft_peaks
from fastexplain.nn.explainer import Explainer, ExplainerConfig


def _spots(places: torch.Tensor, h: int = 12, w: int = 10, value: float = 5.0) -> torch.Tensor:
    """Maps [B, M, h, w] that are zero but for one cell per (image, filter) at places[b, f] = (row, col)."""
    B, M, _ = places.shape
    maps = torch.zeros(B, M, h, w)
    b, f = torch.meshgrid(torch.arange(B), torch.arange(M), indexing="ij")
    maps[b, f, places[..., 0], places[..., 1]] = value
    return maps


def _moving_constellation(B: int = 8, M: int = 3, seed: int = 0) -> torch.Tensor:
    """M filters at fixed offsets (within 6×4 cells) from an object that moves from image to image."""
    g = torch.Generator().manual_seed(seed)
    origin = torch.stack([torch.randint(0, 6, (B,), generator=g), torch.randint(0, 6, (B,), generator=g)], -1)
    offsets = torch.stack([torch.randint(0, 6, (M,), generator=g), torch.randint(0, 4, (M,), generator=g)], -1)
    return origin[:, None, :] + offsets[None]


def test_soft_peaks_find_a_sharp_spot_in_map_fractions() -> None:
    maps = _spots(torch.tensor([[[3, 7]]]), h=12, w=10, value=1.0)
    peaks = soft_peaks(maps, sharpness=60.0)
    torch.testing.assert_close(peaks[0, 0], torch.tensor([3.5 / 12, 7.5 / 10]), atol=1e-6, rtol=0)


def test_a_rigid_constellation_has_no_spread_and_a_scattered_one_has() -> None:
    rigid = _spots(_moving_constellation())
    assert float(constellation_spread(rigid, sharpness=60.0)) < 1e-9
    g = torch.Generator().manual_seed(1)
    scattered = _spots(torch.stack([torch.randint(0, 12, (8, 3), generator=g),
                                    torch.randint(0, 10, (8, 3), generator=g)], -1))
    assert float(constellation_spread(scattered, sharpness=60.0)) > 1e-2


def test_selectivity_ignores_images_where_a_filter_barely_fires() -> None:
    places = _moving_constellation(M=30)
    places[0, 1] = torch.tensor([11, 0])   # filter 1 strays in image 0 ...
    maps = _spots(places)
    maps[0, 1] *= 1e-3                      # ... where it barely fires
    selective = float(constellation_spread(maps, sharpness=60.0, selectivity=4.0))
    uniform = float(constellation_spread(maps, sharpness=60.0, selectivity=0.0))
    assert selective < 0.05 * uniform  # what is left: the stray moves the filters' mean peak by 1/30


def test_the_spread_does_not_depend_on_the_activation_scale() -> None:
    maps = torch.rand(6, 5, 7, 9) ** 4
    reference = constellation_spread(maps)
    for scale in (1e-3, 1e3):
        torch.testing.assert_close(constellation_spread(maps * scale), reference, rtol=1e-5, atol=0)


def test_gradient_is_finite_for_dead_and_tied_maps() -> None:
    maps = torch.rand(4, 3, 6, 6)
    maps[:, 0] = 0.0                        # a filter that never fires
    maps[1, 2] = 1.0                        # a flat map
    maps.requires_grad_(True)
    spread = constellation_spread(maps)
    spread.backward()
    assert torch.isfinite(spread) and torch.isfinite(maps.grad).all()


def test_bad_shape_is_a_one_line_error() -> None:
    for term in (constellation_spread, peak_crowding):
        with pytest.raises(ValueError, match=r"expected maps \[B, M, h, w\]"):
            term(torch.rand(3, 4, 5))


def test_crowding_is_one_for_filters_on_one_spot_and_zero_for_far_apart_ones() -> None:
    together = _spots(torch.tensor([[[4, 4]] * 5, [[7, 2]] * 5]))
    assert float(peak_crowding(together, sharpness=60.0)) == pytest.approx(1.0, abs=1e-5)
    corners = torch.tensor([[0, 0], [0, 9], [11, 0], [11, 9]])
    apart = _spots(torch.stack([corners, corners.flip(0)]))
    assert float(peak_crowding(apart, sharpness=60.0)) < 1e-6
    one_cell = _spots(torch.tensor([[[4, 4], [4, 5]]]))  # neighbours: exp(−1 / (2·1.5²))
    assert float(peak_crowding(one_cell, sharpness=60.0)) == pytest.approx(float(torch.exp(torch.tensor(-1 / 4.5))),
                                                                           rel=1e-4)


def test_crowding_gradient_pushes_two_neighbouring_peaks_apart() -> None:
    maps = _spots(torch.tensor([[[4, 4], [4, 5]]]), value=1.0) + 0.01
    maps.requires_grad_(True)
    peak_crowding(maps).backward()
    assert torch.isfinite(maps.grad).all()
    # filter 1 (peak at column 5) gains by moving right: its cell at column 6 gets a negative gradient
    assert float(maps.grad[0, 1, 4, 6]) < 0 < float(maps.grad[0, 1, 4, 4])


def test_constellation_weight_enters_the_total() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 6, 8, 8)
    totals = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        explainer = Explainer(ExplainerConfig(in_channels=6, parts=6, constellation_weight=weight)).train()
        losses = explainer(x).losses
        totals[weight] = (float(losses.total.detach()), float(losses.constellation.detach()))
    assert totals[0.0][1] == 0.0  # not computed when unweighted
    assert totals[50.0][1] > 0.0
    assert totals[50.0][0] == pytest.approx(totals[0.0][0] + 50.0 * totals[50.0][1], rel=1e-5)
