"""The fused C++ CPU backend (docs/method.md §2–3, issue 3): builds csrc/ on first use and wraps its custom ops.

The kernels live in ``csrc/`` (one file per op, plus the ``TORCH_LIBRARY(fastexplain, m)`` schema) and are
compiled just in time with ``torch.utils.cpp_extension.load`` the first time the backend is loaded (about
20 s, then cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; concurrent
first uses wait on cpp_extension's file lock). A JIT build keeps ``pip install -e .`` working with build
isolation. When the build cannot run here (no compiler, no ninja, sources missing from a non-editable
install), :func:`load_backend` raises :class:`BackendUnavailable` with the reason and warns once; the
dispatcher then falls back to the reference.

Autograd and fake (meta) implementations are registered with ``torch.library`` so that the ops pass
``torch.library.opcheck`` and compile with ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .reference import compute_dtype
from ._registry import Backend, BackendUnavailable
from ._second_derivatives import forbid_second_derivative, register_as_own_derivative

EXTENSION_BASENAME = "fastexplain_cpu"
OP_NAMESPACE = "fastexplain"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCE_FILES = ("schema.cpp", "filter_loss.cpp", "template_mask.cpp", "filter_loss_local.cpp")
HEADER_FILES = ("kernel_math.h", "filter_loss_forward.h", "filter_loss_gradient.h")
# -march=native: the build runs on the machine that uses it (and the cache name carries the CPU's hash);
# on x86 let GCC use 512-bit vectors where the CPU has them (it defaults to 256-bit even on AVX-512 parts).
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"] + (
    ["-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64") else [])

_registered = False


def extension_name() -> str:
    """The build's cache name: the kernels are compiled with -march=native, so a cache shared between machines
    (a network home directory) must not hand one CPU's binary to another: the name carries a hash of the CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            features = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        features = ""
    fingerprint = hashlib.sha1(f"{platform.machine()} {features}".encode()).hexdigest()[:10]
    return f"{EXTENSION_BASENAME}_{fingerprint}"


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package puts it next to the venv's python."""
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    for directory in candidates:
        if (directory / "ninja").exists() and str(directory) not in path.split(os.pathsep):
            os.environ["PATH"] = f"{directory}{os.pathsep}{path}" if path else str(directory)
            return


def build_extension(verbose: bool = False) -> None:
    """Compile (or load the cached build of) csrc/ and load it into the process; raises BackendUnavailable."""
    missing = [name for name in SOURCE_FILES + HEADER_FILES if not (SOURCE_DIR / name).is_file()]
    if missing:
        raise BackendUnavailable(f"backend 'cpu' is unavailable: C++ sources {missing} not found in {SOURCE_DIR} "
                                 f"(non-editable install?); install with `pip install -e .` from a checkout")
    _ninja_on_path()
    # cpp_extension logs a CUDA_HOME notice on import, irrelevant to a CPU-only build: keep `fastexplain info` clean.
    extension_logger = logging.getLogger("torch.utils.cpp_extension")
    previous_level = extension_logger.level
    extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        extension_logger.setLevel(previous_level)

    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("backend 'cpu' is unavailable: ninja is not on PATH; `pip install ninja`")
    try:
        cpp_extension.load(
            name=extension_name(),
            sources=[str(SOURCE_DIR / name) for name in SOURCE_FILES],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(SOURCE_DIR)],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # compiler missing, compile error, linker error, …
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackendUnavailable(f"backend 'cpu' is unavailable: building the C++ extension from {SOURCE_DIR} "
                                 f"failed ({first_line}); run `python -c \"import fastexplain.ops.cpu as c; "
                                 f"c.build_extension(verbose=True)\"` to see the compiler output") from None


