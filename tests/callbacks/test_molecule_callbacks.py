"""MoleculeSampleLogger on real (tiny) Lightning runs with a stub model whose ``generate`` returns fixed ids."""

from __future__ import annotations

import csv
import glob
import json
import os

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from insertion_diffusion.callbacks.molecules import CSV_COLUMNS, MoleculeSampleLogger
from insertion_diffusion.callbacks.predictions import JsonlPredictionWriter
from insertion_diffusion.chem.convert import split_smiles
from insertion_diffusion.chem.tokenizer import RegexTokenizer

# What the stub "generates" for dataset row i: TEXTS[i % len(TEXTS)].
TEXTS = ["CCO", "c1ccccc1", "CC(C", "CC(=O)Oc1ccccc1C(=O)O", "CCO.Cl", "O=C(O)c1ccccc1O", "C1CC"]
TOKENIZER = RegexTokenizer.from_corpus(split_smiles(t) for t in TEXTS)


class StubModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.tokenizer = TOKENIZER
        self.generate_calls = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch["index"].float()[:, None]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def predict_step(self, batch, batch_idx):
        _, generated, _ = self.generate(batch, batch_idx)
        return [{"prompt": "", "generated": TOKENIZER.decode(g)} for g in generated]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def generate(self, batch, batch_idx=0):
        self.generate_calls += 1
        rows = batch["index"].tolist()
        generated = [TOKENIZER.encode(TEXTS[i % len(TEXTS)]) for i in rows]
        refs = [TOKENIZER.encode("CCO")] * len(rows)
        return [[] for _ in rows], generated, refs


class StubData(L.LightningDataModule):
    representation = "smiles"

    def __init__(self, n_eval: int = 9, n_train: int = 8) -> None:
        super().__init__()
        self.n_train = n_train
        self.tokenizer = TOKENIZER
        self.train_lengths = torch.tensor([3, 4, 4, 5, 6, 6, 6, 9])
        self.n_eval = n_eval

    def _loader(self, n: int) -> DataLoader:
        return DataLoader([{"index": i} for i in range(n)], batch_size=4)

    def train_dataloader(self):
        return self._loader(self.n_train)

    def val_dataloader(self):
        return self._loader(self.n_eval)

    def test_dataloader(self):
        return self._loader(self.n_eval)

    def predict_dataloader(self):
        return self._loader(self.n_eval)


def trainer(tmp_path, logger, callback, **kwargs) -> L.Trainer:
    settings = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return L.Trainer(**{**settings, **kwargs})


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def test_tensorboard_image_histograms_and_csv(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version="v0")
    callback = MoleculeSampleLogger(every_n_validations=2, num_samples=6, grid_size=4, sub_image_size=100)
    model, data = StubModel(), StubData()
    t = trainer(tmp_path, logger, callback)
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data)

    # The sanity check is not counted and validation 1 (step 2) is skipped; validation 2 ends at global step 4.
    samples = sorted(os.listdir(os.path.join(logger.log_dir, "samples")))
    assert samples == ["test_step4.csv", "val_step4.csv"]
    rows = read_csv(os.path.join(logger.log_dir, "samples", "val_step4.csv"))
    assert [r["index"] for r in rows] == [str(i) for i in range(6)]
    assert [r["text"] for r in rows] == TEXTS[:6]
    assert [r["smiles"] for r in rows] == ["CCO", "c1ccccc1", "", "CC(=O)Oc1ccccc1C(=O)O", "CCO.Cl", "O=C(O)c1ccccc1O"]
    assert rows[4]["smiles_genmol"] == "CCO"
    assert [r["valid_strict"] for r in rows] == ["1", "1", "0", "1", "1", "1"]
    assert [r["invalid_reason"] for r in rows] == ["", "", "branch", "", "", ""]
    assert rows[2]["qed"] == "" and rows[3]["qed"] == "0.5501" and rows[3]["sa"] == "1.5800"
    assert [int(r["length"]) for r in rows] == [len(split_smiles(t)) for t in TEXTS[:6]]
    assert model.generate_calls == 2 + 2  # two batches of 4 rows per logged run (val, test)

    events = glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for stage in ("val", "test"):
        assert f"{stage}/molecules" in tags["images"]
        assert {f"{stage}/length_generated", f"{stage}/length_data"} <= set(tags["histograms"])
    image = acc.Images("val/molecules")[0]
    assert image.step == 4 and (image.width, image.height) == (400, 100)  # 4 valid molecules in one row
    data_hist = acc.Histograms("val/length_data")[0].histogram_value
    assert data_hist.num == 8 and data_hist.min == 3 and data_hist.max == 9
    gen_hist = acc.Histograms("val/length_generated")[0].histogram_value
    assert gen_hist.num == 6


