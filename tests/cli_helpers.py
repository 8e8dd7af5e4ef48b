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


def fit_test_predict(config: Path, run_name: str, method: str, small: list[str], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> list[dict]:
    """``fit`` a shipped star config on 64 tiny rows with ``small`` overrides, then ``test`` and ``predict`` from
    the run's own config and last checkpoint, in this process. Checks the checkpoint, the method in the saved
    config, the test metric and one prediction per test row; returns the prediction records."""
    import json

    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(tmp_path)
    common = ["--data.num_train", "64", "--data.num_val", "4", "--data.num_test", "6", "--data.data_dir",
              str(tmp_path / "data"), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.version", "v0"]
    cli_mod.main(["fit", "--config", str(config), *common, *small])
    run = tmp_path / "runs" / run_name / "v0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and method in (run / "config.yaml").read_text()
    cli_mod.main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
    assert "test/exact_match" in capsys.readouterr().out
    out = tmp_path / "preds.jsonl"
    cli_mod.main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                  "--predictions.output_path", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(r["provenance"]["method"] == method for r in records)
    return records
