"""`fastexplain fit` tuning flags and --config: defaults from the dataclasses, precedence, one-line errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastexplain.train as train_module
from fastexplain.cli import build_parser, main
from fastexplain.nn.explainer import ExplainerConfig
from fastexplain.train import TrainConfig


def _images(root: Path, count: int = 3) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(generator.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)).save(root / f"i{index}.png")
    return root


@pytest.fixture()
def captured_fit(monkeypatch: pytest.MonkeyPatch) -> dict:
    calls: dict = {}

    def fake_fit(performer, dataset, out, config, explainer_config=None, **kwargs):
        calls.update(config=config, explainer_config=explainer_config, kwargs=kwargs)
        return [{"epoch": 1, "reconstruction": 0.5, "filter": -0.1, "p": 0.5}]

    monkeypatch.setattr(train_module, "fit", fake_fit)
    return calls


def _run(tmp_path: Path, *extra: str) -> int:
    return main(["fit", "--model", "resnet18", "--layer", "layer3", "--num-classes", "4", "--data",
                 str(_images(tmp_path / "images")), "--image-size", "32", "--out", str(tmp_path / "run"),
                 "--quiet", *extra])


def test_help_shows_the_library_defaults_read_from_the_dataclasses(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f.name: f for f in dataclasses.fields(ExplainerConfig)}
    monkeypatch.setattr(fields["filter_weight"], "default", 12.5)
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    monkeypatch.setattr(train_fields["refine_epochs"], "default", 7)
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    text = subparsers.choices["fit"].format_help()
    assert "[12.5]" in text and "[7]" in text
    for flag in ("--filter-weight", "--kl-weight", "--p-weight", "--parts", "--refine-epochs", "--gate",
                 "--num-workers", "--config", "--diversity-weight", "--constellation-weight", "--crowding-weight",
                 "--part-lr-scale", "--average-decay"):
        assert flag in text


def test_no_flag_passes_no_option(tmp_path: Path, captured_fit: dict) -> None:
    assert _run(tmp_path) == 0
    assert captured_fit["explainer_config"] is None
    assert captured_fit["config"] == TrainConfig()


def test_flags_and_config_file_with_flags_winning(tmp_path: Path, captured_fit: dict) -> None:
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"filter_weight": 3.0, "contrast": 2.0, "epochs": 4,
                                  "train": {"gate_lr_scale": 2.0}, "explainer": {"p_weight": 0.25}}))
    assert _run(tmp_path, "--config", str(config), "--filter-weight", "5", "--parts", "8", "--gate", "image",
                "--refine-epochs", "2", "--num-workers", "1", "--kl-weight", "0", "--constellation-weight", "100",
                "--part-lr-scale", "0.3", "--average-decay", "0") == 0
    assert captured_fit["explainer_config"] == {"filter_weight": 5.0, "contrast": 2.0, "p_weight": 0.25,
                                                "parts": 8, "gate": "image", "kl_weight": 0.0,
                                                "constellation_weight": 100.0}
    train = captured_fit["config"]
    assert (train.epochs, train.gate_lr_scale, train.refine_epochs, train.num_workers) == (4, 2.0, 2, 1)
    assert train.part_lr_scale == 0.3 and train.average_decay == 0.0


@pytest.mark.parametrize("content, message", [
    ({"filter_wieght": 1.0}, "unknown option 'filter_wieght'.*did you mean 'filter_weight'"),
    ({"train": {"parts": 3}}, "unknown option 'parts' in the 'train' section"),
    ([1, 2], "must hold a JSON object"),
    ("{not json", "is not valid JSON"),
    ({"epochs": 0}, "epochs must be ≥ 1"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
])
def test_bad_config_files_are_one_line_errors(tmp_path: Path, captured_fit: dict, capsys: pytest.CaptureFixture,
                                              content, message: str) -> None:
    config = tmp_path / "bad.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content))
    assert _run(tmp_path, "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert "config" not in captured_fit


def test_missing_config_file(tmp_path: Path, captured_fit: dict, capsys: pytest.CaptureFixture) -> None:
    assert _run(tmp_path, "--config", str(tmp_path / "none.json")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_fit_stores_the_flags_in_the_checkpoint(tmp_path: Path) -> None:
    assert _run(tmp_path, "--parts", "4", "--gate", "image", "--filter-weight", "0.5", "--epochs", "1",
                "--refine-epochs", "1", "--batch-size", "2") == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["explainer_config"]["parts"] == 4 and state["explainer_config"]["gate"] == "image"
    assert state["explainer_config"]["filter_weight"] == 0.5
    assert state["train_config"]["refine_epochs"] == 1 and state["epoch"] == 2
