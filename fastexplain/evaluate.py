"""Measure a trained explainer against its performer on a dataset: metrics.json and a self-contained report.html.

Used by ``fastexplain evaluate CHECKPOINT --data SPEC`` (:func:`evaluate_checkpoint`) and by ``fastexplain
demo`` (:func:`evaluate`), so both measure the same way. One pass over the data runs performer and explainer
batch by batch; only the layer maps the metrics revisit are kept (in memory up to ``memory_limit`` bytes
per layer, spilled to a temporary folder beyond), with the reconstruction error, p, agreement and accuracy
streamed. Metrics (ICNN, arXiv 1710.00935; explainer, arXiv 1805.07468; definitions in docs/metrics.md):

* always: part diversity (co-location, groups), p, reconstruction error, agreement through x̂ (needs a
  performer head);
* with landmarks: location instability; with part masks: part interpretability, the best-part
  histogram and parts covered; with both: the per-part galleries (:mod:`fastexplain.galleries`);
* with labels: the performer's accuracy on its own and through x̂ (labels must be the performer's
  class indices).

Whatever cannot be measured is listed in ``metrics["omitted"]`` with what it needs, and the report says so.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .diversity import part_diversity
from .galleries import choose_part_filters, filter_gallery, group_representatives
from .metrics import ReconstructionMeter, check_targets, location_instability, part_interpretability, peak_statistics
from .receptive_field import cell_centers
from .report import FilterGallery, render_summary_png, write_report

LANDMARK_METRICS = ("location_instability",)
MASK_METRICS = ("part_interpretability", "part_interpretability_pre_mask", "best_part_histogram", "parts_covered")
TARGETS_NEEDING = {"location_instability_ratio": "location_instability",
                   "part_interpretability_ratio": "part_interpretability", "parts_covered": "parts_covered"}


@dataclass
class EvaluationData:
    """A dataset seen through what the metrics need; annotations are None when the dataset has none."""

    dataset: Any
    size: int
    part_names: tuple[str, ...] | None = None
    labels: Tensor | None = None        #: [N] class indices
    keypoints: Tensor | None = None     #: [N, K, 2] (x, y) pixels
    visible: Tensor | None = None       #: [N, K] bool
    description: str = ""

    def images(self, indices: Sequence[int]) -> Tensor:
        """Images ``indices`` as float [n, 3, H, W] in [0, 1]."""
        if hasattr(self.dataset, "float_images"):
            return self.dataset.float_images(torch.as_tensor(list(indices), dtype=torch.long))
        from .train import image_of

        batch = torch.stack([image_of(self.dataset[int(i)]) for i in indices])
        return batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()

    def has_masks(self) -> bool:
        return hasattr(self.dataset, "part_masks_for") or isinstance(getattr(self.dataset, "part_masks", None), Tensor)

    def part_masks(self, start: int, stop: int) -> Tensor:
        """Part masks of images start..stop-1: bool [n, K, H, W]."""
        if hasattr(self.dataset, "part_masks_for"):
            return self.dataset.part_masks_for(start, stop)
        return self.dataset.part_masks[start:stop]


def evaluation_data(dataset: Any, images: int | None = None, description: str = "") -> EvaluationData:
    """Wrap ``dataset`` (part world, CUB, an image folder or any dataset of images / (image, label) items),
    keeping its first ``images`` items (all when None)."""
    if images is not None and images < 1:
        raise ValueError(f"--images must be ≥ 1, got {images}")
    size = len(dataset) if images is None else min(len(dataset), int(images))
    if size == 0:
        raise ValueError("the dataset is empty")

    def first(name: str) -> Tensor | None:
        value = getattr(dataset, name, None)
        return value[:size] if isinstance(value, Tensor) else None

    names = getattr(dataset, "part_names", None)
    keypoints, visible = first("keypoints"), first("visible")
    return EvaluationData(dataset, size, tuple(names) if names else None, first("labels"),
                          keypoints if visible is not None else None, visible if keypoints is not None else None,
                          description)


class MapSpool:
    """Map chunks [n, F, h, w] appended in image order, kept in memory up to ``memory_limit`` bytes, then
    written to a temporary folder; calling it yields the chunks again (a metrics ``MapSource``)."""

    def __init__(self, memory_limit: int = 512 << 20) -> None:
        self.memory_limit, self.in_memory = memory_limit, 0
        self.chunks: list[Tensor | Path] = []
        self.starts: list[int] = []
        self.count = 0
        self.map_size: tuple[int, ...] = ()
        self._folder: tempfile.TemporaryDirectory | None = None

    def append(self, chunk: Tensor) -> None:
        chunk = chunk.detach().float().cpu().contiguous()
        self.starts.append(self.count)
        self.count += chunk.shape[0]
        self.map_size = tuple(chunk.shape[-2:])
        if self.in_memory + chunk.numel() * 4 <= self.memory_limit:
            self.in_memory += chunk.numel() * 4
            self.chunks.append(chunk)
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="fastexplain-maps-")
        path = Path(self._folder.name) / f"{len(self.chunks)}.pt"
        torch.save(chunk, path)
        self.chunks.append(path)

    def _load(self, index: int) -> Tensor:
        item = self.chunks[index]
        return item if isinstance(item, Tensor) else torch.load(item, weights_only=True)

    def __call__(self) -> Iterator[Tensor]:
        return (self._load(i) for i in range(len(self.chunks)))

    def select(self, indices: Sequence[int], filter_index: int) -> Tensor:
        """The maps of one filter for images ``indices``: [n, h, w]."""
        import bisect

        where = [bisect.bisect_right(self.starts, int(i)) - 1 for i in indices]
        loaded = {chunk: self._load(chunk)[:, filter_index] for chunk in set(where)}  # each chunk read once
        return torch.stack([loaded[chunk][int(i) - self.starts[chunk]] for i, chunk in zip(indices, where)])

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


@dataclass
class Collected:
    performer: MapSpool
    explainer: MapSpool
    pre_mask: MapSpool
    stream: dict[str, float] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)
    labels_usable: bool = True  #: False when a label is not one of the performer's class indices
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  #: where the networks ran


@torch.no_grad()
def collect(performer: Any, explainer: Any, data: EvaluationData, batch_size: int = 64, progress: bool = True,
            device: torch.device | str | None = None, memory_limit: int = 512 << 20) -> Collected:
    """One pass over ``data``: spools of performer maps, part maps after and before the mask, streamed figures."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(performer.model.parameters()).device
    performer.to(device)
    explainer.to(device).eval()
    spools = Collected(MapSpool(memory_limit), MapSpool(memory_limit), MapSpool(memory_limit), device=device)
    meter, correct, correct_through, labelled = ReconstructionMeter(), 0, 0, 0
    bar = tqdm(total=data.size, desc="evaluating", unit="img", disable=not progress, leave=False)
    for start in range(0, data.size, batch_size):
        indices = list(range(start, min(start + batch_size, data.size)))
        images = data.images(indices).to(device)
        spools.image_size = tuple(images.shape[-2:])
        features = performer.features(images)
        output = explainer(features.input, compute_loss=False)
        through = performer.run_head(output.reconstruction, images) if features.logits is not None else None
        meter.update(output.reconstruction, features.target, features.logits, through, output.p)
        if data.labels is not None and features.logits is not None and spools.labels_usable:
            labels = data.labels[start:start + len(indices)].to(device)
            if int(labels.max()) >= features.logits.shape[1] or int(labels.min()) < 0:
                spools.labels_usable, labelled = False, 0
            else:
                correct += int((features.logits.argmax(1) == labels).sum())
                correct_through += int((through.argmax(1) == labels).sum())
                labelled += len(indices)
        spools.performer.append(features.input)
        spools.explainer.append(output.part_maps)
        spools.pre_mask.append(output.part_relu_maps)
        bar.update(len(indices))
    bar.close()
    spools.stream = meter.result()
    if labelled:
        spools.stream.update(accuracy=correct / labelled, accuracy_through=correct_through / labelled)
    return spools


