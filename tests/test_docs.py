"""The documentation site builds with ``mkdocs build --strict`` (broken links, anchors and nav entries fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs_command() -> list[str]:
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if exe:
        return [exe]
    pytest.importorskip("mkdocs")
    return [sys.executable, "-m", "mkdocs"]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    cmd = [
        *_mkdocs_command(),
        "build",
        "--strict",
        "--config-file",
        str(ROOT / "mkdocs.yml"),
        "-d",
        str(tmp_path / "site"),
    ]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "custom_data" / "index.html").is_file()


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in (
        "docs/index.md",
        "docs/installation.md",
        "docs/concepts.md",
        "docs/star_graphs.md",
        "docs/cli.md",
        "docs/custom_data.md",
        "docs/results.md",
        "scripts/main_job.sh",
    ):
        assert target in text
        assert (ROOT / target).is_file(), f"README names {target}, which does not exist"


def _readme_test_command() -> str:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("Set up a fresh machine and run the tests:")
    return next(line for line in lines[start:] if line.startswith("python3 -m venv"))


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command, which installs the docs extra (else the mkdocs test
    above skips), lints and runs pytest."""
    command = _readme_test_command()
    assert ".[dev,docs,molecules]" in command
    assert "ruff check ." in command and command.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    run_lines = [line for line in ci.splitlines() if line and not line.startswith("#")
                 and not line.startswith(("set ", "cd "))]
    assert run_lines == [command], f".ci/run runs {run_lines}, not the README's test command"
