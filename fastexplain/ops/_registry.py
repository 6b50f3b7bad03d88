"""Backends and how one is chosen (docs/method.md).

A backend is a pair of functions on validated inputs:

* ``filter_loss(x, beta) -> Tensor[C]``: −MI per filter, in float32 (float64 for float64 inputs),
  differentiable with respect to x. x is [B, C, H, W] with any strides and any floating dtype.
* ``template_mask(x, beta, center, scale, relu) -> Tensor``: the masked map, same shape and dtype as x.

Backends are loaded lazily by name; a loader raises :class:`BackendUnavailable` with the reason when it
cannot be used here. ``backend=None`` takes, for the tensor's device, the first available backend of
``AUTOMATIC_ORDER``; the environment variable ``FASTEXPLAIN_BACKEND`` forces one for debugging.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

ENV_VAR = "FASTEXPLAIN_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend that exists but cannot run here (not built, no GPU, …); the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: frozenset[str]
    filter_loss: Callable[[Tensor, float], Tensor]
    template_mask: Callable[[Tensor, float, str, "str | None", bool], Tensor]


# name -> module that defines ``load_backend() -> Backend``
_MODULES = {
    "reference": "fastexplain.ops.reference_backend",
    "cpu": "fastexplain.ops.cpu",
    "triton": "fastexplain.ops.triton_backend",
}
AUTOMATIC_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")}
# name -> the backend, or the reason it cannot be used here (a string: a cached exception would keep its traceback,
# and with it every caller frame of the first failed load alive for the life of the process, e.g. a training
# function's model and process group, whose gloo threads then outlive destroy_process_group()).
_loaded: dict[str, "Backend | str"] = {}


def backend_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def load(name: str) -> Backend:
    """The backend called ``name``; raises BackendUnavailable (with the reason) or ValueError (unknown)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()} or None for automatic")
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            _loaded[name] = module.load_backend()
        except BackendUnavailable as error:
            _loaded[name] = str(error)
        except ImportError as error:
            _loaded[name] = f"backend {name!r} is unavailable: {error}"
    result = _loaded[name]
    if isinstance(result, str):
        raise BackendUnavailable(result)  # a fresh exception each time: nothing cached holds a traceback
    return result


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can be used here, otherwise the reason it cannot."""
    try:
        load(name)
        return None
    except BackendUnavailable as error:
        return str(error)


def availability() -> dict[str, str | None]:
    """For every backend: None when it can be used here, otherwise the reason it cannot."""
    return {name: unavailable_reason(name) for name in _MODULES}


def select(backend: str | None, x: Tensor, op: str) -> Backend:
    """The backend that runs ``op`` on x: the one asked for, the forced one, or the automatic choice.

    The choice (which may import a backend module and build the C++ extension) runs in plain Python even
    while ``torch.compile`` traces the caller: :func:`_resolve` is marked ``assume_constant_result``, so
    Dynamo calls it at trace time and keeps only its result, a backend name. Without this, the first call of
    a compiled ``fx.filter_loss`` in a fresh process traced into ``importlib.import_module`` and failed with
    "Attempted to call function marked as skipped" under ``fullgraph=True`` (issue 12).
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    return _loaded[_resolve(requested, x.device.type, op)]


@torch.compiler.assume_constant_result
def _resolve(requested: str | None, device_type: str, op: str) -> str:
    """The name of the backend for (requested, device type), loading it; raises as :func:`select` documents."""
    if requested is not None:
        try:
            chosen = load(requested)
        except BackendUnavailable as error:
            raise BackendUnavailable(f"{op}: {error}") from None
        if device_type not in chosen.device_types:
            raise ValueError(f"{op}: backend {requested!r} runs on {sorted(chosen.device_types)} tensors, "
                             f"got a {device_type} tensor; move the tensor or pick another backend")
        return chosen.name
    for name in AUTOMATIC_ORDER.get(device_type, ("reference",)):
        try:
            return load(name).name
        except BackendUnavailable:
            continue
    return load("reference").name
