"""The fused C++ CPU kernels against the plain-PyTorch reference (issue 3, docs/method.md §2–3)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastexplain
from fastexplain.ops import BackendUnavailable, _registry, reference
from fastexplain.ops._checks import negative_message, nonfinite_message


UNAVAILABLE = _registry.unavailable_reason("cpu")
needs_cpu = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"C++ backend not built: {UNAVAILABLE}")
CPU = dict(backend="cpu")
EDGE_SIZES = [1, 2, 3, 7, 13, 14, 28]


def test_cpu_backend_is_available_in_ci():
    """CI builds the extension; an unavailable backend there is a failure, not a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert UNAVAILABLE is None, UNAVAILABLE
    elif UNAVAILABLE is not None:
        pytest.skip(f"C++ backend not built here: {UNAVAILABLE}")
    assert fastexplain.ops.selected_backend(torch.zeros(1, 1, 1, 1)) in ("cpu", "reference")


def random_maps(shape, scale=1.0, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def loss_and_grad(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    loss = fastexplain.filter_loss(x, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- filter loss ---------------------------------------


@needs_cpu
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_filter_loss_float64_matches_reference(n):
    H, W = n, max(1, n - 1) if n > 1 else 1
    for shape in [(1, 1, H, W), (5, 2, H, W), (3, 2, W, H)]:
        x = random_maps(shape, scale=3.0, seed=n)
        ref_loss, ref_grad = loss_and_grad(x, backend="reference")
        loss, grad = loss_and_grad(x, **CPU)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-14 * float(ref_grad.abs().max()) + 1e-300)


@needs_cpu
@pytest.mark.parametrize("n", EDGE_SIZES)
@pytest.mark.parametrize("scale", [1.0, 50.0, 1e4])
def test_filter_loss_float32_accuracy(n, scale):
    """Loss within 1e-4 relative of float64; gradient error ≤ 2× the naive float32 reference's (docs/method.md §2)."""
    H, W = n, n + 1
    x64 = random_maps((6, 2, H, W), scale=scale, seed=n)
    exact_loss, exact_grad = loss_and_grad(x64, backend="reference")
    loss, grad = loss_and_grad(x64.float(), **CPU)
    assert loss.dtype == torch.float32
    assert relative(loss, exact_loss) <= 1e-4 or float((loss.double() - exact_loss).abs().max()) < 1e-9
    x32 = x64.float().requires_grad_()
    (naive_grad,) = torch.autograd.grad(reference.naive_filter_loss_per_filter(x32, 4.0).sum(), x32)
    ours = float((grad.double() - exact_grad).abs().max())
    naive = float((naive_grad.double() - exact_grad).abs().max())
    if naive != naive:  # the naive form overflowed to NaN: ours must still be close
        naive = float(exact_grad.abs().max()) * 1e-4
    # float32 can only resolve the gradient to a few ulp of its largest entry, and of its natural unit τ/B
    # (one image moving one template's log-probability by 1): below that floor both forms are "exact".
    tau_over_batch = 0.5 / (H * W) / x64.shape[0]
    scale_floor = 1e-6 * float(exact_grad.abs().max()) + 2.0**-23 * tau_over_batch
    assert ours <= 2 * naive + scale_floor, (ours, naive)


@needs_cpu
@pytest.mark.parametrize("method", ["direct", "prefix"])
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.5, 4.0, 7.0, 40.0])
def test_both_pyramid_correlations_match_reference(monkeypatch, method, beta):
    """The sparse stencil and the prefix-sum (rotated summed-area) pyramid give the reference's loss and gradient."""
    monkeypatch.setenv("FASTEXPLAIN_CPU_PYRAMID", method)
    for shape in [(3, 2, 1, 1), (3, 1, 2, 5), (4, 2, 7, 7), (3, 1, 13, 9), (2, 1, 14, 14), (2, 1, 28, 27)]:
        x = random_maps(shape, scale=3.0, seed=int(beta * 10) + shape[2])
        ref_loss, ref_grad = loss_and_grad(x, beta=beta, backend="reference")
        loss, grad = loss_and_grad(x, beta=beta, **CPU)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12 * float(ref_grad.abs().max()))


