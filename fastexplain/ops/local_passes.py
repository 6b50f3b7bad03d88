"""The local passes of the global-batch filter loss (docs/method.md §2, docs/distributed.md): the per-rank work
between the all-reduces of :mod:`fastexplain.distributed`, one implementation per backend.

``fastexplain.distributed`` owns the collectives and the assembly (N, x̄, shift, lme, MI, the gradient's
global term); the numbers each rank contributes come from an object satisfying
:class:`LocalFilterLossPasses`, built by :func:`local_passes` for the backend that the dispatcher picks:

* ``cpu``: :class:`CpuLocalPasses`, the fused C++ kernels of ``csrc/filter_loss_local.cpp`` (the
  L1-pyramid correlation, no [HW+1, HW] template product; one expm1 per (image, template) in the whole
  forward + backward);
* every other backend (``reference``, and ``triton`` for now): :class:`ReferenceLocalPasses`, the
  reference's PyTorch math on the tensor's device.

Both keep the logits of this rank's B images, s (then u = log N·q) and w = expm1(u), between the passes:
O(B·C·(HW+1)) values in the compute dtype, like the reference's autograd graph.

The math, with s[b, t] = T_t·(x_b − x̄) (x̄ the *global* batch mean), N the global batch size, p_t the
template priors and f(u) = u·e^u − expm1(u) (``reference.entropy_term``):

    map_sums()                     Σ_b x_b [C, HW], #non-finite, #negative
    logit_maxima(x̄)                max_b s [C, T]
    expm1_sums(shift)              Σ_b expm1(s − shift) [C, T]
    entropy_sums(shift, M)         with lme = shift + log1p(M), u = s − lme, v = log Σ_t p_t e^u:
                                   (Σ_t p_t Σ_b f(u), Σ_b f(v)) as two [C]
    backward_sums()                Σ_b e^u (u − v) [C, T]
    input_grad(W, N, grad)         −grad_c · Σ_t p_t e^u (u − v − W_t/N)/N · T_t   [B, C, H, W]
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..templates import part_templates, template_priors
from . import reference
from ._registry import Backend
from .reference import compute_dtype

__all__ = ["LocalFilterLossPasses", "ReferenceLocalPasses", "CpuLocalPasses", "local_passes"]


class LocalFilterLossPasses(Protocol):
    """The local passes over one rank's x [B, C, H, W]; every tensor is in the compute dtype
    (float32, float64 for float64 inputs), on x's device. Called in this order, once each, except
    ``expm1_sums``: a second time, with the global overflow-guard shift, when some rank's logits exceed it
    (``fastexplain.distributed``)."""

    def map_sums(self) -> tuple[Tensor, int, int]:
        """(Σ_b x_b as [C, HW], number of non-finite elements, number of negative elements)."""

    def logit_maxima(self, mean_maps: Tensor) -> Tensor:
        """Given the global batch mean x̄ [C, HW]: max_b s[b, t] [C, T] with s = T·(x_b − x̄)."""

    def expm1_sums(self, shift: Tensor) -> Tensor:
        """Σ_b expm1(s[b, t] − shift[t]) as [C, T] (a later call replaces what an earlier one kept)."""

    def entropy_sums(self, shift: Tensor, mean_expm1: Tensor) -> tuple[Tensor, Tensor]:
        """Given M = (global Σ_b expm1(s − shift)) / N, i.e. lme = shift + log1p(M) = log mean_b e^s:
        (Σ_t p_t Σ_b f(u[b, t]), Σ_b f(v[b])) as two [C], u = s − lme, v = log Σ_t p_t e^u."""

    def backward_sums(self) -> Tensor:
        """Σ_b e^u[b, t] (u[b, t] − v[b]) as [C, T]."""

    def input_grad(self, global_sums: Tensor, n_total: int, grad_per_filter: Tensor) -> Tensor:
        """∂loss/∂x for this rank's images as a contiguous [B, C, H, W] in the compute dtype, given the
        all-reduced backward sums W [C, T], N and the upstream gradient [C]:
        −grad_c · Σ_t p_t e^u (u − v − W/N) / N · T_t."""


def _value_counts(maps: Tensor) -> tuple[int, int]:
    """(#non-finite, #negative) of maps, with one aminmax read when there are none."""
    low, high = torch.aminmax(maps)
    low, high = float(low), float(high)
    finite = abs(low) < float("inf") and abs(high) < float("inf")
    nonfinite = 0 if finite else int((~torch.isfinite(maps)).sum())
    negative = int((maps < 0).sum()) if not (low >= 0) else 0
    return nonfinite, negative


class ReferenceLocalPasses:
    """The local passes in plain PyTorch with the reference's helpers (any device): the yardstick of the
    fused passes and the fallback of backends without their own."""

    def __init__(self, x: Tensor, beta: float) -> None:
        B, C, H, W = x.shape
        self.shape = (B, C, H, W)
        self.maps = x.detach().to(compute_dtype(x)).reshape(B, C, H * W)
        self.templates = part_templates(H, W, beta=beta, dtype=self.maps.dtype,
                                        device=x.device).reshape(H * W + 1, H * W)
        self.priors = template_priors(H, W, dtype=self.maps.dtype, device=x.device)

    def map_sums(self) -> tuple[Tensor, int, int]:
        return (self.maps.sum(dim=0), *_value_counts(self.maps))

    def logit_maxima(self, mean_maps: Tensor) -> Tensor:
        centred = (self.maps - mean_maps).transpose(0, 1)  # [C, B, HW]
        self.s = centred @ self.templates.T                 # [C, B, T]
        del self.maps                                       # the later passes read s only
        return self.s.amax(dim=1)

    def expm1_sums(self, shift: Tensor) -> Tensor:
        return torch.expm1(self.s - shift[:, None, :]).sum(dim=1)

    def entropy_sums(self, shift: Tensor, mean_expm1: Tensor) -> tuple[Tensor, Tensor]:
        lme = shift + torch.log1p(mean_expm1)
        self.u = self.s - lme[:, None, :]                    # log(N·q)
        del self.s
        self.v = reference.log_mixture(self.u, self.priors)  # log(N·P)
        conditional = (self.priors * reference.entropy_term(self.u).sum(dim=1)).sum(dim=1)
        return conditional, reference.entropy_term(self.v).sum(dim=1)

    def _weighted_log_ratio(self) -> tuple[Tensor, Tensor]:
        return torch.exp(self.u), self.u - self.v[..., None]  # N·q and log q − log P

    def backward_sums(self) -> Tensor:
        weighted, log_ratio = self._weighted_log_ratio()
        return (weighted * log_ratio).sum(dim=1)

    def input_grad(self, global_sums: Tensor, n_total: int, grad_per_filter: Tensor) -> Tensor:
        weighted, log_ratio = self._weighted_log_ratio()
        dmi_ds = self.priors * weighted * (log_ratio - global_sums[:, None, :] / n_total) / n_total
        dloss_ds = -grad_per_filter[:, None, None] * dmi_ds  # [C, B, T]
        B, C, H, W = self.shape
        return (dloss_ds @ self.templates).transpose(0, 1).reshape(B, C, H, W).contiguous()


class CpuLocalPasses:
    """The local passes by the fused C++ kernels (``torch.ops.fastexplain.filter_loss_local_*``,
    csrc/filter_loss_local.cpp); CPU tensors of any float dtype and layout."""

    def __init__(self, x: Tensor, beta: float) -> None:
        self.x = x.detach()
        self.beta = float(beta)
        self.dtype = compute_dtype(x)

    def map_sums(self) -> tuple[Tensor, int, int]:
        sums, counts = torch.ops.fastexplain.filter_loss_local_map_sums(self.x)
        nonfinite, negative = counts.tolist()
        return sums, nonfinite, negative

    def logit_maxima(self, mean_maps: Tensor) -> Tensor:
        self.s, maxima = torch.ops.fastexplain.filter_loss_local_logits(
            self.x, mean_maps.to(self.dtype).contiguous(), self.beta)
        self.shape = tuple(self.x.shape)
        del self.x
        return maxima

    def expm1_sums(self, shift: Tensor) -> Tensor:
        self.w, sums = torch.ops.fastexplain.filter_loss_local_expm1_sums(self.s, shift.contiguous())
        self.shift = shift
        return sums

    def entropy_sums(self, shift: Tensor, mean_expm1: Tensor) -> tuple[Tensor, Tensor]:
        B, C, H, W = self.shape
        conditional, marginal, self.v = torch.ops.fastexplain.filter_loss_local_entropy_sums(
            self.s, self.w, shift.contiguous(), mean_expm1.contiguous(), H * W)
        return conditional, marginal  # self.s holds u and self.w holds expm1(u) from here on

    def backward_sums(self) -> Tensor:
        return torch.ops.fastexplain.filter_loss_local_backward_sums(self.s, self.w, self.v)

    def input_grad(self, global_sums: Tensor, n_total: int, grad_per_filter: Tensor) -> Tensor:
        B, C, H, W = self.shape
        return torch.ops.fastexplain.filter_loss_local_input_grad(
            self.s, self.w, self.v, global_sums.contiguous(), grad_per_filter.to(self.dtype).contiguous(),
            int(n_total), H, W, self.beta)


_FUSED = {"cpu": CpuLocalPasses}


def local_passes(backend: Backend, x: Tensor, beta: float) -> LocalFilterLossPasses:
    """The local passes of ``backend`` on this rank's x: its fused kernels when it has them (``cpu``),
    else the reference's PyTorch math (the global result is the same; only speed and memory differ)."""
    return _FUSED.get(backend.name, ReferenceLocalPasses)(x, beta)
