"""The demo performer: a small VGG-style CNN trained with labels on the part world (issue 7, docs/method.md §4, §7).

``PartWorldVGG`` mirrors torchvision's VGG layout (``features`` → ``avgpool`` → ``flatten`` →
``classifier``) so that :mod:`fastexplain.performer` can cut it at a dotted layer name and run the rest.
At 64 px the layers are::

    features.0-2   conv3x3 3→16,  BN, ReLU      64×64
    features.3     maxpool 2                    32×32
    features.4-6   conv3x3 16→32, BN, ReLU      32×32
    features.7     maxpool 2                    16×16
    features.8-10  conv3x3 32→64, BN, ReLU      16×16
    features.11-13 conv3x3 64→64, BN, ReLU      16×16   ← EXPLAINED_LAYER = "features.13"
    features.14    maxpool 2                     8×8
    features.15-17 conv3x3 64→128, BN, ReLU      8×8
    avgpool (global), classifier: dropout 0.2, linear 128→5

``load_or_train_performer(out_dir)`` trains it (Adam, lr 3e-3, weight decay 1e-4, one-cycle schedule,
batch 64, seeded) and
caches ``performer.pt`` (state_dict + metadata: accuracy on a held-out part-world split, data sizes,
seconds, history) in ``out_dir``; a later call with the same settings reuses the file.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data.partworld import CLASS_NAMES, PartWorld

EXPLAINED_LAYER = "features.13"
ARCHITECTURE = "partworld-vgg-v1"
CACHE_NAME = "performer.pt"


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=False)]


class PartWorldVGG(nn.Module):
    """Small VGG-style classifier for the part world (layout in the module docstring)."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(3, w), nn.MaxPool2d(2),
            *_conv_block(w, 2 * w), nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w), *_conv_block(4 * w, 4 * w), nn.MaxPool2d(2),
            *_conv_block(4 * w, 8 * w),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * w, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits [B, num_classes] for images [B, 3, H, W] in [0, 1]."""
        return self.classifier(torch.flatten(self.avgpool(self.features(images)), 1))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on float images [N,3,H,W] (or uint8, scaled by 1/255)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        batch = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch
        correct += int((model(batch).argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def train_performer(train_set: PartWorld, test_set: PartWorld, epochs: int = 8, batch_size: int = 64,
                    lr: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[PartWorldVGG, dict[str, Any]]:
    """Supervised training of :class:`PartWorldVGG`; returns the model (eval mode) and its metadata."""
    torch.manual_seed(seed)
    model = PartWorldVGG(num_classes=len(CLASS_NAMES))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "test_accuracy": []}
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="performer", unit="step")
    for _epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            images, labels = train_set.float_images(index), train_set.labels[index]
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == labels).sum())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        history["train_loss"].append(loss_sum / len(train_set))
        history["train_accuracy"].append(correct / len(train_set))
        history["test_accuracy"].append(evaluate_accuracy(model, test_set.images, test_set.labels))
    if bar is not None:
        bar.close()
    model.eval()
    meta = {
        "architecture": ARCHITECTURE, "explained_layer": EXPLAINED_LAYER, "class_names": list(CLASS_NAMES),
        "image_size": train_set.image_size, "train_images": len(train_set), "test_images": len(test_set),
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "test_accuracy": history["test_accuracy"][-1], "train_seconds": time.perf_counter() - start,
        "history": history,
    }
    return model, meta


def load_performer(path: str | os.PathLike[str]) -> tuple[PartWorldVGG, dict[str, Any]]:
    """Load a cached performer file written by :func:`load_or_train_performer` (model in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no performer file at {path}; run load_or_train_performer(out_dir) to create it")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = payload["meta"], payload["state_dict"]
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"{path} is not a readable performer file ({error.__class__.__name__}); delete it to retrain") from None
    if meta.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path} holds architecture {meta.get('architecture')!r}, expected {ARCHITECTURE!r}; delete it to retrain")
    model = PartWorldVGG(num_classes=len(meta["class_names"]))
    model.load_state_dict(state)
    return model.eval(), meta


def load_or_train_performer(out_dir: str | os.PathLike[str], image_size: int = 64, train_images: int = 4000,
                            test_images: int = 500, epochs: int = 10, seed: int = 0,
                            progress: bool = True) -> tuple[PartWorldVGG, dict[str, Any]]:
    """The demo performer: reuse ``out_dir/performer.pt`` when it matches these settings, else train and cache it.

    Returns ``(model in eval mode, metadata)``; ``metadata["test_accuracy"]`` is the held-out accuracy
    on ``PartWorld(test_images, image_size, seed, split="test")`` and ``metadata["cached"]`` says whether
    the file was reused.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / CACHE_NAME
    wanted = {"image_size": image_size, "train_images": train_images, "test_images": test_images,
              "epochs": epochs, "seed": seed}
    if cache.is_file():
        try:
            model, meta = load_performer(cache)
        except ValueError:
            model, meta = None, {}
        if model is not None and all(meta.get(key) == value for key, value in wanted.items()):
            return model, {**meta, "cached": True}
    train_set = PartWorld(train_images, image_size=image_size, seed=seed, split="train", progress=progress)
    test_set = PartWorld(test_images, image_size=image_size, seed=seed, split="test", progress=progress)
    model, meta = train_performer(train_set, test_set, epochs=epochs, seed=seed, progress=progress)
    temporary = cache.with_suffix(".pt.tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, temporary)
    os.replace(temporary, cache)
    return model, {**meta, "cached": False}
