"""The benchmark suite never rots: every benchmark file and run.py run once, untimed, on tiny shapes.

The benchmarks are skipped by the normal test command (``--benchmark-skip`` in pyproject's addopts);
here they run in a subprocess with ``FASTEXPLAIN_BENCH_TINY=1`` and ``--benchmark-disable`` (docs/metrics.md (goals)).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _bench_report  # noqa: E402
import _bench_workloads  # noqa: E402


def _tiny_env() -> dict[str, str]:
    return {**os.environ, _bench_workloads.TINY_ENV: "1"}


def test_benchmark_files_run_once_on_tiny_shapes() -> None:
    command = [sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", "--benchmark-disable",
               "-o", "addopts=", "-q", "-rs"]
    done = subprocess.run(command, cwd=ROOT, env=_tiny_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout and "error" not in done.stdout.lower()


def test_run_py_writes_json_report_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "cpu-tiny.json"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--tiny", "--backends", "reference,cpu",
               "--min-reps", "1", "--budget", "0", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=_tiny_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["tiny"] and results["machine"]["malloc_env"]["MALLOC_MMAP_THRESHOLD_"]
    assert results["floors"]["copy_bandwidth_Bps"] > 0 and results["floors"]["exp_per_s"] > 0
    measured = {(c["workload"], c["backend"]) for c in results["cases"] if "median_s" in c}
    for workload in ("filter_loss_fwd", "filter_loss_fwd_bwd", "mask_relu_fwd_bwd"):
        assert (workload, "reference") in measured
    assert all(c["peak_extra_bytes"] > 0 for c in results["cases"] if "median_s" in c)
    assert len([c for c in results["scaling"]["cases"] if "median_s" in c]) >= 2
    report = out.with_suffix(".md").read_text()
    assert "Filter loss, forward + backward" in report and "slope" in report
    assert (tmp_path / "cpu-tiny-scaling.png").stat().st_size > 1000


def test_scaling_slope_recovers_the_power_law() -> None:
    run = {"scaling": {"cases": [{"backend": "reference", "shape": [16, 64, n], "median_s": 1e-6 * n ** 4}
                                 for n in (7, 14, 28, 56)]
                                + [{"backend": "cpu", "shape": [16, 64, n], "median_s": 3e-6 * n ** 3}
                                   for n in (7, 14, 28, 56)]}}
    slopes = _bench_report.scaling_slopes(run)
    assert math.isclose(slopes["reference"]["fit"], 4.0) and math.isclose(slopes["reference"]["last"], 4.0)
    assert math.isclose(slopes["cpu"]["fit"], 3.0)


def test_skip_reasons_and_bad_names() -> None:
    assert _bench_workloads.skip_reason("reference", "filter_loss_fwd") is None
    assert "CUDA" in (_bench_workloads.skip_reason("triton", "mask_relu_fwd_bwd", device="cpu") or "")
    assert _bench_workloads.skip_reason("cpu", "filter_loss_fwd", device="cuda") is not None
    with pytest.raises(ValueError, match="unknown benchmark backend"):
        _bench_workloads.skip_reason("numba", "filter_loss_fwd")
    with pytest.raises(ValueError, match="unknown workload"):
        _bench_workloads.skip_reason("reference", "conv")


def test_peak_memory_counts_a_fresh_tensor() -> None:
    import torch

    import _bench_measure

    size = 1 << 20

    def step() -> None:
        a = torch.ones(size)           # 4 MiB, freed at return
        b = torch.ones(size) + a       # 4 MiB more, live at the same time as a
        del a, b
    peak = _bench_measure.peak_extra_bytes(step, lambda: None, "cpu")
    assert 2 * 4 * size <= peak <= 3 * 4 * size


def test_peak_memory_does_not_credit_freeing_older_tensors() -> None:
    import torch

    import _bench_measure

    size = 1 << 20
    held = {"old": torch.ones(size)}

    def step() -> None:
        held["old"] = None             # frees 4 MiB allocated before the step: not credited
        held["old"] = torch.ones(size)  # the step's own 4 MiB, live at its end
    # repeated profiles see the previous profile's allocation freed; the peak must not change
    peaks = [_bench_measure.peak_extra_bytes(step, lambda: None, "cpu") for _ in range(3)]
    assert all(4 * size <= peak <= 5 * size for peak in peaks), peaks