def _layer_metrics(maps: MapSpool, data: EvaluationData, image_size: tuple[int, int],
                   centres: Any, device: torch.device | None = None) -> tuple[dict[str, Any], Any, Any, Any]:
    """The summary dict of one layer's filters, with the LocationInstability, PartInterpretability and
    PartDiversity objects (the first two None when the data lack what they need); part interpretability's
    upsampling runs on ``device`` (the evaluation's)."""
    instability = interpretability = None
    summary: dict[str, Any] = {}
    if data.keypoints is not None:
        instability = location_instability(maps, data.keypoints, data.visible, image_size, centres)
        summary.update(location_instability=instability.value, silent_filters=instability.silent_filters,
                       centers_method=instability.centers_method, centers_reason=instability.centers_reason)
    if data.has_masks():
        interpretability = part_interpretability(maps, data.part_masks, device=device)
        summary["part_interpretability"] = interpretability.value
    diversity = part_diversity(maps, part_hit_rate=None if interpretability is None else interpretability.hit_rate)
    figures = diversity.summary()
    if "best_part_histogram" in figures and data.part_names is not None:
        figures["best_part_histogram"] = dict(zip(data.part_names, figures["best_part_histogram"]))
    summary.update(figures, filters=int(diversity.pairwise.shape[0]))
    return summary, instability, interpretability, diversity


