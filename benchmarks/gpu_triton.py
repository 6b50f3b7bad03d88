"""GPU check and benchmark of every Triton kernel (issue 12 item 6): correctness first, then timings.

    python benchmarks/gpu_triton.py                      # ~100 s on one H200 (docs/triton-kernels.md)
    python benchmarks/gpu_triton.py --budget 120         # stop timing after 120 s (checks always run)
    TRITON_INTERPRET=1 python benchmarks/gpu_triton.py --smoke --out /tmp/smoke   # CPU, tiny, no GPU needed

Needs a CUDA device unless ``--smoke`` (tiny shapes on whatever device the Triton backend runs on — the
CPU interpreter without a GPU — to check that this script itself works; its times mean nothing).

1. **Checks** (every kernel, before any timing), on every shape, against the float64 reference on the
   same inputs: the filter loss in its fused form (where it fits) and its dense form (fused kernels, each ``tl.dot`` precision in
   --precisions) and its pyramid form (``triton_pyramid``, the large-n form), forward and backward — loss
   within 1e-4 of the largest value, gradient within 1e-4 of the largest value; the pyramid correlation
   op against the dense template product; the ReLU + mask and the mask, argmax and centroid, with and
   without τ, forward and backward, exactly up to float32 rounding (1e-6). A variant that fails is
   reported and not timed.
2. **Timings** (``triton.testing.do_bench``, median ms) of forward and forward + backward for: each
   passing Triton variant; the **textbook form** (``reference.naive_filter_loss_per_filter``: einsum
   logits, logsumexp over the batch, no centring — what public ports ship) eager and under
   ``torch.compile``; the exact reference (eager). Each non-Triton column records its own float32 error
   against float64. The ReLU + mask forward + backward is timed against one copy of x.
3. **Floors and ratios**: the memory-bandwidth floor (read x twice, write dx once, at the
   bandwidth of a measured device copy), each Triton variant's time / floor (goal ≤ 3) and its speed-up
   over the textbook form eager (goal ≥ 20) and compiled; the mask's time / one copy (goal ≤ 2.5).
4. **Scaling in n** at fixed B, C (n = 14, 28, 56): forward + backward of the three forms and
   the slope of log time against log n between the last two sizes (goal for the Triton backend's
   automatic choice: ≤ 3 at n ≥ 28).

5. **Launch sweeps** of the fused form (``triton_fused.LAUNCH``: tiles, warps, stages, precision) and of the gemm
   form's MI kernels (``triton_forms.MI_LAUNCH``: tiles and warps) at the first
   shape, each setting checked against float64 before it is timed (``--no-sweep`` skips it); and a profiler
   table of 10 forward + backward steps of the gemm form.

``--forms`` and ``--skip`` narrow a run to fit a short lease. Timing stops once ``--budget`` seconds have passed (the remaining entries say so); checks always run.
Results: ``<out>/gpu_triton_<device>.json`` and ``.md`` with the device name, versions and date. Only
measured numbers are written; a step that fails records its error instead of a number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from _gpu_triton_report import markdown

DEFAULT_SHAPES = ("64x512x14x14", "32x512x28x28")
SMOKE_SHAPES = ("3x2x4x5",)
SCALING = (16, 256, (14, 28, 56))
SMOKE_SCALING = (2, 1, (3, 4))
RESULTS = Path(__file__).resolve().parent / "results"
BETA = 4.0


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must look like BxCxHxW with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def _loss_and_grad(fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf)
    loss.sum().backward()
    return loss.detach(), leaf.grad


class Bench:
    """Median milliseconds: triton.testing.do_bench on CUDA, perf_counter repeats elsewhere (smoke only)."""

    def __init__(self, device: str, budget_s: float) -> None:
        self.device, self.deadline = device, time.monotonic() + budget_s

    def left(self) -> bool:
        return time.monotonic() < self.deadline

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()  # warm-up, then one timed call: smoke runs only check that this script works
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


# ------------------------------------------------------------------------------------------- variants
def _triton_variant(form: str, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from fastexplain.ops import triton_filter_loss, triton_forms, triton_fused

    def run(x: torch.Tensor) -> torch.Tensor:
        triton_filter_loss.DOT_PRECISION = triton_fused.DOT_PRECISION = precision
        with triton_forms.use_form(form):
            return triton_forms.triton_filter_loss(x, BETA)
    return run


FORMS = ("fused", "dense", "gemm", "pyramid")


def triton_variants(precisions: list[str], shape: tuple[int, ...] | None = None,
                    forms: tuple[str, ...] = FORMS) -> dict[str, Callable]:
    """The Triton forms to check and time; the fused form only on shapes it takes (``triton_fused.fits``)."""
    return {name: fn for name, fn in _all_variants(precisions, shape).items() if name.split("_")[1] in forms}


def _all_variants(precisions: list[str], shape: tuple[int, ...] | None) -> dict[str, Callable]:
    from fastexplain.ops import triton_fused

    variants = {}
    if shape is None or triton_fused.fits(shape[0], shape[2], shape[3]):
        variants.update({f"triton_fused_{p}": _triton_variant("fused", p) for p in precisions})
    variants.update({f"triton_dense_{p}": _triton_variant("dense", p) for p in precisions})
    variants["triton_gemm"] = _triton_variant("gemm", "ieee")
    variants["triton_pyramid"] = _triton_variant("pyramid", "ieee")
    return variants


def baseline_variants(compile_: bool) -> dict[str, Callable]:
    from fastexplain.ops import reference

    variants = {"textbook_eager": lambda x: reference.naive_filter_loss_per_filter(x, BETA)}
    if compile_:
        compiled = torch.compile(reference.naive_filter_loss_per_filter, dynamic=False)
        variants["textbook_compiled"] = lambda x: compiled(x, BETA)
    variants["reference_eager"] = lambda x: reference.filter_loss_per_filter(x, BETA)  # last: no graph capture
    return variants


# --------------------------------------------------------------------------------------------- checks
def check_shape(shape: tuple[int, ...], device: str, precisions: list[str], forms: tuple[str, ...] = FORMS,
                masks: bool = True) -> dict[str, dict]:
    """Every Triton kernel on this shape against the float64 reference (see the module docstring)."""
    from fastexplain.ops import reference, triton_mask, triton_pyramid
    from fastexplain.templates import part_templates

    generator = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=generator)).to(device)
    truth_loss, truth_grad = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, BETA), x.double())
    report: dict[str, dict] = {}
    for name, fn in triton_variants(precisions, shape, forms).items():
        try:
            loss, grad = _loss_and_grad(fn, x)
            loss_error, grad_error = _relative(loss, truth_loss), _relative(grad, truth_grad)
            report[name] = {"loss_rel_error": loss_error, "grad_rel_error": grad_error,
                            "ok": loss_error <= 1e-4 and grad_error <= 1e-4 and bool(torch.isfinite(grad).all())}
        except Exception as error:  # a kernel that does not build or run here: recorded, not timed
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
    if not masks:
        return report
    B, C, H, W = shape
    maps = x[: min(B, 4), : min(C, 8)]
    radius = 2.0 * max(H, W) / BETA
    templates = part_templates(H, W, beta=BETA, dtype=torch.float64, device=device).reshape(H * W + 1, H * W)[1:]
    dense = (maps.double().reshape(*maps.shape[:2], H * W) @ ((templates * 2 * H * W + 1) * max(H, W) / BETA).T)
    pyramid = triton_pyramid.pyramid_correlate(maps.double(), radius).reshape(dense.shape)
    error = _relative(pyramid, dense)
    report["pyramid_correlate_float64"] = {"rel_error": error, "ok": error <= 1e-12}
    signed = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    for center in ("argmax", "centroid"):
        for relu in (True, False):
            for scale in (None, "tau"):
                outputs = {}
                for name, op in (("triton", triton_mask.triton_template_mask), ("reference", reference.template_mask)):
                    leaf = signed.detach().clone().requires_grad_()
                    y = op(leaf, BETA, center, scale, relu)
                    (dx,) = torch.autograd.grad(y, leaf, grad_y)
                    outputs[name] = (y.detach(), dx)
                y_error = float((outputs["triton"][0] - outputs["reference"][0]).abs().max())
                dx_error = float((outputs["triton"][1] - outputs["reference"][1]).abs().max())
                scale_of = float(outputs["reference"][0].abs().max()) + float(grad_y.abs().max())
                report[f"mask_{center}_relu{int(relu)}_{scale or 'none'}"] = {
                    "y_max_abs_error": y_error, "dx_max_abs_error": dx_error,
                    "ok": max(y_error, dx_error) <= 1e-6 * scale_of}
    return report


# -------------------------------------------------------------------------------------------- timings
def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream): its replay has no host overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _timings(bench: Bench, fn: Callable, x: torch.Tensor, graph: bool = True) -> dict[str, float]:
    """Eager times (launches and autograd from Python, as a training loop runs them) and, on CUDA, the
    forward + backward replayed from a CUDA graph: the device time alone, without the host's overhead."""
    leaf = x.detach().clone().requires_grad_()

    def forward_backward() -> None:
        leaf.grad = None
        fn(leaf).sum().backward()
    with torch.no_grad():
        forward_ms = bench(lambda: fn(x))
    result = {"forward_ms": forward_ms, "forward_backward_ms": bench(forward_backward)}
    if bench.device == "cuda" and graph:
        try:
            result["graph_forward_backward_ms"] = bench(_graphed(forward_backward))
        except Exception as error:  # a step that cannot be captured: recorded, never invented
            result["graph_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def _float32_error(fn: Callable, x: torch.Tensor, truth: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    loss, grad = _loss_and_grad(fn, x)
    return {"loss_rel_error_vs_float64": _relative(loss, truth[0]), "grad_rel_error_vs_float64": _relative(grad, truth[1])}


def time_shape(shape: tuple[int, ...], device: str, bench: Bench, variants: dict[str, Callable],
               baselines: dict[str, Callable]) -> dict[str, object]:
    from fastexplain.ops import reference, triton_mask

    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(3))).to(device)
    truth = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, BETA), x.double())
    result: dict[str, object] = {}
    for name, fn in {**variants, **baselines}.items():
        if not bench.left():
            result[name] = {"skipped": "time budget spent"}
            continue
        try:
            # the exact reference checks its input's values (a host sync): it cannot be captured in a graph,
            # and a failed capture can leave the CUDA context unusable for the entries after it
            entry: dict[str, object] = _timings(bench, fn, x, graph=name != "reference_eager")
            if name in baselines:
                entry.update(_float32_error(fn, x, truth))
            result[name] = entry
        except Exception as error:  # e.g. out of memory on a large shape: recorded, never invented
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        if device == "cuda":
            torch.cuda.empty_cache()
    copy_ms = bench(lambda: x.clone())
    bytes_once = x.numel() * x.element_size()
    bandwidth = 2 * bytes_once / (copy_ms * 1e-3)  # a copy reads and writes x once
    result["copy_ms"], result["copy_bandwidth_GBps"] = copy_ms, bandwidth / 1e9
    result["floor_ms"] = 3 * bytes_once / bandwidth * 1e3  # read x twice, write dx once (issue 12 goals)
    signed = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)
    if bench.left():
        mask = _timings(bench, lambda t: triton_mask.triton_template_mask(t, BETA, "argmax", None, True), signed)
        mask["x_copy"] = mask["forward_backward_ms"] / copy_ms
        if "graph_forward_backward_ms" in mask:
            mask["graph_copy_ms"] = bench(_graphed(lambda: signed.clone()))
            mask["graph_x_copy"] = mask["graph_forward_backward_ms"] / mask["graph_copy_ms"]
        result["mask_relu_triton"] = mask
    for name in variants:
        entry = result[name]
        for kind in ("", "graph_"):
            if f"{kind}forward_backward_ms" not in entry:
                continue
            entry[f"{kind}x_floor"] = entry[f"{kind}forward_backward_ms"] / result["floor_ms"]
            for baseline in ("textbook_eager", "textbook_compiled", "reference_eager"):
                other = result.get(baseline, {})
                if f"{kind}forward_backward_ms" in other:
                    entry[f"{kind}speedup_vs_{baseline}"] = (other[f"{kind}forward_backward_ms"]
                                                             / entry[f"{kind}forward_backward_ms"])
    return result


