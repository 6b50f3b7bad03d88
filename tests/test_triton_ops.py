"""The Triton backend against the reference (docs/method.md §1–3), on CUDA or, without a GPU, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py). The interpreter costs ~1 ms per program
and does not catch out-of-bounds accesses, so shapes are small and bounds are checked explicitly with
guard bands of NaN around the inputs and sentinels around the outputs.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from fastexplain import filter_loss, relu_template_mask
from fastexplain.ops import _registry, reference
from fastexplain.ops._checks import negative_message, nonfinite_message

from triton_env import DEVICE, INTERPRETED, TRITON  # skips this module where the backend cannot load

from fastexplain.ops import triton_filter_loss, triton_forms, triton_mask  # noqa: E402  (after the availability check)

pytestmark = pytest.mark.triton_interpret
# B, C, H, W: B = 1, C = 1, H ≠ W, n = max(H, W) ∈ {1, 2, 3, 7, 14}
SHAPES = [(1, 1, 1, 1), (3, 2, 1, 2), (4, 1, 3, 2), (5, 2, 7, 5), (1, 2, 3, 3), (6, 1, 14, 14)]


def _maps(shape, dtype=torch.float64, scale=1.0, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _grad(fn, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    (fn(x, 4.0) * weights.to(x.device, torch.float64)).sum().backward()
    return x.grad.double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.fixture
def small_tiles(monkeypatch):
    """The dense form in 16-wide tiles: several batch/template/position tiles with ragged tails on tiny maps."""
    monkeypatch.setattr(triton_forms, "FORM", "dense")
    monkeypatch.setattr(triton_filter_loss, "_tile_sizes",
                        lambda B, HW, device: dict(BLOCK_B=16, BLOCK_T=16, BLOCK_K=16, BACKWARD_B=16,
                                                   BACKWARD_T=16, BLOCK_I=16))


@pytest.fixture(params=["fused", "dense"])
def form(request, monkeypatch):
    """The two forms that run on small maps under "auto": fused (whole batch in one tile) and dense (beyond)."""
    monkeypatch.setattr(triton_forms, "FORM", request.param)
    return request.param


# ------------------------------------------------------------------------------------ filter loss
@pytest.mark.parametrize("shape", SHAPES)
def test_filter_loss_forward_and_backward_match_reference(shape, form):
    x = _maps(shape, scale=3.0)
    weights = torch.randn(shape[1], dtype=torch.float64)
    expected = reference.filter_loss_per_filter(x, 4.0)
    torch.testing.assert_close(TRITON.filter_loss(x, 4.0), expected, rtol=1e-10, atol=1e-15)
    loss32 = TRITON.filter_loss(x.float(), 4.0)
    assert loss32.dtype == torch.float32
    assert _relative(loss32, expected) <= 1e-4 or shape[0] == 1
    expected_grad = _grad(reference.filter_loss_per_filter, x, weights)
    torch.testing.assert_close(_grad(TRITON.filter_loss, x, weights), expected_grad, rtol=1e-9, atol=1e-15)
    if shape[0] == 1:  # one image: MI = 0 and a zero gradient
        assert float(expected.abs().max()) == 0 and float(_grad(TRITON.filter_loss, x.float(), weights).abs().max()) == 0
    else:
        assert _relative(_grad(TRITON.filter_loss, x.float(), weights), expected_grad) <= 1e-5


def test_float32_error_on_the_spec_case_beats_naive_float32(form):
    """docs/method.md §2: loss within 1e-4 relative of float64, gradient no worse than 2× naive float32's error."""
    x = _maps((16, 3, 14, 14), seed=1)
    weights = torch.ones(3, dtype=torch.float64)
    expected = reference.filter_loss_per_filter(x, 4.0)
    assert _relative(TRITON.filter_loss(x.float(), 4.0), expected) <= 1e-4
    expected_grad = _grad(reference.filter_loss_per_filter, x, weights)
    naive_error = _relative(_grad(reference.naive_filter_loss_per_filter, x.float(), weights), expected_grad)
    assert _relative(_grad(TRITON.filter_loss, x.float(), weights), expected_grad) <= 2 * naive_error


