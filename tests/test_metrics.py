"""Metrics of docs/method.md §5 on cases with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastexplain.metrics import (
    ReconstructionMeter, activation_thresholds, check_targets, location_instability, part_interpretability,
    peak_statistics, prediction_agreement, reconstruction_error, summarize_p,
)
from fastexplain.receptive_field import proportional_centers


def _maps_peaking_at(cells_rc: torch.Tensor, h: int, w: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 1, h, w] maps with a single peak at cells_rc [N, 2] (row, col)."""
    N = cells_rc.shape[0]
    maps = torch.zeros(N, 1, h, w)
    peaks = torch.ones(N) if values is None else values
    maps[torch.arange(N), 0, cells_rc[:, 0], cells_rc[:, 1]] = peaks
    return maps


def test_filter_that_peaks_on_the_landmark_has_zero_instability() -> None:
    gen = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 8, (50, 2), generator=gen)
    maps = _maps_peaking_at(cells, 8, 8, values=torch.rand(50, generator=gen) + 0.1)
    # landmark exactly at the receptive-field centre of the peak cell (proportional: 4r + 2 at 32 px)
    keypoints = torch.stack([cells[:, 1] * 4.0 + 2.0, cells[:, 0] * 4.0 + 2.0], dim=1).unsqueeze(1)
    result = location_instability(maps, keypoints, torch.ones(50, 1, dtype=torch.bool), (32, 32))
    assert result.value == pytest.approx(0.0, abs=1e-12)
    assert result.centers_method == "proportional"


def test_hand_computed_instability_and_top_selection() -> None:
    # a filter fixed at cell (0, 0) (centre (2, 2) px in a 16×16 image, 4×4 map); landmark moves
    N = 130
    maps = _maps_peaking_at(torch.zeros(N, 2, dtype=torch.long), 4, 4, values=torch.linspace(2.0, 1.0, N))
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 16, size=(N, 2))
    keypoints = torch.tensor(xy, dtype=torch.float32).unsqueeze(1)
    visible = torch.ones(N, 1, dtype=torch.bool)
    visible[5, 0] = False  # excluded before taking the top 100
    result = location_instability(maps, keypoints, visible, (16, 16))
    chosen = [i for i in range(N) if i != 5][:100]  # values decrease with the index
    distances = np.hypot(xy[chosen, 0].astype(np.float32) - 2, xy[chosen, 1].astype(np.float32) - 2) / math.hypot(16, 16)
    assert result.value == pytest.approx(float(np.std(distances, ddof=1)), rel=1e-6)


def test_landmark_with_fewer_than_two_images_is_dropped() -> None:
    cells = torch.tensor([[0, 0], [1, 1], [2, 2]])
    maps = _maps_peaking_at(cells, 4, 4)
    keypoints = torch.tensor([[[1.0, 1.0], [5.0, 5.0]], [[3.0, 3.0], [9.0, 9.0]], [[5.0, 5.0], [0.0, 0.0]]])
    visible = torch.tensor([[True, True], [True, False], [True, False]])
    result = location_instability(maps, keypoints, visible, (8, 8))
    assert math.isnan(float(result.per_filter_landmark[0, 1]))
    assert result.value == pytest.approx(0.0, abs=1e-12)  # landmark 0 sits on the peak centre (2r+1)


def test_peak_ties_resolve_to_the_first_cell() -> None:
    maps = torch.zeros(1, 2, 3, 3)
    maps[0, 0, 1, 2] = maps[0, 0, 2, 0] = 5.0
    values, cells, size = peak_statistics(maps)
    assert size == (3, 3) and int(cells[0, 0]) == 5 and int(cells[0, 1]) == 0 and float(values[0, 0]) == 5.0


def test_filter_firing_on_the_part_mask_has_interpretability_one() -> None:
    gen = torch.Generator().manual_seed(0)
    N, K, S = 12, 3, 16
    masks = torch.zeros(N, K, S, S, dtype=torch.bool)
    for n in range(N):
        for k in range(K):
            r, c = torch.randint(0, S - 4, (2,), generator=gen).tolist()
            masks[n, k, r:r + 4, c:c + 3] = True
    maps = torch.stack([masks[:, 1].float() * 3.0, masks[:, 2].float() * 0.5 + 0.0], dim=1)  # same size: no blur
    result = part_interpretability(maps, masks)
    assert result.per_filter.tolist() == [1.0, 1.0]
    assert result.best_part.tolist() == [1, 2]
    assert result.value == 1.0


