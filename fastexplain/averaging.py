"""Polyak averaging of the explainer's weights during training (``TrainConfig.average_decay``).

An exponential moving average θ̄ ← d_t·θ̄ + (1 − d_t)·θ of the parameters after the t-th optimiser step, with
d_t = min(d, 1 − 1/t): the plain mean of the weights so far until there are 1/(1 − d) of them, then the moving
average with horizon 1/(1 − d) steps (so the start does not linger). ``restart`` begins a new average from the
current weights: ``fit`` restarts it when the refinement epochs begin, so that the average never mixes the part
filters of the joint phase with those the refinement freezes (measured: a horizon reaching back into the joint
phase raised location instability, docs/diversity-experiments.md). Buffers (the
explainer's running feature scales) are copied, not averaged. The averaged weights are what ``fit`` stores
as the checkpoint's explainer; the live weights are kept beside them so that a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class WeightAverage:
    """The exponential moving average of ``module``'s parameters (its buffers copied)."""

    def __init__(self, module: nn.Module, decay: float, state: dict[str, Any] | None = None) -> None:
        """``state``: {"steps": t, "averaged": a state dict} to continue a saved average (``fit``'s resume)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.parameter_names = {name for name, _ in module.named_parameters()}
        if state is None:
            self.steps = 0
            self.averaged = {name: value.detach().clone() for name, value in module.state_dict().items()}
        else:
            self.steps = int(state["steps"])
            self.averaged = {name: value.detach().clone() for name, value in state["averaged"].items()}

    @torch.no_grad()
    def restart(self, module: nn.Module) -> None:
        """Start a new average from ``module``'s current weights."""
        self.steps = 0
        for name, value in module.state_dict().items():
            self.averaged[name].copy_(value)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the average (call after each optimiser step)."""
        self.steps += 1
        decay = min(self.decay, 1.0 - 1.0 / self.steps)
        for name, value in module.state_dict().items():
            target: Tensor = self.averaged[name]
            if name in self.parameter_names and value.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)