@needs_cpu
def test_pyramid_method_variable_is_validated(monkeypatch):
    monkeypatch.setenv("FASTEXPLAIN_CPU_PYRAMID", "fastest")
    with pytest.raises(ValueError, match="FASTEXPLAIN_CPU_PYRAMID must be 'auto', 'direct' or 'prefix'"):
        fastexplain.filter_loss(random_maps((2, 1, 3, 3)), **CPU)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_filter_loss_low_precision_inputs_compute_in_float32(dtype):
    x = random_maps((8, 3, 5, 6), scale=4.0, dtype=dtype, seed=1)
    ref_loss, ref_grad = loss_and_grad(x, backend="reference")
    loss, grad = loss_and_grad(x, **CPU)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-9)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * float(ref_grad.abs().max()))


@needs_cpu
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_filter_loss_strided_inputs(layout):
    base = random_maps((4, 3, 6, 5), scale=2.0, seed=2)
    if layout == "transposed":
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    else:
        x = random_maps((8, 6, 6, 10), scale=2.0, seed=2)[::2, ::2, :, ::2]
    assert not x.is_contiguous()
    ref_loss, ref_grad = loss_and_grad(x, backend="reference")
    loss, grad = loss_and_grad(x, **CPU)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-14)


@needs_cpu
def test_filter_loss_gradcheck_and_reductions():
    x = random_maps((3, 2, 3, 4), scale=5.0, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastexplain.filter_loss(t, reduction="none", **CPU), (x,))
    per_filter = fastexplain.filter_loss(x, reduction="none", **CPU)
    torch.testing.assert_close(fastexplain.filter_loss(x, **CPU), per_filter.sum())
    torch.testing.assert_close(fastexplain.filter_loss(x, reduction="mean", **CPU), per_filter.mean())


@needs_cpu
def test_filter_loss_single_image_is_zero_with_zero_gradient():
    loss, grad = loss_and_grad(random_maps((1, 4, 5, 5), seed=4), **CPU)
    assert torch.all(loss == 0) and torch.all(grad == 0)


@needs_cpu
@settings(max_examples=300, deadline=None)
@given(B=st.integers(1, 6), C=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7),
       beta=st.sampled_from([1.0, 2.5, 4.0, 7.0]), scale=st.sampled_from([0.1, 1.0, 30.0, 500.0]),
       sparsity=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_filter_loss_fuzz(B, C, H, W, beta, scale, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((B, C, H, W), generator=g, dtype=torch.float64) * scale
    x = x * (torch.rand(x.shape, generator=g, dtype=torch.float64) >= sparsity)
    ref_loss, ref_grad = loss_and_grad(x, beta=beta, backend="reference")
    loss, grad = loss_and_grad(x, beta=beta, **CPU)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-12 * (1.0 + float(ref_grad.abs().max())))


# ---------------------------------------------------------------- template mask -------------------------------------

MASK_OPS = [fastexplain.template_mask, fastexplain.relu_template_mask]


def mask_and_grad(op, x: torch.Tensor, grad_y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = op(x, **kwargs)
    (grad,) = torch.autograd.grad(y, x, grad_y)
    return y.detach(), grad


@needs_cpu
@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("center", ["argmax", "centroid"])
@pytest.mark.parametrize("scale", [None, "tau"])
@pytest.mark.parametrize("n", EDGE_SIZES)
def test_mask_matches_reference(op, center, scale, n):
    H, W = n, n + 2
    x = random_maps((3, 2, H, W), scale=4.0, seed=n) - 1.0
    grad_y = random_maps(x.shape, seed=n + 1) - 0.5
    ref_y, ref_grad = mask_and_grad(op, x, grad_y, center=center, scale=scale, backend="reference")
    y, grad = mask_and_grad(op, x, grad_y, center=center, scale=scale, **CPU)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 16), (16, 17), (1, 300)])
