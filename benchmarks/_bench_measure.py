"""Measurements for ``benchmarks/run.py``: wall time, peak extra memory, machine floors (docs/metrics.md (goals)).

* **Time**: wall-clock seconds of ``step(); sync()`` after the case's warm-up, repeated until both a
  minimum number of repetitions and a time budget are reached; the median is reported.
* **Peak extra memory**: one step is run under ``torch.profiler`` with ``profile_memory=True``; every
  allocation and free made through torch's allocators (CPU or CUDA) during the step is replayed in
  time order and the running total's maximum is the peak. It counts every tensor the step creates —
  saved activations, temporaries, outputs and gradients; freeing a tensor that existed before the step
  (e.g. the previous gradient) is not credited, and inputs and parameters are not counted. Memory a kernel obtains outside torch's allocator (e.g. thread-local ``malloc`` scratch)
  is not seen; tracemalloc would see none of torch's allocations at all.
* **Floors** (the best of several repetitions: a floor is what the machine can do at best): copy bandwidth (``dst.copy_(src)`` on pre-allocated 128 MiB buffers, counting the bytes
  read plus the bytes written) and exp throughput (``torch.exp(a, out=b)`` on a pre-allocated 4 MiB
  float32 tensor that stays in cache, elements per second), plus, per shape, the time to copy the
  [B, C, n, n] map once into a pre-allocated buffer (the same buffers every time: on a CPU with a large
  last-level cache they stay in it) and, beside it, once from memory (``copy_from_memory_time``: rotating
  over enough buffer pairs that none is still cached, as the mask step's four map-sized tensors are not).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Callable

import torch

from _bench_workloads import Case


def time_case(case: Case, *, min_reps: int, max_reps: int, budget_s: float) -> dict[str, float | int]:
    """Median/min wall time of one step over ≥ min_reps repetitions (more while under budget_s)."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < budget_s):
        case.sync()
        start = time.perf_counter()
        case.step()
        case.sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def peak_extra_bytes(step: Callable[[], None], sync: Callable[[], None], device_type: str) -> int:
    """Peak bytes allocated by torch during one step above the allocations live before it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        step()
        sync()
    wanted = torch.device(device_type).type
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and _event_device(event) == wanted]
    events.sort(key=lambda event: event.start_ns())
    # Kineto memory events carry no address, so frees are matched to this step's allocations by size.
    # A free with no matching allocation releases a block that existed before the step (such as the
    # previous step's gradient, dropped by ``x.grad = None``) and is not credited: whether the profiler
    # reports such frees at all depends on whether it saw the allocation, which made the peak flaky.
    live_sizes: Counter[int] = Counter()
    current = peak = 0
    for event in events:
        size = event.nbytes()
        if size > 0:
            live_sizes[size] += 1
            current += size
        elif live_sizes[-size] > 0:
            live_sizes[-size] -= 1
            current += size
        peak = max(peak, current)
    return peak


def _event_device(event) -> str:
    kind = str(event.device_type()).split(".")[-1].lower()
    return "cuda" if kind == "cuda" else "cpu"


def copy_bandwidth(*, mib: int = 128, reps: int = 10) -> float:
    """Bytes per second of dst.copy_(src) on pre-allocated float32 buffers, read + write counted."""
    numel = mib * 2 ** 20 // 4
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * numel * 4 / min(times)


def exp_throughput(*, numel: int = 2 ** 20, reps: int = 100) -> float:
    """Elements per second of torch.exp on a pre-allocated 4 MiB float32 tensor (cache resident).

    Each call is timed on its own and the fastest counts: on a shared machine a call during which a
    worker thread was descheduled says nothing about what the cores can do.
    """
    src = torch.rand(numel) - 0.5
    dst = torch.empty_like(src)
    torch.exp(src, out=dst)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.exp(src, out=dst)
        times.append(time.perf_counter() - start)
    return numel / min(times)


def _timed_copy(source: torch.Tensor, target: torch.Tensor) -> float:
    """Seconds of one ``target.copy_(source)``, synchronised on CUDA."""
    if source.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    target.copy_(source)
    if source.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_time(shape: tuple[int, int, int], device: torch.device, *, reps: int = 10) -> float:
    """Fastest of ``reps`` seconds to copy a float32 [B, C, n, n] map once into a pre-allocated buffer."""
    B, C, n = shape
    src = torch.rand(B, C, n, n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return min(_timed_copy(src, dst) for _ in range(reps))


def copy_from_memory_time(shape: tuple[int, int, int], device: torch.device, *, working_set: int = 1 << 30,
                          reps: int = 3) -> float:
    """Median seconds to copy a float32 [B, C, n, n] map once when source and destination come from memory:
    copies rotate over buffer pairs totalling ``working_set`` bytes (at most 32 pairs), so none is cached."""
    B, C, n = shape
    pairs = max(2, min(32, working_set // (2 * 4 * B * C * n * n)))
    sources = [torch.rand(B, C, n, n, device=device) for _ in range(pairs)]
    targets = [torch.empty_like(source) for source in sources]
    for source, target in zip(sources, targets):
        target.copy_(source)  # touch every page
    return statistics.median(_timed_copy(source, target) for _ in range(reps)
                             for source, target in zip(sources, targets))


def machine_info() -> dict[str, object]:
    """CPU model, cores, threads, versions, GPU (if any) and the date, for RESULTS.md."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = _cpu_flags()
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "simd": [f for f in ("avx2", "avx512f", "fma", "neon") if f in flags],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": load_average(),
        "malloc_env": {key: os.environ.get(key) for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (as `uptime` shows them), or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