def scaling(device: str, bench: Bench, sweep: tuple) -> dict[str, object]:
    B, C, sizes = sweep
    forms = {"triton_dense_ieee": _triton_variant("dense", "ieee"), "triton_gemm": _triton_variant("gemm", "ieee"),
             "triton_pyramid": _triton_variant("pyramid", "ieee")}
    cases = []
    for n in sizes:
        x = torch.relu(torch.randn((B, C, n, n), generator=torch.Generator().manual_seed(n))).to(device)
        for name, fn in forms.items():
            if not bench.left():
                cases.append({"variant": name, "n": n, "skipped": "time budget spent"})
                continue
            try:
                cases.append({"variant": name, "n": n, **_timings(bench, fn, x)})
            except Exception as error:
                cases.append({"variant": name, "n": n, "error": f"{type(error).__name__}: {error}"[:300]})
    slopes = {}
    for name in forms:
        key = "graph_forward_backward_ms" if all("graph_forward_backward_ms" in c for c in cases) else "forward_backward_ms"
        measured = [(c["n"], c[key]) for c in cases if c["variant"] == name and key in c]
        if len(measured) >= 2:
            (n0, t0), (n1, t1) = measured[-2], measured[-1]
            slopes[name] = math.log(t1 / t0) / math.log(n1 / n0)
    return {"batch": B, "channels": C, "cases": cases, "last_slope": slopes}


