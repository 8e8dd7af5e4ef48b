"""Shared set-up of the scripts that evaluate one star-graph checkpoint under several sampler settings
(``eval_star_sampler.py``, ``star_errors.py``): the command-line options and loading
the model and the test split."""

from __future__ import annotations

import argparse

import torch
from common import with_setting

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import ARM, HDLM, MDLM, FlexMDM, InsertionProcess, LoFlexMDM

MODELS = {"FlexMDM": FlexMDM, "LoFlexMDM": LoFlexMDM, "MDLM": MDLM, "ARM": ARM, "HDLM": HDLM, "InsertionProcess": InsertionProcess}


def eval_parser(description: str, eval_batch_size: int = 256) -> argparse.ArgumentParser:
    """The options every checkpoint-evaluation script takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--model", default="FlexMDM", choices=sorted(MODELS))
    ap.add_argument("--preset", default="easy")
    ap.add_argument("--data-dir", default="benchmarks/out/data")
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=eval_batch_size)
    ap.add_argument("--base", default="top_k=1,confidence=top_prob", help="overrides shared by every setting")
    ap.add_argument("--settings", nargs="+", default=["steps=128"])
    ap.add_argument("--weights", choices=("saved", "raw"), default="saved",
                    help="'saved': the checkpoint's state_dict (the weight average, in a run trained with "
                         "--ema-decay); 'raw': the training weights that an EMA run keeps under current_model_state")
    return ap


def load_for_eval(args: argparse.Namespace):
    """``(model in eval mode, prepared test DataModule, base sampler config)`` from parsed ``eval_parser`` args."""
    torch.set_num_threads(args.threads)
    model = MODELS[args.model].load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    if args.weights == "raw":
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        if "current_model_state" not in ckpt:
            raise SystemExit(f"--weights raw: {args.ckpt} has no current_model_state (it was not written by a run "
                             "with a weight average such as --ema-decay); use --weights saved")
        model.load_state_dict(ckpt["current_model_state"])
    dm = StarGraphDataModule(preset=args.preset, data_dir=args.data_dir, num_test=args.num_test,
                             eval_batch_size=args.eval_batch_size)
    dm.prepare_data()
    dm.setup("test")
    return model, dm, with_setting(model.sampler_cfg, args.base, "--base")
