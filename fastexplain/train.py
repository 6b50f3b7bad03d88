"""Label-free training of an explainer on a frozen performer (docs/method.md §4, issue 6).

``fit(performer, dataset, out_dir)`` trains an :class:`~fastexplain.nn.Explainer` on the performer's
features of the dataset's images (labels, if the dataset yields any, are ignored), writes
``out_dir/checkpoint.pt`` atomically after every epoch and returns the per-epoch history.

Determinism and resume: the explainer is initialised from ``seed``; epoch e visits the images in the
order ``randperm(N, generator=seed·1000003 + e)``; the learning-rate schedule depends only on the epoch
index (constant, or step decay every ``step_epochs``) — never on the total number of epochs — so training
1 epoch and resuming to 2 gives the same weights as 2 straight epochs (bit-identical on CPU). The
checkpoint holds the explainer and optimiser states, the epoch count, the history and the torch RNG state.

Defaults (see docs/explainer.md): Adam, lr 1e-3, the gate's lr ×10 (``gate_lr_scale``: under Adam a
scalar moves at most ~lr per step, so p would need thousands of steps to move from 0.5), constant
schedule, gradient-norm clipping at 5, batch 32, 8 joint epochs then 4 refinement epochs, the part filters'
lr × 0.05 × √(64 / C_in) (``part_lr_scale``: they leave their identity start slowly, so that they stay distinct;
docs/explainer.md, "Distinct part filters"), float32 (``autocast="bf16"`` optional), and the stored explainer the
moving average (decay 0.99) of the refinement epochs' weights (``average_decay``; +1.0 point of agreement on the
demo's 3 seeds, the part filters unchanged).

Several processes (``torchrun --nproc_per_node R``, see docs/distributed.md and
:mod:`fastexplain.parallel`): ``batch_size`` is the *global* batch; each global batch of the same
permutation is cut into R contiguous slices, the explainer is wrapped in DistributedDataParallel and its
batch statistics (filter loss, scales, loss ratios) are taken over the global batch, so R processes follow
the single-process run (same weights up to float rounding). Rank 0 alone logs, shows progress and writes
checkpoints (then all ranks meet at a barrier); a resumed checkpoint is read by rank 0 and broadcast.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from . import parallel
from .averaging import WeightAverage
from .checkpoint import explainer_from_state, load_checkpoint, save_checkpoint
from .data import stack_images
from .nn.explainer import Explainer, ExplainerConfig
from .performer import Performer, check_same_performer, performer_identity

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step")
AUTOCASTS = (None, "bf16")
CHECKPOINT_NAME = "checkpoint.pt"
# fields that may change between a run and its resumption
_RESUMABLE_CHANGES = ("epochs", "refine_epochs", "num_workers", "device")
# fields added after checkpoints were written: a checkpoint without one was trained with this value
_ADDED_LATER = {"average_decay": 0.0}


@dataclass
class TrainConfig:
    """Optimisation settings of :func:`fit` (the loss weights λ, γ, η live in ExplainerConfig)."""

    epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adam"          #: "adam", "adamw" or "sgd" (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    gate_lr_scale: float = 10.0      #: learning-rate multiplier for the parameters of p
    part_lr_scale: float = 0.05      #: lr multiplier of the part filters at 64 input channels (× √(64/C) otherwise)
    schedule: str = "constant"       #: "constant" or "step" (lr × step_gamma every step_epochs epochs)
    step_epochs: int = 10
    step_gamma: float = 0.1
    #: after ``epochs`` joint epochs, this many more train only the ordinary track and the decoder (the part
    #: filters and p frozen) on reconstruction + refine_kl_weight·KL: the part filters keep what they learned
    #: while the rest of the auto-encoder catches up on fidelity (design choice, docs/explainer.md)
    refine_epochs: int = 4
    refine_kl_weight: float = 1.0
    grad_clip: float | None = 5.0    #: max global gradient norm (None: no clipping)
    #: Polyak averaging: the checkpoint's explainer is the moving average of the weights with this decay per
    #: step (0: off, the last weights), restarted when the refinement begins (fastexplain/averaging.py)
    average_decay: float = 0.99
    autocast: str | None = None      #: None (float32) or "bf16"
    seed: int = 0
    num_workers: int = 0
    device: str | None = None        #: None: "cuda" when available, else "cpu"

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("autocast", AUTOCASTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.refine_epochs < 0 or not self.refine_kl_weight >= 0:
            raise ValueError(f"TrainConfig: refine_epochs and refine_kl_weight must be ≥ 0, got "
                             f"{self.refine_epochs!r}, {self.refine_kl_weight!r}")
        if not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"TrainConfig: average_decay must be in [0, 1) (0: no averaging), got "
                             f"{self.average_decay!r}")
        for name in ("epochs", "batch_size", "step_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be ≥ 1, got {getattr(self, name)!r}")
        for name in ("lr", "part_lr_scale", "gate_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: {name} must be positive, got {getattr(self, name)!r}")

    def lr_factor(self, epoch: int) -> float:
        """The schedule's multiplier for 0-based ``epoch`` (independent of the total epoch count)."""
        return self.step_gamma ** (epoch // self.step_epochs) if self.schedule == "step" else 1.0


def image_of(item: Any) -> Tensor:
    """The image of a dataset item: the item itself, its first element, or item["image"]; labels ignored."""
    if isinstance(item, Tensor):
        return item
    if isinstance(item, dict) and "image" in item:
        return item["image"]
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    raise TypeError(f"dataset items must be an image tensor [3, H, W], a tuple (image, ...) or a dict with "
                    f"an 'image' key; got {type(item).__name__}")


def collate_images(items: Sequence[Any]) -> Tensor:
    return stack_images([image_of(item) for item in items])  # uint8 or mixed sizes: one-line errors


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The data order of ``epoch``: a permutation fixed by (seed, epoch) so that resuming reproduces it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def make_explainer_config(performer: Performer, image_size: tuple[int, int],
                          overrides: ExplainerConfig | dict[str, Any] | None) -> ExplainerConfig:
    """The explainer config for this performer: channels and sizes probed, the rest from ``overrides``."""
    (C, h, w), (Ct, ht, wt) = performer.probe(image_size)
    if isinstance(overrides, ExplainerConfig):
        if overrides.in_channels != C or overrides.target_channels != Ct:
            raise ValueError(f"explainer config expects {overrides.in_channels}→{overrides.target_channels} "
                             f"channels, the performer's layers give {C}→{Ct}")
        return overrides
    values = dict(overrides or {})
    for fixed in ("in_channels", "target_channels", "target_size"):
        if fixed in values:
            raise ValueError(f"explainer option {fixed!r} is set from the performer; remove it")
    return ExplainerConfig(in_channels=C, target_channels=Ct,
                           target_size=None if (ht, wt) == (h, w) else (ht, wt), **values)


PART_LR_REFERENCE_CHANNELS = 64  #: part_lr_scale is the part filters' lr multiplier at this many input channels
#: joint steps below which fit warns: the fewest the defaults were measured at (demo, 6 + 4 epochs: 60 steps gave
#: location instability 0.97×, p 0.56; 150 steps 0.78×, p 0.63; 500 steps 0.60×, p 0.77; resnet18 layer3: 42 steps
#: 0.92×, 150 steps 0.78× with distinct filters, 300 steps merged filters — docs/diversity-experiments.md)
SETTLING_STEPS = 150


def make_optimizer(explainer: Explainer, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (or AdamW/SGD) with three kinds of parameter groups: the gate of p (lr × gate_lr_scale), each
    interpretable layer (lr × min(1, part_lr_scale × √(64 / its input channels))) and the rest (lr).

    Why the part filters' rate depends on their fan-in: Adam moves every weight by about lr per step, so a
    filter's output moves by lr × √C when the C steps of its weights are uncorrelated (lr × C if all
    aligned). The √(64 / C) factor was measured best of the two on resnet18 ``layer3`` (256 channels, 224 px,
    2 performers × 2 seeds: location instability 0.71× vs 0.80× the performer's with 64 / C, filters as
    distinct); on the demo's 64 channels both are 1 (docs/explainer.md, "Distinct part filters")."""
    gate_ids = {id(p) for p in explainer.gate_parameters()}
    layers = (explainer.interpretable1, explainer.interpretable2)
    part_ids = {id(p) for layer in layers for p in layer.parameters()}
    groups = [{"params": [p for p in explainer.parameters() if id(p) not in gate_ids | part_ids], "lr_scale": 1.0},
              {"params": explainer.gate_parameters(), "lr_scale": config.gate_lr_scale}]
    for layer in layers:
        fan_in_channels = layer.conv.in_channels // layer.conv.groups
        groups.append({"params": list(layer.parameters()),
                       "lr_scale": min(1.0, config.part_lr_scale
                                       * math.sqrt(PART_LR_REFERENCE_CHANNELS / fan_in_channels))})
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def _check_refinement_order(saved: dict[str, Any], current: TrainConfig, done: int) -> None:
    """Joint epochs come before refinement epochs: a resume may not add joint epochs once refining began."""
    saved_joint = int(saved.get("epochs", current.epochs))
    if current.epochs != saved_joint and done > min(saved_joint, current.epochs):
        raise ValueError(f"cannot resume with epochs={current.epochs}: the checkpoint already holds {done} epochs, "
                         f"{done - saved_joint} of them refinement epochs after {saved_joint} joint ones; resume with "
                         f"epochs={saved_joint}, or train in stages with refine_epochs=0 until the last stage")


def _check_resumable(saved: dict[str, Any], current: TrainConfig) -> None:
    now = asdict(current)
    saved = {**_ADDED_LATER, **saved}
    changed = [k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: the training settings differ from the checkpoint's ({details}); "
                         f"use the same settings or a new output directory")


def frozen_when_refining(explainer: Explainer) -> list[nn.Parameter]:
    """The parameters that the refinement epochs leave alone: both interpretable layers and the gate of p."""
    return [*explainer.interpretable1.parameters(), *explainer.interpretable2.parameters(),
            *explainer.gate_parameters()]


def train_step(performer: Performer, explainer: Explainer | DistributedDataParallel,
               optimizer: torch.optim.Optimizer, images: Tensor, config: TrainConfig,
               refine: bool = False) -> dict[str, float]:
    """One optimisation step on a batch of images; returns the loss terms and the mean p.

    ``refine=True``: a refinement step (TrainConfig.refine_epochs): the objective is reconstruction +
    refine_kl_weight·KL and the part filters and p keep their values (their gradients are dropped after
    the backward pass, so DDP still reduces every parameter and Adam skips them).

    ``explainer`` may be a DDP-wrapped explainer whose process group is set: the terms are then those of
    the global batch (the same on every rank).
    """
    device_type = images.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.autocast == "bf16"):
        features = performer.features(images)
        head = (lambda feature: performer.run_head(feature, images)) if performer.has_head else None
        output = explainer(features.input, features.target, performer_logits=features.logits, head=head)
    losses = output.losses
    optimizer.zero_grad(set_to_none=True)
    if refine:
        (losses.reconstruction + config.refine_kl_weight * losses.kl).backward()
        for parameter in frozen_when_refining(getattr(explainer, "module", explainer)):
            parameter.grad = None
    else:
        losses.total.backward()
    if config.grad_clip is not None:
        nn.utils.clip_grad_norm_(explainer.parameters(), config.grad_clip)
    optimizer.step()
    group = getattr(explainer, "module", explainer).process_group
    p = output.p.detach().float()
    if group is not None and p.dim() > 0:  # the per-image gate: mean over the global batch
        p_sum, count = parallel.sum_over_ranks(torch.stack([p.sum(), p.new_tensor(p.numel())]), group).tolist()
        return {**losses.as_floats(), "p": p_sum / count}
    return {**losses.as_floats(), "p": float(p.mean())}


