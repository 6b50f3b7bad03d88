"""CI runs the real `fastexplain demo --quick` (issue 7): the command a new user runs first must work."""
import json
import subprocess
import sys
from pathlib import Path


def test_fastexplain_demo_quick_writes_report_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "fastexplain", "demo", "--quick", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("location_instability", "part_interpretability"):
        assert metrics["performer"][key] >= 0 and metrics["explainer"][key] >= 0
    for key in ("p", "reconstruction_error", "agreement"):
        assert key in metrics["explainer"]
    assert 0 < metrics["explainer"]["p"] < 1 and 0 <= metrics["explainer"]["agreement"] <= 1
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html
    assert (out / "summary.png").stat().st_size > 1000
