"""Kill and resume: ``fit --ckpt_path last`` continues a killed run exactly where an uninterrupted run would be.

A tiny FlexMDM on star-easy (3 batches per epoch, so the run crosses epochs; dropout on, so torch's global generator
matters; validation in between) trains 8 steps uninterrupted; a second run is killed with SIGKILL when step 5 starts
(its step-4 checkpoint written), then resumed with ``fit --ckpt_path last``. Every step's loss (compared as exact
float bits) and the final weights, optimiser state and EMA (``torch.equal``) must be identical: the data order is a
function of (seed, epoch) with a resumable position, and the training noise a function of (seed, sample position).

The slow variant does the same for LoFlexMDM with an EMA of the weights, stopped by SIGTERM between two periodic
checkpoints, so that it resumes from the exception checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "distributed"
STEPS = 8


def cli(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "insertion_diffusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "insertion_diffusion", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_args(tmp: Path, config: str, version: str, record: Path, extra_callbacks: list[dict], model_args: list[str],
             every: int = 1, steps: int = STEPS) -> list[str]:
    # every key spelled out: jsonargparse merges list items with the base config's callbacks at the same index
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": None, "mode": "min", "filename": "step-{step}", "every_n_train_steps": every,
                       "save_last": True, "save_top_k": 0}},
        {"class_path": "recording.RecordSteps", "init_args": {"path": str(record)}},
        *extra_callbacks,
    ]
    cb_file = tmp / f"callbacks-{version}.yaml"
    cb_file.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [
        "fit", "--config", str(ROOT / "configs" / "star" / config), "--config", str(cb_file),
        "--data.num_train", "24", "--data.num_val", "4", "--data.num_test", "4", "--data.batch_size", "8",
        "--data.data_dir", str(tmp / "data"),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.accelerator", "cpu", "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"), "--trainer.logger.init_args.version", version,
        "--model.sampler.steps", "4", "--model.sampler.val_steps", "4", "--model.backbone.num_layers", "1", "--model.backbone.d_model", "32",
        "--model.backbone.d_cond", "32", "--model.backbone.dropout", "0.1", "--model.warmup_steps", "2",
        *model_args,
    ]


def read_losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert rec["step"] not in out, f"step {rec['step']} trained twice"
        out[rec["step"]] = rec["loss"]
    return out


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def kill_and_resume(tmp: Path, config: str, log_name: str, kill_step: int, sig: str, model_args: list[str],
                    extra_args: list[str] = (), every: int = 1, steps: int = STEPS) -> None:
    full_rec, cut_rec = tmp / "full.jsonl", tmp / "cut.jsonl"
    full = start([*run_args(tmp, config, "full", full_rec, [], model_args, every, steps), *extra_args], tmp)
    killer = {"class_path": "recording.SignalAtStep", "init_args": {"step": kill_step, "sig": sig}}
    # the star data cache is built by whichever run gets there first (writes are atomic)
    cut = cli([*run_args(tmp, config, "cut", cut_rec, [killer], model_args, every, steps), *extra_args], tmp, check=False)
    expected_rc = -9 if sig == "SIGKILL" else 143
    assert cut.returncode == expected_rc, f"killed run ended with {cut.returncode}:\n{cut.stderr[-4000:]}"
    cut_dir = tmp / "runs" / log_name / "cut" / "checkpoints"
    stopped_at = max(read_losses(cut_rec))
    if sig == "SIGTERM":
        assert (cut_dir / "on_exception.ckpt").is_file(), sorted(p.name for p in cut_dir.iterdir())
        assert "checkpoint saved to" in cut.stderr
    resumed = cli([*run_args(tmp, config, "cut", cut_rec, [], model_args, every, steps), *extra_args, "--ckpt_path", "last"],
                  tmp)
    assert "not resumable" not in resumed.stderr
    resumed_from = "on_exception.ckpt" if sig == "SIGTERM" else "last.ckpt"
    assert f"resuming from {cut_dir / resumed_from}" in resumed.stderr + resumed.stdout
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-5000:]

    a, b = read_losses(full_rec), read_losses(cut_rec)
    assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == sorted(a), (sorted(a), sorted(b))
    for step in a:
        assert a[step] == b[step], f"step {step}: uninterrupted {float.fromhex(a[step])}, resumed {float.fromhex(b[step])}"
    ck_a = torch.load(tmp / "runs" / log_name / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    ck_b = torch.load(cut_dir / "last.ckpt", weights_only=False)
    assert ck_a["global_step"] == ck_b["global_step"] == steps
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "current_model_state", "averaging_state"):
        if key in ck_a or key in ck_b:
            assert_same_state(ck_a[key], ck_b[key], key)
    assert not (cut_dir / "on_exception.ckpt").exists()  # a finished fit removes its exception checkpoint
    n = sum(v.numel() for v in ck_a["state_dict"].values())
    print(f"\n{config}: stopped by {sig} after step {stopped_at}, resumed from {resumed_from}; {steps} losses bit-identical "
          f"(last {float.fromhex(a[steps]):.6f}); final state_dict ({n} values) and optimiser state torch.equal")


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    kill_and_resume(tmp_path, "easy_flexmdm.yaml", "star-easy-flexmdm", kill_step=4, sig="SIGKILL", model_args=[])


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_exact_for_loflexmdm_with_ema(tmp_path):
    """Checkpoints every 3 steps; SIGTERM during step 5: the exception checkpoint (step 5) is newer than last.ckpt
    (step 3) and ``--ckpt_path last`` must pick it."""
    kill_and_resume(
        tmp_path, "easy_loflexmdm.yaml", "star-easy-loflexmdm", kill_step=4, sig="SIGTERM", every=3, steps=9,
        model_args=["--model.order_backbone.num_layers", "1", "--model.order_backbone.d_model", "32",
                    "--model.order_backbone.d_cond", "32"], extra_args=["--ema_decay", "0.9"],
    )
