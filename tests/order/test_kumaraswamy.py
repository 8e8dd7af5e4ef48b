"""Per-token Kumaraswamy clocks (insertion_diffusion/order/kumaraswamy.py): CDF, inverse, hazard, mean,
sampling, the closed-form state probabilities (vs a Monte Carlo simulation of the per-token process),
the log1mexp / log_g numerics and the schedule regularisers."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.order.kumaraswamy import KumaraswamyClock, log1mexp, log_g, schedule_regularizers

A_VALUES = (0.5, 1.0, 2.0, 5.0)
B_VALUES = (0.3, 1.0, 1.01, 2.5, 10.0)


def kuma_cdf64(t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Reference ``F(t) = 1 - (1 - t^a)^b`` in float64."""
    return -torch.expm1(b * torch.log1p(-t.double() ** a))


def ks_stat(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic of ``samples`` against the CDF ``cdf`` (a callable on float64)."""
    x, _ = torch.sort(samples.double().flatten())
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lo = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(hi, lo).max())


def ks_crit(n: int) -> float:
    """KS critical value at level ~1e-3 (seeded draws, so the test is deterministic anyway)."""
    return 1.95 / math.sqrt(n)


# --- constructor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.0, -1.0, float("nan")])
def test_invalid_shape_raises(a):
    with pytest.raises(ValueError, match="a must be > 0"):
        KumaraswamyClock(a)


# --- CDF, inverse, hazard, mean -------------------------------------------------------------------------


@pytest.mark.parametrize("a", A_VALUES)
@pytest.mark.parametrize("b", B_VALUES)
def test_cdf_matches_formula_and_inverse_round_trips(a, b):
    clock = KumaraswamyClock(a)
    t = torch.linspace(0.01, 0.99, 99)
    bt = torch.full_like(t, b)
    F = clock.cdf(t, bt)
    torch.testing.assert_close(F.double(), kuma_cdf64(t, a, b), rtol=1e-4, atol=1e-6)
    # F(0) = 0, F(1) ~ 1 (t^a is clamped at 1 - 1e-7, so F(1) = 1 - (1e-7)^b), monotone
    assert clock.cdf(torch.tensor(0.0), torch.tensor(b)).item() == 0.0
    assert clock.cdf(torch.tensor(1.0), torch.tensor(b)).item() == pytest.approx(1.0, abs=2 * 1e-7**b)
    assert (F[1:] >= F[:-1]).all()
    # inverse(cdf(t)) = t wherever F is not saturated in fp32
    ok = F < 1.0 - 1e-4
    assert ok.sum() >= 10
    torch.testing.assert_close(clock.inverse(F, bt)[ok], t[ok], rtol=2e-3, atol=1e-5)
    # cdf(inverse(p)) = p where 1 - t^a = (1 - p)^{1/b} > e^{-6} (t not within fp32 resolution of 1)
    p = torch.linspace(0.001, 0.999, 101)
    p = p[-torch.log1p(-p) / b < 6.0]
    torch.testing.assert_close(clock.cdf(clock.inverse(p, torch.full_like(p, b)), torch.full_like(p, b)), p,
                               rtol=1e-4, atol=2e-6)


def test_linear_case_is_identity():
    """a = b = 1: F(t) = t, F^{-1}(p) = p, lambda(t) = 1 / (1 - t) (FlexMDM's linear schedule)."""
    clock = KumaraswamyClock(1.0)
    t = torch.linspace(0.0, 0.99, 50)
    one = torch.ones_like(t)
    torch.testing.assert_close(clock.cdf(t, one), t, rtol=0, atol=1e-6)
    torch.testing.assert_close(clock.inverse(t, one), t, rtol=0, atol=1e-6)
    torch.testing.assert_close(clock.hazard(t, one), 1.0 / (1.0 - t), rtol=1e-5, atol=0)
    torch.testing.assert_close(clock.h(t), 1.0 / (1.0 - t), rtol=1e-5, atol=0)


@pytest.mark.parametrize("a", A_VALUES)
@pytest.mark.parametrize("b", (0.3, 1.0, 2.5, 10.0))
def test_hazard_is_minus_dlog_survival(a, b):
    """lambda(t) = -d/dt log(1 - F(t)), autograd of the float64 formula and of the clock's own time change."""
    clock = KumaraswamyClock(a)
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64, requires_grad=True)
    log_surv = b * torch.log1p(-t**a)  # log(1 - F) = b log(1 - t^a)
    (grad,) = torch.autograd.grad(log_surv.sum(), t)
    hz = clock.hazard(t.detach().float(), torch.full((49,), b))
    torch.testing.assert_close(hz.double(), -grad, rtol=1e-4, atol=1e-6)
    # and lambda = dU/dt * b with the clock's U (fp32 autograd)
    t32 = t.detach().float().requires_grad_(True)
    (du,) = torch.autograd.grad(clock.time_change(t32).sum(), t32)
    torch.testing.assert_close(hz, b * du, rtol=1e-3, atol=1e-5)
    # closed form h_a(t) = a t^{a-1} / (1 - t^a)
    td = t.detach()
    torch.testing.assert_close(clock.h(td.float()).double(), a * td ** (a - 1) / (1 - td**a), rtol=1e-4, atol=1e-6)


def test_time_change_is_finite_at_the_ends():
    for a in A_VALUES:
        clock = KumaraswamyClock(a)
        u = clock.time_change(torch.tensor([0.0, 1e-6, 0.5, 1.0 - 1e-6, 1.0]))
        assert torch.isfinite(u).all() and (u >= 0).all()
        assert u[0].item() == 0.0
        assert torch.isfinite(clock.h(torch.tensor([0.0, 1e-4, 1.0 - 1e-4, 1.0]))).all()
        # inverse_time_change undoes time_change
        t = torch.linspace(0.05, 0.95, 19)
        torch.testing.assert_close(clock.inverse_time_change(clock.time_change(t)), t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("a", A_VALUES)
def test_expected_time_matches_integral_and_monte_carlo(a):
    clock = KumaraswamyClock(a)
    bs = torch.tensor([0.3, 1.0, 1.01, 3.0, 20.0])
    et = clock.expected_time(bs)
    # E[T] = int_0^1 (1 - F(t)) dt (float64 trapezoid on a fine grid)
    grid = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    for b, e in zip(bs.tolist(), et.tolist()):
        surv = torch.exp(b * torch.log1p(-grid[:-1] ** a))
        integral = float(torch.trapezoid(torch.cat([surv, torch.zeros(1, dtype=torch.float64)]), grid))
        assert e == pytest.approx(integral, rel=1e-3, abs=1e-5)
    if a == 1.0:
        torch.testing.assert_close(et, 1.0 / (1.0 + bs))
    # Monte Carlo mean of T_in from sample_times
    n = 40_000
    g = torch.Generator().manual_seed(int(10 * a))
    b_in = bs[:, None].expand(-1, n).contiguous()
    t_in, _ = clock.sample_times(b_in, torch.ones_like(b_in), generator=g)
    mc_mean, mc_std = t_in.double().mean(1), t_in.double().std(1)
    assert ((mc_mean - et.double()).abs() <= 5 * mc_std / math.sqrt(n) + 1e-5).all(), (mc_mean, et)


# --- sampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b_in", "b_um"),
    [(1.0, 1.0, 1.0), (1.0, 3.0, 1.0), (0.5, 0.3, 2.5), (2.0, 1.5, 1.5), (5.0, 10.0, 0.5)],
)
def test_sample_times_laws(a, b_in, b_um):
    """T_in ~ Kuma(a, b_in); T_um >= T_in; given T_in = s, T_um has the truncated law
    P(T_um > t | s) = (1 - F_um(t)) / (1 - F_um(s)) on (s, 1], i.e. V = 1 - S_um(T_um)/S_um(T_in) is uniform
    and independent of T_in."""
    clock = KumaraswamyClock(a)
    n = 20_000
    g = torch.Generator().manual_seed(123)
    bi, bu = torch.full((n,), b_in), torch.full((n,), b_um)
    t_in, t_um = clock.sample_times(bi, bu, generator=g)
    assert t_in.shape == t_um.shape == (n,) and not t_in.requires_grad
    assert (t_in >= 0).all() and (t_um <= 1).all() and (t_um >= t_in).all()
    assert ks_stat(t_in, lambda x: kuma_cdf64(x, a, b_in)) < ks_crit(n)
    # The truncated unmasking law via the conditional probability integral transform (float64).
    s_in = torch.exp(b_um * torch.log1p(-t_in.double() ** a))
    s_um = torch.exp(b_um * torch.log1p(-t_um.double() ** a))
    keep = s_in > 1e-6  # T_in not saturated at 1 in fp32
    v = 1.0 - s_um[keep] / s_in[keep]
    uniform = lambda x: x.clamp(0.0, 1.0)  # noqa: E731
    assert ks_stat(v, uniform) < ks_crit(int(keep.sum()))
    early = t_in[keep] < t_in[keep].median()
    assert ks_stat(v[early], uniform) < ks_crit(int(early.sum()))
    assert ks_stat(v[~early], uniform) < ks_crit(int((~early).sum()))
    # seeded
    again = clock.sample_times(bi, bu, generator=torch.Generator().manual_seed(123))
    assert torch.equal(again[0], t_in) and torch.equal(again[1], t_um)


@pytest.mark.parametrize("a", [1.0, 2.0])
def test_sample_times_per_token_rates_and_broadcast_shapes(a):
    """Each token is drawn with its own rate: per-block means follow E[T] = b B(1 + 1/a, b) (float64 here)."""
    clock = KumaraswamyClock(a)
    rates = torch.tensor([[0.5, 5.0], [1.0, 50.0]], dtype=torch.float64)
    b_in = rates.float().repeat_interleave(5000, dim=1)  # (2, 10000)
    t_in, t_um = clock.sample_times(b_in, torch.ones_like(b_in), generator=torch.Generator().manual_seed(0))
    assert t_in.shape == t_um.shape == (2, 10_000)
    means = t_in.view(2, 2, 5000).double().mean(-1)
    c = math.lgamma(1.0 + 1.0 / a)
    et = rates * torch.exp(c + torch.lgamma(rates) - torch.lgamma(1.0 + 1.0 / a + rates))
    torch.testing.assert_close(means, et, rtol=0, atol=0.01)


# --- closed-form state probabilities ---------------------------------------------------------------------

STATE_CASES = [
    # (a, b_in, b_um, t)
    (1.0, 1.0, 1.0, 0.5),
    (1.0, 2.0, 2.0, 0.3),  # b_in == b_um exactly
    (2.0, 3.0, 3.000001, 0.5),  # b_in ~ b_um
    (1.0, 1.5, 1.5 - 1e-6, 0.7),
    (5.0, 0.5, 4.0, 0.7),  # b_in < b_um
    (1.0, 20.0, 0.3, 0.2),  # b_in >> b_um
    (0.5, 50.0, 1.0, 0.5),
    (0.5, 1.5, 1.0, 0.01),  # t near 0
    (1.0, 1.01, 1.0, 1e-3),
    (2.0, 1.0, 2.0, 0.999),  # t near 1
    (1.0, 1.01, 1.0, 1.0 - 1e-4),
    (5.0, 1.01, 1.0, 0.9),
]


def simulate_states(clock, b_in, b_um, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    t_in, t_um = clock.sample_times(torch.full((n,), b_in), torch.full((n,), b_um), generator=g)
    deleted = t < t_in
    masked = (t_in <= t) & (t < t_um)
    clean = t >= t_um
    return torch.stack([deleted, masked, clean]).double().mean(1)


@pytest.mark.parametrize(("a", "b_in", "b_um", "t"), STATE_CASES)
def test_state_probs_match_monte_carlo(a, b_in, b_um, t):
    clock = KumaraswamyClock(a)
    n = 100_000
    freq = simulate_states(clock, b_in, b_um, t, n, seed=7)
    logs = clock.log_state_probs(torch.tensor(t), torch.tensor(b_in), torch.tensor(b_um))
    assert all(torch.isfinite(x).all() for x in logs)
    assert all((x <= 0).all() for x in logs)
    p = torch.stack(logs).double().exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    se = torch.sqrt(p * (1 - p) / n)
    assert ((freq - p).abs() <= 5 * se + 2e-5).all(), (freq, p)


def reference_state_probs(a, b_in, b_um, t):
    """Float64 P_D, P_M, P_C of the exponential race under U = -log(1 - t^a)."""
    u = -math.log1p(-(t**a))
    pd = math.exp(-b_in * u)
    x = (b_in - b_um) * u
    g = 1.0 if x == 0 else -math.expm1(-x) / x
    pm = b_in * u * math.exp(-b_um * u) * g
    return pd, pm, 1.0 - pd - pm


@pytest.mark.parametrize("a", A_VALUES)
def test_state_log_probs_match_float64_reference(a):
    clock = KumaraswamyClock(a)
    for b_in in (0.3, 1.0, 1.01, 4.0, 60.0):
        for b_um in (b_in, b_in + 1e-6, 0.5, 1.0, 10.0):
            for t in (0.05, 0.3, 0.6, 0.9, 0.99):
                lp = clock.log_state_probs(torch.tensor(t), torch.tensor(b_in), torch.tensor(b_um))
                ref = reference_state_probs(a, b_in, b_um, t)
                for got, want in zip(lp, ref):
                    assert math.isfinite(got.item())
                    if want > 1e-30:
                        # log P_D and log P_M are accurate in log space; log P_C (from 1 - P_D - P_M in fp32)
                        # only where P_C is not tiny.
                        if got is lp[2] and want < 1e-5:
                            continue
                        assert got.item() == pytest.approx(math.log(want), rel=1e-4, abs=2e-4), (b_in, b_um, t)


def test_state_probs_vectorised_with_broadcast():
    """t (B, 1) against per-token b (B, L), as the model calls it; shapes and per-element agreement."""
    clock = KumaraswamyClock(2.0)
    t = torch.tensor([[0.1], [0.5], [0.9]])
    b_in = torch.tensor([[1.0, 2.0, 2.0, 30.0]]).expand(3, 4)
    b_um = torch.tensor([[1.0, 2.0, 0.5, 1.0]]).expand(3, 4)
    out = clock.log_state_probs(t, b_in, b_um)
    for x in out:
        assert x.shape == (3, 4)
    for r in range(3):
        for c in range(4):
            single = clock.log_state_probs(t[r, 0], b_in[r, c], b_um[r, c])
            for x, y in zip(out, single):
                torch.testing.assert_close(x[r, c], y)
    total = torch.logsumexp(torch.stack(out), 0)
    torch.testing.assert_close(total, torch.zeros(3, 4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("a", (1.0, 2.0))
@pytest.mark.parametrize("delta", (0.0, 1e-6, 0.3))
@pytest.mark.parametrize("t", (1e-3, 0.2, 0.8, 1.0 - 1e-4))
def test_state_prob_gradients_are_finite(a, delta, t):
    clock = KumaraswamyClock(a)
    b_in = torch.tensor(2.0 + delta, requires_grad=True)
    b_um = torch.tensor(2.0, requires_grad=True)
    for k, lp in enumerate(clock.log_state_probs(torch.tensor(t), b_in, b_um)):
        gi, gu = torch.autograd.grad(lp, (b_in, b_um), retain_graph=True, allow_unused=True, materialize_grads=True)
        assert torch.isfinite(gi) and torch.isfinite(gu), (k, gi, gu)
    # the masked term depends on both rates
    _, lm, _ = clock.log_state_probs(torch.tensor(t), b_in, b_um)
    gi, gu = torch.autograd.grad(lm, (b_in, b_um))
    assert gi != 0 and gu != 0


@pytest.mark.parametrize("t", (0.1, 0.5, 0.9))
def test_masked_log_prob_gradient_in_the_equal_rate_limit(t):
    """At b_in = b_um = b: log P_M = log(b U) - b U, so d/db_in = 1/b - U/2 and d/db_um = -U/2."""
    clock = KumaraswamyClock(1.0)
    u = -math.log1p(-t)
    for b in (0.5, 2.0):
        b_in = torch.tensor(b, requires_grad=True)
        b_um = torch.tensor(b, requires_grad=True)
        _, lm, _ = clock.log_state_probs(torch.tensor(t), b_in, b_um)
        assert lm.item() == pytest.approx(math.log(b * u) - b * u, rel=1e-5)
        gi, gu = torch.autograd.grad(lm, (b_in, b_um))
        assert gi.item() == pytest.approx(1.0 / b - u / 2, rel=1e-4, abs=1e-5)
        assert gu.item() == pytest.approx(-u / 2, rel=1e-4, abs=1e-5)


def test_state_prob_gradients_match_float64_finite_differences():
    """d log P / d b_in, d b_um away from the limit (central differences of the float64 reference)."""
    clock = KumaraswamyClock(2.0)
    t = 0.6
    for b_in0, b_um0 in ((1.0, 3.0), (5.0, 1.0), (2.0, 2.0 + 1e-3)):
        b_in = torch.tensor(b_in0, requires_grad=True)
        b_um = torch.tensor(b_um0, requires_grad=True)
        lps = clock.log_state_probs(torch.tensor(t), b_in, b_um)
        h = 1e-6
        for k, lp in enumerate(lps):
            gi, gu = torch.autograd.grad(lp, (b_in, b_um), retain_graph=True, allow_unused=True, materialize_grads=True)
            fd_i = (math.log(reference_state_probs(2.0, b_in0 + h, b_um0, t)[k])
                    - math.log(reference_state_probs(2.0, b_in0 - h, b_um0, t)[k])) / (2 * h)
            fd_u = (math.log(reference_state_probs(2.0, b_in0, b_um0 + h, t)[k])
                    - math.log(reference_state_probs(2.0, b_in0, b_um0 - h, t)[k])) / (2 * h)
            assert gi.item() == pytest.approx(fd_i, rel=2e-3, abs=2e-3), (k, b_in0, b_um0)
            assert gu.item() == pytest.approx(fd_u, rel=2e-3, abs=2e-3), (k, b_in0, b_um0)


# --- log1mexp / log_g numerics ---------------------------------------------------------------------------


def log1mexp64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def log_g64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    safe = torch.where(x == 0, torch.ones_like(x), x)
    # (1 - e^{-x}) / x > 0 for every x; for x < 0 write it as e^{|x|} (1 - e^{-|x|}) / |x|.
    pos = log1mexp64(safe.abs()) - torch.log(safe.abs())
    val = torch.where(safe > 0, pos, safe.abs() + pos)
    return torch.where(x == 0, torch.zeros_like(x), val)


def test_log1mexp_matches_float64_over_a_wide_range():
    x = torch.logspace(-30, 2.5, 400)  # 1e-30 .. ~316
    got = log1mexp(x)
    assert torch.isfinite(got).all()
    ref = log1mexp64(x)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-35)
    # both branches around log 2 and the saturating end
    for v in (1e-30, 1e-8, 0.5, math.log(2.0), 0.7, 30.0, 80.0):
        assert log1mexp(torch.tensor(v)).item() == pytest.approx(float(log1mexp64(torch.tensor(v))), rel=2e-6)
    # gradient d/dx log(1 - e^{-x}) = 1 / (e^x - 1), finite
    # down to 1e-12: below ~6e-8 the unpicked branch once put 0 * inf = NaN into the gradient
    xg = torch.logspace(-12, 2, 80, requires_grad=True)
    (gr,) = torch.autograd.grad(log1mexp(xg).sum(), xg)
    torch.testing.assert_close(gr.double(), 1.0 / torch.expm1(xg.detach().double()), rtol=1e-3, atol=1e-30)


def test_log_g_matches_float64_over_a_wide_range():
    mags = torch.cat([torch.logspace(-12, 3.2, 300), torch.tensor([1e-4, 1e-4 * (1 + 1e-6), 9.999e-5])])
    x = torch.cat([-mags.flip(0), torch.zeros(1), mags])
    got = log_g(x)
    assert torch.isfinite(got).all()
    ref = log_g64(x)
    # fp32: relative 1e-5 where |log g| is large; absolute ~1e-6 near x = 0 (log g ~ -x/2)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # continuity around the series branch |x| = 1e-4
    edge = torch.tensor([9.9e-5, 1.01e-4, -9.9e-5, -1.01e-4])
    torch.testing.assert_close(log_g(edge).double(), log_g64(edge), rtol=0, atol=2e-7)
    # gradient d/dx log g(x) is finite everywhere and ~ -1/2 near 0
    xg = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(log_g(xg).sum(), xg)
    assert torch.isfinite(gr).all()
    xr = x.double().clone().requires_grad_(True)
    (gref,) = torch.autograd.grad(torch.where(xr.abs() < 1e-6, -xr / 2 + xr**2 / 24, log_g64(xr)).sum(), xr)
    torch.testing.assert_close(gr.double(), gref, rtol=1e-2, atol=2e-3)


# --- schedule regularisers ---------------------------------------------------------------------------------


def test_regularizers_vanish_at_uniform():
    clock = KumaraswamyClock(1.0)
    b = torch.ones(4, 9, requires_grad=True)
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[0, 5:] = False
    regs = schedule_regularizers(clock, b, valid, generator=torch.Generator().manual_seed(0))
    assert set(regs) == {"mixture", "endpoint", "kl"}
    for k, v in regs.items():
        assert v.ndim == 0 and abs(v.item()) < 1e-6, (k, v)


def test_mixture_regularizer_ignores_rows_without_valid_tokens():
    clock = KumaraswamyClock(1.0)
    b = torch.ones(3, 6, requires_grad=True)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1] = False  # e.g. an empty target: nothing to schedule in this row
    regs = schedule_regularizers(clock, b, valid, generator=torch.Generator().manual_seed(0))
    assert abs(regs["mixture"].item()) < 1e-6


@pytest.mark.parametrize(("a", "b0"), [(1.0, 2.0), (1.0, 0.5), (1.0, 1.05), (2.0, 1.0), (5.0, 1.01)])
def test_regularizers_positive_away_from_uniform_and_differentiable(a, b0):
    clock = KumaraswamyClock(a)
    b = torch.full((3, 7), b0, requires_grad=True)
    valid = torch.ones(3, 7, dtype=torch.bool)
    regs = schedule_regularizers(clock, b, valid, generator=torch.Generator().manual_seed(1))
    for k, v in regs.items():
        assert v.item() > 1e-7, (k, v)
        (gr,) = torch.autograd.grad(v, b)
        assert torch.isfinite(gr).all() and gr.abs().sum() > 0, k


def test_kl_regularizer_matches_numerical_integral():
    """KL(Kuma(a, b) || U(0, 1)) = E_T[log f(T)] (float64 midpoint rule over the quantile u = F(t))."""
    n = 400_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for a, b in ((1.0, 3.0), (2.0, 0.7), (5.0, 1.5), (0.5, 2.0)):
        clock = KumaraswamyClock(a)
        reg = schedule_regularizers(clock, torch.full((1, 1), b), torch.ones(1, 1, dtype=torch.bool))["kl"]
        t = (-torch.expm1(torch.log1p(-u) / b)) ** (1.0 / a)  # F^{-1}(u)
        logf = math.log(a * b) + (a - 1) * torch.log(t) + (b - 1) * torch.log1p(-(t**a))
        kl = float(logf.mean())
        assert reg.item() == pytest.approx(kl, rel=5e-3, abs=1e-4), (a, b)


def test_regularizers_ignore_invalid_tokens_and_pull_b_toward_one():
    clock = KumaraswamyClock(1.0)
    valid = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[1.0, 1.0, 50.0, 0.01]], requires_grad=True)
    regs = schedule_regularizers(clock, b, valid, generator=torch.Generator().manual_seed(0))
    for v in regs.values():
        assert abs(v.item()) < 1e-6
    # b > 1 is pushed down, b < 1 up (descent direction of the summed regulariser)
    b = torch.tensor([[3.0, 0.3]], requires_grad=True)
    total = sum(schedule_regularizers(clock, b, torch.ones(1, 2, dtype=torch.bool)).values())
    (gr,) = torch.autograd.grad(total, b)
    assert gr[0, 0] > 0 and gr[0, 1] < 0
