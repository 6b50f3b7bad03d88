"""Run the benchmark suite and write ``benchmarks/results/<device>.json`` and ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/run.py                 # CPU: reference, torch.compile, cpu backend
    .venv/bin/python benchmarks/run.py --device cuda   # GPU: reference, torch.compile, triton backend
    .venv/bin/python benchmarks/run.py --tiny          # seconds-long pipeline check on tiny shapes
    .venv/bin/python benchmarks/run.py --report-only   # rebuild RESULTS.md and the plots from the JSON

Measures, in one process (docs/metrics.md (goals)): the machine floors (copy bandwidth, exp throughput, one copy of
each map), every (workload, shape, backend) case of ``_bench_workloads`` — median time over repeated
steps after compile and warm-up, and peak extra memory of one step under ``torch.profiler`` — and the
scaling of the filter loss in n at fixed (B, C). The process re-executes itself once with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set, so that large tensors freed by one step are
reused by the next instead of being returned to the OS and page-faulted back in (the page-fault trap).
The JSON is rewritten after every case, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SCHEMA = "fastexplain-bench/1"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 34)}
# Workloads whose step costs seconds (a conv or a whole explainer): by default only at the first shape.
HEAVY_WORKLOADS = ("layer_fwd_bwd", "explainer_step")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fastexplain benchmark suite (writes JSON + RESULTS.md)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the ops run: cpu (reference, compile, cpu) or cuda (reference, compile, triton)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a quick check of the pipeline")
    parser.add_argument("--backends", default="reference,compile,textbook,compile_textbook,cpu,triton",
                        help="comma-separated subset of reference,compile,textbook,compile_textbook,cpu,triton")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of the workloads (default all)")
    parser.add_argument("--heavy-all-shapes", action="store_true",
                        help=f"run {', '.join(HEAVY_WORKLOADS)} at every shape, not only the first")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed steps per case (default 1)")
    parser.add_argument("--min-reps", type=int, default=3, help="timed steps per case at least (default 3)")
    parser.add_argument("--max-reps", type=int, default=30, help="timed steps per case at most (default 30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core); 1 gives steadier numbers "
                             "on a machine shared with other jobs")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler memory measurement")
    parser.add_argument("--no-scaling", action="store_true", help="skip the time-vs-n sweep")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip the float32-vs-float64 error of each filter-loss case")
    parser.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and plots from JSON")
    parser.add_argument("--note", default="", help='a line shown in RESULTS.md, e.g. "preliminary (shared machine)"')
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    return parser.parse_args(argv)


def reexec_with_malloc_settings(argv: list[str]) -> None:
    """Restart this script with glibc's mmap/trim thresholds raised, unless they are already set."""
    if all(os.environ.get(key) for key in MALLOC_ENV) or sys.platform != "linux":
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ["FASTEXPLAIN_BENCH_TINY"] = "1"
    import _bench_report

    if args.report_only:
        _bench_report.write_report(RESULTS_DIR, RESULTS_MD)
        print(f"wrote {RESULTS_MD}")
        return 0
    reexec_with_malloc_settings(sys.argv[1:] if argv is None else list(argv))
    out = args.out or RESULTS_DIR / (f"{args.device}-tiny.json" if args.tiny else f"{args.device}.json")
    results = run_suite(args, out)
    if not args.tiny:
        _bench_report.write_report(RESULTS_DIR, RESULTS_MD)
        print(f"wrote {out} and {RESULTS_MD}")
    else:
        _bench_report.write_report(RESULTS_DIR, out.with_suffix(".md"), only=[out])
        print(f"wrote {out} and {out.with_suffix('.md')} (tiny mode: {RESULTS_MD} left alone)")
    return 0 if not any(case.get("error") for case in results["cases"]) else 1


def _selected(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value is None:
        return allowed
    chosen = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"run.py: unknown {what} {unknown}; choose from {list(allowed)}")
    return chosen


