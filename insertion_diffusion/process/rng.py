"""Counter-based per-row noise: every random number is a pure function of ``(seed, stream, row, column)``.

Training noise drawn from a stateful :class:`torch.Generator` depends on how a batch is split over processes, on
the order rows arrive in and on every draw made before; resuming a run then needs the generator's state, and a
two-process run cannot reproduce a one-process run. :class:`RowRNG` draws each row's noise from a hash of the row's
identity instead (splitmix64 integer mixing on ``int64`` tensors, vectorised, the same on every device), so:

* a one-process batch over rows ``{0..7}`` and two processes over ``{0, 2, 4, 6}`` / ``{1, 3, 5, 7}`` draw
  identical noise for every row (DDP gives the same gradients as one process);
* a resumed run redraws exactly the noise of the uninterrupted run (nothing to save);
* evaluation noise keyed by the row's index in its split is the same at every evaluation (common random numbers).

The noise functions of the package (:func:`~insertion_diffusion.process.insertion.stratified_times`,
:func:`~insertion_diffusion.process.insertion.sample_event_times`,
:meth:`~insertion_diffusion.order.kumaraswamy.KumaraswamyClock.sample_times`,
:func:`~insertion_diffusion.order.kumaraswamy.schedule_regularizers`) take ``generator`` as either a
``torch.Generator`` (or ``None``: torch's global generator; the previous behaviour, unchanged) or a ``RowRNG``.

API (``B`` = number of rows of the ``RowRNG``):

* ``RowRNG(seed, rows)``: ``rows`` (B,) int64 row identities; they must be unique within one draw.
* ``rng.uniform(stream, *shape)`` -> (B, \\*shape) float32 in the open interval (0, 1) (2^23 levels).
* ``rng.exponential(stream, *shape)``, ``rng.normal(stream, *shape)``: the same shapes.
* ``rng.spread(stream)`` -> (B,): a low-discrepancy point per row, ``frac(offset + row * phi)`` (golden-ratio
  Kronecker sequence): rows with consecutive identities (a global batch) cover [0, 1) almost evenly, whichever
  process holds them. Used for training times (stratified over the global batch).
* ``rng.repeat(n)``: a ``RowRNG`` over ``n * B`` rows (the rows ``n`` times, as ``Tensor.repeat``), each copy with
  its own noise (e.g. LoFlexMDM's two partial states per row).
* Module-level :func:`uniform` / :func:`exponential` / :func:`categorical` / :func:`poisson` take the
  ``generator`` argument of either kind, so a model writes ``u = uniform((B, L), generator, device, "mask")``
  once and works with both. The samplers use them too: evaluation hands them a ``RowRNG`` keyed by each row's
  ``index``, so a row generates the same sequence whatever batch or process it lands in.

Draws with the same ``stream`` name are identical: give every distinct draw its own stream name. A model opts in
by setting ``row_noise = True`` and passing its ``generator`` argument through (see
:class:`~insertion_diffusion.models.base.GenerativeModule`): the base then hands ``compute_loss`` a ``RowRNG``
whose rows are the samples' positions in the run in training (unique over the run, the same for any number of
processes) and their ``index`` in evaluation.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NoiseSource", "RowRNG", "categorical", "exponential", "mix64", "mix_ints", "poisson", "stream_id", "uniform"]

_U64 = 1 << 64


def _signed(x: int) -> int:
    x %= _U64
    return x - _U64 if x >= 1 << 63 else x


# splitmix64 constants, as signed int64 (tensor arithmetic wraps modulo 2^64).
_GAMMA = _signed(0x9E3779B97F4A7C15)  # also 2^64 / golden ratio: the Kronecker step of ``spread``
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_UNIFORM_BITS = 23  # (k + 0.5) / 2^23 is exact in float32 and never 0 or 1


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """The splitmix64 output function of ``x + gamma``: a bijection of int64 that scrambles every bit."""
    z = x + _GAMMA
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def mix_ints(*values: int) -> int:
    """:func:`mix64` chained over Python ints (for seeds and stream ids)."""
    h = torch.zeros((), dtype=torch.int64)
    for v in values:
        h = mix64(h ^ _signed(int(v)))
    return int(h)


def stream_id(name: str) -> int:
    """A stable integer for a stream name (``hash(str)`` is salted per process; CRC32 is not)."""
    return zlib.crc32(name.encode("utf-8"))


class RowRNG:
    """Noise for ``B`` rows, each a pure function of ``(seed, stream, rows[b], replica, column)``.

    Args:
        seed: the run's noise seed.
        rows: (B,) integer row identities (unique within one draw).
    """

    def __init__(self, seed: int, rows: Tensor, _replica: Tensor | None = None) -> None:
        if rows.ndim != 1:
            raise ValueError(f"RowRNG rows must be a 1-D tensor of row ids, got shape {tuple(rows.shape)}")
        self.seed = int(seed)
        self.rows = rows.to(torch.int64)
        self._replica = _replica

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return f"RowRNG(seed={self.seed}, rows={len(self)})"

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def repeat(self, n: int) -> RowRNG:
        """``n`` copies of the rows (``rows.repeat(n)`` order), each copy drawing independent noise."""
        B = len(self)
        copy = torch.arange(n, device=self.device).repeat_interleave(B)
        replica = copy if self._replica is None else self._replica.repeat(n) * n + copy
        return RowRNG(self.seed, self.rows.repeat(n), replica)

    # --- bits ---------------------------------------------------------------------------------------
    def _row_keys(self, stream: str) -> Tensor:
        base = mix_ints(self.seed, stream_id(stream))
        keys = mix64(self.rows ^ base)
        if self._replica is not None:
            keys = mix64(keys ^ self._replica.to(torch.int64))
        return keys

    def bits(self, stream: str, *shape: int) -> Tensor:
        """(B, \\*shape) int64 of 64 random bits each."""
        keys = self._row_keys(stream)
        n = 1
        for s in shape:
            n *= int(s)
        col = torch.arange(n, device=self.device, dtype=torch.int64)
        return mix64(keys[:, None] ^ mix64(col)[None, :]).view(len(self), *shape)

    # --- distributions ------------------------------------------------------------------------------
    def uniform(self, stream: str, *shape: int) -> Tensor:
        """(B, \\*shape) float32 uniforms in (0, 1)."""
        k = _srl(self.bits(stream, *shape), 64 - _UNIFORM_BITS)
        return (k.to(torch.float32) + 0.5) * (2.0**-_UNIFORM_BITS)

    def exponential(self, stream: str, *shape: int) -> Tensor:
        """(B, \\*shape) float32 Exp(1) draws."""
        return -torch.log(self.uniform(stream, *shape))

    def normal(self, stream: str, *shape: int) -> Tensor:
        """(B, \\*shape) float32 standard normals (Box-Muller over two uniform streams)."""
        u1, u2 = self.uniform(stream + "/r", *shape), self.uniform(stream + "/theta", *shape)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)

    def spread(self, stream: str) -> Tensor:
        """(B,) points ``frac(offset + row * phi)`` in [0, 1): a Kronecker sequence over the row ids.

        Computed exactly in 64-bit fixed point, so it is the same for any row id. ``offset`` depends on
        ``(seed, stream)`` only; replicas share their row's point.
        """
        offset = mix_ints(self.seed, stream_id(stream))
        k = _srl(self.rows * _GAMMA + offset, 64 - 24)
        return (k.to(torch.float32) + 0.5) * (2.0**-24)


NoiseSource = torch.Generator | RowRNG | None


def _check_rows(shape: Sequence[int], rng: RowRNG, what: str) -> None:
    if len(shape) == 0 or int(shape[0]) != len(rng):
        raise ValueError(f"{what}: shape {tuple(shape)} does not start with the RowRNG's {len(rng)} rows")


def uniform(
    shape: Sequence[int], generator: NoiseSource = None, device: torch.device | str | None = None, stream: str = "uniform"
) -> Tensor:
    """Uniforms of ``shape`` (float32) from a ``torch.Generator``/``None`` (``torch.rand``) or a :class:`RowRNG`
    (then ``shape[0]`` must be its number of rows and ``stream`` names the draw)."""
    if isinstance(generator, RowRNG):
        _check_rows(shape, generator, "uniform")
        return generator.uniform(stream, *shape[1:])
    return torch.rand(tuple(shape), device=device, generator=generator)


def exponential(
    shape: Sequence[int], generator: NoiseSource = None, device: torch.device | str | None = None, stream: str = "exp"
) -> Tensor:
    """Exp(1) draws of ``shape`` (float32); ``generator`` as in :func:`uniform`."""
    if isinstance(generator, RowRNG):
        _check_rows(shape, generator, "exponential")
        return generator.exponential(stream, *shape[1:])
    return torch.empty(tuple(shape), device=device, dtype=torch.float32).exponential_(generator=generator)


def categorical(probs: Tensor, generator: NoiseSource = None, stream: str = "categorical") -> Tensor:
    """One index per row of ``probs`` (..., K) (non-negative, not necessarily normalised) -> (...) long.

    A ``torch.Generator``/``None`` uses ``torch.multinomial``; a :class:`RowRNG` inverts the cumulative
    distribution at one uniform per draw (``probs.shape[0]`` must be its number of rows).
    """
    if not isinstance(generator, RowRNG):
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    u = uniform(probs.shape[:-1], generator, stream=stream)
    cdf = probs.double().cumsum(-1)
    idx = (cdf < (u.double() * cdf[..., -1])[..., None]).sum(-1)
    # An index past the last non-zero entry is impossible in exact arithmetic; clamp away rounding.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).long().argmax(-1)
    return torch.minimum(idx, last)


def poisson(rate: Tensor, generator: NoiseSource = None, stream: str = "poisson", cap: int | None = None) -> Tensor:
    """Poisson(``rate``) counts (long) of ``rate``'s shape, ``rate >= 0``; with ``cap``, counts above it are ``cap``.

    A ``torch.Generator``/``None`` uses ``torch.poisson``. A :class:`RowRNG` inverts the Poisson CDF at one
    uniform per entry with a positive rate, vectorised over the counts ``0..K-1`` with
    ``K = max rate + 8 sqrt(max rate) + 12``, beyond which the probability is below 1e-12; such a draw returns
    ``K``. Finding those entries and their largest rate costs two host synchronisations. The log-probabilities are summed in float64, so large rates lose nothing to underflow.
    """
    if not isinstance(generator, RowRNG):
        counts = torch.poisson(rate, generator=generator).long()
        return counts if cap is None else counts.clamp_max(cap)
    u = uniform(rate.shape, generator, stream=stream).double().reshape(-1)
    flat = rate.double().reshape(-1)
    live = torch.nonzero(flat > 0).squeeze(1)  # only positive rates need the CDF (e.g. the open gaps)
    counts = torch.zeros(flat.shape, dtype=torch.long, device=rate.device)
    if live.numel():
        lam = flat[live, None]
        lam_max = float(lam.max())
        K = int(lam_max + 8.0 * lam_max**0.5 + 12.0)
        if cap is not None:
            K = max(1, min(K, cap))
        k = torch.arange(K, device=rate.device, dtype=torch.float64)
        cdf = (torch.xlogy(k, lam) - lam - torch.lgamma(k + 1.0)).exp().cumsum(-1)  # P(N <= k), k < K
        counts[live] = (cdf < u[live, None]).sum(-1)
    return counts.view(rate.shape)
