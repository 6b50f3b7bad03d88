"""InterpretableConv2d as a drop-in nn.Conv2d: Tensor output, from_conv, Conv2d arguments, loss collection."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastexplain as fx
from fastexplain import InterpretableConv2d, collect_filter_losses, relu_template_mask


def test_forward_returns_a_tensor_and_fits_in_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(InterpretableConv2d(3, 4), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    out = model(torch.rand(2, 3, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2)
    layer = model[0]
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(layer(x), relu_template_mask(layer.conv(x)))


def test_conv2d_arguments_positional_and_keyword() -> None:
    layer = InterpretableConv2d(4, 6, 3, 2, 1, 1, 2, False, device="cpu", dtype=torch.float64)
    conv = layer.conv
    assert (conv.stride, conv.padding, conv.groups, conv.bias) == ((2, 2), (1, 1), 2, None)
    assert conv.weight.dtype == torch.float64 and conv.weight.shape == (6, 2, 3, 3)
    dilated = InterpretableConv2d(3, 5, 3, dilation=2)
    assert dilated.conv.padding == (2, 2) and dilated(torch.rand(1, 3, 9, 9)).shape == (1, 5, 9, 9)
    assert InterpretableConv2d(3, 5, (3, 5)).conv.padding == (1, 2)


def test_from_conv_copies_weights_and_shape() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=True)
    layer = InterpretableConv2d.from_conv(conv, beta=2.0)
    x = torch.randn(2, 4, 10, 10)
    torch.testing.assert_close(layer.conv(x), conv(x))
    assert layer.beta == 2.0 and layer.conv.weight is not conv.weight
    torch.testing.assert_close(layer(x), relu_template_mask(conv(x), beta=2.0))
    with pytest.raises(TypeError, match="expected an nn.Conv2d"):
        InterpretableConv2d.from_conv(nn.Linear(2, 2))


def test_replacing_a_conv_in_a_torchvision_resnet_and_collecting_losses() -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    net.layer4[1].conv2 = InterpretableConv2d.from_conv(net.layer4[1].conv2)
    net.layer3[0].conv1 = InterpretableConv2d(128, 256, 3, 2, 1, bias=False)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    with collect_filter_losses(net) as losses:
        logits = net(images)
        assert logits.shape == (4, 5)
        assert [name for name, _ in losses] == ["layer3.0.conv1", "layer4.1.conv2"]
        assert losses.by_layer()["layer4.1.conv2"].shape == (512,)
        loss = F.cross_entropy(logits, labels) + 0.1 * losses.sum()
    loss.backward()
    assert net.layer4[1].conv2.conv.weight.grad.abs().sum() > 0
    assert net.layer3[0].conv1._collectors == [] and net.layer4[1].conv2._collectors == []
    expected = torch.stack([l.sum() for _, l in losses]).sum()
    torch.testing.assert_close(losses.sum(), expected)
    assert float(losses.mean().detach()) == pytest.approx(float(expected.detach()) / (256 + 512), rel=1e-5)


def test_no_loss_outside_a_collection_or_in_eval_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fx.nn.interpretable.filter_loss
    monkeypatch.setattr(fx.nn.interpretable, "filter_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = InterpretableConv2d(3, 4)
    x = torch.rand(3, 3, 6, 6)
    layer(x)
    layer.eval()
    assert torch.equal(layer.detailed(x).filter_loss, torch.zeros(4))
    assert calls == []
    assert layer.detailed(x, compute_loss=True).filter_loss.abs().sum() > 0 and calls == [1]
    with collect_filter_losses(layer) as losses:  # eval mode: the collection is the request
        layer(x)
    assert len(losses) == 1 and calls == [1, 1]
    layer.compute_loss = False
    with collect_filter_losses(nn.Sequential(layer)) as losses:
        layer(x)
    assert len(losses) == 0 and calls == [1, 1]
    with pytest.raises(RuntimeError, match="no filter loss was collected"):
        losses.sum()
    layer.train()
    layer.compute_loss = None
    assert layer.detailed(x).filter_loss.abs().sum() > 0


def test_nested_collections_deepcopy_and_a_model_without_layers() -> None:
    layer = InterpretableConv2d(3, 4)
    x = torch.rand(2, 3, 5, 5)
    with collect_filter_losses(layer) as outer:
        with collect_filter_losses(layer) as inner:
            layer(x)
            assert len(copy.deepcopy(layer)._collectors) == 0
        layer(x)
    assert (len(outer), len(inner)) == (2, 1)
    layer(x)
    assert len(outer) == 2
    with pytest.raises(ValueError, match="has no InterpretableConv2d"):
        with collect_filter_losses(nn.Conv2d(3, 3, 1)):
            pass


def test_finetuning_with_filter_losses_lowers_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), InterpretableConv2d(8, 8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    images, labels = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(20):
        with collect_filter_losses(model) as losses:
            loss = F.cross_entropy(model(images), labels) + 1.0 * losses.mean()
        values.append(float(losses.mean().detach()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert values[-1] < values[0] - 1e-3


def test_exports() -> None:
    assert fx.InterpretableOutput is fx.nn.InterpretableOutput
    assert fx.FilterLosses is fx.nn.interpretable.FilterLosses
