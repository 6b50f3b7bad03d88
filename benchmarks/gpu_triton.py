"""GPU check and benchmark of the Triton backend (issue 4, SPEC §7): correctness first, then timings.

    python benchmarks/gpu_triton.py [--shapes 64x512x14x14 64x512x28x28] [--out benchmarks/results]

Needs a CUDA device (it refuses to run without one and writes nothing). For every shape it

1. checks the Triton filter loss (float32, each tl.dot precision in --precisions) against the float64
   reference (loss within 1e-4 relative, gradient within 1e-4 of max|grad|) and the mask + ReLU against
   the reference exactly; a precision that fails is reported and not timed;
2. times with ``triton.testing.do_bench`` (median, ms) forward, backward and forward+backward of the
   Triton filter loss, the eager reference and ``torch.compile`` of the reference, plus mask + ReLU
   forward+backward and a plain copy of x;
3. compares forward+backward with the memory-bandwidth floor of SPEC §7 (read x twice, write dx once)
   at the bandwidth of a measured device copy, and with the eager reference (target: ≥ 20× faster).

Results go to ``<out>/gpu_triton_<device>.json`` with the device name, versions and date. Only measured
numbers are written; a step that fails records its error instead of a number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

DEFAULT_SHAPES = ("64x512x14x14", "64x512x28x28")
RESULTS = Path(__file__).resolve().parent / "results"


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must look like BxCxHxW with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def _loss_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, 4.0)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def check_shape(shape, precisions) -> dict[str, object]:
    """Correctness of every precision on this shape and of the mask, against the float64 reference."""
    from fastexplain.ops import reference, triton_filter_loss, triton_mask

    x = torch.rand(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    expected_loss, expected_grad = _loss_and_grad(reference.filter_loss_per_filter, x.double())
    report: dict[str, object] = {}
    for precision in precisions:
        triton_filter_loss.DOT_PRECISION = precision
        loss, grad = _loss_and_grad(triton_filter_loss.triton_filter_loss, x)
        loss_error, grad_error = _relative(loss, expected_loss), _relative(grad, expected_grad)
        report[f"filter_loss_{precision}"] = {"loss_rel_error": loss_error, "grad_rel_error": grad_error,
                                               "ok": loss_error <= 1e-4 and grad_error <= 1e-4}
    signed = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for center in ("argmax", "centroid"):
        y = triton_mask.triton_template_mask(signed, 4.0, center, None, True)
        expected = reference.template_mask(signed, 4.0, center, None, True)
        report[f"mask_{center}"] = {"max_abs_error": float((y - expected).abs().max()),
                                    "ok": bool(torch.allclose(y, expected, rtol=1e-6, atol=1e-6))}
    return report


def time_shape(shape, precisions) -> dict[str, object]:
    """Median milliseconds of every variant on this shape (do_bench), and the derived ratios."""
    from triton.testing import do_bench

    from fastexplain.ops import reference, triton_filter_loss, triton_mask

    x = torch.rand(shape, device="cuda").requires_grad_()
    signed = torch.randn(shape, device="cuda").requires_grad_()

    def timings(fn, leaf) -> dict[str, float]:
        out = fn(leaf)
        return {
            "forward_ms": do_bench(lambda: fn(leaf), return_mode="median"),
            "backward_ms": do_bench(lambda: out.backward(torch.ones_like(out), retain_graph=True),
                                    grad_to_none=[leaf], return_mode="median"),
            "forward_backward_ms": do_bench(lambda: fn(leaf).backward(torch.ones_like(out)),
                                            grad_to_none=[leaf], return_mode="median"),
        }

    result: dict[str, object] = {}
    for precision in precisions:
        triton_filter_loss.DOT_PRECISION = precision
        result[f"triton_{precision}"] = timings(lambda t: triton_filter_loss.triton_filter_loss(t, 4.0), x)
    for name, fn in (("reference_eager", reference.filter_loss_per_filter),
                     ("reference_compiled", torch.compile(reference.filter_loss_per_filter))):
        try:
            result[name] = timings(lambda t, fn=fn: fn(t, 4.0), x)
        except Exception as error:  # e.g. out of memory on large shapes: record, do not invent a number
            result[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    result["mask_relu_triton"] = timings(lambda t: triton_mask.triton_template_mask(t, 4.0, "argmax", None, True), signed)
    result["mask_relu_reference"] = timings(lambda t: reference.template_mask(t, 4.0, "argmax", None, True), signed)
    copy_ms = do_bench(lambda: x.detach().clone(), return_mode="median")
    bytes_once = x.numel() * x.element_size()
    bandwidth = 2 * bytes_once / (copy_ms * 1e-3)  # a copy reads and writes x once each
    result["copy_ms"] = copy_ms
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    result["floor_ms"] = 3 * bytes_once / bandwidth * 1e3  # read x twice, write dx once (SPEC §7)
    for precision in precisions:
        triton_ms = result[f"triton_{precision}"]["forward_backward_ms"]
        entry = result[f"triton_{precision}"]
        entry["x_floor"] = triton_ms / result["floor_ms"]
        eager = result["reference_eager"]
        if "forward_backward_ms" in eager:
            entry["speedup_vs_eager"] = eager["forward_backward_ms"] / triton_ms
        compiled = result["reference_compiled"]
        if "forward_backward_ms" in compiled:
            entry["speedup_vs_compiled"] = compiled["forward_backward_ms"] / triton_ms
    result["mask_relu_triton"]["x_copy"] = result["mask_relu_triton"]["forward_backward_ms"] / copy_ms
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=[_parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3"], choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_triton.py: no CUDA device here; this benchmark only runs on a GPU and wrote nothing",
              file=sys.stderr)
        return 2
    import triton

    from fastexplain.ops import _registry, triton_filter_loss

    backend = _registry.load("triton")
    if "cuda" not in backend.device_types:
        print("gpu_triton.py: the Triton backend cannot run on CUDA here", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0)
    report = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "timing": "triton.testing.do_bench, median ms", "shapes": {}}
    default_precision = triton_filter_loss.DOT_PRECISION
    for shape in args.shapes:
        key = "x".join(map(str, shape))
        checks = check_shape(shape, args.precisions)
        passing = [p for p in args.precisions if checks[f"filter_loss_{p}"]["ok"]]
        entry: dict[str, object] = {"checks": checks}
        entry["timings"] = time_shape(shape, passing) if passing else {"error": "no precision passed the checks"}
        triton_filter_loss.DOT_PRECISION = default_precision
        report["shapes"][key] = entry
        print(json.dumps({key: entry}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    path = args.out / f"gpu_triton_{slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
