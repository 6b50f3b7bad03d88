"""Demo performer: layout, caching in the output dir, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastexplain.data.partworld import PartWorld
from fastexplain.zoo import CACHE_NAME, EXPLAINED_LAYER, PartWorldVGG, evaluate_accuracy, load_or_train_performer, load_performer


def test_explained_layer_is_a_middle_relu_with_16x16_maps() -> None:
    model = PartWorldVGG().eval()
    layer = dict(model.named_modules())[EXPLAINED_LAYER]
    assert isinstance(layer, torch.nn.ReLU)
    seen: dict[str, torch.Size] = {}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["shape"] = output.shape

    layer.register_forward_hook(record)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    assert seen["shape"] == (2, 64, 16, 16)


def test_trains_caches_and_reuses(tmp_path: Path) -> None:
    settings = dict(image_size=64, train_images=64, test_images=16, epochs=2, seed=1, progress=False)
    model, meta = load_or_train_performer(tmp_path, **settings)
    assert not meta["cached"] and (tmp_path / CACHE_NAME).is_file()
    assert len(meta["history"]["train_loss"]) == 2 and 0 <= meta["test_accuracy"] <= 1
    assert meta["history"]["train_loss"][1] < meta["history"]["train_loss"][0]
    again, meta_again = load_or_train_performer(tmp_path, **settings)
    assert meta_again["cached"] and meta_again["test_accuracy"] == meta["test_accuracy"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    test = PartWorld(16, image_size=64, seed=1, split="test")
    assert evaluate_accuracy(again, test.images, test.labels) == pytest.approx(meta["test_accuracy"])


def test_corrupt_or_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="load_or_train_performer"):
        load_performer(tmp_path / "none.pt")
    (tmp_path / CACHE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete it to retrain"):
        load_performer(tmp_path / CACHE_NAME)
