"""The explainer's anti-collapse recipe: identity start, grouped part track, diversity penalty, part lr."""
from __future__ import annotations

import pytest
import torch

from fastexplain import Explainer, ExplainerConfig
from fastexplain.train import TrainConfig, make_optimizer


def test_identity_start_copies_the_performer_channels() -> None:
    explainer = Explainer(ExplainerConfig(in_channels=5, parts=7, part_init="identity"))
    x = torch.rand(2, 5, 6, 4)
    first = explainer.interpretable1.conv(x)
    for f in range(7):  # part filter f starts on channel f mod C
        torch.testing.assert_close(first[:, f], x[:, f % 5])
    second = explainer.interpretable2.conv(first)
    torch.testing.assert_close(second, first)


def test_identity_autoencoder_start_passes_the_feature_through() -> None:
    explainer = Explainer(ExplainerConfig(in_channels=5, parts=7, target_channels=3))
    x = torch.rand(2, 5, 6, 4)
    x_ord = torch.relu(explainer.ordinary(x))
    for f in range(7):
        torch.testing.assert_close(x_ord[:, f], x[:, f % 5])
    decoded = explainer._decode(x_ord)
    for c in range(3):  # decoder: channel c of the target reads channel c of the code
        torch.testing.assert_close(decoded[:, c], x[:, c])
    random_start = Explainer(ExplainerConfig(in_channels=5, parts=7, autoencoder_init="random"))
    assert random_start.ordinary.weight[:, :, 0, 0].abs().sum() > 0


def test_grouped_part_track_reads_only_its_group() -> None:
    explainer = Explainer(ExplainerConfig(in_channels=6, parts=6, part_groups=3, part_init="identity"))
    assert explainer.interpretable1.conv.groups == 3 and explainer.interpretable2.conv.groups == 3
    x = torch.rand(1, 6, 5, 5, requires_grad=True)
    explainer.interpretable1.conv(x)[:, 0].sum().backward()
    assert x.grad[:, 2:].abs().sum() == 0 and x.grad[:, :2].abs().sum() > 0
    with pytest.raises(ValueError, match="part_groups=4 must divide"):
        Explainer(ExplainerConfig(in_channels=6, parts=6, part_groups=4))


def test_similarity_penalty_known_answers() -> None:
    explainer = Explainer(ExplainerConfig(in_channels=3, parts=3))
    same = torch.rand(4, 1, 5, 5).expand(4, 3, 5, 5)
    torch.testing.assert_close(explainer._similarity(same), torch.tensor(1.0))
    disjoint = torch.zeros(4, 3, 5, 5)
    for f in range(3):
        disjoint[:, f, f] = 1.0  # each filter on its own row
    assert float(explainer._similarity(disjoint)) == 0.0


def test_diversity_weight_enters_the_total() -> None:
    torch.manual_seed(0)
    explainer = Explainer(ExplainerConfig(in_channels=4, parts=4, diversity_weight=2.0, constellation_weight=0.0,
                                          crowding_weight=0.0))
    losses = explainer(torch.rand(3, 4, 5, 5)).losses
    assert 0 < float(losses.diversity) <= 1
    torch.testing.assert_close(losses.total, losses.reconstruction + explainer.config.filter_weight * losses.filter
                               + explainer.config.p_weight * losses.neg_log_p + 2.0 * losses.diversity)


def test_part_filters_get_their_own_learning_rate() -> None:
    explainer = Explainer(ExplainerConfig(in_channels=4, parts=4, decoder_width=9))
    assert explainer.decoder1.out_channels == 9
    optimizer = make_optimizer(explainer, TrainConfig(lr=1e-3, part_lr_scale=0.1, gate_lr_scale=10.0))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(list(explainer.parameters()))
    # lr × min(1, part_lr_scale × √(64 / fan-in channels)): 4 input channels here, 0.1 × 4
    for p in [*explainer.interpretable1.parameters(), *explainer.interpretable2.parameters()]:
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.4)
    narrow = Explainer(ExplainerConfig(in_channels=1, parts=1))  # 0.3 × √64 > 1: capped at lr
    lr_narrow = {id(p): g["lr"] for g in make_optimizer(narrow, TrainConfig(part_lr_scale=0.3)).param_groups
                 for p in g["params"]}
    assert lr_narrow[id(narrow.interpretable1.conv.weight)] == pytest.approx(1e-3)
    assert lr_of[id(explainer.gate_logit)] == pytest.approx(1e-2)
    assert lr_of[id(explainer.decoder1.weight)] == pytest.approx(1e-3)
    wide = Explainer(ExplainerConfig(in_channels=128, parts=8))
    lr_wide = {id(p): g["lr"] for g in make_optimizer(wide, TrainConfig(part_lr_scale=0.1)).param_groups
               for p in g["params"]}
    assert lr_wide[id(wide.interpretable1.conv.weight)] == pytest.approx(1e-3 * 0.1 * (64 / 128) ** 0.5)
    assert lr_wide[id(wide.interpretable2.conv.weight)] == pytest.approx(1e-3 * 0.1 * (64 / 8) ** 0.5)


def test_bad_recipe_options_are_one_line_errors() -> None:
    for bad, match in [({"part_init": "zeros"}, "part_init"), ({"part_groups": 0}, "part_groups"),
                       ({"decoder_width": 0}, "decoder_width"), ({"diversity_weight": -1.0}, "diversity_weight"),
                       ({"autoencoder_init": "zeros"}, "autoencoder_init"),
                       ({"constellation_weight": -1.0}, "constellation_weight"),
                       ({"crowding_weight": float("nan")}, "crowding_weight")]:
        with pytest.raises(ValueError, match=match):
            ExplainerConfig(in_channels=4, **bad)
