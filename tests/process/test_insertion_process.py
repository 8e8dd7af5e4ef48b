"""Unit tests of the insertion + masking forward process (insertion_diffusion/process/insertion.py)."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.process.insertion import (
    CLEAN,
    DELETED,
    MASKED,
    PartialState,
    gap_sums,
    parse_time_sampling,
    partial_state,
    sample_event_times,
    stratified_times,
    training_times,
)
from insertion_diffusion.process.rng import RowRNG
from insertion_diffusion.schedules import LinearSchedule, make_schedule

PAD, MASK, BOS, EOS = 0, 1, 2, 3


def make_batch(prompt_lens, target_lens, L=None, seed=0, vocab=(4, 30)):
    """Rows laid out as [prompt][BOS][target][EOS][PAD...]; fixed = prompt + BOS + EOS.

    Returns z1, fixed, attention_mask, and the per-row python lists (prompt, target).
    """
    g = torch.Generator().manual_seed(seed)
    need = max(p + t + 2 for p, t in zip(prompt_lens, target_lens))
    L = L or need
    B = len(prompt_lens)
    z1 = torch.full((B, L), PAD, dtype=torch.long)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    attn = torch.zeros(B, L, dtype=torch.bool)
    rows = []
    for b, (p, t) in enumerate(zip(prompt_lens, target_lens)):
        prompt = torch.randint(*vocab, (p,), generator=g).tolist()
        target = torch.randint(*vocab, (t,), generator=g).tolist()
        row = prompt + [BOS] + target + [EOS]
        z1[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = True
        fixed[b, : p + 1] = True
        fixed[b, p + 1 + t] = True
        rows.append((prompt, target))
    return z1, fixed, attn, rows


def noise(z1, fixed, attn, t, seed=0, insertion="linear", unmasking="linear", trim=True):
    g = torch.Generator().manual_seed(seed)
    t_in, t_um = sample_event_times(z1.shape, make_schedule(insertion), make_schedule(unmasking), generator=g)
    st = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD, trim=trim)
    return st, t_in, t_um


def brute_force_state(z1, fixed, attn, t, t_in, t_um):
    """Python reference of the per-position state and the compacted row."""
    B, L = z1.shape
    out = []
    for b in range(B):
        states, kept = [], []
        for i in range(L):
            if not attn[b, i]:
                states.append(CLEAN)
                continue
            if fixed[b, i]:
                s = CLEAN
            elif t[b] < t_in[b, i]:
                s = DELETED
            elif t[b] < t_um[b, i]:
                s = MASKED
            else:
                s = CLEAN
            states.append(s)
            if s != DELETED:
                kept.append(i)
        gaps, prev = [], -1
        for i in kept:
            gaps.append(sum(1 for k in range(prev + 1, i) if states[k] == DELETED))
            prev = i
        out.append((states, kept, gaps))
    return out


PROMPTS = [3, 0, 5, 2, 1, 4]
TARGETS = [6, 4, 0, 9, 1, 3]


def test_partial_state_matches_python_reference():
    z1, fixed, attn, _ = make_batch(PROMPTS, TARGETS, L=20, seed=1)
    B = z1.shape[0]
    for k, tv in enumerate([0.05, 0.3, 0.5, 0.7, 0.95]):
        t = torch.full((B,), tv)
        t[::2] = 1.0 - tv  # mix times within the batch
        st, t_in, t_um = noise(z1, fixed, attn, t, seed=k)
        ref = brute_force_state(z1, fixed, attn, t, t_in, t_um)
        assert st.state.tolist() == [r[0] for r in ref]
        for b, (states, kept, gaps) in enumerate(ref):
            n = len(kept)
            assert st.lengths[b].item() == n
            assert st.valid[b].tolist() == [True] * n + [False] * (st.x.shape[1] - n)
            assert st.src[b, :n].tolist() == kept
            assert st.gap[b, :n].tolist() == gaps
            assert st.target[b, :n].tolist() == z1[b, kept].tolist()
            assert st.is_mask[b, :n].tolist() == [states[i] == MASKED for i in kept]
            assert st.fixed[b, :n].tolist() == fixed[b, kept].tolist()
            exp_x = [MASK if states[i] == MASKED else z1[b, i].item() for i in kept]
            assert st.x[b, :n].tolist() == exp_x
            # Beyond the length: PAD, zero gap, not masked, not fixed.
            assert (st.x[b, n:] == PAD).all() and (st.target[b, n:] == PAD).all()
            assert (st.gap[b, n:] == 0).all()
            assert not st.is_mask[b, n:].any() and not st.fixed[b, n:].any()


@pytest.mark.parametrize("tv", [0.01, 0.2, 0.5, 0.8, 0.99])
def test_fixed_tokens_present_unchanged_and_in_order(tv):
    z1, fixed, attn, rows = make_batch(PROMPTS * 4, TARGETS * 4, seed=2)
    B = z1.shape[0]
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), tv), seed=3)
    for b, (prompt, _target) in enumerate(rows):
        n = st.lengths[b].item()
        x = st.x[b, :n].tolist()
        fx = st.fixed[b, :n].tolist()
        assert [v for v, f in zip(x, fx) if f] == prompt + [BOS, EOS]
        # Layout of x_t: the prompt and BOS lead, EOS closes the row.
        assert x[: len(prompt) + 1] == prompt + [BOS]
        assert x[-1] == EOS
        assert all(fx[: len(prompt) + 1]) and fx[-1] and not any(fx[len(prompt) + 1 : -1])
        # The middle only holds masks or target tokens (never PAD / BOS / EOS).
        middle = x[len(prompt) + 1 : -1]
        assert all(v == MASK or v >= 4 for v in middle)


@pytest.mark.parametrize("tv", [0.2, 0.5, 0.8])
def test_kept_tokens_preserve_order(tv):
    z1, fixed, attn, rows = make_batch(PROMPTS * 4, TARGETS * 4, seed=4)
    B = z1.shape[0]
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), tv), seed=5)
    for b, (_prompt, target) in enumerate(rows):
        n = st.lengths[b].item()
        src = st.src[b, :n]
        assert bool((src[1:] > src[:-1]).all())
        # Clean (unmasked, non-fixed) tokens form a subsequence of the target, in order.
        clean = [
            v
            for v, f, m in zip(st.x[b, :n].tolist(), st.fixed[b, :n].tolist(), st.is_mask[b, :n].tolist())
            if not f and not m
        ]
        it = iter(target)
        assert all(any(c == v for v in it) for c in clean)


@pytest.mark.parametrize("tv", [0.01, 0.3, 0.6, 0.9])
def test_gap_lengths_sum_to_deleted_count(tv):
    z1, fixed, attn, rows = make_batch(PROMPTS * 3, TARGETS * 3, L=24, seed=6)
    B = z1.shape[0]
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), tv), seed=7)
    n_deleted = (st.state == DELETED).sum(1)
    torch.testing.assert_close(st.gap.sum(1), n_deleted.float())
    # Every row's real length is |x_t| + deleted.
    torch.testing.assert_close(st.lengths + n_deleted, attn.sum(1))
    # Gaps left of prompt tokens and BOS are always empty (fixed tokens are never deleted).
    for b, (prompt, _) in enumerate(rows):
        assert (st.gap[b, : len(prompt) + 1] == 0).all()
    assert (st.gap >= 0).all()
    assert torch.equal(st.gap, st.gap.round())


def test_gap_sums_matches_brute_force_on_random_values():
    g = torch.Generator().manual_seed(8)
    B, L = 7, 19
    for trial in range(5):
        values = torch.rand(B, L, generator=g, dtype=torch.float64) * 3
        deleted = torch.rand(B, L, generator=g) < 0.5
        # Keep a random subset of non-deleted positions, then (per row) compact them as src.
        n_real = torch.randint(1, L + 1, (B,), generator=g)
        srcs = []
        for b in range(B):
            deleted[b, n_real[b] - 1] = False  # last real position (EOS) is kept
            deleted[b, n_real[b] :] = False  # pads are never deleted
            srcs.append([i for i in range(n_real[b]) if not deleted[b, i]])
        W = max(map(len, srcs)) + trial % 2  # also check an extra padded column
        src = torch.zeros(B, W, dtype=torch.long)
        valid = torch.zeros(B, W, dtype=torch.bool)
        for b, s in enumerate(srcs):
            src[b, : len(s)] = torch.tensor(s)
            valid[b, : len(s)] = True
        got = gap_sums(values, deleted, src, valid)
        expected = torch.zeros(B, W, dtype=torch.float64)
        for b, s in enumerate(srcs):
            prev = -1
            for j, i in enumerate(s):
                expected[b, j] = sum(values[b, k].item() for k in range(prev + 1, i) if deleted[b, k])
                prev = i
        torch.testing.assert_close(got, expected)


def test_partial_state_gap_sums_method():
    z1, fixed, attn, _ = make_batch(PROMPTS, TARGETS, seed=9)
    B, L = z1.shape
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), 0.4), seed=10)
    assert isinstance(st, PartialState)
    ones = torch.ones(B, L)
    torch.testing.assert_close(st.gap_sums(ones), st.gap)
    vals = torch.arange(B * L, dtype=torch.float32).view(B, L)
    ref = brute_force_gap_values(st, vals)
    torch.testing.assert_close(st.gap_sums(vals), ref)


def brute_force_gap_values(st, vals):
    out = torch.zeros_like(st.gap)
    for b in range(vals.shape[0]):
        prev = -1
        for j in range(st.lengths[b].item()):
            i = st.src[b, j].item()
            out[b, j] = sum(vals[b, k].item() for k in range(prev + 1, i) if st.state[b, k] == DELETED)
            prev = i
    return out


def test_t_near_zero_deletes_everything_not_fixed():
    z1, fixed, attn, rows = make_batch(PROMPTS, TARGETS, seed=11)
    B = z1.shape[0]
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), 1e-9), seed=12)
    for b, (prompt, target) in enumerate(rows):
        n = len(prompt) + 2
        assert st.lengths[b].item() == n
        assert st.x[b, :n].tolist() == prompt + [BOS, EOS]
        assert st.gap[b, n - 1].item() == len(target)  # the whole target is in the gap left of EOS
        assert not st.is_mask[b].any()
    assert st.x.shape[1] == max(len(p) for p, _ in rows) + 2  # trimmed


def test_t_one_is_all_clean():
    z1, fixed, attn, _ = make_batch(PROMPTS, TARGETS, seed=13)
    B, L = z1.shape
    st, _, _ = noise(z1, fixed, attn, torch.ones(B), seed=14)
    assert (st.state == CLEAN).all()
    assert torch.equal(st.lengths, attn.sum(1))
    assert torch.equal(st.x, z1[:, : st.x.shape[1]])
    assert torch.equal(st.src[st.valid], torch.arange(L).expand(B, L)[attn])
    assert (st.gap == 0).all() and not st.is_mask.any()


def test_t_near_one_is_almost_all_clean():
    z1, fixed, attn, _ = make_batch([2] * 64, [10] * 64, seed=15)
    B = z1.shape[0]
    st, _, _ = noise(z1, fixed, attn, torch.full((B,), 1.0 - 1e-4), seed=16)
    noisy = attn & ~fixed
    frac_clean = (st.state == CLEAN)[noisy].float().mean().item()
    assert frac_clean > 0.99


def _state_frequencies(tv, insertion="linear", unmasking="linear", B=2000, seed=17):
    z1, fixed, attn, _ = make_batch([1] * B, [10] * B, seed=0)
    st, _, _ = noise(
        z1, fixed, attn, torch.full((B,), tv), seed=seed, insertion=insertion, unmasking=unmasking
    )
    noisy = attn & ~fixed
    s = st.state[noisy]
    n = s.numel()
    return [(s == k).float().mean().item() for k in (DELETED, MASKED, CLEAN)], n


@pytest.mark.parametrize("tv", [0.15, 0.5, 0.85])
def test_state_frequencies_match_closed_form_linear(tv):
    """T_in ~ U(0,1), T_um | T_in ~ U(T_in, 1): P_D = 1-t, P_M = int_0^t (1-t)/(1-s) ds = -(1-t) log(1-t)."""
    (pd, pm, pc), n = _state_frequencies(tv)
    exp_d = 1.0 - tv
    exp_m = -(1.0 - tv) * math.log(1.0 - tv)
    exp_c = 1.0 - exp_d - exp_m
    for got, exp in ((pd, exp_d), (pm, exp_m), (pc, exp_c)):
        tol = 4.5 * math.sqrt(exp * (1 - exp) / n) + 1e-3
        assert abs(got - exp) < tol, (tv, got, exp, tol)


@pytest.mark.parametrize(("insertion", "unmasking"), [("poly:2", "cosine"), ("cosine", "poly:0.5")])
def test_state_frequencies_match_quadrature_general_schedules(insertion, unmasking):
    """P_D = 1 - F_in(t); P_M = int_0^t f_in(s) (1 - F_um(t)) / (1 - F_um(s)) ds (midpoint rule)."""
    tv = 0.6
    fin, fum = make_schedule(insertion), make_schedule(unmasking)
    m = 20_000
    s = (torch.arange(m, dtype=torch.float64) + 0.5) * tv / m
    s_req = s.clone().requires_grad_(True)
    (f_in,) = torch.autograd.grad(fin.cdf(s_req).sum(), s_req)
    t64 = torch.tensor(tv, dtype=torch.float64)
    exp_m = (f_in * (1 - fum.cdf(t64)) / (1 - fum.cdf(s))).sum().item() * tv / m
    exp_d = 1.0 - fin.cdf(t64).item()
    (pd, pm, _), n = _state_frequencies(tv, insertion, unmasking, seed=18)
    for got, exp in ((pd, exp_d), (pm, exp_m)):
        assert abs(got - exp) < 4.5 * math.sqrt(exp * (1 - exp) / n) + 1e-3, (got, exp)


def test_sample_event_times_ordering_and_marginals():
    g = torch.Generator().manual_seed(19)
    t_in, t_um = sample_event_times((4000, 5), LinearSchedule(), LinearSchedule(), generator=g)
    assert t_in.shape == t_um.shape == (4000, 5)
    assert bool((t_um >= t_in).all()) and bool((t_in >= 0).all()) and bool((t_um <= 1).all())
    # Linear: E[T_in] = 1/2, E[T_um] = E[(1 + T_in)/2] = 3/4.
    assert t_in.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t_um.mean().item() == pytest.approx(0.75, abs=0.01)
    # Same generator seed -> same times; different seed -> different times.
    a = sample_event_times(
        (3, 4), LinearSchedule(), LinearSchedule(), generator=torch.Generator().manual_seed(5)
    )
    b = sample_event_times(
        (3, 4), LinearSchedule(), LinearSchedule(), generator=torch.Generator().manual_seed(5)
    )
    c = sample_event_times(
        (3, 4), LinearSchedule(), LinearSchedule(), generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("B", [1, 5, 64])
def test_stratified_times_cover_the_strata(B):
    eps = 1e-3
    for seed in range(3):
        t = stratified_times(B, eps, generator=torch.Generator().manual_seed(seed))
        assert t.shape == (B,)
        assert bool(((t >= eps) & (t <= 1 - eps)).all())
        srt = t.sort().values
        width = (1 - 2 * eps) / B
        lo = eps + torch.arange(B) * width
        assert bool(((srt >= lo - 1e-6) & (srt < lo + width + 1e-6)).all())
        # One shared offset: consecutive sorted times are exactly one stratum apart.
        if B > 1:
            torch.testing.assert_close(srt[1:] - srt[:-1], torch.full((B - 1,), width), atol=1e-5, rtol=0)


def test_stratified_times_are_shuffled_and_seeded():
    a = stratified_times(64, 1e-3, generator=torch.Generator().manual_seed(0))
    b = stratified_times(64, 1e-3, generator=torch.Generator().manual_seed(0))
    c = stratified_times(64, 1e-3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, a.sort().values)  # shuffled (probability 1/64! of failing)
    # Mean of stratified uniforms on [eps, 1-eps] is 1/2 up to one stratum.
    assert abs(a.mean().item() - 0.5) < 1 / 64


def test_trim_width_is_max_length_and_matches_untrimmed():
    z1, fixed, attn, _ = make_batch(PROMPTS, TARGETS, L=30, seed=20)
    B, L = z1.shape
    t = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    g = torch.Generator().manual_seed(21)
    t_in, t_um = sample_event_times(z1.shape, LinearSchedule(), LinearSchedule(), generator=g)
    a = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD, trim=True)
    b = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD, trim=False)
    W = int(a.lengths.max())
    assert a.x.shape == (B, W) and b.x.shape == (B, L)
    assert W < L
    for name in ("x", "valid", "fixed", "is_mask", "target", "src", "gap"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert torch.equal(ta, tb[:, :W]), name
    assert not b.valid[:, W:].any()
    assert (b.x[:, W:] == PAD).all()
    assert torch.equal(a.state, b.state) and torch.equal(a.lengths, b.lengths)


def test_pads_and_fixed_ignore_event_times():
    z1, fixed, attn, _ = make_batch([2, 3], [4, 1], L=12, seed=22)
    B, L = z1.shape
    # Every position would be deleted by its times, but fixed and PAD positions must not be.
    t_in = torch.ones(B, L)
    t_um = torch.ones(B, L)
    st = partial_state(z1, fixed, attn, torch.full((B,), 0.5), t_in, t_um, MASK, PAD)
    assert (st.state[fixed] == CLEAN).all()
    assert (st.state[~attn] == CLEAN).all()
    assert (st.state[attn & ~fixed] == DELETED).all()
    assert torch.equal(st.lengths, fixed.sum(1))


def test_stratified_offset_is_uniform_across_draws():
    """The shared offset u = (min t - eps) B / (1 - 2 eps) is a fresh U(0, 1) per call."""
    eps, B = 1e-3, 8
    g = torch.Generator().manual_seed(0)
    u = torch.stack(
        [(stratified_times(B, eps, generator=g).min() - eps) * B / (1 - 2 * eps) for _ in range(400)]
    )
    assert bool(((u >= 0) & (u < 1)).all())
    srt = u.double().sort().values
    i = torch.arange(1, 401, dtype=torch.float64)
    ks = max((i / 400 - srt).max().item(), (srt - (i - 1) / 400).max().item())
    assert ks < 1.63 / math.sqrt(400)


def test_uniform_training_times_are_the_stratified_times_with_unit_weights():
    t, w = training_times(16, 1e-3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, stratified_times(16, 1e-3, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(w, torch.ones(16))


@pytest.mark.parametrize("share", [0.5, 0.125])
def test_early_training_times_are_importance_weighted(share):
    """Under early:p:share the weighted mean of f(t) estimates the integral of f over (0, 1), as uniform times do,
    while a share of the rows sits where the inserted share t^p is uniform (uniform times never reach t^p < 0.1)."""
    p, B = 0.25, 40_000
    t, w = training_times(B, 1e-3, generator=torch.Generator().manual_seed(0), early=p, share=share)
    t64, w64 = t.double(), w.double()
    assert bool((w > 0).all()) and float(w.max()) <= 1.0 / ((1 - share) + share * p) + 1e-6
    for f, integral in ((lambda x: torch.ones_like(x), 1.0), (lambda x: x, 0.5), (lambda x: x**2, 1 / 3),
                        (lambda x: x ** -0.5, 2.0)):
        assert float((w64 * f(t64)).mean()) == pytest.approx(integral, rel=0.03)
    early_share = float((t64**p < 0.1).double().mean())
    assert early_share == pytest.approx(share * 0.1, rel=0.15)  # share of the rows x P(u < 0.1)
    u, _ = training_times(B, 1e-3, generator=torch.Generator().manual_seed(0))
    assert float((u.double() ** p < 0.1).double().mean()) == 0.0
    # The weight is the inverse mixture density (1 - share) + share p t^(p-1).
    torch.testing.assert_close(w64, 1.0 / ((1 - share) + share * p * t64 ** (p - 1.0)), rtol=1e-5, atol=0)


def test_early_training_times_follow_the_row_ids():
    """With a RowRNG a row's time and weight depend on its id only, not on the batch it is in."""
    rows = torch.arange(10)
    t_all, w_all = training_times(10, 1e-3, generator=RowRNG(7, rows), early=0.25)
    t_part, w_part = training_times(4, 1e-3, generator=RowRNG(7, rows[6:]), early=0.25)
    torch.testing.assert_close(t_part, t_all[6:])
    torch.testing.assert_close(w_part, w_all[6:])
    assert (w_all != 1).all()


@pytest.mark.parametrize(("spec", "expected"), [("uniform", None), ("early:0.25", (0.25, 0.5)),
                                                ("early:0.5", (0.5, 0.5)), ("early:0.25:0.125", (0.25, 0.125))])
def test_parse_time_sampling(spec, expected):
    assert parse_time_sampling(spec) == expected


@pytest.mark.parametrize("spec", ["late", "early:1", "early:0", "early:-0.5", "early:abc", "Early:0.25", "early:0.25:0",
                                  "early:0.25:1", "early:0.25:x", "early:0.25:0.1:2", "early:0.25:"])
def test_parse_time_sampling_refuses_with_the_key(spec):
    with pytest.raises(ValueError, match=r"model\.time_sampling=.*(allowed values: uniform, early:<p>|in \(0, 1\))"):
        parse_time_sampling(spec)
