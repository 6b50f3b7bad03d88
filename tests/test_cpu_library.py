"""The C++ ops as torch.library custom ops: opcheck, fake tensors, torch.compile without graph breaks (issue 3)."""
from __future__ import annotations

import pytest
import torch

import fastexplain
from fastexplain.ops._registry import unavailable_reason

UNAVAILABLE = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"C++ backend not built: {UNAVAILABLE}")


def maps(shape, dtype=torch.float32, seed=0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 3.0 - shift).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_filter_loss(dtype):
    x = maps((3, 2, 3, 4), dtype).requires_grad_()
    torch.library.opcheck(torch.ops.fastexplain.filter_loss_forward.default, (x, 4.0))


@pytest.mark.parametrize("center", ["argmax", "centroid"])
@pytest.mark.parametrize("tau_scale,relu", [(False, True), (True, False)])
def test_opcheck_template_mask(center, tau_scale, relu):
    x = maps((2, 3, 4, 5), shift=1.0).requires_grad_()
    torch.library.opcheck(torch.ops.fastexplain.template_mask_forward.default, (x, 4.0, center, tau_scale, relu))


def test_opcheck_backward_ops():
    x = maps((3, 2, 3, 3))
    _, lme, v = torch.ops.fastexplain.filter_loss_forward(x, 4.0)
    torch.library.opcheck(torch.ops.fastexplain.filter_loss_backward.default, (torch.ones(2), x, lme, v, 4.0),
                          test_utils=("test_schema", "test_faketensor"))
    _, peaks = torch.ops.fastexplain.template_mask_forward(x, 4.0, "argmax", False, True)
    torch.library.opcheck(torch.ops.fastexplain.template_mask_backward.default,
                          (torch.ones_like(x), x, peaks, 4.0, False, True), test_utils=("test_schema", "test_faketensor"))


def test_fake_shapes_under_meta_free_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, 4, 6, dtype=torch.float16)
        loss, lme, v = torch.ops.fastexplain.filter_loss_forward(x, 4.0)
        y, peaks = torch.ops.fastexplain.template_mask_forward(x, 4.0, "argmax", False, True)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    assert lme.shape == (3, 2, 25) and v.shape == (3, 5)
    assert y.shape == x.shape and y.dtype == torch.float16 and peaks.shape == (5, 3) and peaks.dtype == torch.int64


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    """conv → relu_template_mask → filter_loss compiles as one graph (no breaks) on CPU and matches eager."""
    torch._dynamo.reset()
    weight = maps((4, 3, 3, 3), seed=1, shift=1.5)

    def step(image: torch.Tensor) -> torch.Tensor:
        conv = torch.nn.functional.conv2d(image, weight, padding=1)
        masked = fastexplain.relu_template_mask(conv, backend="cpu")
        return fastexplain.filter_loss(torch.relu(conv), backend="cpu") + masked.square().mean()

    image = maps((5, 3, 6, 7), seed=2)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    eager_input = image.clone().requires_grad_()
    compiled_input = image.clone().requires_grad_()
    eager = step(eager_input)
    result = compiled(compiled_input)
    torch.testing.assert_close(result, eager)
    eager.backward()
    result.backward()
    torch.testing.assert_close(compiled_input.grad, eager_input.grad)
    if compiler != "aot_eager":
        return
    explanation = torch._dynamo.explain(step)(image)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
