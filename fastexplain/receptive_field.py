"""Receptive-field centres of a layer's cells in image pixels (docs/method.md §5, location instability).

For a Sequential-like stack (the leaf modules of ``model.named_modules()`` run in that order, up to
and including the named layer) every cell (r, c) of the layer's map has a receptive field whose centre
in the image is ``start + r · jump`` per axis. Image pixel i covers [i, i + 1), so pixel centres are
i + 0.5. Through a conv / pool with kernel k, stride s, padding p, dilation d:

    start_out = start_in + (d·(k − 1)/2 − p) · jump_in,   jump_out = jump_in · s,
    size_out  = size_in + d·(k − 1) · jump_in.

ReLU-like, normalisation and dropout layers leave the geometry unchanged. Anything else (adaptive
pooling, linear layers, residual branches…) cannot be followed: :func:`cell_centers` then falls back to
the proportional centres ``((r + 0.5)·H_img/h, (c + 0.5)·W_img/w)`` and says so in ``method`` and
``reason``. The walk also predicts the map size; when it disagrees with the real one (e.g. a branch
was walked as if it were sequential) the fallback is used as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_NEUTRAL = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity,
    nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)
_GEOMETRIC = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class UnsupportedLayerError(ValueError):
    """The stack up to the layer contains a module whose geometry cannot be followed."""


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (rows, cols): pixel centre of cell 0, jump between cells, receptive-field size, map size."""

    start: tuple[float, float]
    jump: tuple[float, float]
    size: tuple[float, float]
    map_size: tuple[int, int]

    def centers(self) -> tuple[Tensor, Tensor]:
        """Centres in image pixels: rows (y) [h] and cols (x) [w], float64."""
        rows = self.start[0] + self.jump[0] * torch.arange(self.map_size[0], dtype=torch.float64)
        cols = self.start[1] + self.jump[1] * torch.arange(self.map_size[1], dtype=torch.float64)
        return rows, cols


@dataclass(frozen=True)
class CellCenters:
    """Image-pixel centres of a map's cells: rows (y) [h], cols (x) [w]; ``method`` says how they were found."""

    rows: Tensor
    cols: Tensor
    method: str  # "receptive_field" or "proportional"
    reason: str | None = None  # why the proportional fallback was used


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int]:
    if isinstance(value, tuple):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def _leaf_modules_until(model: nn.Module, layer: str) -> list[tuple[str, nn.Module]]:
    names = [name for name, _ in model.named_modules()]
    if layer not in names:
        import difflib

        close = difflib.get_close_matches(layer, names, n=3)
        raise ValueError(f"layer {layer!r} is not in the model; closest names: {close or names[:5]}")
    leaves: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name == layer:
            children = [(f"{name}.{n}" if n else name, m) for n, m in module.named_modules() if not list(m.children())]
            return leaves + children
        if not list(module.children()):
            leaves.append((name, module))
    raise AssertionError("unreachable: layer was found among the names")


def receptive_field(model: nn.Module, layer: str, image_size: tuple[int, int] | int) -> ReceptiveField:
    """Walk the leaf modules up to ``layer`` (inclusive) and return the geometry of its cells.

    Raises :class:`UnsupportedLayerError` when a module on the way has unknown geometry.
    """
    height, width = _pair(image_size)
    start, jump, size, extent = [0.5, 0.5], [1.0, 1.0], [1.0, 1.0], [height, width]
    for name, module in _leaf_modules_until(model, layer):
        if isinstance(module, _NEUTRAL):
            continue
        if not isinstance(module, _GEOMETRIC):
            raise UnsupportedLayerError(f"module {name!r} ({type(module).__name__}) has no known receptive-field geometry")
        kernel, stride = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        padding_value = module.padding
        ceil_mode = bool(getattr(module, "ceil_mode", False))
        for axis in range(2):
            span = dilation[axis] * (kernel[axis] - 1)
            if padding_value == "same":
                pad = span / 2
            elif padding_value == "valid":
                pad = 0
            else:
                pad = _pair(padding_value)[axis]
            start[axis] += (span / 2 - pad) * jump[axis]
            size[axis] += span * jump[axis]
            jump[axis] *= stride[axis]
            rounding = math.ceil if ceil_mode else math.floor
            extent[axis] = int(rounding((extent[axis] + 2 * pad - span - 1) / stride[axis])) + 1
    return ReceptiveField(tuple(start), tuple(jump), tuple(size), (extent[0], extent[1]))  # type: ignore[arg-type]


def proportional_centers(map_size: tuple[int, int], image_size: tuple[int, int] | int, reason: str | None = None) -> CellCenters:
    """The fallback: cell (r, c) ↦ ((r + 0.5)·H_img/h, (c + 0.5)·W_img/w)."""
    height, width = _pair(image_size)
    h, w = map_size
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) * (height / h)
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) * (width / w)
    return CellCenters(rows, cols, "proportional", reason)


def cell_centers(model: nn.Module | None, layer: str | None, image_size: tuple[int, int] | int,
                 map_size: tuple[int, int]) -> CellCenters:
    """Receptive-field centres of ``layer``'s cells when they can be derived, else the proportional fallback.

    ``model=None`` asks for the fallback directly (e.g. for maps that no single stack produced, such as
    the explainer's part filters, whose cells are aligned with the input layer's cells: pass the
    performer and its layer instead).
    """
    if model is None or layer is None:
        return proportional_centers(map_size, image_size, reason="no model/layer given")
    try:
        field = receptive_field(model, layer, image_size)
    except UnsupportedLayerError as error:
        return proportional_centers(map_size, image_size, reason=str(error))
    if field.map_size != tuple(map_size):
        return proportional_centers(map_size, image_size, reason=(
            f"walking the modules predicts a {field.map_size} map but the layer gives {tuple(map_size)}; "
            "the network is not a plain sequential stack"))
    rows, cols = field.centers()
    return CellCenters(rows, cols, "receptive_field", None)
