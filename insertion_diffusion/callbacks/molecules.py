"""Log generated molecules at evaluation time: a structure grid, length histograms and a CSV of scored samples."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from insertion_diffusion.chem import scoring
from insertion_diffusion.chem.convert import REPRESENTATIONS
from insertion_diffusion.chem.diagnose import diagnose
from insertion_diffusion.metrics.molecules import decode_rows

__all__ = ["CSV_COLUMNS", "MoleculeSampleLogger"]

CSV_COLUMNS = (
    "index", "text", "smiles", "smiles_genmol", "valid_strict", "invalid_reason", "valid_genmol", "qed", "sa", "length",
)
"""Columns of the samples CSV: dataset row index, the generated text (in the data's representation), the strict
canonical SMILES (empty if invalid), the GenMol-decoded canonical SMILES (empty if invalid), strict and GenMol
validity (1/0), QED and SA of the strict molecule (empty if invalid) and the generated length in tokens."""

STAGES = ("val", "test")


class MoleculeSampleLogger(Callback):
    """Generate molecules at the end of validation/test and log them.

    At the end of a qualifying validation (or every test) run, the callback walks the stage's dataloader, calls
    ``pl_module.generate(batch, batch_idx)`` (the same seeded sampling the metrics use) until it has
    ``num_samples`` rows, decodes them (strict and GenMol modes), scores them (QED, SA) and logs:

    * ``<stage>/molecules``: a grid image of the first ``grid_size`` strictly valid molecules, with QED and SA;
    * ``<stage>/length_generated`` and ``<stage>/length_data``: histograms of generated lengths and of the data's
      lengths (the DataModule's ``train_lengths`` if it has them, else the evaluated rows' reference lengths);
    * ``<log_dir>/samples/<stage>_step<global_step>.csv`` with :data:`CSV_COLUMNS` (rank 0 writes it).

    Images and histograms need a ``TensorBoardLogger``; with another logger or none they are skipped and only the
    CSV is written. Under DDP every rank generates about ``num_samples / world_size`` rows of its own shard; the
    rows are gathered with ``all_gather_object``, rows repeated by the sampler's padding are dropped by index.

    Args:
        every_n_validations: log every ``n``-th validation run (the ``n``-th, ``2n``-th, ...), counted over the
            whole fit whether validation is epoch- or step-based (``val_check_interval``); the count is saved in
            checkpoints, so a resumed run keeps the rhythm. Test runs are always logged. The sanity check is never
            logged and not counted.
        num_samples: molecules to generate per logged run.
        grid_size: molecules drawn in the grid (0: no image).
        stages: which of ``"val"`` and ``"test"`` to log.
        mols_per_row: grid columns.
        sub_image_size: pixel size of one molecule drawing.
        representation: the generated text's representation; default: the DataModule's ``representation``.
        write_csv: write the samples CSV.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 256,
        grid_size: int = 16,
        stages: Sequence[str] = STAGES,
        mols_per_row: int = 4,
        sub_image_size: int = 250,
        representation: str | None = None,
        write_csv: bool = True,
    ) -> None:
        super().__init__()
        if every_n_validations < 1:
            raise ValueError(f"MoleculeSampleLogger: every_n_validations must be >= 1, got {every_n_validations}")
        if num_samples < 1:
            raise ValueError(f"MoleculeSampleLogger: num_samples must be >= 1, got {num_samples}")
        if grid_size < 0 or mols_per_row < 1 or sub_image_size < 16:
            raise ValueError("MoleculeSampleLogger: grid_size >= 0, mols_per_row >= 1 and sub_image_size >= 16")
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"MoleculeSampleLogger: unknown stages {sorted(unknown)}; use any of {list(STAGES)}")
        if representation is not None and representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; use one of {list(REPRESENTATIONS)}")
        self.every_n_validations = every_n_validations
        self.validations_seen = 0
        self.num_samples = num_samples
        self.grid_size = grid_size
        self.stages = stages
        self.mols_per_row = mols_per_row
        self.sub_image_size = sub_image_size
        self.representation = representation
        self.write_csv = write_csv
        self.last_csv: str | None = None

    # --- hooks ----------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val" not in self.stages:
            return
        self.validations_seen += 1
        if self.validations_seen % self.every_n_validations:
            return
        self._run(trainer, pl_module, "val")

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's checkpoint state by class name unless told otherwise: two loggers with
        # different rhythms (say every validation for a small grid, every 10th for a large CSV) would then
        # overwrite each other's count. The settings that make an instance distinct go into its key.
        return self._generate_state_key(
            every_n_validations=self.every_n_validations, num_samples=self.num_samples, stages=self.stages
        )

    def state_dict(self) -> dict[str, Any]:
        return {"validations_seen": self.validations_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations_seen = int(state_dict.get("validations_seen", 0))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.stages:
            self._run(trainer, pl_module, "test")

    # --- work -----------------------------------------------------------------------------------------------
    def _dataloader(self, trainer: L.Trainer, stage: str) -> Iterable | None:
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            dm = trainer.datamodule
            make = getattr(dm, f"{stage}_dataloader", None) if dm is not None else None
            loaders = make() if make is not None else None
        return loaders

    def _representation(self, trainer: L.Trainer) -> str:
        rep = self.representation or getattr(trainer.datamodule, "representation", None)
        if rep is None:
            raise ValueError(
                "MoleculeSampleLogger: the DataModule has no `representation`; pass representation=... to the callback"
            )
        return rep

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> list[dict[str, Any]]:
        """This rank's share of rows: ``index``, generated ``ids`` and reference ``ref_len``."""
        loader = self._dataloader(trainer, stage)
        if loader is None:
            return []
        want = math.ceil(self.num_samples / max(1, trainer.world_size))
        rows: list[dict[str, Any]] = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                for batch_idx, batch in enumerate(loader):
                    batch = move_data_to_device(batch, pl_module.device)
                    _, generated, refs = pl_module.generate(batch, batch_idx)
                    index = batch.get("index") if isinstance(batch, dict) else None
                    index = index.tolist() if isinstance(index, torch.Tensor) else index
                    for j, (ids, ref) in enumerate(zip(generated, refs)):
                        rows.append({"index": None if index is None else int(index[j]), "ids": ids, "ref_len": len(ref)})
                    if len(rows) >= want:
                        break
        finally:
            pl_module.train(was_training)
        return rows[:want]

    def _score(self, rows: list[dict[str, Any]], tokenizer: Any, representation: str) -> list[dict[str, Any]]:
        texts, strict, genmol = decode_rows([r["ids"] for r in rows], tokenizer, representation)
        scores = scoring.score_smiles(strict, with_fingerprints=False)
        return [
            {
                "index": r["index"],
                "text": t,
                "smiles": s or "",
                "smiles_genmol": g or "",
                "valid_strict": int(s is not None),
                "invalid_reason": "" if s is not None else diagnose(t, representation),
                "valid_genmol": int(g is not None),
                "qed": float(q),
                "sa": float(a),
                "length": len(r["ids"]),
                "ref_len": r["ref_len"],
            }
            for r, t, s, g, q, a in zip(rows, texts, strict, genmol, scores.qed, scores.sa)
        ]

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        representation = self._representation(trainer)
        tokenizer = getattr(pl_module, "tokenizer", None) or getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("MoleculeSampleLogger: neither the model nor the DataModule has a `tokenizer`")
        records = self._score(self._generate(trainer, pl_module, stage), tokenizer, representation)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [rec for part in gathered for rec in part]
        # trainer.log_dir broadcasts from rank 0: every rank must ask for it.
        root = trainer.log_dir or trainer.default_root_dir
        if trainer.global_rank != 0:
            return
        records = sorted(_dedupe(records), key=_row_order)[: self.num_samples]
        step = trainer.global_step
        if self.write_csv:
            self.last_csv = self._write_csv(root, stage, step, records)
        writer = _tensorboard(trainer)
        if writer is None:
            return
        self._log_grid(writer, stage, step, records)
        gen_lengths = np.asarray([r["length"] for r in records], dtype=np.int64)
        data_lengths = getattr(trainer.datamodule, "train_lengths", None)
        if data_lengths is None:
            data_lengths = np.asarray([r["ref_len"] for r in records], dtype=np.int64)
        elif isinstance(data_lengths, torch.Tensor):
            data_lengths = data_lengths.detach().cpu().numpy()
        if gen_lengths.size:
            writer.add_histogram(f"{stage}/length_generated", gen_lengths, step)
        if np.asarray(data_lengths).size:
            writer.add_histogram(f"{stage}/length_data", np.asarray(data_lengths), step)

    def _write_csv(self, root: str, stage: str, step: int, records: list[dict[str, Any]]) -> str | None:
        path = os.path.join(root, "samples", f"{stage}_step{step}.csv")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as fh:
                out = csv.writer(fh)
                out.writerow(CSV_COLUMNS)
                for r in records:
                    out.writerow(
                        [
                            "" if r["index"] is None else r["index"],
                            r["text"],
                            r["smiles"],
                            r["smiles_genmol"],
                            r["valid_strict"],
                            r["invalid_reason"],
                            r["valid_genmol"],
                            _fmt(r["qed"]),
                            _fmt(r["sa"]),
                            r["length"],
                        ]
                    )
        except OSError as err:
            rank_zero_warn(f"MoleculeSampleLogger: could not write {path!r} ({err.strerror}); samples not saved")
            return None
        return path

    def _log_grid(self, writer: Any, stage: str, step: int, records: list[dict[str, Any]]) -> None:
        if not self.grid_size:
            return
        shown = [r for r in records if r["valid_strict"]][: self.grid_size]
        if not shown:
            writer.add_text(f"{stage}/molecules", "no strictly valid molecule among the samples", step)
            return
        try:
            from rdkit.Chem import Draw

            image = Draw.MolsToGridImage(
                [scoring.mol_from_smiles(r["smiles"]) for r in shown],
                molsPerRow=min(self.mols_per_row, len(shown)),
                subImgSize=(self.sub_image_size, self.sub_image_size),
                legends=[f"QED {r['qed']:.2f}  SA {r['sa']:.2f}" for r in shown],
            )
            array = np.asarray(image.convert("RGB"))
        except Exception as err:  # drawing needs Pillow / RDKit's Cairo backend
            rank_zero_warn(f"MoleculeSampleLogger: could not draw the molecule grid ({err}); image skipped")
            return
        writer.add_image(f"{stage}/molecules", array, step, dataformats="HWC")


def _fmt(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.4f}"


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop rows whose index was already seen (a DistributedSampler's padding); rows without index are kept."""
    seen: set[int] = set()
    out = []
    for r in records:
        if r["index"] is not None:
            if r["index"] in seen:
                continue
            seen.add(r["index"])
        out.append(r)
    return out


def _row_order(record: dict[str, Any]) -> tuple[bool, int]:
    return (record["index"] is None, record["index"] or 0)


def _tensorboard(trainer: L.Trainer) -> Any:
    """The SummaryWriter of the trainer's first TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
