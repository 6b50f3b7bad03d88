"""The interpretable convolution layer of [ICNN]: conv → ReLU → filter loss → template mask (SPEC §2–3).

The layer is a drop-in module: it returns an :class:`InterpretableOutput` holding the masked map that the
next layer consumes, the post-ReLU map before the mask, and the per-filter filter loss. Nothing is stored
on the module between calls (no hidden global state): the caller adds ``λ · filter_loss`` to its objective.

Filter-loss scaling (SPEC §2, "Scale"). The raw −MI of a unit-scale map is ~1e-4 nats because τ = 0.5/HW
makes the template logits tiny, and it grows with the activation scale, so a raw loss both needs a huge λ
and rewards inflating activations. With ``loss_scale="peak"`` (the default) each filter's map is divided,
for the loss only, by a *detached* per-filter scale — the batch mean of its peak activation — and
multiplied by ``contrast / τ``: the matched template's logit τ·peak is then ``contrast`` nats for a typical
image. The loss value no longer depends on a filter's magnitude, only on the *shape* of its maps, and its
gradient still flows into the conv weights (the scale is a constant for autograd, like the mask).
``loss_scale="none"`` is the paper's raw loss on the map as it is.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..ops import filter_loss, relu_template_mask
from ..parallel import sum_over_ranks
from ..templates import DEFAULT_BETA, template_tau

LOSS_SCALES = ("peak", "none")


class InterpretableOutput(NamedTuple):
    """What one interpretable layer produces for a batch."""

    output: Tensor       #: the masked map max(relu(conv(x)) ⊙ m, 0), [B, C, H, W]: feed it to the next layer
    relu_map: Tensor     #: relu(conv(x)) before the mask, [B, C, H, W]: the map the filter loss reads
    filter_loss: Tensor  #: −MI per filter, [C] float32 (zeros when the loss is disabled); 0 at B = 1


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


class InterpretableConv2d(nn.Module):
    """conv (k×k) → ReLU → filter loss → template mask: one interpretable conv layer (SPEC §3, [ICNN]).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as for :class:`torch.nn.Conv2d`
            (default 3×3, stride 1, "same" padding).
        beta: template slope β (SPEC §1, default 4).
        center: "argmax" (paper) or "centroid" (official code) for the mask's centre μ̂.
        mask_scale: None (no τ factor, default) or "tau" (the paper's literal x ⊙ T_μ̂).
        loss_scale: "peak" (default: scale-free loss, see the module docstring) or "none" (raw −MI).
        contrast: the matched-template logit, in nats, of a typical image under ``loss_scale="peak"``.
        compute_loss: False skips the filter loss (e.g. at inference); ``filter_loss`` is then zeros.
        backend: kernel backend for the ops (None: automatic).
        process_group: a torch.distributed group (None: single process). With one, the filter loss and the
            "peak" scale are computed over the global batch of all ranks (``fastexplain.filter_loss(...,
            process_group=...)``): every rank must call forward and backward in step (docs/distributed.md).
        ddp_gradients: with a group, scale the filter loss's gradient by the group size so that
            DistributedDataParallel's gradient averaging is exact (set by ``fit``).

    ``forward(x)`` returns an :class:`InterpretableOutput`; use ``.output`` as the layer's output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | str | None = None, bias: bool = True, beta: float = DEFAULT_BETA,
                 center: str = "argmax", mask_scale: str | None = None, loss_scale: str = "peak",
                 contrast: float = 1.0, compute_loss: bool = True, backend: str | None = None,
                 process_group: Any = None, ddp_gradients: bool = False) -> None:
        super().__init__()
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"InterpretableConv2d: loss_scale must be one of {LOSS_SCALES}, got {loss_scale!r}")
        if not contrast > 0:
            raise ValueError(f"InterpretableConv2d: contrast must be positive, got {contrast!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2 if padding is None else padding, bias=bias)
        self.beta = float(beta)
        self.center = center
        self.mask_scale = mask_scale
        self.loss_scale = loss_scale
        self.contrast = float(contrast)
        self.compute_loss = compute_loss
        self.backend = backend
        self.process_group = process_group
        self.ddp_gradients = ddp_gradients

    def forward(self, x: Tensor, *, compute_loss: bool | None = None) -> InterpretableOutput:
        """conv → ReLU → filter loss → mask; ``compute_loss`` overrides the module's setting for this call."""
        return self.detailed(x, compute_loss=compute_loss)

    def detailed(self, x: Tensor, *, compute_loss: bool | None = None) -> InterpretableOutput:
        """The masked output with the pre-mask map and the per-filter filter loss (what the explainer reads)."""
        conv_out = self.conv(x)
        relu_map = torch.relu(conv_out)
        if self.compute_loss if compute_loss is None else compute_loss:
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
