"""Left-to-right decoding for autoregressive models, vectorised over the batch.

Rows have prompts of different lengths. Decoding starts at the shortest prompt; a row whose prompt is still
running at position ``p`` is fed its own prompt token there (teacher forcing) instead of a sampled one, so every
row advances one position per step and the key/value cache needs no padding mask. A row that has emitted EOS
keeps producing PAD; the loop ends when every row is done or the width is full. The only Python loop is over
positions.

The network is reached through a :class:`Decoder`: :class:`CachedDecoder` keeps per-layer keys and values and
runs one new position per step; :class:`RecomputeDecoder` re-runs the whole prefix each step (the reference the
cache is tested and benchmarked against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource
from insertion_diffusion.sampling.filters import check_token_filters, sample_tokens


@dataclass
class ARSamplerConfig:
    """Settings of autoregressive decoding.

    Attributes:
        top_k: keep the k most likely tokens (1 = greedy; None = all).
        top_p: nucleus mass (None or 1.0 = off).
        temperature: logits temperature (0 = greedy).
        use_cache: keep keys/values of past positions (one position of compute per step) instead of
            re-running the prefix.
    """

    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    use_cache: bool = True

    def __post_init__(self) -> None:
        check_token_filters(self.top_k, self.top_p, self.temperature)


class Decoder:
    """Next-token logits for a growing batch of sequences that share positions."""

    def start(self, prefix: Tensor) -> Tensor:
        """Consume ``prefix`` (B, P) (positions ``0..P-1``); return logits (B, V) for position ``P``."""
        raise NotImplementedError

    def advance(self, token: Tensor, pos: int) -> Tensor:
        """Consume ``token`` (B,) at position ``pos``; return logits (B, V) for position ``pos + 1``."""
        raise NotImplementedError


class CachedDecoder(Decoder):
    """Incremental decoding with a key/value cache.

    Args:
        step: ``step(tokens (B, n), cache, pos) -> logits (B, n, V)`` (e.g. a causal transformer's
            ``forward_cached`` followed by its head).
        new_cache: ``new_cache(batch_size) -> cache`` with room for the full width.
    """

    def __init__(self, step: Callable[[Tensor, object, int], Tensor], new_cache: Callable[[int], object]) -> None:
        self.step, self.new_cache, self.cache = step, new_cache, None

    def start(self, prefix: Tensor) -> Tensor:
        self.cache = self.new_cache(prefix.shape[0])
        return self.step(prefix, self.cache, 0)[:, -1]

    def advance(self, token: Tensor, pos: int) -> Tensor:
        return self.step(token[:, None], self.cache, pos)[:, -1]


class RecomputeDecoder(Decoder):
    """Re-runs the full prefix every step: ``full(tokens (B, W)) -> logits (B, W, V)``."""

    def __init__(self, full: Callable[[Tensor], Tensor]) -> None:
        self.full, self.prefix = full, None

    def start(self, prefix: Tensor) -> Tensor:
        self.prefix = prefix
        return self.full(prefix)[:, -1]

    def advance(self, token: Tensor, pos: int) -> Tensor:
        self.prefix = torch.cat([self.prefix[:, :pos], token[:, None]], dim=1)
        return self.full(self.prefix)[:, -1]


@torch.no_grad()
def autoregressive_decode(
    decoder: Decoder,
    prompt: Tensor,
    prompt_len: Tensor,
    width: int,
    cfg: ARSamplerConfig,
    eos_id: int,
    pad_id: int,
    banned_ids: Sequence[int] = (),
    generator: NoiseSource = None,
) -> tuple[Tensor, Tensor]:
    """Decode every row after its prompt until EOS or ``width``.

    Args:
        decoder: the network (see :class:`Decoder`).
        prompt: (B, >= max prompt_len) the prompts, left-aligned (anything beyond a row's length is ignored).
        prompt_len: (B,) long, >= 1 (a start token at least).
        width: total positions (prompt included).
        cfg: sampling settings; eos_id / pad_id: the special ids; banned_ids: ids never sampled.
        generator: for the sampled tokens (a ``torch.Generator``, None, or a per-row ``RowRNG``).

    Returns:
        ``(x, lengths)``: (B, width) tokens (prompt, generated tokens, EOS, then PAD) and the (B,) lengths
        (EOS included; ``width`` for a row that never emitted EOS).
    """
    B, device = prompt.shape[0], prompt.device
    p0 = int(prompt_len.min())
    if p0 < 1 or int(prompt_len.max()) > width:
        raise ValueError(f"prompt lengths must be in [1, {width}], got {prompt_len.tolist()}")
    x = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    x[:, : prompt.shape[1]] = prompt[:, :width]
    cols = torch.arange(width, device=device)
    x = torch.where(cols[None] < prompt_len[:, None], x, torch.full_like(x, pad_id))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), width, dtype=torch.long, device=device)
    banned = list(banned_ids)
    logits = decoder.start(x[:, :p0])
    for p in range(p0, width):
        if banned:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        tok = sample_tokens(logits, cfg.top_k, cfg.top_p, cfg.temperature, generator, f"tokens/{p}")
        forced = p < prompt_len
        tok = torch.where(forced, x[:, p], tok)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        x[:, p] = tok
        ended = ~done & ~forced & (tok == eos_id)
        lengths = torch.where(ended, torch.full_like(lengths, p + 1), lengths)
        done = done | ended
        if p + 1 == width or bool(done.all()):
            break
        logits = decoder.advance(tok, p)
    return x, lengths
