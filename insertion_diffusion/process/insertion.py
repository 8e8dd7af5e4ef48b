"""The variable-length insertion + masking interpolant (FlexMDM forward process), vectorised.

Every non-fixed real position ``i`` of a clean row ``z1`` carries two event times, an insertion time
``T_in[i]`` and an unmasking time ``T_um[i] > T_in[i]``. At time ``t`` the position is

* deleted (not yet inserted) if ``t < T_in[i]``,
* ``[MASK]`` if ``T_in[i] <= t < T_um[i]``,
* clean (``z1[i]``) otherwise.

Fixed positions (prompt, BOS, EOS) are always clean. Deleting the deleted positions (a stable
compaction) gives the variable-length partial sequence ``x_t`` the generator sees. Each token ``j`` of
``x_t`` owns the gap to its left; since EOS is never deleted, every deleted position belongs to exactly
one gap and there is no trailing gap.

Shapes: ``B`` rows, ``L`` padded clean length, ``W <= L`` width of the compacted batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, RowRNG, uniform
from insertion_diffusion.schedules import Schedule

DELETED, MASKED, CLEAN = 0, 1, 2


@dataclass
class PartialState:
    """A batch of compacted partial sequences ``x_t`` and what the losses need to know about them.

    Attributes:
        x: (B, W) long, tokens of ``x_t`` (``[MASK]`` where masked), PAD beyond each row's length.
        valid: (B, W) bool, True for the ``lengths[b]`` real positions of each row.
        fixed: (B, W) bool, positions that are prompt/BOS/EOS (never noised).
        is_mask: (B, W) bool, masked positions.
        target: (B, W) long, the clean token ``z1[src]`` at each position (PAD beyond length).
        src: (B, W) long, index into ``z1`` of each position (0 beyond length; use ``valid``).
        gap: (B, W) float, number of deleted positions in the gap left of each position.
        lengths: (B,) long, ``|x_t|``.
        state: (B, L) long, DELETED / MASKED / CLEAN for every position of ``z1`` (pads and fixed: CLEAN).
    """

    x: Tensor
    valid: Tensor
    fixed: Tensor
    is_mask: Tensor
    target: Tensor
    src: Tensor
    gap: Tensor
    lengths: Tensor
    state: Tensor

    def gap_sums(self, values: Tensor) -> Tensor:
        """Sum per-position ``values`` (B, L) over the deleted positions of each gap -> (B, W).

        This is how the insertion target rate of a gap is formed from per-token hazards: all deleted
        positions of a gap lead to the same next state, so their rates add. O(L) with a cumsum.
        """
        return gap_sums(values, self.state == DELETED, self.src, self.valid)


def gap_sums(values: Tensor, deleted: Tensor, src: Tensor, valid: Tensor) -> Tensor:
    """Per-gap sums of ``values`` over deleted positions.

    Args:
        values: (B, L) per-position values (e.g. insertion hazards).
        deleted: (B, L) bool, deleted positions.
        src: (B, W) long, source index of each compacted position.
        valid: (B, W) bool.

    Returns:
        (B, W): for each position ``j``, the sum of ``values`` over deleted ``i`` with
        ``src[j-1] < i < src[j]`` (``src[-1] = -1``); zero where not valid.
    """
    csum = torch.cumsum(values * deleted.to(values.dtype), dim=1)  # inclusive
    # src[j] is kept, so the inclusive cumsum at src[j] counts deleted positions strictly before it.
    at = torch.gather(csum, 1, src)
    prev = torch.nn.functional.pad(at[:, :-1], (1, 0))
    return torch.where(valid, at - prev, torch.zeros_like(at))


def sample_event_times(
    shape: torch.Size | tuple[int, ...],
    insertion: Schedule,
    unmasking: Schedule,
    device: torch.device | str = "cpu",
    generator: NoiseSource = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``(T_in, T_um)`` of the given shape: ``T_in ~ F_in``, ``T_um ~ F_um`` truncated to ``(T_in, 1]``.

    ``generator``: a ``torch.Generator`` (or None), or a :class:`~insertion_diffusion.process.rng.RowRNG` over
    the ``shape[0]`` rows (per-row noise, streams ``"t_in"`` and ``"t_um"``).
    """
    u = uniform(shape, generator, device, "t_in")
    v = uniform(shape, generator, device, "t_um")
    t_in = insertion.sample(u)
    t_um = unmasking.sample_after(t_in, v)
    return t_in, t_um


def stratified_times(
    batch_size: int, eps: float, device: torch.device | str = "cpu", generator: NoiseSource = None
) -> Tensor:
    """Stratified times on ``[eps, 1 - eps]``: (B,).

    With a ``torch.Generator`` (or None): ``t_b = eps + (b + u) (1 - 2 eps) / B`` with one shared ``u``, shuffled;
    every batch covers the whole interval. With a :class:`~insertion_diffusion.process.rng.RowRNG`: each row's
    time is its point of a golden-ratio sequence over the row ids (:meth:`RowRNG.spread`), so rows with
    consecutive ids (the global batch of a step, however it is split over processes) are stratified together
    and a row's time does not depend on which other rows share its process.
    """
    if isinstance(generator, RowRNG):
        if len(generator) != batch_size:
            raise ValueError(f"stratified_times: batch_size={batch_size} but the RowRNG has {len(generator)} rows")
        return eps + generator.spread("time").to(device) * (1.0 - 2.0 * eps)
    u = torch.rand((), device=device, generator=generator)
    t = eps + (torch.arange(batch_size, device=device) + u) * (1.0 - 2.0 * eps) / batch_size
    return t[torch.randperm(batch_size, device=device, generator=generator)]


