"""Learning-rate schedules of the shared base module (insertion_diffusion/models/base.py)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
from model_rows import mixed_rows
from torch.utils.data import DataLoader

from insertion_diffusion.models.base import lr_factor, parse_lr_schedule
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer


def test_parse_lr_schedule_accepts_the_documented_forms():
    assert parse_lr_schedule("constant") == ("constant", 0.0)
    assert parse_lr_schedule("cosine") == ("cosine", 0.0)
    assert parse_lr_schedule("wsd") == ("wsd", 0.2)
    assert parse_lr_schedule("wsd:0.25") == ("wsd", 0.25)


@pytest.mark.parametrize("bad", ["linear", "wsd:0", "wsd:1.5", "wsd:x", "cosine:0.1", ""])
def test_parse_lr_schedule_names_the_key_and_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"model\.lr_schedule=.*allowed values: constant, cosine, wsd"):
        parse_lr_schedule(bad)


def test_wsd_is_flat_then_decays_linearly_to_the_floor():
    warm, total, floor = 10, 110, 0.1
    f = [lr_factor(s, warm, total, "wsd", floor, 0.25) for s in range(total + 5)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    # the last 25 % of the 100 post-warm-up steps decay: steps 85..110
    assert all(v == 1.0 for v in f[10:86])
    assert f[85] == 1.0 and f[110] == pytest.approx(floor)
    assert f[97] == pytest.approx(1.0 - 0.9 * 12 / 25)
    assert all(a >= b for a, b in zip(f[85:], f[86:]))
    assert f[114] == pytest.approx(floor)  # past the end: stays at the floor


def test_cosine_and_constant_unchanged():
    assert lr_factor(50, 10, 110, "constant", 0.1) == 1.0
    assert lr_factor(10, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)


def _model(schedule: str) -> FlexMDM:
    cfg = TransformerConfig(num_layers=1, d_model=16, num_heads=2, d_cond=8, dropout=0.0)
    return FlexMDM(IntegerTokenizer(10), max_length=16, backbone=cfg, lr=1.0, warmup_steps=2, lr_schedule=schedule)


def test_model_rejects_a_bad_schedule_at_construction():
    with pytest.raises(ValueError, match=r"model\.lr_schedule='wsd:2'"):
        _model("wsd:2")


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_wsd_drives_the_optimiser_in_a_real_fit():
    """The learning rates a Trainer applies over max_steps = 10 follow lr_factor (warm-up 2, last half decays)."""
    model = _model("wsd:0.5")
    rec = _RecordLR()
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[rec], limit_val_batches=0)
    rows, _ = mixed_rows()
    trainer.fit(model, train_dataloaders=DataLoader([rows] * 10, batch_size=None))
    assert rec.lrs == pytest.approx([lr_factor(s, 2, 10, "wsd", 0.1, 0.5) for s in range(10)])
    assert rec.lrs[2:7] == [1.0] * 5 and rec.lrs[7] > rec.lrs[8] > rec.lrs[9] == pytest.approx(0.325)


def test_wsd_without_a_step_budget_is_refused():
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    rows, _ = mixed_rows()
    with pytest.raises(ValueError, match=r"model\.lr_schedule='wsd' needs a finite trainer\.max_steps"):
        trainer.fit(_model("wsd"), train_dataloaders=DataLoader([rows], batch_size=None))