def test_step_based_validations_are_counted_within_an_epoch(tmp_path):
    """Three validations inside one epoch (val_check_interval=2): every second one is logged, at step 4 only."""
    callback = MoleculeSampleLogger(every_n_validations=2, num_samples=2, grid_size=0, stages="val")
    t = trainer(tmp_path, CSVLogger(tmp_path, name="csv", version="v0"), callback, max_epochs=1,
                limit_train_batches=6, val_check_interval=2)
    t.fit(StubModel(), datamodule=StubData(n_train=24))
    assert sorted(os.listdir(os.path.dirname(callback.last_csv))) == ["val_step4.csv"]
    assert callback.state_dict() == {"validations_seen": 3}
    resumed = MoleculeSampleLogger(every_n_validations=2)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.validations_seen == 3  # the next validation (the 4th) is logged after a resume


def test_two_loggers_keep_their_own_counts_through_a_checkpoint(tmp_path):
    """Two instances in one Trainer are saved under distinct keys and each gets its own count back on resume."""
    every, rare = (MoleculeSampleLogger(every_n_validations=n, num_samples=2, grid_size=0, stages="val")
                   for n in (1, 3))
    assert every.state_key != rare.state_key
    t = trainer(tmp_path, CSVLogger(tmp_path, name="csv", version="v0"), every, max_epochs=1, limit_train_batches=6,
                val_check_interval=2, callbacks=[every, rare], enable_checkpointing=True)
    t.fit(StubModel(), datamodule=StubData(n_train=24))
    every.validations_seen, rare.validations_seen = 5, 7  # distinct values: a shared key would keep only one
    ckpt = os.path.join(tmp_path, "two.ckpt")
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {saved[every.state_key]["validations_seen"], saved[rare.state_key]["validations_seen"]} == {5, 7}
    again = [MoleculeSampleLogger(every_n_validations=n, num_samples=2, grid_size=0, stages="val") for n in (1, 3)]
    t2 = trainer(tmp_path, CSVLogger(tmp_path, name="csv", version="v1"), again[0], max_epochs=2, limit_train_batches=6,
                 val_check_interval=2, callbacks=list(again), enable_checkpointing=True, limit_val_batches=0)
    t2.fit(StubModel(), datamodule=StubData(n_train=24), ckpt_path=ckpt)
    assert [c.validations_seen for c in again] == [5, 7]


def test_other_logger_writes_only_the_csv(tmp_path):
    callback = MoleculeSampleLogger(num_samples=3, stages="val")
    t = trainer(tmp_path, CSVLogger(tmp_path, name="csv", version="v0"), callback, max_epochs=1)
    t.fit(StubModel(), datamodule=StubData())
    assert callback.last_csv is not None and callback.last_csv.endswith(os.path.join("samples", "val_step2.csv"))
    assert len(read_csv(callback.last_csv)) == 3
    t.test(StubModel(), datamodule=StubData())  # "test" not in stages: nothing more
    assert sorted(os.listdir(os.path.dirname(callback.last_csv))) == ["val_step2.csv"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown stages"):
        MoleculeSampleLogger(stages=("train",))
    with pytest.raises(ValueError, match="every_n_validations"):
        MoleculeSampleLogger(every_n_validations=0)
    with pytest.raises(ValueError, match="representation"):
        MoleculeSampleLogger(representation="inchi")


def test_two_ranks_gather_and_drop_padding(tmp_path):
    """ddp_spawn on 2 CPU processes: 9 test rows are dealt 5 + 5 (row 0 repeated); the CSV holds 9 unique rows."""
    # 5 rows a rank: sharded, rank 0 gets rows 0 2 4 6 8 and rank 1 rows 1 3 5 7 0 (padding): 9 unique rows.
    # (Unsharded loaders would give rows 0-4 twice.)
    callback = MoleculeSampleLogger(num_samples=10, stages="test", grid_size=0)
    t = L.Trainer(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="tb", version="ddp"),
        callbacks=[callback],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t.test(StubModel(), datamodule=StubData(n_eval=9))
    rows = read_csv(os.path.join(tmp_path, "tb", "ddp", "samples", "test_step0.csv"))
    assert [int(r["index"]) for r in rows] == list(range(9))
    assert [r["text"] for r in rows] == [TEXTS[i % len(TEXTS)] for i in range(9)]


def test_prediction_records_carry_smiles(tmp_path):
    out = tmp_path / "pred.jsonl"
    t = L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[JsonlPredictionWriter(str(out))],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    t.predict(StubModel(), datamodule=StubData(n_eval=7), return_predictions=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generated"] for r in records] == TEXTS
    assert [r["smiles"] for r in records] == [
        "CCO", "c1ccccc1", None, "CC(=O)Oc1ccccc1C(=O)O", "CCO.Cl", "O=C(O)c1ccccc1O", None,
    ]  # fmt: skip
    assert [r["smiles_genmol"] for r in records][4] == "CCO"
    assert all("provenance" in r for r in records)
