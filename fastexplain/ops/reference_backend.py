"""The reference backend: the plain-PyTorch ops of reference.py, on any device."""
from __future__ import annotations

from . import reference
from ._registry import Backend


def load_backend() -> Backend:
    return Backend(
        name="reference",
        device_types=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        filter_loss=reference.filter_loss_per_filter,
        template_mask=reference.template_mask,
    )
