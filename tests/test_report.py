"""The HTML report is self-contained and shows the table, targets, curves and galleries."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastexplain.report import overlay_heatmap_basic, render_summary_png, top_activating_galleries, write_report

METRICS = {
    "performer": {"location_instability": 0.20, "part_interpretability": 0.10, "accuracy": 0.9},
    "explainer": {"location_instability": 0.10, "part_interpretability": 0.12, "p": 0.8,
                  "reconstruction_error": 0.05, "agreement": 0.99},
}


def _galleries() -> list:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(10, 3, 32, 32, generator=gen)
    maps = torch.rand(10, 4, 8, 8, generator=gen)
    maps[7, 2] += 5.0
    galleries = top_activating_galleries("explainer", maps, images, [2, 3], per_filter=3, captions={2: "head"})
    galleries += top_activating_galleries("performer", maps, (images * 255).to(torch.uint8), [0], per_filter=3)
    return galleries


def test_report_is_self_contained(tmp_path: Path) -> None:
    galleries = _galleries()
    assert torch.equal(galleries[0].images[0], torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))[7])
    curves = {"loss": {"total": [3.0, 2.0, 1.5], "reconstruction": [1.0, 0.5, 0.4]}, "p": [0.5, 0.6, 0.7]}
    path = write_report(tmp_path, METRICS, galleries, curves, title="demo <test>", notes=["a note"])
    text = path.read_text()
    assert path.name == "report.html" and "demo &lt;test&gt;" in text
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing loaded from outside
    assert text.count("data:image/png;base64,") == 1 + len(galleries)
    assert "0.2" in text and "0.99" in text and "filter 2 — head" in text
    rows = re.findall(r"<td>(\w+_ratio|p|agreement)</td><td>[^<]*</td><td>[^<]*</td><td class='(pass|fail)'>", text)
    assert dict(rows) == {"location_instability_ratio": "pass", "part_interpretability_ratio": "fail",
                          "p": "pass", "agreement": "pass"}


def test_summary_png_and_overlay(tmp_path: Path) -> None:
    path = render_summary_png(tmp_path / "summary.png", METRICS, _galleries())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = torch.zeros(3, 16, 16)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    tile = overlay_heatmap_basic(image, heat)
    assert tile.shape == (16, 16, 3) and tile.dtype.name == "uint8"
    assert tile[0, 0].sum() > 0 and tile[15, 15].sum() <= tile[0, 0].sum()


def test_diversity_rows_parts_and_omissions(tmp_path: Path) -> None:
    metrics = {
        "performer": {"colocation": 0.12, "colocation_groups": 4, "group_sizes": [1, 3, 1, 1], "filters": 6,
                      "best_part_histogram": {"head": 2, "tail": 0, "legs": 4}},
        "explainer": {"colocation": 0.99, "colocation_groups": 1, "group_sizes": [6], "filters": 6,
                      "best_part_histogram": {"head": 0, "tail": 6, "legs": 0}, "p": 0.7},
        "omitted": {"location_instability": "landmark annotations (keypoints)"},
        "targets": [{"name": "location_instability_ratio", "value": float("nan"), "target": "<= 0.6", "passed": None}],
        "parts": {kind: [{"part": "head", "filter": None, "reason": "no filter has this as its part"},
                         {"part": "tail", "filter": 3, "group": 0, "group_size": 6, "instability": 0.05,
                          "hit_rate": 0.5}] for kind in ("explainer", "performer")},
    }
    text = write_report(tmp_path, metrics).read_text()
    assert "<td>3, 3×1</td><td>6</td>" in text  # group sizes, largest first, runs as n×s
    assert "<td>legs 4, head 2</td>" not in text and "<td>head 2, legs 4</td><td>tail 6</td>" in text
    assert "<td>Location instability</td><td>not measured</td>" in text and "needs landmark annotations" in text
    assert "<td class='not'>not measured</td>" in text and "class='fail'" not in text
    assert text.count("distinct filters for <b>1 of 2</b> parts") == 2 and "none: no filter has this as its part" in text
