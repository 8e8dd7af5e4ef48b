"""How many steps until a transformer learns the star graphs' one-hop lookup, with and without a token convolution?

Probe task, built from real star-easy training rows: the input is the prompt (12 shuffled ``u v`` edges, source,
goal) followed by one MASK; the label is the goal's predecessor, i.e. the ``u`` of the edge ``(u, goal)``.
Every path-finding model must learn this lookup (or its successor twin) before it can solve any star task. It
takes two composed attention steps: fetch each edge's partner, then match the goal against it. Chance is
about 1/13.

``--task masked`` probes the same skill inside the real training signal of a fixed-layout masked diffusion
model: each row keeps prompt, BOS and EOS, masks every target token with probability ``t ~ U(0, 1)`` (one ``t``
per row), and the accuracy counts only masked tokens at the lookup positions (all but the first and last target
tokens, which copy the source and the goal).

Each variant trains the project's backbone (``TransformerConfig``; ``conv_kernel`` is the only difference
between the paired rows) with the same seed and data order, in this process, one after the other, and prints
the first step at which the accuracy over the last 100 training batches passes ``--threshold``, or "not
within N". The last line prints the ratio of steps (without conv / with conv) where both broke through.

Run: ``python benchmarks/probe_lookup.py [--task lookup|masked] [--steps 2000] [--lrs 3e-3 1e-2] [--layers 2]``
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from common import parse_setting

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.nn.transformer import Transformer, TransformerConfig


def task_batch(net: Transformer, head: torch.nn.Module, b: dict, dm: StarGraphDataModule,
               task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N, V) and labels (N,) of the predicted tokens, and which of them the accuracy counts (N,) bool."""
    ids, fixed = b["input_ids"], b["fixed"]
    if task == "masked":
        valid = b["attention_mask"].bool()
        real = valid & ~fixed  # target tokens (BOS and EOS are fixed)
        masked = real & (torch.rand(ids.shape) < torch.rand(ids.shape[0], 1))
        first = real.long().argmax(1, keepdim=True)
        last = real.shape[1] - 1 - real.flip(1).long().argmax(1, keepdim=True)
        col = torch.arange(ids.shape[1])[None]
        lookup = masked & (col > first) & (col < last)  # not the source or goal copies
        logits = head(net(ids.masked_fill(masked, dm.tokenizer.mask_id), None, valid)[0])
        return logits[masked], ids[masked], lookup[masked]
    prompt_len = int(fixed[0].long().argmin())  # fixed prompt block, then BOS (also fixed), then target
    x = ids[:, : prompt_len + 1].clone()
    x[:, prompt_len] = dm.tokenizer.mask_id
    # target layout: BOS, (s a1) (a1 a2) ... (a_k goal): the goal's predecessor sits 3 before EOS
    eos = (ids == dm.tokenizer.eos_id).long().argmax(1)
    y = ids.gather(1, (eos - 3)[:, None]).squeeze(1)
    return head(net(x, None, None)[0][:, -1]), y, torch.ones_like(y, dtype=torch.bool)


def probe(dm: StarGraphDataModule, conv_kernel: int, lr: float, args: argparse.Namespace,
          variant: dict | None = None) -> tuple[int | None, float]:
    """Train on the lookup; return (first step past the threshold or None, seconds). ``variant`` overrides
    backbone settings (``TransformerConfig`` fields) on top of the probe's own."""
    torch.manual_seed(args.seed)
    V = dm.tokenizer.vocab_size
    base = dict(num_layers=args.layers, d_model=args.width, num_heads=args.heads, dropout=0.0,
                absolute_positions=True, time_conditioning=False, conv_kernel=conv_kernel)
    cfg = TransformerConfig(**{**base, **(variant or {})})
    net = Transformer(V, cfg, max_length=dm.max_length)
    head = torch.nn.Linear(args.width, V)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    loader = dm.train_dataloader()
    it, hits, t0 = iter(loader), [], time.time()
    for step in range(1, args.steps + 1):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        logits, labels, scored = task_batch(net, head, b, dm, args.task)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hits.append((logits[scored].argmax(-1) == labels[scored]).float().mean().item())
        if step >= 100 and sum(hits[-100:]) / 100 >= args.threshold:
            return step, time.time() - t0
    print(f"    accuracy over the last 100 batches at step {args.steps}: {sum(hits[-100:]) / len(hits[-100:]):.3f}",
          flush=True)
    return None, time.time() - t0


def compare_variants(dm: StarGraphDataModule, args: argparse.Namespace) -> None:
    """Probe each ``--variants`` backbone at each learning rate; print steps and the ratio to the first variant."""
    variants = [parse_setting(v) for v in args.variants]
    for lr in args.lrs:
        steps = []
        for text, var in zip(args.variants, variants):
            step, sec = probe(dm, 0, lr, args, var)
            steps.append(step)
            print(f"lr {lr:g}  {text}: {f'step {step}' if step else f'not within {args.steps}'}  ({sec:.0f} s)",
                  flush=True)
        for text, step in zip(args.variants[1:], steps[1:]):
            if steps[0] and step:
                print(f"lr {lr:g}: steps {args.variants[0]} / {text} = x{steps[0] / step:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["lookup", "masked"], default="lookup")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--kernels", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="instead of the --kernels axis: backbone settings to compare, each 'key=value,...' over "
                         "TransformerConfig fields, e.g. 'conv_kernel=3' 'conv_kernel=3,qk_init=tied'; the first "
                         "is the baseline of the printed ratios")
    ap.add_argument("--data-dir", default=os.path.join("benchmarks", "out", "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dm = StarGraphDataModule(preset="easy", data_dir=args.data_dir, batch_size=args.batch_size)
    dm.prepare_data()
    dm.setup("fit")
    print(f"probe ({args.task}): {args.layers} x {args.width}, batch {args.batch_size}, threshold {args.threshold}, "
          f"up to {args.steps} steps", flush=True)
    if args.variants:
        compare_variants(dm, args)
        return
    results = {}
    for lr in args.lrs:
        for k in args.kernels:
            step, sec = probe(dm, k, lr, args)
            results[(lr, k)] = step
            shown = f"step {step}" if step else f"not within {args.steps}"
            print(f"lr {lr:g}  conv_kernel {k}: {shown}  ({sec:.0f} s)", flush=True)
    for lr in args.lrs:
        base, conv = results.get((lr, 0)), [results.get((lr, k)) for k in args.kernels if k]
        for k, s in zip([k for k in args.kernels if k], conv):
            if base and s:
                print(f"lr {lr:g}: steps without / with conv_kernel {k} = x{base / s:.2f}")
            else:
                print(f"lr {lr:g}: without conv {base or f'>{args.steps}'}, conv_kernel {k}: {s or f'>{args.steps}'}")


if __name__ == "__main__":
    main()
