"""Plain-PyTorch filter loss and template mask (docs/method.md §2–3): the ground truth and the fallback.

Everything here is written for readability against docs/method.md and differentiated by autograd; the fused
backends are tested against it. Per filter, with s[b, t] = Σ_i x_b(i) T_t(i):

    log q[b,t] = s[b,t] − logsumexp_b' s[b',t]        p(x_b | T_t)
    P[b]       = Σ_t p_t q[b,t]                        p(x_b)
    MI         = Σ_t p_t Σ_b q log q − Σ_b P log P     loss = −MI

Numerics (docs/method.md §2, "Scale"): MI is ~1e-4 nats for unit-scale maps while both terms above are ≈ −log B,
so we work with centred quantities that stay near 0:

    u[b,t] = log(B·q[b,t]) = s[b,t] − lme_t,  lme_t = log mean_b exp s[b,t]
    v[b]   = log(B·P[b])   = log1p(Σ_t p_t expm1(u[b,t]))
    MI     = Σ_t p_t mean_b e^u·u − mean_b e^v·v        (using Σ_b q = Σ_b P = 1)

and lme_t is computed as m_t + log1p(mean_b expm1(s − m_t)) after centring s over the batch, with a
shift only when the spread is large enough for exp to overflow.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..templates import mask_profile, part_templates, template_priors, template_tau, l1_distances
from ._checks import check_values

# exp(s) overflows float32 near 88; beyond this spread of s around its batch mean we shift by the max.
_SAFE_SPREAD = 30.0


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp16/bf16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def template_logits(x: Tensor, beta: float) -> Tensor:
    """s[c, b, t] = Σ_i x[b, c, i] · T_t(i), in the compute dtype: the materialised [C, B, HW+1] logits."""
    B, C, H, W = x.shape
    templates = part_templates(H, W, beta=beta, dtype=compute_dtype(x), device=x.device).reshape(H * W + 1, H * W)
    maps = x.to(compute_dtype(x)).reshape(B, C, H * W).transpose(0, 1)  # [C, B, HW]
    return maps @ templates.T


def log_mean_exp_over_batch(s: Tensor) -> Tensor:
    """lme[c, t] = log mean_b exp s[c, b, t], accurate when the spread of s over b is tiny."""
    centred = s - s.mean(dim=1, keepdim=True)
    shift = (centred.amax(dim=1, keepdim=True) - _SAFE_SPREAD).clamp_min(0).detach()
    lme = shift + torch.log1p(torch.expm1(centred - shift).mean(dim=1, keepdim=True))
    return s.mean(dim=1, keepdim=True) + lme


def log_mixture(u: Tensor, priors: Tensor) -> Tensor:
    """v[c, b] = log Σ_t p_t e^{u[c,b,t]} = c_b + log1p(Σ_t p_t expm1(u − c_b)).

    c_b = 0 (the accurate near-zero form) unless every template finds image b unlikely (max_t u < −1);
    then c_b = max_t u keeps the log1p argument away from −1, where it would round to −inf.
    """
    max_u = u.amax(dim=2).detach()
    shift = torch.where(max_u < -1.0, max_u, torch.zeros_like(max_u))
    return shift + torch.log1p((priors * torch.expm1(u - shift[..., None])).sum(dim=2))


# (k − 1) / k! for k = 2 … 13: the Taylor coefficients of u·e^u − expm1(u) = Σ_k (k − 1) u^k / k!
_ENTROPY_TERM_SERIES = tuple((k - 1) / math.factorial(k) for k in range(2, 14))


def entropy_term(u: Tensor) -> Tensor:
    """f(u) = u·e^u − (e^u − 1) ≥ 0, accurate to float rounding even where f ≈ u²/2 is tiny.

    Since mean_b e^u = 1 for u = log(B·q), mean_b u·e^u = mean_b f(u): a sum of non-negative terms
    instead of a sum of ±u terms that cancels down to u², which is what costs naive float32 its digits.
    """
    small = u.abs() < 0.5
    us = torch.where(small, u, torch.zeros_like(u))
    series = torch.zeros_like(u)
    for coefficient in reversed(_ENTROPY_TERM_SERIES):
        series = (series + coefficient) * us
    series = series * us
    direct = u * torch.exp(u) - torch.expm1(u)
    return torch.where(small, series, direct)


def mutual_information(s: Tensor, priors: Tensor) -> Tensor:
    """MI per filter from logits s [C, B, T] and priors p [T], in the centred one-pass form.

    Σ_b q log q = mean_b e^u·u − log B and Σ_b P log P = mean_b e^v·v − log B, so the log B cancel and
    MI = Σ_t p_t mean_b f(u) − mean_b f(v) with f the entropy term above.
    """
    u = s - log_mean_exp_over_batch(s)                             # log(B·q), [C, B, T]
    v = log_mixture(u, priors)                                     # log(B·P), [C, B]
    conditional = (priors * entropy_term(u).mean(dim=1)).sum(dim=1)
    marginal = entropy_term(v).mean(dim=1)
    return conditional - marginal


def filter_loss_per_filter(x: Tensor, beta: float) -> Tensor:
    """−MI_f for every filter f of x [B, C, H, W]: a [C] tensor in the compute dtype (docs/method.md §2)."""
    check_values(x, "filter_loss", nonnegative=True)
    B, C, H, W = x.shape
    priors = template_priors(H, W, dtype=compute_dtype(x), device=x.device)
    # MI is invariant to a per-template shift of s over the batch, so the logits of the batch-centred
    # maps x − mean_b x serve as well and are far smaller than s itself: less float32 rounding.
    maps = x.to(compute_dtype(x))
    centred_maps = maps - maps.mean(dim=0, keepdim=True)
    return -mutual_information(template_logits(centred_maps, beta), priors)


def naive_filter_loss_per_filter(x: Tensor, beta: float) -> Tensor:
    """The textbook one-pass form with logsumexp, no centring: kept only as the error yardstick.

    In float32 it loses up to 1e-2 of the loss value (docs/method.md §2); the fused backends' gradients are judged
    against this form's error in float32.
    """
    B, C, H, W = x.shape
    s = template_logits(x, beta)
    priors = template_priors(H, W, dtype=s.dtype, device=x.device)
    log_q = s - torch.logsumexp(s, dim=1, keepdim=True)
    q = log_q.exp()
    P = (priors * q).sum(dim=2)
    return -((priors * (q * log_q).sum(dim=1)).sum(dim=1) - (P * P.log()).sum(dim=1))


def peak_indices(x: Tensor, center: str) -> Tensor:
    """μ̂ per (image, filter) as a row-major index [B, C] (int64) (docs/method.md §3).

    "argmax": first maximal position in row-major order. "centroid": the activation-weighted mean
    position, each coordinate rounded half up (floor(c + 0.5)) and clamped to the grid; an all-zero map
    gets index 0 (its output is zero whatever μ̂ is).
    """
    B, C, H, W = x.shape
    flat = x.reshape(B, C, H * W)
    if center == "argmax":
        return flat.argmax(dim=2)
    weights = flat.to(compute_dtype(x))
    total = weights.sum(dim=2)
    rows = torch.arange(H, device=x.device, dtype=weights.dtype).repeat_interleave(W)
    cols = torch.arange(W, device=x.device, dtype=weights.dtype).repeat(H)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    r = torch.floor((weights * rows).sum(dim=2) / safe_total + 0.5).clamp(0, H - 1)
    c = torch.floor((weights * cols).sum(dim=2) / safe_total + 0.5).clamp(0, W - 1)
    index = (r * W + c).long()
    return torch.where(total > 0, index, torch.zeros_like(index))


def masks_at(peaks: Tensor, H: int, W: int, beta: float, dtype: torch.dtype) -> Tensor:
    """m(i) = max(1 − β‖i − μ̂‖₁ / n, −1) for every (image, filter): [B, C, H, W] (docs/method.md §3)."""
    dist = l1_distances(H, W, dtype=dtype, device=peaks.device)[peaks]  # [B, C, HW]
    return mask_profile(dist, max(H, W), beta).reshape(*peaks.shape, H, W)


def template_mask(x: Tensor, beta: float, center: str, scale: str | None, relu: bool) -> Tensor:
    """y = max(x ⊙ m, 0) (times τ when scale="tau"), x first passed through ReLU when relu=True.

    The mask is a constant for autograd: ∂y/∂x = m · 1[x ⊙ m > 0] (docs/method.md §3).
    """
    op = "relu_template_mask" if relu else "template_mask"
    check_values(x, op, nonnegative=False)
    B, C, H, W = x.shape
    if relu:
        x = torch.relu(x)
    with torch.no_grad():
        mask = masks_at(peak_indices(x, center), H, W, beta, x.dtype)
        if scale == "tau":
            mask = mask * template_tau(H, W)
    return torch.relu(x * mask)
