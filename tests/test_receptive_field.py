"""Receptive-field centres (docs/method.md §5): closed forms, a gradient-support check, and the reported fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastexplain.receptive_field import UnsupportedLayerError, cell_centers, proportional_centers, receptive_field
from fastexplain.zoo import EXPLAINED_LAYER, PartWorldVGG


def test_demo_performer_layer_matches_same_padding_formula() -> None:
    model = PartWorldVGG()
    field = receptive_field(model, EXPLAINED_LAYER, 64)
    assert field.map_size == (16, 16)
    assert field.jump == (4.0, 4.0)
    rows, cols = field.centers()
    assert torch.allclose(rows, 2.0 + 4.0 * torch.arange(16, dtype=torch.float64))
    centres = cell_centers(model, EXPLAINED_LAYER, 64, (16, 16))
    assert centres.method == "receptive_field" and centres.reason is None
    assert torch.allclose(centres.cols, proportional_centers((16, 16), 64).cols)


def test_valid_strided_conv_hand_computed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.ReLU())
    field = receptive_field(model, "1", (8, 10))
    assert field.map_size == (3, 4)
    assert field.start == (1.5, 1.5) and field.jump == (2.0, 2.0) and field.size == (3.0, 3.0)


def _ones_model(*layers: nn.Module) -> nn.Sequential:
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0)
            nn.init.zeros_(module.bias)
    return model.eval()


def test_centres_match_the_gradient_support() -> None:
    model = _ones_model(nn.Conv2d(1, 2, 5, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=2),
                        nn.BatchNorm2d(2), nn.AvgPool2d(2), nn.Conv2d(2, 1, 3, stride=3, padding=(0, 1)))
    image = torch.rand(1, 1, 53, 47, requires_grad=True)
    for layer in ["0", "2", "4", "5"]:
        out = model[: int(layer) + 1](image + 1.0)
        field = receptive_field(model, layer, (53, 47))
        assert field.map_size == tuple(out.shape[-2:])
        rows, cols = field.centers()
        r, c = out.shape[-2] // 2, out.shape[-1] // 2  # an interior cell: its support is not clipped
        (grad,) = torch.autograd.grad(out[0, 0, r, c], image)
        ys, xs = torch.nonzero(grad[0, 0] != 0, as_tuple=True)
        assert float((ys.min() + ys.max()) / 2 + 0.5) == pytest.approx(float(rows[r])), layer
        assert float((xs.min() + xs.max()) / 2 + 0.5) == pytest.approx(float(cols[c])), layer
        assert float(ys.max() - ys.min() + 1) == pytest.approx(field.size[0]), layer


def test_max_pool_geometry() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
    field = receptive_field(model, "1", 15)
    assert field.map_size == tuple(model(torch.zeros(1, 1, 15, 15)).shape[-2:])
    assert field.start == (0.5, 0.5) and field.jump == (2.0, 2.0) and field.size == (5.0, 5.0)


def test_unsupported_module_falls_back_and_says_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(5))
    with pytest.raises(UnsupportedLayerError, match="AdaptiveAvgPool2d"):
        receptive_field(model, "1", 32)
    centres = cell_centers(model, "1", 32, (5, 5))
    assert centres.method == "proportional" and "AdaptiveAvgPool2d" in centres.reason
    assert torch.allclose(centres.rows, (torch.arange(5, dtype=torch.float64) + 0.5) * 32 / 5)


def test_size_mismatch_falls_back() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    centres = cell_centers(model, "0", 32, (16, 16))
    assert centres.method == "proportional" and "predicts" in centres.reason


def test_unknown_layer_names_close_matches() -> None:
    with pytest.raises(ValueError, match="features.13"):
        receptive_field(PartWorldVGG(), "features.133", 64)
