"""Distributed filter loss (issue 12 item 4): 2 gloo ranks on halves of a batch vs one process.

    .venv/bin/python benchmarks/test_bench_distributed.py                   # 64×512×14×14, writes results/
    .venv/bin/python benchmarks/test_bench_distributed.py --passes both     # also the reference local passes
    .venv/bin/python benchmarks/test_bench_distributed.py --shape 8x16x7x7 --reps 2 --out /tmp/d.json

Measures, forward + backward of ``fastexplain.filter_loss`` with ``backend="cpu"``, median over steps:

* **one process**: the whole batch of B images, 2 torch threads, the fused single-process op;
* **2 ranks**: 2 gloo processes on this machine, B/2 images each, 1 torch thread each, the same call with
  ``process_group=dist.group.WORLD`` (the fused local passes of csrc/filter_loss_local.cpp, all-reduces
  over gloo). A step starts on both ranks after a barrier; its time is the slower rank's.

The ratio (2 ranks / one process; target ≤ 1.5) is the number to read. It is only meaningful on an
otherwise idle 2-core machine: the load average (``/proc/loadavg``) is recorded before and after. One
process is timed before and after the ranks, to see drift. A load-independent view is recorded too: on
one thread and half the batch, the single-process fused op against the fused local passes alone (no
collectives) — their ratio plus the collectives' cost is what the 2-rank ratio tends to on an idle machine. ``--passes reference`` times the ranks with
the reference's PyTorch local passes instead (the path before the fused ones), for comparison.

Exactness is checked in the same run, in float64 on the same shape: the 2-rank loss and gradient against
the one-process fused op, relative to the largest value (target ≤ 1e-10).

Under pytest (``FASTEXPLAIN_BENCH_TINY=1`` in the smoke test) it runs once on a tiny shape; no timed
assertion anywhere. Results: ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/distributed``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported here, before a worker makes its group (fastexplain/_import_guard.py): imported later, it pins the
# group past destroy_process_group() and a rank could abort at exit after saving its results.
import fastexplain

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_OUT = HERE / "results" / "distributed"
DEFAULT_SHAPE = (64, 512, 14, 14)
TINY_SHAPE = (8, 6, 5, 7)
WORLD_SIZE = 2
GROUP_TIMEOUT = datetime.timedelta(seconds=300)


def _batch(shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Post-ReLU-like maps (half zeros), the same on every process."""
    generator = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def _step(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().requires_grad_(True)
    loss = fastexplain.filter_loss(leaf, backend="cpu", reduction="none", **kwargs)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _time_one_process(x: torch.Tensor, reps: int, threads: int) -> list[float]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _step(x)  # warm-up (and the extension build/load)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            _step(x)
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(previous)


def _time_local_passes_alone(x: torch.Tensor, reps: int) -> list[float]:
    """Forward + backward of the fused local passes on x as the only rank (no collectives), 1 thread."""
    from fastexplain.distributed import grad_from_passes, loss_from_passes
    from fastexplain.ops import _registry
    from fastexplain.ops.local_passes import local_passes

    def step() -> None:
        passes = local_passes(_registry.load("cpu"), x, 4.0)
        loss, n_total, global_sums = loss_from_passes(passes, x.shape[0], lambda tensor, op: tensor)
        grad_from_passes(passes, n_total, torch.ones_like(loss), global_sums)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(previous)


def _worker(rank: int, port: int, directory: str, shape: tuple[int, int, int, int], reps: int,
            passes: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=GROUP_TIMEOUT)
    try:
        if passes == "reference":  # the path before the fused local passes, for comparison
            from fastexplain.ops import local_passes

            local_passes._FUSED.clear()
        group = dist.group.WORLD
        half = shape[0] // WORLD_SIZE
        mine = slice(rank * half, shape[0] if rank == WORLD_SIZE - 1 else (rank + 1) * half)
        x = _batch(shape, torch.float32)[mine].contiguous()
        _step(x, process_group=group)  # warm-up
        times = []
        for _ in range(reps):
            dist.barrier(group)
            start = time.perf_counter()
            _step(x, process_group=group)
            times.append(time.perf_counter() - start)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        exact = _batch(shape, torch.float64)[mine].contiguous()
        loss64, grad64 = _step(exact, process_group=group)
        torch.save({"times": slowest.tolist(), "loss64": loss64, "grad64": grad64, "rows": (mine.start, mine.stop)},
                   os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _time_ranks(shape: tuple[int, int, int, int], reps: int, passes: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(_free_port(), directory, shape, reps, passes), nprocs=WORLD_SIZE, join=True)
        return [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-300))


def measure(shape: tuple[int, int, int, int], reps: int, passes: tuple[str, ...]) -> dict:
    """Everything the module docstring lists, as a JSON-ready dict."""
    from _bench_measure import machine_info

    result: dict = {"shape": list(shape), "reps": reps, "machine": machine_info(), "loadavg_before": _loadavg()}
    x = _batch(shape, torch.float32)
    before = _time_one_process(x, reps, threads=2)
    ranks = {kind: _time_ranks(shape, reps, kind) for kind in passes}
    after = _time_one_process(x, reps, threads=2)
    # load-independent view: one core's work per half batch, single-process fused op vs fused local passes
    half = x[: shape[0] // WORLD_SIZE].contiguous()
    result["half_batch_1_thread_s"] = {"fused_op": statistics.median(_time_one_process(half, reps, threads=1)),
                                       "local_passes": statistics.median(_time_local_passes_alone(half, reps))}
    result["loadavg_after"] = _loadavg()
    one_process = statistics.median(before + after)
    result["one_process_2_threads_s"] = {"median": one_process, "before": before, "after": after}
    for kind, outcome in ranks.items():
        times = outcome[0]["times"]
        result[f"ranks_{kind}_passes_s"] = {"median": statistics.median(times), "steps": times}
        result[f"ratio_{kind}_passes"] = statistics.median(times) / one_process
    # exactness in float64, against the one-process fused op on the concatenated batch
    exact = _batch(shape, torch.float64)
    loss64, grad64 = _step(exact)
    for kind, outcome in ranks.items():
        grad = torch.empty_like(grad64)
        for rank in outcome:
            grad[slice(*rank["rows"])] = rank["grad64"]
        result[f"float64_error_{kind}_passes"] = {
            "loss": max(_relative_error(rank["loss64"], loss64) for rank in outcome),
            "grad": _relative_error(grad, grad64)}
    return result


def markdown(result: dict) -> str:
    machine = result["machine"]
    B, C, H, W = result["shape"]
    lines = [f"## Distributed filter loss, forward + backward, {B}×{C}×{H}×{W} (`benchmarks/test_bench_distributed.py`)", "",
             f"- machine: {machine['cpu_model']}, {machine['cpu_cores']} cores; python {machine['python']}, "
             f"torch {machine['torch']}; date {machine['date_utc']}",
             f"- load average (1, 5, 15 min) before: {result['loadavg_before']}; after: {result['loadavg_after']}",
             f"- median of {result['reps']} steps each", "",
             "| run | images per process | threads per process | median | vs one process |", "|---|---|---|---|---|",
             f"| one process, fused op | {B} | 2 | {result['one_process_2_threads_s']['median'] * 1e3:.1f} ms | 1 |"]
    for key in sorted(k for k in result if k.startswith("ranks_")):
        kind = key.split("_")[1]
        lines.append(f"| 2 gloo ranks, {kind} local passes | {B // 2} | 1 | {result[key]['median'] * 1e3:.1f} ms "
                     f"| {result[f'ratio_{kind}_passes']:.2f}× |")
    half = result.get("half_batch_1_thread_s")
    if half:
        lines += ["", f"One core's share without collectives ({B // 2} images, 1 thread): single-process fused op "
                      f"{half['fused_op'] * 1e3:.1f} ms, fused local passes {half['local_passes'] * 1e3:.1f} ms "
                      f"({half['local_passes'] / half['fused_op']:.2f}×)."]
    lines += ["", "float64, 2 ranks vs one process (max error / max value):", ""]
    for key in sorted(k for k in result if k.startswith("float64_error_")):
        kind = key.split("_")[2]
        lines.append(f"- {kind} local passes: loss {result[key]['loss']:.1e}, gradient {result[key]['grad']:.1e}")
    return "\n".join(lines) + "\n"


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1 or parts[0] < 2:
        raise argparse.ArgumentTypeError(f"shape must look like BxCxHxW with B ≥ 2, got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_parse_shape, default=DEFAULT_SHAPE)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--passes", choices=("cpu", "reference", "both"), default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="path without suffix; .json and .md are written")
    args = parser.parse_args(argv)
    passes = ("cpu", "reference") if args.passes == "both" else (args.passes,)
    result = measure(args.shape, args.reps, passes)
    out = args.out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def test_distributed_filter_loss(benchmark) -> None:
    """One measurement (tiny shape under FASTEXPLAIN_BENCH_TINY); exactness asserted, times only recorded."""
    from _bench_workloads import is_tiny

    shape = TINY_SHAPE if is_tiny() else DEFAULT_SHAPE
    reps = 2 if is_tiny() else 15
    result = benchmark.pedantic(lambda: measure(shape, reps, ("cpu",)), rounds=1, iterations=1)
    benchmark.extra_info.update(ratio=result["ratio_cpu_passes"], loadavg=result["loadavg_before"])
    error = result["float64_error_cpu_passes"]
    assert error["loss"] <= 1e-10 and error["grad"] <= 1e-10, error


if __name__ == "__main__":
    sys.exit(main())
