"""The "fused" Triton form of the filter loss: loss and ∂loss/∂x of one filter in one program (docs/method.md §2).

For the sizes of a training step's middle layers (the whole batch in one tile, B ≤ ``MAX_B``; every template in
one tile, HW + 1 ≤ ``MAX_T``: 14×14, 15×15, 8×8 …) one program per filter

1. reads the filter's maps once, centres them over the batch (xc = x − mean_b x; MI is invariant to it) and
   forms all logits s[b, t] = Σ_i xc[b, i] T_t(i) with ``tl.dot`` over position tiles, the template matrix
   T [HW+1, HW] read from global memory (L2-resident: 154 kB at 14×14; this product reads Tᵀ, the gradient's T,
   so that neighbouring threads read neighbouring addresses);
2. computes, on the register tile s, the centred one-pass statistics of the dense form (lme_t, u = s − lme_t,
   v_b, f(u), f(v)) and stores −MI;
3. in training (WITH_GRAD), the exact gradient ∂(−MI)/∂s = −e^u p_t (u − v_b − Ḡ_t)/B with Ḡ_t = mean_b e^u (u − v)
   (one more column reduction, the whole batch being in the tile), then ∂(−MI)/∂x = (∂(−MI)/∂s) · T over position
   tiles with ``tl.dot``, stored as dloss_dx.

The backward pass of autograd only scales dloss_dx by each filter's incoming gradient. Nothing of size
B·C·(HW+1) is ever written; x is read once and dloss_dx written once (the CPU backend's
``filter_loss_forward_grad`` does the same in C++). Larger shapes use the other forms (``triton_forms``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._second_derivatives import scale_saved_gradient
from ._triton_common import register_kernel_op
from .reference import compute_dtype
from .triton_filter_loss import _SAFE_SPREAD, _entropy_term, _expm1, _log1p

MAX_B = 64    # the whole batch in one tile of ≤ 64 rows (register budget of the [B, HW+1] logits on a GPU)
MAX_T = 256   # every template in one tile: HW + 1 ≤ 256 (n ≤ 15 for square maps)
#: ``tl.dot`` precision for float32: "ieee" (full float32) or "tf32x3" (three TF32 products, ~float32 accuracy,
#: on tensor cores); ``benchmarks/gpu_triton.py`` checks and times both.
DOT_PRECISION = "ieee"
#: GPU launch per batch size (BLOCK_K: position tile of the logits product, BLOCK_I: of the dloss/dx product), the
#: fastest of the settings measured on an H200 (2026-12-04, docs/triton-kernels.md "The fused form"): 16 warps at
#: B = 64, whose [64, 256] tiles spill at 8; 8 warps at B ≤ 32, spill-free. One pipeline stage: more overflow the
#: shared memory or cost registers.
LAUNCH_BY_BATCH: tuple[tuple[int, dict[str, int]], ...] = (
    (32, {"BLOCK_K": 16, "BLOCK_I": 32, "num_warps": 8, "num_stages": 1}),
    (MAX_B, {"BLOCK_K": 16, "BLOCK_I": 32, "num_warps": 16, "num_stages": 1}))
#: float64 on CUDA: [B, HW+1] double tiles need small product tiles to fit in shared memory (tested on the H200)
LAUNCH_FP64: dict[str, int] = {"BLOCK_K": 16, "BLOCK_I": 16, "num_warps": 8, "num_stages": 1}
#: overrides of the above for every launch (``benchmarks/gpu_triton.py``'s sweep of the fused form)
LAUNCH: dict[str, int] = {}


def launch_settings(B: int, dtype: torch.dtype) -> dict[str, int]:
    """BLOCK_K, BLOCK_I, num_warps and num_stages of the fused kernel on a GPU for a batch of B maps."""
    chosen = LAUNCH_FP64 if dtype == torch.float64 else next(s for limit, s in LAUNCH_BY_BATCH if B <= limit)
    return {**chosen, **LAUNCH}

def fits(B: int, H: int, W: int) -> bool:
    """Whether the fused form takes B maps of H×W (the whole batch and every template in one tile)."""
    return B <= MAX_B and H * W + 1 <= MAX_T


@triton.jit
def _forward_grad_kernel(x_ptr, tmpl_ptr, tmpl_t_ptr, loss_ptr, dx_ptr, B, H, W,
                         stride_b, stride_c, stride_h, stride_w,
                         dx_stride_b, dx_stride_c, dx_stride_h, dx_stride_w,
                         BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_I: tl.constexpr, WITH_GRAD: tl.constexpr, IS_FP64: tl.constexpr,
                         PRECISION: tl.constexpr):
    """−MI of filter c = program_id(0) and, WITH_GRAD, its dloss/dx [B, H, W] (module docstring, steps 1–3)."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    HW = H * W
    T = HW + 1
    prior = 1.0 / tl.cast(T, dtype)
    b = tl.arange(0, BLOCK_B)
    t = tl.arange(0, BLOCK_T)
    valid_b = b < B
    valid_t = t < T
    valid = valid_b[:, None] & valid_t[None, :]
    # 1. logits of the batch-centred maps, every template at once
    s = tl.zeros((BLOCK_B, BLOCK_T), dtype=dtype)
    for k0 in range(0, HW, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        inside = valid_b[:, None] & (k < HW)[None, :]
        offsets = (b.to(tl.int64)[:, None] * stride_b + (k // W).to(tl.int64)[None, :] * stride_h
                   + (k % W).to(tl.int64)[None, :] * stride_w)
        maps = tl.load(x_ptr + c * stride_c + offsets, mask=inside, other=0.0).to(dtype)
        maps = tl.where(inside, maps - (tl.sum(maps, axis=0) / B)[None, :], 0.0)
        templates = tl.load(tmpl_t_ptr + k.to(tl.int64)[:, None] * T + t[None, :],  # Tᵀ [HW, T]: rows of t
                            mask=valid_t[None, :] & (k < HW)[:, None], other=0.0)
        s += tl.dot(maps, templates, input_precision=PRECISION, out_dtype=dtype)
    # 2. lme_t = m_t + log1p(mean_b expm1(s − m_t)), u = log(B·q), v_b = log(B·P_b), MI (centred one-pass form)
    shift = tl.maximum(tl.max(tl.where(valid, s, -float("inf")), axis=0) - _SAFE_SPREAD, 0.0)
    lme = shift + _log1p(tl.sum(tl.where(valid, _expm1(s - shift[None, :]), 0.0), axis=0) / B)
    u = s - lme[None, :]
    max_u = tl.max(tl.where(valid, u, -float("inf")), axis=1)
    centre = tl.where(max_u < -1.0, max_u, 0.0)
    mixture = tl.sum(tl.where(valid, prior * _expm1(u - centre[:, None]), 0.0), axis=1)
    v = tl.where(valid_b, centre + _log1p(mixture), 0.0)  # padding rows: 0, not −inf (0·inf in Ḡ)
    conditional = tl.sum(tl.where(valid, prior * _entropy_term(u), 0.0), axis=1)
    mutual_information = tl.sum(tl.where(valid_b, conditional - _entropy_term(v), 0.0), axis=0) / B
    tl.store(loss_ptr + c, -mutual_information)
    if WITH_GRAD:
        # 3. ∂(−MI)/∂s (docs/method.md §2 exact gradient), then ∂(−MI)/∂x = ∂(−MI)/∂s · T per position tile
        growth = tl.where(valid, tl.exp(u), 0.0)  # e^u = B·q
        gbar = tl.sum(growth * (u - v[:, None]), axis=0) / B
        dloss_ds = tl.where(valid, -growth * prior * (u - v[:, None] - gbar[None, :]) / B, 0.0)
        for i0 in range(0, HW, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            templates = tl.load(tmpl_ptr + t.to(tl.int64)[:, None] * HW + i[None, :],
                                mask=valid_t[:, None] & (i < HW)[None, :], other=0.0)
            dx = tl.dot(dloss_ds, templates, input_precision=PRECISION, out_dtype=dtype)
            offsets = (b.to(tl.int64)[:, None] * dx_stride_b + (i // W).to(tl.int64)[None, :] * dx_stride_h
                       + (i % W).to(tl.int64)[None, :] * dx_stride_w)
            tl.store(dx_ptr + c * dx_stride_c + offsets, dx, mask=valid_b[:, None] & (i < HW)[None, :])


def _launch(x: Tensor, templates: Tensor, templates_t: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
    B, C, H, W = x.shape
    if not fits(B, H, W):
        raise ValueError(f"filter_loss: the fused Triton form takes B ≤ {MAX_B} and H·W + 1 ≤ {MAX_T}, got "
                         f"B={B}, H×W={H}×{W}; use triton_forms.use_form('auto') for these sizes")
    dtype = compute_dtype(x)
    loss = x.new_empty((C,), dtype=dtype)
    dloss_dx = torch.empty_like(x, dtype=dtype) if with_grad else loss.new_empty((0,))
    dx_strides = dloss_dx.stride() if with_grad else (0, 0, 0, 0)
    interpreted = x.device.type == "cpu"  # TRITON_INTERPRET=1: few large tiles (its cost is per op)
    whole_map = triton.next_power_of_2(max(H * W, 16))
    launch = launch_settings(B, x.dtype)
    block_k = whole_map if interpreted else min(launch["BLOCK_K"], whole_map)
    block_i = whole_map if interpreted else min(launch["BLOCK_I"], whole_map)
    wrap_triton(_forward_grad_kernel)[(C,)](
        x, templates, templates_t, loss, dloss_dx, B, H, W, *x.stride(), *dx_strides,
        BLOCK_B=max(16, triton.next_power_of_2(B)), BLOCK_T=max(16, triton.next_power_of_2(H * W + 1)),
        BLOCK_K=block_k, BLOCK_I=block_i, WITH_GRAD=with_grad, IS_FP64=x.dtype == torch.float64,
        PRECISION=DOT_PRECISION if x.dtype != torch.float64 else "ieee", num_warps=launch["num_warps"],
        num_stages=launch["num_stages"])
    return loss, dloss_dx


def _loss_fake(x: Tensor, templates: Tensor, templates_t: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=compute_dtype(x))


@register_kernel_op("fastexplain_triton::fused_filter_loss", _loss_fake)
def fused_filter_loss(x: Tensor, templates: Tensor, templates_t: Tensor) -> Tensor:
    """−MI per filter [C] of post-ReLU maps x [B, C, H, W]; templates = T [HW+1, HW] and templates_t = Tᵀ, both
    contiguous in the compute dtype (each product reads the one whose rows its threads walk along)."""
    return _launch(x, templates, templates_t, with_grad=False)[0]


def _forward_grad_fake(x: Tensor, templates: Tensor, templates_t: Tensor) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(x)
    return x.new_empty((x.shape[1],), dtype=dtype), torch.empty_like(x, dtype=dtype)


@register_kernel_op("fastexplain_triton::fused_filter_loss_forward_grad", _forward_grad_fake)
def fused_filter_loss_forward_grad(x: Tensor, templates: Tensor, templates_t: Tensor) -> tuple[Tensor, Tensor]:
    """(−MI per filter [C], d(−MI_c)/dx [B, C, H, W] in the compute dtype): one pass over x (module docstring)."""
    return _launch(x, templates, templates_t, with_grad=True)


def _setup_context(ctx, inputs, output) -> None:
    x = inputs[0]
    dloss_dx = output[1]
    ctx.mark_non_differentiable(dloss_dx)
    ctx.set_materialize_grads(False)  # else autograd passes a map of zeros as dloss_dx's gradient
    ctx.save_for_backward(dloss_dx, x)  # x: for create_graph=True only (scale_saved_gradient)
    ctx.input_dtype = x.dtype


def _backward(ctx, grad_loss: Tensor | None, grad_dloss_dx: Tensor | None):
    if grad_loss is None:
        return None, None, None
    dloss_dx, x = ctx.saved_tensors
    return scale_saved_gradient(grad_loss, dloss_dx, x, "triton").to(ctx.input_dtype), None, None


fused_filter_loss_forward_grad.register_autograd(_backward, setup_context=_setup_context)