def fit(performer: Performer, dataset: Dataset | DataLoader, out_dir: str | Path,
        config: TrainConfig | None = None, explainer_config: ExplainerConfig | dict[str, Any] | None = None, *,
        resume: bool = False, progress: bool = True, extra: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train an explainer on ``performer``'s features of ``dataset``; returns the per-epoch history.

    ``dataset`` yields images in [0, 1] (or (image, ...) tuples / {"image": ...} dicts; labels ignored);
    a DataLoader is accepted for its dataset only (fit owns the data order). ``explainer_config`` is a
    full :class:`ExplainerConfig` or a dict of options (channels and sizes are probed from the performer).
    ``resume=True`` continues from ``out_dir/checkpoint.pt`` when it exists (to ``config.epochs`` epochs
    in total) and starts afresh otherwise; without it an existing checkpoint is an error.
    ``extra`` (e.g. the dataset spec) is stored in the checkpoint for ``explain``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) or with ``torch.distributed`` already initialised, every process
    calls ``fit`` with the same arguments and trains its slice of each global batch (module docstring);
    a collective that fails because another rank died or stalled raises a one-line RuntimeError.
    """
    config = config or TrainConfig()
    dataset = dataset.dataset if isinstance(dataset, DataLoader) else dataset
    if len(dataset) == 0:
        raise ValueError("fit: the dataset is empty")
    context, device = parallel.setup(config.device)
    try:
        return _fit(performer, dataset, Path(out_dir), config, explainer_config, context, device, resume=resume,
                    progress=progress, extra=extra)
    except RuntimeError as error:
        if context.group is not None and _is_collective_failure(error):
            raise parallel.collective_failure(context, error) from error
        raise
    finally:
        parallel.teardown(context)


def _is_collective_failure(error: RuntimeError) -> bool:
    """A failed or timed-out collective (a dead or stalled peer), as opposed to an error of this rank."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(mark in text for mark in ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe"))