def omissions(data: EvaluationData, has_head: bool, labels_usable: bool = True) -> dict[str, str]:
    """{metric: what it needs} for every metric these data (and this performer) cannot give."""
    omitted: dict[str, str] = {}
    if data.keypoints is None:
        omitted.update({name: "landmark annotations (keypoints)" for name in LANDMARK_METRICS})
    if not data.has_masks():
        omitted.update({name: "part masks or landmarks" for name in MASK_METRICS})
    if data.keypoints is None or not data.has_masks() or data.part_names is None:
        omitted["per-part galleries"] = "landmarks and part masks (one gallery per co-location group instead)"
    if not has_head:
        omitted["agreement"] = "a performer head (the rest of the network after the layer)"
    if data.labels is None or not has_head:
        omitted["accuracy"] = "class labels" if has_head else "class labels and a performer head"
    elif not labels_usable:
        omitted["accuracy"] = "labels that are the performer's class indices (these exceed its outputs)"
    return omitted


def _galleries(kind: str, maps: MapSpool, data: EvaluationData, instability: Any, interpretability: Any,
               diversity: Any, per_filter: int, limit: int) -> tuple[list[FilterGallery], list[dict[str, Any]]]:
    peaks = peak_statistics(maps)[0]
    if instability is None or interpretability is None or data.part_names is None:
        picks = group_representatives(diversity.groups, limit)
        return [filter_gallery(kind, f, peaks[:, f], maps.select, data.images, per_filter,
                               caption=f"group {g} of {size} filter(s)") for f, g, size in picks], []
    choices = choose_part_filters(data.part_names, diversity.group_of, diversity.group_sizes,
                                  instability.per_filter_landmark, interpretability.hit_rate)
    galleries = []
    for k, choice in enumerate(choices):
        if choice.filter is None:
            continue
        caption = (f"{choice.part}: group {choice.group} of {choice.group_size} filter(s), location instability "
                   f"{choice.instability:.3f}, hit rate {choice.hit_rate:.2f}")
        galleries.append(filter_gallery(kind, choice.filter, peaks[:, choice.filter], maps.select, data.images,
                                        per_filter, eligible=data.visible[:, k], caption=caption, part=choice.part,
                                        landmarks=data.keypoints[:, k]))
    return galleries, [choice.to_dict() for choice in choices]


