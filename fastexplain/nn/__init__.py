"""Neural-network modules: the interpretable conv layer and the explainer (SPEC §3–4)."""
from __future__ import annotations

from .explainer import Explainer, ExplainerConfig, ExplainerLosses, ExplainerOutput
from .interpretable import InterpretableConv2d, InterpretableOutput

__all__ = ["Explainer", "ExplainerConfig", "ExplainerLosses", "ExplainerOutput", "InterpretableConv2d",
           "InterpretableOutput"]
