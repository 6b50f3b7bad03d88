"""`fastexplain explain` / visualize.explain_images: labelled PNG and JSON with the part attribution."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastexplain.cli import main
from fastexplain.nn import Explainer, ExplainerConfig
from fastexplain.performer import Performer
from fastexplain.train import TrainConfig, fit
from fastexplain.visualize import explain_images, overlay_heatmap, save_explanation_png


def _pictures(root: Path, count: int = 2) -> list[Path]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(1)
    paths = []
    for index in range(count):
        path = root / f"pic{index}.png"
        Image.fromarray(generator.integers(0, 256, size=(40, 44, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        net[6].weight.mul_(50.0)
    return net


def test_cli_explain_writes_a_labelled_png_and_a_complete_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pictures = _pictures(tmp_path / "images", 3)
    out = tmp_path / "run"
    assert main(["fit", "--model", "resnet18", "--layer", "layer3", "--num-classes", "5", "--data",
                 str(tmp_path / "images"), "--image-size", "32", "--batch-size", "3", "--epochs", "1",
                 "--parts", "6", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["explain", str(out / "checkpoint.pt"), *map(str, pictures[:2]), "--out", str(tmp_path / "maps"),
                 "--top", "4", "--steps", "16"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["pic0.json", "pic0_parts.png", "pic1.json", "pic1_parts.png"]
    record = json.loads((tmp_path / "maps" / "pic0.json").read_text())
    assert record["image"] == str(pictures[0]) and 0 <= record["class"] < 5
    assert len(record["contributions"]) == 6 and {"filter", "contribution", "group", "peak"} <= set(record["contributions"][0])
    total = sum(c["contribution"] for c in record["contributions"])
    assert total + record["residual"] == pytest.approx(record["logit"] - record["baseline_logit"], rel=1e-4, abs=1e-5)
    assert 0 <= record["ordinary_share"] <= 1
    from PIL import Image

    with Image.open(tmp_path / "maps" / "pic0_parts.png") as png:
        assert png.size[0] > 400 and png.size[1] > 200  # the input is drawn large, not as a 64-px tile


def test_explain_images_with_a_custom_performer_object(tmp_path: Path) -> None:
    pictures = _pictures(tmp_path / "images")
    performer = Performer(_net(), "3")
    fit(performer, [torch.rand(3, 16, 16) for _ in range(4)], tmp_path / "run",
        TrainConfig(epochs=1, batch_size=2, device="cpu"), {"parts": 5}, progress=False)
    with pytest.raises(ValueError, match="cannot be rebuilt.*performer=Performer"):
        explain_images(tmp_path / "run", pictures, tmp_path / "maps")
    written = explain_images(tmp_path / "run", pictures, tmp_path / "maps", performer=performer, top=3, steps=8)
    assert len(written) == 4 and all(p.is_file() for p in written)
    with pytest.raises(ValueError, match="cannot explain: the performer differs.*weights"):
        explain_images(tmp_path / "run", pictures, tmp_path / "maps", performer=Performer(_net(seed=3), "3"))


def test_explainer_object_and_a_headless_performer(tmp_path: Path) -> None:
    pictures = _pictures(tmp_path / "images", 1)
    explainer = Explainer(ExplainerConfig(in_channels=6, parts=4))
    headless = Performer(_net(), "3", head=None)
    with pytest.raises(ValueError, match="image_size"):
        explain_images(explainer, pictures, tmp_path / "maps", performer=headless)
    explain_images(explainer, pictures, tmp_path / "maps", performer=headless, image_size=16, top=2)
    record = json.loads((tmp_path / "maps" / "pic0.json").read_text())
    assert record["class"] is None and "no head" in record["note"] and len(record["filters"]) == 2


def test_overlay_vmax_and_figure_argument_checks(tmp_path: Path) -> None:
    image, heat = torch.zeros(3, 8, 8), torch.full((2, 2), 1.0)
    assert overlay_heatmap(image, heat, vmax=4.0).sum() < overlay_heatmap(image, heat).sum()
    with pytest.raises(ValueError, match="2 filters but 1 labels"):
        save_explanation_png(image, torch.rand(3, 2, 2), [0, 1], ["a"], tmp_path / "x.png")
    path = save_explanation_png(image, torch.zeros(3, 2, 2), [0, 1, 2], ["a", "b", "c"], tmp_path / "x.png", columns=2)
    assert path.is_file()
