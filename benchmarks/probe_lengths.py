"""Follow the lengths a FlexMDM / LoFlexMDM molecule checkpoint samples, sampler step by sampler step.

Each printed step gives the batch's mean current length (tokens, EOS included) and, for FlexMDM, the generator's
predicted number of missing tokens (its expected gap lengths summed over the row's gaps): their sum is the length
the model expects to end at. At the end: the mean generated length (no specials) against the mean length of the
same test rows. A model that expects too few tokens on the first steps writes short sequences from then on; the
twentieth session found this in MOSES models trained with an early-insertion schedule on uniform times (see
``time_sampling`` in docs/concepts.md).

    python benchmarks/probe_lengths.py --run benchmarks/out/s19/moses_flex_p025_smiles --num-samples 200
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import molecule_run_datamodule, read_molecule_run, with_setting

from insertion_diffusion.models import FlexMDM, LoFlexMDM
from insertion_diffusion.models.base import compact_fixed
from insertion_diffusion.sampling.tau_leaping import tau_leaping

METHODS = {"flexmdm": FlexMDM, "loflexmdm": LoFlexMDM}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a train_molecules.py --out directory of a flexmdm/loflexmdm run")
    ap.add_argument("--num-samples", type=int, default=200, help="the first N test rows, one batch")
    ap.add_argument("--settings", default="steps=128,top_k=1,confidence=top_prob", help="sampler overrides")
    ap.add_argument("--every", type=int, default=16, help="print every n-th step (and the first and last few)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = read_molecule_run(args.run)
    if run["method"] not in METHODS:
        raise SystemExit(f"--run {args.run}: a {run['method']} run; this probe reads flexmdm and loflexmdm runs")
    dm = molecule_run_datamodule(run, args.num_samples)
    dm.setup("test")
    model = METHODS[run["method"]].load_from_checkpoint(os.path.join(args.run, "checkpoints", "last.ckpt"),
                                                        map_location="cpu").eval()
    model.sampler_cfg = with_setting(model.sampler_cfg, args.settings)
    batch = next(iter(dm.test_dataloader()))
    tok = model.tokenizer

    trace: list[tuple[float, float, float]] = []

    def traced(x, t, valid, *span):
        out = model.rates(x, t, valid, *span)
        missing = float("nan")
        if isinstance(model, FlexMDM):
            _, gap_out = model(x, t, valid)
            missing = float((model.expected_gap(gap_out) * valid).sum(1).mean())
        trace.append((float(t[0]), float(valid.sum(1).float().mean()), missing))
        return out

    x0, fixed0, len0 = compact_fixed(batch["input_ids"], batch["fixed"], batch["attention_mask"], tok.pad_id)
    with torch.no_grad():
        out = tau_leaping(traced, x0, fixed0, len0, model.active_sampler_cfg(), max_length=model.max_length,
                          mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id,
                          banned_ids=(tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id),
                          generator=model._generator(0, batch))
    print(f"{run['method']} checkpoint of {args.run}, first {batch['input_ids'].shape[0]} test rows, {args.settings}")
    print("| step | t | mean length | predicted missing | expected final length |")
    print("|---|---|---|---|---|")
    last = len(trace) - 1
    for i, (t, length, missing) in enumerate(trace):
        if i < 3 or i % args.every == 0 or i > last - 2:
            print(f"| {i} | {t:.4f} | {length:.2f} | {missing:.2f} | {length + missing:.2f} |")
    generated = (out.lengths - out.fixed.sum(1)).float().mean()
    reference = (batch["attention_mask"].bool() & ~batch["fixed"].bool()).sum(1).float().mean()
    print(f"mean generated length {float(generated):.2f} tokens; the same test rows {float(reference):.2f} "
          f"(ratio {float(generated / reference):.3f})")


if __name__ == "__main__":
    main()
