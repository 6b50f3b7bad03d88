"""The ops as a new user tries them (issue 12, item 8): each test here failed before its fix.

* ``torch.compile(fullgraph=True)`` of ``fx.filter_loss`` in a fresh process (the backend used to be imported
  lazily inside the traced region);
* ``meta`` tensors (the value checks used to call ``.item()``);
* channels_last in, channels_last out for the ``cpu`` backend's mask;
* float32 accuracy of the ``cpu`` filter loss at large activations;
* the ``cpu`` mask's backward no longer keeps its input alive (it saves the peaks and one bit per position).
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import fastexplain
from fastexplain.ops import _registry

ROOT = Path(__file__).resolve().parents[1]
UNAVAILABLE = _registry.unavailable_reason("cpu")
needs_cpu = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"C++ backend not built: {UNAVAILABLE}")
MASK_OPS = [fastexplain.template_mask, fastexplain.relu_template_mask]


def _fresh_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("backend_env", ["", "reference"])
def test_compile_fullgraph_in_a_fresh_process(backend_env):
    """No eager call first: the first thing the process does is compile and run the op (README promise)."""
    done = _fresh_python("""
        import torch
        import fastexplain as fx

        x = torch.rand(4, 3, 5, 5)
        loss = torch.compile(lambda t: fx.filter_loss(t), fullgraph=True)(x)
        y = torch.compile(lambda t: fx.relu_template_mask(t), fullgraph=True)(x - 0.5)
        torch.testing.assert_close(loss, fx.filter_loss(x, backend="reference"), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(y, fx.relu_template_mask(x - 0.5, backend="reference"))
        print("OK", fx.ops.selected_backend(x))
    """, {"FASTEXPLAIN_BACKEND": backend_env})
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_meta_tensors_infer_shapes(dtype):
    x = torch.empty(4, 6, 8, 10, device="meta", dtype=dtype)
    loss = fastexplain.filter_loss(x)
    per_filter = fastexplain.filter_loss(x, reduction="none")
    assert loss.device.type == "meta" and loss.shape == () and per_filter.shape == (6,)
    assert per_filter.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for op in MASK_OPS:
        for center in ("argmax", "centroid"):
            y = op(x, center=center)
            assert y.device.type == "meta" and y.shape == x.shape and y.dtype == dtype


def test_meta_tensors_backward():
    x = torch.empty(3, 2, 5, 7, device="meta", requires_grad=True)
    fastexplain.filter_loss(x).backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.device.type == "meta"
    y = fastexplain.relu_template_mask(x)
    (grad,) = torch.autograd.grad(y, x, torch.empty_like(y))
    assert grad.shape == x.shape


def test_fake_tensors_through_the_public_api():
    """Shape inference under FakeTensorMode, for the dispatcher as for ``torch.ops.fastexplain.*``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, 4, 6)
        loss = fastexplain.filter_loss(x, reduction="none", backend="reference")
        y = fastexplain.relu_template_mask(x, backend="reference")
    assert loss.shape == (3,) and y.shape == x.shape


def test_meta_tensors_still_reject_bad_shapes():
    with pytest.raises(ValueError, match="4-D tensor"):
        fastexplain.filter_loss(torch.empty(4, 6, 8, device="meta"))


@needs_cpu
@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpu_mask_keeps_channels_last(op, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)).to(dtype).to(memory_format=torch.channels_last)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).to(memory_format=torch.channels_last)
    results = {}
    for backend in ("reference", "cpu"):
        leaf = x.detach().requires_grad_()
        y = op(leaf, backend=backend)
        (grad,) = torch.autograd.grad(y, leaf, grad_y)
        assert y.is_contiguous(memory_format=torch.channels_last), backend
        results[backend] = (y, grad)
    tol = {torch.float16: 2e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]  # fp16: cpu rounds once
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results["cpu"][1], results["reference"][1], rtol=tol, atol=tol)
    assert results["cpu"][1].is_contiguous(memory_format=torch.channels_last)  # dx follows grad_y's format


