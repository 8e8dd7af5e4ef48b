"""Unit tests of the rate-matching losses (insertion_diffusion/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from insertion_diffusion.losses import RATE_CLAMP, LossTerms, bregman_rate, rate_matching_terms
from insertion_diffusion.models.base import ratio_value

# ---------------------------------------------------------------------------------------------------------
# bregman_rate


def test_bregman_is_nonnegative_on_random_pairs():
    g = torch.Generator().manual_seed(0)
    r = torch.exp(torch.randn(10_000, generator=g) * 3)
    r_hat = torch.exp(torch.randn(10_000, generator=g) * 3)
    r[:100] = 0.0
    r_hat[100:200] = 0.0
    d = bregman_rate(r, r_hat)
    assert torch.isfinite(d).all()
    assert (d >= -1e-6 * (1 + r.abs())).all()


def test_bregman_is_zero_at_equality():
    r = torch.tensor([1e-6, 0.01, 0.5, 1.0, 3.0, 100.0, 1e4])
    torch.testing.assert_close(bregman_rate(r, r.clone()), torch.zeros_like(r), atol=1e-6, rtol=0)
    # Both clamped: zero and tiny rates count as equal.
    assert bregman_rate(torch.tensor([0.0]), torch.tensor([1e-12])).item() == 0.0


def test_bregman_matches_formula():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(50, generator=g, dtype=torch.float64) * 5 + 0.01
    r_hat = torch.rand(50, generator=g, dtype=torch.float64) * 5 + 0.01
    expected = r_hat - r + r * torch.log(r / r_hat)
    got = bregman_rate(r, r_hat)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # A hand-computed value: D(2, 1) = 1 - 2 + 2 log 2.
    assert bregman_rate(torch.tensor(2.0), torch.tensor(1.0)).item() == pytest.approx(
        -1 + 2 * math.log(2), rel=1e-6
    )


def test_bregman_clamps_at_rate_clamp():
    # r = 0 -> D = r_hat - 1e-9 + 1e-9 log(1e-9 / r_hat) ~ r_hat
    r_hat = torch.tensor([0.5, 2.0])
    d = bregman_rate(torch.zeros(2), r_hat)
    c = RATE_CLAMP
    expected = r_hat - c + c * torch.log(c / r_hat)
    torch.testing.assert_close(d, expected)
    # r_hat = 0 -> finite (log barrier at the clamp).
    d0 = bregman_rate(torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(d0).all()
    assert d0.item() == pytest.approx(c - 1 + math.log(1 / c), rel=1e-5)


def test_bregman_gradient_wrt_prediction():
    """dD/dr_hat = 1 - r / r_hat: zero at the target, sign pushes r_hat toward r."""
    r = torch.tensor([0.3, 1.0, 4.0])
    r_hat = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    bregman_rate(r, r_hat).sum().backward()
    torch.testing.assert_close(r_hat.grad, 1 - r / r_hat.detach())


# ---------------------------------------------------------------------------------------------------------
# rate_matching_terms


def _terms_inputs(seed=0, B=3, W=6, V=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, W, V, generator=g)
    target = torch.randint(0, V, (B, W), generator=g)
    is_mask = torch.rand(B, W, generator=g) < 0.5
    weight = torch.rand(B, 1, generator=g) + 0.5
    ins_t = torch.randint(0, 4, (B, W), generator=g).float() * 1.3
    ins_p = torch.rand(B, W, generator=g) * 4
    allowed = torch.rand(B, W, generator=g) < 0.7
    return logits, target, is_mask, weight, ins_t, ins_p, allowed


def test_rate_matching_terms_match_manual_sums():
    logits, target, is_mask, weight, ins_t, ins_p, allowed = _terms_inputs()
    B, W, _ = logits.shape
    out = rate_matching_terms(logits, target, is_mask, weight, ins_t, ins_p, allowed)
    assert isinstance(out, LossTerms)
    logp = logits.log_softmax(-1)
    un_rows = torch.zeros(B)
    in_rows = torch.zeros(B)
    correct = 0
    for b in range(B):
        for j in range(W):
            if is_mask[b, j]:
                un_rows[b] += -weight[b, 0] * logp[b, j, target[b, j]]
                correct += int(logits[b, j].argmax() == target[b, j])
            if allowed[b, j]:
                r, rh = max(ins_t[b, j].item(), 1e-9), max(ins_p[b, j].item(), 1e-9)
                in_rows[b] += rh - r + r * math.log(r / rh)
    torch.testing.assert_close(out.unmask, un_rows.sum())
    torch.testing.assert_close(out.insert, in_rows.sum())
    torch.testing.assert_close(out.per_row, un_rows + in_rows)
    assert out.num_masked.item() == int(is_mask.sum())
    assert out.correct.item() == correct
    assert out.per_row.shape == (B,)


def test_unmask_weight_broadcasts_per_row_or_per_position():
    logits, target, is_mask, weight, ins_t, ins_p, allowed = _terms_inputs(seed=1)
    a = rate_matching_terms(logits, target, is_mask, weight, ins_t, ins_p, allowed)
    b = rate_matching_terms(logits, target, is_mask, weight.expand_as(ins_t).clone(), ins_t, ins_p, allowed)
    torch.testing.assert_close(a.per_row, b.per_row)
    # Per-position weights are honoured position by position.
    w = torch.zeros_like(ins_t)
    w[0, 0] = 2.0
    is_mask2 = torch.zeros_like(is_mask)
    is_mask2[0, 0] = True
    c = rate_matching_terms(logits, target, is_mask2, w, ins_t, ins_p, torch.zeros_like(allowed))
    ce = F.cross_entropy(logits[0, :1], target[0, :1])
    torch.testing.assert_close(c.unmask, 2.0 * ce)


def test_unmasked_and_disallowed_positions_do_not_contribute():
    logits, target, is_mask, weight, ins_t, ins_p, allowed = _terms_inputs(seed=2)
    base = rate_matching_terms(logits, target, is_mask, weight, ins_t, ins_p, allowed)
    # Changing logits at non-masked positions, or predictions at disallowed gaps, changes nothing.
    logits2 = logits.clone()
    logits2[~is_mask] += 5 * torch.randn_like(logits2[~is_mask])
    ins_p2 = ins_p.clone()
    ins_p2[~allowed] = 123.0
    other = rate_matching_terms(logits2, target, is_mask, weight, ins_t, ins_p2, allowed)
    torch.testing.assert_close(other.per_row, base.per_row)
    # No masks and nothing allowed -> exactly zero.
    z = rate_matching_terms(
        logits, target, torch.zeros_like(is_mask), weight, ins_t, ins_p, torch.zeros_like(allowed)
    )
    assert z.unmask.item() == 0.0 and z.insert.item() == 0.0 and z.num_masked.item() == 0


def test_rate_matching_terms_are_fp32_with_low_precision_inputs():
    logits, target, is_mask, weight, ins_t, ins_p, allowed = _terms_inputs(seed=3)
    out = rate_matching_terms(logits.bfloat16(), target, is_mask, weight, ins_t, ins_p.bfloat16(), allowed)
    assert out.unmask.dtype == torch.float32 and out.insert.dtype == torch.float32
    assert torch.isfinite(out.per_row).all()


def test_rate_matching_terms_gradients_finite_and_correct():
    logits, target, is_mask, weight, ins_t, ins_p, allowed = _terms_inputs(seed=4)
    logits.requires_grad_(True)
    ins_p.requires_grad_(True)
    out = rate_matching_terms(logits, target, is_mask, weight, ins_t, ins_p, allowed)
    (out.unmask + out.insert).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(ins_p.grad).all()
    # Gradient only at masked logits / allowed predictions.
    assert (logits.grad[~is_mask] == 0).all()
    assert (ins_p.grad[~allowed] == 0).all()
    exp = (1 - ins_t.clamp_min(1e-9) / ins_p.detach().clamp_min(1e-9)) * allowed
    torch.testing.assert_close(ins_p.grad, exp)
    # CE gradient: w (softmax - onehot).
    sm = logits.detach().softmax(-1)
    onehot = F.one_hot(target, sm.shape[-1]).float()
    exp_lg = weight[:, :, None] * (sm - onehot) * is_mask[..., None]
    torch.testing.assert_close(logits.grad, exp_lg)


# ---------------------------------------------------------------------------------------------------------
# Through a tiny FlexMDM: gradients reach every parameter, and the loss can overfit one batch.


def _tiny_flexmdm(insertion_head="expectation", seed=0):
    from insertion_diffusion.models.flexmdm import FlexMDM
    from insertion_diffusion.nn.transformer import TransformerConfig
    from insertion_diffusion.tokenizers import IntegerTokenizer

    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    return FlexMDM(IntegerTokenizer(10), max_length=16, backbone=cfg, insertion_head=insertion_head)


def _tiny_batch(B=8, L=16, seed=0):
    """[prompt][BOS][target][EOS][PAD] rows over token ids 4..13."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.zeros(B, L, dtype=torch.long)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    attn = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        p = 1 + b % 3
        n = 2 + (b * 5) % 9
        row = torch.randint(4, 14, (p,), generator=g).tolist() + [2]
        row += torch.randint(4, 14, (n,), generator=g).tolist() + [3]
        z1[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = True
        fixed[b, : p + 1] = True
        fixed[b, len(row) - 1] = True
    return {"input_ids": z1, "fixed": fixed, "attention_mask": attn}


@pytest.mark.parametrize("head", ["expectation", "distribution"])
def test_every_parameter_gets_a_finite_gradient(head):
    model = _tiny_flexmdm(head)
    batch = _tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nonzero = {n: False for n, _ in model.named_parameters()}
    for step in range(4):
        opt.zero_grad()
        loss, logs = model.compute_loss(batch, generator=torch.Generator().manual_seed(step))
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(ratio_value(v)).all() for v in logs.values())
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            nonzero[name] |= bool(p.grad.abs().sum() > 0)
        opt.step()
    # AdaLN-zero starts some gradients at exactly 0; after a few steps every parameter must be learning.
    dead = [n for n, ok in nonzero.items() if not ok]
    assert not dead, f"parameters never receive a non-zero gradient: {dead}"


def test_loss_decreases_when_overfitting_one_batch():
    model = _tiny_flexmdm()
    batch = _tiny_batch(B=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn():
        # The same noise every step: a fixed objective to overfit.
        return model.compute_loss(batch, generator=torch.Generator().manual_seed(123))[0]

    with torch.no_grad():
        first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn().item()
    assert math.isfinite(last)
    assert last < 0.5 * first, (first, last)
