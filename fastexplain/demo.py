"""``fastexplain demo``: part world → performer → explainer → metrics → report (issue 7, SPEC §5, §7).

The pipeline, all on the CPU by default:

1. generate the part world (train split for the performer and the explainer — the explainer with another
   seed —, test split for the performer's accuracy, val split for the metrics);
2. train the demo performer :class:`fastexplain.zoo.PartWorldVGG` with labels, or reuse the cached one;
3. fit an explainer on the performer's layer ``features.13`` (16×16 maps, 64 channels), label-free;
4. on the val split: location instability and part interpretability of the performer's 64 filters and
   of the explainer's part filters (the interpretable track's final, masked maps; part interpretability
   of the same filters before the mask is reported too), reconstruction error, p and the agreement of
   the performer's predictions through the reconstruction;
5. write ``metrics.json``, ``report.html`` (self-contained) and ``summary.png`` into the output dir.

Trained models are cached under ``OUT/cache/{full,quick}/`` and reused by later runs with the same
settings. ``quick=True`` shrinks every stage (CI runs it); its numbers are a smoke test, not a result.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.partworld import PART_NAMES, PartWorld
from .metrics import ReconstructionMeter, check_targets, location_instability, part_interpretability
from .receptive_field import cell_centers
from .report import render_summary_png, top_activating_galleries, write_report
from .zoo import EXPLAINED_LAYER, load_or_train_performer


# λ = 10: measured on the default demo (docs/metrics.md), λ = 1 and 3 leave the explainer's filters
# less location-stable than the performer's; 10 meets the location and part goals.
DEMO_EXPLAINER_OPTIONS: dict[str, Any] = {"filter_weight": 10.0}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage; ``DemoSettings.for_mode(quick)`` gives the two presets."""

    image_size: int = 64
    performer_train_images: int = 4000
    performer_test_images: int = 500
    performer_epochs: int = 10
    explainer_images: int = 2000
    explainer_epochs: int = 8
    explainer_refine_epochs: int = 8   # TrainConfig.refine_epochs: part filters and p frozen, decoder catches up
    explainer_batch_size: int = 32
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


@torch.no_grad()
def _collect(performer: Any, explainer: Any, world: PartWorld, batch_size: int = 100,
             progress: bool = True) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
    """Performer maps [N,C,h,w], explainer part maps after and before the mask [N,M,h,w], reconstruction stats."""
    from tqdm.auto import tqdm

    performer_maps, part_maps, pre_mask_maps, meter = [], [], [], ReconstructionMeter()
    device = next(performer.model.parameters()).device
    explainer.to(device).eval()
    for start in tqdm(range(0, len(world), batch_size), desc="evaluating", disable=not progress, leave=False):
        images = world.float_images(torch.arange(start, min(start + batch_size, len(world)))).to(device)
        features = performer.features(images)
        output = explainer(features.input)
        other_logits = performer.run_head(output.reconstruction, images) if features.logits is not None else None
        meter.update(output.reconstruction, features.target, features.logits, other_logits, output.p)
        performer_maps.append(features.input.float().cpu())
        part_maps.append(output.part_maps.float().cpu())
        pre_mask_maps.append(output.part_relu_maps.float().cpu())
    return torch.cat(performer_maps), torch.cat(part_maps), torch.cat(pre_mask_maps), meter.result()


def _filter_metrics(maps: Tensor, world: PartWorld, centres: Any) -> tuple[dict[str, Any], Any, Any]:
    instability = location_instability(maps, world.keypoints, world.visible, (world.image_size, world.image_size), centres)
    interpretability = part_interpretability(maps, world.part_masks)
    summary = {
        "location_instability": instability.value, "part_interpretability": interpretability.value,
        "filters": int(maps.shape[1]), "silent_filters": instability.silent_filters,
        "centers_method": instability.centers_method, "centers_reason": instability.centers_reason,
    }
    return summary, instability, interpretability


