"""Neural-network modules: the interpretable conv layer ([ICNN] arXiv 1710.00935) and the explainer
([EXPL] arXiv 1805.07468); see docs/explainer.md and docs/finetuning.md."""
from __future__ import annotations

from .explainer import Explainer, ExplainerConfig, ExplainerLosses, ExplainerOutput
from .interpretable import FilterLosses, InterpretableConv2d, InterpretableOutput, collect_filter_losses

__all__ = ["Explainer", "ExplainerConfig", "ExplainerLosses", "ExplainerOutput", "FilterLosses",
           "InterpretableConv2d", "InterpretableOutput", "collect_filter_losses"]
