"""Hyperschedules: one noise level per position, driven by a single clock (HDLM, Fathi et al. 2025).

A hyperschedule gives every position its own time. Here positions are grouped into blocks of ``block_size``
columns (block ``k`` holds columns ``k*b .. k*b+b-1``) and the blocks are annealed one after another
("simple annealing"): on a clock ``u`` that counts blocks, block ``k`` has the local time

    tau_k(u) = clamp((u - k) / window, 0, 1)

and each of its positions is clean with probability ``F(tau_k(u))`` (``F`` the unmasking schedule's CDF,
``t = 0`` masked, ``t = 1`` clean, as everywhere in the package). ``window = 1`` finishes one block before the
next one starts (block-autoregressive); a window of ``w`` blocks keeps ``w`` blocks partly noised at once, each
block ``1/w`` of the way behind the one before it (a ramp); only a window much wider than the row puts every
block at nearly the same time, as MDLM's single schedule does. The clock runs over
``[first_block, last_block + window]``: before ``first_block`` none of the row's generated blocks has started
(all masked, no rate yet), after the end everything is clean.

NELBO. Each position's clean time is independent, with CDF ``F(tau_k(u))`` in ``u``. The continuous-time bound
of absorbing diffusion with per-position schedules is

    E_{u ~ U[lo, hi]} [ (hi - lo) * sum_{i masked} (dtau_i/du) * h(tau_i) * (-log p_theta(x_i | z_u)) ],

with ``h = F' / (1 - F)`` and ``dtau/du = 1/window`` inside the window, 0 outside it (a block that is still fully
masked has no rate yet). :func:`elbo_weights` gives the bracket's per-position factor. ``h`` diverges as a block's
``tau`` reaches 1, which every block but the last does in the middle of the clock range; ``tau_max`` caps it
there, as MDLM's ``time_eps`` caps ``1/t`` at the ends (the weight then never exceeds ``h(tau_max)/window``, and
the dropped mass is ``(1 - tau_max)/2`` per column, for the linear schedule).

epsilon-hybrid noise (the paper's hybrid process): each position left unmasked is replaced by a uniform random
token with probability ``eps``, so the model learns to recognise and fix wrong tokens (the sampler's adaptive
correction). :func:`hybrid_noise` draws it.

Shapes: ``B`` rows, ``W`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, uniform
from insertion_diffusion.schedules import Schedule


@dataclass(frozen=True)
class BlockAnnealing:
    """Simple annealing over blocks (see the module docstring).

    Attributes:
        block_size: columns per block (``b >= 1``).
        window: blocks partly noised at once (``w >= 1``).
        schedule: the unmasking CDF ``F`` applied to each block's local time.
    """

    block_size: int
    window: int
    schedule: Schedule

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"model.block_size={self.block_size} must be >= 1 (4 is typical)")
        if self.window < 1:
            raise ValueError(f"model.window={self.window} must be >= 1 block (1 = one block at a time)")

    def blocks(self, width: int, device: torch.device | str | None = None) -> Tensor:
        """Block index of every column: (W,) long."""
        return torch.arange(width, device=device) // self.block_size

    def local_time(self, u: Tensor, blocks: Tensor) -> Tensor:
        """``tau`` (B, W) of each column at clock ``u`` (B,) (or a scalar): 0 = fully masked, 1 = clean."""
        u = torch.as_tensor(u, dtype=torch.float32, device=blocks.device)
        return ((u.reshape(-1, 1) - blocks[None, :].float()) / self.window).clamp(0.0, 1.0)

    def clean_prob(self, u: Tensor, blocks: Tensor) -> Tensor:
        """``F(tau)`` (B, W): the probability that a column is clean at clock ``u``."""
        return self.schedule.cdf(self.local_time(u, blocks))

    def elbo_weights(self, u: Tensor, blocks: Tensor, tau_max: float = 1.0 - 1e-6) -> Tensor:
        """``(dtau/du) * h(min(tau, tau_max))`` (B, W): the NELBO weight of a masked column at clock ``u`` (0
        outside the window, where the column's rate is zero)."""
        tau = self.local_time(u, blocks)
        inside = (tau > 0.0) & (tau < 1.0)
        h = self.schedule.hazard(tau.clamp(1e-6, min(tau_max, 1.0 - 1e-6))) / self.window
        return torch.where(inside, h, torch.zeros_like(h))

    def clock_range(self, first_block: Tensor, width: int) -> tuple[Tensor, float]:
        """``(lo (B,), hi)``: the clock interval over which rows whose generated part starts in block
        ``first_block`` (B,) change, for ``width`` columns."""
        last = (width - 1) // self.block_size
        return first_block.float(), float(last + self.window)


def hybrid_noise(
    ids: Tensor,
    region: Tensor,
    clean_prob: Tensor,
    eps: float,
    mask_id: int,
    candidates: Tensor,
    generator: NoiseSource = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask, then corrupt, the generated columns of ``ids``.

    Args:
        ids: (B, W) clean tokens.
        region: (B, W) bool, the columns that are generated (everything else is kept).
        clean_prob: (B, W) probability of a column being unmasked (``F(tau)``).
        eps: probability that an unmasked column is replaced by a uniform random token (0: pure absorbing).
        mask_id: the MASK id.
        candidates: (K,) long, the ids corruption draws from (uniformly).
        generator: randomness (a ``torch.Generator``, None, or a ``RowRNG`` over the rows).

    Returns:
        ``(x, masked, corrupted)``: the noisy tokens (B, W) and two (B, W) bool maps.
    """
    u = uniform(ids.shape, generator, ids.device, "mask")
    masked = region & (u >= clean_prob)
    corrupted = torch.zeros_like(masked)
    x = torch.where(masked, torch.full_like(ids, mask_id), ids)
    if eps > 0.0:
        corrupted = region & ~masked & (uniform(ids.shape, generator, ids.device, "corrupt") < eps)
        draw = uniform(ids.shape, generator, ids.device, "corrupt-token")
        k = candidates.numel()
        random_ids = candidates.to(ids.device)[(draw * k).long().clamp_max(k - 1)]
        x = torch.where(corrupted, random_ids, x)
    return x, masked, corrupted
