import re
import subprocess
import sys
from pathlib import Path

import fastexplain
from fastexplain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastexplain {fastexplain.__version__}" in out
    assert "torch" in out and "reference  available" in out
    assert re.search(r"automatic choice for CPU tensors: \w+", out)


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fastexplain", "--help"], capture_output=True, text=True,
                            check=True)
    assert "info" in result.stdout


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if "pytest" in line and not line.startswith("#")]
    test_command = next(c for c in commands if c.startswith("python3 -m venv"))
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()
