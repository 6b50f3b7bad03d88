"""The exact global-batch filter loss across processes (docs/method.md §2, issue 8), without gathering feature maps.

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
    2. s[b,t] = T·(x_b − x̄) locally (the global batch mean of s is 0 up to rounding, docs/method.md §2 "Scale");
       the overflow guard shift_t = max(max_b s − 30, 0) over the global batch is 0 unless some logit exceeds
       30, so each rank sums Σ_b expm1(s) [C, T] and flags whether its own max_b s exceeds 30:
       all-reduce SUM of [Σ_b expm1(s) | flag]. With no flag (the usual case) shift = 0 and
       M_t = Σ / N. Otherwise (2') all-reduce MAX of max_b s → shift, and (3') all-reduce SUM of
       Σ_b expm1(s − shift) → M_t; lme_t = shift_t + log1p(M_t) = log mean_b e^s either way.
    4. u = s − lme (= log N·q), v = log Σ_t p_t e^u (= log N·P) locally;
       all-reduce SUM of [Σ_t p_t Σ_b f(u) | Σ_b f(v)] (2·C) → MI = (conditional − marginal) / N,
       and, when x requires grad, of the backward sums Σ_b e^u (u − v) [C, T] in the same collective
       (they depend on the forward pass only).
  backward (docs/method.md §2 "Exact gradient", with g = p_t (log q − log P) = p_t (u − v), q = e^u / N)
    5. with W the all-reduced backward sums: Σ_b' q g = p_t · W / N;
       ∂MI/∂s[b,t] = p_t e^u (u − v − W/N) / N locally, ∂loss/∂x_b = −grad · (∂MI/∂s) · T.
       This term already carries the gradient through lme (Z_T's dependence on every image). The
       gradient through the centring x − x̄ is Σ_b ∂MI/∂s[b,t] · T = 0 exactly (Σ_b q = 1), and the
       shift is a constant, so neither needs communication. The backward pass has no collective.

Communication per step: C·(HW + 2·(HW+1) + 2) + 15 numbers, O(C·(HW+1)); four forward collectives (three
dependent rounds after the tiny agreement check; two more when a logit exceeds 30) and none in backward.
Never the B×C×H×W maps.

Gradient convention. By default the gradient that reaches each rank's x is ∂L/∂x_r, the slice of the
single-process gradient on the concatenated batch. DistributedDataParallel *averages* parameter
gradients over the R ranks, which would divide the filter loss's contribution by R; pass
``ddp_gradients=True`` to scale the gradient reaching x by R (the convention of SyncBatchNorm and of the
``torch.distributed.nn`` collectives) so that DDP's average is the exact ∂L/∂θ. The value is unchanged.

Every rank must call the loss, and backward through it, the same number of times in the same order:
the collectives are matched by order, like SyncBatchNorm's.

Local passes: every rank's own work (the logits, the expm1 and entropy sums, the input gradient) is done
by ``fastexplain.ops.local_passes`` for the backend the dispatcher picks — the fused C++ kernels for
``cpu`` (csrc/filter_loss_local.cpp), the reference's PyTorch math otherwise. This module holds no loss
math of its own: only the collectives and the assembly of their results.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import _registry
from .ops._checks import (REDUCTIONS, check_beta, check_choice, check_feature_maps, negative_message,
                          nonfinite_message)
from .ops.local_passes import LocalFilterLossPasses, ReferenceLocalPasses, local_passes
from .ops.reference import compute_dtype
from .templates import DEFAULT_BETA

__all__ = ["LocalFilterLossPasses", "ReferenceLocalPasses", "global_filter_loss", "global_filter_loss_per_filter",
           "loss_from_passes", "grad_from_passes"]

# Same overflow guard as the reference's log_mean_exp_over_batch: shift exp's argument by the max only
# when the spread of the centred logits exceeds it.
_SAFE_SPREAD = 30.0
_OP = "filter_loss"
# all_reduce(tensor, "sum" | "max") -> the reduction over every rank
Reducer = Callable[[Tensor, str], Tensor]


def _local_passes(x: Tensor, beta: float, backend: str | None) -> LocalFilterLossPasses:
    """The chosen backend's local passes (fused where it has them; ``fastexplain.ops.local_passes``)."""
    return local_passes(_registry.select(backend, x, _OP), x, beta)


def _all_reduce(tensor: Tensor, group: Any, op: Any = None) -> Tensor:
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return tensor


# A rank's own error, carried to the collective agreement check as (exception type, message): an exception
# object would carry its traceback, and through it the caller's frames, into places that outlive the call (it
# kept the caller's model and process group alive past destroy_process_group(), and gloo's threads with them).
LocalError = tuple[type, str]


def _without_traceback(error: Exception) -> LocalError:
    return type(error), str(error)


