"""Issue 11's second configuration at full size: resnet18 on 224-px part world, explained at ``layer3``.

    python experiments/resnet224.py --out /tmp/r224                # one GPU: a few minutes
    python experiments/resnet224.py --out /tmp/r224 --budget 200   # stop starting fits after 200 s

1. Renders part world at 224 px (``--train-images`` for the performer, in parallel processes) and trains a
   torchvision resnet18 (5 classes, ImageNet normalisation as ``Performer.from_torchvision`` applies it).
2. Fits an explainer on ``layer3`` (256 channels, 14×14) with ``fit``'s defaults except ``--fit-epochs``
   (the outside check uses ``fit --epochs 6``) for every seed in ``--seeds`` and every variant in
   ``--variants`` (JSON: name → ExplainerConfig overrides, plus ``part_lr_scale`` for TrainConfig).
3. Evaluates each on held-out images with ``fastexplain.evaluate`` and prints one line per fit; writes
   ``results.json`` and each fit's report folder under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastexplain.checkpoint import explainer_from_state, load_checkpoint
from fastexplain.data.partworld import PartWorld
from fastexplain.evaluate import evaluate, evaluation_data
from fastexplain.performer import IMAGENET_MEAN, IMAGENET_STD, Performer
from fastexplain.train import TrainConfig, fit

SIZE = 224


def _world(args: tuple[int, int, str]) -> PartWorld:
    count, seed, split = args
    return PartWorld(count, SIZE, seed=seed, split=split)


def render(jobs: dict[str, tuple[int, int, str]], workers: int) -> dict[str, PartWorld]:
    """The part worlds ``name → (count, seed, split)``, rendered in ``workers`` processes at once."""
    with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return dict(zip(jobs, pool.map(_world, jobs.values())))


def train_resnet(images: torch.Tensor, labels: torch.Tensor, test: PartWorld, epochs: int, device: str) -> tuple[nn.Module, float]:
    """resnet18 from random init, Adam + one-cycle, bf16 autocast on CUDA; returns it and its test accuracy."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).to(device).to(memory_format=torch.channels_last)
    batch = 64
    steps = math.ceil(len(images) / batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps, pct_start=0.2)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images, labels = images.to(device), labels.to(device)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), device=device)
        for step in range(steps):
            index = order[step * batch:(step + 1) * batch]
            x = (images[index].float() / 255 - mean) / std
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        x = (test.float_images().to(device) - mean) / std
        predictions = torch.cat([model(x[i:i + 100]).argmax(1) for i in range(0, len(x), 100)])
    return model.float().cpu(), float((predictions.cpu() == test.labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--perf-epochs", type=int, default=8)
    parser.add_argument("--fit-images", type=int, default=800)
    parser.add_argument("--fit-epochs", type=int, default=6)
    parser.add_argument("--val-images", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", type=json.loads, default={"defaults": {}})
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which no new fit starts")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    chunk = math.ceil(args.train_images / args.workers)
    jobs = {f"train{k}": (chunk, 1000 + k, "train") for k in range(args.workers)}
    jobs.update(test=(300, 10, "test"), val=(args.val_images, 10, "val"),
                **{f"fit{seed}": (args.fit_images, seed + 21, "train") for seed in args.seeds})
    worlds = render(jobs, args.workers)
    images = torch.cat([worlds[f"train{k}"].images for k in range(args.workers)])
    labels = torch.cat([worlds[f"train{k}"].labels for k in range(args.workers)])
    test, val = worlds["test"], worlds["val"]
    print(f"data rendered in {time.monotonic() - started:.0f} s", flush=True)
    model, accuracy = train_resnet(images, labels, test, args.perf_epochs, device)
    weights = args.out / "resnet18_pw224.pth"
    torch.save(model.state_dict(), weights)
    print(f"resnet18 trained: test accuracy {accuracy:.3f} at {time.monotonic() - started:.0f} s", flush=True)
    results: dict[str, object] = {"performer_accuracy": accuracy, "device": device, "runs": []}
    for seed in args.seeds:
        world = worlds[f"fit{seed}"]
        for name, overrides in args.variants.items():
            if time.monotonic() - started > args.budget:
                print(f"budget spent: {name} seed {seed} not run", flush=True)
                continue
            overrides = dict(overrides)
            train_options = {k: overrides.pop(k) for k in ("part_lr_scale",) if k in overrides}
            performer = Performer.from_torchvision("resnet18", "layer3", weights=str(weights), num_classes=5)
            run_dir = args.out / f"{name}_s{seed}"
            config = TrainConfig(epochs=args.fit_epochs, seed=seed, device=device, **train_options)
            tick = time.monotonic()
            fit(performer, world, run_dir, config, overrides, progress=False)
            fit_s = time.monotonic() - tick
            explainer = explainer_from_state(load_checkpoint(run_dir / "checkpoint.pt"))
            metrics = evaluate(performer, explainer, evaluation_data(val), run_dir, progress=False, device=device)
            p, e = metrics["performer"], metrics["explainer"]
            row = {"variant": name, "seed": seed, "fit_s": fit_s, "performer": p, "explainer": e,
                   "targets": metrics["targets"]}
            results["runs"].append(row)  # type: ignore[union-attr]
            print(f"{name} s{seed}: LI {e['location_instability'] / p['location_instability']:.2f}x "
                  f"PI {e['part_interpretability'] / p['part_interpretability']:.2f}x "
                  f"col {e['colocation']:.3f} (perf {p['colocation']:.3f}) groups {e['colocation_groups']} "
                  f"parts {e['parts_covered']} p {e['p']:.3f} agr {e.get('agreement', float('nan')):.3f} "
                  f"rec {e['reconstruction_error']:.3f} fit {fit_s:.0f}s", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
