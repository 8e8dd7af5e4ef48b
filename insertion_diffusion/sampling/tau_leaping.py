"""Tau-leaping sampler for insertion + unmasking models (FlexMDM / LoFlexMDM), vectorised.

State: a (B, L) batch of variable-length sequences (PAD beyond each length) that starts from the fixed
tokens (``[prompt][BOS][EOS]``, or just ``[EOS]``) and grows by inserting ``[MASK]`` tokens into gaps;
masks are then filled. Each step, over ``dt``:

1. the model gives token logits, per-gap insertion rates and per-mask unmasking rates;
2. each masked position fires with probability ``1 - exp(-rate * dt)`` and takes a token drawn from
   its (filtered) logits; a confidence mode keeps the number of firings per row but gives them to the
   most confident masks;
3. each allowed gap receives ``Poisson(rate * dt)`` new masks (a row whose insertions would exceed
   ``max_length`` inserts nothing this step);
4. on the last step every remaining mask takes its argmax token.

The only Python loop is over steps. Host synchronisations inside it: one reads the batch's longest length so
that the network runs on no more columns than needed (``trim``); with per-row noise (a ``RowRNG``, as in
evaluation) the insertion draw reads which gaps are open and their largest rate
(:func:`~insertion_diffusion.process.rng.poisson`, two more).
With ``trim`` off and a ``torch.Generator`` there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, poisson, uniform
from insertion_diffusion.sampling.filters import (
    CONFIDENCE_MODES,
    check_steps,
    check_token_filters,
    confidence_scores,
    sample_tokens,
)

# model_fn(x (B,W), t (B,), valid (B,W)[, t_next (B,)]) -> logits (B,W,V), insert_rate (B,W), unmask_rate (B,W).
# Given t_next (SamplerConfig.integrate_hazard), the two rates are the expected numbers of events over
# [t, t_next] (the schedule's hazard integrated over the step, the network's multipliers frozen at t).
RateModel = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass
class SamplerConfig:
    """Settings of the tau-leaping sampler.

    Attributes:
        steps: number of steps S (network evaluations).
        top_k: keep the k most likely tokens (1 = greedy; None = all).
        top_p: nucleus sampling mass (None or 1.0 = off).
        temperature: logits temperature.
        confidence: unmasking order: "none" (the model's rates), "top_prob", "prob_diff" or "entropy".
        t_end: final time (slightly below 1, where hazards diverge).
        trim: run the network only on the columns some row uses (the batch's current longest length)
            instead of the full ``max_length``. Fewer FLOPs while sequences are short, at the price of one
            host synchronisation per step (reading that length).
        integrate_hazard: a step's event counts use the schedule's hazard integrated over the step,
            ``Lambda(t + dt) - Lambda(t)``, instead of ``lambda(t) * dt``. Exact for the schedule part of the
            rates, and needed by schedules whose hazard diverges at ``t = 0`` (``poly:<p>`` with ``p < 1``,
            Kumaraswamy ``a < 1``): with ``lambda(0) * dt`` their first step asks for an unbounded number of
            insertions. Off by default (the recorded results used ``lambda(t) * dt``).
        val_steps: steps of the validations that run inside ``fit`` (None: ``steps``). Lets a config test with
            the paper's S (e.g. 500 on star graphs) while its periodic validations stay cheap.
    """

    steps: int = 100
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    confidence: str = "none"
    t_end: float = 1.0 - 1e-5
    trim: bool = True
    integrate_hazard: bool = False
    val_steps: int | None = None

    def __post_init__(self) -> None:
        check_steps(self.steps, self.val_steps)
        if self.confidence not in CONFIDENCE_MODES:
            raise ValueError(
                f"sampler.confidence={self.confidence!r}; allowed values: {', '.join(CONFIDENCE_MODES)}"
            )
        check_token_filters(self.top_k, self.top_p, self.temperature)


@dataclass
class SampleOutput:
    """Final state of a sampling run.

    Attributes:
        x: (B, L) tokens, PAD beyond each length.
        fixed: (B, L) bool, the fixed (prompt/BOS/EOS) positions.
        lengths: (B,) long.
        unmask_step: (B, L) long, the step at which each position was filled (-1 for fixed/pad).
        insert_step: (B, L) long, the step at which each position was inserted (-1 for fixed/pad).
    """

    x: Tensor
    fixed: Tensor
    lengths: Tensor
    unmask_step: Tensor
    insert_step: Tensor


def insert_masks(x: Tensor, counts: Tensor, lengths: Tensor, mask_id: int, pad_id: int, *extra: Tensor):
    """Insert ``counts[b, j]`` masks left of token ``j`` of each row (prefix-sum scatter).

    Args:
        x: (B, L) tokens; counts: (B, L) long, zero beyond each length; lengths: (B,).
        extra: further (B, L) per-position tensors moved along with their tokens; new positions get
            False / -1 fill (bool / integer tensors).

    Returns:
        ``(new_x, new_lengths, *moved_extra)``. The caller guarantees ``lengths + counts.sum(1) <= L``.
    """
    B, L = x.shape
    ar = torch.arange(L, device=x.device)[None, :]
    valid = ar < lengths[:, None]
    new_pos = ar + counts.cumsum(1)  # token j moves right by the masks inserted at and before it
    new_lengths = lengths + counts.sum(1)
    # Invalid slots are sent to a dummy column L that is cut off afterwards.
    dest = torch.where(valid, new_pos, torch.full_like(new_pos, L))
    new_valid = ar < new_lengths[:, None]
    out_x = torch.where(new_valid, torch.full_like(x, mask_id), torch.full_like(x, pad_id))
    out_x = torch.cat([out_x, out_x[:, :1]], 1).scatter(1, dest, x)[:, :L]
    moved = []
    for e in extra:
        fill = torch.zeros_like(e) if e.dtype == torch.bool else torch.full_like(e, -1)
        moved.append(torch.cat([fill, fill[:, :1]], 1).scatter(1, dest, e)[:, :L])
    return (out_x, new_lengths, *moved)


@torch.no_grad()
def tau_leaping(
    model_fn: RateModel,
    x: Tensor,
    fixed: Tensor,
    lengths: Tensor,
    cfg: SamplerConfig,
    *,
    max_length: int,
    mask_id: int,
    pad_id: int,
    eos_id: int,
    banned_ids: tuple[int, ...] = (),
    generator: NoiseSource = None,
) -> SampleOutput:
    """Generate by tau-leaping from an initial state.

    Args:
        model_fn: maps ``(x, t, valid)`` to ``(logits, insert_rate, unmask_rate)``.
        x: (B, W0) initial tokens (the fixed tokens of each row, PAD beyond ``lengths``).
        fixed: (B, W0) bool, which initial tokens are fixed (all real ones, normally).
        lengths: (B,) initial lengths.
        cfg: sampler settings.
        max_length: hard cap on every row's length (the state is padded to this width).
        mask_id, pad_id, eos_id: special ids.
        banned_ids: token ids never produced at unmasking (PAD, MASK, BOS, EOS).
        generator: RNG for reproducible sampling: a ``torch.Generator`` (or None), or a ``RowRNG`` over the rows,
            with which every row's sample depends on its own row id only (not on the batch it is in).
    """
    B, W0 = x.shape
    if W0 > max_length:
        raise ValueError(f"initial state width {W0} exceeds max_length={max_length}")
    device = x.device
    pad = max_length - W0
    x = torch.nn.functional.pad(x, (0, pad), value=pad_id)
    fixed = torch.nn.functional.pad(fixed, (0, pad), value=False)
    lengths = lengths.clone()
    unmask_step = torch.full_like(x, -1)
    insert_step = torch.full_like(x, -1)
    ar = torch.arange(max_length, device=device)[None, :]
    dt = cfg.t_end / (cfg.steps + 1)
    banned = torch.tensor(sorted(set(banned_ids)), device=device, dtype=torch.long)

    # With integrate_hazard the model returns expected events over the step: the step length is already in them.
    scale = 1.0 if cfg.integrate_hazard else dt
    for step in range(cfg.steps):
        t = torch.full((B,), step * dt, device=device)
        span = (t + dt,) if cfg.integrate_hazard else ()
        valid = ar < lengths[:, None]
        if cfg.trim:
            width = int(lengths.max())
            logits, insert_rate, unmask_rate = model_fn(x[:, :width], t, valid[:, :width], *span)
            extra = max_length - width
            if extra:
                logits = torch.nn.functional.pad(logits.float(), (0, 0, 0, extra))
                insert_rate = torch.nn.functional.pad(insert_rate, (0, extra))
                unmask_rate = torch.nn.functional.pad(unmask_rate, (0, extra))
        else:
            logits, insert_rate, unmask_rate = model_fn(x, t, valid, *span)
        logits = logits.float()
        if banned.numel():
            logits[..., banned] = float("-inf")
        is_mask = valid & (x == mask_id)

        if step == cfg.steps - 1:
            fill = logits.argmax(-1)
            x = torch.where(is_mask, fill, x)
            unmask_step = torch.where(is_mask, torch.full_like(x, step), unmask_step)
            break

        # Unmasking.
        p_fire = -torch.expm1(-unmask_rate.float().clamp_min(0.0) * scale)
        fire = is_mask & (uniform(x.shape, generator, device, f"unmask/{step}") < p_fire)
        if cfg.confidence != "none":
            k = fire.sum(1, keepdim=True)
            score = confidence_scores(logits, cfg.confidence).masked_fill(~is_mask, float("-inf"))
            rank = score.argsort(1, descending=True).argsort(1)
            fire = is_mask & (rank < k)
        tokens = sample_tokens(logits, cfg.top_k, cfg.top_p, cfg.temperature, generator, f"tokens/{step}")
        x = torch.where(fire, tokens, x)
        unmask_step = torch.where(fire, torch.full_like(x, step), unmask_step)

        # Insertion (never in the gaps left of prompt/BOS tokens; EOS's gap is open).
        allowed = valid & (~fixed | (x == eos_id))
        rate = torch.where(allowed, insert_rate.float().clamp_min(0.0) * scale, torch.zeros_like(x, dtype=torch.float32))
        # Capped above max_length: any larger count overflows the row just the same.
        counts = poisson(rate, generator, f"insert/{step}", cap=max_length + 1)
        overflow = lengths + counts.sum(1) > max_length
        counts = counts.masked_fill(overflow[:, None], 0)
        x, lengths, fixed, unmask_step, insert_step = insert_masks(
            x, counts, lengths, mask_id, pad_id, fixed, unmask_step, insert_step
        )
        new_mask = (ar < lengths[:, None]) & (x == mask_id) & (insert_step < 0) & (unmask_step < 0) & ~fixed
        insert_step = torch.where(new_mask, torch.full_like(x, step), insert_step)

    return SampleOutput(x=x, fixed=fixed, lengths=lengths, unmask_step=unmask_step, insert_step=insert_step)


# Checkpoints store this config in their hyper-parameters; allow torch's weights-only unpickler to load it.
torch.serialization.add_safe_globals([SamplerConfig])
