"""pytest-benchmark glue: parametrisation over (backend, shape) and the timed call (docs/metrics.md (goals)).

Each ``benchmarks/test_bench_*.py`` file calls :func:`run_benchmark` for its workload. Unavailable
backends are skipped with their reason; cases are built (compiled and warmed up) before timing.
"""
from __future__ import annotations

import pytest

from _bench_workloads import BACKENDS, build_case, shape_id, shapes, skip_reason

backend_param = pytest.mark.parametrize("backend", BACKENDS)
shape_param = pytest.mark.parametrize("shape", shapes(), ids=shape_id)


def run_benchmark(benchmark, workload: str, backend: str, shape: tuple[int, int, int]) -> None:
    """Time ``workload`` on ``backend`` at ``shape`` with pytest-benchmark (skip when unavailable)."""
    reason = skip_reason(backend, workload, shape)
    if reason is not None:
        pytest.skip(reason)
    case = build_case(workload, backend, shape)
    benchmark.group = f"{workload} {shape_id(shape)}"
    benchmark.extra_info.update(workload=workload, backend=backend, shape=list(shape),
                                compile_seconds=case.compile_seconds)

    def timed() -> None:
        case.step()
        case.sync()
    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=0)