def test_mask_table_and_inline_paths(dtype, shape):
    """Maps of ≤ 256 positions take their mask from a per-call table, larger ones compute it inline; both match
    the reference, with all-negative maps (peak 0 after the ReLU) and late first maxima among the cases."""
    H, W = shape
    x = (random_maps((3, 4, H, W), scale=4.0, seed=H + W) - 1.0).to(dtype)
    x[0, 0] = -1.0 - x[0, 0].abs()  # all negative
    x[1, 1] = 0.5
    x[1, 1, H - 1, W - 1] = 2.0  # the maximum at the last position
    grad_y = (random_maps(x.shape, seed=3) - 0.5).to(dtype)
    # The mask 1 − β·d/n is rounded differently from the reference's, which matters only where it is ≈ 0.
    tol = {torch.float32: 2e-6, torch.float64: 1e-14}[dtype]
    for op in MASK_OPS:
        for scale in (None, "tau"):
            ref_y, ref_grad = mask_and_grad(op, x, grad_y, scale=scale, backend="reference")
            y, grad = mask_and_grad(op, x, grad_y, scale=scale, **CPU)
            torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)
            torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_mask_dtypes_and_layouts(dtype, layout):
    x = (random_maps((4, 3, 6, 10), scale=8.0, seed=5) - 2.0).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, :, ::2]
    grad_y = (random_maps(x.shape, seed=6) - 0.5).to(dtype)
    for op in MASK_OPS:
        ref_y, ref_grad = mask_and_grad(op, x, grad_y, backend="reference")
        y, grad = mask_and_grad(op, x, grad_y, **CPU)
        assert y.dtype == dtype and grad.dtype == dtype and y.shape == x.shape
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
        torch.testing.assert_close(y.float(), ref_y.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)


@needs_cpu
def test_mask_ties_zero_maps_and_peaks():
    x = torch.zeros(2, 2, 4, 5)
    x[0, 0, 1, 1] = x[0, 0, 2, 3] = 3.0       # tie: the first in row-major order wins
    x[1, 1] = -1.0                             # all negative: relu gives an all-zero map, peak 0
    y, peaks = torch.ops.fastexplain.template_mask_forward(x, 4.0, "argmax", False, True)
    assert peaks.dtype == torch.int64 and peaks.shape == (2, 2)
    assert peaks[0, 0] == 1 * 5 + 1 and peaks[0, 1] == 0 and peaks[1, 1] == 0
    assert torch.all(y[1] == 0)
    _, centroid_peaks = torch.ops.fastexplain.template_mask_forward(x, 4.0, "centroid", False, True)
    assert centroid_peaks[0, 0] == 2 * 5 + 2 and centroid_peaks[1, 1] == 0  # (1.5, 2) rounds half up


@needs_cpu
@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 4), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9),
       center=st.sampled_from(["argmax", "centroid"]), scale=st.sampled_from([None, "tau"]),
       relu=st.booleans(), beta=st.sampled_from([1.0, 4.0, 6.5]), seed=st.integers(0, 2**16))
def test_mask_fuzz(B, C, H, W, center, scale, relu, beta, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, C, H, W), generator=g, dtype=torch.float64)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    op = MASK_OPS[relu]
    ref_y, ref_grad = mask_and_grad(op, x, grad_y, beta=beta, center=center, scale=scale, backend="reference")
    y, grad = mask_and_grad(op, x, grad_y, beta=beta, center=center, scale=scale, **CPU)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- errors -------------------------------------------


@needs_cpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_raise(bad):
    x = random_maps((2, 3, 4, 4), seed=7)
    x[1, 2, 3, 0] = bad
    for op, name in [(fastexplain.filter_loss, "filter_loss"), (fastexplain.template_mask, "template_mask"),
                     (fastexplain.relu_template_mask, "relu_template_mask")]:
        with pytest.raises(ValueError) as error:
            op(x, **CPU)
        assert str(error.value) == nonfinite_message(name)


