"""Performer: layers by dotted name, frozen eval mode, heads equal to the rest of the network ([EXPL] arXiv 1805.07468)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastexplain import Performer


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("name, layer, target", [
    ("vgg11", "features.10", "features.15"),
    ("alexnet", "features.7", None),
    ("resnet18", "layer2", "layer3.0"),
    ("resnet18", "layer4", None),
])
def test_torchvision_heads_reproduce_the_model_output(name: str, layer: str, target: str | None) -> None:
    torch.manual_seed(0)
    performer = Performer.from_torchvision(name, layer, target, num_classes=7)
    images = torch.rand(2, 3, 64, 64)
    features = performer.features(images)
    expected = performer.model(performer.normalise(images))
    torch.testing.assert_close(features.logits, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(performer.run_head(features.target), expected, rtol=1e-4, atol=1e-5)
    assert features.input.dim() == 4 and features.target.dim() == 4


def test_hook_head_substitutes_the_feature_and_is_differentiable() -> None:
    performer = Performer(_tiny_net(), "3", head="hook")
    images = torch.rand(3, 3, 8, 8)
    features = performer.features(images)
    torch.testing.assert_close(features.logits, performer.model(images))
    feature = features.target.clone().requires_grad_(True)
    logits = performer.run_head(feature * 2, images)
    torch.testing.assert_close(logits, performer.model[4:](features.target * 2))
    logits.sum().backward()
    assert feature.grad is not None and feature.grad.abs().sum() > 0


def test_sequential_auto_head_and_feature_only_mode() -> None:
    net = _tiny_net()
    auto = Performer(net, "4")
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(auto.features(images).logits, net(images))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    with pytest.warns(UserWarning, match="feature-only mode"):
        feature_only = Performer(Wrapped(), "body.4")
    assert not feature_only.has_head
    assert feature_only.features(images).logits is None
    with pytest.raises(RuntimeError, match="no head"):
        feature_only.run_head(torch.zeros(2, 8, 4, 4))


def test_performer_is_frozen_and_stays_in_eval_mode() -> None:
    performer = Performer(_tiny_net(), "1")
    parent = nn.ModuleDict({"performer": performer, "other": nn.Linear(2, 2)})
    parent.train()
    assert not performer.training and not any(m.training for m in performer.model.modules())
    assert not any(p.requires_grad for p in performer.parameters())
    assert parent["other"].training


def test_probe_gives_the_layer_shapes() -> None:
    performer = Performer(_tiny_net(), "1", "4")
    assert performer.probe(8) == (torch.Size([6, 8, 8]), torch.Size([8, 4, 4]))


def test_unknown_layer_lists_the_closest_names() -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'features\.99'.*'features\.\d+'"):
        Performer.from_torchvision("vgg11", "features.99")
    with pytest.raises(ValueError, match="closest valid names"):
        Performer(_tiny_net(), "layer4")


def test_unknown_model_and_bad_weights_paths(tmp_path) -> None:
    with pytest.raises(ValueError, match="closest: 'vgg1"):
        Performer.from_torchvision("vgg1", "features.0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Performer.from_torchvision("alexnet", "features.0", weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a readable state_dict"):
        Performer.from_torchvision("alexnet", "features.0", weights=garbage)


def test_local_weights_are_loaded(tmp_path) -> None:
    torch.manual_seed(3)
    source = Performer.from_torchvision("alexnet", "features.7", num_classes=5)
    path = tmp_path / "alexnet.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(4)
    loaded = Performer.from_torchvision("alexnet", "features.7", num_classes=5, weights=path)
    pairs = zip(source.model.state_dict().values(), loaded.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert loaded.spec.weights == str(path.resolve())


def test_the_classifier_width_is_read_from_the_weights(tmp_path) -> None:
    """`fit --weights W` without --num-classes on a 200-class (CUB) or 3-class model: the width comes from W;
    the performer's head then gives that many logits, and the spec records it for the checkpoint."""
    for name, layer in (("resnet18", "layer3"), ("squeezenet1_0", "features.3")):  # a Linear, a Conv2d classifier
        source = Performer.from_torchvision(name, layer, num_classes=3, head="hook")
        path = tmp_path / f"{name}.pt"
        torch.save(source.model.state_dict(), path)
        loaded = Performer.from_torchvision(name, layer, weights=path, head="hook")
        assert loaded.spec.num_classes == 3
        assert loaded.features(torch.rand(1, 3, 64, 64)).logits.shape == (1, 3)
        assert Performer.from_spec(loaded.spec).spec.num_classes == 3
    assert Performer.from_torchvision("resnet18", "layer3").spec.num_classes == 1000
    with pytest.raises(ValueError, match=r"do not fit torchvision resnet18 with 10 classes: size mismatch for fc\.weight"):
        Performer.from_torchvision("resnet18", "layer3", weights=tmp_path / "resnet18.pt", num_classes=10)


def test_a_non_map_layer_is_a_clear_error() -> None:
    performer = Performer(_tiny_net(), "7")
    with pytest.raises(ValueError, match="not a \\[B, C, H, W\\] feature map"):
        performer.features(torch.rand(1, 3, 8, 8))


def test_random_init_is_seeded_so_a_checkpoint_rebuilds_the_same_performer():
    from fastexplain.performer import Performer as P
    first = P.from_torchvision("alexnet", "features.10", num_classes=3)
    again = P.from_spec(first.spec)
    other = P.from_torchvision("alexnet", "features.10", num_classes=3, init_seed=1)
    w = lambda p: p.model.features[0].weight
    assert torch.equal(w(first), w(again)) and not torch.equal(w(first), w(other))
