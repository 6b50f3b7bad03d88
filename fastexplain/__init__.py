"""fastexplain: explainer networks that make CNNs explain themselves, fast (arXiv 1805.07468, 1710.00935)."""
from __future__ import annotations

from ._import_guard import warn_if_a_group_would_be_pinned

warn_if_a_group_would_be_pinned()  # before anything below imports torch._dynamo

from .ops import BackendUnavailable, filter_loss, relu_template_mask, template_mask
from .checkpoint import CheckpointError, load_explainer
from .nn import (Explainer, ExplainerConfig, ExplainerOutput, FilterLosses, InterpretableConv2d, InterpretableOutput,
                 collect_filter_losses)
from .performer import Performer
from .attribution import Attribution, attribute
from .train import TrainConfig, fit
from .templates import part_templates, template_alpha, template_entropy, template_priors, template_tau
from .metrics import location_instability, part_interpretability
from .data.partworld import PartWorld

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Attribution",
    "attribute",
    "BackendUnavailable",
    "CheckpointError",
    "Explainer",
    "ExplainerConfig",
    "ExplainerOutput",
    "FilterLosses",
    "InterpretableConv2d",
    "InterpretableOutput",
    "collect_filter_losses",
    "Performer",
    "TrainConfig",
    "fit",
    "load_explainer",
    "filter_loss",
    "location_instability",
    "part_interpretability",
    "PartWorld",
    "part_templates",
    "relu_template_mask",
    "template_alpha",
    "template_entropy",
    "template_mask",
    "template_priors",
    "template_tau",
]