@needs_cpu
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_cpu_mask_other_layouts_match_reference(layout):
    base = torch.randn(4, 3, 6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = base.transpose(2, 3).contiguous().transpose(2, 3) if layout == "transposed" else base[:, :, ::2, 1::2]
    grad_y = torch.randn(x.shape, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    for op in MASK_OPS:
        out = {}
        for backend in ("reference", "cpu"):
            leaf = x.detach().requires_grad_()
            y = op(leaf, backend=backend)
            out[backend] = (y, torch.autograd.grad(y, leaf, grad_y)[0])
        torch.testing.assert_close(out["cpu"][0], out["reference"][0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out["cpu"][1], out["reference"][1], rtol=1e-12, atol=1e-15)


@needs_cpu
def test_cpu_mask_backward_does_not_keep_its_input_alive():
    leaf = torch.randn(2, 3, 5, 5, requires_grad=True)
    conv_out = leaf * 2.0  # a non-leaf, like a conv output
    alive = weakref.ref(conv_out)
    y = fastexplain.relu_template_mask(conv_out, backend="cpu")
    del conv_out
    gc.collect()
    assert alive() is None, "the mask's autograd node keeps x alive; it needs only the peaks and the keep bits"
    y.sum().backward()
    assert leaf.grad is not None


def _worst_relative_loss_error(scale: float, backend: str, shape=(4, 6, 8, 10), seeds=range(5)) -> float:
    worst = 0.0
    for seed in seeds:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * scale
        exact = fastexplain.filter_loss(x.double(), backend="reference", reduction="none")
        loss = fastexplain.filter_loss(x, backend=backend, reduction="none").double()
        worst = max(worst, float(((loss - exact).abs() / exact.abs()).max()))
    return worst


@needs_cpu
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e4])
def test_cpu_float32_loss_accuracy_does_not_degrade_with_scale(scale):
    """Per filter, relative to float64 on the same float32 inputs, worst of 5 seeds (issue 12: 2.1e-3 at 1e4).

    Filters whose logits can exceed the bound of csrc/filter_loss.cpp are computed in double (≈ 5e-8 here); the
    others stay in float32, whose error on the loss does not grow with the scale (≤ 2e-6 per filter, the
    smallest losses being the hardest; docs/cpu-kernels.md).
    """
    assert _worst_relative_loss_error(scale, "cpu") <= 3e-6


@needs_cpu
def test_cpu_float32_gradient_at_large_scale(monkeypatch):
    """The double forward pass feeds the float32 backward pass; its gradient stays within float32's reach."""
    x = torch.rand(4, 6, 8, 10, generator=torch.Generator().manual_seed(0)) * 1e4
    grads = {}
    for name, dtype, backend in [("exact", torch.float64, "reference"), ("cpu", torch.float32, "cpu"),
                                 ("naive", torch.float32, None)]:
        leaf = x.to(dtype).requires_grad_()
        if backend is None:
            loss = fastexplain.ops.reference.naive_filter_loss_per_filter(leaf, 4.0).sum()
        else:
            loss = fastexplain.filter_loss(leaf, backend=backend)
        (grads[name],) = torch.autograd.grad(loss, leaf)
    exact = grads["exact"]
    ours = float((grads["cpu"].double() - exact).abs().max())
    naive = float((grads["naive"].double() - exact).abs().max())
    if naive != naive:  # the textbook form overflows to NaN at this scale: hold ours to float32's resolution
        naive = 1e-5 * float(exact.abs().max())
    assert ours <= 2 * naive + 1e-6 * float(exact.abs().max()), (ours, naive)


@needs_cpu
@pytest.mark.parametrize("bound", ["0", "1e30"])
def test_cpu_wide_path_forced_on_and_off(monkeypatch, bound):
    """FASTEXPLAIN_CPU_WIDE_BOUND=0 runs every float32 filter in double, a huge bound none: both match float64."""
    monkeypatch.setenv("FASTEXPLAIN_CPU_WIDE_BOUND", bound)
    x = torch.rand(5, 3, 7, 6, generator=torch.Generator().manual_seed(2)) * 50.0
    exact = fastexplain.filter_loss(x.double(), backend="reference", reduction="none")
    leaf = x.clone().requires_grad_()
    loss = fastexplain.filter_loss(leaf, backend="cpu", reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert loss.dtype == torch.float32
    tolerance = 1e-7 if bound == "0" else 3e-6
    assert float(((loss.double() - exact).abs() / exact.abs()).max()) <= tolerance
    reference_leaf = x.double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(fastexplain.filter_loss(reference_leaf, backend="reference"), reference_leaf)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-5 * float(exact_grad.abs().max()))


@needs_cpu
def test_cpu_wide_bound_variable_is_validated(monkeypatch):
    monkeypatch.setenv("FASTEXPLAIN_CPU_WIDE_BOUND", "lots")
    with pytest.raises(ValueError, match="FASTEXPLAIN_CPU_WIDE_BOUND must be a number"):
        fastexplain.filter_loss(torch.rand(2, 1, 3, 3), backend="cpu")


@needs_cpu
@pytest.mark.parametrize("center", ["argmax", "centroid"])
@pytest.mark.parametrize("tau_scale,relu", [(False, True), (True, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_bit_mask_ops(center, tau_scale, relu, channels_last):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(3)) * 3.0 - 1.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ops = torch.ops.fastexplain
    torch.library.opcheck(ops.template_mask_forward_bits.default, (x.requires_grad_(), 4.0, center, tau_scale, relu))
    _, peaks, keep = ops.template_mask_forward_bits(x.detach(), 4.0, center, tau_scale, relu)
    assert keep.dtype == torch.int16 and keep.shape == (2, 3, 3)  # ⌈35 / 16⌉ words per map
    torch.library.opcheck(ops.template_mask_backward_bits.default, (torch.ones_like(x), peaks, keep, 4.0, tau_scale),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cpu
def test_bit_mask_backward_rejects_mismatched_inputs():
    x = torch.rand(2, 3, 4, 4)
    _, peaks, keep = torch.ops.fastexplain.template_mask_forward_bits(x, 4.0, "argmax", False, True)
    with pytest.raises(ValueError, match="grad_y/peaks/keep do not match") as error:
        torch.ops.fastexplain.template_mask_backward_bits(torch.ones(2, 3, 5, 4), peaks, keep, 4.0, False)
    assert "\n" not in str(error.value)


@needs_cpu
@pytest.mark.parametrize("shape", [(32, 2, 16, 16), (33, 3, 9, 7), (48, 2, 14, 14), (17, 1, 28, 27)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_filter_loss_full_vector_tiles(shape, layout):
    """Batches and maps large enough for the kernels' 16×16 register transposes (and their ragged edges)."""
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    exact = x.detach().requires_grad_()
    exact_loss = fastexplain.filter_loss(exact, backend="reference", reduction="none")
    (exact_grad,) = torch.autograd.grad(exact_loss.sum(), exact)
    for dtype in (torch.float32, torch.float64):
        leaf = x.to(dtype).detach().requires_grad_()
        loss = fastexplain.filter_loss(leaf, backend="cpu", reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(loss.double(), exact_loss, rtol=tol, atol=tol * float(exact_loss.abs().max()))
        torch.testing.assert_close(grad.double(), exact_grad, rtol=tol * 10,
                                   atol=tol * float(exact_grad.abs().max()))
