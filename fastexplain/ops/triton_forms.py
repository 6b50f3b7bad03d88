"""The four forms of the Triton filter loss (docs/method.md §1–2) and the choice between them.

* **fused** (``triton_fused``): one program per filter computes the loss and, in training, dloss/dx in one pass
  (the whole batch and every template in one tile: B ≤ 64, HW + 1 ≤ 256); autograd's backward only scales it.
* **dense** (``triton_filter_loss``): fused kernels that recompute the logits s = T·xc from template tiles
  generated on the fly in every pass; no logits in memory, B·C·HW·(HW+1) multiply-adds per pass.
* **gemm**: the logits materialised once by one matrix product, s[b, c, :] = T · xc[b, c, :] (cuBLAS on a GPU;
  xc = x − mean_b x as in the reference), then the fused MI kernels below read them. Autograd carries the
  gradient ∂MI/∂s back through the product: dxc = ds · T, a second matrix product.
* **pyramid** (``triton_pyramid``): the logits by the O(n³) L1-pyramid correlation instead of the product,
  then the same fused MI kernels.

The MI on materialised logits (``logits_mi_forward`` / ``logits_mi_backward``) runs the dense form's forward and
Ḡ kernels in their FROM_LOGITS mode (same numerics: centred one-pass form, series for expm1/log1p/f), plus
one elementwise kernel for ∂loss/∂s = −g_c·e^u p_t (u − v_b − Ḡ_t)/B. Extra memory: the logits [B, C, HW+1]
(kept for the backward pass) and their gradient.

``FORM = "auto"``: "fused" wherever it fits (not float64 on CUDA). Beyond it, on CUDA: "gemm" up to n = max(H, W)
= GEMM_MAX_N when float32 matrix products run in full precision (``torch.get_float32_matmul_precision() ==
"highest"``, PyTorch's default) or the input is float64, else "pyramid" (never TF32 logits behind the user's back).
Measured on an H200 (docs/triton-kernels.md): at 64×512×14² the fused form takes 0.69 ms forward + backward
launched eagerly, the gemm form 1.58 ms (0.46 ms replayed from a CUDA graph, where its launches cost nothing);
gemm is the fastest of the other forms at n = 14, 28 and 56, pyramid the next, dense the slowest; beyond the sizes
measured the product's O(n⁴) work must lose to the pyramid's O(n³), hence the pyramid beyond GEMM_MAX_N. Under
the CPU interpreter (tests): "fused" where it fits, else "dense" below LARGE_N and "pyramid" from there.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ._second_derivatives import forbid_second_derivative
from ._triton_common import register_kernel_op
from .reference import compute_dtype
from . import triton_filter_loss as dense
from . import triton_fused as fused
from .triton_filter_loss import _SAFE_SPREAD, _entropy_term, _expm1, _log1p
from .triton_pyramid import pyramid_logits
from ..templates import part_templates

#: launch overrides of the FROM_LOGITS forward and Ḡ kernels ("BLOCK_B", "BLOCK_T", "num_warps"; empty: the dense
#: form's tiles, 4 warps), and "SPLIT": 1 for the forward split over template tiles (``_mi_partials_kernel`` +
#: ``_mi_combine_kernel``: C·⌈T/BLOCK_T⌉ programs instead of C). Untuned on a GPU: ``benchmarks/gpu_triton.py``
#: times alternatives (its MI sweep); SPLIT is tested under the interpreter, not yet timed on a GPU.
MI_LAUNCH: dict[str, int] = {}
FORMS = ("fused", "dense", "gemm", "pyramid")
FORM = "auto"
LARGE_N = 28       # interpreter: the pyramid form from this n = max(H, W) on
GEMM_MAX_N = 56    # CUDA: the gemm form up to this n (the largest size measured faster than the pyramid form)


@triton.jit
def _dlogits_kernel(s_ptr, lme_ptr, v_ptr, gbar_ptr, grad_ptr, ds_ptr, B, C, T,
                    stride_b, stride_c, stride_t,
                    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, IS_FP64: tl.constexpr):
    """ds[b, c, t] = −g_c · e^u p_t (u − v_b − Ḡ_t) / B with u = s − lme_t (docs/method.md §2 exact gradient);
    ds contiguous [B, C, T]."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    c = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = (b < B)[:, None] & (t < T)[None, :]
    s = tl.load(s_ptr + b.to(tl.int64)[:, None] * stride_b + c.to(tl.int64) * stride_c
                + t.to(tl.int64)[None, :] * stride_t, mask=inside, other=0.0).to(dtype)
    lme = tl.load(lme_ptr + c.to(tl.int64) * T + t, mask=t < T, other=0.0)
    gbar = tl.load(gbar_ptr + c.to(tl.int64) * T + t, mask=t < T, other=0.0)
    v = tl.load(v_ptr + c.to(tl.int64) * B + b, mask=b < B, other=0.0)
    grad = tl.load(grad_ptr + c).to(dtype)
    prior = 1.0 / tl.cast(T, dtype)
    u = s - lme[None, :]
    ds = -grad * tl.exp(u) * prior * (u - v[:, None] - gbar[None, :]) / B
    offsets = (b.to(tl.int64)[:, None] * C + c) * T + t[None, :]
    tl.store(ds_ptr + offsets, ds, mask=inside)


