"""The element-wise costs of a transformer block on CPU: GELU variants, dropout, attention dropout.

Why this exists: a profile of the FlexMDM training step (4 x 256, batch 64, ~38 tokens, fp32) showed that the
tanh-approximated GELU and the dropout masks took ~15 % of the step on this CPU, next to matmuls that already
run near the measured peak. This script times each choice at the step's shapes in one process and prints the
ratio to the alternative the backbone now uses (see docs/benchmarks.md):

- GELU on the feed-forward hidden activations (B, W, 4d): tanh approximation vs exact (erf);
- ``F.scaled_dot_product_attention`` with and without ``dropout_p`` (a non-zero value forces the math path);
- dropout on a (B, W, d) block output, forward + backward: ``nn.Dropout`` (a ``bernoulli_`` mask) vs the
  backbone's :class:`~insertion_diffusion.nn.transformer.Dropout` (four 15-bit uniforms per 64-bit draw);
- forward + backward of one whole block with the old and new settings.

Run: ``python benchmarks/speed_elementwise.py [--threads 2] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds

from insertion_diffusion.nn.transformer import Dropout, Transformer, TransformerConfig


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=38, help="tokens per row")
    ap.add_argument("--d-model", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, W, d = args.batch, args.width, args.d_model
    hidden = torch.randn(B, W, 4 * d)
    q, k, v = (torch.randn(B, 4, W, d // 4) for _ in range(3))
    keep = torch.ones(B, 1, 1, W, dtype=torch.bool)
    rows = []

    def pair(name: str, old: Callable[[], object], new: Callable[[], object]) -> None:
        t_old, t_new = median_ms(old, args.repeats), median_ms(new, args.repeats)
        rows.append((name, t_old, t_new))

    pair("GELU (B, W, 4d): tanh -> exact", lambda: F.gelu(hidden, approximate="tanh"), lambda: F.gelu(hidden))
    pair("attention: dropout_p 0.1 -> 0", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.1),
         lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep))

    act = torch.randn(B, W, d, requires_grad=True)
    old_drop, new_drop = torch.nn.Dropout(0.1), Dropout(0.1)
    pair("dropout 0.1 on (B, W, d), fwd + bwd: bernoulli_ -> 15-bit",
         lambda: old_drop(act).sum().backward(), lambda: new_drop(act).sum().backward())

    def block_step(net: Transformer, x: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            net.zero_grad(set_to_none=True)
            net(x, t, None)[0].square().mean().backward()
        return run

    x = torch.randint(0, 24, (B, W))
    t = torch.rand(B)
    nets = {}
    for name, attn_p in (("old", 0.1), ("new", 0.0)):
        torch.manual_seed(0)
        cfg = TransformerConfig(num_layers=1, d_model=d, num_heads=4, d_cond=128, dropout=0.1, attention_dropout=attn_p)
        nets[name] = Transformer(24, cfg).train()
    # The old block also used the tanh GELU and nn.Dropout: swap them back in for the "old" timing.
    nets["old"].blocks[0].ff[1] = torch.nn.GELU(approximate="tanh")
    nets["old"].blocks[0].drop = torch.nn.Dropout(0.1)
    pair("one block, fwd + bwd (dropout 0.1): old -> new", block_step(nets["old"], x, t), block_step(nets["new"], x, t))

    print(f"element-wise costs, batch {B}, {W} tokens, d_model {d}, fp32, {torch.get_num_threads()} threads "
          f"(median of {args.repeats})")
    for name, t_old, t_new in rows:
        print(f"{name:<58} {t_old:8.2f} ms -> {t_new:8.2f} ms   x{t_old / t_new:.2f}")


if __name__ == "__main__":
    main()
