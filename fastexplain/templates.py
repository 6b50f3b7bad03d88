"""Part templates and their priors (docs/method.md §1, [ICNN] §3.1).

A filter's feature map lives on an H×W grid of positions i = (r, c), row-major index k = r·W + c,
and n = max(H, W). There are H·W + 1 templates:

* one positive template per position μ:  T_μ(i) = τ · max(1 − β·‖i − μ‖₁ / n, −1),
* one negative template:                 T⁻(i) = −τ,

with τ = 0.5 / (H·W), β = 4 and α = HW / (1 + HW), so that p(T_μ) = α / HW and p(T⁻) = 1 − α give
every template the prior 1 / (HW + 1).

The template matrix has the negative template in row 0 and the positive template of position k in
row 1 + k; this ordering is shared by every backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_BETA = 4.0


def template_tau(H: int, W: int) -> float:
    """τ = 0.5 / (H·W): the templates' magnitude (docs/method.md §1)."""
    return 0.5 / (H * W)


def template_alpha(H: int, W: int) -> float:
    """α = HW / (1 + HW): the total prior of the positive templates (docs/method.md §1)."""
    return (H * W) / (1.0 + H * W)


def l1_distances(H: int, W: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """‖i − μ‖₁ for every pair of row-major positions (μ, i): a symmetric [HW, HW] matrix."""
    positions = torch.arange(H * W, device=device)
    rows, cols = positions // W, positions % W  # no repeat_interleave: no host sync (CUDA-graph capturable)
    dist = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()
    return dist.to(dtype or torch.get_default_dtype())


def mask_profile(dist: Tensor, n: int, beta: float) -> Tensor:
    """max(1 − β·d / n, −1): the shape shared by the positive templates and the mask (docs/method.md §1, §3)."""
    return torch.clamp(1.0 - beta * dist / n, min=-1.0)


def part_templates(H: int, W: int, *, beta: float = DEFAULT_BETA, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """All H·W + 1 templates as a [(H·W + 1), H, W] tensor: row 0 is T⁻, row 1 + k is T_μ for μ = k."""
    if H < 1 or W < 1:
        raise ValueError(f"part_templates: the map must be at least 1×1, got {H}×{W}")
    dtype = dtype or torch.get_default_dtype()
    tau = template_tau(H, W)
    positive = tau * mask_profile(l1_distances(H, W, dtype=dtype, device=device), max(H, W), beta)
    negative = torch.full((1, H * W), -tau, dtype=dtype, device=device)
    return torch.cat([negative, positive], dim=0).reshape(H * W + 1, H, W)


def template_priors(H: int, W: int, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Priors [p(T⁻), p(T_μ₀), …]: 1 − α for the negative template, α / HW for each positive one."""
    alpha = template_alpha(H, W)
    dtype = dtype or torch.get_default_dtype()
    # built by concatenation, not ``priors[0] = …`` (a host-to-device copy that CUDA-graph capture rejects)
    return torch.cat([torch.full((1,), 1.0 - alpha, dtype=dtype, device=device),
                      torch.full((H * W,), alpha / (H * W), dtype=dtype, device=device)])


def template_entropy(H: int, W: int) -> float:
    """H(T) = log(HW + 1) nats: the largest mutual information any filter can reach (docs/method.md §1)."""
    return math.log(H * W + 1)
