"""Performer and fit corner cases (issue 13 item 5): each is a one-line error or a single warning."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastexplain.performer as performer_module
from fastexplain.performer import Performer, weights_fingerprint
from fastexplain.train import TrainConfig, fit


class SharedReLU(nn.Module):
    """One nn.ReLU module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _images(count: int = 4, size: int = 8) -> list[torch.Tensor]:
    return list(torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)))


def _fit(performer: Performer, out: Path, data=None, **explainer) -> list:
    return fit(performer, data if data is not None else _images(), out, TrainConfig(epochs=1, batch_size=2, device="cpu"),
               explainer or None, resume=True, progress=False)


def test_hook_head_on_a_layer_called_twice_is_a_one_line_error() -> None:
    performer = Performer(SharedReLU(), "relu", head="hook")
    images = torch.rand(2, 3, 6, 6)
    with pytest.raises(ValueError, match="called more than once in one forward pass") as raised:
        performer.features(images)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="called more than once"):
        performer.run_head(torch.rand(2, 4, 6, 6), images)
    once = Performer(SharedReLU(), "conv2", head="hook")
    feats = once.features(images)
    torch.testing.assert_close(once.run_head(feats.target, images), feats.logits)


def test_auto_head_fallback_warns_once_and_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(performer_module, "_WARNED_NO_HEAD", set())
    with pytest.warns(UserWarning, match="feature-only mode.*head='hook'"):
        assert not Performer(SharedReLU(), "conv2").has_head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Performer(SharedReLU(), "conv2")           # the same model and layer: no second warning
        Performer(SharedReLU(), "conv2", head=None)  # feature-only asked for: no warning
        assert Performer(_net(), "2").has_head      # a known architecture: no warning


def test_resume_names_the_differing_layer_weights_and_options(tmp_path: Path) -> None:
    _fit(Performer(_net(), "2"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"performer differs.*layer: '2' → '3'"):
        _fit(Performer(_net(), "3"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"performer differs.*weights \(their SHA-256 differs\)"):
        _fit(Performer(_net(seed=1), "2"), tmp_path / "a")
    _fit(Performer(_net(), "2"), tmp_path / "b", parts=4)
    with pytest.raises(ValueError, match=r"explainer options differ.*parts: 4 → 5") as raised:
        _fit(Performer(_net(), "2"), tmp_path / "b", parts=5)
    assert "\n" not in str(raised.value)
    _fit(Performer(_net(), "2"), tmp_path / "b", parts=4)  # the same performer and options resume


def test_weights_fingerprint_sees_buffers_and_dtypes() -> None:
    a, b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    b.running_mean += 1
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(nn.Linear(2, 2).double()) != weights_fingerprint(nn.Linear(2, 2))


@pytest.mark.parametrize("data, message", [
    ([(torch.rand(3, 8, 8) * 255).to(torch.uint8) for _ in range(4)], r"float tensors in \[0, 1\], got torch.uint8"),
    ([torch.rand(3, 8, 8), torch.rand(3, 8, 8), torch.rand(3, 10, 8), torch.rand(3, 8, 8)], "different sizes"),
    ([torch.rand(8, 8) for _ in range(4)], r"must be \[C, H, W\]"),
])
def test_bad_images_in_fit_are_one_line_errors(tmp_path: Path, data: list, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        _fit(Performer(_net(), "2"), tmp_path / "c", data=data)
    assert "\n" not in str(raised.value)


def test_resume_at_another_image_size_is_refused(tmp_path: Path) -> None:
    _fit(Performer(_net(), "2"), tmp_path / "d")
    with pytest.raises(ValueError, match=r"image size differs.*image_size: \[8, 8\] → \[12, 12\].*same image size"):
        _fit(Performer(_net(), "2"), tmp_path / "d", data=_images(size=12))
