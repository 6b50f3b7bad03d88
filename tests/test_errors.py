"""Every input check gives a one-line error that says what is wrong (issue 2)."""
import pytest
import torch

import fastexplain
from fastexplain.ops import BackendUnavailable

OPS = [fastexplain.filter_loss, fastexplain.template_mask, fastexplain.relu_template_mask]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("op", OPS)
def test_rank_must_be_four(op):
    with pytest.raises(ValueError, match=r"4-D tensor \[B, C, H, W\], got shape \(3, 4, 4\)") as e:
        op(torch.rand(3, 4, 4), backend="reference")
    one_line(e)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (2, 0, 3, 3), (2, 2, 0, 3), (2, 2, 3, 0)])
def test_empty_inputs(op, shape):
    with pytest.raises(ValueError, match="empty tensor") as e:
        op(torch.rand(shape), backend="reference")
    one_line(e)


@pytest.mark.parametrize("op", OPS)
def test_non_floating_dtype(op):
    with pytest.raises(TypeError, match="floating-point.*x.float") as e:
        op(torch.ones(2, 2, 3, 3, dtype=torch.int64), backend="reference")
    one_line(e)


@pytest.mark.parametrize("op", OPS)
def test_not_a_tensor(op):
    with pytest.raises(TypeError, match="torch.Tensor"):
        op([[1.0]], backend="reference")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf(op, bad):
    x = torch.rand(2, 2, 3, 3)
    x[1, 0, 2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf") as e:
        op(x, backend="reference")
    one_line(e)


def test_negative_values_in_the_filter_loss():
    x = torch.rand(2, 2, 3, 3)
    x[0, 1, 0, 0] = -1e-3
    with pytest.raises(ValueError, match="post-ReLU.*torch.relu") as e:
        fastexplain.filter_loss(x, backend="reference")
    one_line(e)


def test_bad_choices():
    x = torch.rand(2, 2, 3, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastexplain.filter_loss(x, reduction="max")
    with pytest.raises(ValueError, match="center must be one of"):
        fastexplain.template_mask(x, center="median")
    with pytest.raises(ValueError, match="scale must be one of"):
        fastexplain.template_mask(x, scale="half")
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite positive number"):
            fastexplain.filter_loss(x, beta=beta)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*'reference'"):
        fastexplain.filter_loss(torch.rand(2, 1, 2, 2), backend="fast")


def test_unavailable_backend_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present here")
    from fastexplain.ops import _registry
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest turns Triton's CPU interpreter on
    monkeypatch.setattr(_registry, "_loaded", {})
    with pytest.raises((BackendUnavailable, ValueError), match="triton|cuda|CUDA"):
        fastexplain.filter_loss(torch.rand(2, 1, 2, 2), backend="triton")


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTEXPLAIN_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastexplain.filter_loss(torch.rand(2, 1, 2, 2))
    monkeypatch.setenv("FASTEXPLAIN_BACKEND", "reference")
    from fastexplain.ops import selected_backend
    assert selected_backend(torch.rand(1, 1, 1, 1)) == "reference"
