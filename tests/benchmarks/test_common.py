"""The benchmarks' shared helpers: the CSV curve writer (driven by a real, tiny Lightning fit), the copy of a
FlexMDM generator into another model, and sampler settings given as ``key=value`` text."""

from __future__ import annotations

import csv
import math
import os
import signal
import sys

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from insertion_diffusion.models import FlexMDM, LoFlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.sampling import SamplerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import argparse
import json

from common import (
    GENERATOR_PARTS,
    CurveWriter,
    InvocationTimer,
    SaveLastOnTrainEnd,
    check_recipe_arguments,
    config_errors,
    fit_or_exit,
    init_generator,
    parse_setting,
    read_molecule_run,
    with_setting,
    write_json_atomic,
)


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


def _pair(width: int = 16):
    tok = IntegerTokenizer(10)
    cfg = TransformerConfig(num_layers=1, d_model=width, num_heads=2, d_cond=8)
    torch.manual_seed(0)
    flex = FlexMDM(tok, 16, backbone=cfg)
    torch.manual_seed(1)
    lo = LoFlexMDM(tok, 16, backbone=cfg)
    return flex, lo


def test_init_generator_copies_the_generator_and_leaves_the_order_network(tmp_path):
    flex, lo = _pair()
    path = tmp_path / "flex.ckpt"
    torch.save({"state_dict": flex.state_dict()}, path)
    order_before = {k: v.clone() for k, v in lo.state_dict().items() if k.split(".")[0] not in GENERATOR_PARTS}
    n = init_generator(lo, str(path))
    copied = {k: v for k, v in flex.state_dict().items() if k.split(".")[0] in GENERATOR_PARTS}
    assert n == len(copied) > 0
    assert all(torch.equal(lo.state_dict()[k], v) for k, v in copied.items())
    assert all(torch.equal(lo.state_dict()[k], v) for k, v in order_before.items())


def test_init_generator_of_another_size_names_the_checkpoint(tmp_path):
    flex, _ = _pair(width=16)
    _, lo = _pair(width=32)
    path = tmp_path / "flex.ckpt"
    torch.save({"state_dict": flex.state_dict()}, path)
    with pytest.raises(SystemExit, match="flex.ckpt: generator sizes differ"):
        init_generator(lo, str(path))


class _KeepWeights(L.Callback):
    """Records the training weights after every optimiser step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("save_inside_fit", [True, False])
def test_the_last_checkpoint_of_an_ema_run_keeps_the_training_weights(tmp_path, save_inside_fit):
    """Written by SaveLastOnTrainEnd (before the EMA callback), the checkpoint keeps the last training weights
    under current_model_state and the average under state_dict. Written after fit returns (the old way, kept here
    as the control), both keys hold the average, so a resumed run would continue from it."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    path = str(tmp_path / "last.ckpt")
    keep = _KeepWeights()
    callbacks = [keep] + ([SaveLastOnTrainEnd(path)] if save_inside_fit else []) + [EMAWeightAveraging(decay=0.5)]
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(BoringModel())
    if not save_inside_fit:
        trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    raw, average = ckpt["current_model_state"], ckpt["state_dict"]
    raw_is_training = all(torch.equal(raw[k], keep.weights[k]) for k in keep.weights)
    differs = any(not torch.equal(raw[k], average[k]) for k in average)
    assert (raw_is_training and differs) == save_inside_fit


class _SigtermAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_fit_or_exit_stops_on_sigterm_with_143_and_resumes_from_the_exception_checkpoint(tmp_path, capsys):
    """The training scripts' fit: SIGTERM during step 3 -> on_exception.ckpt at step 3 (last.ckpt is at step 2),
    exit code 143; the same call again resumes from the exception checkpoint and finishes."""
    from insertion_diffusion.callbacks.guards import ExceptionCheckpoint

    def trainer(extra):
        return L.Trainer(accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True,
                                                    save_top_k=0), ExceptionCheckpoint(dirpath=str(tmp_path)), *extra])

    with pytest.raises(SystemExit) as stop:
        fit_or_exit(trainer([_SigtermAtStep(2)]), BoringModel(), BoringDataModule())
    assert stop.value.code == 143
    exc = tmp_path / "on_exception.ckpt"
    assert torch.load(exc, weights_only=False)["global_step"] == 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2
    again = trainer([])
    fit_or_exit(again, BoringModel(), BoringDataModule())
    assert f"resuming from {exc}" in capsys.readouterr().out
    assert again.global_step == 5 and not exc.exists()


def test_a_resumed_curve_continues_the_time_axis_and_refuses_other_columns(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("step,seconds,val_loss\n100,50.0,0.5\n200,99.5,0.4\n")
    writer = CurveWriter(str(path), ("val/loss",))
    assert writer.offset == 99.5
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    trainer.fit(LoggingBoringModel())
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["100", "200", "2"]
    assert float(rows[-1]["seconds"]) >= 99.5
    with pytest.raises(SystemExit, match=r"curve.csv has columns \['step', 'seconds', 'val_loss'\]"):
        CurveWriter(str(path), ("val/exact_match",))


def test_init_generator_names_a_file_that_is_not_a_checkpoint(tmp_path):
    _, lo = _pair(width=16)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"--init-generator .*notes.txt: not a readable Lightning checkpoint"):
        init_generator(lo, str(bad))
    with pytest.raises(SystemExit, match="not a readable Lightning checkpoint"):
        init_generator(lo, str(tmp_path / "missing.ckpt"))


