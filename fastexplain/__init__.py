"""fastexplain: explainer networks that make CNNs explain themselves, fast (arXiv 1805.07468, 1710.00935)."""
from __future__ import annotations

from .ops import BackendUnavailable, filter_loss, relu_template_mask, template_mask
from .templates import part_templates, template_alpha, template_entropy, template_priors, template_tau

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BackendUnavailable",
    "filter_loss",
    "part_templates",
    "relu_template_mask",
    "template_alpha",
    "template_entropy",
    "template_mask",
    "template_priors",
    "template_tau",
]
