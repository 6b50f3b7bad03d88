"""Fused Triton filter loss −MI per filter (docs/method.md §1–2): kernels, launches and the torch.library op.

Per filter c the kernels never materialise the [B, HW+1] logits, let alone a [B, C, HW+1] buffer:

* template tiles T[k, t] are generated on the fly from docs/method.md §1 (row 0 = T⁻ = −τ, row 1+μ = T_μ);
* logits s[b, t] = Σ_k xc[b, k] T[k, t] come from ``tl.dot`` over HW tiles, with xc = x − mean_b x
  (the batch-centred maps of the reference: MI is invariant to a per-template shift of s);
* forward pass 1 (per template tile, batch tiles inside): lme_t = log mean_b e^{s[b,t]}, computed online
  as m + log1p(mean_b expm1(s − m)), the shift m > 0 only when exp could overflow (spread > 30);
* forward pass 2 (per batch tile, template tiles inside): u = s − lme_t = log(B·q), the per-image
  mixture v_b = log(B·P_b) = c_b + log1p(Σ_t p_t expm1(u − c_b)) (c_b ≠ 0 only when max_t u < −1,
  rescaled online), and MI = Σ_t p_t mean_b f(u) − mean_b f(v) with f(u) = u·e^u − expm1(u);
* backward (FlashAttention-style recomputation, docs/method.md §2 "Exact gradient"): a pre-pass stores
  Ḡ_t = mean_b e^u (u − v), then each (filter, image tile, position tile) program recomputes s and
  accumulates dx_b(i) = −grad_c · Σ_t ∂MI/∂s[b,t] T_t(i) with ∂MI/∂s = e^u p_t (u − v − Ḡ_t) / B.

Extra memory: lme [C, HW+1], v [C, B], Ḡ [C, HW+1] (and mean_b x [C, HW] when B spans several batch
tiles) — never O(B·C·HW). Compute dtype: float32 (float64 for float64 inputs), fp16/bf16 upcast on load.
This is the "dense" form: its template product costs B·C·HW·(HW+1) multiply-adds (n⁴ per map), recomputed
in every kernel. The forward and Ḡ kernels also read materialised logits (FROM_LOGITS): ``triton_forms``
runs them on logits made by one matrix product ("gemm") or by the pyramid correlation ("pyramid") and
chooses between the three forms.

Triton has no portable expm1/log1p: ``_expm1``/``_log1p``/``_entropy_term`` are series for small
arguments, so float32 matches the float64 reference to ~1e-6 relative like reference.py does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._second_derivatives import forbid_second_derivative
from ._triton_common import register_kernel_op
from .reference import compute_dtype

_SAFE_SPREAD = tl.constexpr(30.0)  # same as reference.py: shift the log-mean-exp only when exp(s) could overflow


# ----------------------------------------------------------------------------------------- math helpers
@triton.jit
def _expm1(x):
    """e^x − 1: Taylor series (Horner) for |x| < 0.5, exp(x) − 1 beyond (no cancellation). Terms up to x^17 in
    float64, x^10 in float32 (the first omitted term is below 1e-9 relative there)."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    acc = tl.zeros_like(x) + 1.0
    if x.dtype == tl.float64:
        for k in tl.static_range(17, 1, -1):
            acc = 1.0 + xs * acc * (1.0 / k)
    else:
        for k in tl.static_range(10, 1, -1):
            acc = 1.0 + xs * acc * (1.0 / k)
    return tl.where(small, xs * acc, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    """log(1 + x): 2·atanh(z), z = x / (2 + x), as an odd series for |x| < 0.25 (|z| < 1/7: terms to z^21 in
    float64, z^11 in float32), log(1 + x) beyond."""
    small = tl.abs(x) < 0.25
    z = tl.where(small, x, 0.0) / (2.0 + tl.where(small, x, 0.0))
    z2 = z * z
    acc = tl.zeros_like(x)
    if x.dtype == tl.float64:
        for j in tl.static_range(10, 0, -1):
            acc = (1.0 / (2 * j + 1)) + z2 * acc
    else:
        for j in tl.static_range(5, 0, -1):
            acc = (1.0 / (2 * j + 1)) + z2 * acc
    series = 2.0 * z * (1.0 + z2 * acc)
    return tl.where(small, series, tl.log(1.0 + tl.where(small, 0.0, x)))


@triton.jit
def _entropy_term(u):
    """f(u) = u·e^u − expm1(u) = Σ_{k≥2} (k−1) u^k / k! ≥ 0 (reference.entropy_term), series for |u| < 0.5
    (k ≤ 18 in float64, k ≤ 11 in float32)."""
    small = tl.abs(u) < 0.5
    us = tl.where(small, u, 0.0)
    acc = tl.zeros_like(u)
    # Horner on f(u)/u² = Σ_{k≥2} c_k u^{k−2} with c_k = (k−1)/k!
    if u.dtype == tl.float64:
        for k in tl.static_range(18, 1, -1):
            acc = acc * us + (k - 1) / _factorial(k)
    else:
        for k in tl.static_range(11, 1, -1):
            acc = acc * us + (k - 1) / _factorial(k)
    direct = u * tl.exp(u) - (tl.exp(u) - 1.0)
    return tl.where(small, acc * us * us, direct)


@triton.constexpr_function
def _factorial(k):
    """k! as a float at compile time; builtins only (torch.compile's inductor copies this source into a module
    of its own that imports nothing but triton)."""
    product = 1.0
    for factor in range(2, k + 1):
        product *= factor
    return product


# ------------------------------------------------------------------------------------- tile builders
@triton.jit
def _template_values(pos, tmpl, W, n, beta, tau):
    """T_t(i) for broadcastable index tensors pos (row-major i) and tmpl (t = 0 is T⁻): docs/method.md §1."""
    mu = tl.maximum(tmpl - 1, 0)
    dist = tl.abs(pos // W - mu // W) + tl.abs(pos % W - mu % W)
    profile = tl.maximum(1.0 - dist.to(tau.dtype) * (beta / n), -1.0)
    return tl.where(tmpl == 0, -tau, tau * profile)


@triton.jit
def _centred_maps(x_ptr, xbar_ptr, c, b0, k0, B, HW, W, stride_b, stride_c, stride_h, stride_w,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, CENTRE_IN_TILE: tl.constexpr,
                  IS_FP64: tl.constexpr):
    """xc[b, k] = x[b, c, k] − mean_b x[:, c, k] for one (batch tile, position tile); 0 outside the map."""
    b = b0 + tl.arange(0, BLOCK_B)
    k = k0 + tl.arange(0, BLOCK_K)
    inside = (b < B)[:, None] & (k < HW)[None, :]
    offsets = (b.to(tl.int64)[:, None] * stride_b + c.to(tl.int64) * stride_c
               + (k // W).to(tl.int64)[None, :] * stride_h + (k % W).to(tl.int64)[None, :] * stride_w)
    maps = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float64 if IS_FP64 else tl.float32)
    if CENTRE_IN_TILE:  # the whole batch is in this tile: its mean is a column sum away
        mean = tl.sum(maps, axis=0) / B
    else:
        mean = tl.load(xbar_ptr + c.to(tl.int64) * HW + k, mask=k < HW, other=0.0)
    return tl.where(inside, maps - mean[None, :], 0.0)


@triton.jit
def _logits(x_ptr, xbar_ptr, c, b0, t0, B, HW, W, T, n, beta, tau,
            stride_b, stride_c, stride_h, stride_w,
            BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
            CENTRE_IN_TILE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
            FROM_LOGITS: tl.constexpr):
    """s[b, t] = Σ_k xc[b, k] T_t(k) for one (batch tile, template tile), templates made on the fly.

    With FROM_LOGITS, x_ptr holds materialised logits s[b, c, t] (strides stride_b, stride_c, stride_h;
    ``triton_forms``) and the tile is loaded instead: 0 outside [B, T], as the computed tile is.
    """
    t = t0 + tl.arange(0, BLOCK_T)
    if FROM_LOGITS:
        b = b0 + tl.arange(0, BLOCK_B)
        offsets = (b.to(tl.int64)[:, None] * stride_b + c.to(tl.int64) * stride_c
                   + t.to(tl.int64)[None, :] * stride_h)
        inside = (b < B)[:, None] & (t < T)[None, :]
        return tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float64 if IS_FP64 else tl.float32)
    s = tl.zeros((BLOCK_B, BLOCK_T), dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, HW, BLOCK_K):
        maps = _centred_maps(x_ptr, xbar_ptr, c, b0, k0, B, HW, W, stride_b, stride_c, stride_h, stride_w,
                             BLOCK_B, BLOCK_K, CENTRE_IN_TILE, IS_FP64)
        k = k0 + tl.arange(0, BLOCK_K)
        templates = _template_values(k[:, None], t[None, :], W, n, beta, tau)
        templates = tl.where((k < HW)[:, None] & (t < T)[None, :], templates, 0.0)
        s += tl.dot(maps, templates, input_precision=PRECISION, out_dtype=s.dtype)
    return s


@triton.jit
def _constants(H, W, IS_FP64: tl.constexpr):
    """(n, τ, p) in the compute dtype: n = max(H, W), τ = 0.5/(HW), every prior p_t = 1/(HW+1) (docs/method.md §1)."""
    hw = tl.cast(H * W, tl.float64 if IS_FP64 else tl.float32)
    n = tl.cast(tl.maximum(H, W), tl.float64 if IS_FP64 else tl.float32)
    return n, 0.5 / hw, 1.0 / (hw + 1.0)


# ------------------------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(x_ptr, xbar_ptr, lme_ptr, v_ptr, loss_ptr, B, C, H, W, beta,
                    stride_b, stride_c, stride_h, stride_w,
                    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                    CENTRE_IN_TILE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                    FROM_LOGITS: tl.constexpr):
    """One program per filter: lme_t (pass 1), then v_b and −MI (pass 2). docs/method.md §2, centred one-pass form.

    With the batch in one tile the two passes fuse: each logits tile is computed once.
    """
    # torch.compile (inductor) passes a Python float argument as fp64: β in the compute dtype, as eager launches give it
    beta = tl.cast(beta, tl.float64 if IS_FP64 else tl.float32)
    c = tl.program_id(0)
    HW = H * W
    T = HW + 1
    n, tau, prior = _constants(H, W, IS_FP64)
    # pass 1: lme_t = m_t + log1p(mean_b expm1(s − m_t)), m_t = max(0, max_b s − 30), rescaled online.
    # When the whole batch is one tile (CENTRE_IN_TILE), pass 2 gets lme_t from its own logits instead.
    if not CENTRE_IN_TILE:
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            shift = tl.zeros((BLOCK_T,), dtype=tl.float64 if IS_FP64 else tl.float32)
            total = tl.zeros((BLOCK_T,), dtype=tl.float64 if IS_FP64 else tl.float32)
            for b0 in range(0, B, BLOCK_B):
                s = _logits(x_ptr, xbar_ptr, c, b0, t0, B, HW, W, T, n, beta, tau, stride_b, stride_c,
                            stride_h, stride_w, BLOCK_B, BLOCK_T, BLOCK_K, CENTRE_IN_TILE, IS_FP64, PRECISION,
                            FROM_LOGITS)
                valid_b = (b0 + tl.arange(0, BLOCK_B)) < B
                tile_max = tl.max(tl.where(valid_b[:, None], s, -float("inf")), axis=0)
                new_shift = tl.maximum(shift, tile_max - _SAFE_SPREAD)
                seen = tl.cast(b0, shift.dtype)  # images already summed into `total`
                rescaled = (total + seen) * tl.exp(shift - new_shift) - seen
                total = tl.where(new_shift > shift, rescaled, total)
                shift = new_shift
                total += tl.sum(tl.where(valid_b[:, None], _expm1(s - shift[None, :]), 0.0), axis=0)
            lme = shift + _log1p(total / B)
            tl.store(lme_ptr + c.to(tl.int64) * T + t, lme, mask=t < T)
    # pass 2: per image tile, v_b = c_b + log1p(Σ_t p_t expm1(u − c_b)) and the two entropy sums
    conditional = tl.zeros((BLOCK_B,), dtype=tl.float64 if IS_FP64 else tl.float32)
    marginal = tl.zeros((BLOCK_B,), dtype=tl.float64 if IS_FP64 else tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        valid_b = b < B
        max_u = tl.zeros((BLOCK_B,), dtype=conditional.dtype) - float("inf")
        centre = tl.zeros((BLOCK_B,), dtype=conditional.dtype)
        tile_conditional = tl.zeros((BLOCK_B,), dtype=conditional.dtype)
        mixture = tl.zeros((BLOCK_B,), dtype=conditional.dtype)  # Σ_t p_t expm1(u − centre)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid_t = t < T
            s = _logits(x_ptr, xbar_ptr, c, b0, t0, B, HW, W, T, n, beta, tau, stride_b, stride_c,
                        stride_h, stride_w, BLOCK_B, BLOCK_T, BLOCK_K, CENTRE_IN_TILE, IS_FP64, PRECISION,
                        FROM_LOGITS)
            if CENTRE_IN_TILE:  # all B images are in s: lme_t in one go (pass 1 was skipped)
                shift = tl.maximum(tl.max(tl.where(valid_b[:, None], s, -float("inf")), axis=0) - _SAFE_SPREAD, 0.0)
                total = tl.sum(tl.where(valid_b[:, None], _expm1(s - shift[None, :]), 0.0), axis=0)
                lme = shift + _log1p(total / B)
                tl.store(lme_ptr + c.to(tl.int64) * T + t, lme, mask=valid_t)
            else:
                lme = tl.load(lme_ptr + c.to(tl.int64) * T + t, mask=valid_t, other=0.0)
            u = s - lme[None, :]
            max_u = tl.maximum(max_u, tl.max(tl.where(valid_t[None, :], u, -float("inf")), axis=1))
            new_centre = tl.where(max_u < -1.0, max_u, 0.0)
            prior_seen = tl.cast(t0, mixture.dtype) * prior  # Σ p_t over the templates already summed
            # the centre only grows with max_u, except from its start value 0 on the first tile, where the
            # sum is still empty: clamping the exponent at 0 keeps exp finite there (0 · e^0 = 0)
            rescaled = (mixture + prior_seen) * tl.exp(tl.minimum(centre - new_centre, 0.0)) - prior_seen
            mixture = tl.where(new_centre != centre, rescaled, mixture)
            centre = new_centre
            # select (not multiply by a zero prior): u − centre of padding templates may overflow exp
            mixture += tl.sum(tl.where(valid_t[None, :], prior * _expm1(u - centre[:, None]), 0.0), axis=1)
            tile_conditional += tl.sum(tl.where(valid_t[None, :], prior * _entropy_term(u), 0.0), axis=1)
        v = centre + _log1p(mixture)
        tl.store(v_ptr + c.to(tl.int64) * B + b, v, mask=valid_b)
        conditional += tl.where(valid_b, tile_conditional, 0.0)
        marginal += tl.where(valid_b, _entropy_term(v), 0.0)
    mutual_information = (tl.sum(conditional, axis=0) - tl.sum(marginal, axis=0)) / B
    tl.store(loss_ptr + c, -mutual_information)


@triton.jit
def _gbar_kernel(x_ptr, xbar_ptr, lme_ptr, v_ptr, gbar_ptr, B, C, H, W, beta,
                 stride_b, stride_c, stride_h, stride_w,
                 BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 CENTRE_IN_TILE: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                 FROM_LOGITS: tl.constexpr):
    """Ḡ_t = mean_b e^{u[b,t]} (u[b,t] − v_b) per filter: Σ_b q g = p_t·Ḡ_t of docs/method.md §2's gradient."""
    # torch.compile (inductor) passes a Python float argument as fp64: β in the compute dtype, as eager launches give it
    beta = tl.cast(beta, tl.float64 if IS_FP64 else tl.float32)
    c = tl.program_id(0)
    HW = H * W
    T = HW + 1
    n, tau, prior = _constants(H, W, IS_FP64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        lme = tl.load(lme_ptr + c.to(tl.int64) * T + t, mask=t < T, other=0.0)
        total = tl.zeros((BLOCK_T,), dtype=lme.dtype)
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            s = _logits(x_ptr, xbar_ptr, c, b0, t0, B, HW, W, T, n, beta, tau, stride_b, stride_c,
                        stride_h, stride_w, BLOCK_B, BLOCK_T, BLOCK_K, CENTRE_IN_TILE, IS_FP64, PRECISION,
                        FROM_LOGITS)
            v = tl.load(v_ptr + c.to(tl.int64) * B + b, mask=b < B, other=0.0)
            u = s - lme[None, :]
            total += tl.sum(tl.where((b < B)[:, None], tl.exp(u) * (u - v[:, None]), 0.0), axis=0)
        tl.store(gbar_ptr + c.to(tl.int64) * T + t, total / B, mask=t < T)


@triton.jit
def _backward_kernel(x_ptr, xbar_ptr, lme_ptr, v_ptr, gbar_ptr, grad_ptr, dx_ptr, B, C, H, W, beta,
                     stride_b, stride_c, stride_h, stride_w,
                     dx_stride_b, dx_stride_c, dx_stride_h, dx_stride_w,
                     BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_I: tl.constexpr, CENTRE_IN_TILE: tl.constexpr, IS_FP64: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dx[b, c, i] = −grad_c Σ_t e^u p_t (u − v_b − Ḡ_t)/B · T_t(i) for one (filter, position tile, image tile)."""
    # torch.compile (inductor) passes a Python float argument as fp64: β in the compute dtype, as eager launches give it
    beta = tl.cast(beta, tl.float64 if IS_FP64 else tl.float32)
    c = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_I
    b0 = tl.program_id(2) * BLOCK_B
    HW = H * W
    T = HW + 1
    n, tau, prior = _constants(H, W, IS_FP64)
    b = b0 + tl.arange(0, BLOCK_B)
    i = i0 + tl.arange(0, BLOCK_I)
    v = tl.load(v_ptr + c.to(tl.int64) * B + b, mask=b < B, other=0.0)
    dx = tl.zeros((BLOCK_B, BLOCK_I), dtype=v.dtype)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        s = _logits(x_ptr, xbar_ptr, c, b0, t0, B, HW, W, T, n, beta, tau, stride_b, stride_c,
                    stride_h, stride_w, BLOCK_B, BLOCK_T, BLOCK_K, CENTRE_IN_TILE, IS_FP64, PRECISION, False)
        lme = tl.load(lme_ptr + c.to(tl.int64) * T + t, mask=t < T, other=0.0)
        gbar = tl.load(gbar_ptr + c.to(tl.int64) * T + t, mask=t < T, other=0.0)
        u = s - lme[None, :]
        dmi_ds = tl.exp(u) * prior * (u - v[:, None] - gbar[None, :]) / B
        dmi_ds = tl.where((b < B)[:, None] & (t < T)[None, :], dmi_ds, 0.0)
        templates = _template_values(i[None, :], t[:, None], W, n, beta, tau)
        templates = tl.where((t < T)[:, None] & (i < HW)[None, :], templates, 0.0)
        dx += tl.dot(dmi_ds, templates, input_precision=PRECISION, out_dtype=dx.dtype)
    grad = tl.load(grad_ptr + c).to(dx.dtype)
    offsets = (b.to(tl.int64)[:, None] * dx_stride_b + c.to(tl.int64) * dx_stride_c
               + (i // W).to(tl.int64)[None, :] * dx_stride_h + (i % W).to(tl.int64)[None, :] * dx_stride_w)
    tl.store(dx_ptr + offsets, (-grad * dx).to(dx_ptr.dtype.element_ty),
             mask=(b < B)[:, None] & (i < HW)[None, :])


# --------------------------------------------------------------------------------- launches and op
# tl.dot precision for float32: "ieee" keeps the 1e-4 target; "tf32x3" is the faster GPU alternative
# (benchmarks/gpu_triton.py checks both against the reference before timing them).
DOT_PRECISION = "ieee"


def _next_power_of_2(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(value)))


def _tile_sizes(B: int, HW: int, device_type: str) -> dict[str, int]:
    """Block sizes. Forward and Ḡ kernels: BLOCK_B × BLOCK_T logits tiles over BLOCK_K positions. dx kernel:
    BACKWARD_B × BLOCK_I outputs, BACKWARD_T templates at a time; a whole map per program (BLOCK_I ≥ HW)
    avoids recomputing the logits per position tile. Under the CPU interpreter tiles are large (its cost
    is per program and per op); the GPU sizes are untuned (on an H200 the dense form is slow: docs/triton-kernels.md)."""
    if device_type == "cpu":  # TRITON_INTERPRET=1
        block_b = _next_power_of_2(B, 16, 128)
        block_t = _next_power_of_2(HW + 1, 16, 256)
        return {"BLOCK_B": block_b, "BLOCK_T": block_t, "BLOCK_K": _next_power_of_2(HW, 16, 256),
                "BACKWARD_B": block_b, "BACKWARD_T": block_t, "BLOCK_I": _next_power_of_2(HW, 16, 256),
                "BACKWARD_WARPS": 4}
    block_i = _next_power_of_2(HW, 16, 1024)
    return {"BLOCK_B": _next_power_of_2(B, 16, 64), "BLOCK_T": 64, "BLOCK_K": 32,
            "BACKWARD_B": 16 if block_i > 256 else _next_power_of_2(B, 16, 64),
            "BACKWARD_T": 16 if block_i > 256 else 32, "BLOCK_I": block_i,
            "BACKWARD_WARPS": 8 if block_i > 256 else 4}


def _launch_settings(x: Tensor) -> tuple[dict[str, int], Tensor, dict[str, object]]:
    """Tile sizes, the batch mean mean_b x [C, HW] (x itself, unread, when every kernel holds the whole
    batch in one tile) and the constexpr flags shared by the kernels."""
    B, C, H, W = x.shape
    tiles = _tile_sizes(B, H * W, x.device.type)
    whole_batch = B <= min(tiles["BLOCK_B"], tiles["BACKWARD_B"])
    batch_mean = x if whole_batch else x.mean(dim=0, dtype=compute_dtype(x)).contiguous()
    flags = {"IS_FP64": x.dtype == torch.float64, "PRECISION": DOT_PRECISION}
    return tiles, batch_mean, flags


def _filter_loss_forward_fake(x: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    B, C, H, W = x.shape
    dtype = compute_dtype(x)
    return x.new_empty((C,), dtype=dtype), x.new_empty((C, H * W + 1), dtype=dtype), x.new_empty((C, B), dtype=dtype)


@register_kernel_op("fastexplain_triton::filter_loss_forward", _filter_loss_forward_fake)
def filter_loss_forward(x: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(−MI per filter [C], lme [C, HW+1], v [C, B]) of post-ReLU maps x [B, C, H, W] (docs/method.md §2).

    lme and v are the statistics the backward pass reuses; the public op returns only the loss.
    """
    B, C, H, W = x.shape
    dtype = compute_dtype(x)
    tiles, batch_mean, flags = _launch_settings(x)
    loss = x.new_empty((C,), dtype=dtype)
    lme = x.new_empty((C, H * W + 1), dtype=dtype)
    v = x.new_empty((C, B), dtype=dtype)
    wrap_triton(_forward_kernel)[(C,)](
        x, batch_mean, lme, v, loss, B, C, H, W, beta, *x.stride(), BLOCK_B=tiles["BLOCK_B"],
        BLOCK_T=tiles["BLOCK_T"], BLOCK_K=tiles["BLOCK_K"], CENTRE_IN_TILE=B <= tiles["BLOCK_B"], **flags,
        FROM_LOGITS=False)
    return loss, lme, v


def _filter_loss_backward_fake(x: Tensor, lme: Tensor, v: Tensor, grad_loss: Tensor, beta: float) -> Tensor:
    return torch.empty_like(x)


@register_kernel_op("fastexplain_triton::filter_loss_backward", _filter_loss_backward_fake)
def filter_loss_backward(x: Tensor, lme: Tensor, v: Tensor, grad_loss: Tensor, beta: float) -> Tensor:
    """dloss/dx for loss = Σ_c grad_loss[c]·loss_c, recomputing the logits (docs/method.md §2 exact gradient)."""
    B, C, H, W = x.shape
    tiles, batch_mean, flags = _launch_settings(x)
    grad_loss = grad_loss.to(lme.dtype).contiguous()
    gbar = torch.empty_like(lme)
    wrap_triton(_gbar_kernel)[(C,)](
        x, batch_mean, lme, v, gbar, B, C, H, W, beta, *x.stride(), BLOCK_B=tiles["BLOCK_B"],
        BLOCK_T=tiles["BLOCK_T"], BLOCK_K=tiles["BLOCK_K"], CENTRE_IN_TILE=B <= tiles["BLOCK_B"], **flags,
        FROM_LOGITS=False)
    dx = torch.empty_like(x)
    grid = (C, triton.cdiv(H * W, tiles["BLOCK_I"]), triton.cdiv(B, tiles["BACKWARD_B"]))
    wrap_triton(_backward_kernel)[grid](
        x, batch_mean, lme, v, gbar, grad_loss, dx, B, C, H, W, beta, *x.stride(), *dx.stride(),
        BLOCK_B=tiles["BACKWARD_B"], BLOCK_T=tiles["BACKWARD_T"], BLOCK_K=tiles["BLOCK_K"],
        BLOCK_I=tiles["BLOCK_I"], CENTRE_IN_TILE=B <= tiles["BACKWARD_B"], **flags,
        num_warps=tiles.get("BACKWARD_WARPS", 4))
    return dx


def _setup_context(ctx, inputs, output) -> None:
    x, beta = inputs
    _, lme, v = output
    ctx.save_for_backward(x, lme, v)
    ctx.beta = beta
    ctx.mark_non_differentiable(lme, v)


def _backward(ctx, grad_loss: Tensor | None, grad_lme: Tensor | None, grad_v: Tensor | None):
    x, lme, v = ctx.saved_tensors
    if grad_loss is None:
        return None, None
    return filter_loss_backward(x, lme, v, grad_loss, ctx.beta), None


filter_loss_forward.register_autograd(_backward, setup_context=_setup_context)
forbid_second_derivative(filter_loss_backward, "triton")
