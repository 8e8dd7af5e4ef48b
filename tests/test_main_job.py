"""``scripts/main_job.sh``, the README's main job, end to end on its default CPU config with a tiny model.

The config trains on two DDP processes (gloo); the script must then test the checkpoint that fit wrote, in one
process, and print the test exact match.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "main_job.sh"
DEFAULT_CONFIG = ROOT / "configs" / "star" / "cpu" / "easy_loflexmdm_early.yaml"


def test_main_job_default_config_is_the_cpu_recipe():
    text = SCRIPT.read_text(encoding="utf-8")
    assert f'config="{DEFAULT_CONFIG.relative_to(ROOT)}"' in text
    assert DEFAULT_CONFIG.is_file()


def test_main_job_fits_on_two_processes_then_tests_in_one(tmp_path):
    tiny = []
    for net in ("backbone", "order_backbone"):
        tiny += [f"--model.{net}.num_layers", "1", f"--model.{net}.d_model", "32", f"--model.{net}.d_cond", "32"]
    tiny += [
        "--data.num_train", "128", "--data.num_val", "8", "--data.num_test", "7",
        "--data.data_dir", str(tmp_path / "data"), "--model.sampler.steps", "4", "--model.sampler.val_steps", "4",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", str(SCRIPT), str(DEFAULT_CONFIG), *tiny], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    found = re.search(r"star test exact match: ([0-9.]+)\s+\(log dir: (\S+)\)", out)
    assert found, out[-3000:]
    assert 0.0 <= float(found.group(1)) <= 1.0
    log_dir = tmp_path / found.group(2)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert "MEMBER: 2/2" in out  # fit ran on two processes
    test_log = (log_dir / "test.log").read_text(encoding="utf-8")
    assert "test/exact_match" in test_log
    assert "Initializing distributed" not in test_log  # the test ran in one process
