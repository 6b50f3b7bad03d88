import math

import pytest
import torch

from fastexplain import part_templates, template_alpha, template_entropy, template_priors, template_tau
from oracle import oracle_templates

SHAPES = [(1, 1), (1, 3), (2, 2), (3, 5), (7, 7), (6, 4), (14, 14)]


@pytest.mark.parametrize("H,W", SHAPES)
def test_templates_match_the_formula(H, W):
    T = part_templates(H, W, dtype=torch.float64)
    assert T.shape == (H * W + 1, H, W)
    assert torch.allclose(T.reshape(H * W + 1, -1), torch.tensor(oracle_templates(H, W), dtype=torch.float64),
                          rtol=0, atol=1e-15)


@pytest.mark.parametrize("H,W", SHAPES)
def test_every_positive_template_peaks_at_tau_at_its_own_position(H, W):
    T = part_templates(H, W, dtype=torch.float64).reshape(H * W + 1, H * W)
    tau = template_tau(H, W)
    for k in range(H * W):  # the last one too (a known bug in one port leaves it all zero)
        assert T[1 + k, k] == pytest.approx(tau, abs=1e-18)
        assert T[1 + k].max() == pytest.approx(tau, abs=1e-18)
        assert int(T[1 + k].argmax()) == k
    assert torch.all(T[0] == -tau)


@pytest.mark.parametrize("H,W", SHAPES)
def test_positive_block_is_symmetric_and_bounded(H, W):
    T = part_templates(H, W, dtype=torch.float64).reshape(H * W + 1, H * W)[1:]
    assert torch.equal(T, T.T)
    tau = template_tau(H, W)
    assert T.min() >= -tau and T.max() <= tau


def test_priors_are_uniform_and_entropy_is_log_hw_plus_one():
    for H, W in SHAPES:
        p = template_priors(H, W, dtype=torch.float64)
        assert p.shape == (H * W + 1,)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-14)
        assert torch.allclose(p, torch.full_like(p, 1.0 / (H * W + 1)), atol=1e-15)
        assert float(-(p * p.log()).sum()) == pytest.approx(template_entropy(H, W), abs=1e-12)
        assert template_alpha(H, W) == pytest.approx(H * W / (1 + H * W))
    assert template_entropy(14, 14) == pytest.approx(math.log(197))


def test_templates_follow_dtype_and_device():
    T = part_templates(3, 4, dtype=torch.float16, device="cpu")
    assert T.dtype == torch.float16 and T.device.type == "cpu"


def test_bad_template_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 1×1"):
        part_templates(0, 3)
