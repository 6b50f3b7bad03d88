"""Shared pytest setup.

Triton's CPU interpreter: without a CUDA device, TRITON_INTERPRET=1 is set here, before any test module
imports triton (torchvision and torch.compile import it), so the Triton kernels of fastexplain.ops run on
CPU tensors in the one test command. Triton reads the variable when a kernel is decorated, so it must be
set before ``fastexplain.ops.triton_*`` is imported; it changes nothing for tests that do not use Triton
(torch.compile on CPU generates C++, not Triton). An explicit TRITON_INTERPRET in the environment wins.
"""
from __future__ import annotations

import os


def _cuda_available() -> bool:
    import torch  # importing torch does not import triton

    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"