def _register_python_parts() -> None:
    """Fake implementations and autograd formulas for the C++ ops (once per process)."""
    global _registered
    if _registered:
        return
    lib = torch.library

    @lib.register_fake(f"{OP_NAMESPACE}::filter_loss_forward")
    def _filter_loss_forward_fake(x: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        B, C, H, W = x.shape
        dtype = compute_dtype(x)
        return x.new_empty((C,), dtype=dtype), x.new_empty((C, 2, H * W + 1), dtype=dtype), x.new_empty((C, B), dtype=dtype)

    @lib.register_fake(f"{OP_NAMESPACE}::filter_loss_backward")
    def _filter_loss_backward_fake(grad: Tensor, x: Tensor, lme: Tensor, v: Tensor, beta: float) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @lib.register_fake(f"{OP_NAMESPACE}::filter_loss_forward_grad")
    def _filter_loss_forward_grad_fake(x: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(x)
        return x.new_empty((x.shape[1],), dtype=dtype), torch.empty(x.shape, dtype=dtype, device=x.device)

    @lib.register_fake(f"{OP_NAMESPACE}::filter_loss_backward_from_grad")
    def _filter_loss_backward_from_grad_fake(grad: Tensor, dloss_dx: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.empty(dloss_dx.shape, dtype=dtype, device=dloss_dx.device)

    @lib.register_fake(f"{OP_NAMESPACE}::template_mask_forward")
    def _mask_forward_fake(x: Tensor, beta: float, center: str, tau_scale: bool, relu: bool) -> tuple[Tensor, Tensor]:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[:2], dtype=torch.int64)

    @lib.register_fake(f"{OP_NAMESPACE}::template_mask_backward")
    def _mask_backward_fake(grad_y: Tensor, x: Tensor, peaks: Tensor, beta: float, tau_scale: bool,
                            relu: bool) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @lib.register_fake(f"{OP_NAMESPACE}::template_mask_forward_bits")
    def _mask_forward_bits_fake(x: Tensor, beta: float, center: str, tau_scale: bool,
                                relu: bool) -> tuple[Tensor, Tensor, Tensor]:
        B, C, H, W = x.shape
        return (torch.empty_like(x, memory_format=torch.preserve_format),
                x.new_empty((B, C), dtype=torch.int64), x.new_empty((B, C, mask_words(H * W)), dtype=torch.int16))

    @lib.register_fake(f"{OP_NAMESPACE}::template_mask_backward_bits")
    def _mask_backward_bits_fake(grad_y: Tensor, peaks: Tensor, keep: Tensor, beta: float, tau_scale: bool) -> Tensor:
        return torch.empty_like(grad_y, memory_format=torch.preserve_format)

    def _loss_setup(ctx, inputs, output) -> None:
        x, beta = inputs
        _, lme, v = output
        ctx.mark_non_differentiable(lme, v)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lme, v)
        ctx.beta = beta

    def _loss_backward(ctx, grad_loss, grad_lme, grad_v):
        x, lme, v = ctx.saved_tensors
        if grad_loss is None:
            return None, None
        return torch.ops.fastexplain.filter_loss_backward(grad_loss, x, lme, v, ctx.beta), None

    lib.register_autograd(f"{OP_NAMESPACE}::filter_loss_forward", _loss_backward, setup_context=_loss_setup)

    def _loss_grad_setup(ctx, inputs, output) -> None:
        x, beta = inputs
        dloss_dx = output[1]
        ctx.mark_non_differentiable(dloss_dx)
        ctx.set_materialize_grads(False)  # else autograd passes a map of zeros as dloss_dx's gradient
        ctx.beta, ctx.input_dtype = beta, x.dtype
        if type(dloss_dx) is torch.Tensor:
            # Eager: dloss/dx is held as a plain attribute, not a saved tensor, so that the first backward pass may
            # scale it in place (no second map-sized allocation); x is saved for any later backward pass through
            # the same graph (retain_graph=True, gradcheck), which recomputes the gradient from it.
            ctx.save_for_backward(x)
            ctx.dloss_dx = dloss_dx.detach()
        else:  # traced (torch.compile, FakeTensor): a saved tensor, scaled out of place
            ctx.save_for_backward(x, dloss_dx)
            ctx.dloss_dx = None
        ctx.consumed = False

    def _loss_grad_backward(ctx, grad_loss, grad_dloss_dx):
        if grad_loss is None:
            return None, None
        ops = torch.ops.fastexplain
        saved = ctx.saved_tensors
        if ctx.consumed or (torch.is_grad_enabled() and ctx.dloss_dx is not None):
            # A second backward pass (the first scaled the gradient in place), or create_graph=True in eager mode:
            # recompute from x, through the op whose own derivative raises.
            x = saved[0]
            _, lme, v = ops.filter_loss_forward(x, ctx.beta)
            return ops.filter_loss_backward(grad_loss, x, lme, v, ctx.beta), None
        dloss_dx = ctx.dloss_dx if ctx.dloss_dx is not None else saved[1]
        if ctx.dloss_dx is None or dloss_dx.dtype != ctx.input_dtype:  # traced, or fp16/bf16 input: out of place
            return ops.filter_loss_backward_from_grad(grad_loss, dloss_dx, ctx.input_dtype), None
        ctx.consumed, ctx.dloss_dx = True, None
        return dloss_dx.mul_(grad_loss.to(dloss_dx.dtype).reshape(1, -1, 1, 1)), None

    lib.register_autograd(f"{OP_NAMESPACE}::filter_loss_forward_grad", _loss_grad_backward,
                          setup_context=_loss_grad_setup)

    for name in ("filter_loss_backward", "filter_loss_backward_from_grad"):
        forbid_second_derivative(f"{OP_NAMESPACE}::{name}", "cpu")

    def _mask_setup(ctx, inputs, output) -> None:
        x, beta, center, tau_scale, relu = inputs
        ctx.save_for_backward(x, output[1])
        ctx.beta, ctx.tau_scale, ctx.relu = beta, tau_scale, relu

    def _mask_backward(ctx, grad_y, grad_peaks):
        x, peaks = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None
        dx = torch.ops.fastexplain.template_mask_backward(grad_y, x, peaks, ctx.beta, ctx.tau_scale, ctx.relu)
        return dx, None, None, None, None

    lib.register_autograd(f"{OP_NAMESPACE}::template_mask_forward", _mask_backward, setup_context=_mask_setup)

    def _mask_bits_setup(ctx, inputs, output) -> None:
        _, beta, _, tau_scale, _ = inputs
        ctx.save_for_backward(output[1], output[2])  # the peaks and the keep bits: x itself is not kept alive
        ctx.beta, ctx.tau_scale = beta, tau_scale

    def _mask_bits_backward(ctx, grad_y, grad_peaks, grad_keep):
        peaks, keep = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None
        dx = torch.ops.fastexplain.template_mask_backward_bits(grad_y, peaks, keep, ctx.beta, ctx.tau_scale)
        return dx, None, None, None, None

    lib.register_autograd(f"{OP_NAMESPACE}::template_mask_forward_bits", _mask_bits_backward,
                          setup_context=_mask_bits_setup)

    for op in (torch.ops.fastexplain.template_mask_backward, torch.ops.fastexplain.template_mask_backward_bits):
        register_as_own_derivative(op.default)  # linear in grad_y: double backward through the mask works
    _registered = True


def mask_words(positions: int) -> int:
    """uint16 words of keep bits per map in ``template_mask_forward_bits`` (16 positions per word)."""
    return (positions + 15) // 16


def filter_loss(x: Tensor, beta: float) -> Tensor:
    """−MI per filter [C] by the fused kernel (float32, float64 for float64 inputs), differentiable in x.

    When autograd will need the gradient (grad mode on and x requires grad), the loss and dloss/dx come from one
    pass over the data (``filter_loss_forward_grad``) and the backward pass only scales the saved gradient: in
    training a backward pass always follows, and this saves reading x again, recomputing the logits and one
    exponential per (image, template). Otherwise ``filter_loss_forward`` computes the loss alone.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.ops.fastexplain.filter_loss_forward_grad(x, beta)[0]
    return torch.ops.fastexplain.filter_loss_forward(x, beta)[0]


def template_mask(x: Tensor, beta: float, center: str, scale: str | None, relu: bool) -> Tensor:
    """relu?(x) ⊙ m clamped at 0 (·τ for scale="tau") by the fused kernel, in x's dtype and memory format.

    Autograd saves the peaks and the kept positions as bits (1/32 of a float32 map), not x: the backward pass
    reads grad_y and writes dx, nothing else of map size.
    """
    return torch.ops.fastexplain.template_mask_forward_bits(x, beta, center, scale == "tau", relu)[0]


def load_backend() -> Backend:
    """Build/load the extension and register its Python parts; BackendUnavailable (warned once) otherwise."""
    try:
        build_extension()
    except BackendUnavailable as error:
        warnings.warn(f"{error}; falling back to the reference backend", RuntimeWarning, stacklevel=2)
        raise
    _register_python_parts()
    return Backend(name="cpu", device_types=frozenset({"cpu"}), filter_loss=filter_loss, template_mask=template_mask)
