"""Explainer (docs/method.md §4): shapes, norm, p, loss terms and the config's validation."""
from __future__ import annotations

import math

import pytest
import torch

from fastexplain import Explainer, ExplainerConfig


def _explainer(**options) -> Explainer:
    torch.manual_seed(0)
    return Explainer(ExplainerConfig(in_channels=6, parts=4, **options))


def test_output_shapes_and_loss_terms() -> None:
    explainer = _explainer()
    x = torch.rand(3, 6, 5, 5) * 10
    out = explainer(x)
    assert out.reconstruction.shape == x.shape
    assert out.part_maps.shape == out.part_relu_maps.shape == (3, 4, 5, 5)
    assert out.p.dim() == 0 and 0 < float(out.p.detach()) < 1
    assert [f.shape for f in out.filter_losses] == [(4,), (4,)]
    losses = out.losses
    config = explainer.config
    expected_filter = torch.cat(out.filter_losses).mean() / math.log(26)
    torch.testing.assert_close(losses.filter, expected_filter)
    assert -1.0 <= float(losses.filter.detach()) <= 0.0
    torch.testing.assert_close(losses.neg_log_p, -torch.log(out.p))
    torch.testing.assert_close(losses.reconstruction, (out.reconstruction - x).pow(2).sum() / x.pow(2).sum())
    torch.testing.assert_close(losses.total, losses.reconstruction + config.filter_weight * losses.filter
                               + config.p_weight * losses.neg_log_p + config.diversity_weight * losses.diversity
                               + config.constellation_weight * losses.constellation
                               + config.crowding_weight * losses.crowding)
    assert float(losses.kl) == 0.0
    assert 0.0 < float(losses.diversity) <= 1.0
    assert float(_explainer(diversity_weight=0.0)(x).losses.diversity) == 0.0  # not computed when unweighted
    assert set(losses.as_floats()) == {"total", "reconstruction", "kl", "filter", "neg_log_p", "diversity",
                                       "constellation", "crowding"}


def test_norm_scale_is_the_running_mean_rms_and_frozen_in_eval() -> None:
    explainer = _explainer()
    a, b = torch.rand(2, 6, 4, 4) * 3, torch.rand(6, 6, 4, 4) * 5
    explainer(a)
    explainer(b)
    rms = lambda t: t.pow(2).mean(dim=(1, 2, 3)).sqrt()  # noqa: E731
    expected = torch.cat([rms(a), rms(b)]).mean()
    torch.testing.assert_close(explainer.input_scale, expected)
    explainer.eval()
    explainer(torch.rand(2, 6, 4, 4) * 100)
    torch.testing.assert_close(explainer.input_scale, expected)
    assert int(explainer.scale_count) == 8


def test_reconstruction_is_returned_in_the_performer_scale() -> None:
    explainer = _explainer().eval()
    x = torch.rand(2, 6, 4, 4)
    small = explainer(x).reconstruction
    explainer.input_scale.fill_(10.0)
    explainer.target_scale.fill_(10.0)
    torch.testing.assert_close(explainer(x * 10).reconstruction, small * 10, rtol=1e-4, atol=1e-5)


def test_per_image_gate_gives_one_p_per_image() -> None:
    explainer = _explainer(gate="image", p_init=0.3)
    out = explainer(torch.rand(4, 6, 5, 5))
    assert out.p.shape == (4,)
    torch.testing.assert_close(out.p, torch.full((4,), 0.3))
    assert explainer.gate_parameters() == list(explainer.gate.parameters())


def test_target_layer_with_other_channels_and_size() -> None:
    torch.manual_seed(0)
    explainer = Explainer(ExplainerConfig(in_channels=6, target_channels=9, target_size=(2, 3), parts=4))
    target = torch.rand(2, 9, 2, 3)
    out = explainer(torch.rand(2, 6, 5, 5), target)
    assert out.reconstruction.shape == target.shape
    upsampling = Explainer(ExplainerConfig(in_channels=6, target_channels=3, target_size=(8, 8), parts=4))
    assert upsampling(torch.rand(2, 6, 4, 4), torch.rand(2, 3, 8, 8)).reconstruction.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="does not match the decoder output"):
        explainer(torch.rand(2, 6, 5, 5), torch.rand(2, 9, 5, 5))


def test_kl_term_uses_the_head_on_the_reconstruction() -> None:
    explainer = _explainer(kl_weight=2.0, filter_weight=1.0, diversity_weight=0.0, constellation_weight=0.0,
                           crowding_weight=0.0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 3))
    x = torch.rand(3, 6, 4, 4)
    logits = head(x).detach()
    out = explainer(x, performer_logits=logits, head=head)
    log_q = torch.log_softmax(head(out.reconstruction), 1)
    log_p = torch.log_softmax(logits, 1)
    expected = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    torch.testing.assert_close(out.losses.kl, expected)
    assert float(out.losses.kl.detach()) > 0
    torch.testing.assert_close(out.losses.total - out.losses.reconstruction - out.losses.filter
                               - explainer.config.p_weight * out.losses.neg_log_p, 2.0 * out.losses.kl)


def test_wrong_input_channels_and_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"expected x\* of shape \[B, 6, h, w\]"):
        _explainer()(torch.rand(2, 5, 4, 4))
    for bad, match in [({"gate": "vector"}, "gate"), ({"p_init": 1.0}, "p_init"),
                       ({"filter_weight": -1.0}, "filter_weight"), ({"parts": 0}, "parts")]:
        with pytest.raises(ValueError, match=match):
            ExplainerConfig(in_channels=6, **bad)
    with pytest.raises(ValueError, match="unknown fields"):
        ExplainerConfig.from_dict({"in_channels": 4, "lambda": 3})


def test_defaults_and_round_trip() -> None:
    config = ExplainerConfig(in_channels=512)
    assert config.parts == 256 and config.target_channels == 512
    assert ExplainerConfig.from_dict(config.to_dict()) == config
    explainer = _explainer()
    x = torch.rand(2, 6, 4, 4)
    assert explainer(x, compute_loss=False).losses is None
    explainer.eval()
    inference = explainer(x)
    assert inference.losses is None and torch.equal(inference.filter_losses[0], torch.zeros(4))
    assert explainer(x, x).losses is not None
