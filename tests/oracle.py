"""A slow, independent oracle for the filter loss: explicit loops over images and templates in Python floats.

It shares no code with fastexplain: templates, priors and the mutual information are written out again
straight from docs/method.md §1–2 (the textbook, un-centred form, in double precision).
"""
from __future__ import annotations

import math


def oracle_templates(H: int, W: int, beta: float = 4.0) -> list[list[float]]:
    n, tau = max(H, W), 0.5 / (H * W)
    templates = [[-tau] * (H * W)]
    for mu_r in range(H):
        for mu_c in range(W):
            row = []
            for r in range(H):
                for c in range(W):
                    d = abs(r - mu_r) + abs(c - mu_c)
                    row.append(tau * max(1.0 - beta * d / n, -1.0))
            templates.append(row)
    return templates


def oracle_filter_loss(maps: list[list[float]], H: int, W: int, beta: float = 4.0) -> float:
    """−MI for one filter; ``maps`` holds B flattened H×W maps."""
    templates = oracle_templates(H, W, beta)
    alpha = H * W / (1.0 + H * W)
    priors = [1.0 - alpha] + [alpha / (H * W)] * (H * W)
    B = len(maps)
    q = [[0.0] * len(templates) for _ in range(B)]
    for t, template in enumerate(templates):
        logits = [sum(xi * ti for xi, ti in zip(maps[b], template)) for b in range(B)]
        top = max(logits)
        z = sum(math.exp(s - top) for s in logits)
        for b in range(B):
            q[b][t] = math.exp(logits[b] - top) / z
    mi = 0.0
    for b in range(B):
        p_x = sum(priors[t] * q[b][t] for t in range(len(templates)))
        for t in range(len(templates)):
            if q[b][t] > 0:
                mi += priors[t] * q[b][t] * (math.log(q[b][t]) - math.log(p_x))
    return -mi
