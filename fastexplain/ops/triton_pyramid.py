"""The large-map form of the Triton filter loss (docs/method.md §1–2): no dense [HW+1, HW] template product.

The dense form (``triton_filter_loss``) multiplies every map by generated template tiles: B·C·HW·(HW+1)
multiply-adds, growing as n⁴. This form uses the structure of the templates (docs/method.md §1):

    s[b, 0]   = −τ·S_b,       S_b = Σ_i xc_b(i)
    s[b, 1+μ] = τ·(−S_b + κ·P_b(μ)),   P_b(μ) = Σ_i xc_b(i)·max(0, r − ‖i − μ‖₁),  κ = β/n, r = 2n/β

with xc = x − mean_b x (the batch-centred maps of the reference). The L1 pyramid correlation P is the
sum over row offsets δ = |i_r − μ_r| < r of 1-D tent correlations of radius ρ = r − δ along the rows,
and a 1-D tent correlation is O(1) per position: its second difference is a 5-point stencil,

    Δ²(t_ρ ⋆ x)(c) = −2·x(c) + (1 − f)·(x(c − m) + x(c + m)) + f·(x(c − m − 1) + x(c + m + 1)),

m = ⌈ρ⌉ − 1, f = ρ − m ∈ (0, 1] (the same f for every δ), so t_ρ ⋆ x is two cumulative sums of that
stencil along the row (``tl.cumsum``). One program handles BLOCK_M maps × one output row; it loops over
the ⌈r⌉ row offsets, two input rows each: 2⌈r⌉·W work per output row, O(r·HW) = O(n³) per map, instead
of O(HW²) = O(n⁴).

P is a linear map and its kernel is symmetric, so its adjoint is itself: the op ``pyramid_correlate``
is its own backward. ``pyramid_logits`` builds the logits [C, B, HW+1] from it; ``triton_forms`` runs the
fused MI kernels on them (the "pyramid" form, chosen for large maps, where a dense template product's n⁴
dominates: see ``triton_forms.chosen_form``). Autograd carries ∂MI/∂s back through the correlation.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._triton_common import register_kernel_op
from .reference import compute_dtype


@triton.jit
def _pyramid_kernel(src_ptr, out_ptr, f_ptr, rows, D1, H, W, offsets, pad,
                    stride_0, stride_1, stride_h, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, IS_FP64: tl.constexpr):
    """out[m, μr, c] = Σ_{r', c'} src[m, r', c']·max(0, radius − |r' − μr| − |c' − c|) for BLOCK_M maps
    (map m = (m // D1, m % D1) in src's first two dimensions, any strides; out contiguous [rows, H, W])."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mu_r = tl.program_id(1)
    valid_m = m < rows
    base = (m // D1).to(tl.int64) * stride_0 + (m % D1).to(tl.int64) * stride_1  # [BLOCK_M]
    j = tl.arange(0, BLOCK_W)
    column = j - pad  # the extended row: columns −pad … BLOCK_W − pad − 1, zero outside the map
    # f = ρ − (⌈ρ⌉ − 1), the same for every ρ = radius − δ (δ integer); read from memory, as a float
    # argument would reach the kernel in float32 only
    f = tl.load(f_ptr).to(dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=dtype)
    for delta in range(0, offsets):
        near = offsets - delta - 1  # m = ⌈ρ⌉ − 1 for ρ = radius − δ
        for side in tl.static_range(2):
            if side == 0:
                row = mu_r + delta
                row_ok = row < H
            else:
                row = mu_r - delta
                row_ok = (row >= 0) & (delta > 0)
            row_base = base[:, None] + row.to(tl.int64) * stride_h
            z = tl.zeros((BLOCK_M, BLOCK_W), dtype=dtype)
            for k in tl.static_range(5):
                if k == 0:
                    shift = 0
                    weight = -2.0
                elif k == 1:
                    shift = -near
                    weight = 1.0 - f
                elif k == 2:
                    shift = near
                    weight = 1.0 - f
                elif k == 3:
                    shift = -near - 1
                    weight = f
                else:
                    shift = near + 1
                    weight = f
                col = column + shift
                inside = valid_m[:, None] & ((col >= 0) & (col < W))[None, :] & row_ok
                values = tl.load(src_ptr + row_base + col.to(tl.int64)[None, :] * stride_w, mask=inside, other=0.0)
                z += weight * values.to(dtype)
            acc += tl.cumsum(tl.cumsum(z, axis=1), axis=1)
    # the double cumulative sum at index j is the tent correlation at column j − pad + 1
    out_col = column + 1
    out_offsets = (m.to(tl.int64)[:, None] * H * W + mu_r * W + out_col.to(tl.int64)[None, :])
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & ((out_col >= 0) & (out_col < W))[None, :])


def _pyramid_fake(maps: Tensor, radius: float) -> Tensor:
    return torch.empty(maps.shape, dtype=maps.dtype, device=maps.device)  # contiguous, as the kernel's output


def pyramid_work(H: int, W: int, radius: float) -> int:
    """Loaded elements per map of ``_pyramid_kernel`` (its loops: H rows × ⌈r⌉ offsets × 2 rows × 5 loads ×
    the extended row): the cost model behind "O(n³) per map", checked in tests/test_triton_ops.py."""
    offsets = math.ceil(radius)
    return H * offsets * 2 * 5 * triton.next_power_of_2(W + offsets)


def _tiles(rows: int, W: int, offsets: int, device_type: str) -> tuple[int, int]:
    block_w = triton.next_power_of_2(W + offsets)
    budget = 8192 if device_type == "cpu" else 2048  # elements per program tile
    block_m = max(1, min(budget // block_w, triton.next_power_of_2(rows), 128))
    return block_m, block_w


@register_kernel_op("fastexplain_triton::pyramid_correlate", _pyramid_fake)
def pyramid_correlate(maps: Tensor, radius: float) -> Tensor:
    """P[a, b, μ] = Σ_i maps[a, b, i]·max(0, radius − ‖i − μ‖₁) for maps [D0, D1, H, W] (any strides; float32
    or float64): a contiguous tensor of the same shape and dtype. Linear and self-adjoint."""
    D0, D1, H, W = maps.shape
    out = torch.empty((D0, D1, H, W), dtype=maps.dtype, device=maps.device)
    rows = D0 * D1
    offsets = math.ceil(radius)
    if rows == 0 or H * W == 0:
        return out
    block_m, block_w = _tiles(rows, W, offsets, maps.device.type)
    fraction = torch.full((1,), radius - offsets + 1, dtype=maps.dtype, device=maps.device)
    grid = (triton.cdiv(rows, block_m), H)
    wrap_triton(_pyramid_kernel)[grid](
        maps, out, fraction, rows, D1, H, W, offsets, offsets, *maps.stride(),
        BLOCK_M=block_m, BLOCK_W=block_w, IS_FP64=maps.dtype == torch.float64)
    return out


def _pyramid_setup(ctx, inputs, output) -> None:
    ctx.radius = inputs[1]


def _pyramid_backward(ctx, grad: Tensor):
    return pyramid_correlate(grad, ctx.radius), None


pyramid_correlate.register_autograd(_pyramid_backward, setup_context=_pyramid_setup)


def pyramid_logits(x: Tensor, beta: float) -> Tensor:
    """s [C, B, HW+1] = T·(x − mean_b x) in the compute dtype, differentiable, by the pyramid correlation."""
    B, C, H, W = x.shape
    n = max(H, W)
    maps = x.to(compute_dtype(x))
    centred = maps - maps.mean(dim=0, keepdim=True)
    tau, kappa = 0.5 / (H * W), beta / n
    pyramid = pyramid_correlate(centred.transpose(0, 1), 2.0 * n / beta)  # [C, B, H, W]
    totals = centred.sum(dim=(2, 3)).transpose(0, 1)[..., None]          # S_b, [C, B, 1]
    return torch.cat([-tau * totals, tau * (kappa * pyramid.reshape(C, B, H * W) - totals)], dim=2)
