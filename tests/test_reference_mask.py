"""The reference template mask (docs/method.md §3) against loops written from the spec."""
import pytest
import torch

import fastexplain
from fastexplain.templates import template_tau

REF = dict(backend="reference")


def loop_mask(x: torch.Tensor, center: str, beta: float = 4.0, scale=None, relu=False) -> torch.Tensor:
    x = torch.relu(x) if relu else x
    B, C, H, W = x.shape
    n = max(H, W)
    y = torch.zeros_like(x)
    for b in range(B):
        for c in range(C):
            m = x[b, c]
            if center == "argmax":
                best, mu = None, (0, 0)
                for r in range(H):
                    for col in range(W):
                        if best is None or float(m[r, col]) > best:
                            best, mu = float(m[r, col]), (r, col)
            else:
                total = float(m.sum())
                if total > 0:
                    rr = sum(r * float(m[r, col]) for r in range(H) for col in range(W)) / total
                    cc = sum(col * float(m[r, col]) for r in range(H) for col in range(W)) / total
                    mu = (min(max(int(rr + 0.5), 0), H - 1), min(max(int(cc + 0.5), 0), W - 1))
                else:
                    mu = (0, 0)
            for r in range(H):
                for col in range(W):
                    d = abs(r - mu[0]) + abs(col - mu[1])
                    weight = max(1 - beta * d / n, -1.0) * (template_tau(H, W) if scale == "tau" else 1.0)
                    y[b, c, r, col] = max(float(m[r, col]) * weight, 0.0)
    return y


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (1, 2, 7, 3), (3, 1, 6, 6)])
@pytest.mark.parametrize("center", ["argmax", "centroid"])
@pytest.mark.parametrize("scale", [None, "tau"])
def test_mask_matches_loops(shape, center, scale):
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 0.2
    got = fastexplain.template_mask(x.clamp_min(0), center=center, scale=scale, **REF)
    assert torch.allclose(got, loop_mask(x.clamp_min(0), center, scale=scale), atol=1e-14)
    fused = fastexplain.relu_template_mask(x, center=center, scale=scale, **REF)
    assert torch.allclose(fused, loop_mask(x, center, scale=scale, relu=True), atol=1e-14)


def test_argmax_ties_go_to_the_first_position_in_row_major_order():
    x = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 1.0
    y = fastexplain.template_mask(x, **REF)
    assert float(y[0, 0, 1, 2]) == 1.0 and float(y[0, 0, 2, 0]) == 0.0


def test_all_zero_map_gives_all_zero_output():
    for center in ("argmax", "centroid"):
        assert torch.equal(fastexplain.template_mask(torch.zeros(2, 3, 5, 4), center=center, **REF),
                           torch.zeros(2, 3, 5, 4))
        assert torch.equal(fastexplain.relu_template_mask(-torch.rand(2, 3, 5, 4), center=center, **REF),
                           torch.zeros(2, 3, 5, 4))


def test_backward_treats_the_mask_as_a_constant():
    x = (torch.rand(2, 3, 5, 6, dtype=torch.float64) - 0.3).requires_grad_()
    grad_out = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y = fastexplain.relu_template_mask(x, **REF)
    (dx,) = torch.autograd.grad(y, x, grad_out)
    with torch.no_grad():
        peaks = torch.relu(x).flatten(2).argmax(2)
        H, W, n = 5, 6, 6
        r = torch.arange(H).repeat_interleave(W)
        c = torch.arange(W).repeat(H)
        d = (r - r[peaks][..., None]).abs() + (c - c[peaks][..., None]).abs()
        mask = torch.clamp(1 - 4 * d.double() / n, min=-1).reshape_as(x)
        expected = grad_out * mask * ((torch.relu(x) * mask) > 0)
    assert torch.allclose(dx, expected, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mask_keeps_dtype_and_layout_semantics(dtype):
    x = torch.rand(2, 3, 5, 7).to(dtype)
    y = fastexplain.template_mask(x, **REF)
    assert y.dtype == dtype and y.shape == x.shape
    cl = fastexplain.template_mask(x.to(memory_format=torch.channels_last), **REF)
    assert torch.equal(cl, y)
