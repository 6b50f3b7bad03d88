"""`fastexplain fit` / `explain`, image folders, the dataset registry and the PNG overlays (issue 6)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastexplain import data as data_module
from fastexplain.cli import main
from fastexplain.data import open_dataset, parse_dataset_spec
from fastexplain.data.folders import ImageFolderDataset
from fastexplain.visualize import overlay_heatmap, save_part_maps_png


def _image_folder(root: Path, count: int = 3) -> Path:
    from PIL import Image

    generator = np.random.default_rng(0)
    for index in range(count):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, size=(40 + 8 * index, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_fit_then_resume_then_explain(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    common = ["fit", "--model", "resnet18", "--layer", "layer3", "--num-classes", "10", "--data", str(images),
              "--image-size", "32", "--batch-size", "2", "--out", str(out), "--quiet", "--refine-epochs", "0"]
    assert main(common + ["--epochs", "1"]) == 0
    assert (out / "checkpoint.pt").is_file()
    assert main(common + ["--epochs", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(common + ["--epochs", "2", "--resume"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    pictures = sorted((images / "cats").glob("*.png")) + sorted((images / "dogs").glob("*.png"))[:1]
    assert main(["explain", str(out / "checkpoint.pt"), *map(str, pictures), "--out", str(tmp_path / "maps"),
                 "--top", "3"]) == 0
    written = sorted((tmp_path / "maps").glob("*_parts.png"))
    assert [p.name for p in written] == sorted(f"{p.stem}_parts.png" for p in pictures)


@pytest.mark.parametrize("argv, message", [
    (["--model", "alexnet", "--layer", "features.77"], "unknown layer 'features.77'"),
    (["--model", "alexnett", "--layer", "features.7"], "unknown torchvision classification model"),
    (["--model", "alexnet", "--layer", "features.7", "--weights", "/nonexistent/w.pt"], "does not exist"),
])
def test_fit_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                      message: str) -> None:
    code = main(["fit", *argv, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_data_and_checkpoint_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["fit", "--model", "alexnet", "--layer", "features.7", "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "neither a directory nor a known dataset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 32)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 100)
    assert main(["explain", str(broken), "x.png", "--out", str(tmp_path)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_image_folder_ignores_labels_and_other_files(tmp_path: Path) -> None:
    dataset = open_dataset(str(_image_folder(tmp_path)), 32)
    assert len(dataset) == 3
    image = dataset[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


def test_named_datasets_are_dispatched_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_dataset_spec("partworld:images=10,seed=3,noise=0.5,hard=true") == (
        "partworld", {"images": 10, "seed": 3, "noise": 0.5, "hard": True})
    with pytest.raises(ValueError, match="not key=value"):
        parse_dataset_spec("partworld:images")
    monkeypatch.setitem(data_module.NAMED_DATASETS, "fakeset", "fastexplain.data._no_such_module")
    with pytest.raises(ValueError, match="not available in this installation"):
        open_dataset("fakeset", 32)
    monkeypatch.setitem(data_module.NAMED_DATASETS, "folders", "fastexplain.data.folders")
    with pytest.raises(ValueError, match="defines no folders_dataset"):
        open_dataset("folders", 32)


def test_overlay_heatmap_and_part_map_png(tmp_path: Path) -> None:
    image = torch.zeros(3, 16, 20)
    heat = torch.zeros(4, 5)
    heat[1, 2] = 3.0
    overlay = overlay_heatmap(image, heat)
    assert overlay.shape == (16, 20, 3) and overlay.dtype == np.uint8
    assert overlay[6, 10].sum() > 0 and overlay[15, 0].sum() == 0
    assert np.array_equal(overlay_heatmap(image, torch.zeros(4, 5)), np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        overlay_heatmap(image, torch.zeros(1, 4, 5))
    path = save_part_maps_png(torch.rand(3, 16, 20), torch.rand(6, 4, 5), tmp_path / "grid.png", top=3, columns=2)
    from PIL import Image

    with Image.open(path) as png:
        assert png.size == (2 * 22 + 2, 2 * 18 + 2)