def evaluate(performer: Any, explainer: Any, data: EvaluationData, out_dir: str | os.PathLike[str] | None = None, *,
             batch_size: int = 64, progress: bool = True, device: torch.device | str | None = None,
             gallery_images: int = 6, gallery_groups: int = 6, title: str = "fastexplain evaluation",
             notes: Sequence[str] = (), curves: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
             memory_limit: int = 512 << 20) -> dict[str, Any]:
    """Measure ``explainer`` against ``performer`` on ``data`` (module docstring); returns the metrics dict.

    With ``out_dir``, writes ``metrics.json``, ``report.html`` and ``summary.png`` there. ``extra`` entries
    are merged into the metrics dict before it is written.
    """
    started = time.perf_counter()
    collected = collect(performer, explainer, data, batch_size, progress, device, memory_limit)
    try:
        size = collected.image_size
        centres = cell_centers(performer.model, performer.layer, size, tuple(collected.performer.map_size))
        where = collected.device
        performer_summary, performer_li, performer_pi, performer_div = _layer_metrics(collected.performer, data, size,
                                                                                      centres, where)
        explainer_summary, explainer_li, explainer_pi, explainer_div = _layer_metrics(collected.explainer, data, size,
                                                                                      centres, where)
        if data.has_masks():
            explainer_summary["part_interpretability_pre_mask"] = part_interpretability(
                collected.pre_mask, data.part_masks, device=where).value
        stream = collected.stream
        performer_summary["layer"] = performer.layer
        explainer_summary.update(p=stream["p"], reconstruction_error=stream["reconstruction_error"])
        if performer.has_head:
            explainer_summary["agreement"] = stream["agreement"]
        if "accuracy" in stream:
            performer_summary["accuracy"], explainer_summary["accuracy"] = stream["accuracy"], stream["accuracy_through"]
        omitted = omissions(data, performer.has_head, collected.labels_usable)
        targets = check_targets(performer_summary, explainer_summary)
        for row in targets:
            if TARGETS_NEEDING.get(row["name"]) in omitted or (row["name"] == "agreement" and "agreement" in omitted):
                row.update(passed=None, value=math.nan)
        galleries, explainer_parts = _galleries("explainer", collected.explainer, data, explainer_li, explainer_pi,
                                                explainer_div, gallery_images, gallery_groups)
        performer_galleries, performer_parts = _galleries("performer", collected.performer, data, performer_li,
                                                          performer_pi, performer_div, gallery_images, gallery_groups)
    finally:
        for spool in (collected.performer, collected.explainer, collected.pre_mask):
            spool.close()
    metrics: dict[str, Any] = {"performer": performer_summary, "explainer": explainer_summary, "targets": targets,
                               "omitted": omitted}
    if explainer_parts:
        metrics["parts"] = {"explainer": explainer_parts, "performer": performer_parts}
    metrics["data"] = {"description": data.description, "images": data.size, "image_size": list(collected.image_size),
                       "part_names": list(data.part_names or []), "labels": data.labels is not None}
    metrics.update(extra or {})
    metrics.setdefault("seconds", {})["evaluation"] = time.perf_counter() - started
    if out_dir is not None:
        out = Path(out_dir)
        write_report(out, metrics, galleries + performer_galleries, curves, title=title, notes=notes)
        render_summary_png(out / "summary.png", metrics, galleries + performer_galleries)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def rebuild_performer(state: dict[str, Any], weights: str | os.PathLike[str] | None = None) -> Any:
    """The performer a checkpoint was trained on: its torchvision spec (``weights`` replacing the recorded
    state_dict file), else a performer file of :mod:`fastexplain.zoo` (``weights`` or the one the demo
    recorded). Anything that cannot be rebuilt is a one-line ValueError saying what to pass."""
    from .performer import Performer
    from .zoo import load_performer

    spec = state.get("performer")
    if spec is not None:
        spec = {**spec, **({"weights": str(weights)} if weights is not None else {})}
        try:
            return Performer.from_spec(spec)
        except (FileNotFoundError, ValueError, RuntimeError, TypeError) as error:
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise ValueError(f"cannot rebuild the checkpoint's performer ({spec.get('model')!r} at "
                             f"{spec.get('layer')!r}): {first}; pass --weights FILE with its state_dict") from None
    file = weights if weights is not None else (state.get("extra") or {}).get("performer_file")
    if file is None:
        raise ValueError("this checkpoint was trained on a custom performer module, which cannot be rebuilt from the "
                         "file; pass --weights with a fastexplain.zoo performer file (the demo's performer.pt) or "
                         "call fastexplain.evaluate.evaluate(performer, explainer, data) from Python")
    try:
        model, meta = load_performer(file)
    except (FileNotFoundError, ValueError, KeyError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot rebuild the checkpoint's performer from {str(file)!r}: {first} (the checkpoint "
                         f"names no torchvision model, so --weights must be a fastexplain.zoo performer file)") from None
    return Performer(model, meta["explained_layer"])


