"""The Triton backend for the Triton test modules, or a module-level skip where it cannot load.

``from triton_env import TRITON, DEVICE, INTERPRETED`` at the top of a test module skips the whole module when
the backend is unavailable (no GPU and no TRITON_INTERPRET=1, or no triton); otherwise DEVICE is where its kernels
run: "cuda", or "cpu" under Triton's interpreter (INTERPRETED).
"""
from __future__ import annotations

import pytest

from fastexplain.ops import _registry

try:
    TRITON = _registry.load("triton")
except _registry.BackendUnavailable as error:  # pragma: no cover - depends on the machine
    pytest.skip(f"Triton backend unavailable here: {error}", allow_module_level=True)

DEVICE = "cuda" if "cuda" in TRITON.device_types else "cpu"
INTERPRETED = DEVICE == "cpu"
