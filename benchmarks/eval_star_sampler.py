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

import os
import time

import lightning.pytorch as L
from common import with_setting
from star_eval import eval_parser, load_for_eval


def main() -> None:
    args = eval_parser(__doc__.split("\n")[0]).parse_args()
    model, dm, base = load_for_eval(args)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    print(f"{os.path.basename(os.path.dirname(os.path.dirname(args.ckpt)))}: {args.num_test} {args.preset} test graphs")
    for text in args.settings:
        model.sampler_cfg = with_setting(base, text)
        t0 = time.time()
        res = trainer.test(model, datamodule=dm, verbose=False)[0]
        print(f"{text:<40} exact {res['test/exact_match']:.3f}  valid path {res['test/valid_path']:.3f}  "
              f"token acc {res['test/token_accuracy']:.3f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
