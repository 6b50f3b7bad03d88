"""One explainer training step (forward, backward, Adam update; docs/method.md §4) on a random feature x*."""
from __future__ import annotations

from _bench_pytest import backend_param, run_benchmark, shape_param


@backend_param
@shape_param
def test_explainer_training_step(benchmark, backend: str, shape: tuple[int, int, int]) -> None:
    run_benchmark(benchmark, "explainer_step", backend, shape)
