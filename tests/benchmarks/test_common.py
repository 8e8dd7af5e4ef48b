"""The benchmarks' shared CSV curve writer, driven by a real (tiny) Lightning fit."""

from __future__ import annotations

import csv
import math
import os
import sys

import lightning.pytorch as L
from lightning.pytorch.demos.boring_classes import BoringModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from common import CurveWriter


class LoggingBoringModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val/loss", loss)
        return loss


def test_curve_writer_writes_one_row_per_validation_with_fixed_columns(tmp_path):
    path = tmp_path / "curve.csv"
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CurveWriter(str(path), ("val/loss", "val/never_logged"))])
    trainer.fit(LoggingBoringModel())
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    # The sanity check writes nothing; validations after steps 2 and 4 write one row each.
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == ["step", "seconds", "val_loss", "val_never_logged"]
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)
    assert all(math.isnan(float(r["val_never_logged"])) for r in rows)
