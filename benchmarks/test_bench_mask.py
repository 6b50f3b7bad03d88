"""Fused ReLU + template mask (docs/method.md §3), forward + backward, per backend and shape."""
from __future__ import annotations

from _bench_pytest import backend_param, run_benchmark, shape_param


@backend_param
@shape_param
def test_relu_template_mask_forward_backward(benchmark, backend: str, shape: tuple[int, int, int]) -> None:
    run_benchmark(benchmark, "mask_relu_fwd_bwd", backend, shape)
