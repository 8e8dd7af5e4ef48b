"""LoFlexMDM / FlexMDM training step-time ratio at equal generator size (star-easy, CPU).

Both models are timed in the same process with their steps interleaved (so machine load affects both
alike). Prints median seconds per optimiser step, model FLOPs per step, the time ratio and the FLOP
ratio (the floor a perfectly efficient implementation would reach).

Default configuration = evaluation.md section 7: generator 4 layers x 256, 4 heads, FFN 1024, d_cond 128;
order network 2 layers x 256; batch 64; fp32; 2 threads. The authors' code: 0.48 s (FlexMDM) and
1.20 s (LoFlexMDM) per step, a 2.5x ratio, on a like 2-core machine.

A third model, ``LoFlexMDM-1``, is LoFlexMDM with ``generator_states=1`` (the generator trains on the first
of the two partial states; the second runs without autograd, as the REINFORCE baseline).

Run: ``python benchmarks/speed_loflexmdm.py [--repeats 15] [--order-width 256]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import count_flops

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import FlexMDM, LoFlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig

REFERENCE = {"FlexMDM": 0.48, "LoFlexMDM": 1.20, "LoFlexMDM-1": 1.20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--order-width", type=int, default=256)
    ap.add_argument("--order-layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dm = StarGraphDataModule(preset="easy", data_dir=tmp, num_train=512, num_val=16, num_test=16)
        dm.prepare_data()
        dm.setup("fit")
        batches = [b for _, b in zip(range(4), dm.train_dataloader())]
    gen = TransformerConfig(num_layers=args.layers, d_model=args.width, num_heads=4, d_ff=4 * args.width, d_cond=128)
    order = TransformerConfig(num_layers=args.order_layers, d_model=args.order_width, num_heads=4, d_cond=128)
    models = {
        "FlexMDM": FlexMDM(dm.tokenizer, dm.max_length, backbone=gen),
        "LoFlexMDM": LoFlexMDM(dm.tokenizer, dm.max_length, backbone=gen, order_backbone=order),
        "LoFlexMDM-1": LoFlexMDM(dm.tokenizer, dm.max_length, backbone=gen, order_backbone=order, generator_states=1),
    }
    steps, flops, times = {}, {}, {name: [] for name in models}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        counter = itertools.count()

        def step(model=model, opt=opt, it=counter) -> None:
            loss, _ = model.compute_loss(batches[next(it) % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        steps[name] = step
        flops[name] = count_flops(step)
        step()
    for _ in range(args.repeats):  # interleaved
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"training step, star-easy, batch 64, generator {args.layers}x{args.width}, "
          f"order network {args.order_layers}x{args.order_width}, fp32, {torch.get_num_threads()} threads")
    for name in models:
        n_params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(f"{name:>10}: {med[name]:.3f} s/step | {flops[name] / 1e9:6.1f} GFLOP | {n_params:.2f}M params | "
              f"x{REFERENCE[name] / med[name]:.2f} vs reference {REFERENCE[name]:.2f} s")
    for name in ("LoFlexMDM", "LoFlexMDM-1"):
        print(f"{name} / FlexMDM time ratio: {med[name] / med['FlexMDM']:.2f} "
              f"(FLOP ratio {flops[name] / flops['FlexMDM']:.2f}; reference code 2.50, goal <= 2.0)")


if __name__ == "__main__":
    main()
