"""Shared helpers for benchmarks: timing, FLOP counting, a measured matmul peak, a CSV training curve, sampler
settings given as ``key=value`` text."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.flop_counter import FlopCounterMode

from insertion_diffusion.callbacks.guards import newest_resume_checkpoint, stop_report
from insertion_diffusion.data.corpus import atomic_write
from insertion_diffusion.models.base import parse_lr_schedule
from insertion_diffusion.process.insertion import parse_time_sampling
from insertion_diffusion.schedules import make_schedule


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs torch dispatches while running ``fn()`` once (matmuls, attention, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """Dense matmul throughput (FLOP/s) measured now, on this machine, with the current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    sec = median_seconds(lambda: a @ b, repeats, warmup=3)
    return 2.0 * n**3 / sec


def write_json_atomic(path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` with the package's atomic write (a run killed mid-write leaves
    the previous file, never half a file)."""
    atomic_write(Path(path), json.dumps(obj, indent=2).encode())


class CurveWriter(Callback):
    """Append one CSV row per validation on rank 0: step, wall seconds, and ``keys``.

    ``keys`` are ``trainer.callback_metrics`` names (e.g. ``"val/exact_match"``); a key not logged yet is written as
    NaN, so every row has the same columns. The column name drops the ``/`` (``val_exact_match``).

    A resumed run appends to the same file: its seconds continue from the file's last row (so the time axis never
    runs backwards), and a file whose header has other columns is refused rather than mixed.
    """

    def __init__(self, path: str, keys: Sequence[str]) -> None:
        self.path = path
        self.keys = list(keys)
        self.t0 = time.time()
        self.offset = 0.0
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            expected = ["step", "seconds"] + [k.replace("/", "_") for k in self.keys]
            if rows[0] != expected:
                raise SystemExit(f"{path} has columns {rows[0]}, not {expected}; move it aside or use another --out")
            if len(rows) > 1:
                self.offset = float(rows[-1][1])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"step": trainer.global_step, "seconds": round(self.offset + time.time() - self.t0, 1)}
        row.update({k.replace("/", "_"): metrics.get(k, float("nan")) for k in self.keys})
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


GENERATOR_PARTS = ("net", "token_head", "gap_head")


class SaveLastOnTrainEnd(Callback):
    """Write ``path`` when training ends, before the callbacks listed after this one run their ``on_train_end``.

    Put it before ``EMAWeightAveraging``: that callback copies the averaged weights into the model at the end of
    training, so a checkpoint written after ``fit`` returns holds the average in both places and a resumed run
    would continue from the average. Written here, the checkpoint keeps the raw weights under
    ``current_model_state`` (what a resume continues from) and the average under ``state_dict`` (what is
    evaluated), as the periodic checkpoints do.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class InvocationTimer(Timer):
    """The training scripts' ``--minutes``: a cap on the training time of this invocation.

    Lightning's own ``max_time`` restores the elapsed time of the runs before it from the checkpoint, so a run
    resumed or continued (to more steps) from a checkpoint of a 100-minute run with ``--minutes 125`` stopped after
    25 minutes. Here the clock starts at zero in every invocation.
    """

    def __init__(self, minutes: float) -> None:
        super().__init__(duration=timedelta(minutes=minutes), interval="step", verbose=True)

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # do not add the checkpoint's elapsed time


def fit_or_exit(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """``trainer.fit``, resuming from the newest of the run's ``last.ckpt`` and ``on_exception.ckpt`` (an
    ``ExceptionCheckpoint`` among the callbacks writes the latter when SIGTERM stops the run, also under DDP).
    A run stopped by SIGTERM exits with code 143 (130 after Ctrl-C), as the ``insertion-diffusion`` command does."""
    resume = newest_resume_checkpoint(trainer)
    if resume is not None and trainer.is_global_zero:
        print(f"resuming from {resume}", flush=True)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        name, code = stop_report()
        if trainer.is_global_zero:
            print(f"stopped by {name} at step {trainer.global_step}; run the same command to resume", file=sys.stderr)
        raise SystemExit(code) from None


def init_generator(model: torch.nn.Module, checkpoint: str) -> int:
    """Copy a FlexMDM checkpoint's generator (transformer, token head, gap head) into ``model`` (a FlexMDM or a
    LoFlexMDM of the same generator size); everything else, e.g. an order network, keeps its fresh initialisation.

    With ``a = 1`` and ``b = 1`` the two parameterisations coincide, so a LoFlexMDM starts as the FlexMDM it was
    copied from. Returns the number of tensors copied; raises ``SystemExit`` naming the mismatching keys.
    """
    try:
        src = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise SystemExit(f"--init-generator {checkpoint}: not a readable Lightning checkpoint "
                         f"({type(err).__name__}: {err}); pass a FlexMDM run's checkpoints/last.ckpt") from None
    keep = {k: v for k, v in src.items() if k.split(".")[0] in GENERATOR_PARTS}
    try:
        missing, unexpected = model.load_state_dict(keep, strict=False)
    except RuntimeError as err:  # same keys, other shapes
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err)
        raise SystemExit(f"--init-generator {checkpoint}: generator sizes differ: {detail}") from None
    bad = [k for k in missing if k.split(".")[0] in GENERATOR_PARTS] + list(unexpected)
    if bad:
        raise SystemExit(f"--init-generator {checkpoint}: generator weights do not match: {bad[:5]}")
    return len(keep)


def checked_by(parse: Callable[[str, str], object], flag: str) -> Callable[[str], str]:
    """An argparse ``type`` that runs the package's own parser of a setting on the flag's text and keeps the text:
    a bad value is refused while the command line is read (``argument <flag>: <the parser's message>``), before
    any data is loaded or a model is built, with the same wording and allowed values the config key has."""
    def check(text: str) -> str:
        try:
            parse(text, flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return check


def add_recipe_arguments(ap: argparse.ArgumentParser) -> None:
    """The training-recipe options the star and molecule training scripts share (same names, defaults and help)."""
    ap.add_argument("--conv-kernel", type=int, default=0,
                    help="depthwise convolution width before every block (0: none; causal for ARM)")
    ap.add_argument("--lr-schedule", default="constant", type=checked_by(parse_lr_schedule, "--lr-schedule"),
                    help="constant | cosine | wsd[:fraction] (after warm-up; the decaying ones need --max-steps)")
    ap.add_argument("--insertion-schedule", default="linear", type=checked_by(make_schedule, "--insertion-schedule"),
                    help="FlexMDM insertion-time CDF: linear | cosine | poly:<p> (p < 1 inserts early)")
    ap.add_argument("--integrate-hazard", action="store_true",
                    help="sampler: exact per-step hazard integrals (needed by early-insertion schedules, poly:<p<1>)")
    ap.add_argument("--time-sampling", default="uniform", type=checked_by(parse_time_sampling, "--time-sampling"),
                    help="FlexMDM/LoFlexMDM training times: uniform | early:<p>[:<share>] (half the rows, or that share, at "
                         "u^(1/p), importance-weighted; shows the nearly empty states that early insertion, poly:<p> or --shape-a p, starts from)")
    ap.add_argument("--order-lr", type=float, default=None, help="LoFlexMDM order-network learning rate")
    ap.add_argument("--shape-a", type=float, default=1.0,
                    help="LoFlexMDM: the shared Kumaraswamy shape a (a < 1 inserts early, like poly:<a>; needs "
                         "--integrate-hazard)")
    ap.add_argument("--generator-states", type=int, default=2,
                    help="LoFlexMDM: partial states per row that train the generator (2: the method; 1: faster)")
    ap.add_argument("--devices", type=int, default=1,
                    help="CPU processes under DDP (gloo); --batch-size stays the global batch, split evenly")


# The recipe flags that only some methods read (argparse dest -> the --method values that read it).
RECIPE_METHODS: dict[str, tuple[str, ...]] = {
    "insertion_schedule": ("flexmdm",),
    "integrate_hazard": ("flexmdm", "loflexmdm"),
    "time_sampling": ("flexmdm", "loflexmdm"),
    "order_lr": ("loflexmdm",),
    "shape_a": ("loflexmdm",),
    "generator_states": ("loflexmdm",),
}


@contextmanager
def config_errors(ap: argparse.ArgumentParser) -> Iterator[None]:
    """Turn the ``ValueError`` a DataModule or model raises on a bad setting (it names the key and the allowed
    values) into one ``<prog>: error: ...`` line and exit status 2, as argparse reports its own errors."""
    try:
        yield
    except ValueError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")


def check_recipe_arguments(args: argparse.Namespace, ap: argparse.ArgumentParser | None = None,
                           applies: dict[str, tuple[str, ...]] | None = None) -> None:
    """Refuse a process count below 1, a global batch that the DDP processes cannot split evenly and, given the
    parser, a flag set away from its default that ``--method`` does not read (``applies`` adds the script's own
    flags to :data:`RECIPE_METHODS`). A silently ignored flag would make a run look like something it is not."""
    if ap is not None:
        for dest, methods in {**RECIPE_METHODS, **(applies or {})}.items():
            if args.method not in methods and getattr(args, dest) != ap.get_default(dest):
                flag = "--" + dest.replace("_", "-")
                raise SystemExit(f"{flag} applies to --method {' or '.join(methods)} only, not --method "
                                 f"{args.method}: drop {flag} or change --method")
    if args.devices < 1:
        raise SystemExit(f"--devices {args.devices} must be >= 1 (CPU processes under DDP)")
    if args.batch_size % args.devices:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}")


def parse_setting(text: str) -> dict:
    """``"steps=128,integrate_hazard=true,confidence=top_prob"`` -> a dict of JSON values (bare words stay text)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        raw = raw.strip()
        try:
            out[key.strip()] = json.loads(raw.lower() if raw.lower() in ("true", "false") else raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def with_setting(cfg, setting: str | dict, option: str = "--settings"):
    """``cfg`` (a sampler config dataclass) with the overrides of ``setting`` (``key=value`` text or its parsed
    dict). An unknown key or a refused value exits with one line naming ``option``, the setting and the fix."""
    values = parse_setting(setting) if isinstance(setting, str) else setting
    text = setting if isinstance(setting, str) else ",".join(f"{k}={v}" for k, v in setting.items())
    allowed = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise SystemExit(f"{option} {text!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return dataclasses.replace(cfg, **values)
    except (TypeError, ValueError) as err:  # the config's own check, e.g. confidence=fastest or steps=0
        raise SystemExit(f"{option} {text!r}: {err}") from None


def read_molecule_run(run_dir: str) -> dict:
    """The flags a ``train_molecules.py`` run was started with: its ``args.json`` (``result.json``'s ``args`` for
    runs from before args.json)."""
    path = os.path.join(run_dir, "args.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        raise SystemExit(f"--run {run_dir}: no args.json or result.json there; pass a train_molecules.py --out directory")
    with open(path) as fh:
        return json.load(fh)["args"]


def molecule_run_datamodule(run: dict, eval_batch_size: int, fcd_reference: str | None = None):
    """The run's own MoleculeDataModule (source, representation, training subset and test rows), so that scripts
    that reload its checkpoint see its test rows, training set and FCD reference."""
    from insertion_diffusion.data.molecules import MoleculeDataModule

    return MoleculeDataModule(source=run["source"], representation=run.get("representation", "smiles"),
                              train_size=run["train_size"] if run["train_size"] > 0 else None, val_size=256,
                              test_size=run["num_samples"], cache_dir="data_cache/molecules",
                              eval_batch_size=eval_batch_size, fcd_reference=fcd_reference)