def open_evaluation_data(spec: str, image_size: int, images: int | None = None) -> EvaluationData:
    """``--data SPEC`` opened at the checkpoint's ``image_size``; a spec asking for another size is an error."""
    from .data import open_dataset, parse_dataset_spec

    name, options = (spec, {}) if Path(spec).is_dir() else parse_dataset_spec(spec)
    asked = options.pop("image_size", None)
    if asked is not None and int(asked) != image_size:
        raise ValueError(f"--data {spec!r} asks for {asked}-px images but the explainer was trained on {image_size}-px "
                         f"images; drop image_size= (evaluate reads images at the checkpoint's size)")
    if name == "partworld" and images is not None:
        options.setdefault("num_images", images)
    rebuilt = name if not options else name + ":" + ",".join(f"{key}={value}" for key, value in options.items())
    dataset = open_dataset(rebuilt, image_size)
    data = evaluation_data(dataset, images, description=spec)
    got = tuple(data.images([0]).shape[-2:])
    if got != (image_size, image_size):
        raise ValueError(f"--data {spec!r} gives {got[0]}×{got[1]} images but the explainer was trained on "
                         f"{image_size}×{image_size} images")
    return data


def history_curves(history: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Training curves of a checkpoint's per-epoch history: the loss terms and p."""
    if not history:
        return {}
    losses = {name: [entry.get(name, math.nan) for entry in history] for name in ("total", "reconstruction", "kl", "filter")
              if name in history[0]}
    return {"explainer loss": losses, "explainer p": {"p": [entry.get("p", math.nan) for entry in history]}}


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], data: str, out_dir: str | os.PathLike[str] = "fastexplain-evaluation",
                        *, images: int | None = None, batch_size: int = 64, weights: str | os.PathLike[str] | None = None,
                        device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """``fastexplain evaluate``: rebuild performer and explainer from ``checkpoint``, measure them on ``data``
    (a ``--data`` spec) and write ``out_dir/metrics.json``, ``report.html`` and ``summary.png``."""
    from .checkpoint import explainer_from_state, load_checkpoint

    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if images is not None and images < 1:
        raise ValueError(f"--images must be ≥ 1, got {images}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory")
    state = load_checkpoint(checkpoint)
    explainer = explainer_from_state(state)
    if not state.get("image_size"):
        raise ValueError(f"{str(checkpoint)!r} does not record the image size it was trained on")
    height, width = (int(v) for v in state["image_size"])
    if height != width:
        raise ValueError(f"the checkpoint was trained on {height}×{width} images; evaluate reads square images only")
    performer = rebuild_performer(state, weights)
    channels = performer.probe(height)[0][0]
    if channels != explainer.config.in_channels:
        raise ValueError(f"the rebuilt performer's layer {performer.layer!r} has {channels} channels, the checkpoint's "
                         f"explainer expects {explainer.config.in_channels}: these --weights are not its performer")
    dataset = open_evaluation_data(data, height, images)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    notes = [f"Checkpoint {checkpoint} ({state['epoch']} epochs); performer layer {performer.layer}; data {data}: "
             f"{dataset.size} images at {height} px."]
    return evaluate(performer, explainer, dataset, out, batch_size=batch_size, progress=progress, device=target,
                    title="fastexplain evaluate: explainer part filters vs performer filters", notes=notes,
                    curves=history_curves(state.get("history", [])), extra={"checkpoint": str(checkpoint)})
