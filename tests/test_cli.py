"""End-to-end runs of the ``insertion-diffusion`` command on star-easy with a tiny model.

``fit`` -> ``test`` and ``predict`` from the saved ``config.yaml`` and ``last.ckpt`` run as subprocesses, the way a
user runs them; ``--predictions.output_path`` and ``--print_config`` run in-process (cheaper, same parser).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

import insertion_diffusion
from insertion_diffusion.cli import main

ROOT = Path(__file__).resolve().parents[1]
EASY = ROOT / "configs" / "star" / "easy_flexmdm.yaml"
NUM_TEST = 8
PROVENANCE_KEYS = {"method", "checkpoint", "sampler", "seed", "package_version"}


def tiny_args(tmp_path: Path) -> list[str]:
    return [
        "--data.num_train",
        "128",
        "--data.num_val",
        "8",
        "--data.num_test",
        str(NUM_TEST),
        "--data.data_dir",
        str(tmp_path / "data"),
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.logger.init_args.version",
        "run0",
        "--model.sampler.steps",
        "4",
        "--model.sampler.val_steps",
        "4",
        "--model.backbone.num_layers",
        "1",
        "--model.backbone.d_model",
        "32",
        "--model.backbone.d_cond",
        "32",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_predictions(records: list[dict], checkpoint: str) -> None:
    assert len(records) == NUM_TEST  # one object per test example
    for rec in records:
        assert {"prompt", "generated", "reference", "provenance"} <= set(rec)
        assert rec["prompt"] and rec["reference"]
        prov = rec["provenance"]
        assert PROVENANCE_KEYS <= set(prov)
        assert prov["method"] == "FlexMDM"
        assert prov["checkpoint"] == checkpoint
        assert prov["sampler"]["steps"] == 4
        assert prov["package_version"] == insertion_diffusion.__version__


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """One tiny ``fit`` shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("cli")
    run_cli(["fit", "--config", str(EASY), *tiny_args(tmp)], cwd=tmp)
    log_dir = tmp / "runs" / "star-easy-flexmdm" / "run0"
    saved = log_dir / "config.yaml"
    assert saved.is_file(), f"fit did not save {saved}"
    # Snapshot: a later test/predict run into the same log dir overwrites config.yaml with its own config.
    config = tmp / "fit_config.yaml"
    shutil.copyfile(saved, config)
    return {"tmp": tmp, "log_dir": log_dir, "config": config, "ckpt": log_dir / "checkpoints" / "last.ckpt"}


def test_fit_saves_config_and_checkpoint(fitted):
    assert fitted["ckpt"].is_file()
    text = fitted["config"].read_text()
    assert "max_steps: 6" in text and "class_path: insertion_diffusion.models.FlexMDM" in text


def test_test_then_predict_from_saved_config(fitted):
    tmp, log_dir, config, ckpt = fitted["tmp"], fitted["log_dir"], str(fitted["config"]), str(fitted["ckpt"])
    # Both re-use the fit's log dir (the saved config names version run0): config.yaml is overwritten, not refused.
    proc = run_cli(["test", "--config", config, "--ckpt_path", ckpt], cwd=tmp)
    assert "test/exact_match" in proc.stdout
    assert (log_dir / "config.yaml").is_file()
    run_cli(["predict", "--config", config, "--ckpt_path", ckpt], cwd=tmp)
    check_predictions(read_jsonl(log_dir / "predictions.jsonl"), ckpt)


def test_predictions_output_path(fitted, tmp_path, monkeypatch):
    out = tmp_path / "elsewhere" / "preds.jsonl"
    ckpt = str(fitted["ckpt"])
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    main(
        [
            "predict",
            "--config",
            str(fitted["config"]),
            "--ckpt_path",
            ckpt,
            "--predictions.output_path",
            str(out),
        ]
    )
    check_predictions(read_jsonl(out), ckpt)


def test_test_run_keeps_the_fit_config_usable(fitted, tmp_path, monkeypatch):
    """A test run logging into the fit's directory saves config_test.yaml and leaves config.yaml (the fit's,
    which later commands reuse) untouched, so predict --config <log_dir>/config.yaml still works."""
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    ckpt = str(fitted["ckpt"])
    saved = fitted["log_dir"] / "config.yaml"
    before = saved.read_text()
    main(["test", "--config", str(saved), "--ckpt_path", ckpt,
          "--trainer.logger.init_args.version", fitted["log_dir"].name])
    assert saved.read_text() == before
    assert (fitted["log_dir"] / "config_test.yaml").is_file()
    out = tmp_path / "preds.jsonl"
    main(["predict", "--config", str(saved), "--ckpt_path", ckpt, "--predictions.output_path", str(out)])
    assert out.is_file()


def test_ckpt_path_last_is_refused_outside_fit(fitted, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(fitted["config"]), "--ckpt_path", "last"])
    assert exc.value.code == 2
    assert "pass the checkpoint file" in capsys.readouterr().err


