"""Input validation shared by every backend: one-line errors that say what is wrong and how to fix it.

Shape and dtype checks are static and run in the dispatcher. Value checks (NaN/Inf, negative values)
read the whole tensor; the reference backend runs them with torch ops, fused backends may run them
inside their kernels' own pass over the data and must raise the same messages.
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("sum", "mean", "none")
CENTERS = ("argmax", "centroid")
SCALES = (None, "tau")


def check_feature_maps(x: object, op: str) -> None:
    """Rank, emptiness and dtype of a [B, C, H, W] batch of feature maps."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}; "
                         f"add the missing batch/channel dimensions (e.g. x[None]) first")
    if 0 in x.shape:
        raise ValueError(f"{op}: got an empty tensor of shape {tuple(x.shape)}; B, C, H and W must all be ≥ 1")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")


def check_beta(beta: float, op: str) -> None:
    if not isinstance(beta, (int, float)) or not beta > 0 or beta != beta or beta == float("inf"):
        raise ValueError(f"{op}: beta must be a finite positive number, got {beta!r}")


def check_choice(name: str, value: object, allowed: tuple, op: str) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {allowed}, got {value!r}")


def nonfinite_message(op: str) -> str:
    return f"{op}: the input contains NaN or Inf; check the layer that produced it (or lower the learning rate)"


def negative_message(op: str) -> str:
    return (f"{op}: the input has negative values, but the filter loss is defined on post-ReLU feature maps "
            f"(x ≥ 0); apply torch.relu first")


def has_values(x: Tensor) -> bool:
    """False for tensors without data to read: ``meta`` tensors and FakeTensors (shape inference only)."""
    if x.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(x)


def check_values(x: Tensor, op: str, *, nonnegative: bool) -> None:
    """NaN/Inf (and, for the filter loss, negative values): one read of x.

    Skipped while compiling and on tensors without values (``meta`` and fake tensors), where only the
    shapes and dtypes are inferred, as for ``torch.ops.fastexplain.*`` under FakeTensorMode.
    """
    if torch.compiler.is_compiling() or not has_values(x):
        return
    low, high = torch.aminmax(x.detach())  # both NaN when any element is NaN
    low, high = float(low), float(high)
    if not (abs(low) < float("inf") and abs(high) < float("inf")):
        raise ValueError(nonfinite_message(op))
    if nonnegative and low < 0:
        raise ValueError(negative_message(op))
