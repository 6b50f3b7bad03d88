"""The exact global-batch filter loss across processes (SPEC §2, issue 8), without gathering feature maps.

The filter loss −MI is a function of the whole batch: every template's partition function sums over all
images. Under data parallelism each rank r holds B_r images of a global batch of N = Σ_r B_r, and the
per-rank loss would silently change the objective. This module computes the −MI of the union of all
ranks' batches, with the centred numerics of ``fastexplain.ops.reference`` (u = log(N·q), v = log(N·P),
f(u) = u·e^u − expm1(u)), by all-reducing small statistics only.

Algorithm (per filter c, templates t = 0 … HW, T the [HW+1, HW] template matrix):

  forward
    0. all-reduce MAX of (C, H, W, dtype, β), their negatives and a "failed locally" flag (input
       checks, backend choice): every rank must agree and none may have failed, else all raise.
    1. all-reduce SUM of [Σ_b x_b (C·HW) | B_r | #non-finite | #negative]  → N, x̄ = Σ x / N, flags.
       Every rank raises the same ValueError when any rank's input is bad (no rank is left waiting).
    2. s[b,t] = T·(x_b − x̄) locally (the global batch mean of s is 0 up to rounding, SPEC §2 "Scale");
       all-reduce MAX of max_b s [C, T]          → shift_t = max(max_b s − 30, 0) (overflow guard only).
    3. all-reduce SUM of Σ_b expm1(s − shift) [C, T]
                                                  → lme_t = shift_t + log1p(Σ / N) = log mean_b e^s.
    4. u = s − lme (= log N·q), v = log Σ_t p_t e^u (= log N·P) locally;
       all-reduce SUM of [Σ_t p_t Σ_b f(u) | Σ_b f(v)] (2·C) → MI = (conditional − marginal) / N.
  backward (SPEC §2 "Exact gradient", with g = p_t (log q − log P) = p_t (u − v), q = e^u / N)
    5. all-reduce SUM of Σ_b e^u (u − v) [C, T]  → Σ_b' q g = p_t · that / N;
       ∂MI/∂s[b,t] = p_t e^u (u − v − Σ/N) / N locally, ∂loss/∂x_b = −grad · (∂MI/∂s) · T.
       This term already carries the gradient through lme (Z_T's dependence on every image). The
       gradient through the centring x − x̄ is Σ_b ∂MI/∂s[b,t] · T = 0 exactly (Σ_b q = 1), and the
       shift is a constant, so neither needs communication.

Communication per step: C·(HW + 3·(HW+1) + 2) + 14 numbers, O(C·(HW+1)); five forward collectives (four
dependent rounds after the tiny agreement check) and one backward collective. Never the B×C×H×W maps.

Gradient convention. By default the gradient that reaches each rank's x is ∂L/∂x_r, the slice of the
single-process gradient on the concatenated batch. DistributedDataParallel *averages* parameter
gradients over the R ranks, which would divide the filter loss's contribution by R; pass
``ddp_gradients=True`` to scale the gradient reaching x by R (the convention of SyncBatchNorm and of the
``torch.distributed.nn`` collectives) so that DDP's average is the exact ∂L/∂θ. The value is unchanged.

Every rank must call the loss, and backward through it, the same number of times in the same order:
the collectives are matched by order, like SyncBatchNorm's.

Local passes (the interface a fused backend plugs into): see :class:`LocalFilterLossPasses`. Until a
backend's ``Backend`` exposes ``local_passes``, every backend runs the local passes with the reference's
PyTorch math (any device); the global result is the same, only the speed differs.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import _registry
from .ops._checks import (REDUCTIONS, check_beta, check_choice, check_feature_maps, negative_message,
                          nonfinite_message)
from .ops.reference import compute_dtype, entropy_term, log_mixture
from .templates import DEFAULT_BETA, part_templates, template_priors

__all__ = ["LocalFilterLossPasses", "ReferenceLocalPasses", "global_filter_loss", "global_filter_loss_per_filter"]

# Same overflow guard as the reference's log_mean_exp_over_batch: shift exp's argument by the max only
# when the spread of the centred logits exceeds it.
_SAFE_SPREAD = 30.0
_OP = "filter_loss"


class LocalFilterLossPasses(Protocol):
    """The local passes over one rank's x [B, C, H, W] that the global loss is assembled from.

    A fused backend implements these to plug in (recomputing s = T·(x − x̄) inside each pass instead of
    storing it, keeping only O(C·(HW+1)) state: x̄, shift, lme). All tensors are in the compute dtype.
    """

    def map_sums(self) -> tuple[Tensor, int, int]:
        """(Σ_b x_b as [C, HW], number of non-finite elements, number of negative elements)."""

    def logit_maxima(self, mean_maps: Tensor) -> Tensor:
        """Store the global batch mean x̄ [C, HW]; return max_b s[b, t] [C, T] with s = T·(x_b − x̄)."""

    def expm1_sums(self, shift: Tensor) -> Tensor:
        """Σ_b expm1(s[b, t] − shift[t]) as [C, T]."""

    def entropy_sums(self, lme: Tensor) -> tuple[Tensor, Tensor]:
        """Store lme [C, T]; return (Σ_t p_t Σ_b f(u[b, t]), Σ_b f(v[b])) as two [C] tensors,
        u = s − lme, v = log Σ_t p_t e^u, f(u) = u·e^u − expm1(u)."""

    def backward_sums(self) -> Tensor:
        """Σ_b e^u[b, t] (u[b, t] − v[b]) as [C, T]."""

    def input_grad(self, global_sums: Tensor, n_total: int, grad_per_filter: Tensor) -> Tensor:
        """∂loss/∂x for this rank's images as [B, C, H, W] in the compute dtype, given the all-reduced
        backward sums W [C, T], N and the upstream gradient [C]:
        −grad_c · Σ_t p_t e^u (u − v − W/N) / N · T_t."""


class ReferenceLocalPasses:
    """The local passes in plain PyTorch (the reference's math), for any device.

    Holds the logits s (then u = log N·q) as [C, B, T] between the passes, like the reference's autograd.
    """

    def __init__(self, x: Tensor, beta: float) -> None:
        B, C, H, W = x.shape
        self.shape = (B, C, H, W)
        self.maps = x.detach().to(compute_dtype(x)).reshape(B, C, H * W)
        self.templates = part_templates(H, W, beta=beta, dtype=self.maps.dtype,
                                        device=x.device).reshape(H * W + 1, H * W)
        self.priors = template_priors(H, W, dtype=self.maps.dtype, device=x.device)

    def map_sums(self) -> tuple[Tensor, int, int]:
        low, high = torch.aminmax(self.maps)
        nonfinite = int((~torch.isfinite(self.maps)).sum()) if not (low.isfinite() and high.isfinite()) else 0
        negative = int((self.maps < 0).sum()) if float(low) < 0 else 0
        return self.maps.sum(dim=0), nonfinite, negative

    def logit_maxima(self, mean_maps: Tensor) -> Tensor:
        centred = (self.maps - mean_maps).transpose(0, 1)  # [C, B, HW]
        self.s = centred @ self.templates.T                 # [C, B, T]
        del self.maps                                       # the later passes read s only
        return self.s.amax(dim=1)

    def expm1_sums(self, shift: Tensor) -> Tensor:
        return torch.expm1(self.s - shift[:, None, :]).sum(dim=1)

    def entropy_sums(self, lme: Tensor) -> tuple[Tensor, Tensor]:
        self.u = self.s - lme[:, None, :]                   # log(N·q)
        del self.s                                          # not needed any more: free [C, B, T]
        self.v = log_mixture(self.u, self.priors)           # log(N·P)
        conditional = (self.priors * entropy_term(self.u).sum(dim=1)).sum(dim=1)
        return conditional, entropy_term(self.v).sum(dim=1)

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
        return (dloss_ds @ self.templates).transpose(0, 1).reshape(B, C, H, W)


def _local_passes(x: Tensor, beta: float, backend: str | None) -> LocalFilterLossPasses:
    """The chosen backend's local passes when it offers them, else the reference's (same result)."""
    factory = getattr(_registry.select(backend, x, _OP), "local_passes", None)
    return factory(x, beta) if factory is not None else ReferenceLocalPasses(x, beta)


def _all_reduce(tensor: Tensor, group: Any, op: Any = None) -> Tensor:
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return tensor


def _check_agreement(x: Tensor, beta: float, group: Any, local_error: Exception | None) -> None:
    """Collective 0: every rank must hold maps of the same C, H, W and dtype class, and the same β, and
    none may have failed before the collectives (else the others would wait for it until the timeout)."""
    B, C, H, W = x.shape
    is_float64 = float(compute_dtype(x) == torch.float64)
    mine = torch.tensor([C, H, W, is_float64, beta if local_error is None else 0.0], dtype=torch.float64,
                        device=x.device)
    failed = torch.tensor([float(local_error is not None)], dtype=torch.float64, device=x.device)
    both = _all_reduce(torch.cat([mine, -mine, failed]), group, dist.ReduceOp.MAX)
    if local_error is not None:
        raise local_error
    if both[-1] > 0:
        raise RuntimeError(f"{_OP}: another rank of the process group failed before the loss was computed; "
                           f"see that rank's error")
    largest, smallest = both[:5], -both[5:10]
    if not torch.equal(largest, smallest):
        ranges = ", ".join(f"{name} in [{lo:g}, {hi:g}]" for name, lo, hi in
                           zip(("C", "H", "W", "float64", "beta"), smallest.tolist(), largest.tolist()) if lo != hi)
        raise ValueError(f"{_OP}: the ranks of the process group disagree on the feature maps ({ranges}); every "
                         f"rank must pass maps of the same [C, H, W], float64 on all or none, and the same beta")


class _GlobalFilterLoss(torch.autograd.Function):
    """−MI per filter over the union of all ranks' batches; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, beta: float, group: Any, backend: str | None, grad_factor: float,
                local_error: Exception | None) -> Tensor:
        if local_error is None:
            try:
                passes = _local_passes(x, beta, backend)
            except (ValueError, RuntimeError) as error:  # BackendUnavailable is a RuntimeError
                local_error = error
        _check_agreement(x, beta, group, local_error)
        map_sum, nonfinite, negative = passes.map_sums()
        counts = torch.tensor([x.shape[0], nonfinite, negative], dtype=map_sum.dtype, device=map_sum.device)
        reduced = _all_reduce(torch.cat([map_sum.flatten(), counts]), group)
        n_total, nonfinite_total, negative_total = (int(value) for value in reduced[-3:].tolist())
        if nonfinite_total:
            raise ValueError(nonfinite_message(_OP) + " (on at least one rank of the process group)")
        if negative_total:
            raise ValueError(negative_message(_OP) + " (on at least one rank of the process group)")
        mean_maps = reduced[:-3].reshape(map_sum.shape) / n_total
        maxima = _all_reduce(passes.logit_maxima(mean_maps), group, dist.ReduceOp.MAX)
        shift = (maxima - _SAFE_SPREAD).clamp_min(0)
        lme = shift + torch.log1p(_all_reduce(passes.expm1_sums(shift), group) / n_total)
        conditional, marginal = passes.entropy_sums(lme)
        sums = _all_reduce(torch.stack([conditional, marginal]), group)
        ctx.passes, ctx.group, ctx.n_total, ctx.grad_factor = passes, group, n_total, grad_factor
        ctx.input_dtype = x.dtype
        return -(sums[0] - sums[1]) / n_total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_per_filter: Tensor) -> tuple[Tensor | None, ...]:
        passes: LocalFilterLossPasses = ctx.passes
        global_sums = _all_reduce(passes.backward_sums(), ctx.group)
        grad = passes.input_grad(global_sums, ctx.n_total, grad_per_filter.to(global_sums.dtype) * ctx.grad_factor)
        return grad.to(ctx.input_dtype), None, None, None, None, None


