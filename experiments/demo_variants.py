"""Issue 11's demo harness: `fastexplain demo` with ExplainerConfig overrides, on several seeds, reusing performers.

    python experiments/demo_variants.py --out /tmp/dv --performers /tmp/demo_s{seed} --seeds 0 1 2 \
        --variants '{"defaults": {}, "c2000": {"constellation_weight": 2000}}' --parallel 2 --threads 1

Each (variant, seed) runs ``fastexplain.demo.run_demo`` in its own process and folder ``OUT/<variant>_s<seed>``,
with the performer of ``--performers`` (a folder of an earlier ``fastexplain demo --seed S --out …`` run, ``{seed}``
replaced) copied into its cache, so only the explainer is trained. Prints one line per run and writes
``OUT/results.json`` with every run's SPEC §7 targets (docs/diversity-experiments.md keeps the tables).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

NAMES = {"location_instability_ratio": "LI", "part_interpretability_ratio": "PI", "colocation_ratio": "col",
         "colocation_group_fraction": "groups", "parts_covered": "parts", "p": "p", "agreement": "agr"}


_SHIPPED_TRAIN_CONFIG: type | None = None  # fastexplain.train.TrainConfig as imported first in this worker


def _use_train_overrides(train: dict) -> Any:
    """Make fastexplain.train.TrainConfig default to ``train``'s values (on top of the shipped class, so one job's
    overrides never leak into the next job of the same worker); returns the demo settings that carry them."""
    global _SHIPPED_TRAIN_CONFIG
    import dataclasses

    import fastexplain.train as training
    from fastexplain.demo import DemoSettings

    if _SHIPPED_TRAIN_CONFIG is None:
        _SHIPPED_TRAIN_CONFIG = training.TrainConfig
    training.TrainConfig = _SHIPPED_TRAIN_CONFIG if not train else dataclasses.make_dataclass(
        "TrainConfig", [(key, type(value), dataclasses.field(default=value)) for key, value in train.items()],
        bases=(_SHIPPED_TRAIN_CONFIG,))
    # run_demo passes its own epochs, refinement epochs and batch size from DemoSettings, whose defaults were read
    # from TrainConfig when fastexplain.demo was imported: set them from this job's TrainConfig
    effective = training.TrainConfig()
    return dataclasses.replace(DemoSettings(), explainer_epochs=effective.epochs,
                               explainer_refine_epochs=effective.refine_epochs,
                               explainer_batch_size=effective.batch_size)


def _run(job: tuple[str, dict, int, str, str, int]) -> dict:
    name, options, seed, out, performers, threads = job
    torch.set_num_threads(threads)
    options = dict(options)
    settings = _use_train_overrides(options.pop("train", {}))
    from fastexplain.demo import cache_dir, run_demo

    folder = Path(out) / f"{name}_s{seed}"
    cache = cache_dir(folder, quick=False, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    source = cache_dir(Path(performers.format(seed=seed)), quick=False, seed=seed) / "performer.pt"
    if not (cache / "performer.pt").exists():
        shutil.copy(source, cache / "performer.pt")
    started = time.perf_counter()
    metrics = run_demo(folder, progress=False, explainer_options=options, settings=settings, seed=seed)
    targets = {t["name"]: t["value"] for t in metrics["targets"]}
    return {"variant": name, "seed": seed, "options": options, "seconds": time.perf_counter() - started,
            "targets": targets, "best_parts": metrics["explainer"]["best_part_histogram"],
            "reconstruction": metrics["explainer"]["reconstruction_error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--performers", required=True, help="folder of a demo run per seed, with {seed}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", required=True,
                        help='JSON: name → ExplainerConfig overrides, and "train": TrainConfig overrides')
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = json.loads(args.variants)
    jobs = [(name, options, seed, str(args.out), args.performers, args.threads)
            for name, options in variants.items() for seed in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(_run, jobs):
            results.append(result)
            results_path.write_text(json.dumps(results, indent=2))
            cells = " ".join(f"{NAMES[k]} {v:.3f}" for k, v in result["targets"].items() if k in NAMES)
            print(f"{result['variant']} s{result['seed']} ({result['seconds']:.0f} s): {cells} "
                  f"parts {result['best_parts']}", flush=True)


if __name__ == "__main__":
    main()