def test_recipe_arguments_refuse_zero_processes_and_an_uneven_batch():
    with pytest.raises(SystemExit, match="--devices 0 must be >= 1"):
        check_recipe_arguments(argparse.Namespace(devices=0, batch_size=64))
    with pytest.raises(SystemExit, match="--batch-size 63 must be divisible by --devices 2"):
        check_recipe_arguments(argparse.Namespace(devices=2, batch_size=63))
    check_recipe_arguments(argparse.Namespace(devices=2, batch_size=64))


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("train_star", "--method flexmdm --order-layers 3", "--order-layers applies to --method loflexmdm only, not --method flexmdm"),
        ("train_star", "--method loflexmdm --insertion-schedule poly:0.25", "--insertion-schedule applies to --method flexmdm only"),
        ("train_star", "--method mdlm --integrate-hazard", "--integrate-hazard applies to --method flexmdm or loflexmdm only"),
        ("train_star", "--method arm --init-generator x.ckpt", "--init-generator applies to --method flexmdm or loflexmdm"),
        ("train_star", "--method flexmdm --generator-states 1", "--generator-states applies to --method loflexmdm only"),
        ("train_star", "--method flexmdm --shape-a 0.25", "--shape-a applies to --method loflexmdm only"),
        ("train_star", "--method flexmdm --reg-frame absolute", "--reg-frame applies to --method loflexmdm only"),
        ("train_star", "--method mdlm --order-insert-weight 1", "--order-insert-weight applies to --method loflexmdm only"),
        ("train_molecules", "--method mdlm --order-lr 1e-4", "--order-lr applies to --method loflexmdm only, not --method mdlm"),
        ("train_molecules", "--method arm --insertion-schedule cosine", "--insertion-schedule applies to --method flexmdm only"),
        ("train_molecules", "--method flexmdm --shape-a 0.25", "--shape-a applies to --method loflexmdm only"),
    ],
)
def test_training_scripts_refuse_a_flag_their_method_would_ignore(script, argv, message):
    module = __import__(script)
    ap = module.build_parser()
    args = ap.parse_args(argv.split())
    with pytest.raises(SystemExit, match=f"^{message}.*: drop --"):
        check_recipe_arguments(args, ap, module.METHOD_FLAGS)


@pytest.mark.parametrize("method", ["flexmdm", "loflexmdm", "arm", "mdlm"])
def test_training_scripts_accept_defaults_and_shared_sampler_flags_for_every_method(method):
    import train_molecules
    import train_star

    ap = train_star.build_parser()
    check_recipe_arguments(ap.parse_args(f"--method {method} --val-steps 32 --test-steps 128".split()), ap,
                           train_star.METHOD_FLAGS)
    ap = train_molecules.build_parser()
    check_recipe_arguments(ap.parse_args(f"--method {method} --sampler-steps 64".split()), ap, train_molecules.METHOD_FLAGS)


def test_config_errors_print_one_line_and_exit_2(capsys):
    ap = argparse.ArgumentParser(prog="train_x.py")
    with pytest.raises(SystemExit) as exc, config_errors(ap):
        raise ValueError("model.lr must be > 0, got -1")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "train_x.py: error: model.lr must be > 0, got -1\n"
    with pytest.raises(KeyError), config_errors(ap):  # only configuration errors are reworded
        raise KeyError("x")


