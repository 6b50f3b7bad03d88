"""Part world: seeded purity, annotation consistency, categories by parts, moving parts, speed."""
from __future__ import annotations

import pytest
import torch

from fastexplain.data.partworld import CATEGORY_PARTS, CLASS_NAMES, PART_NAMES, PartWorld, partworld_dataset


@pytest.fixture(scope="module")
def world() -> PartWorld:
    return PartWorld(120, image_size=64, seed=7)


def test_samples_are_pure_functions_of_seed_split_index(world: PartWorld) -> None:
    small = PartWorld(5, image_size=64, seed=7)
    assert torch.equal(small.images, world.images[:5]) and torch.equal(small.part_masks, world.part_masks[:5])
    assert torch.equal(small.keypoints.nan_to_num(-1), world.keypoints[:5].nan_to_num(-1))
    assert not torch.equal(PartWorld(5, image_size=64, seed=8).images, small.images)
    assert not torch.equal(PartWorld(5, image_size=64, seed=7, split="test").images, small.images)


def test_structure_and_ranges(world: PartWorld) -> None:
    image, label = world[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert 0 <= label < len(CLASS_NAMES) == world.num_classes
    sample = world.sample(3)
    assert sample.keypoints.shape == (len(PART_NAMES), 2) and sample.part_masks.shape == (len(PART_NAMES), 64, 64)
    assert int(world.part_masks.sum(1).max()) <= 1  # every pixel belongs to at most one part
    assert set(world.labels.tolist()) == set(range(len(CLASS_NAMES)))


def test_annotations_follow_the_category(world: PartWorld) -> None:
    for n in range(len(world)):
        parts = CATEGORY_PARTS[CLASS_NAMES[int(world.labels[n])]]
        for k, name in enumerate(PART_NAMES):
            if name not in parts:
                assert not world.visible[n, k] and not world.part_masks[n, k].any()
                assert torch.isnan(world.keypoints[n, k]).all()
            elif world.visible[n, k]:
                x, y = world.keypoints[n, k].tolist()
                assert 0 <= x < 64 and 0 <= y < 64 and world.part_masks[n, k].any()
    for name, parts in CATEGORY_PARTS.items():
        assert 4 <= len(parts) <= 6, name
    assert len({frozenset(p.items()) for p in CATEGORY_PARTS.values()}) == len(CATEGORY_PARTS)


def test_parts_move_and_are_mostly_visible(world: PartWorld) -> None:
    body = PART_NAMES.index("body")
    assert float(world.visible[:, body].float().mean()) > 0.8
    spread = world.keypoints[world.visible[:, body], body].std(dim=0)
    assert float(spread.min()) > 3.0  # pixels: the body moves around the image
    head = PART_NAMES.index("head")
    offset = world.keypoints[:, head] - world.keypoints[:, body]
    both = world.visible[:, head] & world.visible[:, body]
    assert float(offset[both].std(dim=0).min()) > 1.0  # rotation, scale and flips move parts relative to each other


def test_generation_is_fast(world: PartWorld) -> None:
    assert world.generation_seconds / len(world) < 0.03  # ~2 ms per image measured; generous for shared CI machines


def test_bad_arguments_and_registry_hook() -> None:
    with pytest.raises(ValueError, match="split"):
        PartWorld(4, split="dev")
    with pytest.raises(ValueError, match="image_size"):
        PartWorld(4, image_size=8)
    from fastexplain.data import open_dataset

    dataset = open_dataset("partworld:num_images=6,seed=2", 48)
    assert len(dataset) == 6 and dataset[0][0].shape == (3, 48, 48)
    assert isinstance(partworld_dataset(image_size=32, num_images=2), PartWorld)
