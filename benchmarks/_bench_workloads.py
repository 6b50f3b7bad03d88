"""Benchmark workloads shared by the pytest-benchmark files and ``benchmarks/run.py`` (docs/metrics.md (goals)).

A *case* is (workload, backend, shape). Its ``step()`` runs the workload once; ``sync()`` waits for
the device. Backends:

* ``reference`` — the eager plain-PyTorch ops of ``fastexplain.ops.reference`` (through the dispatcher);
* ``compile``   — ``torch.compile(dynamic=False)`` of those same reference functions, compiled once per
  shape and warmed up by :func:`build_case` before anything is timed;
* ``textbook``  — the filter loss as public ports write it (issue 12): logits by a product with the templates,
  ``logsumexp`` over the batch, no centring — ``reference.naive_filter_loss_per_filter``, the tests' error
  yardstick; filter-loss workloads only;
* ``compile_textbook`` — ``torch.compile(dynamic=False)`` of that textbook form;
* ``cpu``       — the fused C++ backend; ``triton`` — the fused Triton backend (CUDA tensors only).

A backend that cannot run here is skipped with the reason from ``fastexplain.ops.availability()``.
Workloads (inputs pre-allocated, gradient buffers reset with ``x.grad = None``):

* ``filter_loss_fwd``      — ``filter_loss(x)`` under ``torch.no_grad()`` (docs/method.md §2);
* ``filter_loss_fwd_bwd``  — ``filter_loss(x).backward()``;
* ``mask_relu_fwd_bwd``    — ``relu_template_mask(z).backward(g)`` on a conv-output-like z (docs/method.md §3);
* ``layer_fwd_bwd``        — one ``fastexplain.nn.InterpretableConv2d(C, C, 3)``: conv → ReLU → filter
  loss → mask (docs/method.md §3), forward and backward of Σ output + Σ_f loss_f;
* ``explainer_step``       — one training step of ``fastexplain.nn.Explainer`` (when it exists).

``FASTEXPLAIN_BENCH_TINY=1`` swaps the shapes for tiny ones so that CI can run every file once.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import fastexplain
from fastexplain.ops import availability, reference
from fastexplain.templates import DEFAULT_BETA

TINY_ENV = "FASTEXPLAIN_BENCH_TINY"

# (B, C, n) with H = W = n: VGG-16 conv5, AlexNet conv5, a big batch, and two larger maps.
SHAPES: tuple[tuple[int, int, int], ...] = ((64, 512, 14), (128, 256, 13), (256, 512, 7), (32, 512, 28),
                                            (16, 256, 56))
TINY_SHAPES: tuple[tuple[int, int, int], ...] = ((4, 3, 5), (3, 2, 7))
# Scaling in n at fixed (B, C): the reference grows as n⁴, the fused kernels should grow as n³ or less.
SCALING_BATCH, SCALING_CHANNELS, SCALING_SIZES = 16, 64, (7, 14, 28, 56)
TINY_SCALING_BATCH, TINY_SCALING_CHANNELS, TINY_SCALING_SIZES = 4, 3, (3, 5)

BACKENDS: tuple[str, ...] = ("reference", "compile", "textbook", "compile_textbook", "cpu", "triton")
# The plain-PyTorch forms a user could run instead of a fused backend ("non-fused" columns).
UNFUSED: tuple[str, ...] = ("reference", "compile", "textbook", "compile_textbook")
TEXTBOOK_BACKENDS = frozenset({"textbook", "compile_textbook"})
COMPILED_BACKENDS = frozenset({"compile", "compile_textbook"})
FILTER_LOSS_WORKLOADS = frozenset({"filter_loss_fwd", "filter_loss_fwd_bwd"})
WORKLOADS: tuple[str, ...] = ("filter_loss_fwd", "filter_loss_fwd_bwd", "mask_relu_fwd_bwd", "layer_fwd_bwd",
                              "explainer_step")
# In tiny mode torch.compile costs far more than the work: compile only this workload, at the first shape.
TINY_COMPILE_WORKLOADS = frozenset({"filter_loss_fwd_bwd"})


def is_tiny() -> bool:
    """True when FASTEXPLAIN_BENCH_TINY is set to a non-empty value other than 0."""
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def shapes() -> tuple[tuple[int, int, int], ...]:
    return TINY_SHAPES if is_tiny() else SHAPES


def scaling_shapes() -> tuple[tuple[int, int, int], ...]:
    """(B, C, n) of the time-vs-n sweep: fixed B and C, growing n."""
    if is_tiny():
        return tuple((TINY_SCALING_BATCH, TINY_SCALING_CHANNELS, n) for n in TINY_SCALING_SIZES)
    return tuple((SCALING_BATCH, SCALING_CHANNELS, n) for n in SCALING_SIZES)


def shape_id(shape: tuple[int, int, int]) -> str:
    B, C, n = shape
    return f"B{B}-C{C}-n{n}"


def device_for(backend: str, device: str | None = None) -> torch.device:
    """The device a case runs on: ``device`` when given, else CUDA for triton and the CPU otherwise."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if backend == "triton" else torch.device("cpu")


