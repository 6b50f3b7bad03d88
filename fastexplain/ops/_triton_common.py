"""What the Triton backend and its kernel modules share, below both of them (no import cycle):
``triton_filter_loss`` and ``triton_mask`` import this module, ``triton_backend`` imports all three.

Importing this module does not import triton.
"""
from __future__ import annotations

import os
from typing import Callable


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

