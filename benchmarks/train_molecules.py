"""Train a method on MOSES (or NCI) SMILES on CPU within a step/time budget, then score generated molecules.

Resumable: re-running with the same ``--out`` continues from ``<out>/checkpoints/last.ckpt``. The test generates
``--num-samples`` molecules (one per test row) and scores them with the package's molecule metrics; FCD is taken
against the SMILES of the test rows themselves (a random sample of MOSES test of the same size). Writes
``<out>/result.json``.

Example::

    python benchmarks/train_molecules.py --method flexmdm --max-steps 800 --num-samples 10000 \
        --out benchmarks/out/molecules/moses_flexmdm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(__file__))
from common import (
    CurveWriter,
    InvocationTimer,
    SaveLastOnTrainEnd,
    add_recipe_arguments,
    check_recipe_arguments,
    config_errors,
    fit_or_exit,
    init_generator,
    with_setting,
    write_json_atomic,
)

from insertion_diffusion.callbacks.guards import ExceptionCheckpoint
from insertion_diffusion.data.molecules import MoleculeDataModule
from insertion_diffusion.models import ARM, MDLM, FlexMDM, LoFlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.sampling import ARSamplerConfig, MDLMSamplerConfig, SamplerConfig

METHODS = {"flexmdm": FlexMDM, "loflexmdm": LoFlexMDM, "arm": ARM, "mdlm": MDLM}


def make_sampler(method: str, steps: int, integrate_hazard: bool = False):
    """Plain sampling (temperature 1, no top-k / top-p, no confidence) for every method; ``integrate_hazard``
    (exact per-step hazard integrals, needed by early-insertion schedules) for the insertion models."""
    if method == "arm":
        return ARSamplerConfig()
    if method == "mdlm":
        return MDLMSamplerConfig(steps=steps)
    return SamplerConfig(steps=steps, integrate_hazard=integrate_hazard)


MOLECULE_CURVE_KEYS = ("train/loss", "val/loss", "val/validity", "val/uniqueness", "val/novelty", "val/quality",
                       "val/nll_per_token")


# Flags of this script that only some methods read (the shared recipe flags are in common.RECIPE_METHODS).
METHOD_FLAGS = {"init_generator": ("flexmdm", "loflexmdm")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="flexmdm", choices=sorted(METHODS))
    ap.add_argument("--source", default="moses")
    ap.add_argument("--representation", default="smiles", choices=("smiles", "kekule_smiles", "safe", "bracket_safe"),
                    help="what the model writes; SAFE forms are scored with lenient decoding as GenMol validity")
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--max-steps", type=int, default=800)
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="wall-clock cap on this invocation's training (a resumed run starts its clock at zero)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--sampler-steps", type=int, default=32)
    ap.add_argument("--sampler-settings", default="",
                    help="overrides of the sampler used at validation and test, e.g. 'top_k=1,confidence=top_prob' "
                         "(default: plain sampling at temperature 1)")
    ap.add_argument("--no-test", action="store_true",
                    help="stop after training (score the checkpoint later with eval_molecules.py)")
    ap.add_argument("--num-samples", type=int, default=10_000)
    ap.add_argument("--no-fcd", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-generator", default=None,
                    help="flexmdm / loflexmdm: start the generator from this FlexMDM checkpoint of the same size "
                         "(fresh optimiser and schedule; a LoFlexMDM's order network starts fresh)")
    ap.add_argument("--val-every", type=int, default=0, help="validation interval in steps (0: max-steps / 2)")
    add_recipe_arguments(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/molecules/run")
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    check_recipe_arguments(args, ap, METHOD_FLAGS)
    val_every = args.val_every or max(1, args.max_steps // 2)

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    os.makedirs(args.out, exist_ok=True)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP re-runs this script in each extra process
        write_json_atomic(os.path.join(args.out, "args.json"), vars(args))  # read by eval_molecules.py
    with config_errors(ap):  # a bad value (e.g. --time-sampling early:2) is one line, not a traceback
        dm = MoleculeDataModule(source=args.source, representation=args.representation,
                                train_size=args.train_size if args.train_size > 0 else None, val_size=256,
                                test_size=args.num_samples, cache_dir="data_cache/molecules",
                                fcd_reference=None if args.no_fcd else "test",
                                batch_size=args.batch_size // args.devices, eval_batch_size=500)
        timed = args.method in ("flexmdm", "loflexmdm")
        backbone = TransformerConfig(num_layers=args.layers, d_model=args.width, num_heads=4, d_cond=min(128, args.width),
                                     dropout=0.0, absolute_positions=True, time_conditioning=timed,
                                     conv_kernel=args.conv_kernel)
        extra = {}
        if args.method in ("flexmdm", "loflexmdm"):
            extra["time_sampling"] = args.time_sampling
        if args.method == "flexmdm":
            extra["insertion_schedule"] = args.insertion_schedule
        if args.method == "loflexmdm":
            extra.update(order_lr=args.order_lr, generator_states=args.generator_states, a=args.shape_a)
            extra["order_backbone"] = TransformerConfig(num_layers=max(1, args.layers // 2), d_model=args.width,
                                                        num_heads=4, d_cond=min(128, args.width), dropout=0.0,
                                                        absolute_positions=True, conv_kernel=args.conv_kernel)
        model = METHODS[args.method](dm.tokenizer, dm.max_length, backbone=backbone, lr=args.lr,
                                     warmup_steps=args.warmup, lr_schedule=args.lr_schedule,
                                     sampler=with_setting(make_sampler(args.method, args.sampler_steps, args.integrate_hazard),
                                                          args.sampler_settings, "--sampler-settings"),
                                     **extra)
    ckpt_dir = os.path.join(args.out, "checkpoints")
    last = os.path.join(ckpt_dir, "last.ckpt")
    if args.init_generator and not os.path.exists(last):
        n = init_generator(model, args.init_generator)
        print(f"generator initialised from {args.init_generator} ({n} tensors)")
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_steps=args.max_steps, max_epochs=-1,
        val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=0, gradient_clip_val=1.0, log_every_n_steps=50, enable_progress_bar=False,
        logger=TensorBoardLogger(args.out, name="tb"),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=min(val_every, max(1, args.max_steps // 4))),
                   CurveWriter(os.path.join(args.out, "curve.csv"), MOLECULE_CURVE_KEYS),
                   ExceptionCheckpoint(dirpath=ckpt_dir),  # SIGTERM (also under DDP): on_exception.ckpt, exit 143
                   SaveLastOnTrainEnd(last), InvocationTimer(args.minutes)],
    )
    t0 = time.time()
    fit_or_exit(trainer, model, dm)
    train_s = time.time() - t0
    if args.no_test:
        print(f"trained to step {trainer.global_step} in {train_s:.0f} s; no test (--no-test)")
        return
    t1 = time.time()
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    result = {"args": vars(args), "global_step": trainer.global_step, "train_seconds_this_run": round(train_s, 1),
              "test_seconds": round(time.time() - t1, 1), "max_length": dm.max_length,
              "vocab_size": dm.tokenizer.vocab_size, **{k: float(v) for k, v in res.items()}}
    if trainer.global_rank != 0:
        return
    write_json_atomic(os.path.join(args.out, "result.json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
