"""The explainer network of [EXPL] (docs/method.md §4): an auto-encoder of a performer's feature map whose encoder
has an interpretable track (two interpretable conv layers, the "part filters") and an ordinary track,
mixed by a weight p that measures how much of the feature the part filters explain.

Design choices (the paper does not give them; see docs/explainer.md for the reasoning):

* **norm**: x* is divided by a fixed scale, the cumulative mean over training batches of the per-image
  RMS of x* (a buffer, updated in training mode only, frozen in eval mode). The target feature gets its
  own scale. Losses are computed on normalised features; the reconstruction is returned in the
  performer's scale.
* **width**: M = ``parts`` filters in each track (default: the explained layer's channel count, capped
  at 256), so the ordinary track alone could carry the whole feature.
* **distinct part filters** (docs/explainer.md, "Distinct part filters"; every variant measured is in
  docs/diversity-experiments.md): trained from a random start, all part filters converge on the one most
  peaked feature (64 filters, one part). The defaults counter this three ways: the part track starts as the
  identity on the performer's channels (``part_init="identity"``: filter f reads channel f mod C), so the
  filters start as distinct as the performer's own; the trainer gives the part filters a small learning rate
  (``TrainConfig.part_lr_scale``), so they sharpen around their own channel instead of drifting to the common
  feature; a penalty w·mean_{f≠g} cos²(x_f, x_g) on the pre-mask maps of both layers (``diversity_weight``)
  keeps pairs of filters from merging. Two terms on the filters' soft peaks (:mod:`.constellation`) make them
  location-stable without merging: the *constellation* term (``constellation_weight``) penalises how much a
  filter's peak moves, across the batch, relative to the mean peak of all filters (the object), and the
  *crowding* term (``crowding_weight``) penalises pairs of filters peaking at the same place.
  ``part_groups`` > 1 splits the part track's convs into channel groups (a hard version of the similarity
  penalty: diverse, but barely sharper than the performer's channels).
* **filter loss**: per filter on the post-ReLU, pre-mask map, with the "peak" scaling of
  :mod:`fastexplain.nn.interpretable` (scale-free, matched-template logit ``contrast`` = 1 nat), averaged
  over the 2M filters of both layers and divided by the template entropy H(T) = log(hw + 1): the term
  lies in [−1, 0], so λ is a plain relative weight (λ = 1 ≈ "as important as a perfect reconstruction").
  A raw ``λ_raw · Σ_f loss_f`` (docs/method.md §2) corresponds to λ_raw ≈ λ / (2M · H(T)) at the normalised scale.
* **p**: a learned scalar sigmoid(θ) (default, θ initialised at logit(``p_init``) = 0) or a per-image gate
  sigmoid(w·GAP(x*/scale) + b) with w = 0, b = logit(p_init) at init. The −η·log p term pushes p up;
  the trainer gives the gate a larger learning rate (``TrainConfig.gate_lr_scale``) because under Adam a
  scalar moves at most ~lr per step.
* **decoder**: conv3×3 M→M → ReLU → (resize to the target's h×w: adaptive average pooling when smaller,
  bilinear when larger) → conv3×3 M→C_target; no final ReLU (targets need not be post-ReLU).
* **objective**: L = ‖x̂ − x*‖²/‖x*‖² (batch sums, normalised features) + γ·KL(performer ‖ head(x̂))
  (batch mean, only when a head and the performer's logits are given) + λ·filter term − η·mean log p.
* **several processes** (``set_process_group``, used by ``fit`` under torchrun): every batch statistic is
  taken over the global batch of all ranks — the RMS scale update, the filter loss and its "peak" scale,
  the reconstruction ratio of sums, the KL batch mean and the mean log p — so R ranks holding slices of a
  global batch compute the single-process loss on it, and (with DDP's averaging) its gradient.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel import differentiable_sum, sum_over_ranks
from ..templates import DEFAULT_BETA, template_entropy
from .constellation import constellation_spread, peak_crowding
from .interpretable import InterpretableConv2d, InterpretableOutput

GATES = ("scalar", "image")
PART_INITS = ("identity", "random")


@dataclass
class ExplainerConfig:
    """Architecture and loss weights of an :class:`Explainer` (defaults documented in docs/explainer.md)."""

    in_channels: int                         #: C of the explained layer
    target_channels: int | None = None       #: C of the target layer (None: in_channels)
    target_size: tuple[int, int] | None = None  #: (h, w) of the target layer (None: the input's)
    parts: int | None = None                 #: M filters per track (None: min(in_channels, 256))
    beta: float = DEFAULT_BETA               #: template slope β (docs/method.md §1)
    center: str = "argmax"                   #: mask centre: "argmax" (paper) or "centroid"
    loss_scale: str = "peak"                 #: filter-loss scaling: "peak" (scale-free) or "none" (raw)
    contrast: float = 1.0                    #: matched-template logit (nats) under "peak" scaling
    gate: str = "scalar"                     #: p: "scalar" sigmoid(θ) or "image" sigmoid(w·GAP(x*) + b)
    p_init: float = 0.5                      #: p at initialisation
    filter_weight: float = 10.0              #: λ, weight of the normalised filter-loss term
    kl_weight: float = 10.0                  #: γ, weight of KL(performer ‖ head(x̂)) when a head exists
    p_weight: float = 1.0                    #: η, weight of −log p
    diversity_weight: float = 2.0            #: w, weight of the filters' pairwise map-similarity penalty
    constellation_weight: float = 1500.0     #: ρ, weight of the constellation spread (nn/constellation.py)
    constellation_selectivity: float = 4.0   #: k: images weigh a^k by the filter's peak activation a
    crowding_weight: float = 20.0            #: κ, weight of the soft co-location of peaks (nn/constellation.py)
    part_groups: int = 1                     #: channel groups of the part track's convs (1: dense)
    part_init: str = "identity"              #: "identity" (part filter f starts on channel f) or "random"
    autoencoder_init: str = "identity"       #: ordinary track and decoder: "identity" (pass x* through) or "random"
    decoder_width: int | None = None         #: hidden channels of the decoder (None: parts)
    backend: str | None = None               #: kernel backend for the ops (None: automatic)

    def __post_init__(self) -> None:
        if self.target_channels is None:
            self.target_channels = self.in_channels
        if self.parts is None:
            self.parts = min(self.in_channels, 256)
        if self.target_size is not None:
            self.target_size = (int(self.target_size[0]), int(self.target_size[1]))
        for name in ("in_channels", "target_channels", "parts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExplainerConfig: {name} must be ≥ 1, got {getattr(self, name)!r}")
        for name in ("part_init", "autoencoder_init"):
            if getattr(self, name) not in PART_INITS:
                raise ValueError(f"ExplainerConfig: {name} must be one of {PART_INITS}, got {getattr(self, name)!r}")
        if int(self.part_groups) < 1 or (self.decoder_width is not None and int(self.decoder_width) < 1):
            raise ValueError(f"ExplainerConfig: part_groups and decoder_width must be ≥ 1, got "
                             f"{self.part_groups!r} and {self.decoder_width!r}")
        if self.gate not in GATES:
            raise ValueError(f"ExplainerConfig: gate must be one of {GATES}, got {self.gate!r}")
        if not 0.0 < self.p_init < 1.0:
            raise ValueError(f"ExplainerConfig: p_init must lie in (0, 1), got {self.p_init!r}")
        for name in ("filter_weight", "kl_weight", "p_weight", "diversity_weight", "constellation_weight",
                     "constellation_selectivity", "crowding_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ExplainerConfig: {name} must be ≥ 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ExplainerConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ExplainerConfig: unknown fields {sorted(unknown)}")
        return cls(**values)


@dataclass
class ExplainerLosses:
    """The loss terms of one batch (docs/method.md §4); ``total`` is what the trainer minimises."""

    total: Tensor
    reconstruction: Tensor   #: ‖x̂ − x*‖² / ‖x*‖² on normalised features
    kl: Tensor               #: KL(performer ‖ head(x̂)), 0 without a head
    filter: Tensor           #: mean_f loss_f / H(T) over both interpretable layers, in [−1, 0]
    neg_log_p: Tensor        #: −mean log p
    diversity: Tensor        #: mean squared cosine similarity of the part filters' maps over pairs, both layers
    constellation: Tensor    #: constellation spread of the part filters' peaks (nn/constellation.py), both layers
    crowding: Tensor         #: soft co-location of the part filters' peaks over pairs (nn/constellation.py), both layers

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


@dataclass
class ExplainerOutput:
    """What the explainer returns for a batch.

    Attributes:
        reconstruction: x̂ in the performer's scale, [B, C_target, h_t, w_t].
        part_maps: the part filters' final maps (second interpretable layer, after its mask), [B, M, h, w];
            these are what the metrics and the report call "explainer filters".
        part_relu_maps: the same filters before the mask, [B, M, h, w].
        p: the mixing weight x_enc = p·x_int + (1 − p)·x_ord: a scalar, or [B] with the per-image gate.
        filter_losses: −MI per filter (docs/method.md §2) of the two interpretable layers, [M] each (zeros
            when no loss was computed).
        losses: the loss terms (:class:`ExplainerLosses`), None when no loss was asked for.
    """

    reconstruction: Tensor         #: x̂ in the performer's scale, [B, C_target, h_t, w_t]
    part_maps: Tensor              #: the interpretable track's final (masked) maps, [B, M, h, w]
    part_relu_maps: Tensor         #: the same filters before the mask, [B, M, h, w]
    p: Tensor                      #: the mixing weight: a scalar, or [B] with the per-image gate
    filter_losses: tuple[Tensor, Tensor]  #: −MI per filter of the two interpretable layers, [M] each
    losses: ExplainerLosses | None = field(default=None)  #: None when no loss was asked for


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@torch.no_grad()
def _start_as_identity(*convs: nn.Conv2d) -> None:
    """Output channel f of each 3×3 conv starts as input channel f (mod the channels its group reads):
    centre tap 1, all else 0."""
    for conv in convs:
        conv.weight.zero_()
        conv.bias.zero_()
        filters = torch.arange(conv.weight.shape[0])
        conv.weight[filters, filters % conv.weight.shape[1], 1, 1] = 1.0


class Explainer(nn.Module):
    """The explainer network of docs/method.md §4; build it from an :class:`ExplainerConfig`."""

    def __init__(self, config: ExplainerConfig) -> None:
        super().__init__()
        self.config = config
        C, M, Ct = config.in_channels, int(config.parts), int(config.target_channels)
        layer_options = dict(beta=config.beta, center=config.center, loss_scale=config.loss_scale,
                             contrast=config.contrast, backend=config.backend)
        groups = config.part_groups
        if C % groups or M % groups:
            raise ValueError(f"ExplainerConfig: part_groups={groups} must divide the channels ({C}) and parts ({M})")
        self.interpretable1 = InterpretableConv2d(C, M, 3, groups=groups, **layer_options)
        self.interpretable2 = InterpretableConv2d(M, M, 3, groups=groups, **layer_options)
        if config.part_init == "identity":
            _start_as_identity(self.interpretable1.conv, self.interpretable2.conv)
        self.ordinary = nn.Conv2d(C, M, 3, padding=1)
        hidden = int(config.decoder_width or M)
        self.decoder1 = nn.Conv2d(M, hidden, 3, padding=1)
        self.decoder2 = nn.Conv2d(hidden, Ct, 3, padding=1)
        if config.autoencoder_init == "identity":
            _start_as_identity(self.ordinary, self.decoder1, self.decoder2)
        if config.gate == "scalar":
            self.gate_logit = nn.Parameter(torch.tensor(_logit(config.p_init)))
        else:
            self.gate = nn.Linear(C, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, _logit(config.p_init))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("target_scale", torch.ones(()))
        self.register_buffer("scale_count", torch.zeros((), dtype=torch.long))
        self.process_group: Any = None

    def set_process_group(self, process_group: Any, ddp_gradients: bool = True) -> "Explainer":
        """Compute every batch statistic over the global batch of ``process_group``'s ranks (None: this
        process only). ``ddp_gradients=True`` gives each rank R × its share of the gradient, which
        DistributedDataParallel's averaging turns into the exact gradient of the global loss."""
        self.process_group = process_group
        for layer in (self.interpretable1, self.interpretable2):
            layer.process_group, layer.ddp_gradients = process_group, ddp_gradients
        return self

    def gate_parameters(self) -> list[nn.Parameter]:
        """The parameters of p (the trainer may give them a larger learning rate)."""
        return [self.gate_logit] if self.config.gate == "scalar" else list(self.gate.parameters())

    @torch.no_grad()
    def _update_scales(self, x_star: Tensor, target: Tensor) -> None:
        """Cumulative mean over training batches of the per-image RMS (the fixed norm scale of docs/method.md §4)."""
        rms = [feature.detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt() for feature in (x_star, target)]
        if self.process_group is None:
            B, batch_means = x_star.shape[0], [values.mean() for values in rms]
        else:  # the mean per-image RMS over the global batch: one all-reduce of 3 numbers
            sums = sum_over_ranks(torch.stack([rms[0].sum(), rms[1].sum(), rms[0].new_tensor(x_star.shape[0])]),
                                  self.process_group)
            B, batch_means = int(sums[2]), [sums[0] / sums[2], sums[1] / sums[2]]
        count = int(self.scale_count)
        for buffer, batch_rms in zip((self.input_scale, self.target_scale), batch_means):
            mean = batch_rms if count == 0 else buffer + (batch_rms - buffer) * (B / (count + B))
            buffer.copy_(mean.clamp_min(1e-12))
        self.scale_count += B

    def mixing_weight(self, x_normalised: Tensor) -> Tensor:
        """p = sigmoid(θ) (scalar) or sigmoid(w·GAP(x*) + b) per image ([B])."""
        if self.config.gate == "scalar":
            return torch.sigmoid(self.gate_logit)
        pooled = x_normalised.float().mean(dim=(2, 3))
        return torch.sigmoid(self.gate(pooled.to(self.gate.weight.dtype)).squeeze(1))

    def _decode(self, x_enc: Tensor) -> Tensor:
        hidden = torch.relu(self.decoder1(x_enc))
        size = self.config.target_size
        if size is not None and tuple(hidden.shape[-2:]) != tuple(size):
            if size[0] <= hidden.shape[-2] and size[1] <= hidden.shape[-1]:
                hidden = F.adaptive_avg_pool2d(hidden, size)
            else:
                hidden = F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)
        return self.decoder2(hidden)

    def forward(self, x_star: Tensor, target: Tensor | None = None, *,
                performer_logits: Tensor | None = None, head: Callable[[Tensor], Tensor] | None = None,
                compute_loss: bool | None = None) -> ExplainerOutput:
        """Explain x* [B, C, h, w]; with ``compute_loss`` also return the loss terms.

        ``compute_loss=None`` (default) computes them in training mode or when ``target`` is given, and
        skips them (and the filter losses) for plain inference in eval mode.

        ``target``: the performer's feature at the target layer (default: x* itself). ``head`` maps a
        target-layer feature (performer scale) to the performer's output and ``performer_logits`` is that
        output for the true feature; with both, and γ > 0, the KL term is computed.
        """
        if compute_loss is None:
            compute_loss = self.training or target is not None
        target = x_star if target is None else target
        if x_star.dim() != 4 or x_star.shape[1] != self.config.in_channels:
            raise ValueError(f"Explainer: expected x* of shape [B, {self.config.in_channels}, h, w], got "
                             f"{tuple(x_star.shape)}; check the performer layer matches the config")
        if self.training:
            self._update_scales(x_star, target)
        x_norm = x_star / self.input_scale.to(x_star.dtype)
        first = self.interpretable1.detailed(x_norm, compute_loss=compute_loss)
        second = self.interpretable2.detailed(first.output, compute_loss=compute_loss)
        x_ord = torch.relu(self.ordinary(x_norm))
        p = self.mixing_weight(x_norm)
        p_map = p if p.dim() == 0 else p.view(-1, 1, 1, 1)
        x_enc = p_map.to(x_ord.dtype) * second.output + (1 - p_map.to(x_ord.dtype)) * x_ord
        reconstruction_normalised = self._decode(x_enc)
        reconstruction = reconstruction_normalised * self.target_scale.to(reconstruction_normalised.dtype)
        losses = None
        if compute_loss:
            losses = self._losses(reconstruction_normalised, reconstruction, target, p,
                                  (first.filter_loss, second.filter_loss), performer_logits, head,
                                  part_relu_maps=(first.relu_map, second.relu_map),
                                  hw=x_star.shape[-2] * x_star.shape[-1])
        return ExplainerOutput(reconstruction=reconstruction, part_maps=second.output,
                               part_relu_maps=second.relu_map, p=p,
                               filter_losses=(first.filter_loss, second.filter_loss), losses=losses)

    def _losses(self, reconstruction_normalised: Tensor, reconstruction: Tensor, target: Tensor, p: Tensor,
                filter_losses: tuple[Tensor, Tensor], performer_logits: Tensor | None,
                head: Callable[[Tensor], Tensor] | None, hw: int,
                part_relu_maps: tuple[Tensor, ...] = ()) -> ExplainerLosses:
        config = self.config
        if target.shape[1:] != reconstruction.shape[1:]:
            raise ValueError(f"Explainer: target of shape {tuple(target.shape)} does not match the decoder "
                             f"output {tuple(reconstruction.shape)}; set target_channels/target_size in the config")
        target_normalised = target.float() / self.target_scale
        error = (reconstruction_normalised.float() - target_normalised).pow(2).sum()
        energy = target_normalised.pow(2).sum()
        kl_sum = error.new_zeros(())
        has_kl = head is not None and performer_logits is not None and config.kl_weight > 0
        if has_kl:
            logits_hat = head(reconstruction)
            kl_sum = F.kl_div(torch.log_softmax(logits_hat.float(), dim=1),
                              torch.log_softmax(performer_logits.float(), dim=1), log_target=True, reduction="sum")
        log_p = torch.log(p.float())
        per_image_p = log_p.dim() > 0  # the image gate: −log p is a batch mean too
        # the batch sums, over the global batch of all ranks with a process group (one differentiable
        # all-reduce; its backward gives each rank R × its gradient share, as DDP's averaging expects)
        neg_log_p_sum = -log_p.sum() if per_image_p else log_p.new_zeros(())
        images = error.new_tensor(float(target.shape[0]))
        sums = differentiable_sum(torch.stack([error, energy, kl_sum, neg_log_p_sum, images]), self.process_group)
        error, energy, kl_sum, neg_log_p_sum, images = sums.unbind()
        reconstruction_loss = error / energy.clamp_min(1e-12)
        kl = kl_sum / images if has_kl else kl_sum.new_zeros(())
        neg_log_p = neg_log_p_sum / images if per_image_p else -log_p
        filter_term = torch.cat([f.float() for f in filter_losses]).mean() / template_entropy(hw, 1)
        diversity = error.new_zeros(())
        if config.diversity_weight > 0:
            diversity = torch.stack([self._similarity(maps) for maps in part_relu_maps]).mean()
        constellation = error.new_zeros(())
        if config.constellation_weight > 0:
            constellation = torch.stack([
                constellation_spread(maps, selectivity=config.constellation_selectivity,
                                     process_group=self.process_group) for maps in part_relu_maps]).mean()
        crowding = error.new_zeros(())
        if config.crowding_weight > 0:
            crowding = torch.stack([peak_crowding(maps, process_group=self.process_group)
                                    for maps in part_relu_maps]).mean()
        total = (reconstruction_loss + config.kl_weight * kl + config.filter_weight * filter_term
                 + config.p_weight * neg_log_p + config.diversity_weight * diversity
                 + config.constellation_weight * constellation + config.crowding_weight * crowding)
        return ExplainerLosses(total=total, reconstruction=reconstruction_loss, kl=kl, filter=filter_term,
                               neg_log_p=neg_log_p, diversity=diversity, constellation=constellation,
                               crowding=crowding)

    def _similarity(self, maps: Tensor) -> Tensor:
        """Mean over filter pairs f ≠ g of cos²(x_f, x_g), the maps taken as vectors over batch and cells."""
        flat = maps.float().transpose(0, 1).reshape(maps.shape[1], -1)
        gram = differentiable_sum(flat @ flat.T, self.process_group)
        norms = gram.diagonal().clamp_min(1e-12).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :])
        M = maps.shape[1]
        return (cosine.pow(2).sum() - cosine.diagonal().pow(2).sum()) / max(M * (M - 1), 1)