def test_train_molecules_reports_a_bad_model_setting_in_one_line(tmp_path, monkeypatch, capsys):
    """The model refuses the value while the script builds it; the user sees the key and the rule, no traceback."""
    import train_molecules

    monkeypatch.chdir(tmp_path)  # the script caches the cleaned corpus under ./data_cache
    monkeypatch.setattr(sys, "argv", ["train_molecules.py", "--method", "loflexmdm", "--source", "nci", "--num-samples",
                                      "50", "--shape-a", "-1", "--max-steps", "1", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        train_molecules.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "train_molecules.py: error: model.a must be > 0, got -1.0"
    assert not any(line.startswith("Traceback") for line in err)


def test_train_molecules_refuses_a_bad_time_sampling_before_loading_data(tmp_path, monkeypatch, capsys):
    import train_molecules

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_molecules.py", "--method", "flexmdm", "--source", "nci",
                                      "--time-sampling", "early:0.25:2", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        train_molecules.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train_molecules.py: error: argument --time-sampling: --time-sampling='early:0.25:2': the share of "
        "early:<p>:<share> (the fraction of rows drawn early) must be a number in (0, 1), e.g. early:0.25:0.125")
    assert sorted(os.listdir(tmp_path)) == []  # no corpus cache, no run directory


def test_json_is_written_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"old": 1}')
    write_json_atomic(str(path), {"new": [1, 2]})
    assert json.loads(path.read_text()) == {"new": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_settings_text_overrides_a_sampler_config_with_typed_values():
    assert parse_setting("steps=256,integrate_hazard=True,confidence=top_prob,top_p=0.5") == {
        "steps": 256, "integrate_hazard": True, "confidence": "top_prob", "top_p": 0.5}
    base = SamplerConfig(steps=32)
    cfg = with_setting(base, "top_k=1,confidence=top_prob")
    assert (cfg.steps, cfg.top_k, cfg.confidence, base.top_k) == (32, 1, "top_prob", None)
    assert with_setting(base, "") == base


@pytest.mark.parametrize(("text", "message"), [
    ("stepz=16", r"--sampler-settings 'stepz=16': unknown key\(s\) \['stepz'\]; allowed: \[.*'steps'"),
    ("confidence=fastest", r"--sampler-settings 'confidence=fastest': sampler.confidence='fastest'; allowed values"),
    ("steps=0", r"--sampler-settings 'steps=0': sampler.steps must be >= 1"),
])
def test_a_bad_setting_exits_with_one_line_naming_the_option(text, message):
    with pytest.raises(SystemExit, match=message):
        with_setting(SamplerConfig(), text, "--sampler-settings")


def test_minutes_cap_restarts_its_clock_on_resume(tmp_path):
    """A continuation from a checkpoint of a long run must get its own --minutes: Lightning's max_time adds the
    checkpoint's elapsed time and stops at once (the control)."""
    def trainer(steps: int, timer: dict) -> L.Trainer:
        return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), *timer.get("cb", [])],
                         max_time=timer.get("max_time"), limit_val_batches=0)

    first = trainer(2, {"cb": [InvocationTimer(1.0)]})
    first.fit(BoringModel(), BoringDataModule())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    elapsed = {"train": 1e6, "sanity_check": 0.0, "validate": 0.0, "test": 0.0, "predict": 0.0}  # an 11-day run
    for key in ("Timer", "InvocationTimer"):  # what max_time and the scripts' timer save under
        ckpt["callbacks"][key] = {"time_elapsed": dict(elapsed)}
    torch.save(ckpt, tmp_path / "long.ckpt")

    resumed = trainer(4, {"cb": [InvocationTimer(1.0)]})
    resumed.fit(BoringModel(), BoringDataModule(), ckpt_path=str(tmp_path / "long.ckpt"))
    assert resumed.global_step == 4
    control = trainer(4, {"max_time": {"minutes": 1}})
    control.fit(BoringModel(), BoringDataModule(), ckpt_path=str(tmp_path / "long.ckpt"))
    assert control.global_step == 2


def test_read_molecule_run_refuses_a_directory_without_run_files(tmp_path):
    with pytest.raises(SystemExit, match="no args.json or result.json there"):
        read_molecule_run(str(tmp_path))
    (tmp_path / "result.json").write_text('{"args": {"method": "flexmdm"}}')
    assert read_molecule_run(str(tmp_path)) == {"method": "flexmdm"}
    (tmp_path / "args.json").write_text('{"method": "loflexmdm"}')
    assert read_molecule_run(str(tmp_path)) == {"method": "loflexmdm"}  # args.json first


@pytest.mark.parametrize("script", ["train_star", "train_molecules"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--time-sampling early:2", "argument --time-sampling: --time-sampling='early:2': the exponent of early:<p> must be"),
        ("--time-sampling early:0.25:1.5", "--time-sampling='early:0.25:1.5': the share of early:<p>:<share>"),
        ("--time-sampling late", "--time-sampling='late'; allowed values: uniform"),
        ("--insertion-schedule poly:x", "argument --insertion-schedule: --insertion-schedule="),
        ("--lr-schedule wsd:2", "argument --lr-schedule: --lr-schedule='wsd:2'; allowed values: constant"),
    ],
)
def test_training_scripts_refuse_a_bad_recipe_setting_while_reading_the_command_line(script, argv, message, capsys):
    # Refused by argparse itself, so before the DataModule loads a corpus or a model is built (the scripts call
    # build_parser().parse_args() first thing); the message is the package's own, naming the flag.
    ap = __import__(script).build_parser()
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(argv.split())
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1]  # argparse's usage lines, then the one error line
    assert "Traceback" not in err


@pytest.mark.parametrize("script", ["train_star", "train_molecules"])
def test_training_scripts_accept_every_documented_recipe_form(script):
    ap = __import__(script).build_parser()
    args = ap.parse_args(["--time-sampling", "early:0.25:0.125", "--insertion-schedule", "poly:0.25", "--lr-schedule", "wsd:0.5"])
    assert (args.time_sampling, args.insertion_schedule, args.lr_schedule) == ("early:0.25:0.125", "poly:0.25", "wsd:0.5")
    assert ap.parse_args([]).time_sampling == "uniform"
