"""The reference filter loss and mask: the project's ground truth (docs/method.md §2–3)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastexplain
from fastexplain.ops import reference
from fastexplain.templates import template_priors
from oracle import oracle_filter_loss

REF = dict(backend="reference")
GRADCHECK_SHAPES = [(2, 1, 3, 3), (3, 2, 2, 4), (4, 1, 5, 3), (5, 2, 4, 4), (2, 3, 1, 1), (3, 1, 1, 4)]


def random_maps(shape, scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_filter_loss_gradcheck(shape, scale):
    x = random_maps(shape, scale, seed=sum(shape)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastexplain.filter_loss(t, reduction="none", **REF), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fastexplain.filter_loss(t, **REF), (x,))


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
@pytest.mark.parametrize("center", ["argmax", "centroid"])
@pytest.mark.parametrize("scale", [None, "tau"])
def test_template_mask_gradcheck(shape, center, scale):
    x = (random_maps(shape, seed=len(shape)) - 0.3).requires_grad_()
    for op in (fastexplain.template_mask, fastexplain.relu_template_mask):
        assert torch.autograd.gradcheck(lambda t: op(t, center=center, scale=scale, **REF), (x,))


@pytest.mark.parametrize("B,C,H,W", [(1, 1, 1, 1), (2, 2, 2, 3), (3, 2, 3, 3), (4, 1, 2, 4), (3, 1, 4, 1)])
@pytest.mark.parametrize("scale", [0.5, 20.0])
def test_filter_loss_equals_slow_oracle(B, C, H, W, scale):
    x = random_maps((B, C, H, W), scale, seed=B * 7 + H)
    loss = fastexplain.filter_loss(x, reduction="none", **REF)
    for c in range(C):
        maps = [x[b, c].flatten().tolist() for b in range(B)]
        assert float(loss[c]) == pytest.approx(oracle_filter_loss(maps, H, W), abs=1e-10, rel=1e-10)


def test_naive_form_equals_the_centred_form_in_float64():
    x = random_maps((6, 3, 5, 4), 3.0)
    assert torch.allclose(reference.naive_filter_loss_per_filter(x, 4.0), reference.filter_loss_per_filter(x, 4.0),
                          rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("B,H,W", [(2, 3, 3), (5, 4, 6), (16, 7, 7), (64, 2, 2)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 100.0, 1e4])
def test_mutual_information_bounds(B, H, W, scale):
    x = random_maps((B, 4, H, W), scale)
    mi = -fastexplain.filter_loss(x, reduction="none", **REF)
    assert torch.all(mi >= -1e-12)
    assert torch.all(mi <= min(math.log(H * W + 1), math.log(B)) + 1e-9)


def test_mi_approaches_log_b_for_maps_that_peak_in_distinct_places():
    B, H, W = 9, 3, 3
    x = torch.zeros(B, 1, H, W, dtype=torch.float64)
    for b in range(B):
        x[b, 0, b // 3, b % 3] = 5e4
    mi = -float(fastexplain.filter_loss(x, **REF))
    assert mi == pytest.approx(math.log(B) * H * W / (H * W + 1), rel=1e-3)


def test_single_image_gives_zero_loss_and_zero_gradient():
    x = random_maps((1, 3, 5, 5), 10.0).requires_grad_()
    loss = fastexplain.filter_loss(x, **REF)
    loss.backward()
    loss = loss.detach()
    assert abs(loss.item()) < 1e-12
    assert float(x.grad.abs().max()) < 1e-12


def test_identical_maps_give_zero_loss():
    x = random_maps((1, 2, 4, 4), 5.0).expand(6, 2, 4, 4).contiguous()
    assert abs(float(fastexplain.filter_loss(x, **REF))) < 1e-12


def decomposition(x: torch.Tensor) -> torch.Tensor:
    """−MI = −H(T) + H(T′|X) + Σ_x p(T⁺, x)·H(T⁺ | X = x) (docs/method.md §2, [ICNN] with the signs fixed)."""
    B, C, H, W = x.shape
    s = reference.template_logits(x, 4.0)                                   # [C, B, T]
    q = torch.softmax(s, dim=1)
    priors = template_priors(H, W, dtype=x.dtype)
    joint = priors * q                                                      # p(T_t, x_b)
    p_x = joint.sum(dim=2)
    entropy_t = -(priors * priors.log()).sum()
    p_neg, p_pos = joint[..., 0], joint[..., 1:].sum(dim=2)
    h_prime = -sum(p * torch.log(p / p_x) for p in (p_neg, p_pos)).sum(dim=1)
    within = joint[..., 1:] / p_pos[..., None]
    h_pos = -(within * within.log()).sum(dim=2)
    return -entropy_t + h_prime + (p_pos * h_pos).sum(dim=1)


@pytest.mark.parametrize("shape,scale", [((4, 3, 3, 3), 1.0), ((7, 2, 5, 4), 50.0), ((3, 1, 6, 6), 300.0)])
def test_decomposition_identity(shape, scale):
    x = random_maps(shape, scale)
    expected = decomposition(x)
    assert torch.allclose(fastexplain.filter_loss(x, reduction="none", **REF), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("shape", [(16, 8, 14, 14), (2, 8, 7, 5), (5, 8, 13, 13), (64, 4, 14, 14)])
def test_float32_loss_within_1e4_relative_of_float64(shape, scale):
    x = random_maps(shape, scale)
    exact = fastexplain.filter_loss(x, reduction="none", **REF)
    single = fastexplain.filter_loss(x.float(), reduction="none", **REF).double()
    assert single.dtype == torch.float64
    assert float(((single - exact).abs() / exact.abs()).max()) < 1e-4


def test_naive_float32_is_what_the_centred_form_improves_on():
    x = random_maps((16, 8, 14, 14), 1.0)
    exact = reference.filter_loss_per_filter(x, 4.0)
    naive = reference.naive_filter_loss_per_filter(x.float(), 4.0).double()
    centred = reference.filter_loss_per_filter(x.float(), 4.0).double()
    naive_error = float(((naive - exact).abs() / exact.abs()).max())
    centred_error = float(((centred - exact).abs() / exact.abs()).max())
    assert naive_error > 1e-3 and centred_error < naive_error / 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean_activation", [1e3, 1e4])
def test_large_activations_give_finite_loss_and_gradient(dtype, mean_activation):
    x = (random_maps((8, 3, 7, 7), 2 * mean_activation)).to(dtype).requires_grad_()
    loss = fastexplain.filter_loss(x, **REF)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all()
    assert x.grad.dtype == dtype
    exact = fastexplain.filter_loss(x.detach().double(), **REF)
    assert float(loss.detach()) == pytest.approx(float(exact), rel=1e-3)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(reduction):
    x = random_maps((4, 5, 3, 3), 10.0)
    per_filter = fastexplain.filter_loss(x, reduction="none", **REF)
    out = fastexplain.filter_loss(x, reduction=reduction, **REF)
    expected = {"sum": per_filter.sum(), "mean": per_filter.mean(), "none": per_filter}[reduction]
    assert out.shape == expected.shape and torch.allclose(out, expected)


def test_layout_does_not_change_the_loss():
    x = random_maps((5, 6, 4, 7), 3.0)
    loss = fastexplain.filter_loss(x, reduction="none", **REF)
    channels_last = x.to(memory_format=torch.channels_last)
    strided = random_maps((5, 6, 7, 4), 3.0).transpose(2, 3)
    assert torch.allclose(fastexplain.filter_loss(channels_last, reduction="none", **REF), loss, rtol=1e-12)
    assert torch.allclose(fastexplain.filter_loss(strided, reduction="none", **REF),
                          fastexplain.filter_loss(strided.contiguous(), reduction="none", **REF), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), C=st.integers(1, 3), H=st.integers(1, 6), W=st.integers(1, 6),
       log_scale=st.floats(-2, 4), seed=st.integers(0, 2**16))
def test_property_bounds_and_float32_accuracy(B, C, H, W, log_scale, seed):
    x = random_maps((B, C, H, W), 10 ** log_scale, seed=seed)
    exact = fastexplain.filter_loss(x, reduction="none", **REF)
    mi = -exact
    assert torch.all(mi >= -1e-12) and torch.all(mi <= min(math.log(H * W + 1), math.log(B)) + 1e-9)
    rounded = x.float()  # judge float32 arithmetic, not the rounding of the input itself
    exact_rounded = fastexplain.filter_loss(rounded.double(), reduction="none", **REF)
    single = fastexplain.filter_loss(rounded, reduction="none", **REF).double()
    # When one image owns every template (large activations, tiny maps) MI is a difference of O(log B)
    # terms that cancel far below float32 resolution: there only an absolute error of a few ulps is possible.
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, math.log(B))
    assert torch.all((single - exact_rounded).abs() <= 1e-4 * exact_rounded.abs() + floor)
