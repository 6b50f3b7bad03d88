"""Turn the JSON written by ``benchmarks/run.py`` into ``RESULTS.md`` and a log-log scaling plot (docs/metrics.md (goals))."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "fastexplain-bench/1"
BACKEND_ORDER = ("reference", "compile", "textbook", "compile_textbook", "cpu", "triton")
FUSED = ("cpu", "triton")
UNFUSED = ("reference", "compile", "textbook", "compile_textbook")
BACKEND_TITLES = {"reference": "reference", "compile": "compile(reference)", "textbook": "textbook",
                  "compile_textbook": "compile(textbook)", "cpu": "cpu", "triton": "triton"}
WORKLOAD_TITLES = {
    "filter_loss_fwd": "Filter loss, forward (no grad)",
    "filter_loss_fwd_bwd": "Filter loss, forward + backward",
    "mask_relu_fwd_bwd": "ReLU + template mask, forward + backward",
    "layer_fwd_bwd": "One InterpretableConv2d (conv 3×3 C→C → ReLU → filter loss → mask), forward + backward",
    "explainer_step": "One explainer training step (forward, backward, Adam)",
}
METHOD = """\
How it is measured (`benchmarks/run.py`, one process per device):

* **Columns**: `reference` is fastexplain's exact centred plain-PyTorch form (the accuracy yardstick),
  `textbook` the form public ports ship (logits by a product with the templates, `logsumexp` over the
  batch, no centring: `reference.naive_filter_loss_per_filter`), `compile(…)` their `torch.compile`;
  `cpu`/`triton` are the fused backends. Speed-ups are ratios of medians measured in the same run, and the
  headline one is against the fastest non-fused column. Each filter-loss case's float32 error is measured
  against float64 on the same input (the float64 reference, run channel chunk by channel chunk).

* **Time**: median wall time of one step (`step(); synchronize`) over ≥ 3 repetitions and ≥ 1 s of
  steps, after a warm-up step; `torch.compile` cases (`dynamic=False`, one compile per shape) are
  compiled and warmed up first, and their compile time is listed separately (it is near 0 s when
  Inductor's on-disk cache already holds the graph from an earlier run). Inputs are allocated once;
  gradients are reset with `x.grad = None`. glibc's `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` are
  raised for the run so freed buffers are reused rather than page-faulted back in.
* **Peak extra memory**: one step under `torch.profiler` with `profile_memory=True`; the allocations and
  frees made through torch's allocator during the step are replayed in order and the running maximum
  is reported (saved tensors, temporaries, outputs and gradients; not the inputs or parameters that
  existed before, and freeing a tensor that existed before the step, such as the previous gradient, is
  not credited). Memory taken outside torch's allocator (a kernel's own `malloc` scratch) is not seen;
  `tracemalloc` would see none of torch's allocations at all.
* **Floors** (the fastest of 10–100 repetitions): copy bandwidth = bytes read + written by
  `dst.copy_(src)` on pre-allocated 128 MiB buffers per second; exp throughput = `torch.exp(a, out=b)` on a cache-resident 4 MiB float32 tensor.
  *Mask floor* = the measured time to copy that [B, C, n, n] map once (target: fused ≤ 2.5×; two copies is the
  least forward + backward can move).
  *Bandwidth floor* of the filter loss = (read x twice + write dx once) / copy bandwidth, forward only:
  read x once. *Exp floor* = B·C·(HW + 1) exps per pass (one per logit; fwd + bwd: two passes) / exp
  throughput — on a CPU the exp floor, not bandwidth, bounds a fused filter loss.
