"""`fastexplain evaluate` and the shared measuring code: known answers on planted detectors, per-part
gallery choices, omissions without annotations, and one-line errors for bad input."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastexplain.checkpoint import load_checkpoint, save_checkpoint
from fastexplain.cli import main
from fastexplain.evaluate import MapSpool, evaluate, evaluation_data
from fastexplain.galleries import choose_part_filters
from fastexplain.performer import Performer

SIZE, N = 32, 20


class Dots(torch.utils.data.Dataset):
    """Images with a red dot (part "red") and a green dot (part "green") ≥ 4 px apart, one pixel each."""

    part_names = ("red", "green")

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.zeros(N, 3, SIZE, SIZE)
        self.keypoints = torch.zeros(N, 2, 2)
        self.part_masks = torch.zeros(N, 2, SIZE, SIZE, dtype=torch.bool)
        for i in range(N):
            red = torch.randint(2, 14, (2,), generator=gen)
            green = red + torch.randint(6, 14, (2,), generator=gen)
            for k, (x, y) in enumerate((red.tolist(), green.tolist())):
                self.images[i, k, y, x] = 1.0 - 0.01 * i
                self.keypoints[i, k] = torch.tensor([x + 0.5, y + 0.5])
                self.part_masks[i, k, y, x] = True
        self.visible = torch.ones(N, 2, dtype=torch.bool)
        self.labels = torch.arange(N) % 2

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _performer() -> Performer:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 1] = 1.0
    return Performer(nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, 2)), "1")


class CollapsedExplainer(nn.Module):
    """Reconstructs x* exactly; its two "part filters" are both the red detector (a total collapse)."""

    def forward(self, x: torch.Tensor, compute_loss: bool = False) -> SimpleNamespace:
        red = x[:, :1]
        return SimpleNamespace(reconstruction=x.clone(), part_maps=torch.cat([red, red], 1),
                               part_relu_maps=torch.cat([red, red], 1), p=torch.tensor(0.75))


def test_planted_detectors_known_answers(tmp_path: Path) -> None:
    dots, performer = Dots(), _performer()
    metrics = evaluate(performer, CollapsedExplainer(), evaluation_data(dots), tmp_path, batch_size=6, progress=False,
                       memory_limit=5000)  # tiny memory limit: the maps spill to disk and are read back
    mine, theirs = metrics["performer"], metrics["explainer"]
    assert mine["colocation"] == 0.0 and mine["colocation_groups"] == 2 and mine["group_sizes"] == [1, 1]
    assert theirs["colocation"] == 1.0 and theirs["colocation_groups"] == 1 and theirs["group_sizes"] == [2]
    assert mine["best_part_histogram"] == {"red": 1, "green": 1} and mine["part_interpretability"] == 1.0
    assert theirs["best_part_histogram"] == {"red": 2, "green": 0} and theirs["parts_covered"] == 1
    assert theirs["reconstruction_error"] == 0.0 and theirs["agreement"] == 1.0 and theirs["p"] == 0.75
    with torch.no_grad():
        expected = float((performer.model(dots.images).argmax(1) == dots.labels).double().mean())
    assert mine["accuracy"] == pytest.approx(expected) and theirs["accuracy"] == pytest.approx(expected)
    red, green = metrics["parts"]["explainer"]
    assert red["filter"] == 0 and red["group_size"] == 2 and red["instability"] == 0.0  # peaks exactly on the dot
    assert green["filter"] is None and "no filter" in green["reason"]
    assert [c["filter"] for c in metrics["parts"]["performer"]] == [0, 1]
    assert metrics["omitted"] == {}
    targets = {row["name"]: row for row in metrics["targets"]}
    assert targets["colocation_group_fraction"]["value"] == 0.5 and not targets["parts_covered"]["passed"]
    html = (tmp_path / "report.html").read_text()
    assert "distinct filters for <b>1 of 2</b> parts" in html and "distinct filters for <b>2 of 2</b> parts" in html
    assert html.count("data:image/png;base64,") == 3  # red: explainer + performer, green: performer only
    assert json.loads((tmp_path / "metrics.json").read_text())["explainer"]["colocation_groups"] == 1


def test_image_folder_reports_what_needs_annotations(tmp_path: Path) -> None:
    from matplotlib.image import imsave

    from fastexplain.data.folders import ImageFolderDataset

    dots = Dots()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        imsave(folder / f"{i}.png", dots.images[i].permute(1, 2, 0).numpy())
    data = evaluation_data(ImageFolderDataset(folder, SIZE))
    metrics = evaluate(_performer(), CollapsedExplainer(), data, tmp_path / "out", progress=False)
    assert "location_instability" not in metrics["explainer"] and metrics["explainer"]["colocation_groups"] == 1
    assert {"location_instability", "part_interpretability", "parts_covered", "accuracy"} <= set(metrics["omitted"])
    assert "parts" not in metrics
    rows = {row["name"]: row for row in metrics["targets"]}
    assert rows["location_instability_ratio"]["passed"] is None and rows["agreement"]["passed"] is True
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Not measured on this data" in html and "needs landmark annotations" in html
    assert re.search(r"<td>location_instability_ratio</td>.*?not measured</td>", html)
    assert "group 0 of 2 filter(s)" in html  # one gallery per co-location group instead of per part


def test_labels_outside_the_performer_classes_omit_accuracy() -> None:
    dots = Dots()
    dots.labels = dots.labels + 2  # the performer has 2 outputs
    metrics = evaluate(_performer(), CollapsedExplainer(), evaluation_data(dots), progress=False)
    assert "accuracy" not in metrics["performer"] and "class indices" in metrics["omitted"]["accuracy"]
    assert metrics["explainer"]["agreement"] == 1.0


def test_part_choices_never_repeat_a_group() -> None:
    names = ("head", "tail", "legs")
    instability = torch.tensor([[0.05, 0.30, 0.30], [0.04, 0.30, 0.30], [0.30, 0.10, 0.30], [0.30, 0.30, 0.20]],
                               dtype=torch.float64)
    hits = torch.tensor([[0.5, 0, 0], [0.4, 0, 0], [0, 0.6, 0], [0, 0, 0]], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 2])
    choices = choose_part_filters(names, groups, [2, 1, 1], instability, hits)
    assert [c.filter for c in choices] == [1, 2, 3]  # filter 3 has no hit: it joins its most stable landmark
    assert [c.group_size for c in choices] == [2, 1, 1] and choices[0].hit_rate == 0.4
    # filters 0, 1 (head) and 2 (tail) co-locate: the most stable pair is shown, the other part says why it is empty
    together = choose_part_filters(names, torch.tensor([0, 0, 0, 1]), [3, 1], instability, hits)
    assert [c.filter for c in together] == [1, None, 3] and "co-locate with the filter shown for head" in together[1].reason
    collapsed = choose_part_filters(names, torch.zeros(4, dtype=torch.long), [4], instability, hits)
    assert sum(c.filter is not None for c in collapsed) == 1


def test_map_spool_spills_and_selects() -> None:
    spool = MapSpool(memory_limit=3 * 2 * 2 * 2 * 4)
    chunks = [torch.arange(24.0).view(3, 2, 2, 2) + 100 * i for i in range(3)]
    for chunk in chunks:
        spool.append(chunk)
    assert isinstance(spool.chunks[0], torch.Tensor) and isinstance(spool.chunks[2], Path)
    assert torch.equal(torch.cat(list(spool())), torch.cat(chunks))
    assert torch.equal(spool.select([1, 7], 1), torch.stack([chunks[0][1, 1], chunks[2][1, 1]]))
    spool.close()


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastexplain.demo import DemoSettings, cache_dir, run_demo

    out = tmp_path_factory.mktemp("demo")
    tiny = DemoSettings(performer_train_images=48, performer_test_images=16, performer_epochs=1, explainer_images=32,
                        explainer_epochs=1, explainer_refine_epochs=1, eval_images=24, gallery_filters=2,
                        gallery_images=2)
    run_demo(out, quick=True, progress=False, settings=tiny, seed=3)
    return cache_dir(out, True, 3) / "explainer" / "checkpoint.pt"


@pytest.mark.slow
def test_evaluate_cli_on_the_demo_checkpoint(demo_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", str(demo_checkpoint), "--data", "partworld:split=val", "--images", "16", "--out", str(out),
                 "--batch-size", "5", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["images"] == 16 and metrics["data"]["image_size"] == [64, 64]
    for key in ("location_instability", "part_interpretability", "colocation", "parts_covered", "p", "agreement",
                "accuracy", "reconstruction_error"):
        assert math.isfinite(metrics["explainer"][key]), key
    assert metrics["omitted"] == {} and len(metrics["parts"]["explainer"]) == 6
    from matplotlib.image import imsave

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):  # any size: folders are read at the checkpoint's 64 px
        imsave(folder / f"{i}.png", torch.rand(90, 120, 3).numpy())
    assert main(["evaluate", str(demo_checkpoint), "--data", str(folder), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 0
    plain = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert plain["data"]["image_size"] == [64, 64] and "part_interpretability" in plain["omitted"]
    assert math.isfinite(plain["explainer"]["colocation"]) and math.isfinite(plain["explainer"]["agreement"])


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("size", "trained on 64-px images"),
    ("custom", "custom performer module"),
    ("weights", "cannot rebuild the checkpoint's performer ('resnet18'"),
    ("wrong-zoo-file", "not a readable performer file"),
    ("images", "--images must be ≥ 1"),
])
def test_evaluate_bad_input_is_one_line(demo_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        case: str, message: str) -> None:
    checkpoint, data, extra = demo_checkpoint, "partworld:split=val,num_images=8", []
    if case == "size":
        data = "partworld:split=val,num_images=8,image_size=128"
    elif case == "images":
        data, extra = str(tmp_path), ["--images", "0"]
    else:
        state = load_checkpoint(demo_checkpoint)
        if case == "custom":
            state["extra"] = {}
        elif case == "weights":
            state["performer"] = {"model": "resnet18", "layer": "layer3", "target_layer": "layer3", "num_classes": 5,
                                  "weights": str(tmp_path / "gone.pt"), "head": "auto", "init_seed": 0}
        else:
            torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "state.pt")
            extra = ["--weights", str(tmp_path / "state.pt")]
        checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in state.items()
                                                                  if k not in ("format", "version")})
    assert main(["evaluate", str(checkpoint), "--data", data, "--out", str(tmp_path / "o"), "--no-progress", *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
