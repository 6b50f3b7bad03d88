"""One interpretable conv layer (conv 3×3 → ReLU → filter loss → mask, docs/method.md §3), forward + backward."""
from __future__ import annotations

from _bench_pytest import backend_param, run_benchmark, shape_param


@backend_param
@shape_param
def test_interpretable_layer_forward_backward(benchmark, backend: str, shape: tuple[int, int, int]) -> None:
    run_benchmark(benchmark, "layer_fwd_bwd", backend, shape)
