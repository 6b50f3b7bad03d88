"""The Triton backend: fused filter loss and template mask (SPEC §2–3) for CUDA tensors.

Runs on CUDA devices; with ``TRITON_INTERPRET=1`` set before triton is first imported, the same kernels
also run on CPU tensors through Triton's interpreter (slow: that is for testing, not for speed).
Value checks (NaN/Inf, negative inputs to the filter loss) are one torch reduction in eager mode, with
the messages of ``_checks.py``; they are skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import os
from typing import Callable

from torch import Tensor

from ._checks import check_values
from ._registry import Backend, BackendUnavailable


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def register_kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator making a launch function a torch.library op (used by triton_filter_loss/triton_mask).

    On a GPU it is a ``torch.library.triton_op``: torch.compile traces through it down to the Triton
    kernels (captured by ``wrap_triton``). Under TRITON_INTERPRET=1 the kernels are interpreter functions
    that torch cannot trace (running them on fake tensors fails), so the same launch function becomes an
    opaque ``torch.library.custom_op`` with the explicit shape function ``fake``: torch.compile still
    works on CPU, treating the op as a black box.
    """
    from torch.library import custom_op, triton_op

    def decorate(launch: Callable):
        if not interpreter_enabled():
            return triton_op(name, mutates_args=())(launch)
        op = custom_op(name, mutates_args=())(launch)
        op.register_fake(fake)
        return op
    return decorate


def load_backend() -> Backend:
    """The Triton backend, or BackendUnavailable saying why it cannot run here."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(f"backend 'triton' needs the triton package ({error}); "
                                 f"install it with pip install triton") from None
    import torch

    device_types = set()
    if torch.cuda.is_available():
        device_types.add("cuda")
    if interpreter_enabled():
        device_types.add("cpu")
    if not device_types:
        raise BackendUnavailable("backend 'triton' needs a CUDA device (none found); set TRITON_INTERPRET=1 "
                                 "before importing triton to run its kernels on the CPU interpreter (slow)")
    from .triton_filter_loss import triton_filter_loss
    from .triton_mask import triton_template_mask

    def filter_loss(x: Tensor, beta: float) -> Tensor:
        check_values(x, "filter_loss", nonnegative=True)
        return triton_filter_loss(x, beta)

    def template_mask(x: Tensor, beta: float, center: str, scale: str | None, relu: bool) -> Tensor:
        check_values(x, "relu_template_mask" if relu else "template_mask", nonnegative=False)
        return triton_template_mask(x, beta, center, scale, relu)

    return Backend(name="triton", device_types=frozenset(device_types), filter_loss=filter_loss,
                   template_mask=template_mask)
