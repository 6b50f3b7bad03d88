"""Issue 11's second configuration at full size: resnet18 on 224-px part world, explained at ``layer3``.

    python experiments/resnet224.py --out /tmp/r224                # one GPU: a few minutes
    python experiments/resnet224.py --out /tmp/r224 --budget 200   # stop starting fits after 200 s

1. Renders part world at 224 px (``--train-images`` for the performer, in parallel processes) and trains a
   torchvision resnet18 (5 classes, ImageNet normalisation as ``Performer.from_torchvision`` applies it).
2. Fits an explainer on ``layer3`` (256 channels, 14×14) with ``fit``'s defaults except ``--fit-epochs``
   (the outside check uses ``fit --epochs 6``) for every seed in ``--seeds`` and every variant in
   ``--variants`` (JSON: name → ExplainerConfig overrides, plus ``part_lr_scale`` for TrainConfig).
3. Evaluates each on held-out images with ``fastexplain.evaluate`` and prints one line per fit; writes
   ``results.json`` and each fit's report folder under ``--out``. ``--parallel K`` runs K fits at once
   (spawned worker processes sharing the GPU; the CPU-bound evaluation is most of a fit's time).
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


def train_resnet(images: torch.Tensor, labels: torch.Tensor, test: PartWorld, epochs: int, device: str,
                 seed: int = 0) -> tuple[nn.Module, float]:
    """resnet18 from random init (``seed``), Adam + one-cycle, bf16 autocast on CUDA; returns it and its test accuracy."""
    torch.manual_seed(seed)
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


def fit_and_evaluate(job: tuple) -> dict[str, object]:
    """One variant and seed: ``fit`` with its overrides, then ``evaluate`` on the held-out images (runs in a
    worker process, so that several fits share the GPU)."""
    name, overrides, seed, world, val, weights, out, fit_epochs, device, threads, performer_tag = job
    torch.set_num_threads(threads)
    train_options = {k: overrides.pop(k) for k in ("part_lr_scale", "refine_epochs", "epochs") if k in overrides}
    performer = Performer.from_torchvision("resnet18", "layer3", weights=weights, num_classes=5)
    run_dir = out / f"{name}_s{seed}{performer_tag}"
    config = TrainConfig(**{"epochs": fit_epochs, "seed": seed, "device": device, **train_options})
    tick = time.monotonic()
    fit(performer, world, run_dir, config, overrides, progress=False)
    fit_s = time.monotonic() - tick
    explainer = explainer_from_state(load_checkpoint(run_dir / "checkpoint.pt"))
    metrics = evaluate(performer, explainer, evaluation_data(val), run_dir, progress=False, device=device)
    return {"variant": name, "seed": seed, "performer_seed": performer_tag, "fit_s": fit_s, "performer": metrics["performer"],
            "explainer": metrics["explainer"], "targets": metrics["targets"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--perf-epochs", type=int, default=8)
    parser.add_argument("--fit-images", type=int, default=800)
    parser.add_argument("--fit-epochs", type=int, default=6)
    parser.add_argument("--val-images", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--performer-seeds", type=int, nargs="+", default=[0], help="one resnet18 per seed")
    parser.add_argument("--variants", type=json.loads, default={"defaults": {}})
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which no new fit starts")
    parser.add_argument("--parallel", type=int, default=1, help="fits at once (worker processes sharing the GPU)")
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
    results: dict[str, object] = {"performer_accuracy": {}, "device": device, "runs": []}
    jobs_to_run = []
    for performer_seed in args.performer_seeds:
        model, accuracy = train_resnet(images, labels, test, args.perf_epochs, device, performer_seed)
        weights = args.out / f"resnet18_pw224_p{performer_seed}.pth"
        torch.save(model.state_dict(), weights)
        results["performer_accuracy"][performer_seed] = accuracy  # type: ignore[index]
        print(f"resnet18 (seed {performer_seed}) trained: test accuracy {accuracy:.3f} at "
              f"{time.monotonic() - started:.0f} s", flush=True)
        tag = "" if performer_seed == 0 else f"_p{performer_seed}"
        jobs_to_run += [(name, dict(overrides), seed, worlds[f"fit{seed}"], val, str(weights), args.out, args.fit_epochs,
                         device, max(1, 16 // args.parallel), tag)
                        for seed in args.seeds for name, overrides in args.variants.items()]
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=context) as pool:
        pending = []
        for job in jobs_to_run:
            pending.append(pool.submit(fit_and_evaluate, job))
        for future in pending:
            if time.monotonic() - started > args.budget:
                future.cancel()
            try:
                row = future.result()
            except Exception as error:  # noqa: BLE001 - one failed variant must not lose the others
                print(f"fit failed: {type(error).__name__}: {error}", flush=True)
                continue
            results["runs"].append(row)  # type: ignore[union-attr]
            p, e = row["performer"], row["explainer"]
            print(f"{row['variant']} s{row['seed']}{row['performer_seed']}: LI {e['location_instability'] / p['location_instability']:.2f}x "
                  f"PI {e['part_interpretability'] / p['part_interpretability']:.2f}x "
                  f"col {e['colocation']:.3f} (perf {p['colocation']:.3f}) groups {e['colocation_groups']} "
                  f"parts {e['parts_covered']} p {e['p']:.3f} agr {e.get('agreement', float('nan')):.3f} "
                  f"rec {e['reconstruction_error']:.3f} fit {row['fit_s']:.0f}s", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