TIME_SAMPLINGS = ("uniform", "early:<p>", "early:<p>:<share>")


def parse_time_sampling(spec: str, key: str = "model.time_sampling") -> tuple[float, float] | None:
    """``"uniform"`` -> None; ``"early:<p>"`` -> ``(p, 0.5)``; ``"early:<p>:<share>"`` -> ``(p, share)``, with
    ``0 < p < 1`` and ``0 < share < 1``. Anything else is refused, naming ``key``."""
    if spec == "uniform":
        return None
    if isinstance(spec, str) and spec.startswith("early:"):
        parts = spec.split(":")[1:]
        try:
            p = float(parts[0])
        except ValueError:
            p = float("nan")
        if not 0.0 < p < 1.0:
            raise ValueError(f"{key}={spec!r}: the exponent of early:<p> must be a number in (0, 1), e.g. early:0.25")
        if len(parts) == 1:
            return p, 0.5
        try:
            share = float(parts[1]) if len(parts) == 2 else float("nan")
        except ValueError:
            share = float("nan")
        if not 0.0 < share < 1.0:
            raise ValueError(f"{key}={spec!r}: the share of early:<p>:<share> (the fraction of rows drawn early) "
                             "must be a number in (0, 1), e.g. early:0.25:0.125")
        return p, share
    raise ValueError(f"{key}={spec!r}; allowed values: {', '.join(TIME_SAMPLINGS)}")


def training_times(
    batch_size: int, eps: float, device: torch.device | str = "cpu", generator: NoiseSource = None,
    early: float | None = None, share: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Training times and their importance weights: ``(t, w)``, (B,) each.

    ``early=None``: the stratified uniform times of :func:`stratified_times`, weights 1.

    ``early=p``: each row keeps its stratified time ``u`` with probability ``1 - share`` and otherwise takes
    ``t = u ** (1 / p)``, so the mixture density of ``t`` is ``m(t) = (1 - share) + share p t^(p - 1)``; the
    weight is ``w = 1 / m(t)``. Why: under an early-insertion schedule (``poly:p``, or Kumaraswamy ``a = p``) the
    share of inserted tokens is about ``t^p``, so uniform times almost never show the network the nearly empty
    sequences that the sampler starts from (with ``p = 0.25`` and ``time_eps = 1e-3``, no training time expects
    fewer than 18 % of the tokens); the rows drawn as ``u ** (1/p)`` have that share uniform on ``(0, 1)``.
    The weighted loss has the expectation of the uniform one (up to the ``time_eps`` ends), so the objective
    and its minimiser are unchanged: only where the samples fall moves. A smaller ``share`` leaves more rows
    (and a smaller weight variance) for the middle of the process.
    """
    u = stratified_times(batch_size, eps, device, generator)
    if early is None:
        return u, torch.ones_like(u)
    pick = uniform((batch_size,), generator, device, "time_mix").to(u.device) < share
    t = torch.where(pick, u.double() ** (1.0 / early), u.double())
    w = 1.0 / ((1.0 - share) + share * early * t ** (early - 1.0))
    return t.float(), w.float()


def partial_state(
    z1: Tensor,
    fixed: Tensor,
    attention_mask: Tensor,
    t: Tensor,
    t_in: Tensor,
    t_um: Tensor,
    mask_id: int,
    pad_id: int,
    trim: bool = True,
) -> PartialState:
    """Noise clean rows to time ``t`` and compact them to ``x_t``.

    Args:
        z1: (B, L) long clean tokens.
        fixed: (B, L) bool, positions never noised (prompt, BOS, EOS).
        attention_mask: (B, L) bool, real tokens (False for PAD).
        t: (B,) float times.
        t_in: (B, L) insertion times; t_um: (B, L) unmasking times (``>= t_in``).
        mask_id, pad_id: special token ids.
        trim: drop columns that are padding in every row (saves compute; width becomes max length).

    Returns:
        The :class:`PartialState`.
    """
    noisy = attention_mask & ~fixed
    tt = t[:, None]
    state = torch.full_like(z1, CLEAN)
    state = torch.where(noisy & (tt < t_um), torch.full_like(z1, MASKED), state)
    state = torch.where(noisy & (tt < t_in), torch.full_like(z1, DELETED), state)
    keep = attention_mask & (state != DELETED)

    # Stable compaction: kept positions first, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lengths = keep.sum(1)
    width = z1.shape[1]
    if trim:
        # One host sync per training step; it shortens every layer's work to the real width.
        width = int(lengths.max())
        order = order[:, :width]
    valid = torch.arange(width, device=z1.device)[None, :] < lengths[:, None]
    src = torch.where(valid, order, torch.zeros_like(order))
    target = torch.where(valid, torch.gather(z1, 1, src), torch.full_like(src, pad_id))
    kept_state = torch.gather(state, 1, src)
    is_mask = valid & (kept_state == MASKED)
    x = torch.where(is_mask, torch.full_like(target, mask_id), target)
    fixed_x = valid & torch.gather(fixed, 1, src)
    deleted = state == DELETED
    gap = gap_sums(torch.ones_like(t_in), deleted, src, valid)
    return PartialState(
        x=x, valid=valid, fixed=fixed_x, is_mask=is_mask, target=target, src=src, gap=gap,
        lengths=lengths, state=state,
    )
