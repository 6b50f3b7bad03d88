"""Where the time of one explainer training step goes (issue 12, item 5), and what speeds up its convolutions.

    .venv/bin/python benchmarks/profile_step.py                   # VGG-16 conv5 (64×512×14×14), 224 px images
    .venv/bin/python benchmarks/profile_step.py --batch 8 --quick # a small check of the pipeline

One step is ``fastexplain.train.train_step``'s work, written out so that each part can be labelled: the
frozen performer's forward pass (x* and its logits), the explainer's forward pass, its backward pass and the
Adam update. Every convolution of the explainer is labelled by its module name, forward and backward (module
hooks open and close ``torch.profiler.record_function`` ranges), and the fused ops are found by name
(``fastexplain::filter_loss_*``, ``fastexplain::template_mask_*``). The step is profiled after warm-up steps;
the table gives wall time per part (the profiler's view of the main and autograd threads), its share of the
step, and of the explainer step without the performer.

Then the explainer step alone (without the performer's forward pass, which a training loop cannot avoid
but which no explainer option changes) is timed with the convolution options that the CPU offers:
channels_last memory format for the explainer and x*, and bfloat16 autocast (oneDNN, AMX where the CPU has it).
Writes ``benchmarks/results/profile-step.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="profile one explainer training step")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--layer", default="features.29", help="the performer layer explained (VGG-16 relu5_3)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="timed explainer steps per conv option")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="skip the conv-option comparison")
    parser.add_argument("--option-batch", type=int, default=16,
                        help="images per performer forward in the conv-option comparison (default 16)")
    parser.add_argument("--only-performer-options", action="store_true",
                        help="only compare the performer forward's conv options (update an existing JSON)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profile-step.json")
    return parser.parse_args(argv)


class ModuleRanges:
    """record_function ranges around the forward and backward passes of the named modules."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.handles = []
        self.open: dict[tuple[str, str], Any] = {}
        self.input_needs_grad: dict[str, bool] = {}
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._opener(name, "forward")))
            self.handles.append(module.register_forward_hook(self._closer(name, "forward")))
            self.handles.append(module.register_full_backward_pre_hook(self._opener(name, "backward")))
            self.handles.append(module.register_full_backward_hook(self._closer(name, "backward")))

    def _opener(self, name: str, phase: str):
        def hook(module, inputs, *_):
            if phase == "forward":
                self.input_needs_grad[name] = bool(inputs and getattr(inputs[0], "requires_grad", False))
            elif not self.input_needs_grad.get(name, True):
                return  # the full backward hooks would fire on the output gradient only: an empty range
            scope = torch.profiler.record_function(f"{phase} {name}")
            scope.__enter__()
            self.open[(name, phase)] = scope
        return hook

    def _closer(self, name: str, phase: str):
        def hook(*_):
            scope = self.open.pop((name, phase), None)
            if scope is not None:
                scope.__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def build(args: argparse.Namespace):
    from fastexplain.nn import Explainer
    from fastexplain.performer import Performer
    from fastexplain.train import make_explainer_config

    performer = Performer.from_torchvision(args.model, args.layer)
    config = make_explainer_config(performer, (args.image, args.image), None)  # the defaults `fit` uses
    explainer = Explainer(config).train()
    optimizer = torch.optim.Adam(explainer.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.image, args.image, generator=generator)
    return performer, explainer, optimizer, images, config


