"""Sort a star-graph checkpoint's test failures by kind, for one or more sampler settings.

Every generated target (edge format, ``p0 p1 p1 p2 ...``) that differs from the reference falls into the first
matching kind (a setting may also set ``eval_seed``, the seed of the sampling noise):

- ``length``: the sample has a different number of tokens (an insertion error: too many or too few masks);
- ``off-graph``: some generated pair is not an edge of the prompt's graph (a lookup error);
- ``broken chain``: every pair is an edge, but consecutive edges do not join (``(a, b) (c, d)`` with ``b != c``);
- ``wrong arm``: a connected chain of real edges from the source that ends elsewhere than the goal, or that
  takes the wrong arm at the junction.

Example::

    python benchmarks/star_errors.py --ckpt benchmarks/out/s5/easy_poly025_wsd_ddp2/checkpoints/last.ckpt \\
        --data-dir benchmarks/out/s5/data --settings "steps=128" "steps=128,eval_seed=1" "steps=500"
"""

from __future__ import annotations

import collections

import torch
from common import parse_setting, with_setting
from star_eval import eval_parser, load_for_eval

KINDS = ("exact", "length", "off-graph", "broken chain", "wrong arm")


def classify(prompt: list[int], generated: list[int], reference: list[int]) -> tuple[str, int]:
    """The kind of one sample (see the module docstring) and its length difference."""
    if generated == reference:
        return "exact", 0
    if len(generated) != len(reference):
        return "length", len(generated) - len(reference)
    edges = set(zip(prompt[0:-2:2], prompt[1:-2:2]))  # the prompt is u1 v1 u2 v2 ... source goal
    pairs = list(zip(generated[0::2], generated[1::2]))
    if not all(p in edges for p in pairs):
        return "off-graph", 0
    if not all(a[1] == b[0] for a, b in zip(pairs, pairs[1:])):
        return "broken chain", 0
    return "wrong arm", 0


def main() -> None:
    args = eval_parser(__doc__.split("\n")[0], eval_batch_size=250).parse_args()
    model, dm, base = load_for_eval(args)
    print(f"{args.ckpt}: {args.num_test} {args.preset} test graphs")
    print(f"{'setting':<32}" + "".join(f"{k:>14}" for k in KINDS) + "   length errors (generated - reference: count)")
    for text in args.settings:
        setting = parse_setting(text)
        # eval_seed is the model's, not the sampler's: it seeds each batch's sampling noise
        model.eval_seed = int(setting.pop("eval_seed", 0))
        model.sampler_cfg = with_setting(base, setting)
        counts: collections.Counter = collections.Counter()
        deltas: collections.Counter = collections.Counter()
        for i, batch in enumerate(dm.test_dataloader()):
            with torch.no_grad():
                prompts, generated, refs = model.generate(batch, i)
            for p, g, r in zip(prompts, generated, refs):
                kind, delta = classify(p, g, r)
                counts[kind] += 1
                if kind == "length":
                    deltas[delta] += 1
        n = sum(counts.values())
        cells = "".join(f"{counts[k] / n:>14.3f}" for k in KINDS)
        print(f"{text:<32}{cells}   " + ", ".join(f"{d:+d}: {c}" for d, c in sorted(deltas.items())), flush=True)


if __name__ == "__main__":
    main()
