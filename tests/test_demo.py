"""End-to-end demo on a tiny setting: files written, metrics shaped as issue 7 asks, caches reused."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastexplain.cli import main
from fastexplain.demo import DemoSettings, run_demo

TINY = DemoSettings(performer_train_images=48, performer_test_images=16, performer_epochs=1, explainer_images=32,
                    explainer_epochs=1, explainer_refine_epochs=1, eval_images=24, gallery_filters=2,
                    gallery_images=2)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path: Path) -> None:
    metrics = run_demo(tmp_path, quick=True, progress=False, settings=TINY)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("location_instability", "part_interpretability"):
        assert math.isfinite(saved["performer"][key]) and math.isfinite(saved["explainer"][key])
    for key in ("p", "reconstruction_error", "agreement"):
        assert math.isfinite(saved["explainer"][key])
    assert 0 < saved["explainer"]["p"] < 1 and 0 <= saved["explainer"]["agreement"] <= 1
    assert saved["performer"]["centers_method"] == "receptive_field"
    assert [row["name"] for row in saved["targets"]] == [row["name"] for row in metrics["targets"]]
    for key in ("colocation", "colocation_groups", "parts_covered", "accuracy"):
        assert key in saved["performer"] and key in saved["explainer"]
    assert [row["name"] for row in saved["targets"]][:5] == ["location_instability_ratio", "part_interpretability_ratio",
                                                              "colocation_ratio", "colocation_group_fraction",
                                                              "parts_covered"]
    html = (tmp_path / "report.html").read_text()
    shown = sum(choice["filter"] is not None for kind in ("explainer", "performer") for choice in saved["parts"][kind])
    assert html.count("data:image/png;base64,") == 1 + shown and "Per-part galleries" in html
    assert (tmp_path / "cache" / "quick" / "seed0" / "explainer" / "checkpoint.pt").is_file()
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    again = run_demo(tmp_path, quick=True, progress=False, settings=TINY)  # both models come from the cache
    assert again["explainer"]["reconstruction_error"] == pytest.approx(metrics["explainer"]["reconstruction_error"])


def test_demo_cli_reports_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["demo", "--out", str(blocker), "--quick", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a directory" in error


@pytest.mark.slow
def test_demo_seed_keys_the_cache(tmp_path: Path) -> None:
    metrics = run_demo(tmp_path, quick=True, progress=False, settings=TINY, seed=1)
    assert metrics["settings"]["seed"] == 1 and (tmp_path / "cache" / "quick" / "seed1" / "performer.pt").is_file()
    assert not (tmp_path / "cache" / "quick" / "seed0").exists()


def test_cli_parses_demo_seed_and_evaluate_options() -> None:
    from fastexplain.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--seed", "2"]).seed == 2 and parser.parse_args(["demo"]).seed is None
    args = parser.parse_args(["evaluate", "ck.pt", "--data", "partworld", "--images", "5", "--batch-size", "7"])
    assert (args.checkpoint, args.data, args.images, args.batch_size, args.weights, args.out) == \
        ("ck.pt", "partworld", 5, 7, None, "fastexplain-evaluation")
