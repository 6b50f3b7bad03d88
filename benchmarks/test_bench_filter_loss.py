"""Filter loss (docs/method.md §2), forward and forward + backward, per backend and shape."""
from __future__ import annotations

from _bench_pytest import backend_param, run_benchmark, shape_param


@backend_param
@shape_param
def test_filter_loss_forward(benchmark, backend: str, shape: tuple[int, int, int]) -> None:
    run_benchmark(benchmark, "filter_loss_fwd", backend, shape)


@backend_param
@shape_param
def test_filter_loss_forward_backward(benchmark, backend: str, shape: tuple[int, int, int]) -> None:
    run_benchmark(benchmark, "filter_loss_fwd_bwd", backend, shape)
