"""The element-wise costs of a transformer block on CPU: GELU variants, dropout, attention dropout.

Why this exists: a profile of the FlexMDM training step (4 x 256, batch 64, ~38 tokens, fp32) showed that the
tanh-approximated GELU and the dropout masks took ~15 % of the step on this CPU, next to matmuls that already
run near the measured peak. This script times each choice at the step's shapes in one process and prints the
ratio to the alternative the backbone now uses (see docs/benchmarks.md):

- GELU on the feed-forward hidden activations (B, W, 4d): tanh approximation vs exact (erf);
- ``F.scaled_dot_product_attention`` with and without ``dropout_p`` (a non-zero value forces the math path);
- dropout on a (B, W, d) block output, forward + backward: ``nn.Dropout`` (a ``bernoulli_`` mask) vs the
  backbone's :class:`~insertion_diffusion.nn.transformer.Dropout` (four 15-bit uniforms per 64-bit draw);
- forward + backward of one whole block with the old and new settings;
- forward + backward of four blocks with the element-wise steps written as separate multiplies and adds
  (the backbone up to the thirteenth session) vs fused into ``torch.addcmul`` (AdaLN modulation, gated
  residuals, rotary halves) and a dropout that multiplies by its bool mask directly.

Run: ``python benchmarks/speed_elementwise.py [--threads 2] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds

import insertion_diffusion.nn.transformer as backbone
from insertion_diffusion.nn.transformer import Dropout, Transformer, TransformerConfig


# The unfused element-wise steps, as the backbone wrote them up to the thirteenth session: the baseline of the
# "fused" row. Each multiply and each add is its own pass over the activations.
def _rotary_unfused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def _modulate_unfused(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _post_attention_unfused(self: backbone.Block, x: torch.Tensor, a: torch.Tensor, mod: tuple) -> torch.Tensor:
    g1, sh2, sc2, g2 = mod
    a = self.drop(self.proj(a))
    x = x + (a if g1 is None else g1[:, None, :] * a)
    h = self.norm2(x) if g2 is None else _modulate_unfused(self.norm2(x), sh2, sc2)
    f = self.drop(self.ff(h))
    return x + (f if g2 is None else g2[:, None, :] * f)


def _dropout_float_mask(self: Dropout, x: torch.Tensor) -> torch.Tensor:
    threshold = round(self.p * 32768)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    keep = (bits.view(torch.int16)[: x.numel()] & 0x7FFF) >= threshold
    return x * keep.view(x.shape).to(x.dtype).mul_(32768 / (32768 - threshold))


@contextlib.contextmanager
def unfused_elementwise() -> Iterator[None]:
    """Swap the unfused steps into the backbone module for the duration (the benchmark's baseline)."""
    saved = (backbone.apply_rotary, backbone.modulate, backbone.Block._post_attention, Dropout.forward)
    backbone.apply_rotary, backbone.modulate = _rotary_unfused, _modulate_unfused
    backbone.Block._post_attention, Dropout.forward = _post_attention_unfused, _dropout_float_mask
    try:
        yield
    finally:
        backbone.apply_rotary, backbone.modulate, backbone.Block._post_attention, Dropout.forward = saved


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

    def unfused(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with unfused_elementwise():
                fn()
        return run

    # Four blocks, as in speed_flexmdm.py's configuration; the same network, timed unfused and then fused.
    torch.manual_seed(0)
    cfg4 = TransformerConfig(num_layers=4, d_model=d, num_heads=4, d_cond=128, dropout=0.1)
    net4 = Transformer(24, cfg4).train()
    pair("4 blocks, fwd + bwd (dropout 0.1): unfused -> addcmul",
         unfused(block_step(net4, x, t)), block_step(net4, x, t))

    print(f"element-wise costs, batch {B}, {W} tokens, d_model {d}, fp32, {torch.get_num_threads()} threads "
          f"(median of {args.repeats})")
    for name, t_old, t_new in rows:
        print(f"{name:<58} {t_old:8.2f} ms -> {t_new:8.2f} ms   x{t_old / t_new:.2f}")


if __name__ == "__main__":
    main()
