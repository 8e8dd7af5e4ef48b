"""benchmarks/eval_molecules.py end to end: a 2-step NCI run from train_molecules.py, then two sampler settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from insertion_diffusion.chem.diagnose import INVALID_REASONS

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_scores_two_settings_and_says_why_rows_are_invalid(tmp_path):
    out = tmp_path / "run"
    run([str(BENCH / "train_molecules.py"), "--source", "nci", "--train-size", "0", "--method", "flexmdm",
         "--max-steps", "2", "--layers", "1", "--width", "32", "--num-samples", "64", "--sampler-steps", "4",
         "--no-test", "--no-fcd", "--out", str(out)], tmp_path)  # fmt: skip
    text = run([str(BENCH / "eval_molecules.py"), "--run", str(out), "--num-samples", "64", "--no-fcd", "--threads", "1",
                "--settings", "steps=4", "steps=4,top_k=1,confidence=top_prob"], tmp_path)  # fmt: skip
    lines = [line for line in text.splitlines() if line.startswith("| steps=4")]
    assert len(lines) == 4, text  # one row per setting in each of the two tables
    metrics, reasons = lines[:2], lines[2:]
    for row, why in zip(metrics, reasons):
        validity = float(row.split("|")[2])
        fractions = [float(c) for c in why.strip("| ").split("|")[1:]]
        assert len(fractions) == len(INVALID_REASONS)
        # an untrained model writes mostly invalid strings; the reasons account for every one of them
        assert abs(sum(fractions) - (1 - validity)) < 1e-3, (row, why)


def test_probe_lengths_traces_the_expected_final_length(tmp_path):
    out = tmp_path / "run"
    run([str(BENCH / "train_molecules.py"), "--source", "nci", "--train-size", "0", "--method", "flexmdm",
         "--max-steps", "2", "--layers", "1", "--width", "32", "--num-samples", "16", "--sampler-steps", "4",
         "--no-test", "--no-fcd", "--out", str(out)], tmp_path)  # fmt: skip
    text = run([str(BENCH / "probe_lengths.py"), "--run", str(out), "--num-samples", "16", "--threads", "1",
                "--settings", "steps=8", "--every", "4"], tmp_path)  # fmt: skip
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 4, 6, 7]  # steps 0-2, every 4th, and the last two
    first = [float(c) for c in rows[0][1:]]
    assert first[0] == 0.0 and first[1] == 1.0  # t = 0, only EOS
    assert first[2] > 0 and abs(first[3] - (first[1] + first[2])) < 0.011
    (summary,) = [line for line in text.splitlines() if line.startswith("mean generated length")]
    generated, reference = (float(w) for w in summary.replace(";", " ").split() if w.replace(".", "").isdigit())
    assert reference > 0 and generated >= 0