def run_suite(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    import _bench_measure as measure
    import _bench_workloads as workloads

    backends = _selected(args.backends, workloads.BACKENDS, "backends")
    chosen_workloads = _selected(args.workloads, workloads.WORKLOADS, "workloads")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"run.py: --threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.py: --device cuda asked for, but no CUDA device is available")
    results: dict[str, Any] = {
        "schema": SCHEMA, "device": args.device, "tiny": workloads.is_tiny(), "note": args.note,
        "machine": measure.machine_info(), "availability": _availability(),
        "settings": {"budget_s": args.budget, "min_reps": args.min_reps, "max_reps": args.max_reps,
                     "heavy_all_shapes": args.heavy_all_shapes},
        "floors": {}, "cases": [], "scaling": {"B": workloads.scaling_shapes()[0][0], "C": workloads.scaling_shapes()[0][1],
                                               "workload": "filter_loss_fwd_bwd", "cases": []},
    }
    started = time.perf_counter()
    print(f"floors on {args.device} …", flush=True)
    results["floors"] = _floors(measure, device, workloads.shapes())
    _save(results, out)
    for workload in chosen_workloads:
        for index, shape in enumerate(workloads.shapes()):
            if workload in HEAVY_WORKLOADS and index > 0 and not args.heavy_all_shapes:
                continue
            for backend in backends:
                results["cases"].append(_run_case(args, measure, workloads, workload, backend, shape))
                _save(results, out)
    if not args.no_scaling:
        for shape in workloads.scaling_shapes():
            for backend in backends:
                record = _run_case(args, measure, workloads, "filter_loss_fwd_bwd", backend, shape, memory=False)
                results["scaling"]["cases"].append(record)
                _save(results, out)
    results["total_seconds"] = time.perf_counter() - started
    results["load_average_end"] = measure.load_average()
    _save(results, out)
    return results


def _availability() -> dict[str, str | None]:
    from fastexplain.ops import availability

    return availability()


def _floors(measure, device, shapes) -> dict[str, Any]:
    floors: dict[str, Any] = {"copy_bandwidth_Bps": measure.copy_bandwidth(),
                              "exp_per_s": measure.exp_throughput(), "copy_s": {}, "copy_from_memory_s": {}}
    for shape in shapes:
        floors["copy_s"]["x".join(map(str, shape))] = measure.copy_time(shape, device)
        floors["copy_from_memory_s"]["x".join(map(str, shape))] = measure.copy_from_memory_time(shape, device)
    return floors


def _run_case(args, measure, workloads, workload: str, backend: str, shape: tuple[int, int, int],
              *, memory: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"workload": workload, "backend": backend, "shape": list(shape)}
    reason = workloads.skip_reason(backend, workload, shape, args.device)
    label = f"{workload:<20} {workloads.shape_id(shape):<16} {backend:<10}"
    if reason is not None:
        record["skipped"] = reason
        print(f"{label} skipped: {reason}", flush=True)
        return record
    try:
        case = workloads.build_case(workload, backend, shape, device=args.device)
        record["compile_s"] = case.compile_seconds
        record["input_bytes"] = case.input_bytes
        record.update(measure.time_case(case, min_reps=args.min_reps, max_reps=args.max_reps,
                                        budget_s=args.budget))
        if memory and not args.no_memory:
            record["peak_extra_bytes"] = measure.peak_extra_bytes(case.step, case.sync, case.device_type)
        if memory and not args.no_accuracy and case.evaluate is not None:
            record.update(_accuracy(workloads, case, shape, args.device))
        del case
    except Exception as error:  # keep measuring the other cases; the error goes into the JSON
        record["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        _release_memory()
    shown = f"{record['median_s'] * 1e3:10.3f} ms" if "median_s" in record else record.get("error", "")
    print(f"{label} {shown}", flush=True)
    return record


_EXACT: dict[tuple[int, int, int], Any] = {}


def _accuracy(workloads, case, shape: tuple[int, int, int], device: str) -> dict[str, float]:
    """The case's float32 loss (and gradient) against float64 on the same input: relative error of Σ_f loss_f,
    and the gradient's largest error relative to its largest entry. NaN when the case produced non-finite values."""
    import torch

    if shape not in _EXACT:
        _EXACT.clear()  # one shape at a time: the float64 gradient is twice the map's size
        _EXACT[shape] = workloads.exact_filter_loss(shape, device=device)
    exact_loss, exact_grad = _EXACT[shape]
    loss, grad = case.evaluate()
    result = {"loss_rel_error": float((loss.double().cpu() - exact_loss).abs() / exact_loss.abs())}
    if grad is not None:
        scale = exact_grad.abs().max()
        result["grad_rel_error"] = float((grad.double() - exact_grad).abs().max() / scale)
    return {key: (value if value == value and abs(value) != float("inf") else float("nan"))
            for key, value in result.items()}


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(out)


if __name__ == "__main__":
    sys.exit(main())
