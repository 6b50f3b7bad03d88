"""Per-image part attribution: which part filters did the performer's prediction rely on? (docs/attribution.md)

The explainer ([EXPL] arXiv 1805.07468) encodes the performer's feature x* as
``x_enc = p · a + (1 − p) · x_ord`` — ``a`` the part track's masked maps [M, h, w] (the part filters),
``x_ord`` the ordinary track — and decodes x̂ from it; the performer's head maps x̂ to logits.
:func:`attribute` splits the class logit through x̂ over the M part filters by integrated gradients
(Sundararajan et al. 2017) along the part track, from the baseline ``a = 0`` (ordinary track kept):

    c_f = Σ_{i} a_f(i) · ∫₀¹ ∂ logit_t(x̂(α·a)) / ∂(α·a)_f(i) dα,   Σ_f c_f ≈ logit_t(x̂) − logit_t(x̂(0))

(midpoint rule with ``steps`` points). ``residual`` is the completeness gap
``logit − baseline_logit − Σ_f c_f``, which shrinks as ``steps`` grows. The ordinary track's
contribution is ``baseline_logit − empty_logit`` (``empty_logit``: both tracks zero, the decoder's biases
alone), and ``ordinary_share`` = |ordinary| / (|ordinary| + Σ_f |c_f|).

Nothing in the explainer is changed: the forward pass is recomputed from its submodules
(``interpretable1/2.detailed``, ``ordinary``, ``mixing_weight``, ``_decode``, the input/target scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .nn.explainer import Explainer
from .performer import Performer


@dataclass
class Attribution:
    """Part attribution of a batch of B images to M part filters (tensors on the CPU)."""

    target: Tensor                 #: [B] the class explained (the performer's prediction unless given)
    prediction: Tensor             #: [B] the performer's predicted class on the image
    prediction_through_reconstruction: Tensor  #: [B] the class predicted from x̂
    logit: Tensor                  #: [B] logit_t(x̂), the explained class's logit through the reconstruction
    baseline_logit: Tensor         #: [B] logit_t with the part track zeroed (the ordinary track alone)
    empty_logit: Tensor            #: [B] logit_t with both tracks zeroed (the decoder's biases alone)
    contributions: Tensor          #: [B, M] c_f, each part filter's contribution to logit − baseline_logit
    residual: Tensor               #: [B] logit − baseline_logit − Σ_f c_f (completeness gap of the quadrature)
    part_maps: Tensor              #: [B, M, h, w] the part track's maps a (what the filters saw)
    p: Tensor                      #: [B] the mixing weight of each image

    @property
    def ordinary_contribution(self) -> Tensor:
        """[B] baseline_logit − empty_logit: what the ordinary track adds to the logit."""
        return self.baseline_logit - self.empty_logit

    @property
    def ordinary_share(self) -> Tensor:
        """[B] |ordinary| / (|ordinary| + Σ_f |c_f|), in [0, 1] (0 when both are 0)."""
        ordinary = self.ordinary_contribution.abs()
        total = ordinary + self.contributions.abs().sum(dim=1)
        return torch.where(total > 0, ordinary / total.clamp_min(1e-30), torch.zeros_like(total))

    def top(self, index: int, k: int = 10) -> list[tuple[int, float]]:
        """(filter, contribution) of image ``index``'s ``k`` largest contributions, largest first."""
        values = self.contributions[index]
        order = torch.argsort(values, descending=True, stable=True)[:max(0, k)]
        return [(int(f), float(values[f])) for f in order]

    def record(self, index: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready summary of image ``index`` (contributions sorted, largest first)."""
        def name(c: int) -> Any:
            return class_names[c] if class_names is not None and 0 <= c < len(class_names) else c

        target = int(self.target[index])
        return {
            "class": name(target), "class_index": target,
            "performer_prediction": name(int(self.prediction[index])),
            "prediction_through_reconstruction": name(int(self.prediction_through_reconstruction[index])),
            "logit": float(self.logit[index]), "baseline_logit": float(self.baseline_logit[index]),
            "empty_logit": float(self.empty_logit[index]),
            "parts_total": float(self.contributions[index].sum()),
            "ordinary_contribution": float(self.ordinary_contribution[index]),
            "ordinary_share": float(self.ordinary_share[index]),
            "residual": float(self.residual[index]), "p": float(self.p[index]),
            "contributions": [{"filter": f, "contribution": c}
                              for f, c in self.top(index, k=self.contributions.shape[1])],
        }


def _targets(target: int | Sequence[int] | Tensor | None, prediction: Tensor, classes: int) -> Tensor:
    if target is None:
        return prediction
    values = torch.as_tensor(target, dtype=torch.long, device=prediction.device).reshape(-1)
    if values.numel() == 1:
        values = values.expand(prediction.shape[0])
    if values.numel() != prediction.shape[0]:
        raise ValueError(f"attribute: target must be one class or one per image ({prediction.shape[0]}), "
                         f"got {values.numel()}")
    if bool((values < 0).any()) or bool((values >= classes).any()):
        raise ValueError(f"attribute: target classes must lie in [0, {classes}), got {values.tolist()}")
    return values.clone()


def attribute(explainer: Explainer, performer: Performer, images: Tensor,
              target: int | Sequence[int] | Tensor | None = None, *, steps: int = 32) -> Attribution:
    """Integrated-gradients attribution of the class logit through x̂ to the part filters (module docstring).

    ``images`` [B, 3, H, W] in [0, 1] as for ``performer.features``; ``target``: None (the performer's
    prediction on each image), one class, or one class per image. The performer must have a head.
    """
    if not performer.has_head:
        raise ValueError("attribute: the performer has no head (feature-only mode), so there is no logit to "
                         "attribute; build it with head='hook' or use a Sequential/VGG/AlexNet/ResNet model")
    if images.dim() != 4:
        raise ValueError(f"attribute: images must be [B, 3, H, W], got {tuple(images.shape)}")
    if int(steps) < 1:
        raise ValueError(f"attribute: steps must be ≥ 1, got {steps!r}")
    was_training = explainer.training
    explainer.eval()
    try:
        return _attribute(explainer, performer, images, target, int(steps))
    finally:
        explainer.train(was_training)


def _attribute(explainer: Explainer, performer: Performer, images: Tensor, target: Any, steps: int) -> Attribution:
    features = performer.features(images)
    B = images.shape[0]
    rows = torch.arange(B, device=images.device)
    with torch.no_grad():
        x_norm = features.input / explainer.input_scale.to(features.input.dtype)
        first = explainer.interpretable1.detailed(x_norm, compute_loss=False)
        parts = explainer.interpretable2.detailed(first.output, compute_loss=False).output
        x_ord = torch.relu(explainer.ordinary(x_norm))
        p = explainer.mixing_weight(x_norm)
        p_map = (p if p.dim() == 0 else p.view(-1, 1, 1, 1)).to(x_ord.dtype)
    prediction = features.logits.argmax(dim=1)
    target_scale = explainer.target_scale.to(x_ord.dtype)

    def logits_of(part_input: Tensor, ordinary: Tensor) -> Tensor:
        reconstruction = explainer._decode(p_map * part_input + (1 - p_map) * ordinary) * target_scale
        return performer.run_head(reconstruction, images)

    with torch.no_grad():
        full = logits_of(parts, x_ord)
        targets = _targets(target, prediction, full.shape[1])
        baseline = logits_of(torch.zeros_like(parts), x_ord)[rows, targets]
        empty = logits_of(torch.zeros_like(parts), torch.zeros_like(x_ord))[rows, targets]
    gradient_sum = torch.zeros_like(parts)
    for step in range(steps):
        alpha = (step + 0.5) / steps
        scaled = (alpha * parts).requires_grad_(True)
        with torch.enable_grad():
            chosen = logits_of(scaled, x_ord)[rows, targets].sum()
            (gradient,) = torch.autograd.grad(chosen, scaled)
        gradient_sum += gradient
    contributions = (parts * gradient_sum / steps).double().sum(dim=(2, 3)).float()
    logit = full[rows, targets]
    residual = (logit.double() - baseline.double() - contributions.double().sum(dim=1)).float()
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return Attribution(
        target=targets.cpu(), prediction=prediction.cpu(), prediction_through_reconstruction=full.argmax(dim=1).cpu(),
        logit=cpu(logit), baseline_logit=cpu(baseline), empty_logit=cpu(empty), contributions=cpu(contributions),
        residual=cpu(residual), part_maps=cpu(parts), p=cpu(p.expand(B) if p.dim() == 0 else p))
