"""README.md's test command is the one .ci/run runs (CI runs exactly what the README tells a new user)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    [command] = [line.strip() for line in readme.splitlines() if "-m pytest" in line and "venv" in line]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command {command!r}"
