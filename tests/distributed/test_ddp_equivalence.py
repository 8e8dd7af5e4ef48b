"""DDP gives the one-process result: 2 CPU processes (gloo, ``ddp_fork``) at batch B/2 against 1 process at B.

For every generative method in :mod:`insertion_diffusion.models`, one training step (learning rate 0, so the
weights stay put) must produce the same gradients (allclose 1e-6, after DDP's all-reduce) and the following
validation the same metrics: losses and NLL with per-row evaluation noise, and the task metrics of samples
generated in batches of several rows, which differ between the two layouts (sampling noise is keyed by each row's
``index``, not by its batch). The validation split has an odd number of rows, so the 2-process run's sampler pads
one row, which evaluation must not count.

``ddp_fork`` forks the test process (no re-import, unlike ``ddp`` which relaunches the command and ``ddp_spawn``
which re-imports everything): a run takes a few seconds.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

import insertion_diffusion.models as models
from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models.base import GenerativeModule
from insertion_diffusion.nn.transformer import TransformerConfig

GLOBAL_BATCH = 8
NUM_VAL = 7  # odd: the 2-process evaluation sampler pads one row
EVAL_BATCH = 3  # one process: rows {0,1,2} {3,4,5} {6}; two: {0,2,4} {6} and {1,3,5} {pad}


def method_classes() -> list[type[GenerativeModule]]:
    """The concrete methods exported by insertion_diffusion.models (those defining their own compute_loss)."""
    found = []
    for name in getattr(models, "__all__", dir(models)):
        cls = getattr(models, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, GenerativeModule)):
            continue
        if any("compute_loss" in vars(c) for c in cls.__mro__ if c is not GenerativeModule):
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def sampler_kwargs(cls: type) -> dict:
    """A few sampling steps for methods whose sampler has a ``steps`` setting."""
    param = inspect.signature(cls.__init__).parameters.get("sampler")
    if param is None:
        return {}
    hints = inspect.get_annotations(cls.__init__, eval_str=True)
    for arg in getattr(hints.get("sampler"), "__args__", ()):
        if inspect.isclass(arg) and arg is not type(None) and "steps" in inspect.signature(arg).parameters:
            return {"sampler": arg(steps=4)}
    return {}


class Record(L.Callback):
    """Rank 0 writes the first step's (all-reduced) gradients and the synced validation metrics."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.out / "grads.pt")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            (self.out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))


def run(cls: type, world: int, tmp: Path, data_dir: Path) -> tuple[dict, dict]:
    out = tmp / f"{cls.__name__}-{world}"
    out.mkdir()
    dm = StarGraphDataModule(
        preset="easy", data_dir=str(data_dir), num_train=32, num_val=NUM_VAL, num_test=4,
        batch_size=GLOBAL_BATCH // world, eval_batch_size=EVAL_BATCH,
    )
    L.seed_everything(0, verbose=False)
    backbone = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=32, dropout=0.0, absolute_positions=True)
    model = cls(dm.tokenizer, dm.max_length, backbone=backbone, lr=0.0, warmup_steps=1, num_logged_samples=0,
                **sampler_kwargs(cls))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp_fork" if world > 1 else "auto", max_steps=1,
        val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=[Record(out)],
    )
    trainer.fit(model, dm)
    return torch.load(out / "grads.pt"), json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("star-data")


@pytest.mark.parametrize("cls", method_classes(), ids=lambda c: c.__name__)
def test_two_processes_match_one(cls, tmp_path, data_dir):
    grads1, metrics1 = run(cls, 1, tmp_path, data_dir)
    grads2, metrics2 = run(cls, 2, tmp_path, data_dir)

    assert set(metrics1) == set(metrics2) and metrics1
    assert set(grads1) == set(grads2) and grads1
    differing = [k for k, v in metrics1.items() if not math.isclose(v, metrics2[k], rel_tol=1e-5, abs_tol=1e-6)]
    diff = max(float((grads1[n] - grads2[n]).abs().max()) for n in grads1)
    scale = max(float(g.abs().max()) for g in grads1.values())
    print(f"\n{cls.__name__}: max |grad(1 process) - grad(2 processes)| = {diff:.3e} (max |grad| {scale:.3e}); "
          f"{len(metrics1) - len(differing)}/{len(metrics1)} val metrics equal")
    if not cls.row_noise and (diff > 1e-6 or differing):
        pytest.xfail(
            f"{cls.__name__} draws its noise from torch's global generator (row_noise = False), so it depends on the "
            f"process layout (grad diff {diff:.2e}, differing metrics {differing}); "
            "see insertion_diffusion.process.rng for the per-row noise that makes it exact"
        )
    for key in differing:
        pytest.fail(f"{cls.__name__} {key}: 1 process {metrics1[key]}, 2 processes {metrics2[key]}")
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
