"""The fused forward + gradient of the CPU filter loss (issue 12) and the second derivatives of the CPU ops."""
from __future__ import annotations

import pytest
import torch

import fastexplain
from fastexplain.ops._registry import unavailable_reason

UNAVAILABLE = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"C++ backend not built: {UNAVAILABLE}")


def maps(shape, dtype=torch.float64, scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def two_op_gradient(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and gradient through filter_loss_forward + filter_loss_backward (the path without the fused op)."""
    ops = torch.ops.fastexplain
    loss, lme, v = ops.filter_loss_forward(x, 4.0)
    return loss, ops.filter_loss_backward(grad, x, lme, v, 4.0)


def fused_gradient(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    loss = fastexplain.filter_loss(x, reduction="none", backend="cpu")
    (dx,) = torch.autograd.grad(loss, x, grad)
    return loss.detach(), dx


def op_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_fused_ops(dtype):
    x = maps((3, 2, 3, 4), dtype).requires_grad_()
    # Not test_aot_dispatch_dynamic: eager autograd scales the op's second output (dloss/dx) in place in the backward
    # pass (its documented contract: the buffer belongs to autograd), which that test reads afterwards. The compiled
    # path is checked below and in test_cpu_library.py.
    torch.library.opcheck(torch.ops.fastexplain.filter_loss_forward_grad.default, (x, 4.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    _, dloss_dx = torch.ops.fastexplain.filter_loss_forward_grad(x.detach(), 4.0)
    torch.library.opcheck(torch.ops.fastexplain.filter_loss_backward_from_grad.default,
                          (torch.rand(2, dtype=dtype), dloss_dx, dtype), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 7, 6), (17, 2, 13, 13), (3, 4, 28, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fused_path_matches_the_two_op_path(shape, dtype):
    x = maps(shape, dtype, seed=sum(shape))
    grad = torch.linspace(-2.0, 3.0, shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss, dx = fused_gradient(x, grad)
    ref_loss, ref_dx = two_op_gradient(x, grad)
    assert dx.dtype == dtype and dx.shape == x.shape and loss.dtype == ref_loss.dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol * 1e-3)
    # float32: u and q differ by a few ulp between the paths (q from the forward's expm1, not a recomputed one)
    ulp = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = float(ref_dx.double().abs().max()) + 1e-300
    assert float((dx.double() - ref_dx.double()).abs().max()) <= ulp * scale


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_fused_path_strided_and_wide(layout, monkeypatch):
    base = maps((6, 3, 9, 8), torch.float32, scale=1e4, seed=5)  # large activations: the double-precision path
    x = {"channels_last": base.to(memory_format=torch.channels_last),
         "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
         "sliced": maps((12, 6, 9, 16), torch.float32, scale=1e4, seed=5)[::2, ::2, :, ::2]}[layout]
    assert not x.is_contiguous()
    grad = torch.ones(3)
    loss, dx = fused_gradient(x, grad)
    ref_loss, ref_dx = fused_gradient(x.double(), grad.double())
    assert float(((loss.double() - ref_loss) / ref_loss.abs().clamp_min(1e-30)).abs().max()) < 3e-6
    assert float((dx.double() - ref_dx).abs().max()) <= 1e-5 * float(ref_dx.abs().max())


def test_fused_op_runs_only_when_a_gradient_is_needed():
    x = maps((4, 3, 5, 5), torch.float32)
    with_grad = op_names(lambda: fastexplain.filter_loss(x.clone().requires_grad_(), backend="cpu").backward())
    assert "fastexplain::filter_loss_forward_grad" in with_grad and "fastexplain::filter_loss_forward" not in with_grad
    for no_grad_call in (lambda: fastexplain.filter_loss(x, backend="cpu"),
                         lambda: torch.no_grad()(fastexplain.filter_loss)(x.clone().requires_grad_(), backend="cpu")):
        names = op_names(no_grad_call)
        assert "fastexplain::filter_loss_forward" in names and "fastexplain::filter_loss_forward_grad" not in names


def test_fused_gradient_survives_retain_graph_and_gradcheck():
    x = maps((3, 2, 3, 4), scale=5.0, seed=3).requires_grad_()
    loss = fastexplain.filter_loss(x, reduction="none", backend="cpu")
    first, = torch.autograd.grad(loss, x, torch.tensor([1.0, 2.0], dtype=torch.float64), retain_graph=True)
    second, = torch.autograd.grad(loss, x, torch.tensor([3.0, 0.5], dtype=torch.float64))
    ref = fused_gradient(x, torch.tensor([3.0, 0.5], dtype=torch.float64))[1]
    # The first pass scaled the saved gradient in place; the second recomputes it from x (the two-op path).
    torch.testing.assert_close(second, ref, rtol=1e-10, atol=1e-14 * float(ref.abs().max()))
    torch.testing.assert_close(first, fused_gradient(x, torch.tensor([1.0, 2.0], dtype=torch.float64))[1],
                               rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: fastexplain.filter_loss(t, reduction="none", backend="cpu"), (x,))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fused_gradient_matches_eager_twice(compiler):
    """Under torch.compile the saved gradient is scaled out of place: two backward passes give the right answers."""
    torch._dynamo.reset()
    x = maps((5, 3, 6, 7), seed=4)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    compiled = torch.compile(lambda t: fastexplain.filter_loss(t, reduction="none", backend="cpu"), fullgraph=True,
                             backend=compiler)
    for fn in (compiled, lambda t: fastexplain.filter_loss(t, reduction="none", backend="reference")):
        t = x.clone().requires_grad_()
        loss = fn(t)
        first, = torch.autograd.grad(loss, t, weights, retain_graph=True)
        second, = torch.autograd.grad(loss, t, 2 * weights)
        if fn is compiled:
            results = (first, second)
    torch.testing.assert_close(results[0], first, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(results[1], second, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("fused", [True, False])
def test_filter_loss_double_backward_raises(fused):
    x = maps((4, 3, 5, 5)).requires_grad_()
    loss = (fastexplain.filter_loss(x, backend="cpu") if fused
            else torch.ops.fastexplain.filter_loss_forward(x, 4.0)[0].sum())
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative.*backend='reference'"):
        torch.autograd.grad(dx.square().sum(), x)


@pytest.mark.parametrize("op", [fastexplain.template_mask, fastexplain.relu_template_mask])
def test_mask_double_backward_matches_reference(op):
    """The mask's backward is linear in grad_y: its derivative was silently zero before (PyTorch's fallback)."""
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: op(t, backend="cpu"), (x,))
    results = []
    for backend in ("cpu", "reference"):
        (dx,) = torch.autograd.grad(op(x, backend=backend).square().sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.sum(), x)
        results.append(ddx)
    assert results[1].abs().max() > 0
    torch.testing.assert_close(results[0], results[1])


def test_raw_mask_backward_double_backward():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    _, peaks = torch.ops.fastexplain.template_mask_forward(x, 4.0, "argmax", False, True)
    assert torch.autograd.gradgradcheck(
        lambda g: torch.ops.fastexplain.template_mask_backward(g, x, peaks, 4.0, False, True),
        (torch.randn_like(x).requires_grad_(),))


def test_fused_step_allocates_one_map():
    """Forward + backward allocate one map-sized tensor (dloss/dx, scaled in place into x.grad): no copy, and no map
    of zeros for the gradient of the op's second output."""
    x = maps((8, 16, 9, 9), torch.float32).requires_grad_()
    fastexplain.filter_loss(x, backend="cpu").backward()  # warm-up: build and load outside the profile
    x.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fastexplain.filter_loss(x, backend="cpu").backward()
    big = [event.nbytes() for event in prof.profiler.kineto_results.events()
           if event.name() == "[memory]" and event.nbytes() >= x.nbytes // 2]
    assert len(big) == 1, big
    torch.testing.assert_close(x.grad, fused_gradient(x, torch.ones(16))[1])


@pytest.mark.parametrize("batch", [16, 32, 48, 64])
@pytest.mark.parametrize("maps_kind", ["random", "tied", "one_hot"])
def test_register_rows_match_the_float64_reference(batch, maps_kind):
    """B = 16, 32, 48, 64 take the gradient's register-resident template rows (both paths); the general loop and
    float64 are the yardsticks, with ties in u (identical images) and one image owning each template."""
    x = maps((batch, 3, 5, 7), torch.float32, seed=batch)
    if maps_kind == "tied":
        x[batch // 2:] = x[: batch - batch // 2]
    elif maps_kind == "one_hot":
        x = torch.zeros_like(x)
        x[batch - 3, :, 2, 4] = 50.0
    grad = torch.tensor([1.0, -0.5, 2.0])
    expected_loss = fastexplain.filter_loss(x.double(), reduction="none", backend="reference")
    xd = x.double().requires_grad_()
    (expected_dx,) = torch.autograd.grad(fastexplain.filter_loss(xd, reduction="none", backend="reference"), xd,
                                         grad.double())
    scale = float(expected_dx.abs().max()) + 1e-30
    for loss, dx in (fused_gradient(x, grad), two_op_gradient(x, grad)):
        assert torch.isfinite(dx).all()
        torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=1e-7)
        assert float((dx.double() - expected_dx).abs().max()) <= 2e-5 * scale