def skip_reason(backend: str, workload: str, shape: tuple[int, int, int] | None = None,
                device: str | None = None) -> str | None:
    """Why (backend, workload, shape) cannot run here (on ``device``), or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown benchmark backend {backend!r}; choose one of {BACKENDS}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {WORKLOADS}")
    device_type = device_for(backend, device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend == "triton" and device_type != "cuda":
        return "triton runs on CUDA tensors only"
    if backend == "cpu" and device_type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    if backend in ("cpu", "triton"):
        reason = availability().get(backend)
        if reason is not None:
            return reason
    if backend in TEXTBOOK_BACKENDS and workload not in FILTER_LOSS_WORKLOADS:
        return "the textbook form is a filter-loss formula (the mask has no separate textbook form)"
    if backend in COMPILED_BACKENDS and is_tiny() and (workload not in TINY_COMPILE_WORKLOADS or shape != TINY_SHAPES[0]):
        return f"tiny mode compiles only {sorted(TINY_COMPILE_WORKLOADS)} at {TINY_SHAPES[0]} to keep CI fast"
    if workload == "explainer_step":
        return _explainer_skip_reason(backend)
    if workload == "layer_fwd_bwd":
        try:
            from fastexplain.nn import InterpretableConv2d  # noqa: F401
        except ImportError as error:
            return f"fastexplain.nn.InterpretableConv2d is not available ({error})"
    return None


@dataclass
class Case:
    """One runnable benchmark case: ``step()`` does the work once, ``sync()`` waits for the device."""

    workload: str
    backend: str
    shape: tuple[int, int, int]
    step: Callable[[], None]
    sync: Callable[[], None]
    input_bytes: int                    # bytes of the [B, C, n, n] map the op reads
    device_type: str                    # "cpu" or "cuda"
    compile_seconds: float = 0.0        # first call of a torch.compile case (compile + first run)
    # filter-loss workloads: x -> (Σ_f loss_f, its gradient or None) of this backend, for the accuracy columns
    evaluate: Callable[[], tuple[Tensor, Tensor | None]] | None = None


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _compiled(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """torch.compile(fn) for one shape. Dynamo keys its cache on the code object, which every case of a
    workload shares, so the cache is reset first: otherwise the 9th shape or graph of a workload hits
    ``recompile_limit`` and silently runs eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def textbook_filter_loss(x: Tensor) -> Tensor:
    """Σ_f loss_f in the textbook form (issue 12): ``reference.naive_filter_loss_per_filter``, which the tests use."""
    return reference.naive_filter_loss_per_filter(x, DEFAULT_BETA).sum()


def _filter_loss_fn(backend: str) -> Callable[[Tensor], Tensor]:
    """x -> Σ_f loss_f for the backend (docs/method.md §2); the compile backends compile the reference or textbook form."""
    if backend == "compile":
        return _compiled(lambda x: reference.filter_loss_per_filter(x, DEFAULT_BETA).sum())
    if backend == "textbook":
        return textbook_filter_loss
    if backend == "compile_textbook":
        return _compiled(textbook_filter_loss)
    name = backend
    return lambda x: fastexplain.filter_loss(x, reduction="sum", backend=name)


def _relu_mask_fn(backend: str) -> Callable[[Tensor], Tensor]:
    """z -> max(relu(z) ⊙ m, 0) for the backend (docs/method.md §3, default argmax centre, no τ)."""
    if backend == "compile":
        return _compiled(lambda z: reference.template_mask(z, DEFAULT_BETA, "argmax", None, True))
    name = backend
    return lambda z: fastexplain.relu_template_mask(z, backend=name)


