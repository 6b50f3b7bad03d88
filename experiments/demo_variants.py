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

import torch

NAMES = {"location_instability_ratio": "LI", "part_interpretability_ratio": "PI", "colocation_ratio": "col",
         "colocation_group_fraction": "groups", "parts_covered": "parts", "p": "p", "agreement": "agr"}


def _run(job: tuple[str, dict, int, str, str, int]) -> dict:
    name, options, seed, out, performers, threads = job
    torch.set_num_threads(threads)
    options = dict(options)
    train = options.pop("train", {})
    if train:  # TrainConfig overrides: run_demo builds its TrainConfig from fastexplain.train's class
        import dataclasses

        import fastexplain.train as training
        training.TrainConfig = dataclasses.make_dataclass(
            "TrainConfig", [(key, type(value), dataclasses.field(default=value)) for key, value in train.items()],
            bases=(training.TrainConfig,))
    from fastexplain.demo import cache_dir, run_demo

    folder = Path(out) / f"{name}_s{seed}"
    cache = cache_dir(folder, quick=False, seed=seed)
    cache.mkdir(parents=True, exist_ok=True)
    source = cache_dir(Path(performers.format(seed=seed)), quick=False, seed=seed) / "performer.pt"
    if not (cache / "performer.pt").exists():
        shutil.copy(source, cache / "performer.pt")
    started = time.perf_counter()
    metrics = run_demo(folder, progress=False, explainer_options=options, seed=seed)
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