def _group_size(process_group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: process_group was given but torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group first (torchrun sets up the environment)")
    return dist.get_world_size(process_group)


def global_filter_loss_per_filter(x: Tensor, beta: float, process_group: Any, *, backend: str | None = None,
                                  ddp_gradients: bool = False) -> Tensor:
    """−MI per filter ([C], compute dtype) over the union of every rank's x [B_r, C, H, W] (SPEC §2).

    ``process_group``: a torch.distributed group (None or ``torch.distributed.group.WORLD``: the default
    group, as in torch.distributed). Collective: every rank of the group must call it (and backward
    through it) in the same order. ``ddp_gradients=True``
    multiplies the gradient reaching x by the group size so that DDP's gradient averaging is exact.
    A rank whose x is an empty or non-float 4-D tensor (e.g. the ragged end of an epoch) raises its own
    error and makes the other ranks raise too, instead of leaving them waiting.
    """
    group_size = _group_size(process_group)
    grad_factor = float(group_size) if ddp_gradients else 1.0
    local_error = None
    try:
        check_feature_maps(x, _OP)
        check_beta(beta, _OP)
    except (TypeError, ValueError) as error:
        if not (isinstance(x, Tensor) and x.dim() == 4):
            raise  # not even a [B, C, H, W] tensor to take part in the agreement check with
        local_error = error
    return _GlobalFilterLoss.apply(x, beta if local_error is not None else float(beta), process_group, backend,
                                   grad_factor, local_error)


def global_filter_loss(x: Tensor, *, process_group: Any, beta: float = DEFAULT_BETA, reduction: str = "sum",
                       backend: str | None = None, ddp_gradients: bool = False) -> Tensor:
    """``filter_loss`` over the global batch of all ranks of ``process_group`` (same value on every rank).

    Same arguments and result as :func:`fastexplain.filter_loss`; see the module docstring for the
    algorithm, its O(C·(HW+1)) communication and the gradient convention (``ddp_gradients``).
    """
    check_choice("reduction", reduction, REDUCTIONS, _OP)
    per_filter = global_filter_loss_per_filter(x, beta, process_group, backend=backend, ddp_gradients=ddp_gradients)
    if reduction == "sum":
        return per_filter.sum()
    if reduction == "mean":
        return per_filter.mean()
    return per_filter