MI_SWEEP = ({}, {"SPLIT": 1}, {"SPLIT": 1, "BLOCK_T": 32}, {"SPLIT": 1, "BLOCK_T": 16}, {"BLOCK_T": 32},
            {"num_warps": 8}, {"BLOCK_T": 32, "num_warps": 8}, {"BLOCK_B": 32, "BLOCK_T": 32}, {"BLOCK_T": 128, "num_warps": 8})


def sweep_mi(shape: tuple[int, ...], device: str, bench: Bench, launches: tuple = MI_SWEEP) -> list[dict]:
    """The gemm form's MI kernels (``triton_forms.MI_LAUNCH``) under each launch setting: checked against the
    float64 reference on the same logits (loss and ∂loss/∂s within 1e-4), then timed (forward; Ḡ + ∂s)."""
    from fastexplain.ops import reference, triton_forms
    from fastexplain.templates import template_priors

    B, C, H, W = shape
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(6))).to(device)
    logits = triton_forms.gemm_logits(x, BETA).detach()
    weights = torch.rand(C, generator=torch.Generator().manual_seed(7)).to(device)
    leaf = logits.double().requires_grad_()
    priors = template_priors(H, W, dtype=torch.float64, device=device)
    truth = -reference.mutual_information(leaf.transpose(0, 1), priors)
    (truth * weights.double()).sum().backward()
    rows = []
    for launch in launches:
        if not bench.left():
            rows.append({"launch": launch, "skipped": "time budget spent"})
            continue
        triton_forms.MI_LAUNCH.clear()
        triton_forms.MI_LAUNCH.update(launch)
        try:
            loss, lme, v = triton_forms.logits_mi_forward(logits)
            ds = triton_forms.logits_mi_backward(logits, lme, v, weights)
            row = {"launch": launch, "loss_rel_error": _relative(loss, truth.detach()),
                   "ds_rel_error": _relative(ds, leaf.grad)}
            row["ok"] = row["loss_rel_error"] <= 1e-4 and row["ds_rel_error"] <= 1e-4
            if row["ok"]:
                row["forward_ms"] = bench(lambda: triton_forms.logits_mi_forward(logits))
                row["backward_ms"] = bench(lambda: triton_forms.logits_mi_backward(logits, lme, v, weights))
            rows.append(row)
        except Exception as error:  # a setting that does not build (e.g. out of registers): recorded
            rows.append({"launch": launch, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]})
        finally:
            triton_forms.MI_LAUNCH.clear()
    return rows


