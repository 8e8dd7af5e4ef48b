"""Unit tests of token filtering / choice (insertion_diffusion/sampling/filters.py)."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.sampling.filters import (
    CONFIDENCE_MODES,
    confidence_scores,
    filter_logits,
    sample_tokens,
)


def _logits(B=64, V=12, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def test_no_filter_is_identity():
    lg = _logits()
    assert torch.equal(filter_logits(lg), lg)
    assert torch.equal(filter_logits(lg, top_k=None, top_p=1.0, temperature=1.0), lg)
    assert torch.equal(filter_logits(lg, top_k=lg.shape[-1]), lg)


@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_top_k_keeps_exactly_the_k_largest(k):
    lg = _logits(seed=1)
    out = filter_logits(lg, top_k=k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    top = lg.topk(k, dim=-1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, top, True))
    assert torch.equal(out[kept], lg[kept])  # kept logits are unchanged
    assert (out[~kept] == float("-inf")).all()


def _reference_top_p(logits_row, p):
    """The smallest set of most likely tokens whose probability reaches p."""
    probs = logits_row.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i].item()
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    lg = _logits(B=200, seed=2)
    out = filter_logits(lg, top_p=p)
    for b in range(lg.shape[0]):
        got = set(torch.isfinite(out[b]).nonzero().flatten().tolist())
        assert got == _reference_top_p(lg[b], p), b
        # The kept mass reaches p, and removing the least likely kept token falls below p.
        probs = lg[b].softmax(-1)
        kept_mass = probs[list(got)].sum().item()
        assert kept_mass >= p - 1e-6
        assert kept_mass - min(probs[list(got)].tolist()) < p + 1e-6


def test_top_p_always_keeps_the_top_token():
    lg = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = filter_logits(lg, top_p=1e-6)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]
    assert torch.isfinite(out[0, 0])


def test_top_k_then_top_p():
    lg = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=3 renormalises to (4/9, 3/9, 2/9): top_p=0.7 then keeps the first two.
    out = filter_logits(lg, top_k=3, top_p=0.7)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    # Without top_k, top_p=0.69 keeps the first two as well (0.4 + 0.3 reaches it).
    assert torch.isfinite(filter_logits(lg, top_p=0.69)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(lg, top_p=0.71)).tolist() == [[True, True, True, False]]


def test_temperature_scales_logits():
    lg = _logits(seed=3)
    torch.testing.assert_close(filter_logits(lg, temperature=2.0), lg / 2.0)
    torch.testing.assert_close(filter_logits(lg, temperature=0.5), lg * 2.0)


def test_filters_work_on_batched_3d_logits():
    lg = _logits(B=24, seed=4).view(2, 12, 12)
    out = filter_logits(lg, top_k=3, top_p=0.9)
    assert out.shape == lg.shape
    flat = filter_logits(lg.view(24, 12), top_k=3, top_p=0.9)
    assert torch.equal(out.view(24, 12), flat)


def test_top_k_one_is_argmax():
    lg = _logits(B=100, seed=5).view(4, 25, 12)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(lg, top_k=1, generator=g), lg.argmax(-1))
    assert torch.equal(sample_tokens(lg, top_k=1, temperature=5.0, generator=g), lg.argmax(-1))


def test_temperature_zero_is_argmax():
    lg = _logits(B=100, seed=6)
    assert torch.equal(sample_tokens(lg, temperature=0.0), lg.argmax(-1))


def _frequencies(tokens, V):
    return torch.bincount(tokens.flatten(), minlength=V).double() / tokens.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_frequencies_follow_tempered_softmax(temperature):
    V, n = 6, 40_000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    lg = base.expand(n, V)
    g = torch.Generator().manual_seed(7)
    tok = sample_tokens(lg, temperature=temperature, generator=g)
    assert tok.shape == (n,)
    expected = (base / temperature).double().softmax(-1)
    freq = _frequencies(tok, V)
    tol = 4.5 * torch.sqrt(expected * (1 - expected) / n) + 1e-4
    assert ((freq - expected).abs() < tol).all(), (freq, expected)


def test_sampling_respects_top_k_and_top_p():
    V, n = 6, 20_000
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    g = torch.Generator().manual_seed(8)
    tok = sample_tokens(base.expand(n, V), top_k=3, generator=g)
    assert set(tok.unique().tolist()) == {0, 1, 2}
    freq = _frequencies(tok, V)[:3]
    expected = base[:3].double().softmax(-1)
    assert ((freq - expected).abs() < 0.02).all()
    p = base.softmax(-1)
    top_p = (p[0] + p[1] + 0.5 * p[2]).item()  # nucleus = first three tokens
    tok = sample_tokens(base.expand(n, V), top_p=top_p, generator=g)
    assert set(tok.unique().tolist()) == {0, 1, 2}


def test_sampling_is_seeded():
    lg = _logits(B=200, seed=9)
    a = sample_tokens(lg, generator=torch.Generator().manual_seed(1))
    b = sample_tokens(lg, generator=torch.Generator().manual_seed(1))
    c = sample_tokens(lg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_never_picks_minus_inf_logits():
    lg = _logits(B=500, seed=10)
    lg[:, [0, 1, 2, 3]] = float("-inf")
    tok = sample_tokens(lg, generator=torch.Generator().manual_seed(0))
    assert (tok >= 4).all()


def test_confidence_scores():
    lg = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    torch.testing.assert_close(confidence_scores(lg, "top_prob"), torch.tensor([0.7, 0.4]))
    torch.testing.assert_close(confidence_scores(lg, "prob_diff"), torch.tensor([0.5, 0.05]))
    p = lg.exp()
    torch.testing.assert_close(confidence_scores(lg, "entropy"), (p * p.log()).sum(-1))
    # Higher is more confident for every mode: the peaked row wins.
    for mode in ("top_prob", "prob_diff", "entropy"):
        s = confidence_scores(lg, mode)
        assert s[0] > s[1], mode
    # -inf logits (banned ids) give finite scores.
    lg2 = lg.clone()
    lg2[:, 2] = float("-inf")
    for mode in ("top_prob", "prob_diff", "entropy"):
        assert torch.isfinite(confidence_scores(lg2, mode)).all()


def test_confidence_scores_reject_unknown_mode():
    with pytest.raises(ValueError) as err:
        confidence_scores(torch.zeros(2, 3), "margin")
    for mode in CONFIDENCE_MODES:
        assert mode in str(err.value)


def test_confidence_scores_shape():
    lg = torch.randn(2, 5, 7)
    for mode in ("top_prob", "prob_diff", "entropy"):
        assert confidence_scores(lg, mode).shape == (2, 5)
    # Uniform logits: top_prob = 1/V, entropy = -log V.
    u = torch.zeros(1, 7)
    assert confidence_scores(u, "top_prob").item() == pytest.approx(1 / 7)
    assert confidence_scores(u, "entropy").item() == pytest.approx(-math.log(7), rel=1e-5)
