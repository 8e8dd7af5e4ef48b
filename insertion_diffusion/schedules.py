"""Event-time schedules for the insertion and unmasking clocks (pure torch, fp32).

A schedule is the CDF ``F(t)`` of the time at which a position changes state (inserted, or unmasked),
on ``t in [0, 1]``. Everything the forward process, the losses and the sampler need follows from it:

* ``cdf(t)``: ``F(t)``, the probability that the event happened by ``t``;
* ``inverse(u)``: ``F^{-1}(u)``, used to draw event times from uniforms;
* ``hazard(t)``: ``lambda(t) = F'(t) / (1 - F(t))``, the rate of the event at ``t`` given it has not happened;
* ``cumulative_hazard(t)``: ``Lambda(t) = -log(1 - F(t))``, so that ``Lambda(t') - Lambda(t)`` is the exact
  expected number of events in ``[t, t']`` (what a sampler step needs when ``lambda`` diverges at ``t = 0``).

All methods broadcast over tensors of any shape. Schedules are named in configs by a short string:
``"linear"``, ``"cosine"`` or ``"poly:<exponent>"`` (see :func:`make_schedule`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# t is clamped to [0, 1 - T_MAX_EPS] wherever a hazard is evaluated: hazards blow up as t -> 1.
T_MAX_EPS = 1e-6


class Schedule:
    """Base class: subclasses implement ``cdf``, ``inverse`` and ``hazard``."""

    name: str = "schedule"
    # whether lambda(t) -> inf as t -> 0 (the sampler then needs SamplerConfig.integrate_hazard)
    diverges_at_zero: bool = False

    def cdf(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def hazard(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def cumulative_hazard(self, t: Tensor) -> Tensor:
        """``Lambda(t) = -log(1 - F(t))``, finite up to ``F = 1 - 1e-7``."""
        return -torch.log1p(-self.cdf(t).clamp_max(1.0 - 1e-7))

    def sample(self, u: Tensor) -> Tensor:
        """Event times from uniforms ``u`` in [0, 1) (inverse-CDF sampling)."""
        return self.inverse(u)

    def sample_after(self, s: Tensor, u: Tensor) -> Tensor:
        """Event times drawn from this schedule truncated to ``(s, 1]``.

        ``T = F^{-1}(F(s) + u (1 - F(s)))``: the unmasking time given the insertion time ``s``.
        """
        fs = self.cdf(s)
        return self.inverse(fs + u * (1.0 - fs)).clamp_min(s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class LinearSchedule(Schedule):
    """``F(t) = t``: uniform event times, hazard ``1 / (1 - t)`` (FlexMDM's default)."""

    name = "linear"

    def cdf(self, t: Tensor) -> Tensor:
        return t.clamp(0.0, 1.0)

    def inverse(self, u: Tensor) -> Tensor:
        return u.clamp(0.0, 1.0)

    def hazard(self, t: Tensor) -> Tensor:
        return 1.0 / (1.0 - t.clamp(0.0, 1.0 - T_MAX_EPS))


class CosineSchedule(Schedule):
    """``F(t) = 1 - cos(pi t / 2)``: events concentrate late; hazard ``(pi/2) tan(pi t / 2)``."""

    name = "cosine"

    def cdf(self, t: Tensor) -> Tensor:
        # 2 sin^2(x/2) == 1 - cos(x), without the cancellation near t = 0 in fp32.
        return 2.0 * torch.sin(0.25 * math.pi * t.clamp(0.0, 1.0)) ** 2

    def inverse(self, u: Tensor) -> Tensor:
        return (4.0 / math.pi) * torch.asin(torch.sqrt(0.5 * u.clamp(0.0, 1.0)))

    def hazard(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * t.clamp(0.0, 1.0 - T_MAX_EPS))


class PolynomialSchedule(Schedule):
    """``F(t) = t^p``: ``p > 1`` delays events, ``p < 1`` hastens them.

    Args:
        exponent: the power ``p > 0``.
    """

    def __init__(self, exponent: float) -> None:
        if not (math.isfinite(exponent) and exponent > 0):
            raise ValueError(f"polynomial schedule exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)
        self.name = f"poly:{exponent:g}"
        self.diverges_at_zero = self.exponent < 1.0

    def cdf(self, t: Tensor) -> Tensor:
        return t.clamp(0.0, 1.0) ** self.exponent

    def inverse(self, u: Tensor) -> Tensor:
        return u.clamp(0.0, 1.0) ** (1.0 / self.exponent)

    def hazard(self, t: Tensor) -> Tensor:
        p = self.exponent
        t = t.clamp(1e-12, 1.0 - T_MAX_EPS)
        # 1 - t^p as -expm1(p log t): near t = 1 the subtraction cancels, and in fp32 the rounding of t^p alone
        # moved the hazard at 1 - T_MAX_EPS by up to ~7 % (which way depended on the build's pow).
        return p * t ** (p - 1.0) / -torch.expm1(p * torch.log(t))


SCHEDULE_NAMES = ("linear", "cosine", "poly:<exponent>")


def make_schedule(spec: str | Schedule, key: str = "schedule") -> Schedule:
    """Build a schedule from its config string.

    Args:
        spec: ``"linear"``, ``"cosine"`` or ``"poly:<exponent>"`` (e.g. ``"poly:2"``), or a schedule.
        key: the config key the value came from, named in the error message.

    Raises:
        ValueError: naming ``key``, the bad value and the allowed values.
    """
    if isinstance(spec, Schedule):
        return spec
    s = str(spec).strip().lower()
    if s == "linear":
        return LinearSchedule()
    if s == "cosine":
        return CosineSchedule()
    if s.startswith("poly:"):
        try:
            return PolynomialSchedule(float(s.split(":", 1)[1]))
        except ValueError as err:
            raise ValueError(f"{key}={spec!r}: {err}; allowed values: {', '.join(SCHEDULE_NAMES)}") from None
    raise ValueError(f"{key}={spec!r} is not a schedule; allowed values: {', '.join(SCHEDULE_NAMES)}")