@pytest.mark.parametrize("scale", [1.0, 50.0, 3000.0])
def test_several_batch_and_template_tiles_with_online_shifts(small_tiles, scale):
    """B = 37 over 16-image tiles, 36 templates over 16-wide tiles; large scales trigger both shifts."""
    x = _maps((37, 1, 5, 7), scale=scale, seed=2) ** 3 / scale ** 2
    weights = torch.tensor([1.5], dtype=torch.float64)
    expected = reference.filter_loss_per_filter(x, 4.0)
    torch.testing.assert_close(TRITON.filter_loss(x, 4.0), expected, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(_grad(TRITON.filter_loss, x, weights),
                               _grad(reference.filter_loss_per_filter, x, weights), rtol=1e-8, atol=1e-13)
    if scale <= 50:
        assert _relative(TRITON.filter_loss(x.float(), 4.0), expected) <= 1e-4


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_loss_any_strides_and_half_inputs(layout, dtype, form):
    base = _maps((4, 3, 6, 10), scale=2.0, seed=3).to(dtype)
    x = {"channels_last": base.contiguous(memory_format=torch.channels_last),
         "sliced": base[:, ::2, :, ::2],
         "transposed_hw": base.transpose(2, 3)}[layout]
    weights = torch.randn(x.shape[1], dtype=torch.float64)
    expected = reference.filter_loss_per_filter(x.double(), 4.0)
    loss = TRITON.filter_loss(x, 4.0)
    assert loss.dtype == torch.float32 and _relative(loss, expected) <= 1e-4
    grad = _grad(TRITON.filter_loss, x, weights)
    assert grad.shape == x.shape
    assert _relative(grad, _grad(reference.filter_loss_per_filter, x.double(), weights)) <= 1e-2


def test_filter_loss_gradcheck_float64(form):
    x = _maps((3, 1, 2, 3), seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: TRITON.filter_loss(t, 2.5), (x,), eps=1e-6, atol=1e-9)


def test_public_op_reductions_and_dispatch():
    x = _maps((5, 3, 4, 4), seed=5)
    per_filter = reference.filter_loss_per_filter(x, 4.0)
    torch.testing.assert_close(filter_loss(x, backend="triton", reduction="none"), per_filter)
    torch.testing.assert_close(filter_loss(x, backend="triton", reduction="mean"), per_filter.mean())
    leaf = x.clone().requires_grad_()
    filter_loss(leaf, backend="triton", reduction="mean").backward()
    torch.testing.assert_close(leaf.grad, _grad(reference.filter_loss_per_filter, x, torch.full((3,), 1 / 3)))
    if DEVICE == "cuda":
        assert _registry.select(None, x, "filter_loss").name == "triton"


def test_value_checks_raise_the_shared_messages():
    x = _maps((2, 1, 3, 3))
    with pytest.raises(ValueError, match="negative values"):
        filter_loss(x - 1.0, backend="triton")
    assert negative_message("filter_loss").startswith("filter_loss")
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 0, 2, 1] = bad
        with pytest.raises(ValueError) as error:
            filter_loss(y, backend="triton")
        assert str(error.value) == nonfinite_message("filter_loss")
        with pytest.raises(ValueError) as error:
            relu_template_mask(y, backend="triton")
        assert str(error.value) == nonfinite_message("relu_template_mask")


def test_backend_says_why_it_is_unavailable_without_cuda_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    from fastexplain.ops import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_registry.BackendUnavailable, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        triton_backend.load_backend()


