"""CUB-200-2011 loader on a tiny fake tree written by the test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastexplain.data.cub import CUB
from fastexplain.metrics import location_instability, part_interpretability


def _write_tree(root: Path) -> None:
    (root / "images" / "001.Fake_bird").mkdir(parents=True)
    (root / "images" / "002.Other_bird").mkdir(parents=True)
    (root / "parts").mkdir()
    files = ["001.Fake_bird/a.jpg", "001.Fake_bird/b.png", "002.Other_bird/c.jpg", "002.Other_bird/d.png"]
    for n, name in enumerate(files):
        pixels = np.zeros((40, 60, 3), dtype=np.uint8)
        pixels[:, :, n % 3] = 200
        pixels[10:20, 20:30] = 255  # a white square at x 20..29, y 10..19
        Image.fromarray(pixels).save(root / "images" / name)
    (root / "images.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(files)))
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (root / "bounding_boxes.txt").write_text("1 10.0 5.0 40.0 30.0\n2 0 0 60 40\n3 20 10 10 10\n4 0 0 60 40\n")
    (root / "classes.txt").write_text("1 001.Fake_bird\n2 002.Other_bird\n")
    (root / "parts" / "parts.txt").write_text("1 back\n2 left eye\n")
    (root / "parts" / "part_locs.txt").write_text(
        "1 1 25.0 15.0 1\n1 2 0.0 0.0 0\n2 1 30.0 20.0 1\n2 2 50.0 30.0 1\n"
        "3 1 25.0 15.0 1\n3 2 59.0 39.0 1\n4 1 12.0 8.0 1\n4 2 0.0 0.0 0\n")


def test_loads_crops_and_transforms_keypoints(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    train = CUB(tmp_path, split="train", image_size=20)
    assert len(train) == 2 and train.labels.tolist() == [0, 1] and train.part_names == ("back", "left eye")
    assert train.class_names == ("001.Fake_bird", "002.Other_bird") and train.num_classes == 2
    # image 1: box x0=10, y0=5, 40×30 → scale 0.5 in x, 2/3 in y
    assert train.keypoints[0, 0].tolist() == pytest.approx([7.5, 20 / 3])
    assert train.visible[0].tolist() == [True, False]
    # image 3: box 20,10,10×10; the eye at (59, 39) leaves the crop → not visible
    assert train.keypoints[1, 0].tolist() == pytest.approx([10.0, 10.0]) and train.visible[1].tolist() == [True, False]
    image, label = train[1]
    assert image.shape == (3, 20, 20) and label == 1 and float(image[:, 3:-3, 3:-3].min()) > 0.85  # the crop is the white square


def test_uncropped_split_masks_and_metrics(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    test = CUB(tmp_path, split="test", image_size=30, crop_to_box=False, mask_radius=0.1)
    assert test.keypoints[0, 1].tolist() == pytest.approx([25.0, 22.5])  # (50, 30) × (30/60, 30/40)
    sample = test.sample(0)
    assert sample.part_masks.shape == (2, 30, 30) and sample.part_masks[1, 22, 25] and not sample.part_masks[1, 0, 0]
    assert not test.part_masks_for(1, 2)[0, 1].any()  # invisible part → empty mask
    maps = torch.rand(2, 3, 6, 6)
    li = location_instability(maps, test.keypoints, test.visible, (30, 30))
    assert li.per_filter_landmark.shape == (3, 2)
    assert 0 <= part_interpretability(maps, test.part_masks_for).value <= 1
    assert test.float_images().shape == (2, 3, 30, 30)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        CUB(tmp_path / "nope")
    _write_tree(tmp_path)
    (tmp_path / "parts" / "part_locs.txt").unlink()
    with pytest.raises(FileNotFoundError, match="parts/part_locs.txt"):
        CUB(tmp_path)
    (tmp_path / "parts" / "part_locs.txt").write_text("1 9 1.0 1.0 1\n")
    with pytest.raises(ValueError, match="part id 9"):
        CUB(tmp_path)
    (tmp_path / "parts" / "part_locs.txt").write_text("1 1 1.0 1.0 1\n")
    (tmp_path / "images" / "001.Fake_bird" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        CUB(tmp_path, split="train")[0]
    with pytest.raises(ValueError, match="split"):
        CUB(tmp_path, split="valid")


def test_open_dataset_hook(tmp_path: Path) -> None:
    from fastexplain.data import open_dataset

    _write_tree(tmp_path)
    dataset = open_dataset(f"cub:root={tmp_path},split=all", 24)
    assert len(dataset) == 4 and dataset[2][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="cub:root="):
        open_dataset("cub", 24)
