"""Public ops and the dispatcher: validate, pick a backend, reduce (docs/method.md §2–3)."""
from __future__ import annotations

from torch import Tensor

from ..templates import DEFAULT_BETA
from . import _registry
from ._checks import CENTERS, REDUCTIONS, SCALES, check_beta, check_choice, check_feature_maps
from ._registry import BackendUnavailable, availability, backend_names

__all__ = ["filter_loss", "template_mask", "relu_template_mask", "availability", "backend_names",
           "BackendUnavailable", "selected_backend"]


def filter_loss(x: Tensor, *, beta: float = DEFAULT_BETA, reduction: str = "sum",
                backend: str | None = None, process_group: object | None = None,
                ddp_gradients: bool = False) -> Tensor:
    """The filter loss −MI of docs/method.md §2, exact over the batch, for post-ReLU maps x [B, C, H, W].

    ``reduction``: "sum" over filters (the paper's Σ_f loss_f), "mean", or "none" ([C]).
    The result is float32 (float64 for float64 inputs) whatever the input dtype; fp16/bf16 are upcast.
    Multiply by the weight λ yourself: the loss is ~1e-4 per filter for unit-scale maps (docs/method.md §2).
    ``process_group``: a torch.distributed group (e.g. ``dist.group.WORLD``): the loss and its gradient are
    the exact −MI over the union of all ranks' batches, a collective call (docs/distributed.md).
    ``ddp_gradients=True`` (with a group) scales the gradient reaching x by the group size, for DDP.
    """
    op = "filter_loss"
    check_feature_maps(x, op)
    check_beta(beta, op)
    check_choice("reduction", reduction, REDUCTIONS, op)
    if process_group is not None:
        from ..distributed import global_filter_loss_per_filter

        per_filter = global_filter_loss_per_filter(x, float(beta), process_group, backend=backend,
                                                   ddp_gradients=ddp_gradients)
    elif ddp_gradients:
        raise ValueError(f"{op}: ddp_gradients=True needs a process_group; pass process_group=dist.group.WORLD")
    else:
        per_filter = _registry.select(backend, x, op).filter_loss(x, float(beta))
    if reduction == "sum":
        return per_filter.sum()
    if reduction == "mean":
        return per_filter.mean()
    return per_filter


def _mask(x: Tensor, beta: float, center: str, scale: str | None, backend: str | None, relu: bool) -> Tensor:
    op = "relu_template_mask" if relu else "template_mask"
    check_feature_maps(x, op)
    check_beta(beta, op)
    check_choice("center", center, CENTERS, op)
    check_choice("scale", scale, SCALES, op)
    return _registry.select(backend, x, op).template_mask(x, float(beta), center, scale, relu)


def template_mask(x: Tensor, *, beta: float = DEFAULT_BETA, center: str = "argmax", scale: str | None = None,
                  backend: str | None = None) -> Tensor:
    """y = max(x ⊙ m, 0) with m the template at each map's peak μ̂ (docs/method.md §3).

    ``center``: "argmax" (paper; ties go to the first position in row-major order) or "centroid"
    (official code). ``scale``: None (official code, no τ) or "tau" (the paper's literal x ⊙ T_μ̂).
    The mask is a constant for autograd.
    """
    return _mask(x, beta, center, scale, backend, relu=False)


def relu_template_mask(x: Tensor, *, beta: float = DEFAULT_BETA, center: str = "argmax",
                       scale: str | None = None, backend: str | None = None) -> Tensor:
    """template_mask(relu(x)) in one pass: the entry point an interpretable conv layer calls on its conv output."""
    return _mask(x, beta, center, scale, backend, relu=True)


def selected_backend(x: Tensor, backend: str | None = None) -> str:
    """The name of the backend that would run on x."""
    return _registry.select(backend, x, "selected_backend").name
