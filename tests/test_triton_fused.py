"""The fused Triton form (``triton_fused``: loss and dloss/dx in one program per filter) against the reference.

Runs under TRITON_INTERPRET=1 on the CPU (CI) and on a GPU where there is one. The generic filter-loss tests of
tests/test_triton_ops.py run this form too (their ``form`` fixture); here: its limits, the sizes at its limits,
large activations, bounds of every read and write, and the autograd contract of the saved gradient.
"""
from __future__ import annotations

import pytest
import torch

from fastexplain.ops import reference

from triton_env import DEVICE, TRITON  # noqa: F401  (skips this module where the backend cannot load)

from fastexplain.ops import triton_forms, triton_fused  # noqa: E402  (after the availability check)


def _maps(shape, dtype=torch.float64, scale=1.0, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _loss_and_grad(fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf, weights.to(loss.dtype).to(loss.device))
    return loss.detach(), grad


def _fused(x: torch.Tensor) -> torch.Tensor:
    with triton_forms.use_form("fused"):
        return triton_forms.triton_filter_loss(x, 4.0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max().clamp_min(1e-300))


def test_auto_takes_the_fused_form_exactly_where_it_fits():
    assert triton_fused.fits(64, 15, 15) and triton_fused.fits(1, 1, 1) and triton_fused.fits(3, 5, 51)
    assert not triton_fused.fits(65, 4, 4) and not triton_fused.fits(2, 16, 16)
    assert triton_forms.chosen_form(14, 14, "cuda", batch=64) == "fused"
    assert triton_forms.chosen_form(14, 14, "cuda", batch=65) == "gemm"
    assert triton_forms.chosen_form(16, 16, "cpu", batch=8) == "dense"
    with pytest.raises(ValueError, match=r"fused Triton form takes B ≤ 64 .* got B=65"):
        _fused(_maps((65, 1, 2, 2)))


@pytest.mark.parametrize("shape", [(64, 2, 15, 15), (33, 3, 5, 51), (2, 1, 1, 1), (17, 2, 14, 13)])
def test_sizes_at_the_limits_match_the_reference(shape):
    """The largest batch and template count it takes, one row of 51, one pixel, ragged tiles."""
    x = _maps(shape, scale=3.0, seed=1)
    weights = torch.randn(shape[1], dtype=torch.float64)
    expected = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x, weights)
    got = _loss_and_grad(_fused, x, weights)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=1e-15)
    got32 = _loss_and_grad(_fused, x.float(), weights)
    assert _relative(got32[0], expected[0]) <= 1e-4 or shape[0] * shape[2] * shape[3] <= 2
    assert _relative(got32[1], expected[1]) <= 1e-5 or shape[0] * shape[2] * shape[3] <= 2


@pytest.mark.parametrize("scale", [1e-6, 50.0, 3000.0])
def test_large_and_tiny_activations_take_the_shifts(scale):
    """Spread > 30 makes the log-mean-exp shift and the mixture's centre act; no overflow, no NaN."""
    x = _maps((37, 2, 5, 7), scale=1.0, seed=2) ** 3 * scale
    x[0, 1] = 0.0  # one all-zero map
    weights = torch.tensor([1.5, -0.5], dtype=torch.float64)
    expected = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x, weights)
    got = _loss_and_grad(_fused, x, weights)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-8, atol=1e-13 * max(1.0, scale))
    got32 = _loss_and_grad(_fused, x.float(), weights)
    assert all(bool(torch.isfinite(t).all()) for t in got32)


def test_reads_and_writes_stay_in_bounds():
    """NaN around x (a masked-off read would poison the result) and sentinels around loss and dloss/dx."""
    shape = (19, 2, 3, 5)
    x_padded = torch.full([s + 2 for s in shape], float("nan"), dtype=torch.float32, device=DEVICE)
    x = x_padded[1:-1, 1:-1, 1:-1, 1:-1]
    x.copy_(_maps(shape, seed=3))
    templates = triton_forms._templates(3, 5, 4.0, torch.float32, x.device)
    templates_t = triton_forms._templates(3, 5, 4.0, torch.float32, x.device, transposed=True)
    loss_padded = torch.full((4,), 7.0, device=DEVICE)
    dx_padded = torch.full([s + 2 for s in shape], 7.0, device=DEVICE)
    loss, dx = loss_padded[1:-1], dx_padded[1:-1, 1:-1, 1:-1, 1:-1]
    triton_fused._forward_grad_kernel[(2,)](
        x, templates, templates_t, loss, dx, 19, 3, 5, *x.stride(), *dx.stride(), BLOCK_B=32, BLOCK_T=16, BLOCK_K=16,
        BLOCK_I=16, WITH_GRAD=True, IS_FP64=False, PRECISION="ieee")
    assert int((loss_padded == 7.0).sum()) == 2 and int((dx_padded == 7.0).sum()) == dx_padded.numel() - dx.numel()
    expected = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x.double(), torch.ones(2))
    assert _relative(loss, expected[0]) <= 1e-4 and _relative(dx, expected[1]) <= 1e-5


def test_saved_gradient_is_scaled_once_per_backward_and_second_derivatives_raise():
    x = _maps((5, 3, 4, 4), seed=4).requires_grad_()
    loss = _fused(x)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=DEVICE)
    (first,) = torch.autograd.grad(loss, x, weights, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, 2 * weights)  # the saved gradient is not consumed in place
    torch.testing.assert_close(second, 2 * first)
    expected = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x.detach(), weights)[1]
    torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-15)
    (dx,) = torch.autograd.grad(_fused(x).sum(), x, create_graph=True)
    torch.testing.assert_close(dx, _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x.detach(),
                                                  torch.ones(3))[1], rtol=1e-9, atol=1e-15)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(dx.square().sum(), x)
    with torch.no_grad():  # the loss alone: no gradient computed or kept
        torch.testing.assert_close(_fused(x), loss.detach())


def test_half_inputs_return_a_gradient_in_their_dtype():
    x = _maps((6, 2, 7, 5), scale=2.0, seed=5).to(torch.bfloat16)
    loss, grad = _loss_and_grad(_fused, x, torch.ones(2))
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    expected = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, 4.0), x.double(), torch.ones(2))
    assert _relative(loss, expected[0]) <= 1e-4 and _relative(grad, expected[1]) <= 1e-2
