"""Warn when fastexplain is imported after ``torch.distributed.init_process_group``.

Importing fastexplain imports ``torch._dynamo``, which imports ``torch.distributed.nn.functional``, whose
functions take ``group=group.WORLD`` as a default argument. Imported after the default group exists,
those defaults hold the group for the life of the process: ``destroy_process_group()`` then leaves its
gloo threads running, and a gloo process can abort at interpreter exit ("terminate called without an
active exception", SIGABRT) after all its work is done. Imported before the group exists, the defaults
hold a placeholder and nothing outlives ``destroy_process_group()``.
"""
from __future__ import annotations

import sys
import warnings

_PINNING_MODULE = "torch.distributed.nn.functional"


def warn_if_a_group_would_be_pinned() -> bool:
    """Warn (and return True) if importing fastexplain now would pin an existing default process group."""
    import torch.distributed as dist

    if _PINNING_MODULE in sys.modules or not dist.is_available() or not dist.is_initialized():
        return False
    warnings.warn("fastexplain was imported after torch.distributed.init_process_group(); PyTorch modules it "
                  "imports keep the default group alive past destroy_process_group(), and a gloo process may "
                  "then abort at exit; import fastexplain before init_process_group()", RuntimeWarning,
                  stacklevel=3)
    return True