def test_help_exits_zero(tmp_path):
    exe = shutil.which("insertion-diffusion", path=str(Path(sys.executable).parent)) or shutil.which(
        "insertion-diffusion"
    )
    cmd = [exe] if exe else [sys.executable, "-m", "insertion_diffusion"]
    proc = subprocess.run([*cmd, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in proc.stdout


def test_print_config_with_short_class_name(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model", "FlexMDM", "--data", "StarGraphDataModule", "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: insertion_diffusion.models.FlexMDM" in out
    assert "class_path: insertion_diffusion.data.StarGraphDataModule" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.init_args.preset", "extreme"], "set data.preset to one of ['easy', 'hard', 'medium']"),
        (["--data.init_args.max_length", "20"], "raise data.max_length to >= 36"),
        (["--model.init_args.insertion_schedule", "sigmoid"], "allowed values: linear, cosine, poly:<exponent>"),
    ],
)
def test_bad_values_end_with_one_clear_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(EASY), "--data.init_args.data_dir", str(tmp_path / "d"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "insertion-diffusion: error:" in err and expected in err


def test_unwritable_data_dir_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(EASY), "--data.init_args.data_dir", str(tmp_path / "afile" / "sub"),
              "--trainer.max_steps", "1", "--trainer.logger", "false"])
    assert exc.value.code == 2
    assert "choose a writable data.data_dir" in capsys.readouterr().err


def test_sampler_settings_given_at_predict_time_win_over_the_checkpoint(fitted, tmp_path, monkeypatch):
    """Sampler settings are inference-time: --model.init_args.sampler.steps at predict must be used, not the
    value the checkpoint was trained with (LightningCLI re-applies checkpoint hparams over the command line)."""
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    out = tmp_path / "preds.jsonl"
    main(["predict", "--config", str(fitted["config"]), "--ckpt_path", str(fitted["ckpt"]),
          "--model.init_args.sampler.steps", "3", "--predictions.output_path", str(out)])
    assert {rec["provenance"]["sampler"]["steps"] for rec in read_jsonl(out)} == {3}


def test_truncated_checkpoint_is_a_clear_error(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(fitted["ckpt"].read_bytes()[:4096])
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(fitted["config"]), "--ckpt_path", str(bad)])
    assert exc.value.code == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err
    assert fitted["ckpt"].stat().st_size > 4096  # the real checkpoint is untouched


def test_checkpoint_of_another_method_is_a_clear_error(fitted, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    monkeypatch.chdir(fitted["tmp"])
    lo_config = EASY.parent / "easy_loflexmdm.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(lo_config), "--ckpt_path", str(fitted["ckpt"]),
              "--data.init_args.data_dir", str(fitted["tmp"] / "data")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "was trained with model FlexMDM, but the model is LoFlexMDM; use --model FlexMDM" in err


# --- distributed settings and resume inputs (docs/distributed.md) ---------------------------------------------


def _one_line_error(args: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("insertion-diffusion: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("accelerator", "devices", "expected"),
    [
        ("gpu", "4", "has no usable GPU"),
        ("cpu", "4096", "asks for 4096 CPU processes but this machine has"),
    ],
)
def test_unavailable_devices_are_one_clear_line(accelerator, devices, expected, tmp_path, monkeypatch, capsys):
    import torch

    if accelerator == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(["fit", "--config", str(EASY), "--data.init_args.data_dir", str(tmp_path / "d"),
                            "--trainer.accelerator", accelerator, "--trainer.devices", devices], monkeypatch, capsys)
    assert expected in line and ("--trainer.devices" in line or "--trainer.accelerator" in line)
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_global_batch_size_sets_gradient_accumulation(tmp_path, monkeypatch):
    from cli_helpers import instantiate

    cli = instantiate(monkeypatch, ["--config", str(EASY), "--data.data_dir", str(tmp_path), "--trainer.accelerator",
                                    "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size",
                                    "8", "--global_batch_size", "64"])
    assert cli.trainer.world_size == 2 and cli.trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--global_batch_size", "100"], "global_batch_size=100 is not a multiple of data.batch_size=8 x world size 1"),
        (["--global_batch_size", "64", "--trainer.accumulate_grad_batches", "2"],
         "trainer.accumulate_grad_batches=2 conflicts with global_batch_size=64"),
        (["--ema_decay", "1.5"], "ema_decay=1.5 must be in (0, 1)"),
    ],
)
def test_bad_batch_and_ema_settings_are_one_clear_line(extra, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(["fit", "--config", str(EASY), "--data.init_args.data_dir", str(tmp_path / "d"),
                            "--trainer.accelerator", "cpu", "--data.batch_size", "8", *extra], monkeypatch, capsys)
    assert expected in line


def test_checkpoint_with_another_vocabulary_is_a_clear_error(fitted, monkeypatch, capsys):
    monkeypatch.chdir(fitted["tmp"])
    line = _one_line_error(["test", "--config", str(fitted["config"]), "--data.init_args.preset", "hard",
                            "--data.init_args.data_dir", str(fitted["tmp"] / "data_hard"),
                            "--ckpt_path", str(fitted["ckpt"])], monkeypatch, capsys)
    assert "checkpoint vocabulary (24 ids) differs from the data's tokenizer (60 ids)" in line


def test_fit_refuses_truncated_and_foreign_checkpoints_and_overwrites_nothing(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(fitted["tmp"])
    ckpt_dir = fitted["log_dir"] / "checkpoints"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt_dir.iterdir()}
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(fitted["ckpt"].read_bytes()[:10_000])
    line = _one_line_error(["fit", "--config", str(fitted["config"]), "--ckpt_path", str(bad)], monkeypatch, capsys)
    assert "is not a readable checkpoint" in line
    line = _one_line_error(["fit", "--config", str(EASY.parent / "easy_loflexmdm.yaml"),
                            "--data.init_args.data_dir", str(fitted["tmp"] / "data"),
                            "--ckpt_path", str(fitted["ckpt"])], monkeypatch, capsys)
    assert "was trained with model FlexMDM, but the model is LoFlexMDM; use --model FlexMDM" in line
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt_dir.iterdir()} == before
