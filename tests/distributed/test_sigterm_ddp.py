"""SIGTERM or SIGINT to every process of a 2-process DDP fit (gloo, CPU), as ``scancel`` or a terminal's Ctrl-C
sends it.

Every rank must stop on the same step, the command must write ``on_exception.ckpt`` and exit with 143 (SIGTERM) or
130 (SIGINT), and ``fit --ckpt_path last`` must continue from that checkpoint under DDP. With Lightning 2.6's own
handling (a broadcast inside the SIGTERM handler; ``KeyboardInterrupt`` wherever each rank is) both runs hung; the
test then fails on its timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent


def fit_args(tmp: Path, record: Path, max_steps: int) -> list[str]:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": None, "mode": "min", "every_n_train_steps": 1000, "save_last": True, "save_top_k": 0}},
        {"class_path": "recording.RecordSteps", "init_args": {"path": str(record)}},
    ]
    cb_file = tmp / "callbacks.yaml"
    cb_file.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [
        "fit", "--config", str(ROOT / "configs" / "star" / "easy_flexmdm.yaml"),
        "--config", str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), "--config", str(cb_file),
        "--data.num_train", "64", "--data.num_val", "4", "--data.num_test", "4", "--data.batch_size", "8",
        "--data.data_dir", str(tmp / "data"), "--trainer.max_steps", str(max_steps),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.version", "v0", "--model.backbone.num_layers", "1",
        "--model.backbone.d_model", "32", "--model.backbone.d_cond", "32",
    ]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    # a session of its own: the test signals the whole process group, as a job scheduler does
    return subprocess.Popen([sys.executable, "-m", "insertion_diffusion", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the DDP fit did not end within {timeout:.0f} s of SIGTERM:\n{err[-3000:]}") from None


def steps_done(record: Path) -> list[int]:
    if not record.exists():
        return []
    return [json.loads(line)["step"] for line in record.read_text().splitlines()]


@pytest.mark.parametrize(("sig", "code", "message"), [("SIGTERM", 143, "stopped by SIGTERM"),
                                                     ("SIGINT", 130, "stopped by Ctrl-C (SIGINT)")])
def test_a_signal_to_every_rank_stops_ddp_fit_with_a_checkpoint_and_resumes(tmp_path, sig, code, message):
    """SIGTERM as a scheduler sends it; SIGINT as a terminal's Ctrl-C does (to the whole foreground group)."""
    record = tmp_path / "steps.jsonl"
    proc = start(fit_args(tmp_path, record, max_steps=100_000), tmp_path)
    deadline = time.monotonic() + 240
    while len(steps_done(record)) < 5:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the DDP fit made no 5 steps in 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, sig))
    out, err = finish(proc, timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert message in err
    ckpt_dir = tmp_path / "runs" / "star-easy-flexmdm" / "v0" / "checkpoints"
    exc = ckpt_dir / "on_exception.ckpt"
    assert exc.is_file(), sorted(p.name for p in ckpt_dir.iterdir())
    stopped = torch.load(exc, map_location="cpu", weights_only=False)["global_step"]
    # rank 0 records every step it finished; the checkpoint holds the last of them, so no step was lost
    assert stopped == max(steps_done(record)) >= 5

    resumed = start([*fit_args(tmp_path, record, max_steps=stopped + 2), "--ckpt_path", "last"], tmp_path)
    out, err = finish(resumed, timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from {exc}" in out + err
    done = steps_done(record)
    assert done[-2:] == [stopped + 1, stopped + 2] and len(done) == len(set(done))
