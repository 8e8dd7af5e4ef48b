"""Train a method on a star-graph preset on CPU within a time budget, then report test metrics.

Resumable: re-running with the same ``--out`` continues from ``<out>/checkpoints/last.ckpt``.
Writes ``<out>/curve.csv`` (step, wall seconds, train loss, val metrics) and ``<out>/result.json``.

Example (the run recorded in docs/results.md)::

    python benchmarks/train_star.py --preset easy --minutes 30 --out benchmarks/out/easy_flexmdm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
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
    write_json_atomic,
)

from insertion_diffusion.callbacks.guards import ExceptionCheckpoint
from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import ARM, HDLM, MDLM, FlexMDM, LoFlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.sampling import ARSamplerConfig, HDLMSamplerConfig, MDLMSamplerConfig, SamplerConfig

METHODS = {"flexmdm": FlexMDM, "loflexmdm": LoFlexMDM, "arm": ARM, "mdlm": MDLM, "hdlm": HDLM}


def make_sampler(method: str, steps: int, confidence: str, integrate_hazard: bool = False):
    """Greedy decoding for every method; ``steps`` and ``confidence`` apply to the diffusion samplers (for HDLM
    ``steps`` counts ticks per block), ``integrate_hazard`` to the insertion models' tau-leaping."""
    if method == "arm":
        return ARSamplerConfig(top_k=1)
    if method == "mdlm":
        return MDLMSamplerConfig(steps=steps, top_k=1, confidence=confidence)
    if method == "hdlm":
        return HDLMSamplerConfig(steps=steps, top_k=1, confidence=confidence)
    return SamplerConfig(steps=steps, top_k=1, confidence=confidence, integrate_hazard=integrate_hazard)


STAR_CURVE_KEYS = ("train/loss", "val/loss", "val/exact_match", "val/token_accuracy", "val/nll_per_token",
                   "val/order_corr_unmask", "val/order_corr_phi")


