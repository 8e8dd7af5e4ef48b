"""Two "nodes" of one CPU process each, on this machine over loopback: ``scripts/torchrun_fit.sh`` (torchrun, gloo)
runs ``fit`` and then ``test`` on the checkpoint, launched twice with ``NODE_RANK`` 0 and 1.

Lightning sees torchrun's environment (TorchElastic cluster environment) with ``trainer.num_nodes 2`` and
``trainer.devices 1``. Slow (four Python processes import the stack twice): ``pytest -m slow``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "torchrun_fit.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_fit_then_test_on_cpu(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "ACCELERATOR": "cpu", "RUN_NAME": "two-nodes", "PYTHON": sys.executable}
    args = [
        str(ROOT / "configs" / "star" / "easy_flexmdm.yaml"),
        "--data.num_train", "64", "--data.num_val", "5", "--data.num_test", "7", "--data.batch_size", "8",
        "--data.eval_batch_size", "4", "--data.data_dir", str(tmp_path / "data"),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.sampler.steps", "4", "--model.sampler.val_steps", "4", "--model.backbone.num_layers", "1", "--model.backbone.d_model", "32",
        "--model.backbone.d_cond", "32",
    ]
    nodes = [
        subprocess.Popen(["bash", str(SCRIPT), *args], cwd=tmp_path, env={**env, "NODE_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = []
    for proc in nodes:
        try:
            out, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for p in nodes:
                p.kill()
            raise
        outputs.append(out)
    for rank, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {rank} failed:\n{out[-6000:]}"
    node0 = outputs[0]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in node0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in node0
    assert "test/exact_match" in node0  # rank 0 prints the (synced) test metrics
    log_dir = tmp_path / "runs" / "star-easy-flexmdm" / "two-nodes"
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] >= 2  # the config's ModelCheckpoint saves at validation (step 2)
    assert (log_dir / "config.yaml").is_file() and (log_dir / "config_test.yaml").is_file()
    lines = [ln for ln in node0.splitlines() if "MEMBER" in ln or "max_steps" in ln or "test/" in ln]
    print("\n" + "\n".join(lines))
