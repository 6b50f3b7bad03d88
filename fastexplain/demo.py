"""``fastexplain demo``: part world → performer → explainer → metrics → report (issue 7, docs/method.md §5, §7).

The pipeline, all on the CPU by default:

1. generate the part world (train split for the performer and the explainer — the explainer with another
   seed —, test split for the performer's accuracy, val split for the metrics);
2. train the demo performer :class:`fastexplain.zoo.PartWorldVGG` with labels, or reuse the cached one;
3. fit an explainer on the performer's layer ``features.13`` (16×16 maps, 64 channels), label-free;
4. measure on the val split with :func:`fastexplain.evaluate.evaluate` — the code path of ``fastexplain
   evaluate`` — the performer's 64 filters against the explainer's part filters: location instability,
   part interpretability (also before the mask), part diversity (co-location, groups, best parts),
   reconstruction error, p, agreement and accuracy through the reconstruction, per-part galleries;
5. write ``metrics.json``, ``report.html`` (self-contained) and ``summary.png`` into the output dir.

Trained models are cached under ``OUT/cache/{full,quick}/seed<S>/`` and reused by later runs with the same
settings; the explainer's checkpoint records the performer file, so ``fastexplain evaluate
OUT/cache/full/seed0/explainer/checkpoint.pt --data partworld:split=val`` rebuilds both.
``quick=True`` shrinks every stage (CI runs it); its numbers are a smoke test, not a result.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .data.partworld import PartWorld
from .train import TrainConfig
from .zoo import CACHE_NAME, EXPLAINED_LAYER, load_or_train_performer

# The demo uses the library's defaults (ExplainerConfig, TrainConfig), the same that `fastexplain fit` uses;
# how they were chosen is in docs/explainer.md ("Distinct part filters") and docs/diversity-experiments.md.
DEMO_EXPLAINER_OPTIONS: dict[str, Any] = {}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage; ``DemoSettings.for_mode(quick)`` gives the two presets."""

    image_size: int = 64
    performer_train_images: int = 4000
    performer_test_images: int = 500
    performer_epochs: int = 10
    explainer_images: int = 2000
    explainer_epochs: int = TrainConfig.epochs                 # the library's defaults: what `fit` uses
    explainer_refine_epochs: int = TrainConfig.refine_epochs   # part filters and p frozen, decoder catches up
    explainer_batch_size: int = TrainConfig.batch_size
    eval_images: int = 800
    gallery_filters: int = 6
    gallery_images: int = 6
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool) -> "DemoSettings":
        if not quick:
            return cls()
        return cls(performer_train_images=1200, performer_test_images=200, performer_epochs=3, explainer_images=300,
                   explainer_epochs=1, explainer_refine_epochs=1, eval_images=200, gallery_filters=3, gallery_images=4)


def cache_dir(out_dir: str | Path, quick: bool, seed: int) -> Path:
    """Where the demo caches its performer and explainer for this mode and seed."""
    return Path(out_dir) / "cache" / ("quick" if quick else "full") / f"seed{seed}"


def run_demo(out_dir: str | Path = "fastexplain-demo", quick: bool = False, progress: bool = True,
             explainer_options: dict[str, Any] | None = None, settings: DemoSettings | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the metrics dict also written to ``out_dir/metrics.json``.

    ``settings`` overrides the preset chosen by ``quick``; ``seed`` (default: ``settings.seed``) seeds the
    performer, the explainer and the data, and keys the cache; ``explainer_options`` go to ExplainerConfig
    (default: :data:`DEMO_EXPLAINER_OPTIONS`).
    """
    from .checkpoint import explainer_from_state, load_checkpoint
    from .evaluate import evaluate, evaluation_data, history_curves
    from .performer import Performer
    from .train import TrainConfig, fit

    settings = settings or DemoSettings.for_mode(quick)
    if seed is not None:
        settings = replace(settings, seed=int(seed))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory; choose a directory for the demo")
    cache = cache_dir(out, quick, settings.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    model, performer_meta = load_or_train_performer(
        cache, image_size=settings.image_size, train_images=settings.performer_train_images,
        test_images=settings.performer_test_images, epochs=settings.performer_epochs, seed=settings.seed,
        progress=progress)
    seconds["performer"] = time.perf_counter() - started
    performer = Performer(model, EXPLAINED_LAYER)

    mark = time.perf_counter()
    train_world = PartWorld(settings.explainer_images, settings.image_size, seed=settings.seed + 1, split="train",
                            progress=progress)
    config = TrainConfig(epochs=settings.explainer_epochs, batch_size=settings.explainer_batch_size, seed=settings.seed,
                         refine_epochs=settings.explainer_refine_epochs)
    options = DEMO_EXPLAINER_OPTIONS if explainer_options is None else explainer_options
    with warnings.catch_warnings():
        if quick:  # a smoke test: its few steps are the point, not a user's mistake
            warnings.filterwarnings("ignore", message="fit: .* optimisation steps", category=UserWarning)
        history = fit(performer, train_world, cache / "explainer", config, options, resume=True, progress=progress,
                      extra={"data": f"partworld:seed={settings.seed + 1},split=train",
                             "performer_file": str((cache / CACHE_NAME).resolve())})
    explainer = explainer_from_state(load_checkpoint(cache / "explainer" / "checkpoint.pt"))
    seconds["explainer"] = time.perf_counter() - mark

    mark = time.perf_counter()
    val_world = PartWorld(settings.eval_images, settings.image_size, seed=settings.seed, split="val", progress=progress)
    data = evaluation_data(val_world, description=f"partworld:seed={settings.seed},split=val")
    curves = {"performer (supervised)": dict(performer_meta["history"]), **history_curves(history)}
    notes = [f"Part world at {settings.image_size} px, seed {settings.seed}; performer layer {EXPLAINED_LAYER} "
             f"(held-out test accuracy {performer_meta['test_accuracy']:.3f}); metrics on {settings.eval_images} "
             f"held-out images (split val).",
             "Quick mode: tiny training runs, numbers are a smoke test only." if quick else ""]
    metrics = evaluate(performer, explainer, data, out, batch_size=100, progress=progress,
                       gallery_images=settings.gallery_images, gallery_groups=settings.gallery_filters,
                       title="fastexplain demo: explainer part filters vs performer filters",
                       notes=[n for n in notes if n], curves=curves,
                       extra={"settings": {**asdict(settings), "quick": quick},
                              "checkpoint": str(cache / "explainer" / "checkpoint.pt")})
    metrics["performer"]["test_accuracy"] = performer_meta["test_accuracy"]
    seconds["metrics"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    metrics["seconds"] = {**metrics.get("seconds", {}), **seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
