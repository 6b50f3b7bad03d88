"""The Triton backend: fused filter loss and template mask (docs/method.md §2–3) for CUDA tensors.

Runs on CUDA devices; with ``TRITON_INTERPRET=1`` set before triton is first imported, the same kernels
also run on CPU tensors through Triton's interpreter (slow: that is for testing, not for speed).
Value checks (NaN/Inf, negative inputs to the filter loss) are one torch reduction in eager mode, with
the messages of ``_checks.py``; they are skipped while ``torch.compile`` traces.

Imports go one way: this module imports ``triton_forms`` (the filter loss's three forms, over the kernel
modules ``triton_filter_loss`` and ``triton_pyramid``) and ``triton_mask``; the kernel modules import only
``_triton_common`` (the op decorator and the interpreter switch) and ``reference``.
"""
from __future__ import annotations

from torch import Tensor

from ._checks import check_values
from ._registry import Backend, BackendUnavailable
from ._triton_common import interpreter_enabled, register_kernel_op  # noqa: F401  (re-exported)


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
    from .triton_forms import triton_filter_loss
    from .triton_mask import triton_template_mask

    def filter_loss(x: Tensor, beta: float) -> Tensor:
        check_values(x, "filter_loss", nonnegative=True)
        return triton_filter_loss(x, beta)

    def template_mask(x: Tensor, beta: float, center: str, scale: str | None, relu: bool) -> Tensor:
        check_values(x, "relu_template_mask" if relu else "template_mask", nonnegative=False)
        return triton_template_mask(x, beta, center, scale, relu)

    return Backend(name="triton", device_types=frozenset(device_types), filter_loss=filter_loss,
                   template_mask=template_mask)