def test_iou_threshold_hand_computed() -> None:
    # 1 image, 10×10 image and map; part = 20 cells; filter fires on 10 of them and 10 cells outside → IoU 1/3
    masks = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    masks[:, 0, 0:2, :] = True
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 1:3, :] = 1.0  # IoU = 10 / 30
    maps[1, 0, 0:2, 0:1] = 1.0  # IoU = 2 / 20 = 0.1: not a hit
    result = part_interpretability(maps, masks, top_fraction=0.1)
    assert float(result.thresholds[0]) == 1.0
    assert float(result.hit_rate[0, 0]) == pytest.approx(0.5)
    assert result.value == pytest.approx(0.5)
    assert part_interpretability(maps, masks, top_fraction=0.1, iou_threshold=0.4).value == 0.0


def test_streamed_chunks_equal_the_whole_tensor() -> None:
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(40, 4, 6, 6, generator=gen) ** 4
    masks = torch.rand(40, 2, 24, 24, generator=gen) > 0.7
    keypoints = torch.rand(40, 2, 2, generator=gen) * 24
    visible = torch.rand(40, 2, generator=gen) > 0.2

    def chunks() -> list[torch.Tensor]:
        return list(maps.split(7))

    whole = part_interpretability(maps, masks, chunk_size=40)
    streamed = part_interpretability(chunks, masks)
    assert torch.equal(whole.hit_rate, streamed.hit_rate)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:  # the upsampling on the evaluation's device: the same counts, on the CPU
        elsewhere = part_interpretability(chunks, masks, device=device)
        assert elsewhere.hit_rate.device.type == "cpu" and torch.equal(whole.hit_rate, elsewhere.hit_rate)
    assert torch.equal(activation_thresholds(maps), torch.quantile(maps.permute(1, 0, 2, 3).reshape(4, -1), 1 - 0.005, dim=1,
                                                                    interpolation="higher"))
    li = location_instability(maps, keypoints, visible, (24, 24), centers=proportional_centers((6, 6), 24), chunk_size=9)
    assert li.value == pytest.approx(location_instability(chunks, keypoints, visible, (24, 24)).value, rel=1e-12)


def test_reconstruction_agreement_and_p() -> None:
    target = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    recon = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    assert float(reconstruction_error(recon, target)) == pytest.approx(2.0 / 25.0)
    meter = ReconstructionMeter()
    meter.update(recon, target, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [1.0, 0.0]]), 0.8)
    out = meter.result()
    assert out["reconstruction_error"] == pytest.approx(2.0 / 25.0) and out["agreement"] == 0.5 and out["p"] == 0.8
    assert prediction_agreement(torch.eye(3), torch.eye(3) * 2) == 1.0
    assert summarize_p(torch.tensor([0.5, 0.7]))["mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="shape"):
        reconstruction_error(recon, target[:1])


def test_targets_pass_and_fail() -> None:
    rows = check_targets({"location_instability": 0.2, "part_interpretability": 0.2},
                         {"location_instability": 0.1, "part_interpretability": 0.25, "p": 0.9, "agreement": 0.99})
    passed = {row["name"]: row["passed"] for row in rows}
    assert passed == {"location_instability_ratio": True, "part_interpretability_ratio": False, "p": True, "agreement": True}


def test_memory_splitting_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastexplain.metrics as metrics

    gen = torch.Generator().manual_seed(5)
    maps = torch.rand(20, 3, 5, 5, generator=gen) ** 3
    masks = torch.rand(20, 2, 15, 15, generator=gen) > 0.6
    whole = part_interpretability(maps, masks)
    monkeypatch.setattr(metrics, "UPSAMPLED_ELEMENTS_PER_STEP", 3 * 15 * 15 * 3)  # 3 images per step
    split = part_interpretability(maps, masks)
    assert torch.equal(whole.hit_rate, split.hit_rate)
