"""Token choice from logits: temperature, top-k, top-p (nucleus), greedy, and confidence scores."""

from __future__ import annotations

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, categorical

CONFIDENCE_MODES = ("none", "top_prob", "prob_diff", "entropy")


def check_steps(steps: int, val_steps: int | None = None) -> None:
    """Validate a step-based sampler's step counts; errors name the ``sampler.*`` key."""
    if steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {steps}")
    if val_steps is not None and val_steps < 1:
        raise ValueError(f"sampler.val_steps must be >= 1 or null, got {val_steps}")


def check_token_filters(top_k: int | None, top_p: float | None, temperature: float) -> None:
    """Validate the token-choice settings every sampler config shares; errors name the ``sampler.*`` key."""
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampler.top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sampler.top_k must be >= 1 or null, got {top_k}")
    if temperature < 0:
        raise ValueError(f"sampler.temperature must be >= 0, got {temperature}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0) -> Tensor:
    """Apply temperature, then top-k, then top-p to logits (..., V); removed entries become -inf."""
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-6)
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: NoiseSource = None,
    stream: str = "tokens",
) -> Tensor:
    """Draw one token per position from filtered logits (..., V) -> (...). ``top_k=1`` is greedy.

    ``generator``: a ``torch.Generator``/``None``, or a :class:`~insertion_diffusion.process.rng.RowRNG` over the
    rows (``logits.shape[0]``), whose ``stream`` names the draw (give every step its own).
    """
    if top_k == 1 or temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float(), top_k, top_p, temperature)
    return categorical(logits.softmax(-1), generator, stream)


def confidence_scores(logits: Tensor, mode: str) -> Tensor:
    """Per-position confidence (higher = unmask first) from logits (..., V) -> (...)."""
    probs = logits.float().softmax(-1)
    if mode == "top_prob":
        return probs.max(-1).values
    if mode == "prob_diff":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if mode == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)  # negative entropy
    raise ValueError(f"confidence={mode!r}; allowed values: {', '.join(CONFIDENCE_MODES)}")
