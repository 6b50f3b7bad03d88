"""The interpretable convolution layer of [ICNN] (arXiv 1710.00935, §3): conv → ReLU → filter loss → mask.

:class:`InterpretableConv2d` is a drop-in replacement for :class:`torch.nn.Conv2d`: ``layer(x)`` returns
the masked map max(relu(conv(x)) ⊙ m, 0) as a plain Tensor, so it fits in ``nn.Sequential`` or in place of
a conv of a torchvision model (``InterpretableConv2d.from_conv(conv)`` keeps the conv's weights). The
filter loss (−MI between each filter's map and the part templates, [ICNN] Eq. 2) is gathered with
:func:`collect_filter_losses`::

    with fx.collect_filter_losses(model) as losses:
        loss = F.cross_entropy(model(x), y) + lam * losses.sum()

``layer.detailed(x)`` returns all of an :class:`InterpretableOutput` (masked map, pre-mask map, per-filter
loss) for callers that want them directly (the explainer does). Nothing is stored on the module between
calls: the loss is computed only inside a collection (or when ``detailed`` is asked), so a model in
``eval()`` pays for the mask alone.

Filter-loss scaling. The raw −MI of a unit-scale map is ~1e-4 nats because τ = 0.5/HW makes the template
logits tiny, and it grows with the activation scale, so a raw loss both needs a huge λ and rewards
inflating activations. With ``loss_scale="peak"`` (the default) each filter's map is divided, for the loss
only, by a *detached* per-filter scale — the batch mean of its peak activation — and multiplied by
``contrast / τ``: the matched template's logit τ·peak is then ``contrast`` nats for a typical image. The
loss value depends only on the *shape* of a filter's maps, and its gradient still flows into the conv
weights (the scale is a constant for autograd, like the mask). ``loss_scale="none"`` is the paper's raw
loss. See docs/explainer.md and docs/finetuning.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from ..ops import filter_loss, relu_template_mask
from ..parallel import sum_over_ranks
from ..templates import DEFAULT_BETA, template_tau

LOSS_SCALES = ("peak", "none")
_Pair = int | tuple[int, int]


class InterpretableOutput(NamedTuple):
    """What :meth:`InterpretableConv2d.detailed` returns for a batch."""

    output: Tensor       #: the masked map max(relu(conv(x)) ⊙ m, 0), [B, C, H, W]: what ``layer(x)`` returns
    relu_map: Tensor     #: relu(conv(x)) before the mask, [B, C, H, W]: the map the filter loss reads
    filter_loss: Tensor  #: −MI per filter, [C] float32 (zeros when the loss is not computed); 0 at B = 1


def normalise_for_filter_loss(relu_map: Tensor, contrast: float, process_group: Any = None) -> Tensor:
    """relu_map · contrast / (τ · a_f), a_f = mean_b max_i x_b,f(i) detached: the "peak" loss scaling.

    A filter that is zero on the whole batch keeps a zero map (its loss is 0 whatever the scale).
    With a ``process_group`` the mean is over the global batch of all ranks (one all-reduce of C + 1 numbers).
    """
    B, C, H, W = relu_map.shape
    with torch.no_grad():
        peaks = relu_map.detach().float().amax(dim=(2, 3))  # [B, C]
        if process_group is None:
            peak = peaks.mean(dim=0)  # [C]
        else:
            sums = sum_over_ranks(torch.cat([peaks.sum(dim=0), peaks.new_tensor([B])]), process_group)
            peak = sums[:-1] / sums[-1]
        factor = torch.where(peak > 0, contrast / (template_tau(H, W) * peak.clamp_min(1e-30)),
                             torch.zeros_like(peak))
    return relu_map * factor.to(relu_map.dtype)[None, :, None, None]


def _same_padding(kernel_size: _Pair, dilation: _Pair) -> tuple[int, int]:
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)


class InterpretableConv2d(nn.Module):
    """conv → ReLU → filter loss → template mask: one interpretable conv layer ([ICNN] §3).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype: as for :class:`torch.nn.Conv2d`, except the defaults: kernel 3×3 and
            ``padding=None`` meaning "same" (dilation·(k − 1)/2 on each side).
        beta: template slope β ([ICNN] Eq. 1, default 4).
        center: "argmax" (paper) or "centroid" (official code) for the mask's centre μ̂.
        mask_scale: None (no τ factor, default) or "tau" (the paper's literal x ⊙ T_μ̂).
        loss_scale: "peak" (default: scale-free loss, see the module docstring) or "none" (raw −MI).
        contrast: the matched-template logit, in nats, of a typical image under ``loss_scale="peak"``.
        compute_loss: None (default): :meth:`detailed` computes the loss in training mode only, and
            ``forward`` whenever a :func:`collect_filter_losses` is open; False never; True always.
        backend: kernel backend for the ops (None: automatic).
        process_group: a torch.distributed group (None: single process). With one, the filter loss and the
            "peak" scale are computed over the global batch of all ranks: every rank must call forward and
            backward in step (docs/distributed.md).
        ddp_gradients: with a group, scale the filter loss's gradient by the group size so that
            DistributedDataParallel's gradient averaging is exact (set by ``fit``).

    ``forward(x)`` returns the masked map (a Tensor); :meth:`detailed` returns an :class:`InterpretableOutput`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair = 3, stride: _Pair = 1,
                 padding: _Pair | str | None = None, dilation: _Pair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: torch.dtype | None = None, *,
                 beta: float = DEFAULT_BETA, center: str = "argmax", mask_scale: str | None = None,
                 loss_scale: str = "peak", contrast: float = 1.0, compute_loss: bool | None = None,
                 backend: str | None = None, process_group: Any = None, ddp_gradients: bool = False) -> None:
        super().__init__()
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"InterpretableConv2d: loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
        if not contrast > 0:
            raise ValueError(f"InterpretableConv2d: contrast must be positive, got {contrast!r}")
        if compute_loss not in (None, True, False):
            raise ValueError(f"InterpretableConv2d: compute_loss must be None, True or False, got {compute_loss!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=_same_padding(kernel_size, dilation) if padding is None else padding,
                              dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                              device=device, dtype=dtype)
        self.beta = float(beta)
        self.center = center
        self.mask_scale = mask_scale
        self.loss_scale = loss_scale
        self.contrast = float(contrast)
        self.compute_loss = compute_loss
        self.backend = backend
        self.process_group = process_group
        self.ddp_gradients = ddp_gradients
        self._collectors: list[FilterLosses] = []  # open collect_filter_losses contexts (not state)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> "InterpretableConv2d":
        """An interpretable layer with ``conv``'s shape, options and (copied) weights; ``options`` are the
        keyword-only arguments (beta, loss_scale, …). E.g. ``net.layer4[1].conv2 = from_conv(net.layer4[1].conv2)``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"InterpretableConv2d.from_conv: expected an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, **options)
        layer.conv.load_state_dict(conv.state_dict())
        layer.train(conv.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """The masked map max(relu(conv(x)) ⊙ m, 0); inside :func:`collect_filter_losses` the per-filter
        filter loss of this call is also handed to the open collection(s)."""
        if not self._collectors or self.compute_loss is False:
            return self.detailed(x, compute_loss=False).output
        result = self.detailed(x, compute_loss=True)
        for collector in self._collectors:
            collector._add(self, result.filter_loss)
        return result.output

    def detailed(self, x: Tensor, *, compute_loss: bool | None = None) -> InterpretableOutput:
        """The masked output with the pre-mask map and the per-filter filter loss (what the explainer reads).

        ``compute_loss``: None follows the module's ``compute_loss`` (None there: in training mode only)."""
        if compute_loss is None:
            compute_loss = self.training if self.compute_loss is None else self.compute_loss
        conv_out = self.conv(x)
        relu_map = torch.relu(conv_out)
        if compute_loss:
            loss_input = (relu_map if self.loss_scale == "none"
                          else normalise_for_filter_loss(relu_map, self.contrast, self.process_group))
            per_filter = filter_loss(loss_input, beta=self.beta, reduction="none", backend=self.backend,
                                     process_group=self.process_group,
                                     ddp_gradients=self.ddp_gradients and self.process_group is not None)
        else:
            dtype = torch.float64 if conv_out.dtype == torch.float64 else torch.float32
            per_filter = torch.zeros(conv_out.shape[1], dtype=dtype, device=conv_out.device)
        output = relu_template_mask(conv_out, beta=self.beta, center=self.center, scale=self.mask_scale,
                                    backend=self.backend)
        return InterpretableOutput(output=output, relu_map=relu_map, filter_loss=per_filter)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, center={self.center!r}, mask_scale={self.mask_scale!r}, "
                f"loss_scale={self.loss_scale!r}, contrast={self.contrast}")

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy never carries open collections
        state = self.__dict__.copy()
        state["_collectors"] = []
        return state