FUSED_SWEEP = tuple({"BLOCK_K": k, "BLOCK_I": i, "num_warps": w, "num_stages": st, "precision": p}
                    for p in ("tf32x3", "ieee") for (k, i, w, st) in (
                        (32, 64, 8, 1), (32, 64, 16, 1), (16, 32, 16, 1), (16, 32, 8, 1), (32, 32, 4, 1),
                        (64, 64, 16, 1), (32, 64, 8, 2)))


def sweep_fused(shape: tuple[int, ...], device: str, bench: Bench, launches: tuple = FUSED_SWEEP) -> list[dict]:
    """The fused form under each launch (``triton_fused.LAUNCH`` and precision): checked against float64, then
    timed forward + backward (eager and from a CUDA graph)."""
    from fastexplain.ops import reference, triton_fused

    if not triton_fused.fits(shape[0], shape[2], shape[3]):
        return []
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(5))).to(device)
    truth = _loss_and_grad(lambda t: reference.filter_loss_per_filter(t, BETA), x.double())
    default, rows = dict(triton_fused.LAUNCH), []
    for launch in launches:
        row: dict[str, object] = dict(launch)
        if not bench.left():
            rows.append({**row, "skipped": "time budget spent"})
            continue
        triton_fused.LAUNCH.update({k: v for k, v in launch.items() if k != "precision"})
        try:
            fn = _triton_variant("fused", str(launch["precision"]))
            row.update(_float32_error(fn, x, truth))
            row["ok"] = row["loss_rel_error_vs_float64"] <= 1e-4 and row["grad_rel_error_vs_float64"] <= 1e-4
            if row["ok"]:
                row.update(_timings(bench, fn, x))
        except Exception as error:
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
        finally:
            triton_fused.LAUNCH.clear()
            triton_fused.LAUNCH.update(default)
        rows.append(row)
    return rows