def explainer_step(performer, explainer, optimizer, features, images, *, autocast: bool = False) -> None:
    head = (lambda feature: performer.run_head(feature, images)) if performer.has_head else None
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        output = explainer(features.input, features.target, performer_logits=features.logits, head=head)
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function("explainer backward"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        output.losses.total.backward()
    with torch.profiler.record_function("optimizer (Adam)"):
        optimizer.step()


def profiled_step(performer, explainer, optimizer, images) -> dict[str, float]:
    """Wall time (s) per labelled part of one full step, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    convs = {name: module for name, module in explainer.named_modules() if isinstance(module, nn.Conv2d)}
    ranges = ModuleRanges(convs)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            with torch.profiler.record_function("performer forward"), torch.no_grad():
                features = performer.features(images)
            with torch.profiler.record_function("explainer forward + backward + Adam"):
                explainer_step(performer, explainer, optimizer, features, images)
            total = time.perf_counter() - start
    finally:
        ranges.remove()
    parts: dict[str, float] = defaultdict(float)
    for event in prof.events():
        name = event.name
        seconds = event.cpu_time_total / 1e6  # inclusive wall time of the range / op on its thread
        if name in ("performer forward", "explainer forward + backward + Adam", "explainer backward",
                    "optimizer (Adam)") or name.startswith(("forward ", "backward ")):
            parts[name] += seconds
        elif name.startswith("fastexplain::"):
            parts[name] += seconds
        elif name.startswith("Optimizer.step"):
            parts["Optimizer.step"] += seconds
        elif name == "autograd::engine::evaluate_function: ConvolutionBackward0":
            parts["all conv backward"] += seconds
    parts["step (wall)"] = total
    return dict(parts)


def time_explainer(performer, explainer, optimizer, images, features, reps: int, *, channels_last: bool,
                   autocast: bool) -> float:
    """Median seconds of the explainer's step alone (x* computed once, outside the timing)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    explainer.to(memory_format=memory_format)
    features = type(features)(*[t.contiguous(memory_format=memory_format) if isinstance(t, torch.Tensor)
                                and t.dim() == 4 else t for t in features])
    explainer_step(performer, explainer, optimizer, features, images, autocast=autocast)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        explainer_step(performer, explainer, optimizer, features, images, autocast=autocast)
        times.append(time.perf_counter() - start)
    explainer.to(memory_format=torch.contiguous_format)
    return statistics.median(times)


def time_performer(performer, images, reps: int, *, channels_last: bool, autocast: bool) -> float:
    """Median seconds of the frozen performer's forward pass (x* and logits) with a conv option."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    performer.to(memory_format=memory_format)
    batch = images.contiguous(memory_format=memory_format)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        with torch.no_grad(), context:
            performer.features(batch)
        if rep:  # the first run is the warm-up (oneDNN primitive creation, weight reorders)
            times.append(time.perf_counter() - start)
    performer.to(memory_format=torch.contiguous_format)
    return statistics.median(times)


def performer_options(performer, images, reps: int) -> dict[str, float]:
    options = {}
    for channels_last in (False, True):
        for autocast in (False, True):
            key = f"{'channels_last' if channels_last else 'contiguous'}, {'bf16 autocast' if autocast else 'fp32'}"
            options[key] = time_performer(performer, images, reps, channels_last=channels_last, autocast=autocast)
            print(f"performer forward ({images.shape[0]} images), {key}: {options[key] * 1e3:.0f} ms", flush=True)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import _bench_measure

    load_start = _bench_measure.load_average()
    performer, explainer, optimizer, images, config = build(args)
    if args.only_performer_options:
        result = json.loads(args.out.read_text())
        result["performer_options"] = performer_options(performer, images[:args.option_batch], args.reps)
        result["performer_options_batch"] = args.option_batch
        result["performer_options_load_average"] = _bench_measure.load_average()
        args.out.write_text(json.dumps(result, indent=1))
        print(markdown(result))
        return 0
    for _ in range(args.warmup):
        with torch.no_grad():
            features = performer.features(images)
        explainer_step(performer, explainer, optimizer, features, images)
    parts = profiled_step(performer, explainer, optimizer, images)
    with torch.no_grad():
        features = performer.features(images)
    x_star = features.input
    options = {}
    if not args.quick:
        for channels_last in (False, True):
            for autocast in (False, True):
                key = f"{'channels_last' if channels_last else 'contiguous'}, {'bf16 autocast' if autocast else 'fp32'}"
                options[key] = time_explainer(performer, explainer, optimizer, images, features, args.reps,
                                              channels_last=channels_last, autocast=autocast)
                print(f"explainer step, {key}: {options[key] * 1e3:.0f} ms", flush=True)
    performer_times = {} if args.quick else performer_options(performer, images[:args.option_batch], args.reps)
    result = {"machine": _bench_measure.machine_info(), "load_average_start": load_start,
              "load_average_end": _bench_measure.load_average(), "model": args.model, "layer": args.layer,
              "batch": args.batch, "image": args.image, "x_star_shape": list(x_star.shape),
              "parts": parts, "explainer_step_options": options, "performer_options": performer_times,
              "performer_options_batch": args.option_batch,
              "explainer_config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                   for k, v in vars(config).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    parts = result["parts"]
    step = parts["step (wall)"]
    explainer = parts.get("explainer forward + backward + Adam", 0.0)
    rows = [("performer forward (frozen, no grad)", parts.get("performer forward", 0.0))]
    conv_names = sorted({name.split(" ", 1)[1] for name in parts if name.startswith(("forward ", "backward "))})
    for name in conv_names:
        rows.append((f"conv `{name}` forward", parts.get(f"forward {name}", 0.0)))
    # A conv whose input needs no gradient (the two reading x*) has no module-level backward range: its backward
    # (weight gradient only) is the rest of all ConvolutionBackward0 time.
    unattributed = parts.get("all conv backward", 0.0)
    no_input_grad = []
    for name in conv_names:
        seconds = parts.get(f"backward {name}", 0.0)
        if seconds > 0:
            rows.append((f"conv `{name}` backward", seconds))
            unattributed -= seconds
        else:
            no_input_grad.append(name)
    if no_input_grad:
        rows.append((f"convs {', '.join(f'`{n}`' for n in no_input_grad)} backward (weight gradients only)",
                     max(unattributed, 0.0)))
    fused = {name: seconds for name, seconds in parts.items() if name.startswith("fastexplain::")}
    loss = sum(s for n, s in fused.items() if "filter_loss" in n)
    masks = sum(s for n, s in fused.items() if "template_mask" in n)
    for name in sorted(fused):
        rows.append((f"`{name}`", fused[name]))
    rows.append(("optimizer (Adam step + zero_grad)", parts.get("optimizer (Adam)", 0.0)))
    accounted = sum(seconds for label, seconds in rows)
    rows.append(("rest of the explainer (ReLUs, normalisation, losses, decoder glue, autograd)",
                 max(step - accounted, 0.0)))
    lines = [f"One training step, {result['model']} `{result['layer']}`, x* {'×'.join(map(str, result['x_star_shape']))}, "
             f"batch {result['batch']} of {result['image']} px images; {result['machine']['torch_threads']} threads; "
             f"load average {result['load_average_start']} → {result['load_average_end']}", "",
             "| part | time | share of the step | share of the explainer step |", "|---|---|---|---|"]
    for label, seconds in rows:
        lines.append(f"| {label} | {seconds * 1e3:.0f} ms | {100 * seconds / step:.1f}% | "
                     + (f"{100 * seconds / explainer:.1f}% |" if explainer and "performer" not in label else "— |"))
    lines.append(f"| **step** | {step * 1e3:.0f} ms | 100% | |")
    lines += ["", f"Filter loss (forward + backward) {loss * 1e3:.0f} ms + masks {masks * 1e3:.0f} ms = "
              f"{100 * (loss + masks) / step:.1f}% of the step, {100 * (loss + masks) / explainer:.1f}% of the "
              f"explainer's part (goal ≤ 5%).", ""]
    if result["explainer_step_options"]:
        base = result["explainer_step_options"].get("contiguous, fp32")
        lines += ["| explainer step (no performer) | median | vs contiguous fp32 |", "|---|---|---|"]
        for key, seconds in result["explainer_step_options"].items():
            lines.append(f"| {key} | {seconds * 1e3:.0f} ms | {base / seconds:.2f}× |")
        lines.append("")
    if result.get("performer_options"):
        base = result["performer_options"].get("contiguous, fp32")
        lines += [f"| performer forward ({result.get('performer_options_batch')} images, no grad) | median | "
                  f"vs contiguous fp32 |", "|---|---|---|"]
        for key, seconds in result["performer_options"].items():
            lines.append(f"| {key} | {seconds * 1e3:.0f} ms | {base / seconds:.2f}× |")
        if result.get("performer_options_load_average"):
            lines.append(f"\n(load average at the end of this comparison: {result['performer_options_load_average']})")
        best = min(result["performer_options"], key=result["performer_options"].get)
        performer_share = parts.get("performer forward", 0.0) / step
        gain = base / result["performer_options"][best]
        lines += ["", f"The frozen performer's forward pass is {100 * performer_share:.0f}% of the step, so it is what to "
                  f"speed up: its fastest option here is **{best}**, {gain:.2f}× its contiguous fp32 run (oneDNN "
                  f"convolutions in bfloat16, on AMX tiles where the CPU has them, need channels_last to avoid "
                  f"reorders). At that speed the step would take about "
                  f"{(step - parts.get('performer forward', 0.0) * (1 - 1 / gain)) * 1e3:.0f} ms instead of "
                  f"{step * 1e3:.0f} ms. The explainer's own convolutions gain less at this size (table above; "
                  f"timings on a loaded machine, medians of a few steps)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