def _read_checkpoint_if_resuming(checkpoint_path: Path, resume: bool) -> dict[str, Any] | None:
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{str(checkpoint_path)!r} already exists; resume it (--resume / resume=True) "
                              f"or choose another output directory")
    return load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None


def _fit(performer: Performer, dataset: Dataset, out_dir: Path, config: TrainConfig,
         explainer_config: ExplainerConfig | dict[str, Any] | None, context: parallel.ParallelContext,
         device: torch.device, *, resume: bool, progress: bool, extra: dict[str, Any] | None) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    parallel.check_global_batch(len(dataset), config.batch_size, context.world_size)  # same verdict on all ranks
    joint_steps = config.epochs * math.ceil(len(dataset) / config.batch_size)
    if joint_steps < SETTLING_STEPS and context.is_main:
        warnings.warn(f"fit: {config.epochs} epochs of {len(dataset)} images are {joint_steps} optimisation steps; "
                      f"the defaults were measured at {SETTLING_STEPS} (resnet18 layer3) to 500 (the demo), and p and "
                      f"the part filters' location stability still move below that; use more images if you can (more "
                      f"epochs over few images merged resnet18's filters: docs/explainer.md, \"Training length\")",
                      stacklevel=3)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    # rank 0 alone reads the output directory (it need not be shared); its answer or error reaches all ranks
    state = parallel.run_on_rank0(context, lambda: _read_checkpoint_if_resuming(checkpoint_path, resume))
    performer = performer.to(device)
    parallel.broadcast_module(performer, context)  # e.g. a randomly initialised performer: rank 0's on all
    image_size = tuple(stack_images([image_of(dataset[0])]).shape[-2:])
    identity = performer_identity(performer, image_size)  # layers, weights fingerprint, image size: checked on resume
    torch.manual_seed(config.seed)
    if state is not None:
        _check_resumable(state["train_config"], config)
        check_same_performer(state.get("extra", {}).get("performer_identity"), identity)
        explainer = explainer_from_state(state).to(device)
        if "training_explainer" in state:  # averaging: "explainer" holds the average, this the live weights
            explainer.load_state_dict(state["training_explainer"])
        requested = None if explainer_config is None else make_explainer_config(performer, image_size, explainer_config)
        if requested is not None and requested != explainer.config:
            saved, now = explainer.config.to_dict(), requested.to_dict()
            details = ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in now if saved.get(k) != now[k])
            raise ValueError(f"cannot resume: the explainer options differ from the checkpoint's ({details}); use "
                             f"the same options or a new output directory")
        optimizer = make_optimizer(explainer, config)
        optimizer.load_state_dict(state["optimizer"])
        history: list[dict[str, float]] = list(state["history"])
        start_epoch = int(state["epoch"])
        _check_refinement_order(state["train_config"], config, start_epoch)
        torch.set_rng_state(state["rng"]["torch"])
    else:
        explainer = Explainer(make_explainer_config(performer, image_size, explainer_config)).to(device)
        optimizer = make_optimizer(explainer, config)
        history, start_epoch = [], 0
    average = None
    if config.average_decay > 0:
        saved_average = None if state is None else {"steps": state["average_steps"], "averaged": state["explainer"]}
        average = WeightAverage(explainer, config.average_decay, saved_average)

    explainer.train()
    model: Explainer | DistributedDataParallel = explainer
    if context.group is not None:
        explainer.set_process_group(context.group, ddp_gradients=True)
        model = DistributedDataParallel(explainer, device_ids=[device] if device.type == "cuda" else None,
                                        process_group=context.group, **parallel.ddp_options())
        leftover = len(dataset) % config.batch_size
        if 0 < leftover < context.world_size and context.is_main:
            warnings.warn(f"fit: the last global batch of each epoch ({leftover} images) is dropped: it has fewer "
                          f"images than the {context.world_size} ranks", stacklevel=3)
    show = progress and context.is_main
    total_epochs = config.epochs + config.refine_epochs
    for epoch in range(start_epoch, total_epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * config.lr_factor(epoch)
        if average is not None and epoch == config.epochs and config.refine_epochs > 0:
            average.restart(explainer)  # the phase changes: average the refinement's weights only
        order = epoch_order(len(dataset), config.seed, epoch)
        rank_slices, global_sizes = parallel.rank_batches(order, config.batch_size, context.rank, context.world_size)
        loader = DataLoader(dataset, batch_sampler=rank_slices, num_workers=config.num_workers,
                            collate_fn=collate_images)
        totals: dict[str, float] = {}
        images_seen, started = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs}", disable=not show, leave=False)
        for images, global_size in zip(bar, global_sizes):
            images = images.to(device, non_blocking=True)
            terms = train_step(performer, model, optimizer, images, config, refine=epoch >= config.epochs)
            if average is not None:
                average.update(explainer)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value * global_size
            images_seen += global_size
            bar.set_postfix(loss=f"{terms['total']:.4f}", rec=f"{terms['reconstruction']:.4f}",
                            kl=f"{terms['kl']:.4f}", filt=f"{terms['filter']:.4f}", p=f"{terms['p']:.3f}")
        entry = {name: value / images_seen for name, value in totals.items()}
        entry.update(epoch=epoch + 1, lr=config.lr * config.lr_factor(epoch), seconds=time.perf_counter() - started)
        history.append(entry)
        if show:
            tqdm.write(f"epoch {epoch + 1}/{total_epochs}: loss {entry['total']:.4f}  reconstruction "
                       f"{entry['reconstruction']:.4f}  kl {entry['kl']:.4f}  filter {entry['filter']:.4f}  "
                       f"p {entry['p']:.3f}")
        if context.is_main:
            weights = {"explainer": explainer.state_dict()} if average is None else {
                "explainer": average.averaged, "training_explainer": explainer.state_dict(),
                "average_steps": average.steps}
            save_checkpoint(checkpoint_path, {
                "explainer_config": explainer.config.to_dict(), "train_config": asdict(config),
                "performer": None if performer.spec is None else asdict(performer.spec),
                "image_size": list(image_size),
                "extra": {**dict(extra or {}), "performer_identity": identity},
                **weights, "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "history": history, "rng": {"torch": torch.get_rng_state()},
            })
        if context.group is not None:
            dist.barrier(group=context.group)  # no rank runs ahead of (or exits before) the checkpoint
    explainer.set_process_group(None)
    return history
