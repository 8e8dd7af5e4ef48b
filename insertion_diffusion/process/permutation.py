"""Creation orders of a sequence's positions, and the partial sequences they pass through (pure torch).

The Insertion Process (arXiv 2606.02133) builds a row's target one token at a time. A permutation ``sigma``
of the ``n`` target positions (the order in which they are created) fixes the whole trajectory: after ``k``
steps the partial sequence holds the fixed tokens (prompt, BOS, EOS) and the targets ``sigma_1 .. sigma_k``,
in their original relative order. The posterior over creation orders is Plackett-Luce with per-position scores
``s``: ``q(sigma) = prod_k exp(s_{sigma_k}) / sum_{j not yet created} exp(s_j)``, sampled exactly by sorting
``s + Gumbel`` (Gumbel-top-k).

Orders and insertion paths correspond one to one. Creating position ``sigma_k`` inserts its token into slot
``#{l < k : sigma_l < sigma_k}`` of the current partial sequence, and that slot sequence is the inversion code of
``sigma``: it determines ``sigma``, so distinct orders give distinct action sequences even when tokens repeat (two
equal tokens created in either order give the same strings, but through different slots). Hence
``p(x) = sum_sigma p(actions(sigma))`` exactly, and the bound in :mod:`insertion_diffusion.models.ip` is the
standard evidence lower bound over orders.

Shapes: ``B`` rows, ``L`` positions (padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, uniform

# Finite stand-in for -inf in the scores of positions that are not targets: exp() underflows to exactly 0, and
# differences of two such values stay finite, so masked terms never produce NaN gradients.
_NEG = -1.0e4


def gumbel_order(scores: Tensor, target: Tensor, generator: NoiseSource = None, stream: str = "ip/gumbel") -> Tensor:
    """A Plackett-Luce draw of creation orders (Gumbel-top-k).

    Args:
        scores: (B, L) float posterior scores (ignored where not ``target``).
        target: (B, L) bool, the positions to order.
        generator: noise source (a :class:`~insertion_diffusion.process.rng.RowRNG` over the B rows, or a
            ``torch.Generator`` / None).

    Returns:
        (B, L) long ``rank``: the 0-based creation step of each target position; non-targets get ``L``.
    """
    u = uniform(scores.shape, generator, scores.device, stream).clamp(1e-12, 1.0 - 1e-7)
    g = scores.detach().float() - torch.log(-torch.log(u))
    g = torch.where(target, g, torch.full_like(g, float("-inf")))
    order = torch.argsort(g, dim=1, descending=True, stable=True)  # positions, first-created first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return torch.where(target, rank, torch.full_like(rank, scores.shape[1]))


def prefix_log_prob(scores: Tensor, rank: Tensor, target: Tensor, k: Tensor) -> Tensor:
    """``log q(sigma_1 .. sigma_k)`` under Plackett-Luce, the log-probability of the first ``k`` choices.

    Args:
        scores: (B, L) posterior scores (differentiable). rank: (B, L) from :func:`gumbel_order`.
        target: (B, L) bool. k: (B,) long, ``0 <= k <= n``.

    Returns:
        (B,) float32; zero for ``k = 0``.
    """
    B, L = scores.shape
    s = torch.where(target, scores.float(), torch.full_like(scores, _NEG, dtype=torch.float32))
    order = torch.argsort(rank, dim=1)  # order[:, l] = position created at step l (targets first)
    s_sorted = torch.gather(s, 1, order)
    # log sum_{j created at step >= l} exp(s_j): a reversed running logsumexp
    suffix = torch.logcumsumexp(s_sorted.flip(1), dim=1).flip(1)
    steps = torch.arange(L, device=scores.device)[None, :]
    terms = torch.where(steps < k[:, None], s_sorted - suffix, torch.zeros_like(s_sorted))
    return terms.sum(1)


@dataclass
class CreationState:
    """The partial sequences after the first ``k`` creations, compacted, and where each missing target goes.

    Attributes:
        x: (B, L) long tokens of the partial sequence, PAD beyond each row's length.
        valid: (B, L) bool real positions of ``x``.
        fixed: (B, L) bool prompt/BOS/EOS positions of ``x``.
        lengths: (B,) long.
        missing: (B, L) bool over the clean positions: targets not yet created.
        owner: (B, L) long over the clean positions: the index in ``x`` of the token whose left gap a missing
            position belongs to (the next present position to its right).
    """

    x: Tensor
    valid: Tensor
    fixed: Tensor
    lengths: Tensor
    missing: Tensor
    owner: Tensor


def creation_state(ids: Tensor, fixed: Tensor, attn: Tensor, rank: Tensor, k: Tensor, pad_id: int) -> CreationState:
    """Compact each row to its fixed tokens plus the targets of rank ``< k``.

    Args:
        ids, fixed, attn: (B, L) the clean rows (``[prompt][BOS][target][EOS]`` or ``[target][EOS]``; EOS, which
            is fixed and last, is always present, so every missing position has an owner).
        rank: (B, L) creation steps (non-targets ``>= L``). k: (B,) number of created targets.
    """
    target = attn & ~fixed
    created = target & (rank < k[:, None])
    keep = (attn & fixed) | created
    lengths = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    cols = torch.arange(ids.shape[1], device=ids.device)[None, :]
    valid = cols < lengths[:, None]
    x = torch.where(valid, torch.gather(ids, 1, order), torch.full_like(ids, pad_id))
    fx = valid & torch.gather(fixed, 1, order)
    before = torch.cumsum(keep.long(), dim=1) - keep.long()  # kept positions strictly before each position
    return CreationState(x, valid, fx, lengths, target & ~created, before)


def insert_at(rows: Tensor, gap: Tensor, value: Tensor, apply: Tensor) -> Tensor:
    """Insert ``value[b]`` left of position ``gap[b]`` in the rows where ``apply[b]`` (others unchanged).

    Args:
        rows: (B, W) any dtype, padded with room for one more entry in every applying row (its last column is
            shifted out).
        gap: (B,) long. value: (B,) of ``rows``' dtype. apply: (B,) bool.

    Returns:
        (B, W) the rows after the insertion.
    """
    cols = torch.arange(rows.shape[1], device=rows.device)[None, :]
    src = (cols - (cols > gap[:, None]).long()).clamp_min(0)
    new = torch.where(cols == gap[:, None], value[:, None].to(rows.dtype), torch.gather(rows, 1, src))
    return torch.where(apply[:, None], new, rows)
