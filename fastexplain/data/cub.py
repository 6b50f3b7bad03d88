"""CUB-200-2011 from a local directory, with the part world's sample structure (issue 7; docs/metrics.md).

Expected layout (the official archive's ``CUB_200_2011/`` folder; nothing is ever downloaded)::

    images.txt               <image_id> <relative path under images/>
    image_class_labels.txt   <image_id> <class_id, 1-based>
    train_test_split.txt     <image_id> <1 = train, 0 = test>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>     (pixels, top-left origin)
    parts/parts.txt          <part_id> <part name, may contain spaces>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible 0/1>
    classes.txt              <class_id> <name>                       (optional)
    images/...

Images are (optionally) cropped to their bounding box, then resized to ``image_size`` × ``image_size``
(aspect ratio not kept); keypoints follow the same transform, and a keypoint that leaves the crop is
not visible. CUB has no part masks: :meth:`CUB.part_masks_for` returns disks of radius
``mask_radius`` × ``image_size`` around each visible keypoint (default 0.1), an approximation that
part interpretability then measures against — say so when you report numbers on CUB.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .partworld import PartSample

REQUIRED_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
                  "parts/parts.txt", "parts/part_locs.txt")


def _read_rows(path: Path, min_fields: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < min_fields:
            raise ValueError(f"{path}:{number}: expected at least {min_fields} fields, got {line!r}")
        rows.append(fields)
    return rows


class CUB(Dataset):
    """CUB-200-2011 as a Dataset: ``dataset[i] = (image [3,S,S] float in [0,1], label 0-based)``.

    ``CUB(root, split="train" | "test" | "all", image_size=128, crop_to_box=True, mask_radius=0.1)``.
    Bulk annotations ``labels`` [N], ``keypoints`` [N,K,2] (x, y in resized pixels), ``visible`` [N,K]
    are available at once; ``sample(i)`` gives a :class:`PartSample` (masks are keypoint disks), and
    ``part_masks_for(start, stop)`` / ``float_images(indices)`` feed :mod:`fastexplain.metrics`.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", image_size: int = 128,
                 crop_to_box: bool = True, mask_radius: float = 0.1) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"CUB root {self.root} is not a directory; pass the folder that holds images.txt")
        missing = [name for name in REQUIRED_FILES if not (self.root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"CUB root {self.root} lacks {', '.join(missing)}; expected the CUB_200_2011 layout "
                                    f"({', '.join(REQUIRED_FILES)}, images/)")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be ≥ 8 pixels, got {image_size}")
        self.image_size, self.crop_to_box, self.mask_radius = image_size, crop_to_box, mask_radius

        paths = {int(r[0]): " ".join(r[1:]) for r in _read_rows(self.root / "images.txt", 2)}
        classes = {int(r[0]): int(r[1]) for r in _read_rows(self.root / "image_class_labels.txt", 2)}
        is_train = {int(r[0]): r[1] == "1" for r in _read_rows(self.root / "train_test_split.txt", 2)}
        boxes = {int(r[0]): tuple(float(v) for v in r[1:5]) for r in _read_rows(self.root / "bounding_boxes.txt", 5)}
        part_rows = _read_rows(self.root / "parts/parts.txt", 2)
        part_ids = [int(r[0]) for r in part_rows]
        self.part_names: tuple[str, ...] = tuple(" ".join(r[1:]) for r in part_rows)
        class_file = self.root / "classes.txt"
        class_ids = sorted(set(classes.values()))
        if class_file.is_file():
            names = {int(r[0]): " ".join(r[1:]) for r in _read_rows(class_file, 2)}
            self.class_names: tuple[str, ...] = tuple(names.get(c, str(c)) for c in range(1, max(class_ids) + 1))
        else:
            self.class_names = tuple(str(c) for c in range(1, max(class_ids) + 1))

        for name, table in (("image_class_labels.txt", classes), ("train_test_split.txt", is_train),
                            ("bounding_boxes.txt", boxes)):
            absent = sorted(set(paths) - set(table))
            if absent:
                raise ValueError(f"{self.root / name} has no entry for image id {absent[0]} (listed in images.txt)")
        chosen = [i for i in sorted(paths) if split == "all" or is_train[i] == (split == "train")]
        if not chosen:
            raise ValueError(f"CUB split {split!r} in {self.root} is empty")
        self.image_ids = chosen
        self.paths = [self.root / "images" / paths[i] for i in chosen]
        self.labels = torch.tensor([classes[i] - 1 for i in chosen], dtype=torch.long)
        self.boxes = torch.tensor([boxes[i] for i in chosen], dtype=torch.float64)

        position = {image_id: n for n, image_id in enumerate(chosen)}
        part_index = {pid: k for k, pid in enumerate(part_ids)}
        raw = torch.full((len(chosen), len(part_ids), 2), float("nan"), dtype=torch.float64)
        raw_visible = torch.zeros(len(chosen), len(part_ids), dtype=torch.bool)
        for fields in _read_rows(self.root / "parts/part_locs.txt", 5):
            n = position.get(int(fields[0]))
            if n is None:
                continue
            k = part_index.get(int(fields[1]))
            if k is None:
                raise ValueError(f"parts/part_locs.txt names part id {fields[1]}, absent from parts/parts.txt")
            raw[n, k] = torch.tensor([float(fields[2]), float(fields[3])], dtype=torch.float64)
            raw_visible[n, k] = fields[4] == "1"
        self.keypoints, self.visible = self._transform_keypoints(raw, raw_visible)

    @property
    def num_classes(self) -> int:
        """Number of classes (from classes.txt, else the largest class id)."""
        return len(self.class_names)

    def _crop_box(self, n: int, width: int, height: int) -> tuple[float, float, float, float]:
        if not self.crop_to_box:
            return 0.0, 0.0, float(width), float(height)
        x, y, w, h = self.boxes[n].tolist()
        return x, y, max(w, 1.0), max(h, 1.0)

    def _image_size_of(self, n: int) -> tuple[int, int]:
        from PIL import Image

        with Image.open(self._checked_path(n)) as image:
            return image.size

    def _checked_path(self, n: int) -> Path:
        path = self.paths[n]
        if not path.is_file():
            raise FileNotFoundError(f"CUB image {path} (image id {self.image_ids[n]}) is missing")
        return path

    def _transform_keypoints(self, raw: Tensor, raw_visible: Tensor) -> tuple[Tensor, Tensor]:
        keypoints = torch.empty_like(raw)
        for n in range(raw.shape[0]):
            width, height = (0, 0) if self.crop_to_box else self._image_size_of(n)
            x0, y0, w, h = self._crop_box(n, width, height)
            keypoints[n, :, 0] = (raw[n, :, 0] - x0) * (self.image_size / w)
            keypoints[n, :, 1] = (raw[n, :, 1] - y0) * (self.image_size / h)
        inside = ((keypoints >= 0) & (keypoints < self.image_size)).all(dim=2)
        visible = raw_visible & inside & torch.isfinite(keypoints).all(dim=2)
        return keypoints.float(), visible

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Tensor:
        """Image ``index`` cropped (if asked) and resized: float32 [3,S,S] in [0,1]."""
        from PIL import Image

        with Image.open(self._checked_path(index)) as opened:
            rgb = opened.convert("RGB")
        x0, y0, w, h = self._crop_box(index, *rgb.size)
        resized = rgb.resize((self.image_size, self.image_size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.image(index), int(self.labels[index])

    def part_masks_for(self, start: int, stop: int) -> Tensor:
        """Disk masks around visible keypoints for images start..stop-1: bool [n, K, S, S]."""
        size = self.image_size
        centres = torch.arange(size, dtype=torch.float32) + 0.5
        points = self.keypoints[start:stop]  # [n, K, 2]
        dx = centres.view(1, 1, 1, size) - points[..., 0].view(*points.shape[:2], 1, 1)
        dy = centres.view(1, 1, size, 1) - points[..., 1].view(*points.shape[:2], 1, 1)
        disks = dx * dx + dy * dy <= (self.mask_radius * size) ** 2
        return disks & self.visible[start:stop].view(*points.shape[:2], 1, 1)

    def float_images(self, indices: Tensor | None = None) -> Tensor:
        """Images as float32 [n,3,S,S] (all when ``indices`` is None); read from disk each call."""
        chosen = range(len(self)) if indices is None else [int(i) for i in indices]
        return torch.stack([self.image(i) for i in chosen])

    def sample(self, index: int) -> PartSample:
        """The full annotation of sample ``index`` (masks: keypoint disks)."""
        return PartSample(self.image(index), int(self.labels[index]), self.keypoints[index].clone(),
                          self.visible[index].clone(), self.part_masks_for(index, index + 1)[0])


def cub_dataset(image_size: int = 128, root: str | None = None, split: str = "train", crop_to_box: bool = True,
                mask_radius: float = 0.1) -> CUB:
    """Constructor used by ``fastexplain.data.open_dataset("cub:root=/path/to/CUB_200_2011", image_size)``."""
    if root is None:
        raise ValueError("the cub dataset needs its folder: pass --data cub:root=/path/to/CUB_200_2011")
    return CUB(root, split=split, image_size=image_size, crop_to_box=crop_to_box, mask_radius=mask_radius)
