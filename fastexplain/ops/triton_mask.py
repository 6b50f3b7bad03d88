"""Fused Triton template mask (+ ReLU) (docs/method.md §3): kernels, launches and the torch.library op.

Forward, one read of x and one write of y per element: each program holds ROWS whole maps (image,
filter) in registers, applies the optional ReLU, finds the peak μ̂ — "argmax" (first maximum in row-major
order, ``tl.argmax(tie_break_left=True)``) or "centroid" (floor(Σ i·x / Σ x + 0.5) per coordinate,
clamped, all-zero map → 0) — builds m(i) = max(1 − β‖i − μ̂‖₁/n, −1) (times τ for scale="tau") on the
fly and writes y = max(x·m, 0). The peak index per (image, filter) is all the backward pass keeps
besides y itself (already alive as the next layer's input): ∂y/∂x = m·1[x·m > 0] = m·1[y > 0].

Maps larger than ``_MAX_FUSED_MAP`` positions do not fit in one program's registers: their peaks are
found by the reference's ``peak_indices`` first and the kernel then runs over position tiles (one more
read of x). Arithmetic runs in float32 (float64 for float64 inputs) and is rounded once to x's dtype, so
fp16/bf16 outputs can differ from the reference (which rounds every step in fp16) by one ulp. β reaches
the kernels as a float32 scalar.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import reference
from ._second_derivatives import register_as_own_derivative
from ._triton_common import register_kernel_op

# positions above which a map no longer fits in one program (peaks are then found first, see docstring)
_MAX_FUSED_MAP = 8192


@triton.jit
def _divide(numerator, denominator, IS_FP64: tl.constexpr):
    """IEEE round-to-nearest division (a plain float32 `/` may compile to a 2-ulp approximation on GPUs),
    so that masks and centroids match the reference bit for bit."""
    if IS_FP64:
        quotient = numerator / denominator
    else:
        quotient = tl.math.div_rn(numerator, denominator)
    return quotient


@triton.jit
def _mask_values(pos, peak, H, W, beta, SCALE_TAU: tl.constexpr, IS_FP64: tl.constexpr):
    """m(i) = max(1 − β‖i − μ̂‖₁ / n, −1), times τ = 0.5/(HW) when SCALE_TAU (docs/method.md §3)."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    dist = tl.abs(pos // W - peak // W) + tl.abs(pos % W - peak % W)
    n = tl.cast(tl.maximum(H, W), dtype)
    mask = tl.maximum(1.0 - _divide(beta * dist.to(dtype), n, IS_FP64), -1.0)
    if SCALE_TAU:
        mask = mask * _divide(tl.cast(0.5, dtype), tl.cast(H * W, dtype), IS_FP64)
    return mask


