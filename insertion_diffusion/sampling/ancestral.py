"""Ancestral sampler for fixed-length absorbing-state masked diffusion (MDLM), vectorised.

Time runs from ``t = 0`` (every generated position masked) to ``t = 1`` (clean), as in the rest of the package:
a position is clean at time ``t`` with probability ``F(t)`` (the unmasking schedule's CDF). Over a step
``t -> s`` each still-masked position is revealed with probability ``(F(s) - F(t)) / (1 - F(t))`` and takes a
token drawn from the model's (SUBS) distribution; with a confidence mode the same number of positions per row is
revealed, but the most confident ones. The last step reveals everything (argmax).

Caching: without time conditioning the network's output depends on the tokens only, so when a step reveals
nothing the previous logits are reused and the network is skipped (``SampleStats.network_calls`` counts the
evaluations actually run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, uniform
from insertion_diffusion.sampling.filters import (
    CONFIDENCE_MODES,
    check_steps,
    check_token_filters,
    confidence_scores,
    sample_tokens,
)
from insertion_diffusion.schedules import Schedule


@dataclass
class MDLMSamplerConfig:
    """Settings of the ancestral sampler.

    Attributes:
        steps: number of steps S.
        top_k, top_p, temperature: token filtering (``top_k=1``: greedy).
        confidence: "none" (reveal positions at random, the ancestral sampler), or "top_prob", "prob_diff",
            "entropy" (reveal the same number per row, most confident first).
        cache: skip the network when the previous step revealed nothing (exact only for a time-independent
            network; the model turns it off otherwise).
        val_steps: steps of the validations that run inside ``fit`` (None: ``steps``).
    """

    steps: int = 100
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    confidence: str = "none"
    cache: bool = True
    val_steps: int | None = None

    def __post_init__(self) -> None:
        check_steps(self.steps, self.val_steps)
        if self.confidence not in CONFIDENCE_MODES:
            raise ValueError(f"sampler.confidence={self.confidence!r}; allowed values: {', '.join(CONFIDENCE_MODES)}")
        check_token_filters(self.top_k, self.top_p, self.temperature)


@dataclass
class SampleStats:
    """Counters of one sampling run: ``network_calls`` evaluations over ``steps`` steps."""

    steps: int = 0
    network_calls: int = 0


@torch.no_grad()
def ancestral_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    masked: Tensor,
    schedule: Schedule,
    cfg: MDLMSamplerConfig,
    banned_ids: Sequence[int] = (),
    generator: NoiseSource = None,
    time_dependent: bool = False,
) -> tuple[Tensor, SampleStats]:
    """Fill the masked positions of ``x``.

    Args:
        model_fn: ``model_fn(x (B, W), t (B,)) -> logits (B, W, V)``.
        x: (B, W) start tokens: MASK where ``masked``, fixed tokens (prompt, EOS) and PAD elsewhere.
        masked: (B, W) bool, the positions to generate.
        schedule: the unmasking schedule (CDF ``F``).
        cfg: sampler settings; banned_ids: ids never sampled (specials).
        generator: randomness of reveals and tokens (a ``torch.Generator``, None, or a per-row ``RowRNG``).
        time_dependent: whether ``model_fn`` uses ``t`` (disables the skip-if-unchanged cache).

    Returns:
        ``(x, stats)`` with every masked position filled.
    """
    x, masked = x.clone(), masked.clone()
    B, device = x.shape[0], x.device
    grid = torch.linspace(0.0, 1.0, cfg.steps + 1, device=device)
    banned = list(banned_ids)
    use_cache = cfg.cache and not time_dependent
    stats = SampleStats(steps=cfg.steps)
    logits, changed = None, True
    for i in range(cfg.steps):
        t, s = grid[i], grid[i + 1]
        if logits is None or changed or not use_cache:
            logits = model_fn(x, t.expand(B)).float()
            if banned:
                logits[..., banned] = float("-inf")
            stats.network_calls += 1
        last = i == cfg.steps - 1
        if last:
            reveal = masked
            tokens = logits.argmax(-1)
        else:
            Ft, Fs = schedule.cdf(t), schedule.cdf(s)
            p = ((Fs - Ft) / (1.0 - Ft).clamp_min(1e-12)).clamp(0.0, 1.0)
            u = uniform(x.shape, generator, device, f"reveal/{i}")
            reveal = masked & (u < p)
            if cfg.confidence != "none":
                # Keep each row's number of reveals, give them to its most confident masked positions.
                k = reveal.sum(1, keepdim=True)
                score = confidence_scores(logits, cfg.confidence).masked_fill(~masked, float("-inf"))
                rank = score.argsort(1, descending=True).argsort(1)
                reveal = masked & (rank < k)
            tokens = sample_tokens(logits, cfg.top_k, cfg.top_p, cfg.temperature, generator, f"tokens/{i}")
        x = torch.where(reveal, tokens, x)
        masked = masked & ~reveal
        if use_cache:
            changed = bool(reveal.any())
    return x, stats