def profile(shape: tuple[int, ...], fn: Callable, rows: int = 14) -> str:
    """torch.profiler's table of device kernels for 10 forward + backward steps of ``fn`` (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(5))).cuda().requires_grad_()
    for _ in range(3):
        fn(x).sum().backward()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            x.grad = None
            fn(x).sum().backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=None)
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3"], choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which timing stops (default 200)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(textbook) column")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device the backend runs on")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch sweeps (fused form, gemm's MI kernels)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="Triton forms to check and time")
    parser.add_argument("--skip", nargs="+", default=[], choices=["masks", "scaling", "mi_sweep", "profile"],
                        help="parts to leave out (a short GPU lease)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    from fastexplain.ops import _registry

    try:
        backend = _registry.load("triton")
    except _registry.BackendUnavailable as error:
        print(f"gpu_triton.py: {error}; wrote nothing", file=sys.stderr)
        return 2
    if "cuda" in backend.device_types:
        device = "cuda"
    elif args.smoke:
        device = "cpu"
    else:
        print("gpu_triton.py: no CUDA device here; this benchmark only runs on a GPU (or with --smoke) and wrote "
              "nothing", file=sys.stderr)
        return 2
    import triton

    shapes = args.shapes or [_parse_shape(s) for s in (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)]
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (Triton interpreter)"
    report: dict[str, object] = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench, median ms" if device == "cuda" else "perf_counter, one call (smoke)",
        "shapes": {}}
    bench = Bench(device, args.budget)
    baselines = baseline_variants(compile_=not args.no_compile)
    status = 0
    for shape in shapes:
        key = "x".join(map(str, shape))
        try:
            checks = check_shape(shape, device, args.precisions, tuple(args.forms), "masks" not in args.skip)
        except Exception:
            checks = {"check_shape": {"ok": False, "error": traceback.format_exc()[-500:]}}
        status |= int(not all(c["ok"] for c in checks.values()))
        passing = {name: fn for name, fn in triton_variants(args.precisions, shape, tuple(args.forms)).items()
                   if checks.get(name, {}).get("ok")}
        entry: dict[str, object] = {"checks": checks}
        entry["timings"] = time_shape(shape, device, bench, passing, baselines)
        report["shapes"][key] = entry  # type: ignore[index]
        print(f"{key}: checks {'ok' if all(c['ok'] for c in checks.values()) else 'FAILED'}", flush=True)
    if not args.no_sweep:  # before the scaling sweep: the budget ran out before it on the H200 (2026-11-28)
        report["fused_sweep"] = sweep_fused(shapes[0], device, bench, FUSED_SWEEP if device == "cuda" else FUSED_SWEEP[:2])
        status |= int(not all(row.get("ok", True) for row in report["fused_sweep"]))
        if "mi_sweep" not in args.skip:
            report["mi_sweep"] = sweep_mi(shapes[0], device, bench, MI_SWEEP if device == "cuda" else MI_SWEEP[:2])
            status |= int(not all(row.get("ok", True) for row in report["mi_sweep"]))
    if "scaling" not in args.skip:
        report["scaling"] = scaling(device, bench, SMOKE_SCALING if args.smoke else SCALING)
    if device == "cuda" and bench.left() and "profile" not in args.skip:
        try:
            report["profile"] = profile(shapes[0], _triton_variant("auto", "ieee"))
        except Exception as error:
            report["profile"] = f"profiler failed: {type(error).__name__}: {error}"[:500]
    report["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    path = args.out / f"gpu_triton_{slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {path} and {path.with_suffix('.md')} in {report['seconds']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
