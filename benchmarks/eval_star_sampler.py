"""Compare sampler settings on one trained star-graph checkpoint, on the same test graphs, in one process.

Each setting is a comma-separated list of ``key=value`` overrides (``steps``, ``confidence``,
``integrate_hazard``, ``top_k``, ...) applied on top of ``--base`` (default: greedy, ``top_prob`` confidence,
the protocol of docs/results.md) and the model's default ``SamplerConfig``. Checkpoints do not carry the
sampler settings of the run that wrote them, so the base is explicit here. Prints exact match, valid-path rate and
token accuracy per setting, and the seconds each took.

Example (the comparison in docs/results.md)::

    python benchmarks/eval_star_sampler.py --ckpt benchmarks/out/s4/easy/checkpoints/last.ckpt \\
        --settings "steps=128" "steps=128,integrate_hazard=true"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import lightning.pytorch as L
import torch

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import ARM, MDLM, FlexMDM, LoFlexMDM

MODELS = {"FlexMDM": FlexMDM, "LoFlexMDM": LoFlexMDM, "MDLM": MDLM, "ARM": ARM}


def parse_setting(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = json.loads(raw.strip().lower() if raw.strip().lower() in ("true", "false") else raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--model", default="FlexMDM", choices=sorted(MODELS))
    ap.add_argument("--preset", default="easy")
    ap.add_argument("--data-dir", default="benchmarks/out/data")
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default="top_k=1,confidence=top_prob", help="overrides shared by every setting")
    ap.add_argument("--settings", nargs="+", default=["steps=128"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = MODELS[args.model].load_from_checkpoint(args.ckpt, map_location="cpu")
    dm = StarGraphDataModule(preset=args.preset, data_dir=args.data_dir, num_test=args.num_test, eval_batch_size=256)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    base = dataclasses.replace(model.sampler_cfg, **parse_setting(args.base))
    print(f"{os.path.basename(os.path.dirname(os.path.dirname(args.ckpt)))}: {args.num_test} {args.preset} test graphs")
    for text in args.settings:
        model.sampler_cfg = dataclasses.replace(base, **parse_setting(text))
        t0 = time.time()
        res = trainer.test(model, datamodule=dm, verbose=False)[0]
        print(f"{text:<40} exact {res['test/exact_match']:.3f}  valid path {res['test/valid_path']:.3f}  "
              f"token acc {res['test/token_accuracy']:.3f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
