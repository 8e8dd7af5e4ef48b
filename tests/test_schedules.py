"""Unit tests of the event-time schedules (insertion_diffusion/schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.schedules import (
    T_MAX_EPS,
    CosineSchedule,
    LinearSchedule,
    PolynomialSchedule,
    Schedule,
    make_schedule,
)

SPECS = ["linear", "cosine", "poly:2", "poly:0.5"]


def _ks_uniform(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of samples in [0, 1] and U(0, 1)."""
    x = samples.double().flatten().sort().values
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - x).max().item(), (x - (i - 1) / n).max().item())


@pytest.mark.parametrize("spec", SPECS)
def test_inverse_of_cdf_is_identity_float64(spec):
    s = make_schedule(spec)
    t = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    torch.testing.assert_close(s.inverse(s.cdf(t)), t, atol=1e-9, rtol=0)
    u = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
    torch.testing.assert_close(s.cdf(s.inverse(u)), u, atol=1e-9, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_inverse_of_cdf_is_identity_float32(spec):
    s = make_schedule(spec)
    t = torch.linspace(0.0, 1.0, 10001)
    assert s.cdf(t).dtype == torch.float32
    torch.testing.assert_close(s.inverse(s.cdf(t)), t, atol=5e-4, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_cdf_is_a_cdf(spec):
    s = make_schedule(spec)
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    F = s.cdf(t)
    assert F[0].item() == pytest.approx(0.0, abs=1e-12)
    assert F[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert bool((F[1:] >= F[:-1]).all())
    # Values outside [0, 1] are clamped.
    assert s.cdf(torch.tensor([-0.5, 1.5], dtype=torch.float64)).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("spec", SPECS)
def test_hazard_matches_autograd_derivative_of_cdf(spec):
    s = make_schedule(spec)
    t = torch.linspace(0.01, 0.99, 197, dtype=torch.float64).requires_grad_(True)
    F = s.cdf(t)
    (dF,) = torch.autograd.grad(F.sum(), t)
    expected = dF / (1.0 - F.detach())
    got = s.hazard(t.detach())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("spec", [*SPECS, "poly:0.25"])
def test_cumulative_hazard_integrates_the_hazard(spec):
    """Lambda(0) = 0, dLambda/dt = hazard, and Lambda(t') - Lambda(t) = log((1 - F(t)) / (1 - F(t')))."""
    s = make_schedule(spec)
    assert s.cumulative_hazard(torch.zeros(1, dtype=torch.float64)).item() == 0.0
    t = torch.linspace(0.01, 0.99, 197, dtype=torch.float64).requires_grad_(True)
    (dL,) = torch.autograd.grad(s.cumulative_hazard(t).sum(), t)
    torch.testing.assert_close(dL, s.hazard(t.detach()), rtol=1e-7, atol=1e-9)
    a, b = torch.tensor([0.0, 0.1, 0.5]), torch.tensor([0.05, 0.3, 0.99])
    F = s.cdf
    torch.testing.assert_close(s.cumulative_hazard(b) - s.cumulative_hazard(a), torch.log((1 - F(a)) / (1 - F(b))))
    assert torch.isfinite(s.cumulative_hazard(torch.tensor([1.0]))).all()


@pytest.mark.parametrize("spec", SPECS)
def test_hazard_is_finite_and_positive_at_the_ends(spec):
    s = make_schedule(spec)
    t = torch.tensor([0.0, 1e-4, 1.0 - 1e-4, 1.0, 1.5])
    h = s.hazard(t)
    assert torch.isfinite(h).all()
    assert (h >= 0).all()
    # Clamped at 1 - T_MAX_EPS (fp32 rounding of 1 - 1e-6 is ~1%): hazard(1) ~ hazard(1 - T_MAX_EPS).
    assert h[3].item() == pytest.approx(
        s.hazard(torch.tensor(1.0 - T_MAX_EPS, dtype=torch.float64)).item(), rel=0.05
    )
    assert h[3].item() == h[4].item()


def test_closed_forms():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(LinearSchedule().hazard(t), 1.0 / (1.0 - t))
    torch.testing.assert_close(CosineSchedule().cdf(t), 1.0 - torch.cos(math.pi * t / 2))
    torch.testing.assert_close(PolynomialSchedule(3.0).cdf(t), t**3)
    torch.testing.assert_close(PolynomialSchedule(3.0).hazard(t), 3 * t**2 / (1 - t**3))


@pytest.mark.parametrize("spec", SPECS)
def test_sample_is_inverse_cdf_and_matches_distribution(spec):
    s = make_schedule(spec)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20_000, generator=g, dtype=torch.float64)
    T = s.sample(u)
    torch.testing.assert_close(T, s.inverse(u))
    assert bool(((T >= 0) & (T <= 1)).all())
    # Probability integral transform: F(T) ~ U(0, 1).
    assert _ks_uniform(s.cdf(T)) < 1.63 / math.sqrt(u.numel())


@pytest.mark.parametrize("spec", SPECS)
def test_sample_after_is_after_s(spec):
    s = make_schedule(spec)
    g = torch.Generator().manual_seed(1)
    start = torch.rand(50_000, generator=g)
    start[:5] = torch.tensor([0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0])
    u = torch.rand(50_000, generator=g)
    u[5:10] = torch.tensor([0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0 - 2**-24])
    T = s.sample_after(start, u)
    assert T.shape == start.shape
    assert bool((T >= start).all())
    assert bool((T <= 1.0).all())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("s0", [0.0, 0.3, 0.8])
def test_sample_after_matches_truncated_cdf(spec, s0):
    """KS check: P(T <= x | T > s) = (F(x) - F(s)) / (1 - F(s)) for a fixed s."""
    sched = make_schedule(spec)
    n = 20_000
    g = torch.Generator().manual_seed(2)
    s = torch.full((n,), s0, dtype=torch.float64)
    T = sched.sample_after(s, torch.rand(n, generator=g, dtype=torch.float64))
    Fs = sched.cdf(s)
    pit = (sched.cdf(T) - Fs) / (1.0 - Fs)
    assert _ks_uniform(pit) < 1.63 / math.sqrt(n)  # 1% critical value
    # And against the untruncated law when s > 0 the test has power: F(T) itself is not uniform.
    if s0 > 0:
        assert _ks_uniform(sched.cdf(T)) > 5 / math.sqrt(n)


@pytest.mark.parametrize("spec", SPECS)
def test_sample_after_with_varying_start(spec):
    sched = make_schedule(spec)
    n = 20_000
    g = torch.Generator().manual_seed(3)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.95
    T = sched.sample_after(s, torch.rand(n, generator=g, dtype=torch.float64))
    Fs = sched.cdf(s)
    assert _ks_uniform((sched.cdf(T) - Fs) / (1.0 - Fs)) < 1.63 / math.sqrt(n)


def test_make_schedule_builds_each_family():
    assert isinstance(make_schedule("linear"), LinearSchedule)
    assert isinstance(make_schedule(" Cosine "), CosineSchedule)
    p = make_schedule("poly:2.5")
    assert isinstance(p, PolynomialSchedule) and p.exponent == 2.5
    assert p.name == "poly:2.5"
    assert "poly:2.5" in repr(p)
    existing = LinearSchedule()
    assert make_schedule(existing) is existing
    assert isinstance(existing, Schedule)


@pytest.mark.parametrize("bad", ["quadratic", "", "poly:", "poly:abc", "poly:-1", "poly:0", "lin"])
def test_make_schedule_errors_name_key_and_allowed_values(bad):
    with pytest.raises(ValueError) as err:
        make_schedule(bad, key="model.insertion_schedule")
    msg = str(err.value)
    assert "model.insertion_schedule" in msg
    assert repr(bad) in msg
    for allowed in ("linear", "cosine", "poly:<exponent>"):
        assert allowed in msg


def test_polynomial_rejects_non_positive_exponent():
    for p in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="exponent"):
            PolynomialSchedule(p)


def test_polynomial_rejects_infinite_exponent():
    with pytest.raises(ValueError):
        make_schedule("poly:inf")


def test_base_schedule_is_abstract():
    s = Schedule()
    for name in ("cdf", "inverse", "hazard"):
        with pytest.raises(NotImplementedError):
            getattr(s, name)(torch.tensor([0.5]))


def test_cosine_cdf_is_accurate_near_zero_in_float32():
    t = torch.tensor([1e-4, 1e-3, 1e-2])
    exact = 2.0 * torch.sin(math.pi * t.double() / 4) ** 2
    torch.testing.assert_close(CosineSchedule().cdf(t).double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("spec", ["poly:0.1", "poly:0.25", "poly:0.5", "poly:2"])
def test_poly_hazard_in_fp32_matches_fp64_up_to_the_clamp(spec):
    """1 - t^p cancels near t = 1; computed as -expm1(p log t), fp32 stays within 1e-5 of fp64 at the same t."""
    s = make_schedule(spec)
    t = torch.tensor([1e-4, 0.5, 1.0 - 1e-3, 1.0 - 1e-5, 1.0 - T_MAX_EPS])
    torch.testing.assert_close(s.hazard(t).double(), s.hazard(t.double()), rtol=1e-5, atol=0.0)
