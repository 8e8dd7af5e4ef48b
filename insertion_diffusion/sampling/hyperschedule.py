"""Block-annealed sampling for the hyperschedule model (HDLM), with a key/value cache, vectorised.

The clock of :class:`~insertion_diffusion.process.hyperschedule.BlockAnnealing` advances ``steps`` ticks per
block. At every tick each still-masked generated column of a block inside the window is revealed with
probability ``(F(tau') - F(tau)) / (1 - F(tau))`` (its local times before and after the tick), as in MDLM's
ancestral sampler; with a confidence mode the row's number of reveals goes to its most confident columns; a
block whose local time reaches 1 reveals whatever is left. Optionally (``correction_threshold``, for models
trained with epsilon-hybrid noise) already revealed tokens of unfinished blocks whose probability under the
model falls below the threshold are redrawn: the adaptive correction sampler.

Columns are the same for every row (prompts of different lengths end in different blocks; a row's prompt
columns are simply never masked), so all rows share one clock and one cache. Attention is block-causal, so a
block that is clean never changes again and neither do its keys and values: each network call runs only the
columns from the first unfinished block to the last block the window has reached (:class:`CachedWindow`),
against the cached keys of everything before. :class:`RecomputeWindow` re-runs every column before the window
instead; both give the same logits up to float rounding (tested) and the benchmark compares their speed.

Variable length: the generated part is ``[target][EOS][PAD...]`` up to the model's width. A row is finished
once an EOS or PAD lies in a clean block; the loop stops when every row is finished (one host sync per block,
none per tick), and the row is cut after its first EOS/PAD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.hyperschedule import BlockAnnealing
from insertion_diffusion.process.rng import NoiseSource, uniform
from insertion_diffusion.sampling.filters import (
    CONFIDENCE_MODES,
    check_steps,
    check_token_filters,
    confidence_scores,
    sample_tokens,
)


@dataclass
class HDLMSamplerConfig:
    """Settings of the block-annealed sampler.

    Attributes:
        steps: ticks per block (the whole run takes ``steps * (blocks + window - 1)`` ticks at most).
        top_k, top_p, temperature: token filtering (``top_k=1``: greedy).
        confidence: "none" (reveal at random, the ancestral rule), or "top_prob", "prob_diff", "entropy".
        correction_threshold: redraw revealed tokens of unfinished blocks whose model probability is below
            this (None: off). Only meaningful for a model trained with ``hybrid_eps > 0``.
        use_cache: keep the keys and values of finished blocks (:class:`CachedWindow`).
        val_steps: ticks per block of the validations inside ``fit`` (None: ``steps``).
    """

    steps: int = 16
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    confidence: str = "none"
    correction_threshold: float | None = None
    use_cache: bool = True
    val_steps: int | None = None

    def __post_init__(self) -> None:
        check_steps(self.steps, self.val_steps)
        if self.confidence not in CONFIDENCE_MODES:
            raise ValueError(f"sampler.confidence={self.confidence!r}; allowed values: {', '.join(CONFIDENCE_MODES)}")
        check_token_filters(self.top_k, self.top_p, self.temperature)
        thr = self.correction_threshold
        if thr is not None and not 0.0 < thr < 1.0:
            raise ValueError(f"sampler.correction_threshold={thr} must be in (0, 1), or null to turn correction off")


@dataclass
class HDLMSampleStats:
    """Counters of one sampling run: ticks run, network calls, and the columns those calls computed."""

    steps: int = 0
    network_calls: int = 0
    columns: int = 0
    corrections: int = 0


class CachedWindow:
    """Runs columns ``pos .. end-1`` against cached keys/values of the columns before ``pos``.

    Args:
        step: ``step(tokens (B, n), cache, pos) -> logits (B, n, V)`` (a block-causal transformer's
            ``forward_cached`` and its head).
        new_cache: ``new_cache(batch_size) -> cache`` with room for the full width.
    """

    def __init__(self, step: Callable[[Tensor, object, int], Tensor], new_cache: Callable[[int], object]) -> None:
        self.step, self.new_cache, self.cache = step, new_cache, None
        self.columns = 0  # columns run through the network so far

    def __call__(self, x: Tensor, pos: int, end: int) -> Tensor:
        if self.cache is None:
            if pos != 0:
                raise ValueError("the first call of a CachedWindow must start at column 0 (the prefill)")
            self.cache = self.new_cache(x.shape[0])
        self.columns += end - pos
        return self.step(x[:, pos:end], self.cache, pos)


class RecomputeWindow:
    """Re-runs every column before ``end`` each call: ``full(tokens (B, end)) -> logits (B, end, V)``."""

    def __init__(self, full: Callable[[Tensor], Tensor]) -> None:
        self.full = full
        self.columns = 0

    def __call__(self, x: Tensor, pos: int, end: int) -> Tensor:
        self.columns += end
        return self.full(x[:, :end])[:, pos:end]


@torch.no_grad()
def hyperschedule_sample(
    window_fn: Callable[[Tensor, int, int], Tensor],
    x: Tensor,
    region: Tensor,
    annealing: BlockAnnealing,
    cfg: HDLMSamplerConfig,
    end_ids: Sequence[int],
    banned_ids: Sequence[int] = (),
    generator: NoiseSource = None,
) -> tuple[Tensor, HDLMSampleStats]:
    """Generate the ``region`` columns of ``x``.

    Args:
        window_fn: ``window_fn(x (B, W), pos, end) -> logits (B, end - pos, V)`` (:class:`CachedWindow` or
            :class:`RecomputeWindow`, whose ``columns`` counter ends up in the stats); calls come with ``pos``
            never decreasing.
        x: (B, W) start tokens: the prompt, MASK on ``region``.
        region: (B, W) bool, the generated columns (a suffix of each row).
        annealing: the block hyperschedule.
        cfg: sampler settings.
        end_ids: ids that end a row (EOS, PAD): the row is cut after the first one, which becomes ``end_ids[0]``.
        banned_ids: ids never sampled (MASK, BOS).
        generator: randomness of reveals and tokens (a ``torch.Generator``, None, or a per-row ``RowRNG``).

    Returns:
        ``(x, stats)``: (B, W) tokens, the generated part ending in ``end_ids[0]`` then ``end_ids[-1]``
        padding (a row that filled the width has no end token).
    """
    x, masked = x.clone(), region.clone()
    B, W = x.shape
    device = x.device
    stats = HDLMSampleStats()
    if not bool(region.any()):
        return x, stats
    b, w, S = annealing.block_size, annealing.window, cfg.steps
    blocks = annealing.blocks(W, device)
    cols = torch.arange(W, device=device)
    first_col = torch.where(region, cols[None], torch.full_like(x, W)).min(1).values
    k0 = int(first_col.min()) // b  # blocks before k0 hold prompt columns only: clean from the start
    last = (W - 1) // b
    eos_id, pad_id = end_ids[0], end_ids[-1]
    end_tensor = torch.tensor(list(end_ids), device=device)
    banned = list(banned_ids)
    corrections = torch.zeros((), dtype=torch.long, device=device)
    cache_pos = 0  # columns before this have final keys/values
    for i in range((last + w - k0) * S):
        t0, t1 = k0 * S + i, k0 * S + i + 1  # clock, in ticks
        end = min(W, -(-t1 // S) * b)  # blocks the window has reached: tau(t1) > 0
        clean = min(W, max(k0, t0 // S - w + 1) * b)  # blocks already clean before this tick
        logits = window_fn(x, cache_pos, end).float()
        stats.network_calls += 1
        if banned:
            logits[..., banned] = float("-inf")
        win = slice(cache_pos, end)
        kb = blocks[win].float()
        tau0 = ((t0 / S - kb) / w).clamp(0.0, 1.0)
        tau1 = ((t1 / S - kb) / w).clamp(0.0, 1.0)
        F0, F1 = annealing.schedule.cdf(tau0), annealing.schedule.cdf(tau1)
        p = ((F1 - F0) / (1.0 - F0).clamp_min(1e-12)).clamp(0.0, 1.0)
        m = masked[:, win]
        # Streams are named by the absolute tick and drawn over every column, then cut to the window: a row's
        # noise then depends on the row alone, not on which other rows (and shortest prompt) share its batch.
        u = uniform((B, W), generator, device, f"reveal/{t0}")[:, win]
        reveal = m & (u < p[None])
        if cfg.confidence != "none":
            # Keep each row's number of reveals, give them to its most confident masked columns in the window.
            k = reveal.sum(1, keepdim=True)
            candidates = m & (p[None] > 0)
            score = confidence_scores(logits, cfg.confidence).masked_fill(~candidates, float("-inf"))
            rank = score.argsort(1, descending=True).argsort(1)
            reveal = candidates & (rank < k)
        reveal = reveal | (m & (tau1 >= 1.0)[None])
        if cfg.top_k == 1 or cfg.temperature == 0.0:
            tokens = logits.argmax(-1)
        else:
            padded = logits.new_zeros(B, W, logits.shape[-1])
            padded[:, win] = logits
            tokens = sample_tokens(padded, cfg.top_k, cfg.top_p, cfg.temperature, generator, f"tokens/{t0}")[:, win]
        current = x[:, win]
        new = torch.where(reveal, tokens, current)
        if cfg.correction_threshold is not None:
            # Only unfinished blocks: a clean block's keys become final with this call.
            p_cur = logits.softmax(-1).gather(-1, current[..., None]).squeeze(-1)
            open_cols = cols[win] >= clean
            fix = region[:, win] & ~m & open_cols[None] & (p_cur < cfg.correction_threshold)
            new = torch.where(fix, tokens, new)
            corrections += fix.sum()
        x[:, win] = new
        masked[:, win] = m & ~reveal
        cache_pos = clean
        stats.steps += 1
        finished = t1 // S - w  # the block (if any) this tick completed
        if t1 % S == 0 and finished >= k0:
            upto = min(W, (finished + 1) * b)
            done = (region[:, :upto] & torch.isin(x[:, :upto], end_tensor)).any(1)
            if bool(done.all()):
                break
    stats.corrections = int(corrections)
    stats.columns = getattr(window_fn, "columns", 0)
    # Cut each row after its first end token (columns never revealed lie after it when the loop stopped early).
    x = torch.where(masked, torch.full_like(x, pad_id), x)
    ended = region & torch.isin(x, end_tensor)
    after = (ended.long().cumsum(1) - ended.long()) > 0
    first = ended & ~after
    x = torch.where(after & region, torch.full_like(x, pad_id), x)
    x = torch.where(first, torch.full_like(x, eos_id), x)
    return x, stats