"""


def load_results(results_dir: Path, only: list[Path] | None = None) -> list[dict[str, Any]]:
    """The run.py JSON files (schema-checked; tiny-mode files only when asked for by ``only``)."""
    # cpu.json before cpu-1thread.json: a device's default run first, its variants after it
    paths = only if only is not None else sorted(results_dir.glob("*.json"), key=lambda p: (len(p.stem), p.stem))
    loaded = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA and (only is not None or not data.get("tiny")):
            data["_path"] = Path(path)
            loaded.append(data)
    return loaded


def write_report(results_dir: Path, md_path: Path, only: list[Path] | None = None) -> None:
    """Write the Markdown report (and one scaling PNG per device) for every result file found."""
    runs = load_results(results_dir, only)
    lines = ["# Benchmark results", "",
             "Written by `.venv/bin/python benchmarks/run.py` (see `docs/benchmarks.md`); times are medians.", ""]
    if not runs:
        lines.append(f"No results yet: run `.venv/bin/python benchmarks/run.py` to fill `{results_dir.name}/`.")
    for run in runs:
        png = run["_path"].with_name(run["_path"].stem + "-scaling.png")
        plotted = plot_scaling(run, png)
        lines += device_section(run, png.relative_to(md_path.parent) if plotted and _under(png, md_path.parent)
                                else (png if plotted else None))
    lines += _profile_section(results_dir)
    lines += _gpu_triton_section(results_dir, md_path)
    lines += ["## Method", "", METHOD]
    md_path.write_text("\n".join(lines))


PROFILE_FILE = "profile-step.json"


def _gpu_triton_section(results_dir: Path, md_path: Path) -> list[str]:
    """Links to the reports of ``benchmarks/gpu_triton.py`` (device, date, the Triton forms' forward + backward)."""
    lines: list[str] = []
    for path in sorted(results_dir.glob("gpu_triton_*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if report.get("smoke") or "shapes" not in report:
            continue
        link = path.with_suffix(".md")
        link_text = link.relative_to(md_path.parent) if _under(link, md_path.parent) else link
        lines.append(f"- [{link_text}]({link_text}): {report['device']}, torch {report['torch']}, "
                     f"triton {report['triton']}, {report['date']}")
        for shape, entry in report["shapes"].items():
            timings = entry.get("timings", {})
            cells = [f"{name} {value['forward_backward_ms']:.3g} ms"
                     + (f" (graph {value['graph_forward_backward_ms']:.3g})" if "graph_forward_backward_ms" in value else "")
                     for name, value in timings.items()
                     if isinstance(value, dict) and "forward_backward_ms" in value and name != "mask_relu_triton"]
            if cells:
                lines.append(f"  - {shape} forward + backward: " + "; ".join(cells))
        timed = [row for row in report.get("fused_sweep", []) if "forward_backward_ms" in row]
        if timed:
            best = min(timed, key=lambda row: row["forward_backward_ms"])
            lines.append(f"  - fused form's launch sweep ({len(timed)} settings timed): fastest "
                         f"{best['forward_backward_ms']:.3g} ms eager with {best['precision']}, BLOCK_K {best['BLOCK_K']}, "
                         f"BLOCK_I {best['BLOCK_I']}, {best['num_warps']} warps, {best.get('num_stages', '')} stage(s); "
                         f"slowest {max(row['forward_backward_ms'] for row in timed):.3g} ms")
    if not lines:
        return []
    return ["## GPU: Triton kernels (`benchmarks/gpu_triton.py`, see docs/triton-kernels.md)", ""] + lines + [""]


def _profile_section(results_dir: Path) -> list[str]:
    """The table of `benchmarks/profile_step.py` (one explainer training step, issue 12 item 5), when it was run."""
    path = results_dir / PROFILE_FILE
    if not path.is_file():
        return []
    try:
        result = json.loads(path.read_text())
        from profile_step import markdown
    except (OSError, json.JSONDecodeError, ImportError):
        return []
    machine = result["machine"]
    return ["## Where the time of one explainer training step goes (`profile_step.py`)", "",
            f"- machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch "
            f"threads; python {machine['python']}, torch {machine['torch']}; date: {machine['date_utc']}", "",
            markdown(result), ""]


def _under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _shape(shape: list[int]) -> str:
    B, C, n = shape
    return f"{B}×{C}×{n}×{n}"


def _index(cases: list[dict[str, Any]]) -> dict[tuple[str, tuple[int, ...], str], dict[str, Any]]:
    return {(case["workload"], tuple(case["shape"]), case["backend"]): case for case in cases}


def _backends(cases: list[dict[str, Any]]) -> list[str]:
    present = {case["backend"] for case in cases if "median_s" in case}
    return [name for name in BACKEND_ORDER if name in present]


def device_section(run: dict[str, Any], png: Path | None) -> list[str]:
    machine, floors = run["machine"], run["floors"]
    cases, by_key = run["cases"], _index(run["cases"])
    backends = _backends(cases)
    threads = f", {machine['torch_threads']} torch thread{'s' if machine['torch_threads'] != 1 else ''}"
    lines = [f"## {run['device'].upper()}: {machine['gpu'] or machine['cpu_model']}"
             f"{threads if run['device'] == 'cpu' else ''} (`{run['_path'].name}`)", ""]
    if run.get("note"):
        lines += [f"**{run['note']}**", ""]
    lines += [f"- machine: {machine['cpu_model']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch "
              f"threads, SIMD: {', '.join(machine['simd']) or 'n/a'}), GPU: {machine['gpu'] or 'none'}",
              f"- python {machine['python']}, torch {machine['torch']}, {machine['platform']}",
              f"- date: {machine['date_utc']}; " + (f"run took {run['total_seconds']:.0f} s" if "total_seconds" in run
                                                   else "run incomplete (interrupted or still running)"),
              f"- load average (1, 5, 15 min, as `uptime` shows it) at the start: "
              f"{_load(machine.get('load_average'))}, at the end: {_load(run.get('load_average_end'))} "
              f"(a machine with {machine['cpu_cores']} cores is idle below ~0.5 and fully busy at {machine['cpu_cores']})",
              f"- floors: copy bandwidth {floors['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (read + write), "
              f"exp throughput {floors['exp_per_s'] / 1e9:.2f} G exp/s",
              f"- backends: " + ", ".join(f"{name} {'available' if reason is None else '— ' + reason}"
                                          for name, reason in run["availability"].items()), ""]
    lines += _targets_section(run, by_key)
    workloads = [w for w in WORKLOAD_TITLES if any(case["workload"] == w for case in cases)]
    for workload in workloads:
        lines += _workload_table(run, workload, backends, by_key)
    lines += _memory_table(cases, backends)
    lines += _scaling_section(run, png)
    skipped = sorted({(c["backend"], c.get("skipped") or c.get("error")) for c in cases + run["scaling"]["cases"]
                      if c.get("skipped") or c.get("error")})
    if skipped:
        lines += ["### Not measured", ""] + [f"- {backend}: {why}" for backend, why in skipped] + [""]
    return lines


def _fastest_unfused(by_key, workload: str, shape: tuple[int, ...]) -> tuple[str, float] | None:
    """(backend, seconds) of the fastest plain-PyTorch column measured for (workload, shape)."""
    times = [(by_key[(workload, shape, b)]["median_s"], b) for b in UNFUSED
             if "median_s" in by_key.get((workload, shape, b), {})]
    if not times:
        return None
    seconds, backend = min(times)
    return backend, seconds


def _targets_section(run: dict[str, Any], by_key) -> list[str]:
    """The docs/metrics.md (goals) / issue 12 targets for each fused backend, with the measured value and a verdict."""
    rows = []
    slopes = scaling_slopes(run)
    for backend in [b for b in FUSED if any(k[2] == b and "median_s" in case for k, case in by_key.items())]:
        def ratio(workload: str, shape: tuple[int, ...], base: str, key: str = "median_s") -> float | None:
            mine, theirs = by_key.get((workload, shape, backend), {}), by_key.get((workload, shape, base), {})
            return theirs[key] / mine[key] if key in mine and key in theirs and mine[key] > 0 else None

        headline, large = (64, 512, 14), (32, 512, 28)
        checks = []
        for shape, eager_goal, compile_goal in ((headline, 10, 5), (large, 30, 10)):
            label = f"{shape[0]}×{shape[1]}×{shape[2]}²"
            checks += [
                (f"filter loss fwd+bwd {label} vs textbook (eager)", ratio("filter_loss_fwd_bwd", shape, "textbook"),
                 eager_goal),
                (f"filter loss fwd+bwd {label} vs compile(textbook)",
                 ratio("filter_loss_fwd_bwd", shape, "compile_textbook"), compile_goal),
            ]
            fastest = _fastest_unfused(by_key, "filter_loss_fwd_bwd", shape)
            mine = by_key.get(("filter_loss_fwd_bwd", shape, backend), {})
            if fastest and "median_s" in mine:
                rows_label = f"filter loss fwd+bwd {label} vs the fastest non-fused ({BACKEND_TITLES[fastest[0]]})"
                checks.append((rows_label, fastest[1] / mine["median_s"], compile_goal))
        checks.append(("filter loss fwd+bwd peak memory 64×512×14², reference / fused",
                       ratio("filter_loss_fwd_bwd", headline, "reference", "peak_extra_bytes"), 20))
        if backend == "triton":  # docs/metrics.md (goals): on a GPU, fwd + bwd within 3× of the memory-bandwidth floor
            case = by_key.get(("filter_loss_fwd_bwd", headline, backend), {})
            floor = _floor_seconds(run, "filter_loss_fwd_bwd", list(headline), case.get("input_bytes", 0))
            checks.append(("filter loss fwd+bwd 64×512×14², bandwidth floor / time",
                           floor["bandwidth"] / case["median_s"] if "median_s" in case else None, 1 / 3))
        for label, value, goal in checks:
            verdict = "—" if value is None else ("met" if value >= goal else "not met")
            rows.append(f"| {backend} | {label} | ≥ {goal:.2g}× | {'—' if value is None else f'{value:.2g}×'} | {verdict} |")
        mask = by_key.get(("mask_relu_fwd_bwd", headline, backend), {})
        copy = run["floors"]["copy_s"].get("x".join(map(str, headline)))
        if "median_s" in mask and copy:
            multiple = mask["median_s"] / copy
            rows.append(f"| {backend} | mask + ReLU fwd+bwd 64×512×14², time / one copy | ≤ 2.5× | {multiple:.1f}× | "
                        f"{'met' if multiple <= 2.5 else 'not met'} |")
            cold = run["floors"].get("copy_from_memory_s", {}).get("x".join(map(str, headline)))
            if cold:  # the step's x, y, grad and dx do not fit the cache: the same copy from memory, for scale
                rows.append(f"| {backend} | mask + ReLU fwd+bwd 64×512×14², time / one copy from memory | (≤ 2.5×) | "
                            f"{mask['median_s'] / cold:.1f}× | (for scale) |")
        if backend in slopes:
            slope = slopes[backend]["last"]
            rows.append(f"| {backend} | filter loss growth in n (last slope of the sweep) | ≤ 3 | {slope:.2f} | "
                        f"{'met' if slope <= 3.2 else 'not met'} |")
    if not rows:
        return []
    return ["### Targets (docs/metrics.md (goals), issue 12)", "", "| backend | target | goal | measured | verdict |",
            "|---|---|---|---|---|", *rows, "",
            "(slope verdict allows 0.2 for timing noise; \"fastest non-fused\" is the fastest plain-PyTorch column "
            "of the same run, held to the compile(textbook) goal)", ""]


def _floor_seconds(run: dict[str, Any], workload: str, shape: list[int], input_bytes: int) -> dict[str, float]:
    floors = run["floors"]
    B, C, n = shape
    if workload == "mask_relu_fwd_bwd":
        copy = floors["copy_s"].get("x".join(map(str, shape)))
        return {"copy": copy} if copy else {}
    if workload.startswith("filter_loss"):
        backward = workload.endswith("bwd")
        moved = input_bytes * (3 if backward else 1)
        exps = B * C * (n * n + 1) * (2 if backward else 1)
        return {"bandwidth": moved / floors["copy_bandwidth_Bps"], "exp": exps / floors["exp_per_s"]}
    return {}


def _workload_table(run, workload: str, backends: list[str], by_key) -> list[str]:
    shapes = list(dict.fromkeys(tuple(c["shape"]) for c in run["cases"] if c["workload"] == workload))
    present = [b for b in backends if any("median_s" in by_key.get((workload, shape, b), {}) for shape in shapes)]
    header = ["B×C×H×W"] + [BACKEND_TITLES[b] for b in present]
    fused = [b for b in present if b in FUSED]
    unfused = [b for b in present if b in UNFUSED]
    # Speed-ups against the textbook columns where they exist (the forms users would otherwise run), else all.
    bases = [b for b in unfused if b in ("textbook", "compile_textbook")] or unfused
    speed_cols = [(b, base) for b in fused for base in bases]
    header += [f"{b} vs {BACKEND_TITLES[base]}" for b, base in speed_cols]
    header += [f"{b} vs fastest non-fused" for b in fused if len(unfused) > 1]
    floor_kinds = {"mask_relu_fwd_bwd": ["copy"], "filter_loss_fwd": ["bandwidth", "exp"],
                   "filter_loss_fwd_bwd": ["bandwidth", "exp"]}.get(workload, [])
    header += [f"{b} / {kind} floor" for b in fused for kind in floor_kinds]
    lines = [f"### {WORKLOAD_TITLES[workload]}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for shape in shapes:
        row = [_shape(list(shape))]
        for backend in present:
            case = by_key.get((workload, shape, backend), {})
            cell = _ms(case.get("median_s"))
            if case.get("compile_s"):
                cell += f" (compile {case['compile_s']:.0f} s)"
            row.append(cell)
        for backend, base in speed_cols:
            mine, theirs = by_key.get((workload, shape, backend), {}), by_key.get((workload, shape, base), {})
            ok = "median_s" in mine and "median_s" in theirs
            row.append(f"{theirs['median_s'] / mine['median_s']:.1f}×" if ok else "—")
        if len(unfused) > 1:
            fastest = _fastest_unfused(by_key, workload, shape)
            for backend in fused:
                mine = by_key.get((workload, shape, backend), {})
                row.append(f"{fastest[1] / mine['median_s']:.1f}× ({BACKEND_TITLES[fastest[0]]})"
                           if fastest and "median_s" in mine else "—")
        for backend in fused:
            case = by_key.get((workload, shape, backend), {})
            floors = _floor_seconds(run, workload, list(shape), case.get("input_bytes", 0)) if case else {}
            for kind in floor_kinds:
                ok = "median_s" in case and floors.get(kind)
                row.append(f"{case['median_s'] / floors[kind]:.1f}×" if ok else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if any("loss_rel_error" in by_key.get((workload, shape, b), {}) for shape in shapes for b in present):
        with_grad = workload.endswith("bwd")
        lines += [f"float32 error against float64 on the same input: relative error of Σ_f loss_f"
                  + (" / largest gradient error relative to the largest gradient entry" if with_grad else ""), "",
                  "| B×C×H×W | " + " | ".join(BACKEND_TITLES[b] for b in present) + " |",
                  "|" + "---|" * (len(present) + 1)]
        for shape in shapes:
            row = [_shape(list(shape))]
            for backend in present:
                case = by_key.get((workload, shape, backend), {})
                if "loss_rel_error" not in case:
                    row.append("—")
                    continue
                cell = _error(case["loss_rel_error"])
                if with_grad and "grad_rel_error" in case:
                    cell += f" / {_error(case['grad_rel_error'])}"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{value:.2f}" for value in values)


def _error(value: float) -> str:
    return "NaN" if value != value else f"{value:.1e}"


def _memory_table(cases: list[dict[str, Any]], backends: list[str]) -> list[str]:
    measured = [c for c in cases if "peak_extra_bytes" in c]
    if not measured:
        return []
    keys = sorted(dict.fromkeys((c["workload"], tuple(c["shape"])) for c in measured),
                  key=lambda k: list(WORKLOAD_TITLES).index(k[0]))  # stable: shapes keep the run's order
    by_key = _index(measured)
    lines = ["### Peak extra memory of one step (MiB; in parentheses: × the input map's size)", "",
             "| workload | B×C×H×W | " + " | ".join(BACKEND_TITLES[b] for b in backends) + " |",
             "|" + "---|" * (len(backends) + 2)]
    for workload, shape in keys:
        row = [workload, _shape(list(shape))]
        for backend in backends:
            case = by_key.get((workload, shape, backend))
            if case is None:
                row.append("—")
                continue
            peak = case["peak_extra_bytes"]
            row.append(f"{peak / 2 ** 20:.3g} ({peak / max(case.get('input_bytes', 1), 1):.2g}×)")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def scaling_slopes(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per backend: least-squares slope of log t vs log n over all n, and the slope of the last two n."""
    slopes: dict[str, dict[str, float]] = {}
    for backend in BACKEND_ORDER:
        points = sorted((c["shape"][2], c["median_s"]) for c in run["scaling"]["cases"]
                        if c["backend"] == backend and "median_s" in c)
        if len(points) < 2:
            continue
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(t) for _, t in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        fit = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        slopes[backend] = {"fit": fit, "last": last}
    return slopes


def _scaling_section(run: dict[str, Any], png: Path | None) -> list[str]:
    scaling = run["scaling"]
    cases = [c for c in scaling["cases"] if "median_s" in c]
    if not cases:
        return []
    backends = _backends(cases)
    sizes = sorted({c["shape"][2] for c in cases})
    by_key = {(c["backend"], c["shape"][2]): c for c in cases}
    slopes = scaling_slopes(run)
    lines = [f"### Scaling in n: filter loss forward + backward at B={scaling['B']}, C={scaling['C']}, H=W=n", "",
             "| n | " + " | ".join(BACKEND_TITLES[b] for b in backends) + " |", "|" + "---|" * (len(backends) + 1)]
    for n in sizes:
        lines.append(f"| {n} | " + " | ".join(_ms(by_key.get((b, n), {}).get("median_s")) for b in backends) + " |")
    lines.append("| slope (fit, all n) | " + " | ".join(f"{slopes[b]['fit']:.2f}" if b in slopes else "—"
                                                      for b in backends) + " |")
    if len(sizes) > 1:
        lines.append(f"| slope ({sizes[-2]}→{sizes[-1]}) | " + " | ".join(
            f"{slopes[b]['last']:.2f}" if b in slopes else "—" for b in backends) + " |")
    lines += ["", "The reference materialises B·C·(HW+1)·HW template products, so it grows as n⁴; a fused kernel "
              "using the L1-pyramid structure of the templates should grow as n³ or less (docs/method.md §1). "
              "Small n is dominated by fixed per-call costs, so the last slope is the asymptotic one.", ""]
    if png is not None:
        lines += [f"![time vs n, log-log]({png.as_posix()})", ""]
    return lines


def plot_scaling(run: dict[str, Any], png: Path) -> bool:
    """Log-log plot of time vs n per backend with its fitted slope; False when there is nothing to plot."""
    cases = [c for c in run["scaling"]["cases"] if "median_s" in c]
    if not cases:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    slopes = scaling_slopes(run)
    figure, axes = plt.subplots(figsize=(6, 4.2), dpi=110)
    for backend in _backends(cases):
        points = sorted((c["shape"][2], c["median_s"]) for c in cases if c["backend"] == backend)
        label = BACKEND_TITLES[backend] + (f" (slope {slopes[backend]['fit']:.2f})" if backend in slopes else "")
        axes.plot([n for n, _ in points], [t * 1e3 for _, t in points], marker="o", label=label)
    sizes = sorted({c["shape"][2] for c in cases})
    reference = [c for c in cases if c["backend"] == "reference"]
    anchor = min(reference or cases, key=lambda c: -c["shape"][2])
    for power, style in ((4, ":"), (3, "--")):
        guide = [anchor["median_s"] * 1e3 * (n / anchor["shape"][2]) ** power for n in sizes]
        axes.plot(sizes, guide, style, color="grey", linewidth=0.8, label=f"∝ n^{power}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(sizes)
    axes.set_xticklabels([str(n) for n in sizes])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("n (H = W)")
    axes.set_ylabel("time per step (ms)")
    scaling = run["scaling"]
    threads = run["machine"]["torch_threads"]
    where = f"cpu, {threads} thread{'s' if threads != 1 else ''}" if run["device"] == "cpu" else run["device"]
    axes.set_title(f"filter loss fwd+bwd, B={scaling['B']}, C={scaling['C']} ({where})")
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)
    return True