def _check_agreement(x: Tensor, beta: float, group: Any, local_error: LocalError | None) -> None:
    """Collective 0: every rank must hold maps of the same C, H, W and dtype class, and the same β, and
    none may have failed before the collectives (else the others would wait for it until the timeout)."""
    B, C, H, W = x.shape
    is_float64 = float(compute_dtype(x) == torch.float64)
    mine = torch.tensor([C, H, W, is_float64, beta if local_error is None else 0.0], dtype=torch.float64,
                        device=x.device)
    failed = torch.tensor([float(local_error is not None)], dtype=torch.float64, device=x.device)
    both = _all_reduce(torch.cat([mine, -mine, failed]), group, dist.ReduceOp.MAX)
    if local_error is not None:
        kind, message = local_error
        raise kind(message)
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
                local_error: LocalError | None) -> Tensor:
        if local_error is None:
            try:
                passes = _local_passes(x, beta, backend)
            except (ValueError, RuntimeError) as error:  # BackendUnavailable is a RuntimeError
                local_error = _without_traceback(error)
        _check_agreement(x, beta, group, local_error)
        loss, n_total, global_sums = loss_from_passes(passes, x.shape[0], _group_reducer(group),
                                                      with_backward_sums=ctx.needs_input_grad[0])
        ctx.passes, ctx.global_sums, ctx.n_total, ctx.grad_factor = passes, global_sums, n_total, grad_factor
        ctx.input_dtype = x.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_per_filter: Tensor) -> tuple[Tensor | None, ...]:
        grad = grad_from_passes(ctx.passes, ctx.n_total, grad_per_filter * ctx.grad_factor, ctx.global_sums)
        ctx.passes = ctx.global_sums = None
        return grad.to(ctx.input_dtype), None, None, None, None, None


def _group_reducer(group: Any) -> Reducer:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    return lambda tensor, op: _all_reduce(tensor, group, ops[op])


def loss_from_passes(passes: LocalFilterLossPasses, batch_size: int, all_reduce: Reducer, *,
                     with_backward_sums: bool = True) -> tuple[Tensor, int, Tensor | None]:
    """Forward steps 1–4 of the module docstring on one rank: (−MI per filter [C], N, W).

    ``all_reduce(tensor, op)`` with op "sum" or "max" returns the reduction over all ranks (a process
    group's all-reduce; tests pass an in-process one to run many simulated ranks). W is the all-reduced
    backward sums [C, T] that :func:`grad_from_passes` needs (None unless ``with_backward_sums``).
    """
    map_sum, nonfinite, negative = passes.map_sums()
    counts = torch.tensor([batch_size, nonfinite, negative], dtype=map_sum.dtype, device=map_sum.device)
    reduced = all_reduce(torch.cat([map_sum.flatten(), counts]), "sum")
    n_total, nonfinite_total, negative_total = (int(value) for value in reduced[-3:].tolist())
    if nonfinite_total:
        raise ValueError(nonfinite_message(_OP) + " (on at least one rank of the process group)")
    if negative_total:
        raise ValueError(negative_message(_OP) + " (on at least one rank of the process group)")
    mean_maps = reduced[:-3].reshape(map_sum.shape) / n_total
    local_maxima = passes.logit_maxima(mean_maps)
    shift = torch.zeros_like(local_maxima)
    needs_shift = float(bool((local_maxima > _SAFE_SPREAD).any()))
    unshifted = passes.expm1_sums(shift) if not needs_shift else torch.zeros_like(local_maxima)
    flag = torch.tensor([needs_shift], dtype=unshifted.dtype, device=unshifted.device)
    summed = all_reduce(torch.cat([unshifted.flatten(), flag]), "sum")
    if summed[-1] > 0:  # some rank's logits exceed the guard: the shifted sums (steps 2' and 3')
        shift = (all_reduce(local_maxima, "max") - _SAFE_SPREAD).clamp_min(0)
        mean_expm1 = all_reduce(passes.expm1_sums(shift), "sum") / n_total
    else:
        mean_expm1 = summed[:-1].reshape(local_maxima.shape) / n_total
    conditional, marginal = passes.entropy_sums(shift, mean_expm1)  # lme = shift + log1p(mean_expm1)
    parts = [conditional, marginal] + ([passes.backward_sums().flatten()] if with_backward_sums else [])
    sums = all_reduce(torch.cat(parts), "sum")
    C = conditional.numel()
    global_sums = sums[2 * C:].reshape(local_maxima.shape) if with_backward_sums else None
    return -(sums[:C] - sums[C:2 * C]) / n_total, n_total, global_sums


def grad_from_passes(passes: LocalFilterLossPasses, n_total: int, grad_per_filter: Tensor,
                     global_sums: Tensor | None) -> Tensor:
    """Backward step 5 on one rank: ∂(Σ_c grad_c·loss_c)/∂x for this rank's images, compute dtype, from the
    all-reduced backward sums that :func:`loss_from_passes` returned (no collective)."""
    if global_sums is None:
        raise RuntimeError(f"{_OP}: the backward sums were not all-reduced in the forward pass; call "
                           f"loss_from_passes(..., with_backward_sums=True)")
    return passes.input_grad(global_sums, n_total, grad_per_filter.to(global_sums.dtype))


def _group_size(process_group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: process_group was given but torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group first (torchrun sets up the environment)")
    return dist.get_world_size(process_group)


def global_filter_loss_per_filter(x: Tensor, beta: float, process_group: Any, *, backend: str | None = None,
                                  ddp_gradients: bool = False) -> Tensor:
    """−MI per filter ([C], compute dtype) over the union of every rank's x [B_r, C, H, W] (docs/method.md §2).

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
        local_error = _without_traceback(error)
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