def _galleries(group: str, maps: Tensor, world: PartWorld, interpretability: Any, instability: Any,
               settings: DemoSettings) -> list:
    ranked = torch.sort(interpretability.per_filter, descending=True, stable=True).indices[: settings.gallery_filters]
    captions = {}
    for f in ranked.tolist():
        part = PART_NAMES[int(interpretability.best_part[f])]
        captions[f] = (f"best part {part}: hit rate {float(interpretability.per_filter[f]):.2f}, "
                       f"location instability {float(instability.per_filter[f]):.3f}")
    return top_activating_galleries(group, maps.float(), world.images, ranked.tolist(), settings.gallery_images, captions)


def run_demo(out_dir: str | Path = "fastexplain-demo", quick: bool = False, progress: bool = True,
             explainer_options: dict[str, Any] | None = None, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the metrics dict also written to ``out_dir/metrics.json``.

    ``settings`` overrides the preset chosen by ``quick``; ``explainer_options`` go to ExplainerConfig
    (default: :data:`DEMO_EXPLAINER_OPTIONS`).
    """
    from .performer import Performer
    from .train import TrainConfig, fit

    settings = settings or DemoSettings.for_mode(quick)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory; choose a directory for the demo")
    cache = out / "cache" / ("quick" if quick else "full")
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
    history = fit(performer, train_world, cache / "explainer", config, options, resume=True,
                  progress=progress)
    from .checkpoint import explainer_from_state, load_checkpoint

    explainer = explainer_from_state(load_checkpoint(cache / "explainer" / "checkpoint.pt"))
    seconds["explainer"] = time.perf_counter() - mark

    mark = time.perf_counter()
    test_world = PartWorld(settings.eval_images, settings.image_size, seed=settings.seed, split="val", progress=progress)
    performer_maps, part_maps, pre_mask_maps, reconstruction = _collect(performer, explainer, test_world,
                                                                        progress=progress)
    centres = cell_centers(model, EXPLAINED_LAYER, settings.image_size, tuple(performer_maps.shape[-2:]))
    performer_summary, performer_li, performer_pi = _filter_metrics(performer_maps, test_world, centres)
    explainer_summary, explainer_li, explainer_pi = _filter_metrics(part_maps, test_world, centres)
    performer_summary.update(accuracy=performer_meta["test_accuracy"], layer=EXPLAINED_LAYER)
    explainer_summary.update(reconstruction)
    # the same filters before their template mask (broader regions; location instability is unchanged)
    explainer_summary["part_interpretability_pre_mask"] = part_interpretability(pre_mask_maps, test_world.part_masks).value
    seconds["metrics"] = time.perf_counter() - mark

    metrics: dict[str, Any] = {"performer": performer_summary, "explainer": explainer_summary}
    metrics["targets"] = check_targets(performer_summary, explainer_summary)
    metrics["settings"] = {**asdict(settings), "quick": quick}
    galleries = (_galleries("explainer", part_maps, test_world, explainer_pi, explainer_li, settings)
                 + _galleries("performer", performer_maps, test_world, performer_pi, performer_li, settings))
    curves = {
        "performer (supervised)": {name: values for name, values in performer_meta["history"].items()},
        "explainer loss": {name: [entry[name] for entry in history] for name in ("total", "reconstruction", "kl", "filter")
                           if history and name in history[0]},
        "explainer p": {"p": [entry.get("p", math.nan) for entry in history]},
    }
    notes = [f"Part world at {settings.image_size} px; performer layer {EXPLAINED_LAYER} "
             f"({performer_maps.shape[1]} filters, {performer_maps.shape[2]}×{performer_maps.shape[3]} maps); "
             f"metrics on {settings.eval_images} held-out images; receptive-field centres: {centres.method}.",
             "Quick mode: tiny training runs, numbers are a smoke test only." if quick else ""]
    write_report(out, metrics, galleries, curves, title="fastexplain demo: explainer part filters vs performer filters",
                 notes=[n for n in notes if n])
    render_summary_png(out / "summary.png", metrics, galleries)
    seconds["total"] = time.perf_counter() - started
    metrics["seconds"] = seconds
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics
