"""fastexplain.attribute: integrated gradients of the class logit through x̂ over the part filters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastexplain as fx
from fastexplain.nn import Explainer, ExplainerConfig
from fastexplain.performer import Performer


def _setup(gate: str = "scalar", head: str = "auto") -> tuple[Explainer, Performer, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        net[6].weight.mul_(100.0)  # a head whose logits move with the feature
    performer = Performer(net, "3", head=head)
    explainer = Explainer(ExplainerConfig(in_channels=6, parts=5, gate=gate, part_init="random"))
    images = torch.rand(3, 3, 8, 8)
    explainer.train()
    explainer(performer.features(images).input)  # sets the input/target scales
    return explainer.eval(), performer, images


def test_logit_is_the_explainers_and_contributions_are_complete() -> None:
    explainer, performer, images = _setup()
    result = fx.attribute(explainer, performer, images, steps=128)
    features = performer.features(images)
    with torch.no_grad():
        logits = performer.run_head(explainer(features.input).reconstruction)
    assert torch.equal(result.target, features.logits.argmax(dim=1))
    torch.testing.assert_close(result.logit, logits[torch.arange(3), result.target], rtol=1e-5, atol=1e-6)
    gap = result.logit - result.baseline_logit
    assert gap.abs().max() > 1e-4  # the parts matter at all
    assert result.residual.abs().max() <= 1e-3 * gap.abs().max() + 1e-6
    torch.testing.assert_close(result.contributions.sum(dim=1) + result.residual, gap, rtol=1e-4, atol=1e-6)
    coarse = fx.attribute(explainer, performer, images, steps=1)
    assert coarse.residual.abs().sum() >= result.residual.abs().sum()
    assert result.contributions.shape == (3, 5) and result.part_maps.shape == (3, 5, 8, 8)


def test_a_silent_filter_contributes_nothing_and_given_targets_are_used() -> None:
    explainer, performer, images = _setup()
    with torch.no_grad():
        explainer.interpretable2.conv.weight[2].zero_()
        explainer.interpretable2.conv.bias[2] = -1.0
    result = fx.attribute(explainer, performer, images, target=[1, 2, 3], steps=8)
    assert torch.all(result.contributions[:, 2] == 0)
    assert result.target.tolist() == [1, 2, 3]
    assert fx.attribute(explainer, performer, images, target=0, steps=2).target.tolist() == [0, 0, 0]
    record = result.record(0, class_names=["a", "b", "c", "d"])
    assert record["class"] == "b" and len(record["contributions"]) == 5
    values = [c["contribution"] for c in record["contributions"]]
    assert values == sorted(values, reverse=True)
    assert 0.0 <= record["ordinary_share"] <= 1.0
    assert record["ordinary_contribution"] == pytest.approx(record["baseline_logit"] - record["empty_logit"])


def test_image_gate_hook_head_and_training_mode_restored() -> None:
    explainer, performer, images = _setup(gate="image", head="hook")
    explainer.train()
    result = fx.attribute(explainer, performer, images, steps=64)
    assert explainer.training and result.p.shape == (3,)
    gap = result.logit - result.baseline_logit
    assert result.residual.abs().max() <= 1e-2 * gap.abs().max() + 1e-6


@pytest.mark.parametrize("kwargs, message", [
    ({"target": [0, 1]}, "one class or one per image"),
    ({"target": 9}, r"lie in \[0, 4\)"),
    ({"steps": 0}, "steps must be"),
])
def test_bad_arguments_are_one_line_errors(kwargs: dict, message: str) -> None:
    explainer, performer, images = _setup()
    with pytest.raises(ValueError, match=message):
        fx.attribute(explainer, performer, images, **kwargs)


def test_a_performer_without_head_is_refused() -> None:
    explainer, performer, images = _setup()
    headless = Performer(performer.model, "3", head=None)
    with pytest.raises(ValueError, match="has no head"):
        fx.attribute(explainer, headless, images)