@triton.jit
def _mi_partials_kernel(s_ptr, lme_ptr, centre_ptr, mixture_ptr, conditional_ptr, B, T, NT,
                        stride_b, stride_c, stride_t,
                        BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, IS_FP64: tl.constexpr):
    """Program (c, k), template tile k of filter c: lme_t over the whole batch (as the dense pass 1), then per
    image b the tile's centre c_k = (max_t u < −1 ? max_t u : 0), mixture m_k = Σ_t p_t expm1(u − c_k) and
    conditional q_k = Σ_t p_t f(u), u = s − lme_t, into [C, NT, B] scratch (docs/method.md §2)."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    c = tl.program_id(0)
    k = tl.program_id(1)
    t = k * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = t < T
    prior = 1.0 / tl.cast(T, dtype)
    row = s_ptr + c.to(tl.int64) * stride_c + t.to(tl.int64)[None, :] * stride_t
    shift = tl.zeros((BLOCK_T,), dtype=dtype)
    total = tl.zeros((BLOCK_T,), dtype=dtype)
    for b0 in range(0, B, BLOCK_B):  # lme_t = m_t + log1p(mean_b expm1(s − m_t)), m_t = max(0, max_b s − 30)
        valid_b = (b0 + tl.arange(0, BLOCK_B)) < B
        s = tl.load(row + (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None] * stride_b,
                    mask=valid_b[:, None] & valid_t[None, :], other=0.0).to(dtype)
        new_shift = tl.maximum(shift, tl.max(tl.where(valid_b[:, None], s, -float("inf")), axis=0) - _SAFE_SPREAD)
        seen = tl.cast(b0, dtype)
        total = tl.where(new_shift > shift, (total + seen) * tl.exp(shift - new_shift) - seen, total)
        shift = new_shift
        total += tl.sum(tl.where(valid_b[:, None], _expm1(s - shift[None, :]), 0.0), axis=0)
    lme = shift + _log1p(total / B)
    tl.store(lme_ptr + c.to(tl.int64) * T + t, lme, mask=valid_t)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        valid_b = b < B
        s = tl.load(row + b.to(tl.int64)[:, None] * stride_b, mask=valid_b[:, None] & valid_t[None, :],
                    other=0.0).to(dtype)
        u = s - lme[None, :]
        max_u = tl.max(tl.where(valid_t[None, :], u, -float("inf")), axis=1)
        centre = tl.where(max_u < -1.0, max_u, 0.0)
        # select (not multiply by a zero prior): u − centre of padding templates may overflow exp
        mixture = tl.sum(tl.where(valid_t[None, :], prior * _expm1(u - centre[:, None]), 0.0), axis=1)
        conditional = tl.sum(tl.where(valid_t[None, :], prior * _entropy_term(u), 0.0), axis=1)
        offsets = (c.to(tl.int64) * NT + k) * B + b
        tl.store(centre_ptr + offsets, centre, mask=valid_b)
        tl.store(mixture_ptr + offsets, mixture, mask=valid_b)
        tl.store(conditional_ptr + offsets, conditional, mask=valid_b)


@triton.jit
def _mi_combine_kernel(centre_ptr, mixture_ptr, conditional_ptr, v_ptr, loss_ptr, B, T, NT,
                       BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, IS_FP64: tl.constexpr):
    """Program c: v_b = C_b + log1p(Σ_k e^{c_k − C_b} m_k + P_k expm1(c_k − C_b)) with C_b = max_k c_k (the
    serial kernel's centre) and P_k the tile's prior mass, then −MI = −(Σ_b Σ_k q_k − Σ_b f(v_b)) / B."""
    dtype: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    c = tl.program_id(0)
    prior = 1.0 / tl.cast(T, dtype)
    conditional_sum = tl.zeros((BLOCK_B,), dtype=dtype)
    marginal_sum = tl.zeros((BLOCK_B,), dtype=dtype)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        valid_b = b < B
        top = tl.zeros((BLOCK_B,), dtype=dtype) - float("inf")
        for k in range(0, NT):
            top = tl.maximum(top, tl.load(centre_ptr + (c.to(tl.int64) * NT + k) * B + b, mask=valid_b, other=0.0))
        mixture = tl.zeros((BLOCK_B,), dtype=dtype)
        conditional = tl.zeros((BLOCK_B,), dtype=dtype)
        for k in range(0, NT):
            offsets = (c.to(tl.int64) * NT + k) * B + b
            centre = tl.load(centre_ptr + offsets, mask=valid_b, other=0.0)
            mass = tl.cast(tl.minimum(BLOCK_T, T - k * BLOCK_T), dtype) * prior
            mixture += (tl.exp(centre - top) * tl.load(mixture_ptr + offsets, mask=valid_b, other=0.0)
                        + mass * _expm1(centre - top))
            conditional += tl.load(conditional_ptr + offsets, mask=valid_b, other=0.0)
        v = top + _log1p(mixture)
        tl.store(v_ptr + c.to(tl.int64) * B + b, v, mask=valid_b)
        conditional_sum += tl.where(valid_b, conditional, 0.0)
        marginal_sum += tl.where(valid_b, _entropy_term(v), 0.0)
    tl.store(loss_ptr + c, -(tl.sum(conditional_sum, axis=0) - tl.sum(marginal_sum, axis=0)) / B)


def _split_mi_forward(s: Tensor, loss: Tensor, lme: Tensor, v: Tensor, block_b: int, block_t: int) -> None:
    """The forward split over template tiles (MI_LAUNCH["SPLIT"]): partials per (filter, tile), then a combine."""
    B, C, T = s.shape
    tiles = triton.cdiv(T, block_t)
    centre, mixture, conditional = s.new_empty((3, C, tiles, B)).unbind(0)
    warps = {"num_warps": MI_LAUNCH["num_warps"]} if "num_warps" in MI_LAUNCH else {}
    flags = {"BLOCK_B": block_b, "BLOCK_T": block_t, "IS_FP64": s.dtype == torch.float64}
    wrap_triton(_mi_partials_kernel)[(C, tiles)](s, lme, centre, mixture, conditional, B, T, tiles, *s.stride(),
                                                 **flags, **warps)
    wrap_triton(_mi_combine_kernel)[(C,)](centre, mixture, conditional, v, loss, B, T, tiles, **flags)


def _mi_launch(s: Tensor) -> tuple[dict[str, int], dict[str, object]]:
    """Tile sizes and the kernel arguments shared by the FROM_LOGITS launches for logits s [B, C, T]."""
    B, C, T = s.shape
    tiles = dense._tile_sizes(B, T - 1, s.device.type)
    tiles = {**tiles, **{k: v for k, v in MI_LAUNCH.items() if k in ("BLOCK_B", "BLOCK_T")}}
    # (H, W) = (1, T − 1) gives the kernels τ and the priors 1/T; n and β are only read by the computed tiles
    common = {"B": B, "C": C, "H": 1, "W": T - 1, "beta": 1.0, "stride_b": s.stride(0), "stride_c": s.stride(1),
              "stride_h": s.stride(2), "stride_w": 0, "BLOCK_B": tiles["BLOCK_B"], "BLOCK_T": tiles["BLOCK_T"],
              "BLOCK_K": 16, "CENTRE_IN_TILE": B <= tiles["BLOCK_B"], "IS_FP64": s.dtype == torch.float64,
              "PRECISION": "ieee", "FROM_LOGITS": True}
    if "num_warps" in MI_LAUNCH:
        common["num_warps"] = MI_LAUNCH["num_warps"]
    return tiles, common


def _mi_forward_fake(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, T = s.shape
    return s.new_empty((C,)), s.new_empty((C, T)), s.new_empty((C, B))


@register_kernel_op("fastexplain_triton::logits_mi_forward", _mi_forward_fake)
def logits_mi_forward(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(−MI per filter [C], lme [C, T], v [C, B]) from logits s [B, C, T] (float32/64, any strides)."""
    B, C, T = s.shape
    tiles, common = _mi_launch(s)
    loss, lme, v = s.new_empty((C,)), s.new_empty((C, T)), s.new_empty((C, B))
    if MI_LAUNCH.get("SPLIT"):
        _split_mi_forward(s, loss, lme, v, tiles["BLOCK_B"], tiles["BLOCK_T"])
    else:
        wrap_triton(dense._forward_kernel)[(C,)](s, s, lme, v, loss, **common)
    return loss, lme, v


def _mi_backward_fake(s: Tensor, lme: Tensor, v: Tensor, grad_loss: Tensor) -> Tensor:
    return s.new_empty(s.shape)


@register_kernel_op("fastexplain_triton::logits_mi_backward", _mi_backward_fake)
def logits_mi_backward(s: Tensor, lme: Tensor, v: Tensor, grad_loss: Tensor) -> Tensor:
    """∂(Σ_c g_c loss_c)/∂s, contiguous [B, C, T]: Ḡ (one kernel over the batch), then one elementwise kernel."""
    B, C, T = s.shape
    tiles, common = _mi_launch(s)
    gbar = torch.empty_like(lme)
    wrap_triton(dense._gbar_kernel)[(C,)](s, s, lme, v, gbar, **common)
    ds = s.new_empty((B, C, T))
    block_b, block_t = min(tiles["BLOCK_B"], 32), 64
    grid = (C, triton.cdiv(B, block_b), triton.cdiv(T, block_t))
    wrap_triton(_dlogits_kernel)[grid](s, lme, v, gbar, grad_loss.to(lme.dtype).contiguous(), ds, B, C, T,
                                       *s.stride(), BLOCK_B=block_b, BLOCK_T=block_t,
                                       IS_FP64=s.dtype == torch.float64)
    return ds


def _mi_setup(ctx, inputs, output) -> None:
    _, lme, v = output
    ctx.save_for_backward(inputs[0], lme, v)
    ctx.mark_non_differentiable(lme, v)


def _mi_backward(ctx, grad_loss: Tensor | None, grad_lme: Tensor | None, grad_v: Tensor | None):
    if grad_loss is None:
        return None
    return logits_mi_backward(*ctx.saved_tensors, grad_loss)


logits_mi_forward.register_autograd(_mi_backward, setup_context=_mi_setup)
forbid_second_derivative(logits_mi_backward, "triton")

_TEMPLATE_CACHE: dict[tuple, Tensor] = {}


def _templates(H: int, W: int, beta: float, dtype: torch.dtype, device: torch.device,
               transposed: bool = False) -> Tensor:
    """The [HW+1, HW] template matrix (contiguous [HW, HW+1] Tᵀ if ``transposed``), kept per (size, β, dtype,
    device, transposed) in eager mode (a few launches saved)."""
    def make() -> Tensor:
        matrix = part_templates(H, W, beta=beta, dtype=dtype, device=device).reshape(H * W + 1, H * W)
        return matrix.T.contiguous() if transposed else matrix
    if torch.compiler.is_compiling():
        return make()
    key = (H, W, float(beta), dtype, device, transposed)
    if key not in _TEMPLATE_CACHE:
        if len(_TEMPLATE_CACHE) >= 16:
            _TEMPLATE_CACHE.clear()
        _TEMPLATE_CACHE[key] = make()
    return _TEMPLATE_CACHE[key]


def gemm_logits(x: Tensor, beta: float) -> Tensor:
    """s [B, C, HW+1] = (x − mean_b x) · Tᵀ in the compute dtype, differentiable: one matrix product."""
    B, C, H, W = x.shape
    maps = x.to(compute_dtype(x)).reshape(B, C, H * W)
    centred = maps - maps.mean(dim=0, keepdim=True)
    return centred @ _templates(H, W, beta, centred.dtype, x.device).T


@torch.compiler.assume_constant_result
def _float32_products_in_full_precision() -> bool:
    """Whether float32 matrix products run in full precision (not TF32): a constant for torch.compile."""
    return torch.get_float32_matmul_precision() == "highest"


def chosen_form(H: int, W: int, device_type: str = "cuda", dtype: torch.dtype = torch.float32,
                batch: int | None = None) -> str:
    """The form ``triton_filter_loss`` runs for ``batch`` maps of H×W on ``device_type`` under the current ``FORM``.

    "auto": the fused form wherever it fits (the whole batch and every template in one tile: ``triton_fused.fits``);
    beyond it, on CUDA the matrix product up to GEMM_MAX_N in full float32 precision, else the pyramid; under the
    interpreter the dense form below LARGE_N, else the pyramid.
    """
    if FORM == "auto":
        n = max(H, W)
        # (float64 on CUDA: the [B, HW+1] tiles in double would not fit a program's registers and shared memory)
        if batch is not None and fused.fits(batch, H, W) and not (device_type == "cuda" and dtype == torch.float64):
            return "fused"
        if device_type != "cuda":
            return "pyramid" if n >= LARGE_N else "dense"
        full_precision = dtype == torch.float64 or _float32_products_in_full_precision()
        return "gemm" if n <= GEMM_MAX_N and full_precision else "pyramid"
    if FORM not in FORMS:
        raise ValueError(f"filter_loss: triton_forms.FORM must be 'auto' or one of {FORMS}, got {FORM!r}")
    return FORM


@contextlib.contextmanager
def use_form(form: str) -> Iterator[None]:
    """Run the Triton filter loss in ``form`` ("auto" or one of FORMS) inside the block (tests, benchmarks)."""
    global FORM
    if form != "auto" and form not in FORMS:
        raise ValueError(f"form must be 'auto' or one of {FORMS}, got {form!r}")
    previous, FORM = FORM, form
    try:
        yield
    finally:
        FORM = previous


def triton_filter_loss(x: Tensor, beta: float) -> Tensor:
    """−MI per filter [C] via the Triton kernels; x already validated for rank/dtype (values are not)."""
    B, _, H, W = x.shape
    form = chosen_form(H, W, x.device.type, x.dtype, batch=B)
    if form == "fused":
        templates = _templates(H, W, beta, compute_dtype(x), x.device)
        templates_t = _templates(H, W, beta, compute_dtype(x), x.device, transposed=True)
        if torch.is_grad_enabled() and x.requires_grad:  # training: loss and dloss/dx in one pass
            return fused.fused_filter_loss_forward_grad(x, templates, templates_t)[0]
        return fused.fused_filter_loss(x, templates, templates_t)
    if form == "dense":
        return dense.filter_loss_forward(x, beta)[0]
    logits = gemm_logits(x, beta) if form == "gemm" else pyramid_logits(x, beta).transpose(0, 1)
    return logits_mi_forward(logits)[0]
