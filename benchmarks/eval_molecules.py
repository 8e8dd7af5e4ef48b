"""Score one molecule checkpoint under several sampler settings, in one process, on the same rows.

The checkpoint is one written by ``train_molecules.py`` (its ``--out``/checkpoints/last.ckpt). The DataModule is
rebuilt with the training run's source, sizes and seed, so the test rows, the training set used for novelty and
the FCD reference are the run's own. Each ``--settings`` entry overrides the checkpoint's sampler config
(``key=value`` pairs, e.g. ``steps=256,temperature=0.9``); one table row per setting.

    python benchmarks/eval_molecules.py --run benchmarks/out/s6/moses_flexmdm --num-samples 2000 \
        --settings "steps=128" "steps=128,temperature=0.8" "steps=512"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import lightning.pytorch as L
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import molecule_run_datamodule, read_molecule_run, with_setting

from insertion_diffusion.chem.diagnose import INVALID_REASONS
from insertion_diffusion.models import ARM, MDLM, FlexMDM, LoFlexMDM

METHODS = {"flexmdm": FlexMDM, "loflexmdm": LoFlexMDM, "arm": ARM, "mdlm": MDLM}
COLUMNS = ("validity", "validity_genmol", "uniqueness", "novelty", "quality", "quality_genmol", "diversity", "fcd",
           "length_generated", "length_reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a train_molecules.py --out directory (args.json or result.json, checkpoints/)")
    ap.add_argument("--num-samples", type=int, default=2000,
                    help="molecules per setting: the first N of the run's test rows (<= the run's --num-samples), in batches of "
                         "min(500, N); N not a multiple of 500 (above 500) is rounded up to whole batches")
    ap.add_argument("--settings", nargs="+", default=["steps=128"])
    ap.add_argument("--no-fcd", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the table, not one banner per setting

    run = read_molecule_run(args.run)
    if args.num_samples > run["num_samples"]:
        raise SystemExit(f"--num-samples {args.num_samples} exceeds the run's test rows ({run['num_samples']})")
    dm = molecule_run_datamodule(run, min(500, args.num_samples), None if args.no_fcd else "test")
    model = METHODS[run["method"]].load_from_checkpoint(os.path.join(args.run, "checkpoints", "last.ckpt"),
                                                        map_location="cpu").eval()
    model.eval_seed = args.eval_seed
    batch = min(500, args.num_samples)
    limit = -(-args.num_samples // batch)  # whole eval batches (a last partial batch is sampled whole)
    base = model.sampler_cfg
    configs = [with_setting(base, text) for text in args.settings]  # every setting checked before any sampling
    print(f"{run['method']} checkpoint of {args.run}, first {min(limit * batch, run['num_samples'])} test rows, eval seed {args.eval_seed}")
    print("| setting | " + " | ".join(COLUMNS) + " | seconds |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    # One metric object for every setting: the model resets its states after each test, and the FCD reference
    # statistics (ChemNet over the test rows' SMILES) are computed at the first setting only. Both sets are given
    # here, because the model's setup() builds new ones whenever val_metrics is missing.
    model.val_metrics, model.test_metrics = dm.make_metrics("val/"), dm.make_metrics("test/")
    reasons: list[tuple[str, dict]] = []
    for text, cfg in zip(args.settings, configs):
        model.sampler_cfg = cfg
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_test_batches=limit)
        t0 = time.time()
        res = trainer.test(model, datamodule=dm, verbose=False)[0]
        cells = [f"{res.get('test/' + c, float('nan')):.4f}" for c in COLUMNS]
        print(f"| {text} | " + " | ".join(cells) + f" | {time.time() - t0:.0f} |", flush=True)
        reasons.append((text, res))
    # Why the invalid rows are invalid (fractions of all rows; they add up to 1 - validity).
    print("\n| setting | " + " | ".join(f"invalid: {r}" for r in INVALID_REASONS) + " |")
    print("|---" * (len(INVALID_REASONS) + 1) + "|")
    for text, res in reasons:
        print(f"| {text} | " + " | ".join(f"{res.get('test/invalid_' + r, float('nan')):.4f}" for r in INVALID_REASONS) + " |")


if __name__ == "__main__":
    main()