@needs_cpu
def test_negative_input_to_filter_loss_raises():
    x = random_maps((2, 3, 4, 4), seed=8)
    x[0, 1, 2, 2] = -1e-3
    with pytest.raises(ValueError) as error:
        fastexplain.filter_loss(x.float(), **CPU)
    assert str(error.value) == negative_message("filter_loss")


@needs_cpu
def test_nan_takes_precedence_over_negative():
    x = random_maps((2, 3, 4, 4), seed=9)
    x[0, 0, 0, 0] = -1.0
    x[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError) as error:
        fastexplain.filter_loss(x, **CPU)
    assert str(error.value) == nonfinite_message("filter_loss")


@needs_cpu
def test_raw_op_argument_errors():
    ops = torch.ops.fastexplain
    with pytest.raises(ValueError, match="4-D tensor"):
        ops.filter_loss_forward(torch.rand(2, 3, 4), 4.0)
    with pytest.raises(ValueError, match="empty tensor"):
        ops.filter_loss_forward(torch.rand(0, 3, 4, 4), 4.0)
    with pytest.raises(TypeError, match="floating-point"):
        ops.filter_loss_forward(torch.ones(2, 3, 4, 4, dtype=torch.int32), 4.0)
    with pytest.raises(ValueError, match="beta must be a finite positive number"):
        ops.filter_loss_forward(torch.rand(2, 3, 4, 4), -1.0)
    with pytest.raises(ValueError, match="do not match x"):
        ops.filter_loss_backward(torch.ones(2), torch.rand(2, 3, 4, 4), torch.ones(3, 2, 17), torch.ones(3, 2), 4.0)
    with pytest.raises(ValueError, match="center must be 'argmax' or 'centroid'"):
        ops.template_mask_forward(torch.rand(2, 3, 4, 4), 4.0, "middle", False, False)
    with pytest.raises(ValueError, match="do not match x"):
        ops.template_mask_backward(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.zeros(5, dtype=torch.int64),
                                   4.0, False, False)


@needs_cpu
def test_backend_refuses_cuda_or_meta_tensors():
    with pytest.raises(ValueError, match="backend 'cpu' runs on"):
        fastexplain.filter_loss(torch.rand(2, 2, 3, 3, device="meta"), backend="cpu")


def test_unavailable_build_reports_reason_and_warns_once(monkeypatch, tmp_path):
    """Missing sources (a non-editable install) give BackendUnavailable with the reason and one warning."""
    from fastexplain.ops import cpu

    monkeypatch.setattr(cpu, "SOURCE_DIR", tmp_path)
    with pytest.warns(RuntimeWarning, match="not found") as record:
        with pytest.raises(BackendUnavailable, match=r"C\+\+ sources .* not found"):
            cpu.load_backend()
    assert len(record) == 1


@pytest.mark.skipif(not os.path.exists("/bin/false"), reason="needs /bin/false to stand in for a broken compiler")
def test_failed_build_falls_back_to_reference_with_one_warning(tmp_path):
    """A compiler that fails: the package still works on the reference, warns once, and `info` says why."""
    import subprocess
    import sys

    script = (
        "import warnings, torch, fastexplain\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    x = torch.rand(3, 2, 4, 4)\n"
        "    fastexplain.filter_loss(x); fastexplain.filter_loss(x)\n"
        "    reason = fastexplain.ops.availability()['cpu']\n"
        "print(fastexplain.ops.selected_backend(x))\n"
        "print(sum('backend \\'cpu\\' is unavailable' in str(w.message) for w in caught))\n"
        "print(reason)\n"
    )
    env = dict(os.environ, CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path), FASTEXPLAIN_BACKEND="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    backend, warnings_seen, reason = result.stdout.strip().splitlines()[-3:]
    assert backend == "reference" and warnings_seen == "1"
    assert "building the C++ extension" in reason and "failed" in reason
