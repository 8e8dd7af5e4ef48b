"""The "bring your own data" example of docs/custom_data.md, run as a user would run it.

The module code and the YAML config are read from the docs page (first ```python and first ```yaml block), so
the page and this test cannot drift apart. The module lives only in ``tmp_path`` and reaches the CLI through
``PYTHONPATH``, like a user's own package.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from cli_helpers import instantiate
from cli_helpers import run_cli as shared_run_cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "custom_data.md"


def code_block(language: str) -> str:
    """The first fenced block of ``language`` in the docs page."""
    match = re.search(rf"^```{language}\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert match, f"{DOC} has no ```{language} block"
    return match.group(1)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """``my_task.py``, ``letters.yaml`` and a small ``letters.tsv`` written from the docs page."""
    tmp = tmp_path_factory.mktemp("custom")
    (tmp / "my_task.py").write_text(code_block("python"))
    (tmp / "letters.yaml").write_text(code_block("yaml"))
    # the docs' data step (`python my_task.py letters.tsv`), in-process and smaller: 200 lines suffice here
    spec = importlib.util.spec_from_file_location("_my_task_from_docs", tmp / "my_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_examples(str(tmp / "letters.tsv"), num_examples=200)
    return tmp


@pytest.fixture
def my_task_importable(task_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(task_dir))
    monkeypatch.chdir(task_dir)
    yield importlib.import_module("my_task")
    sys.modules.pop("my_task", None)


def run_cli(args: list[str], cwd: Path):
    """The CLI in a subprocess that can import the user's module from ``cwd``."""
    return shared_run_cli(args, cwd, PYTHONPATH=str(cwd))


def test_data_file_and_splits(task_dir, my_task_importable):
    lines = (task_dir / "letters.tsv").read_text().splitlines()
    assert len(lines) == 200
    prompt, target = lines[0].split("\t")
    assert target.split() == sorted(prompt.split())
    dm = my_task_importable.SortDataModule("letters.tsv", num_val=10, num_test=20)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"test": 20, "val": 10, "train": 170}
    row = dm.datasets["train"][0]
    assert row["input_ids"].shape == (dm.max_length,)
    assert sorted(dm.make_metrics("val/").keys()) == ["val/exact_match", "val/token_accuracy"]


def test_docs_yaml_instantiates(task_dir, my_task_importable, monkeypatch):
    cli = instantiate(monkeypatch, ["--config", "letters.yaml"])
    assert type(cli.datamodule).__name__ == "SortDataModule"
    assert type(cli.model).__name__ == "FlexMDM"
    assert cli.model.tokenizer == cli.datamodule.tokenizer


def test_fit_then_test_with_custom_datamodule(task_dir):
    tiny = [
        "--model.backbone.num_layers",
        "1",
        "--model.backbone.d_model",
        "32",
        "--model.backbone.d_cond",
        "32",
        "--model.sampler.steps",
        "4",
        "--model.sampler.val_steps",
        "4",
        "--data.num_val",
        "8",
        "--data.num_test",
        "8",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        "custom_runs",
    ]
    run_cli(
        [
            "fit",
            "--model",
            "FlexMDM",
            "--data.class_path",
            "my_task.SortDataModule",
            "--data.data_file",
            "letters.tsv",
            *tiny,
        ],
        cwd=task_dir,
    )
    log_dir = task_dir / "custom_runs" / "lightning_logs" / "version_0"
    ckpts = sorted((log_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts, f"no checkpoint under {log_dir}"
    config = task_dir / "fit_config.yaml"
    shutil.copyfile(log_dir / "config.yaml", config)
    proc = run_cli(["test", "--config", str(config), "--ckpt_path", str(ckpts[-1])], cwd=task_dir)
    assert "test/exact_match" in proc.stdout
    assert "test/token_accuracy" in proc.stdout
