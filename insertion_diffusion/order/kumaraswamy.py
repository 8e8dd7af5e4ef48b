"""Per-token Kumaraswamy clocks: the schedule family of LoFlexMDM (pure torch, fp32).

Each position ``i`` has an insertion clock and an unmasking clock with CDFs

    F(t; a, b) = 1 - (1 - t^a)^b,        hazard  lambda(t) = b * h_a(t),   h_a(t) = a t^{a-1} / (1 - t^a),

sharing the shape ``a`` and with per-token multipliers ``b_in[i]``, ``b_um[i]``. Under the time change
``U(t) = -log(1 - t^a)`` both clocks are exponential races: ``tau_in ~ Exp(b_in)`` and, being memoryless,
``tau_um = tau_in + Exp(b_um)`` is exactly the unmasking time truncated to after insertion. That gives
simple, stable sampling and closed-form state probabilities at time ``t`` (with ``U = U(t)``):

    P_deleted = exp(-b_in U)
    P_masked  = b_in U exp(-b_um U) g((b_in - b_um) U),   g(x) = (1 - e^{-x}) / x   (g(0) = 1)
    P_clean   = 1 - P_deleted - P_masked

``a = b = 1`` is FlexMDM's linear schedule (uniform insertion, uniform unmasking after it).
Shapes: ``b_*`` broadcast against ``t`` (e.g. ``t`` (B, 1) with ``b`` (B, L)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from insertion_diffusion.process.rng import NoiseSource, RowRNG, exponential

# t^a is kept below 1 - TA_EPS so that U(t) stays finite (U <= ~16 in fp32).
TA_EPS = 1e-7


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(-x))`` for ``x > 0``, accurate for small and large ``x``."""
    x = x.clamp_min(1e-30)
    small = x < math.log(2.0)
    # Each branch gets only inputs it handles: torch.where still back-propagates through the branch it did not
    # pick, and log1p(-exp(-x)) has an infinite derivative at tiny x in fp32 (0 * inf = NaN in the gradient).
    near = torch.log(-torch.expm1(-torch.where(small, x, torch.ones_like(x))))
    far = torch.log1p(-torch.exp(-torch.where(small, torch.ones_like(x), x)))
    return torch.where(small, near, far)


def log_g(x: Tensor) -> Tensor:
    """``log((1 - e^{-x}) / x)``, finite for every real ``x`` (the ``b_in ~ b_um`` limit is ``x -> 0``)."""
    small = x.abs() < 1e-4
    xs = torch.where(small, torch.ones_like(x), x)
    pos = log1mexp(xs.clamp_min(1e-30)) - torch.log(xs.clamp_min(1e-30))
    # x < 0: (e^{|x|} - 1) / |x| = e^{|x|} (1 - e^{-|x|}) / |x|
    neg = -xs + log1mexp((-xs).clamp_min(1e-30)) - torch.log((-xs).clamp_min(1e-30))
    exact = torch.where(xs > 0, pos, neg)
    return torch.where(small, -x / 2.0 + x * x / 24.0, exact)