@triton.jit
def _offsets(rows, pos, C, W, stride_b, stride_c, stride_h, stride_w):
    """Element offsets of (map row = b·C + c, row-major position) pairs for any strides, in int64."""
    b = (rows // C).to(tl.int64)
    c = (rows % C).to(tl.int64)
    return (b[:, None] * stride_b + c[:, None] * stride_c
            + (pos // W).to(tl.int64)[None, :] * stride_h + (pos % W).to(tl.int64)[None, :] * stride_w)


@triton.jit
def _mask_forward_kernel(x_ptr, y_ptr, peak_ptr, maps, C, H, W, beta,
                         x_stride_b, x_stride_c, x_stride_h, x_stride_w,
                         y_stride_b, y_stride_c, y_stride_h, y_stride_w,
                         ROWS: tl.constexpr, BLOCK_HW: tl.constexpr, RELU: tl.constexpr,
                         CENTROID: tl.constexpr, SCALE_TAU: tl.constexpr, IS_FP64: tl.constexpr,
                         PEAK_GIVEN: tl.constexpr):
    """y = max(relu?(x)·m, 0) for ROWS maps × BLOCK_HW positions; stores μ̂ unless PEAK_GIVEN."""
    # torch.compile (inductor) passes a Python float argument as fp64: β in the compute dtype, as eager launches give it
    beta = tl.cast(beta, tl.float64 if IS_FP64 else tl.float32)
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pos = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    HW = H * W
    inside = (rows < maps)[:, None] & (pos < HW)[None, :]
    x = tl.load(x_ptr + _offsets(rows, pos, C, W, x_stride_b, x_stride_c, x_stride_h, x_stride_w),
                mask=inside, other=0.0).to(dtype)
    if RELU:
        x = tl.maximum(x, 0.0)
    if PEAK_GIVEN:
        peak = tl.load(peak_ptr + rows, mask=rows < maps, other=0)
    else:
        if CENTROID:
            total = tl.sum(x, axis=1)
            row_sum = tl.sum(x * (pos // W).to(dtype)[None, :], axis=1)
            col_sum = tl.sum(x * (pos % W).to(dtype)[None, :], axis=1)
            safe_total = tl.where(total > 0, total, 1.0)
            r = tl.floor(_divide(row_sum, safe_total, IS_FP64) + 0.5)
            c = tl.floor(_divide(col_sum, safe_total, IS_FP64) + 0.5)
            r = tl.minimum(tl.maximum(r, 0.0), tl.cast(H - 1, dtype))
            c = tl.minimum(tl.maximum(c, 0.0), tl.cast(W - 1, dtype))
            peak = tl.where(total > 0, r.to(tl.int32) * W + c.to(tl.int32), 0)
        else:
            peak = tl.argmax(tl.where(inside, x, -float("inf")), axis=1, tie_break_left=True).to(tl.int32)
        tl.store(peak_ptr + rows, peak, mask=rows < maps)
    mask = _mask_values(pos[None, :], peak[:, None], H, W, beta, SCALE_TAU, IS_FP64)
    y = tl.maximum(x * mask, 0.0)
    tl.store(y_ptr + _offsets(rows, pos, C, W, y_stride_b, y_stride_c, y_stride_h, y_stride_w),
             y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mask_backward_kernel(grad_ptr, y_ptr, peak_ptr, dx_ptr, maps, C, H, W, beta,
                          g_stride_b, g_stride_c, g_stride_h, g_stride_w,
                          y_stride_b, y_stride_c, y_stride_h, y_stride_w,
                          d_stride_b, d_stride_c, d_stride_h, d_stride_w,
                          ROWS: tl.constexpr, BLOCK_HW: tl.constexpr, SCALE_TAU: tl.constexpr,
                          IS_FP64: tl.constexpr):
    """dx = dy · m · 1[y > 0]: the mask is a constant rebuilt from μ̂ (docs/method.md §3)."""
    # torch.compile (inductor) passes a Python float argument as fp64: β in the compute dtype, as eager launches give it
    beta = tl.cast(beta, tl.float64 if IS_FP64 else tl.float32)
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    pos = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    inside = (rows < maps)[:, None] & (pos < H * W)[None, :]
    grad = tl.load(grad_ptr + _offsets(rows, pos, C, W, g_stride_b, g_stride_c, g_stride_h, g_stride_w),
                   mask=inside, other=0.0).to(dtype)
    y = tl.load(y_ptr + _offsets(rows, pos, C, W, y_stride_b, y_stride_c, y_stride_h, y_stride_w),
                mask=inside, other=0.0)
    peak = tl.load(peak_ptr + rows, mask=rows < maps, other=0)
    mask = _mask_values(pos[None, :], peak[:, None], H, W, beta, SCALE_TAU, IS_FP64)
    dx = tl.where(y > 0, grad * mask, 0.0)
    tl.store(dx_ptr + _offsets(rows, pos, C, W, d_stride_b, d_stride_c, d_stride_h, d_stride_w),
             dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _tile_sizes(maps: int, HW: int, device_type: str) -> tuple[int, int]:
    """(ROWS, BLOCK_HW): whole maps per program when they fit; ~16k elements per program under the
    interpreter (its cost is per program), ~4k on a GPU."""
    block_hw = triton.next_power_of_2(min(HW, _MAX_FUSED_MAP))
    budget = 16384 if device_type == "cpu" else 4096
    rows = max(1, min(budget // block_hw, triton.next_power_of_2(maps)))
    return rows, block_hw


def _template_mask_forward_fake(x: Tensor, beta: float, centroid: bool, scale_tau: bool,
                                relu: bool) -> tuple[Tensor, Tensor]:
    B, C, H, W = x.shape
    return torch.empty_like(x), torch.empty((B, C), dtype=torch.int32, device=x.device)


@register_kernel_op("fastexplain_triton::template_mask_forward", _template_mask_forward_fake)
def template_mask_forward(x: Tensor, beta: float, centroid: bool, scale_tau: bool,
                          relu: bool) -> tuple[Tensor, Tensor]:
    """(y, μ̂): y = max(relu?(x)·m, 0) with x's dtype and layout, μ̂ the int32 peak index [B, C] (docs/method.md §3)."""
    B, C, H, W = x.shape
    maps = B * C
    rows, block_hw = _tile_sizes(maps, H * W, x.device.type)
    peak_given = block_hw < H * W
    if peak_given:  # the map does not fit one program: find the peaks first (one extra read of x)
        source = torch.relu(x) if relu else x
        peaks = reference.peak_indices(source, "centroid" if centroid else "argmax").to(torch.int32)
    else:
        peaks = torch.empty((B, C), dtype=torch.int32, device=x.device)
    y = torch.empty_like(x)
    grid = (triton.cdiv(maps, rows), triton.cdiv(H * W, block_hw))
    wrap_triton(_mask_forward_kernel)[grid](
        x, y, peaks, maps, C, H, W, beta, *x.stride(), *y.stride(), ROWS=rows, BLOCK_HW=block_hw,
        RELU=relu, CENTROID=centroid, SCALE_TAU=scale_tau, IS_FP64=x.dtype == torch.float64,
        PEAK_GIVEN=peak_given)
    return y, peaks


def _template_mask_backward_fake(grad_y: Tensor, y: Tensor, peaks: Tensor, beta: float,
                                 scale_tau: bool) -> Tensor:
    return torch.empty_like(y)


@register_kernel_op("fastexplain_triton::template_mask_backward", _template_mask_backward_fake)
def template_mask_backward(grad_y: Tensor, y: Tensor, peaks: Tensor, beta: float, scale_tau: bool) -> Tensor:
    """dx = dy · m · 1[y > 0] with m rebuilt from the saved peaks (docs/method.md §3)."""
    B, C, H, W = y.shape
    maps = B * C
    rows, block_hw = _tile_sizes(maps, H * W, y.device.type)
    dx = torch.empty_like(y)
    grid = (triton.cdiv(maps, rows), triton.cdiv(H * W, block_hw))
    wrap_triton(_mask_backward_kernel)[grid](
        grad_y, y, peaks, dx, maps, C, H, W, beta, *grad_y.stride(), *y.stride(), *dx.stride(),
        ROWS=rows, BLOCK_HW=block_hw, SCALE_TAU=scale_tau, IS_FP64=y.dtype == torch.float64)
    return dx


def _setup_context(ctx, inputs, output) -> None:
    _, beta, _, scale_tau, _ = inputs
    y, peaks = output
    ctx.save_for_backward(y, peaks)
    ctx.beta = beta
    ctx.scale_tau = scale_tau
    ctx.mark_non_differentiable(peaks)


def _backward(ctx, grad_y: Tensor | None, grad_peaks: Tensor | None):
    y, peaks = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    return template_mask_backward(grad_y, y, peaks, ctx.beta, ctx.scale_tau), None, None, None, None


template_mask_forward.register_autograd(_backward, setup_context=_setup_context)


# Linear in grad_y, piecewise constant in y (the mask is a constant for autograd): double backward works.
register_as_own_derivative(template_mask_backward)


def triton_template_mask(x: Tensor, beta: float, center: str, scale: str | None, relu: bool) -> Tensor:
    """The masked map (docs/method.md §3) via the fused kernels; x already validated for rank/dtype/choices."""
    y, _ = template_mask_forward(x, beta, center == "centroid", scale == "tau", relu)
    return y
