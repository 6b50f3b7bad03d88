"""InterpretableConv2d: conv → ReLU → filter loss → mask ([ICNN] arXiv 1710.00935), checked against the public ops."""
from __future__ import annotations

import pytest
import torch

from fastexplain import InterpretableConv2d, filter_loss, relu_template_mask
from fastexplain.nn.interpretable import normalise_for_filter_loss
from fastexplain.templates import template_tau


def _layer(**options) -> InterpretableConv2d:
    torch.manual_seed(0)
    return InterpretableConv2d(3, 5, 3, **options)


def test_output_is_the_masked_relu_of_the_conv_and_loss_reads_the_premask_map() -> None:
    layer = _layer(loss_scale="none")
    x = torch.randn(4, 3, 7, 6)
    result = layer.detailed(x)
    conv_out = layer.conv(x)
    assert result.output.shape == (4, 5, 7, 6)
    torch.testing.assert_close(result.output, relu_template_mask(conv_out))
    torch.testing.assert_close(result.relu_map, torch.relu(conv_out))
    torch.testing.assert_close(result.filter_loss, filter_loss(torch.relu(conv_out), reduction="none"))
    assert result.filter_loss.shape == (5,)


def test_peak_scaling_sets_the_mean_peak_to_contrast_over_tau_and_is_scale_free() -> None:
    maps = torch.rand(6, 4, 5, 5) * torch.tensor([1.0, 10.0, 0.1, 0.0])[None, :, None, None]
    scaled = normalise_for_filter_loss(maps, contrast=2.0)
    peaks = scaled.amax(dim=(2, 3)).mean(dim=0)
    torch.testing.assert_close(peaks[:3], torch.full((3,), 2.0 / template_tau(5, 5)))
    assert torch.all(scaled[:, 3] == 0)
    layer = _layer()
    x = torch.randn(4, 3, 6, 6)
    before = layer.detailed(x).filter_loss
    with torch.no_grad():
        layer.conv.weight.mul_(7.0)
        layer.conv.bias.mul_(7.0)
    torch.testing.assert_close(layer.detailed(x).filter_loss, before, rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_conv_from_the_output_and_from_the_filter_loss() -> None:
    layer = _layer()
    x = torch.rand(5, 3, 6, 6)
    result = layer.detailed(x)
    (grad_loss,) = torch.autograd.grad(result.filter_loss.sum(), layer.conv.weight, retain_graph=True)
    (grad_out,) = torch.autograd.grad(result.output.sum(), layer.conv.weight)
    assert grad_loss.abs().sum() > 0 and grad_out.abs().sum() > 0


def test_batch_of_one_gives_zero_loss_and_compute_loss_false_gives_zeros() -> None:
    layer = _layer()
    single = layer.detailed(torch.rand(1, 3, 5, 5))
    assert torch.allclose(single.filter_loss, torch.zeros(5), atol=1e-6)
    skipped = layer.detailed(torch.rand(3, 3, 5, 5), compute_loss=False)
    assert torch.equal(skipped.filter_loss, torch.zeros(5))


def test_bf16_input_gives_a_float32_loss() -> None:
    layer = _layer().to(torch.bfloat16)
    result = layer.detailed(torch.rand(4, 3, 6, 6, dtype=torch.bfloat16))
    assert result.output.dtype == torch.bfloat16 and result.filter_loss.dtype == torch.float32
    assert torch.isfinite(result.filter_loss).all()


def test_training_the_filter_loss_alone_lowers_it() -> None:
    layer = _layer()
    x = torch.rand(8, 3, 8, 8)
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = layer.detailed(x).filter_loss.mean()
        first = float(loss.detach()) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(layer.detailed(x).filter_loss.mean().detach()) < first - 1e-3


@pytest.mark.parametrize("options, match", [({"loss_scale": "max"}, "loss_scale"), ({"contrast": 0.0}, "contrast")])
def test_bad_options_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InterpretableConv2d(3, 4, **options)
