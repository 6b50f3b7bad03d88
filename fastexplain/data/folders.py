"""Image folders: every image file under a directory (ImageFolder-style class subfolders or flat).

Labels are ignored: the explainer trains without them. Images are converted to RGB, resized so that the
shorter side is ``image_size`` and centre-cropped to image_size × image_size, returned as float tensors
[3, S, S] in [0, 1] (the performer applies its own input normalisation).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


def load_image(path: str | Path, image_size: int) -> Tensor:
    """One image file as a [3, S, S] float tensor in [0, 1] (shorter side resized to S, centre crop)."""
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.functional as TF

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a readable image ({type(error).__name__})") from None
    tensor = TF.pil_to_tensor(rgb).float() / 255.0
    tensor = TF.resize(tensor, image_size, antialias=True)
    return TF.center_crop(tensor, [image_size, image_size]).clamp(0.0, 1.0)


class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursively, sorted by path), as [3, S, S] tensors in [0, 1]."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be ≥ 1, got {image_size!r}")
        self.image_size = int(image_size)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(self.root)!r}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.paths[index], self.image_size)
