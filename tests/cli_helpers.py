"""Helpers shared by the CLI-level tests (importable: tests/ is on sys.path for its top-level test files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import insertion_diffusion.cli as cli_mod


def run_cli(args: list[str], cwd: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``python -m insertion_diffusion ARGS`` in a subprocess; fail the test with its output if it fails."""
    env = {**os.environ, **env_extra}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "insertion_diffusion", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"insertion-diffusion {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def instantiate(monkeypatch: pytest.MonkeyPatch, args: list[str]):
    """Run ``main(args)`` with ``run=False``: parse + instantiate trainer, model and data; return the CLI."""
    captured = {}

    class _NoRunCLI(cli_mod.InsertionDiffusionCLI):
        def __init__(self, *a, **kw):
            kw["run"] = False
            super().__init__(*a, **kw)
            captured["cli"] = self

    monkeypatch.setattr(cli_mod, "InsertionDiffusionCLI", _NoRunCLI)
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])  # environment.md pitfall 7
    cli_mod.main(args)
    return captured["cli"]