class KumaraswamyClock:
    """Insertion/unmasking clocks with shared shape ``a`` and per-token rates ``b``.

    Args:
        a: the shared shape (> 0); ``a = 1`` makes ``h_a(t) = 1 / (1 - t)``.
    """

    def __init__(self, a: float = 1.0) -> None:
        if not a > 0:
            raise ValueError(f"Kumaraswamy shape a must be > 0, got {a}")
        self.a = float(a)

    # --- the shared shape ---------------------------------------------------------------------------
    def time_change(self, t: Tensor) -> Tensor:
        """``U(t) = -log(1 - t^a)`` (fp32, finite)."""
        ta = t.float().clamp(0.0, 1.0).pow(self.a).clamp_max(1.0 - TA_EPS)
        return -torch.log1p(-ta)

    def inverse_time_change(self, u: Tensor) -> Tensor:
        """``t = (1 - e^{-U})^{1/a}``."""
        return (-torch.expm1(-u.float())).clamp(0.0, 1.0).pow(1.0 / self.a)

    def h(self, t: Tensor) -> Tensor:
        """Hazard shape ``h_a(t) = a t^{a-1} / (1 - t^a)`` (the hazard at ``b = 1``)."""
        t = t.float().clamp(1e-12, 1.0)
        ta = t.pow(self.a).clamp_max(1.0 - TA_EPS)
        return self.a * ta / t / (1.0 - ta)

    # --- per-token quantities -------------------------------------------------------------------------
    def cdf(self, t: Tensor, b: Tensor) -> Tensor:
        """``F(t; a, b) = 1 - exp(-b U(t))``."""
        return -torch.expm1(-b.float() * self.time_change(t))

    def inverse(self, p: Tensor, b: Tensor) -> Tensor:
        """``F^{-1}(p; a, b)``."""
        return self.inverse_time_change(-torch.log1p(-p.float().clamp(0.0, 1.0 - 1e-7)) / b.float())

    def hazard(self, t: Tensor, b: Tensor) -> Tensor:
        """``lambda(t) = b h_a(t)``."""
        return b.float() * self.h(t)

    def expected_time(self, b: Tensor) -> Tensor:
        """Mean event time ``E[T] = b B(1 + 1/a, b)`` (``1 / (1 + b)`` when ``a = 1``)."""
        b = b.float()
        if self.a == 1.0:
            return 1.0 / (1.0 + b)
        lb = math.lgamma(1.0 + 1.0 / self.a) + torch.lgamma(b) - torch.lgamma(1.0 + 1.0 / self.a + b)
        return b * torch.exp(lb)

    def sample_times(
        self, b_in: Tensor, b_um: Tensor, generator: NoiseSource = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(T_in, T_um)`` with ``T_um > T_in`` per token (no gradient): shapes of ``b_in``.

        ``generator``: a ``torch.Generator`` (or None), or a
        :class:`~insertion_diffusion.process.rng.RowRNG` over the rows of ``b_in`` (streams ``"tau_in"``,
        ``"tau_um"``).
        """
        with torch.no_grad():
            e1 = exponential(b_in.shape, generator, b_in.device, "tau_in")
            e2 = exponential(b_in.shape, generator, b_in.device, "tau_um")
            tau_in = e1 / b_in.float()
            tau_um = tau_in + e2 / b_um.float()
            return self.inverse_time_change(tau_in), self.inverse_time_change(tau_um)

    def log_state_probs(self, t: Tensor, b_in: Tensor, b_um: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Closed-form ``(log P_deleted, log P_masked, log P_clean)`` of a position at time ``t``."""
        u = self.time_change(t)
        b_in, b_um = b_in.float(), b_um.float()
        log_d = -b_in * u
        log_m = torch.log(b_in) + torch.log(u.clamp_min(1e-30)) - b_um * u + log_g((b_in - b_um) * u)
        log_not_c = torch.logaddexp(log_d, log_m).clamp_max(-1e-7)
        log_c = log1mexp(-log_not_c)
        return log_d, log_m, log_c


def schedule_regularizers(
    clock: KumaraswamyClock,
    b: Tensor,
    valid: Tensor,
    num_grid: int = 100,
    eps: float = 0.01,
    delta: float = 0.01,
    generator: NoiseSource = None,
    stream: str = "reg_grid",
) -> dict[str, Tensor]:
    """The three schedule regularisers of one clock, averaged over rows.

    Args:
        clock: the shared shape.
        b: (B, L) per-token rates.
        valid: (B, L) bool, tokens that take part (non-fixed, real).
        generator: offsets the stratified time grid: one offset for the batch from a ``torch.Generator`` (or
            None), one per row from a :class:`~insertion_diffusion.process.rng.RowRNG` (stream ``stream``).

    Every term is a mean over the ``B`` rows (a row without noisy tokens contributes 0), so the mean over
    equally sized per-process batches is the global batch's value (DDP gradients are exact).

    Returns:
        ``mixture`` (the rows' mixture CDF vs the uniform CDF on a stratified grid, squared, summed),
        ``endpoint`` (CDF mass within ``eps`` of 0 or 1 beyond ``delta``, squared, summed over tokens),
        ``kl`` (mean KL of each token's Kumaraswamy law to the uniform). All zero at ``a = b = 1``.
    """
    m = valid.float()
    n = m.sum(1).clamp_min(1.0)
    if isinstance(generator, RowRNG):
        offset = generator.uniform(stream)[:, None].to(b.device)  # (B, 1)
    else:
        offset = torch.rand((), device=b.device, generator=generator).view(1, 1)
    grid = (torch.arange(num_grid, device=b.device)[None, :] + offset) / num_grid  # (B or 1, K)
    F = clock.cdf(grid[:, None, :], b[..., None])  # (B, L, K)
    mix = (F * m[..., None]).sum(1) / n[:, None]
    has = (m.sum(1) > 0).float()  # rows with no noisy token have no mixture to regularise
    mixture = ((mix - grid) ** 2).sum(1) * has
    f_lo = clock.cdf(torch.tensor(eps, device=b.device), b)
    f_hi = clock.cdf(torch.tensor(1.0 - eps, device=b.device), b)
    endpoint = ((torch.relu(f_lo - delta) ** 2 + torch.relu(1.0 - f_hi - delta) ** 2) * m).sum(1)
    a, bf = clock.a, b.float()
    psi1 = torch.special.digamma(torch.ones((), device=b.device))
    kl_tok = math.log(a) + torch.log(bf) + ((a - 1.0) / a) * (psi1 - torch.special.digamma(bf + 1.0)) - (bf - 1.0) / bf
    kl = (kl_tok * m).sum(1) / n
    return {"mixture": mixture.mean(), "endpoint": endpoint.mean(), "kl": kl.mean()}