class FilterLosses:
    """The per-filter filter losses gathered by :func:`collect_filter_losses`, one entry per layer call.

    ``sum()`` is the paper's Σ_f loss_f over every call ([ICNN] Eq. 2 summed over filters); ``mean()``
    averages over all filters of all calls; ``clear()`` empties it (e.g. at the start of each step).
    """

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names
        self.entries: list[tuple[str, Tensor]] = []  #: (layer name, per-filter loss [C]) in call order

    def _add(self, layer: InterpretableConv2d, losses: Tensor) -> None:
        self.entries.append((self._names.get(id(layer), type(layer).__name__), losses))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.entries)

    def clear(self) -> None:
        self.entries.clear()

    def _check(self) -> None:
        if not self.entries:
            raise RuntimeError("no filter loss was collected: run the model's forward pass inside the "
                               "`with collect_filter_losses(model)` block (layers with compute_loss=False "
                               "are skipped)")

    def sum(self) -> Tensor:
        """Σ over calls and filters of −MI (a scalar float32 tensor, differentiable)."""
        self._check()
        return torch.stack([losses.float().sum() for _, losses in self.entries]).sum()

    def mean(self) -> Tensor:
        """The mean −MI per filter over every collected call."""
        self._check()
        return torch.cat([losses.float().reshape(-1) for _, losses in self.entries]).mean()

    def by_layer(self) -> dict[str, Tensor]:
        """Layer name → its per-filter losses summed over its calls."""
        result: dict[str, Tensor] = {}
        for name, losses in self.entries:
            result[name] = result[name] + losses if name in result else losses
        return result


@contextmanager
def collect_filter_losses(model: nn.Module) -> Iterator[FilterLosses]:
    """Within the block, every forward call of an :class:`InterpretableConv2d` in ``model`` computes its
    filter loss and appends it to the yielded :class:`FilterLosses` (also in eval mode: being inside the
    block is the request). A model without such a layer is an error."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, InterpretableConv2d)]
    if not layers:
        raise ValueError(f"collect_filter_losses: {type(model).__name__} has no InterpretableConv2d layer; "
                         f"replace a conv with fastexplain.InterpretableConv2d.from_conv(conv) first")
    collector = FilterLosses({id(module): name or "(model)" for name, module in layers})
    for _, module in layers:
        module._collectors.append(collector)
    try:
        yield collector
    finally:
        for _, module in layers:
            module._collectors = [c for c in module._collectors if c is not collector]