def _sentinel(shape, dtype, value=float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """A view of ``shape`` strictly inside a larger buffer filled with ``value`` (guard bands all round)."""
    padded = torch.full([s + 2 for s in shape], value, dtype=dtype, device=DEVICE)
    return padded, padded[tuple(slice(1, -1) for _ in shape)]


def test_filter_loss_kernels_stay_in_bounds(small_tiles):
    """NaN around x (a masked-off read would poison the result) and sentinels around every output."""
    shape = (19, 2, 3, 5)
    x_padded, x = _sentinel(shape, torch.float32)
    x.copy_(_maps(shape, seed=6))
    loss_expected = reference.filter_loss_per_filter(x.double(), 4.0)
    _, lme_ref, v_ref = triton_filter_loss.filter_loss_forward(x, 4.0)
    loss_pad, loss = _sentinel((2,), torch.float32, 7.0)  # the kernels index these flat, contiguous
    lme_pad, lme = _sentinel((2 * 16,), torch.float32, 7.0)
    v_pad, v = _sentinel((2 * 19,), torch.float32, 7.0)
    _, batch_mean, flags = triton_filter_loss._launch_settings(x)
    triton_filter_loss._forward_kernel[(2,)](
        x, batch_mean, lme, v, loss, 19, 2, 3, 5, 4.0, *x.stride(),
        BLOCK_B=16, BLOCK_T=16, BLOCK_K=16, CENTRE_IN_TILE=False, FROM_LOGITS=False, **flags)
    assert _relative(loss, loss_expected) <= 1e-4
    for padded, inner in ((loss_pad, loss), (lme_pad, lme), (v_pad, v)):
        assert int((padded == 7.0).sum()) == padded.numel() - inner.numel()
    torch.testing.assert_close(lme.view(2, 16), lme_ref)
    torch.testing.assert_close(v.view(2, 19), v_ref)
    dx_pad, dx = _sentinel(shape, torch.float32, 7.0)
    gbar = torch.empty_like(lme)
    grad = torch.ones(2, device=DEVICE)
    triton_filter_loss._gbar_kernel[(2,)](x, batch_mean, lme, v, gbar, 19, 2, 3, 5, 4.0, *x.stride(),
                                          BLOCK_B=16, BLOCK_T=16, BLOCK_K=16, CENTRE_IN_TILE=False,
                                          FROM_LOGITS=False, **flags)
    triton_filter_loss._backward_kernel[(2, 1, 2)](
        x, batch_mean, lme, v, gbar, grad, dx, 19, 2, 3, 5, 4.0, *x.stride(), *dx.stride(),
        BLOCK_B=16, BLOCK_T=16, BLOCK_K=16, BLOCK_I=16, CENTRE_IN_TILE=False, **flags)
    assert int((dx_pad == 7.0).sum()) == dx_pad.numel() - dx.numel()
    expected_grad = _grad(reference.filter_loss_per_filter, x.double(), torch.ones(2))
    assert _relative(dx, expected_grad) <= 1e-5


# ------------------------------------------------------------------------------------------- mask
MASK_CASES = list(itertools.product(["argmax", "centroid"], [None, "tau"], [False, True]))


def _mask_input(shape, dtype, relu, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x if relu else x.abs()
    if shape[2] * shape[3] > 1:
        x[0, 0] = 0.0  # an all-zero map: output zero, centroid index 0
    return x.to(dtype).to(DEVICE)


def _check_mask(x, center, scale, relu, exact=True):
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = TRITON.template_mask(a, 4.0, center, scale, relu)
    expected = reference.template_mask(b, 4.0, center, scale, relu)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == expected.stride()
    grad_out = torch.randn(y.shape, dtype=torch.float64).to(x.dtype).to(DEVICE)
    y.backward(grad_out)
    expected.backward(grad_out)
    tolerance = {} if exact else dict(rtol=1e-2, atol=1e-2 * float(expected.detach().abs().max()) + 1e-6)
    torch.testing.assert_close(y, expected, **({"rtol": 0, "atol": 0} if exact else tolerance))
    torch.testing.assert_close(a.grad, b.grad, **({"rtol": 0, "atol": 0} if exact else tolerance))


@pytest.mark.parametrize("center,scale,relu", MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_matches_reference_for_every_option(center, scale, relu, dtype):
    _check_mask(_mask_input((3, 4, 5, 7), dtype, relu), center, scale, relu,
                exact=dtype in (torch.float32, torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_odd_shapes(shape):
    for center, relu in (("argmax", True), ("centroid", False)):
        _check_mask(_mask_input(shape, torch.float32, relu, seed=1), center, None, relu)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_mask_keeps_layout_and_handles_strides(layout):
    base = _mask_input((4, 6, 5, 8), torch.float32, True, seed=2)
    x = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else base[:, 1::2, :, ::3]
    _check_mask(x, "argmax", "tau", True)
    _check_mask(x, "centroid", None, True)
    if layout == "channels_last":
        assert TRITON.template_mask(x, 4.0, "argmax", None, True).is_contiguous(memory_format=torch.channels_last)


def test_mask_ties_go_to_first_row_major_peak_and_centroid_rounds_half_up():
    # (the interpreter's argmax always returns the first maximum; tie_break_left is exercised on a GPU)
    x = torch.zeros(1, 3, 3, 4, device=DEVICE)
    x[0, 0, 1, 3] = x[0, 0, 2, 0] = 5.0          # tie: (1, 3) comes first in row-major order
    x[0, 1, 0, 0] = x[0, 1, 1, 1] = 1.0          # centroid (0.5, 0.5) → (1, 1)
    x[0, 2] = -1.0                               # all-negative map: relu gives all-zero, index 0
    _, peaks = triton_mask.template_mask_forward(x, 4.0, False, False, True)
    assert peaks[0, 0].item() == 1 * 4 + 3
    _, peaks = triton_mask.template_mask_forward(x, 4.0, True, False, True)
    assert peaks[0, 1].item() == 1 * 4 + 1 and peaks[0, 2].item() == 0
    _check_mask(x, "argmax", None, True)
    _check_mask(x, "centroid", None, True)


def test_mask_large_maps_take_the_tiled_path(monkeypatch):
    """Maps over _MAX_FUSED_MAP positions: peaks found first, then several position tiles per map."""
    monkeypatch.setattr(triton_mask, "_MAX_FUSED_MAP", 16)
    x = _mask_input((2, 3, 5, 7), torch.float32, True, seed=3)
    for center, scale, relu in MASK_CASES[::3]:
        _check_mask(x, center, scale, relu)


def test_mask_kernels_stay_in_bounds():
    shape = (3, 2, 5, 7)
    x_padded, x = _sentinel(shape, torch.float32)
    x.copy_(_mask_input(shape, torch.float32, True, seed=4))
    y_pad, y = _sentinel(shape, torch.float32, 7.0)
    peaks_pad, peaks = _sentinel((3 * 2,), torch.int32, 7)
    rows, block_hw = 4, 64  # 6 maps over two programs: rows 6, 7 and positions 35…63 are masked off
    triton_mask._mask_forward_kernel[(2, 1)](
        x, y, peaks, 6, 2, 5, 7, 4.0, *x.stride(), *y.stride(), ROWS=rows, BLOCK_HW=block_hw,
        RELU=True, CENTROID=False, SCALE_TAU=False, IS_FP64=False, PEAK_GIVEN=False)
    torch.testing.assert_close(y, reference.template_mask(x, 4.0, "argmax", None, True), rtol=0, atol=0)
    assert int((y_pad == 7.0).sum()) == y_pad.numel() - y.numel()
    assert int((peaks_pad == 7).sum()) == peaks_pad.numel() - peaks.numel()
    dx_pad, dx = _sentinel(shape, torch.float32, 7.0)
    grad = _sentinel(shape, torch.float32)[1].fill_(1.0)
    triton_mask._mask_backward_kernel[(2, 1)](
        grad, y, peaks, dx, 6, 2, 5, 7, 4.0, *grad.stride(), *y.stride(), *dx.stride(),
        ROWS=rows, BLOCK_HW=block_hw, SCALE_TAU=False, IS_FP64=False)
    assert int((dx_pad == 7.0).sum()) == dx_pad.numel() - dx.numel()
    assert torch.isfinite(dx).all()


# ----------------------------------------------------------------------------- torch.compile, GPU build
# ------------------------------------------------------------------------ large-n form (pyramid correlation)
from fastexplain.ops import triton_pyramid  # noqa: E402
from fastexplain.templates import part_templates  # noqa: E402


def _dense_pyramid(maps: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ_i maps(i)·max(0, r − ‖i − μ‖₁) from the dense template matrix (docs/method.md §1): (T_μ/τ + 1)·n/β."""
    D0, D1, H, W = maps.shape
    n = max(H, W)
    templates = part_templates(H, W, beta=beta, dtype=torch.float64).reshape(H * W + 1, H * W)[1:]
    pyramid = (templates / (0.5 / (H * W)) + 1.0) * n / beta
    return (maps.double().reshape(D0, D1, H * W) @ pyramid.T.to(maps.device)).reshape(D0, D1, H, W)


@pytest.mark.parametrize("shape, beta", [((2, 3, 1, 1), 4.0), ((3, 2, 5, 7), 4.0), ((2, 2, 9, 4), 2.5),
                                         ((1, 3, 6, 6), 1.0), ((2, 1, 13, 11), 7.0), ((1, 2, 2, 17), 4.0)])
def test_pyramid_correlation_equals_the_template_product(shape, beta):
    """Non-square maps, radii below 1, non-integer and beyond the map (β = 1: r = 2n), any strides."""
    maps = _maps(shape, seed=3) - 0.5
    expected = _dense_pyramid(maps, beta)
    radius = 2.0 * max(shape[2:]) / beta
    torch.testing.assert_close(triton_pyramid.pyramid_correlate(maps, radius), expected.to(DEVICE), rtol=1e-12, atol=1e-12)
    strided = maps.transpose(2, 3).contiguous().transpose(2, 3).float()
    out = triton_pyramid.pyramid_correlate(strided.transpose(0, 1), radius)
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out.transpose(0, 1).double(), expected.to(DEVICE), rtol=2e-5, atol=2e-5 * float(expected.abs().max()))


def test_pyramid_correlation_is_self_adjoint():
    a, b = _maps((2, 2, 6, 9), seed=4), _maps((2, 2, 6, 9), seed=5)
    left = (triton_pyramid.pyramid_correlate(a, 3.3) * b).sum()
    right = (a * triton_pyramid.pyramid_correlate(b, 3.3)).sum()
    torch.testing.assert_close(left, right, rtol=1e-12, atol=0)


MATERIALISED = ("gemm", "pyramid")  # the forms that build the logits and run the fused MI kernels on them


@pytest.mark.parametrize("form", MATERIALISED)
@pytest.mark.parametrize("shape, beta", [((4, 2, 6, 9), 4.0), ((3, 3, 7, 5), 2.5), ((1, 2, 5, 5), 4.0),
                                         ((70, 3, 4, 5), 4.0)])
def test_materialised_forms_match_reference(shape, beta, form):
    x = _maps(shape, scale=3.0, seed=6)
    weights = torch.rand(shape[1], dtype=torch.float64) + 0.5
    expected = reference.filter_loss_per_filter(x, beta)
    with triton_forms.use_form(form):
        loss = filter_loss(x, beta=beta, reduction="none", backend="triton")
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-15)
        fn = lambda t, b: filter_loss(t, beta=beta, reduction="none", backend="triton")  # noqa: E731
        grad = _grad(fn, x, weights)
        ref = lambda t, b: reference.filter_loss_per_filter(t, beta)  # noqa: E731
        torch.testing.assert_close(grad, _grad(ref, x, weights), rtol=1e-9, atol=1e-15)
        if shape[0] > 1:
            assert _relative(filter_loss(x.float(), beta=beta, reduction="none", backend="triton"), expected) <= 1e-4
            assert _relative(_grad(fn, x.float(), weights), _grad(ref, x, weights)) <= 1e-4


@pytest.mark.parametrize("form", MATERIALISED)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_materialised_forms_any_strides_and_half_inputs(layout, dtype, form):
    x = _maps((3, 2, 5, 6), scale=2.0, seed=8).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3).contiguous().transpose(2, 3)
    expected = reference.filter_loss_per_filter(x.double(), 4.0)
    with triton_forms.use_form(form):
        leaf = x.detach().requires_grad_()
        loss = filter_loss(leaf, reduction="none", backend="triton")
        loss.sum().backward()
    assert loss.dtype == torch.float32 and leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()
    assert _relative(loss.detach(), expected) <= 1e-4


@pytest.mark.parametrize("form", MATERIALISED)
def test_materialised_forms_gradcheck_float64(form):
    x = _maps((2, 1, 3, 4), seed=9).requires_grad_()
    with triton_forms.use_form(form):
        assert torch.autograd.gradcheck(lambda t: filter_loss(t, reduction="none", backend="triton"), (x,))


def test_mi_kernels_on_strided_logits_stay_in_bounds(small_tiles):
    """The FROM_LOGITS kernels read logits through any strides: NaN all round a transposed view of them must
    not reach the loss or ∂loss/∂s (several batch and template tiles with ragged tails)."""
    x = _maps((19, 2, 3, 5), seed=11)
    logits = triton_forms.gemm_logits(x, 4.0)                              # [B, C, T]
    padded, inner = _sentinel((2, 19, 16), torch.float64)                  # stored [C, B, T], read as [B, C, T]
    inner.copy_(logits.transpose(0, 1))
    strided = inner.transpose(0, 1)
    loss, lme, v = triton_forms.logits_mi_forward(strided)
    torch.testing.assert_close(loss, reference.filter_loss_per_filter(x, 4.0), rtol=1e-10, atol=1e-15)
    weights = torch.rand(2, dtype=torch.float64, device=DEVICE)
    ds = triton_forms.logits_mi_backward(strided, lme, v, weights)
    leaf = logits.detach().requires_grad_()
    priors = reference.template_priors(3, 5, dtype=torch.float64, device=DEVICE)
    (-reference.mutual_information(leaf.transpose(0, 1), priors) * weights).sum().backward()
    torch.testing.assert_close(ds, leaf.grad, rtol=1e-9, atol=1e-15)


def _assert_gemm_form_matches_reference(x: torch.Tensor, atol: float):
    """The gemm form's loss (rtol 1e-10) and gradient (rtol 1e-9) against the float64 reference; returns the op."""
    weights = torch.rand(x.shape[1], dtype=torch.float64) + 0.5
    fn = lambda t, b: filter_loss(t, beta=b, reduction="none", backend="triton")  # noqa: E731
    with triton_forms.use_form("gemm"):
        torch.testing.assert_close(fn(x, 4.0), reference.filter_loss_per_filter(x, 4.0), rtol=1e-10, atol=atol)
        torch.testing.assert_close(_grad(fn, x, weights), _grad(reference.filter_loss_per_filter, x, weights),
                                   rtol=1e-9, atol=atol)
    return fn


@pytest.mark.parametrize("launch", [{"BLOCK_B": 16, "BLOCK_T": 16}, {"BLOCK_T": 32, "num_warps": 8}])
def test_mi_launch_overrides_keep_the_result(monkeypatch, launch):
    """triton_forms.MI_LAUNCH (the GPU script's sweep) changes tiles and warps, never the loss or its gradient."""
    monkeypatch.setattr(triton_forms, "MI_LAUNCH", dict(launch))
    x = _maps((19, 2, 3, 5), scale=2.0, seed=12)
    _assert_gemm_form_matches_reference(x, atol=1e-15)


@pytest.mark.parametrize("case", ["plain", "saturated"])
def test_mi_forward_split_over_template_tiles_matches_the_reference(monkeypatch, case):
    """MI_LAUNCH["SPLIT"]: partials per (filter, template tile) and a combine kernel. Ragged template and batch
    tiles (T = 21 in tiles of 8, B = 19 in tiles of 8); "saturated": large maps with one blank image, whose
    u = s − lme lies far below −1 in some tiles only, so the tiles' centres differ and the combine rescales."""
    monkeypatch.setattr(triton_forms, "MI_LAUNCH", {"SPLIT": 1, "BLOCK_B": 8, "BLOCK_T": 8})
    x = _maps((19, 3, 4, 5), scale=2.0, seed=21)
    if case == "saturated":
        x = x * 40.0
        x[0] = 0.0
        x[1, :, :2] = 0.0
    fn = _assert_gemm_form_matches_reference(x, atol=1e-13)
    with triton_forms.use_form("gemm"):
        error = _relative(fn(x.float(), 4.0), reference.filter_loss_per_filter(x, 4.0))
    assert error < 1e-5, error
    logits = triton_forms.gemm_logits(x, 4.0)
    _, lme, v = triton_forms.logits_mi_forward(logits)
    monkeypatch.setattr(triton_forms, "MI_LAUNCH", {})
    _, lme_serial, v_serial = triton_forms.logits_mi_forward(logits)
    torch.testing.assert_close(lme, lme_serial, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, v_serial, rtol=1e-12, atol=1e-14)
    if case == "saturated":  # the branch under test was reached: some image has max_t u < −1
        u = logits.transpose(0, 1) - lme_serial[:, None, :]
        assert bool((u.amax(dim=2) < -1.0).any())


def test_auto_form_uses_the_matrix_product_only_in_full_precision():
    """On CUDA "auto" takes the gemm form up to GEMM_MAX_N, unless float32 matrix products may run in TF32;
    the pyramid form otherwise. The interpreter keeps dense below LARGE_N (its kernels are the ones tested)."""
    previous = torch.get_float32_matmul_precision()
    try:
        assert triton_forms.chosen_form(14, 14, "cuda") == "gemm" == triton_forms.chosen_form(56, 56, "cuda")
        assert triton_forms.chosen_form(57, 3, "cuda") == "pyramid"
        assert triton_forms.chosen_form(14, 14, "cpu") == "dense"
        torch.set_float32_matmul_precision("high")
        assert triton_forms.chosen_form(14, 14, "cuda") == "pyramid"
        assert triton_forms.chosen_form(14, 14, "cuda", torch.float64) == "gemm"
    finally:
        torch.set_float32_matmul_precision(previous)
    with pytest.raises(ValueError, match="form must be"):
        with triton_forms.use_form("fast"):
            pass


def test_large_maps_take_the_pyramid_form_without_a_template_matrix(monkeypatch):
    """From n = LARGE_N on, "auto" runs the pyramid form, which never builds the [HW+1, HW] templates (unless the
    maps are small enough for the fused form, whose template matrix has at most 256 rows)."""
    assert triton_forms.chosen_form(28, 5, "cpu") == "pyramid" and triton_forms.chosen_form(27, 27, "cpu") == "dense"
    assert triton_forms.chosen_form(28, 5, "cpu", batch=2) == "fused"

    def forbidden(*args, **kwargs):
        raise AssertionError("the pyramid form built a dense template matrix")

    monkeypatch.setattr(reference, "template_logits", forbidden)
    monkeypatch.setattr(reference, "part_templates", forbidden)
    monkeypatch.setattr(triton_forms, "part_templates", forbidden)
    monkeypatch.setattr(triton_forms, "GEMM_MAX_N", 27)  # on CUDA too
    x = _maps((2, 1, 28, 10), seed=10)  # 281 templates: too many for the fused form
    loss = filter_loss(x, reduction="none", backend="triton")
    monkeypatch.undo()
    torch.testing.assert_close(loss, reference.filter_loss_per_filter(x, 4.0), rtol=1e-10, atol=1e-15)


def test_pyramid_work_grows_as_n_cubed():
    """The pyramid kernel's loop bounds (loads per map) grow as n³ at n ≥ 28, the dense form's as n⁴."""
    sizes = (28, 56, 112)
    work = [triton_pyramid.pyramid_work(n, n, 2 * n / 4.0) for n in sizes]
    for (n0, w0), (n1, w1) in zip(zip(sizes, work), zip(sizes[1:], work[1:])):
        assert math.log(w1 / w0) / math.log(n1 / n0) <= 3.0 + 1e-9
    dense = [n * n * (n * n + 1) for n in sizes]
    assert math.log(dense[-1] / dense[-2]) / math.log(2) > 3.9


def test_the_triton_modules_import_without_a_cycle():
    """triton_filter_loss, triton_mask and triton_pyramid import _triton_common, never triton_backend."""
    script = ("import sys\nfrom fastexplain.ops import triton_filter_loss, triton_forms, triton_mask, triton_pyramid\n"
              "assert 'fastexplain.ops.triton_backend' not in sys.modules, 'cycle'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_gpu_script_smoke_run_checks_every_kernel_and_writes_its_report(tmp_path):
    """benchmarks/gpu_triton.py --smoke on tiny shapes (the interpreter without a GPU): it must check every
    kernel, pass, and write the JSON and markdown report. Its times mean nothing and are not looked at."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_triton.py"), "--smoke", "--no-compile",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    [report_path] = tmp_path.glob("gpu_triton_*.json")
    report = json.loads(report_path.read_text())
    checks = next(iter(report["shapes"].values()))["checks"]
    for kernel in ("triton_dense_ieee", "triton_gemm", "triton_pyramid", "pyramid_correlate_float64", "mask_centroid_relu0_tau"):
        assert checks[kernel]["ok"], checks[kernel]
    assert "Checks" in report_path.with_suffix(".md").read_text()


def test_second_derivatives_raise_for_the_loss_and_work_for_the_mask():
    """Differentiating the backward ops: the loss's raise (PyTorch's fallback would return silent zeros), the
    mask's backward is its own derivative and matches the reference."""
    for form in triton_forms.FORMS:  # the dense kernels and the materialised-logits forms
        x = _maps((3, 2, 4, 5), seed=7).requires_grad_()
        with triton_forms.use_form(form):
            (dx,) = torch.autograd.grad(filter_loss(x, backend="triton"), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(dx.square().sum(), x)
    x = (_maps((2, 3, 4, 5), seed=8) - 0.5).requires_grad_()
    second = []
    for backend in ("triton", "reference"):
        (dx,) = torch.autograd.grad(relu_template_mask(x, backend=backend).square().sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.sum(), x)
        second.append(ddx.double().cpu())
    assert second[1].abs().max() > 0
    torch.testing.assert_close(second[0], second[1])
