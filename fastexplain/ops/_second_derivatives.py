"""Second derivatives of the fused backends' backward ops (cpu.py and the Triton modules share these).

A custom op without an autograd formula is differentiated by PyTorch's fallback, which warns and returns zero:
a backward pass through a ``create_graph=True`` gradient would be silently wrong. Each backward op therefore
gets a formula: the filter loss's raise (their second derivative is not implemented; the reference has it),
the mask's are linear in their first argument (grad_y) and piecewise constant in the others, so they are
their own derivative.
"""
from __future__ import annotations

from typing import Any

import torch


def _no_second_derivative(backend: str) -> RuntimeError:
    return RuntimeError(f"filter_loss: the {backend!r} backend has no second derivative (a backward pass "
                        f"through create_graph=True's gradient); use backend='reference' for double backward")


def forbid_second_derivative(op: Any, backend: str) -> None:
    """Make ``op`` (a name, OpOverload or custom op) raise a one-line error when differentiated."""
    def setup(ctx, inputs, output) -> None:
        pass

    def backward(ctx, *grads):
        raise _no_second_derivative(backend)

    torch.library.register_autograd(op, backward, setup_context=setup)


class _ScaledGradient(torch.autograd.Function):
    """grad_c · dloss_dx[:, c] of a saved first derivative, whose own derivative is not known: raises."""

    @staticmethod
    def forward(ctx, grad_loss: torch.Tensor, dloss_dx: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.backend = backend  # x only links the result to the graph of the op's input
        return dloss_dx * grad_loss.to(dloss_dx.dtype).reshape(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise _no_second_derivative(ctx.backend)


def scale_saved_gradient(grad_loss: torch.Tensor, dloss_dx: torch.Tensor, x: torch.Tensor,
                         backend: str) -> torch.Tensor:
    """dloss_dx [B, C, H, W] (saved from the forward pass on x) scaled by grad_loss [C], in a backward formula.
    Under create_graph=True the result depends on x and grad_loss to autograd, and differentiating it raises
    (as a constant it would give silent zero second derivatives)."""
    if torch.is_grad_enabled():
        return _ScaledGradient.apply(grad_loss, dloss_dx, x, backend)
    return dloss_dx * grad_loss.to(dloss_dx.dtype).reshape(1, -1, 1, 1)


def register_as_own_derivative(op: Any) -> None:
    """For an op linear in its first argument and piecewise constant in the rest: d op = op(d first, rest…)."""
    def setup(ctx, inputs, output) -> None:
        ctx.rest = inputs[1:]

    def backward(ctx, grad):
        nones = (None,) * len(ctx.rest)
        return (None if grad is None else op(grad, *ctx.rest),) + nones

    torch.library.register_autograd(op, backward, setup_context=setup)