# Flags only some methods read; one set for another method is refused. The sampler flags (--val-steps,
# --test-steps, --confidence) stay allowed for ARM, which decodes greedily one token at a time and ignores them,
# so that one command line can loop over all four methods.
LOFLEX, INSERTION, HYPER = ("loflexmdm",), ("flexmdm", "loflexmdm"), ("hdlm",)
METHOD_FLAGS = {
    "order_layers": LOFLEX, "order_time_conditioning": LOFLEX, "reg_weight": LOFLEX, "no_pathwise": LOFLEX,
    "advantage": LOFLEX, "order_insert_weight": LOFLEX,
    "reg_frame": LOFLEX, "unmasking_schedule": ("flexmdm",), "insert_weight": INSERTION, "init_generator": INSERTION,
    "block_size": HYPER, "window": HYPER, "hybrid_eps": HYPER,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="easy")
    ap.add_argument("--method", default="flexmdm", choices=sorted(METHODS))
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="wall-clock cap on this invocation's training (a resumed run starts its clock at zero)")
    ap.add_argument("--max-steps", type=int, default=-1, help="step budget (-1: only the time cap)")
    ap.add_argument("--out", default="benchmarks/out/star")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--order-layers", type=int, default=2, help="LoFlexMDM order-network layers")
    ap.add_argument("--order-time-conditioning", action="store_true",
                    help="LoFlexMDM: the order network also reads t (AdaLN-Zero blocks, identity at initialisation)")
    ap.add_argument("--reg-weight", type=float, default=1.0, help="LoFlexMDM: weight of each schedule regulariser")
    ap.add_argument("--no-pathwise", action="store_true", help="LoFlexMDM: REINFORCE and regularisers only")
    ap.add_argument("--advantage", default="per_mask", help="LoFlexMDM advantage_normalization")
    ap.add_argument("--reg-frame", default="relative", choices=("relative", "absolute"),
                    help="LoFlexMDM: regularise towards F(t; a, 1) (relative) or the uniform law in t (absolute)")
    ap.add_argument("--order-insert-weight", type=float, default=None,
                    help="LoFlexMDM: weight of the insertion term in the order network's objective (default: "
                         "--insert-weight; method.md: 1)")
    ap.add_argument("--init-generator", default=None,
                    help="FlexMDM or LoFlexMDM: start the generator (backbone, token head, gap head) from this FlexMDM "
                         "checkpoint of the same size, with a fresh optimiser; for LoFlexMDM, a = 1 and b = 1 make "
                         "the two parameterisations coincide with FlexMDM's linear schedules")
    ap.add_argument("--block-size", type=int, default=None, help="HDLM: columns per block (default 4)")
    ap.add_argument("--window", type=int, default=None, help="HDLM: blocks partly noised at once (default 1)")
    ap.add_argument("--hybrid-eps", type=float, default=None, help="HDLM: epsilon-hybrid corruption (default 0)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-abs-pos", action="store_true", help="rotary positions only (no absolute embedding)")
    ap.add_argument("--insert-weight", type=float, default=0.1)
    ap.add_argument("--unmasking-schedule", default="linear", help="FlexMDM unmasking-time CDF (same choices)")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="evaluate an exponential moving average of the weights (Lightning EMAWeightAveraging)")
    ap.add_argument("--val-every", type=int, default=1000)
    ap.add_argument("--val-steps", type=int, default=64,
                    help="sampler steps during validation (not ARM; HDLM: ticks per block)")
    ap.add_argument("--test-steps", type=int, default=128, help="sampler steps at test (not ARM; HDLM: ticks per block)")
    ap.add_argument("--confidence", default="top_prob")
    ap.add_argument("--num-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads per process")
    add_recipe_arguments(ap)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    check_recipe_arguments(args, ap, METHOD_FLAGS)

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    os.makedirs(args.out, exist_ok=True)
    with config_errors(ap):  # a bad value (e.g. --time-sampling early:2) is one line, not a traceback
        dm = StarGraphDataModule(preset=args.preset, data_dir=os.path.join(args.out, "..", "data"),
                                 num_test=args.num_test, batch_size=args.batch_size // args.devices, eval_batch_size=256)
        backbone = TransformerConfig(num_layers=args.layers, d_model=args.width, num_heads=args.heads,
                                     d_cond=min(128, args.width), dropout=args.dropout,
                                     absolute_positions=not args.no_abs_pos, conv_kernel=args.conv_kernel,
                                     time_conditioning=args.method in ("flexmdm", "loflexmdm"))
        extra = ({"insert_weight": args.insert_weight, "time_sampling": args.time_sampling}
                 if args.method in ("flexmdm", "loflexmdm") else {})
        if args.method == "flexmdm":
            extra.update(insertion_schedule=args.insertion_schedule, unmasking_schedule=args.unmasking_schedule)
        if args.method == "loflexmdm":
            extra["order_backbone"] = TransformerConfig(num_layers=args.order_layers, d_model=args.width,
                                                        num_heads=args.heads, d_cond=min(128, args.width),
                                                        dropout=args.dropout, absolute_positions=not args.no_abs_pos,
                                                        conv_kernel=args.conv_kernel)
            extra["order_lr"] = args.order_lr
            extra["order_time_conditioning"] = args.order_time_conditioning
            extra.update(reg_mixture=args.reg_weight, reg_endpoint=args.reg_weight, reg_kl=args.reg_weight,
                         pathwise=not args.no_pathwise, advantage_normalization=args.advantage,
                         a=args.shape_a, order_insert_weight=args.order_insert_weight, reg_frame=args.reg_frame,
                         generator_states=args.generator_states)
        if args.method == "hdlm":
            extra.update(block_size=args.block_size or 4, window=args.window or 1, hybrid_eps=args.hybrid_eps or 0.0)
        model = METHODS[args.method](
            dm.tokenizer, dm.max_length, backbone=backbone, lr=args.lr, warmup_steps=args.warmup, lr_schedule=args.lr_schedule,
            sampler=make_sampler(args.method, args.val_steps, args.confidence, args.integrate_hazard), **extra,
        )
    ckpt_dir = os.path.join(args.out, "checkpoints")
    last = os.path.join(ckpt_dir, "last.ckpt")
    if args.init_generator and not os.path.exists(last):
        n = init_generator(model, args.init_generator)
        print(f"generator initialised from {args.init_generator} ({n} tensors)")
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=args.val_every),
                 CurveWriter(os.path.join(args.out, "curve.csv"), STAR_CURVE_KEYS),
                 ExceptionCheckpoint(dirpath=ckpt_dir),  # SIGTERM (also under DDP): on_exception.ckpt, exit 143
                 SaveLastOnTrainEnd(last),  # before the EMA callback: see its docstring
                 InvocationTimer(args.minutes)]
    if args.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=args.ema_decay))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps, max_epochs=-1,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, limit_val_batches=1,
        gradient_clip_val=1.0, log_every_n_steps=50, enable_progress_bar=False,
        logger=TensorBoardLogger(args.out, name="tb"),
        callbacks=callbacks,
    )
    t0 = time.time()
    fit_or_exit(trainer, model, dm)
    train_s = time.time() - t0

    model.sampler_cfg = make_sampler(args.method, args.test_steps, args.confidence, args.integrate_hazard)
    t1 = time.time()
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    result = {"args": vars(args), "global_step": trainer.global_step, "train_seconds_this_run": round(train_s, 1),
              "test_seconds": round(time.time() - t1, 1), **{k: float(v) for k, v in res.items()}}
    if trainer.global_rank != 0:
        return
    write_json_atomic(os.path.join(args.out, "result.json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