def _layer_fn(backend: str, layer: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """features -> Σ(masked output) + Σ_f loss_f of one InterpretableConv2d (docs/method.md §3)."""
    def objective(features: Tensor) -> Tensor:
        result = layer.detailed(features, compute_loss=True) if hasattr(layer, "detailed") else layer(features)
        return result.output.sum() + result.filter_loss.sum()
    return _compiled(objective) if backend == "compile" else objective


def _inputs(shape: tuple[int, int, int], device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """A post-ReLU map x ≥ 0 (half zeros, like a real ReLU output) and a conv-output-like z."""
    B, C, n = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(B, C, n, n, generator=generator).to(device)
    return torch.relu(z), z


def build_case(workload: str, backend: str, shape: tuple[int, int, int], *, device: str | None = None,
               seed: int = 0) -> Case:
    """Build (and for ``compile``, compile and warm up) one case; call :func:`skip_reason` first."""
    reason = skip_reason(backend, workload, shape, device)
    if reason is not None:
        raise RuntimeError(f"{workload}/{backend} cannot run here: {reason}")
    run_device = device_for(backend, device)
    x, z = _inputs(shape, run_device, seed)
    B, C, n = shape
    case_step: Callable[[], None]
    evaluate = None
    if workload == "filter_loss_fwd":
        loss_fn = _filter_loss_fn(backend)

        def case_step() -> None:
            with torch.no_grad():
                loss_fn(x)

        def evaluate() -> tuple[Tensor, Tensor | None]:
            with torch.no_grad():
                return loss_fn(x).detach(), None
    elif workload == "filter_loss_fwd_bwd":
        loss_fn = _filter_loss_fn(backend)
        x.requires_grad_(True)

        def case_step() -> None:
            x.grad = None
            loss_fn(x).backward()

        def evaluate() -> tuple[Tensor, Tensor | None]:
            x.grad = None
            loss = loss_fn(x)
            loss.backward()
            grad, x.grad = x.grad, None
            return loss.detach(), grad
    elif workload == "mask_relu_fwd_bwd":
        mask_fn = _relu_mask_fn(backend)
        z.requires_grad_(True)
        upstream = torch.ones_like(z)

        def case_step() -> None:
            z.grad = None
            mask_fn(z).backward(upstream)
    elif workload == "layer_fwd_bwd":
        from fastexplain.nn import InterpretableConv2d

        torch.manual_seed(seed)
        op_backend = "reference" if backend == "compile" else backend
        layer = InterpretableConv2d(C, C, 3, backend=op_backend).to(run_device)
        layer_fn = _layer_fn(backend, layer)
        features = x.clone().requires_grad_(True)

        def case_step() -> None:
            layer.zero_grad(set_to_none=True)
            features.grad = None
            layer_fn(features).backward()
    else:  # explainer_step
        case_step = _explainer_step(backend, shape, run_device, seed)
    case = Case(workload, backend, shape, case_step, _sync_for(run_device), x.numel() * x.element_size(),
                run_device.type, evaluate=evaluate)
    if backend in COMPILED_BACKENDS:
        start = time.perf_counter()
        case.step()
        case.sync()
        case.compile_seconds = time.perf_counter() - start
    case.step()  # warm-up: first-call allocations, lazy loading, autotuning
    case.sync()
    return case


def exact_filter_loss(shape: tuple[int, int, int], *, device: str | None = None, seed: int = 0,
                      channels_per_chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Σ_f loss_f and its gradient in float64 on the benchmark's own float32 input (the accuracy yardstick).

    The loss is a sum over filters and each filter's gradient involves only its own channel, so the float64
    reference runs on chunks of channels: its B·C·(HW+1) intermediates never exist at full size.
    """
    x, _ = _inputs(shape, device_for("reference", device), seed)
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for first in range(0, x.shape[1], channels_per_chunk):
        chunk = x[:, first:first + channels_per_chunk].double().requires_grad_(True)
        loss = reference.filter_loss_per_filter(chunk, DEFAULT_BETA).sum()
        loss.backward()
        total += loss.detach().cpu()
        grad[:, first:first + channels_per_chunk] = chunk.grad
    return total, grad


def _explainer_skip_reason(backend: str) -> str | None:
    try:
        from fastexplain.nn import Explainer, ExplainerConfig  # noqa: F401
    except ImportError as error:
        return f"fastexplain.nn.Explainer is not available ({error})"
    if backend in COMPILED_BACKENDS:
        return "torch.compile of a whole explainer training step is not benchmarked (compile time ≫ step time)"
    return None


def _explainer_step(backend: str, shape: tuple[int, int, int], device: torch.device, seed: int) -> Callable[[], None]:
    """One Adam step of the default Explainer (docs/method.md §4) on a random performer feature x* [B, C, n, n]."""
    from fastexplain.nn import Explainer, ExplainerConfig

    B, C, n = shape
    torch.manual_seed(seed)
    explainer = Explainer(ExplainerConfig(in_channels=C, backend=backend)).to(device).train()
    optimiser = torch.optim.Adam(explainer.parameters(), lr=1e-3)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    x_star = torch.relu(torch.randn(B, C, n, n, generator=generator)).to(device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        explainer(x_star).losses.total.backward()
        optimiser.step()
    return step
