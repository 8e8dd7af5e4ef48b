"""FlexMDM training-step and sampler-step speed at the authors' star-easy CPU configuration.

Configuration (evaluation.md section 7): 4 layers x 256, 4 heads, FFN 1024, d_cond 128, batch 64,
42-token rows of star-easy, fp32, 2 intra-op threads. Prints, for each phase:

* median seconds per step;
* model FLOPs per step (counted by torch's FLOP counter) and the achieved FLOP/s;
* model FLOPs utilisation (MFU) against a dense fp32 matmul measured in the same run;
* the speed-up over the authors' reference code measured on a like 2-core machine
  (0.48 s per training step, 0.17 s per sampler step for 64 sequences; evaluation.md section 7).

Run: ``python benchmarks/speed_flexmdm.py [--threads 2] [--repeats 20] [--compile]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import count_flops, matmul_peak_flops, median_seconds

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.process.rng import RowRNG
from insertion_diffusion.sampling.tau_leaping import SamplerConfig

REFERENCE_TRAIN_STEP_S = 0.48
REFERENCE_SAMPLER_STEP_S = 0.17


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true",
                    help="also time the training step with the backbone compiled (torch.compile, fixed shapes), "
                         "beside the eager step in the same process; compiling takes a minute or two on 2 cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        dm = StarGraphDataModule(preset="easy", data_dir=tmp, num_train=512, num_val=16, num_test=64,
                                 batch_size=args.batch_size)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
    cfg = TransformerConfig(num_layers=4, d_model=256, num_heads=4, d_ff=1024, d_cond=128, dropout=0.1)
    model = FlexMDM(dm.tokenizer, dm.max_length, backbone=cfg, sampler=SamplerConfig(steps=args.sampler_steps))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())

    def train_step() -> None:
        loss, _ = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    train_flops = count_flops(train_step)
    train_s = median_seconds(train_step, args.repeats)
    compiled = None
    if args.compile:
        model.net.compile(dynamic=False)  # what --model.compile true does, with the shapes held fixed
        compiled_s = median_seconds(train_step, args.repeats, warmup=3)  # the first call compiles
        model.net._compiled_call_impl = None  # back to eager for the sampler rows
        compiled = (compiled_s, train_flops)

    model.eval()
    gen = torch.Generator().manual_seed(0)
    # Sampler cost: a whole run of S steps, divided by S (initial state grows from prompt to full length);
    # with the network run on the batch's current width (trim) and on the full max_length, same process.
    sampler = {}
    for trim in (True, False):
        model.sampler_cfg = SamplerConfig(steps=args.sampler_steps, trim=trim)
        flops = count_flops(lambda: model.sample(batch, gen)) / args.sampler_steps
        sec = median_seconds(lambda: model.sample(batch, gen), max(3, args.repeats // 5), warmup=1) / args.sampler_steps
        sampler[trim] = (sec, flops)
    # Evaluation samples with per-row noise (RowRNG keyed by the rows' index): its Poisson draws invert the CDF.
    model.sampler_cfg = SamplerConfig(steps=args.sampler_steps)
    rows = RowRNG(0, torch.arange(batch["input_ids"].shape[0]))
    row_sec = median_seconds(lambda: model.sample(batch, rows), max(3, args.repeats // 5), warmup=1) / args.sampler_steps

    peak = matmul_peak_flops()
    print(f"FlexMDM speed, star-easy, {n_params / 1e6:.2f}M params, batch {args.batch_size}, "
          f"{dm.max_length} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"dense fp32 matmul peak measured now: {peak / 1e9:.1f} GFLOP/s")
    rows = [("train step", train_s, train_flops, REFERENCE_TRAIN_STEP_S)]
    if compiled is not None:
        rows.append(("train step, compiled", *compiled, REFERENCE_TRAIN_STEP_S))
    for name, sec, flops, ref in (
        *rows,
        ("sampler step", *sampler[True], REFERENCE_SAMPLER_STEP_S),
        ("sampler, full width", *sampler[False], REFERENCE_SAMPLER_STEP_S),
    ):
        achieved = flops / sec
        print(f"{name:>19}: {sec * 1e3:8.1f} ms | model {flops / 1e9:6.2f} GFLOP | {achieved / 1e9:6.1f} GFLOP/s | "
              f"MFU {100 * achieved / peak:5.1f} % | x{ref / sec:.2f} vs reference {ref:.2f} s")


    if compiled is not None:
        print(f"train step: compiled is x{train_s / compiled[0]:.2f} the eager step's speed")
    print(f"sampler: trimmed width is x{sampler[False][0] / sampler[True][0]:.2f} faster than full width")
    print(f"sampler with per-row noise (RowRNG, as in evaluation): {row_sec * 1e3:.1f} ms per step, "
          f"x{row_sec / sampler[True][0]:.3f} the time with a torch.Generator")


if __name__ == "__main__":
    main()
