"""Datasets for training explainers. Modules are imported lazily, so each dataset may bring its own deps.

``open_dataset(spec, image_size)`` turns the ``--data`` argument of ``fastexplain fit`` into a Dataset:

* an existing directory → :class:`fastexplain.data.folders.ImageFolderDataset` (labels ignored);
* a registered name, optionally with options, ``NAME`` or ``NAME:key=value,key=value`` → the function
  ``<NAME>_dataset(image_size=..., **options)`` of the module ``fastexplain.data.<NAME>``
  (e.g. ``partworld`` → ``fastexplain.data.partworld.partworld_dataset``). Option values are parsed as
  int, float or bool where they look like one. Register a new name by adding it to ``NAMED_DATASETS``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

NAMED_DATASETS: dict[str, str] = {
    "partworld": "fastexplain.data.partworld",
    "cub": "fastexplain.data.cub",
}


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_dataset_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"NAME:key=value,…" → (NAME, {key: value}); a bad option is a one-line error."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, equals, value = part.partition("=")
        if not equals or not key:
            raise ValueError(f"dataset option {part!r} in {spec!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    return name, options


def open_dataset(spec: str, image_size: int, **options: Any) -> Dataset:
    """The dataset named by ``spec`` (a directory of images or a registered name), images image_size²."""
    path = Path(spec)
    if path.is_dir():
        from .folders import ImageFolderDataset

        return ImageFolderDataset(path, image_size, **options)
    name, spec_options = parse_dataset_spec(spec)
    if name not in NAMED_DATASETS:
        raise FileNotFoundError(f"--data {spec!r} is neither a directory nor a known dataset name "
                                f"({', '.join(sorted(NAMED_DATASETS))}); pass an image folder or a known name")
    module_name = NAMED_DATASETS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ValueError(f"dataset {name!r} is not available in this installation (module {module_name} "
                         f"is missing); pass an image folder instead") from None
    builder = getattr(module, f"{name}_dataset", None)
    if builder is None:
        raise ValueError(f"dataset module {module_name} defines no {name}_dataset(image_size, **options) function")
    return builder(image_size=image_size, **{**spec_options, **options})


def stack_images(images: Sequence[Tensor]) -> Tensor:
    """Stack dataset images ([C, H, W] float tensors in [0, 1]) into a batch; integer images, images that
    are not [C, H, W] and images of different sizes are one-line errors that say how to fix the dataset."""
    for image in images:
        if not isinstance(image, Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"dataset images must be [C, H, W] tensors, got {shape}; return one image per "
                             f"item (e.g. torchvision.transforms.ToTensor())")
        if not image.is_floating_point():
            raise ValueError(f"dataset images must be float tensors in [0, 1], got {image.dtype}; convert them "
                             f"in the dataset with image.float() / 255 (or torchvision.transforms.ToTensor())")
    sizes = sorted({tuple(image.shape) for image in images})
    if len(sizes) > 1:
        raise ValueError(f"dataset images have different sizes ({sizes[0]} and {sizes[1]}); resize them to one "
                         f"size in the dataset, e.g. torchvision.transforms.Resize((S, S)) or "
                         f"fastexplain.data.folders.load_image(path, S)")
    return torch.stack(list(images))


__all__ = ["NAMED_DATASETS", "open_dataset", "parse_dataset_spec", "stack_images"]
