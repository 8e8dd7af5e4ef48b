"""LoFlexMDM (insertion_diffusion/models/loflexmdm.py) on tiny backbones: the FlexMDM identity at a = b = 1,
gap hazard sums, the structure of the two-sample objective (REINFORCE / pathwise / regularisers), gradients
of every variant, the optimiser groups, sampling, non-finite guards and checkpoint mix-ups."""

from __future__ import annotations

import lightning
import lightning.pytorch as L
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from model_rows import mixed_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.losses import bregman_rate, rate_matching_terms
from insertion_diffusion.models.base import ratio_value
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.models.loflexmdm import (
    LoFlexMDM,
    distance_from_goal,
    mean_time_by_distance,
    order_figure,
)
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.order.kumaraswamy import KumaraswamyClock, schedule_regularizers
from insertion_diffusion.process.insertion import (
    DELETED,
    MASKED,
    parse_time_sampling,
    partial_state,
    sample_event_times,
    stratified_times,
    training_times,
)
from insertion_diffusion.sampling import SamplerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer

TOK = IntegerTokenizer(10)
PAD, MASK, BOS, EOS = TOK.pad_id, TOK.mask_id, TOK.bos_id, TOK.eos_id
MAXLEN = 16


def cfg() -> TransformerConfig:
    return TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)


def tiny(seed=0, **kwargs) -> LoFlexMDM:
    torch.manual_seed(seed)
    kwargs.setdefault("sampler", SamplerConfig(steps=16))
    kwargs.setdefault("order_backbone", TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16,
                                                          dropout=0.0))
    return LoFlexMDM(TOK, max_length=MAXLEN, backbone=cfg(), **kwargs)


def tiny_flex(seed=0, **kwargs) -> FlexMDM:
    torch.manual_seed(seed)
    return FlexMDM(TOK, max_length=MAXLEN, backbone=cfg(), sampler=SamplerConfig(steps=16), **kwargs)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0, skip: tuple[str, ...] = ()) -> None:
    """Move every parameter off its (often zero) initialisation so that every gradient path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip):
                p.add_(scale * torch.randn(p.shape, generator=g))


def batch(prompt_lens=(3, 1, 4, 2, 0, 5), target_lens=(5, 8, 0, 3, 6, 2), L=MAXLEN, seed=0):
    return mixed_rows(prompt_lens, target_lens, L, seed)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def is_order(name: str) -> bool:
    return name.startswith("order.")


# --- construction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({"a": 0.0}, ["model.a"]),
        ({"a": -1.0}, ["model.a"]),
        ({"order_b_min": 5.0, "order_b_max": 2.0}, ["model.order_b_min", "model.order_b_max"]),
        ({"order_b_min": -1.0}, ["model.order_b_min", "model.order_b_max"]),
        ({"generator_b_min": 3.0, "generator_b_max": 1.0}, ["model.generator_b_min", "model.generator_b_max"]),
        ({"time_eps": 0.5}, ["model.time_eps"]),
        ({"order_rate_fn": "relu"}, ["model.order_rate_fn='relu'", "softplus, exp"]),
        ({"generator_states": 3}, ["model.generator_states", "1, 2"]),
        ({"order_insert_weight": 0.0}, ["model.order_insert_weight", "model.insert_weight"]),
    ],
)
def test_invalid_arguments_name_the_key(kwargs, keys):
    with pytest.raises(ValueError) as err:
        tiny(**kwargs)
    for k in keys:
        assert k in str(err.value), (k, str(err.value))


def test_invalid_order_rate_fn_message():
    with pytest.raises(ValueError, match=r"^model\.order_rate_fn='relu' is not one of: softplus, exp$"):
        tiny(order_rate_fn="relu")


def test_defaults_and_order_backbone():
    m = LoFlexMDM(TOK, MAXLEN, backbone=cfg())
    assert m.clock.a == 1.0 and not m.learn_b_um and m.um_head is None and m.order.b_um_head is None
    assert m.order.net is not m.net and not m.order.shared
    # default order backbone: 2 layers at the generator's width, time-free unless asked
    assert m.order_cfg.num_layers == 2 and m.order_cfg.d_model == 32 and not m.order_cfg.time_conditioning
    timed = LoFlexMDM(TOK, MAXLEN, backbone=cfg(), order_backbone=cfg(), order_time_conditioning=True)
    assert timed.order_cfg.time_conditioning and timed.order.b_in_head.ada is not None
    untimed = LoFlexMDM(TOK, MAXLEN, backbone=cfg(), order_backbone=cfg())  # cfg() is time-conditioned
    assert not untimed.order_cfg.time_conditioning
    shared = LoFlexMDM(TOK, MAXLEN, backbone=cfg(), shared_backbone=True)
    assert shared.order.net is shared.net
    assert shared.hparams["max_length"] == MAXLEN and "tokenizer" in shared.hparams


# --- gap hazard sums ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gap_sums_of_per_token_rates_match_a_python_loop(seed):
    b, _ = batch(seed=seed)
    z1, fixed, attn = b["input_ids"], b["fixed"], b["attention_mask"]
    B, L = z1.shape
    g = seeded(seed)
    t = torch.rand(B, generator=g)
    t_in = torch.rand(B, L, generator=g)
    t_um = t_in + (1 - t_in) * torch.rand(B, L, generator=g)
    st = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD)
    rates = 0.1 + 5 * torch.rand(B, L, generator=g)  # per-token insertion hazards
    got = st.gap_sums(rates)
    assert got.shape == st.x.shape
    state = st.state.tolist()
    for r in range(B):
        prev = -1
        for j in range(st.x.shape[1]):
            if j >= st.lengths[r]:
                assert got[r, j].item() == 0.0
                continue
            s = int(st.src[r, j])
            want = 0.0
            for i in range(prev + 1, s):
                assert state[r][i] == DELETED  # everything between two survivors was deleted
                want += rates[r, i].item()
            assert got[r, j].item() == pytest.approx(want, rel=1e-5, abs=1e-5)
            prev = s
        # every deleted position lies in some gap: the gap sums add up to all deleted rates
        tot = sum(rates[r, i].item() for i in range(L) if state[r][i] == DELETED)
        assert got[r].sum().item() == pytest.approx(tot, rel=1e-5, abs=1e-5)
    # constant rates: b * |G_j|
    torch.testing.assert_close(st.gap_sums(torch.full((B, L), 2.5)), 2.5 * st.gap)


# --- the FlexMDM identity at a = 1, b = 1 -------------------------------------------------------------------


def flex_terms(flex: FlexMDM, st, t):
    """FlexMDM's loss terms on a given partial state, exactly as FlexMDM.compute_loss forms them."""
    logits, gap_out = flex(st.x, t, st.valid)
    lam_in = flex.insertion.hazard(t)[:, None]
    lam_um = flex.unmasking.hazard(t)[:, None]
    allowed = st.valid & (~st.fixed | (st.x == EOS))
    return rate_matching_terms(
        logits, st.target, st.is_mask, lam_um, st.gap * lam_in, gap_out * lam_in, allowed, flex.insert_weight
    )


def matched_pair():
    flex = tiny_flex(seed=3)
    perturb(flex, scale=0.1, seed=3)
    lo = tiny(seed=4, a=1.0)
    res = lo.load_state_dict(flex.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all(is_order(k) for k in res.missing_keys)
    copied = set(flex.state_dict())
    assert {k.split(".")[0] for k in copied} == {"net", "token_head", "gap_head"}
    lo_sd = lo.state_dict()
    for k, v in flex.state_dict().items():
        assert torch.equal(lo_sd[k], v), k
    return flex.eval(), lo.eval()


def test_state_terms_equal_flexmdm_terms_at_unit_rates():
    flex, lo = matched_pair()
    b, _ = batch()
    z1, fixed, attn = b["input_ids"], b["fixed"], b["attention_mask"]
    B, L = z1.shape
    # The partial state FlexMDM.compute_loss draws with this seed; our reconstruction must give its loss.
    g = seeded(11)
    t = stratified_times(B, flex.time_eps, generator=g)
    t_in, t_um = sample_event_times(z1.shape, flex.insertion, flex.unmasking, generator=g)
    st = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD)
    with torch.no_grad():
        ft = flex_terms(flex, st, t)
        flex_loss, _ = flex.compute_loss(b, generator=seeded(11))
        assert flex_loss.item() == pytest.approx(((ft.unmask + ft.insert) / (B * L)).item(), rel=1e-6)
        assert ft.num_masked > 0 and (st.gap > 0).any()
        logits, g_in, g_um = lo(st.x, t, st.valid)
        assert g_um is None and (g_in < lo.gen_bound.b_max).all()
        ones = torch.ones(B, L)
        terms, per_row = lo.state_terms(st, t, ones, ones, logits, g_in, g_um)
    torch.testing.assert_close(terms.unmask, ft.unmask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.insert, ft.insert, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_row, ft.per_row, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((per_row / L).mean(), flex_loss, rtol=1e-5, atol=1e-7)
    # and a non-unit rate changes it (the comparison is not vacuous)
    with torch.no_grad():
        _, per_row2 = lo.state_terms(st, t, 2 * ones, ones, logits, g_in, g_um)
    assert not torch.allclose(per_row2, per_row)


def test_compute_loss_generator_term_equals_flexmdm_loss_at_unit_rates(monkeypatch):
    """End to end: with b_in = b_um = 1 and a = 1, LoFlexMDM's generator loss is FlexMDM's loss on the same
    2B partial states (reconstructed from the same generator)."""
    flex, lo = matched_pair()
    b, _ = batch(target_lens=(5, 8, 1, 3, 6, 2))  # no empty target (see the mixture-regulariser bug below)
    z1, fixed, attn = b["input_ids"], b["fixed"], b["attention_mask"]
    B, L = z1.shape
    monkeypatch.setattr(lo, "order_rates", lambda bt, t=None: (torch.ones(B, L), torch.ones(B, L)))
    with torch.no_grad():
        loss, logs = lo.compute_loss(b, generator=seeded(5))
        g = seeded(5)
        t = stratified_times(B, lo.time_eps, generator=g)
        t_in, t_um = lo.clock.sample_times(torch.ones(2 * B, L), torch.ones(2 * B, L), generator=g)
        t2 = t.repeat(2)
        st = partial_state(z1.repeat(2, 1), fixed.repeat(2, 1), attn.repeat(2, 1), t2, t_in, t_um, MASK, PAD)
        ft = flex_terms(flex, st, t2)
    flex_loss = (ft.unmask + ft.insert) / (2 * B * L)
    torch.testing.assert_close(logs["loss_generator"], flex_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["loss_unmask"], ft.unmask / (2 * B * L), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["loss_insert"], ft.insert / (2 * B * L), rtol=1e-5, atol=1e-7)
    # the uniform schedule costs nothing in regularisers
    for k in ("mixture", "endpoint", "kl"):
        assert abs(logs[f"reg_{k}"].item()) < 1e-6
    torch.testing.assert_close(loss, flex_loss + logs["reinforce"], rtol=1e-5, atol=1e-6)


def test_unit_rates_cost_no_regulariser_with_an_empty_target_row(monkeypatch):
    lo = tiny(seed=0, a=1.0)
    b, _ = batch()  # row 2 has an empty target: no noisy position
    B, L = b["input_ids"].shape
    assert not (b["attention_mask"] & ~b["fixed"])[2].any()
    monkeypatch.setattr(lo, "order_rates", lambda bt, t=None: (torch.ones(B, L), torch.ones(B, L)))
    with torch.no_grad():
        _, logs = lo.compute_loss(b, generator=seeded(5))
    assert abs(logs["reg_mixture"].item()) < 1e-6


# --- the objective, rebuilt by hand ------------------------------------------------------------------------


@pytest.mark.parametrize(("learn_b_um", "reg_frame", "time_sampling"), [
    (False, "relative", "uniform"), (True, "relative", "uniform"), (False, "absolute", "uniform"),
    (False, "relative", "early:0.5"),
    (True, "relative", "early:0.5:0.25"),
])
def test_compute_loss_matches_manual_reconstruction(learn_b_um, reg_frame, time_sampling):
    """J = (L1 + L2)/2 + sg(L1 - L2)(log p1 - log p2)/2 + sum_k w_k R_k, rebuilt from the same RNG stream.

    At a = 2 the "relative" regularisers are those of the laws Kumaraswamy(1, b) (the clock s = t^a), the
    "absolute" ones those of Kumaraswamy(2, b). Under early:<p> times both states' losses and the advantage of a
    row carry its time weight w(t)."""
    lo = tiny(seed=0, a=2.0, reg_mixture=0.7, reg_endpoint=1.3, reg_kl=0.4, reinforce_weight=0.8,
              learn_b_um=learn_b_um, reg_frame=reg_frame, time_sampling=time_sampling)
    perturb(lo, seed=1)
    b, _ = batch()
    z1, fixed, attn = b["input_ids"], b["fixed"], b["attention_mask"]
    B, L = z1.shape
    noisy = attn & ~fixed
    with torch.no_grad():
        loss, logs = lo.compute_loss(b, generator=seeded(9))
        g = seeded(9)
        if time_sampling == "uniform":
            t, w = stratified_times(B, lo.time_eps, generator=g), torch.ones(B)
        else:
            early, share = parse_time_sampling(time_sampling)
            t, w = training_times(B, lo.time_eps, generator=g, early=early, share=share)
            assert (w - 1).abs().min() > 1e-3
        b_in, b_um = lo.order_rates(b, t)
        assert b_in.std() > 0  # per-token rates
        if learn_b_um:
            assert b_um.std() > 0
        else:
            torch.testing.assert_close(b_um, torch.ones(B, L))
        bi2 = b_in.repeat(2, 1).masked_fill(~noisy.repeat(2, 1), 1.0)
        bu2 = b_um.repeat(2, 1).masked_fill(~noisy.repeat(2, 1), 1.0)
        t_in, t_um = lo.clock.sample_times(bi2, bu2, generator=g)
        t2 = t.repeat(2)
        st = partial_state(z1.repeat(2, 1), fixed.repeat(2, 1), attn.repeat(2, 1), t2, t_in, t_um, MASK, PAD)
        logits, g_in, g_um = lo(st.x, t2, st.valid)
        assert (g_um is not None) == learn_b_um
        h = lo.clock.h(t2)
        # per-row loss by an explicit loop over x_t
        rows, rewards = [], []
        for r in range(2 * B):
            tot = torch.zeros(())
            um = torch.zeros(())
            n_mask = 0
            prev = -1
            for j in range(int(st.lengths[r])):
                s = int(st.src[r, j])
                lam_gap = sum(bi2[r, i] * h[r] for i in range(prev + 1, s))
                prev = s
                if st.is_mask[r, j]:
                    ce_term = bu2[r, s] * h[r] * torch.nn.functional.cross_entropy(logits[r, j], z1[r % B, s])
                    if learn_b_um:
                        ce_term = ce_term + bregman_rate(bu2[r, s] * h[r], g_um[r, j] * h[r])
                    tot = tot + ce_term
                    um = um + ce_term
                    n_mask += 1
                if not st.fixed[r, j] or st.x[r, j] == EOS:
                    tot = tot + lo.insert_weight * bregman_rate(torch.as_tensor(lam_gap), g_in[r, j] * h[r])
            rows.append(w[r % B] * tot / L)
            # REINFORCE reward (per_mask): unmasking term per mask + insertion term / L
            rewards.append(um / max(1, n_mask) + (tot - um) / L)
        rows = torch.stack(rows)
        gen = 0.5 * (rows[:B] + rows[B:]).mean()
        # log p(z_t | z1) by a loop over noisy positions
        lps = lo.clock.log_state_probs(t2[:, None], bi2, bu2)
        logp = torch.zeros(2 * B)
        for r in range(2 * B):
            for i in range(L):
                if noisy[r % B, i]:
                    logp[r] += lps[int(st.state[r, i])][r, i]
        rewards = torch.stack(rewards)
        reinforce = 0.5 * (w * (rewards[:B] - rewards[B:]) * (logp[:B] - logp[B:])).mean()
        reg_clock = KumaraswamyClock(1.0) if reg_frame == "relative" else lo.clock
        regs = schedule_regularizers(reg_clock, b_in, noisy, generator=g)
        if learn_b_um:  # the b_um part's grid offset is not reproduced here: check its endpoint/KL parts only
            regs_um = schedule_regularizers(reg_clock, b_um, noisy)
            regs = {k: v + regs_um[k] for k, v in regs.items()}
        reg = 0.7 * logs["reg_mixture"] + 1.3 * logs["reg_endpoint"] + 0.4 * logs["reg_kl"]
    torch.testing.assert_close(logs["loss_generator"], gen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["reinforce"], reinforce, rtol=1e-4, atol=1e-6)
    for k in ("mixture", "endpoint", "kl"):
        if not (learn_b_um and k == "mixture"):
            torch.testing.assert_close(logs[f"reg_{k}"], regs[k])
    torch.testing.assert_close(loss, gen + 0.8 * reinforce + reg, rtol=1e-5, atol=1e-6)
    assert (st.state[:B] != st.state[B:]).any()  # two different partial states per row
    # the per-row log-probability helper is the same sum
    torch.testing.assert_close(lo.state_log_prob(st, t2, bi2, bu2, noisy.repeat(2, 1)), logp)
    assert MASKED in st.state.unique().tolist()


# --- gradients: REINFORCE, pathwise, regularisers ------------------------------------------------------------


def loss_grads(model, b, seed):
    model.zero_grad(set_to_none=True)
    loss, logs = model.compute_loss(b, generator=seeded(seed))
    loss.backward()
    return loss.detach(), logs, grads(model)


def nonzero(g):
    return g is not None and bool(g.abs().sum() > 0)


def test_reinforce_sends_gradient_only_to_the_order_network():
    lo = tiny(seed=0, pathwise=False, reinforce_weight=1.0, reg_mixture=0.0, reg_endpoint=0.0, reg_kl=0.0)
    perturb(lo, seed=2)
    lo.train()
    b, _ = batch()
    _, logs, with_rf = loss_grads(lo, b, seed=3)
    assert logs["reinforce"].abs() > 0 and logs["dlogp_abs_max"] > 0
    order_names = [n for n in with_rf if is_order(n)]
    gen_names = [n for n in with_rf if not is_order(n)]
    assert any(nonzero(with_rf[n]) for n in order_names)  # REINFORCE reaches phi
    assert nonzero(with_rf["order.b_in_head.mlp.2.bias"])
    lo.reinforce_weight = 0.0
    _, _, without = loss_grads(lo, b, seed=3)
    for n in order_names:  # nothing else reaches phi: no pathwise, no regulariser
        assert not nonzero(without[n]), n
    for n in gen_names:  # and REINFORCE sends nothing to the generator
        assert with_rf[n] is not None and without[n] is not None, n
        torch.testing.assert_close(with_rf[n], without[n], rtol=0, atol=0, msg=n)
    assert any(nonzero(without[n]) for n in gen_names)


@pytest.mark.parametrize("pathwise", [True, False])
def test_pathwise_gradient_option(pathwise):
    lo = tiny(seed=0, pathwise=pathwise, reinforce_weight=0.0, reg_mixture=0.0, reg_endpoint=0.0, reg_kl=0.0)
    perturb(lo, seed=2)
    b, _ = batch()
    _, _, gr = loss_grads(lo, b, seed=4)
    order_live = [n for n, g in gr.items() if is_order(n) and nonzero(g)]
    if pathwise:
        assert "order.b_in_head.mlp.2.bias" in order_live
    else:
        assert order_live == []
    # the generator's gradient does not depend on the option
    other = tiny(seed=0, pathwise=not pathwise, reinforce_weight=0.0, reg_mixture=0.0, reg_endpoint=0.0, reg_kl=0.0)
    perturb(other, seed=2)
    _, _, gr2 = loss_grads(other, b, seed=4)
    for n, g in gr.items():
        if not is_order(n):
            torch.testing.assert_close(g, gr2[n], msg=n)


def test_one_generator_state_keeps_the_loss_and_the_order_gradient(monkeypatch):
    """generator_states=1: same objective value and the same order-network gradient (pathwise through both
    states, REINFORCE, regularisers); only the generator's gradient changes, and it comes from the first
    B rows alone (the second half of the generator's outputs carries no autograd graph)."""
    b, _ = batch()
    out = {}
    for states in (2, 1):
        lo = tiny(seed=0, generator_states=states)
        perturb(lo, seed=2)
        out[states] = loss_grads(lo, b, seed=4)
    (l2, logs2, g2), (l1, logs1, g1) = out[2], out[1]
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(logs1["reinforce"], logs2["reinforce"])
    for n in g2:
        if is_order(n):
            torch.testing.assert_close(g1[n], g2[n], msg=n)
    gen = [n for n in g2 if not is_order(n)]
    assert all(nonzero(g1[n]) for n in gen if nonzero(g2[n]))
    assert any(not torch.allclose(g1[n], g2[n]) for n in gen)

    lo = tiny(seed=0, generator_states=1)
    seen = []
    real_forward = LoFlexMDM.forward

    def spy(self, x, t, valid):
        res = real_forward(self, x, t, valid)
        seen.append((x.shape[0], res[0].requires_grad))
        return res

    monkeypatch.setattr(LoFlexMDM, "forward", spy)
    lo.compute_loss(b, generator=seeded(0))
    assert seen == [(6, True), (6, False)]


EARLY = SamplerConfig(steps=16, integrate_hazard=True)  # a < 1 has an unbounded hazard at t = 0


@pytest.mark.parametrize("a", [0.25, 3.0])
def test_relative_regularisers_vanish_at_unit_rates_for_any_shape(monkeypatch, a):
    """reg_frame "relative" pulls towards F(t; a, 1), so b = 1 costs nothing whatever the shared shape; the
    "absolute" frame measures the distance to the uniform law in t, which a != 1 keeps away from zero."""
    b, _ = batch()
    B, L = b["input_ids"].shape
    got = {}
    for frame in ("relative", "absolute"):
        lo = tiny(seed=0, a=a, reg_frame=frame, sampler=EARLY)
        monkeypatch.setattr(lo, "order_rates", lambda bt, t=None: (torch.ones(B, L), torch.ones(B, L)))
        with torch.no_grad():
            _, logs = lo.compute_loss(b, generator=seeded(5))
        got[frame] = {k: logs[f"reg_{k}"].item() for k in ("mixture", "endpoint", "kl")}
    assert all(abs(v) < 1e-6 for v in got["relative"].values()), got
    assert got["absolute"]["mixture"] > 1e-3 and abs(got["absolute"]["kl"]) > 1e-3, got


def test_relative_regularisers_pull_weakly_where_absolute_ones_push_to_the_floor():
    """The measured failure the "relative" frame fixes: at a = 0.25 the absolute regularisers' gradient asks
    every b_in to go down (towards later insertion, i.e. towards the linear schedule), so the order network is
    driven to order_b_min; the relative ones only pull b_in back towards 1, and weakly near it."""
    b, _ = batch()
    signs = {}
    for frame in ("relative", "absolute"):
        lo = tiny(seed=0, a=0.25, reg_frame=frame, sampler=EARLY)
        b_in = torch.full(b["input_ids"].shape, 1.02, requires_grad=True)
        noisy = b["attention_mask"] & ~b["fixed"]
        regs = schedule_regularizers(lo.reg_clock, b_in, noisy, generator=seeded(0))
        sum(regs.values()).backward()
        signs[frame] = b_in.grad[noisy]
    assert (signs["absolute"] > 0).all()  # descent lowers every b_in: the floor
    assert (signs["relative"] > 0).all()  # 1.02 > 1: back towards 1 ...
    # ... but the pull at 1.02 is a small fraction of the absolute frame's
    assert signs["relative"].abs().max() < 0.2 * signs["absolute"].abs().min()


def test_unknown_reg_frame_names_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"model.reg_frame='uniform'; allowed values: relative, absolute"):
        tiny(reg_frame="uniform")


def test_regularisers_alone_reach_the_order_network():
    lo = tiny(seed=0, pathwise=False, reinforce_weight=0.0, reg_mixture=1.0, reg_endpoint=1.0, reg_kl=1.0)
    perturb(lo, seed=2)
    b, _ = batch()
    _, logs, gr = loss_grads(lo, b, seed=4)
    assert logs["reg_kl"] > 0 and logs["reg_mixture"] > 0
    assert nonzero(gr["order.b_in_head.mlp.2.bias"])
    # b_in > 1 everywhere (b_min = 1.01): the regulariser pushes the rates down, i.e. the bias up-gradient > 0
    assert gr["order.b_in_head.mlp.2.bias"].item() > 0


VARIANTS = {
    "default": {},
    "learn_b_um": {"learn_b_um": True},
    "shared_backbone": {"shared_backbone": True},
    "a2_time_conditioned": {"a": 2.0, "order_time_conditioning": True},
    "a5_exp_rates": {"a": 5.0, "order_rate_fn": "exp", "order_b_min": 1.001},
    "generator_states_1": {"generator_states": 1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_has_finite_loss_and_gradients(variant):
    lo = tiny(seed=0, **VARIANTS[variant]).train()
    b, _ = batch()
    # at initialisation (zero-initialised heads and AdaLN gates)
    loss0, logs0, gr0 = loss_grads(lo, b, seed=0)
    assert torch.isfinite(loss0)
    assert all(g is None or torch.isfinite(g).all() for g in gr0.values())
    assert all(torch.isfinite(ratio_value(v)).all() for v in logs0.values())
    # after moving every parameter off its initialisation, every parameter gets a finite, non-zero gradient
    perturb(lo, seed=5)
    loss, logs, gr = loss_grads(lo, b, seed=1)
    assert torch.isfinite(loss) and all(torch.isfinite(ratio_value(v)).all() for v in logs.values())
    missing = sorted(n for n, g in gr.items() if g is None)
    dead = sorted(n for n, g in gr.items() if g is not None and not nonzero(g))
    bad = sorted(n for n, g in gr.items() if g is not None and not torch.isfinite(g).all())
    assert missing == [] and dead == [] and bad == [], (missing, dead, bad)
    if VARIANTS[variant].get("learn_b_um"):
        assert lo.um_head is not None and lo.order.b_um_head is not None
        assert not torch.allclose(lo.order_rates(b)[1], torch.ones(6, MAXLEN))


def test_compute_loss_is_seeded():
    lo = tiny(seed=0)
    perturb(lo, seed=1)
    b, _ = batch()
    with torch.no_grad():
        l1, _ = lo.compute_loss(b, generator=seeded(0))
        torch.manual_seed(123)  # the global RNG must not matter
        l2, _ = lo.compute_loss(b, generator=seeded(0))
        l3, _ = lo.compute_loss(b, generator=seeded(1))
    assert l1.item() == l2.item() and l1.item() != l3.item()


def test_compute_loss_is_seeded_with_learned_b_um():
    lo = tiny(seed=0, learn_b_um=True)
    perturb(lo, seed=1)
    b, _ = batch()
    with torch.no_grad():
        torch.manual_seed(1)
        l1, _ = lo.compute_loss(b, generator=seeded(0))
        torch.manual_seed(2)
        l2, _ = lo.compute_loss(b, generator=seeded(0))
    assert l1.item() == l2.item()


# --- optimiser ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_configure_optimizers_gives_the_order_network_its_own_lr(shared):
    lo = tiny(seed=0, lr=3e-4, order_lr=1e-3, warmup_steps=0, weight_decay=0.05, shared_backbone=shared)
    conf = lo.configure_optimizers()
    opt = conf["optimizer"]
    assert conf["lr_scheduler"]["scheduler"].optimizer is opt
    names = {id(p): n for n, p in lo.named_parameters()}
    seen = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in seen, names[id(p)]
            seen[id(p)] = gi
    assert set(seen) == set(names)  # every parameter exactly once
    for pid, gi in seen.items():
        group, name = opt.param_groups[gi], names[pid]
        own_order = is_order(name) and not (shared and name.startswith("order.net."))
        assert group["lr"] == pytest.approx(1e-3 if own_order else 3e-4), name
        assert group["initial_lr"] == pytest.approx(1e-3 if own_order else 3e-4), name
        p = dict(lo.named_parameters())[name]
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    order_groups = {seen[id(p)] for n, p in lo.named_parameters() if is_order(n)}
    gen_groups = {seen[id(p)] for n, p in lo.named_parameters() if not is_order(n)}
    assert order_groups.isdisjoint(gen_groups)
    if shared:
        assert all(not n.startswith("order.net.") for n in names.values())  # shared weights appear as net.*
    # the schedule scales both learning rates alike
    warm = tiny(seed=0, lr=3e-4, order_lr=1e-3, warmup_steps=10).configure_optimizers()
    lrs = sorted({round(g["lr"], 12) for g in warm["optimizer"].param_groups})
    assert lrs == [pytest.approx(3e-5), pytest.approx(1e-4)]


def test_configure_optimizers_default_order_lr():
    lo = tiny(seed=0, lr=2e-4, warmup_steps=0)
    opt = lo.configure_optimizers()["optimizer"]
    assert {g["lr"] for g in opt.param_groups} == {2e-4}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(lo.parameters()))


# --- sampling -----------------------------------------------------------------------------------------------


def test_trained_tiny_model_samples_keep_prompts_and_leave_no_masks(tmp_path):
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path), num_train=64, num_val=8, num_test=8,
                             batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    train = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    lo = LoFlexMDM(tok, dm.max_length, backbone=cfg(), order_backbone=cfg(), sampler=SamplerConfig(steps=24),
                   lr=3e-3, warmup_steps=0)
    opt = lo.configure_optimizers()["optimizer"]
    lo.train()
    first = None
    for step in range(40):
        loss, logs = lo.compute_loss(train, generator=seeded(step))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lo.parameters(), 1.0)
        opt.step()
        first = first if first is not None else logs["loss_generator"].item()
    lo.eval()
    val = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out = lo.sample_full(val, generator=seeded(0))
    x, fixed = out.x, out.fixed
    assert not (x == tok.mask_id).any()
    assert (out.lengths <= dm.max_length).all()
    for r in range(x.shape[0]):
        ids, fx, att = val["input_ids"][r], val["fixed"][r], val["attention_mask"][r]
        head = ids[fx & att].tolist()  # prompt + BOS + EOS, in order
        n = int(out.lengths[r])
        row = x[r, :n].tolist()
        assert x[r, n:].eq(tok.pad_id).all()
        assert row[: len(head) - 1] == head[:-1]  # prompt and BOS intact, at the start
        assert row[-1] == tok.eos_id
        assert x[r][fixed[r]].tolist() == head
        assert all(v >= tok.num_special for v in row[len(head) - 1 : -1])
    # sample() returns the same thing
    with torch.no_grad():
        x2, f2 = lo.sample(val, generator=seeded(0))
    assert torch.equal(x2, x) and torch.equal(f2, fixed)


def test_rates_use_the_shared_hazard_shape():
    lo = tiny(seed=0, a=2.0, learn_b_um=True)
    perturb(lo, seed=1)
    b, _ = batch()
    x, valid = b["input_ids"], b["attention_mask"]
    t = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.9, 0.99])
    with torch.no_grad():
        logits, ins, um = lo.rates(x, t, valid)
        lg, g_in, g_um = lo(x, t, valid)
    h = lo.clock.h(t)[:, None]
    torch.testing.assert_close(logits, lg)
    torch.testing.assert_close(ins, g_in * h)
    torch.testing.assert_close(um, g_um * h)
    assert (g_in >= 0).all() and (g_in <= 100.0).all()
    fixed_um = tiny(seed=0, a=1.0)
    with torch.no_grad():
        _, _, um1 = fixed_um.rates(x, t, valid)
    torch.testing.assert_close(um1, (1.0 / (1.0 - t))[:, None].expand_as(um1))
    # integrated over a step: b * (U(t') - U(t)), finite from t = 0 even for a < 1 (h_a diverges there)
    with pytest.raises(ValueError, match=r"model.a=0.5.*integrate_hazard"):
        tiny(seed=0, a=0.5, sampler=SamplerConfig(steps=8))
    assert LoFlexMDM(TOK, MAXLEN, backbone=cfg(), a=0.5).sampler_cfg.integrate_hazard
    early = tiny(seed=0, a=0.5, learn_b_um=True, sampler=SamplerConfig(steps=16, integrate_hazard=True))
    perturb(early, seed=1)
    t0 = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.5, 0.8])
    with torch.no_grad():
        _, ins, um = early.rates(x, t0, valid, t0 + 0.05)
        _, g_in, g_um = early(x, t0, valid)
    du = (early.clock.time_change(t0 + 0.05) - early.clock.time_change(t0))[:, None]
    assert torch.isfinite(ins).all() and torch.isfinite(um).all()
    torch.testing.assert_close(ins, g_in * du)
    torch.testing.assert_close(um, g_um * du)


# --- non-finite guards ----------------------------------------------------------------------------------------


def test_nan_order_rate_raises_with_checkpoint_hint():
    lo = tiny(seed=0)
    with torch.no_grad():
        lo.order.b_in_head.mlp[2].bias.fill_(float("nan"))
    b, _ = batch()
    with pytest.raises(FloatingPointError, match="checkpoint"):
        lo.compute_loss(b, generator=seeded(0))
    with pytest.raises(FloatingPointError, match="order network"):  # caught at the source
        lo.order_rates(b)


def test_nan_learned_b_um_raises_with_checkpoint_hint():
    lo = tiny(seed=0, learn_b_um=True)
    with torch.no_grad():
        lo.order.b_um_head.mlp[2].bias.fill_(float("nan"))
    b, _ = batch()
    with pytest.raises(FloatingPointError, match="checkpoint"):
        lo.compute_loss(b, generator=seeded(0))
    with pytest.raises(FloatingPointError, match="order network"):
        lo.order_rates(b)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_nan_generator_rate_raises_with_checkpoint_hint():
    lo = tiny(seed=0)
    with torch.no_grad():
        lo.gap_head.mlp[2].bias.fill_(float("nan"))
    b, _ = batch()
    with pytest.raises(FloatingPointError, match="checkpoint"):
        lo.compute_loss(b, generator=seeded(0))


# --- evaluation diagnostics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a",
    [
        1.0,
        2.0,
    ],
)
@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_validation_step_runs_order_diagnostics(a):
    lo = tiny(seed=0, a=a).eval()
    b, _ = batch()
    with torch.no_grad():
        lo.validation_step(b, 0)  # no trainer: self.log is a no-op, the diagnostics still run
    e_t, gen, b_in = lo._order_rows
    assert e_t.shape == gen.shape == b_in.shape == b["input_ids"].shape
    torch.testing.assert_close(gen, b["attention_mask"] & ~b["fixed"])
    assert ((e_t > 0) & (e_t < 1)).all()


def test_distance_from_goal_counts_back_from_the_last_generated_token():
    b, _ = batch(prompt_lens=(3, 0, 2), target_lens=(4, 2, 0), L=10)
    dist = distance_from_goal(b["attention_mask"] & ~b["fixed"])
    # rows: [p p p BOS t t t t EOS PAD], [t t EOS PAD ...], [p p BOS EOS PAD ...]
    assert dist.tolist() == [
        [-1, -1, -1, -1, 3, 2, 1, 0, -1, -1],
        [1, 0, -1, -1, -1, -1, -1, -1, -1, -1],
        [-1] * 10,
    ]


def test_mean_time_by_distance_aligns_rows_of_different_lengths_at_the_goal():
    """Two rows with generated parts of 5 and 2 tokens, the second behind a prompt (as star medium/hard rows of
    different path lengths). Row r's time at distance d from the goal is ``0.1 * (d + 1) + 0.05 * r``, so the
    per-distance means are known: distances 0 and 1 average both rows, distances 2-4 only the longer one."""
    b, _ = batch(prompt_lens=(0, 3), target_lens=(5, 2), L=9)
    gen = b["attention_mask"] & ~b["fixed"]
    dist = distance_from_goal(gen)
    e_t = torch.where(gen, 0.1 * (dist + 1) + 0.05 * torch.arange(2)[:, None], torch.full(gen.shape, 7.0))
    got = mean_time_by_distance(e_t, gen)
    want = torch.tensor([0.125, 0.225, 0.3, 0.4, 0.5])
    torch.testing.assert_close(got, want)
    assert mean_time_by_distance(e_t, torch.zeros_like(gen)).tolist() == [0.0]


def test_order_figure_renders_an_rgba_image_of_the_figure_size():
    b, _ = batch(prompt_lens=(0, 3), target_lens=(5, 2), L=9)
    gen = b["attention_mask"] & ~b["fixed"]
    fig = order_figure(torch.rand(gen.shape, generator=seeded(0)), gen)
    try:
        assert fig.axes[0].get_xlabel().startswith("distance from the goal")
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())
        w, h = (fig.get_size_inches() * fig.dpi).round().astype(int)
        assert image.shape == (h, w, 4) and image.dtype == np.uint8
        assert (w, h) == (round(5 * fig.dpi), round(3.2 * fig.dpi))  # figsize 5 x 3.2 inches
        assert image[..., :3].min() < 128  # something was drawn on the white background
    finally:
        plt.close(fig)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_validate_writes_learned_order_figure_b_in_histogram_and_samples_to_tensorboard(tmp_path):
    """A real ``Trainer.validate`` on tiny star data with a TensorBoardLogger; the event file is read back."""
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path / "data"), num_train=8, num_val=6, num_test=1,
                             batch_size=6)
    lo = LoFlexMDM(dm.tokenizer, dm.max_length, backbone=cfg(), order_backbone=cfg(),
                   sampler=SamplerConfig(steps=4), num_logged_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb", version="v0")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(lo, datamodule=dm, verbose=False)

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/learned_order" in tags["images"]
    assert "val/b_in" in tags["histograms"]
    image = acc.Images("val/learned_order")[0]
    dpi = matplotlib.rcParams["figure.dpi"]
    assert image.step == 0 and (image.width, image.height) == (round(5 * dpi), round(3.2 * dpi))  # 5 x 3.2 in
    hist = acc.Histograms("val/b_in")[0].histogram_value
    # one value per generated token of the first batch (easy star: 4-edge paths, 8 tokens per row),
    # inside the order network's bounds
    assert hist.num == 6 * 8
    assert lo.order.bound.b_min <= hist.min <= hist.max <= lo.order.bound.b_max
    assert "val/samples/text_summary" in tags["tensors"]  # the sample table, inherited from the base


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_flexmdm_checkpoint_into_loflexmdm_gives_a_clear_error():
    flex = tiny_flex()
    ckpt = {"state_dict": flex.state_dict()}
    flex.on_save_checkpoint(ckpt)
    lo = tiny()
    with pytest.raises(ValueError) as err:
        lo.on_load_checkpoint(ckpt)
    msg = str(err.value)
    assert "FlexMDM" in msg and "LoFlexMDM" in msg and "--model FlexMDM" in msg
    # the other way round too, and a matching checkpoint loads
    lo_ckpt = {}
    lo.on_save_checkpoint(lo_ckpt)
    with pytest.raises(ValueError, match="--model LoFlexMDM"):
        tiny_flex().on_load_checkpoint(lo_ckpt)
    tiny(seed=1).on_load_checkpoint(lo_ckpt)


def test_flexmdm_checkpoint_file_through_the_trainer(tmp_path):
    """The way the CLI resumes/evaluates (``--ckpt_path``): the hook fires before the state dicts clash."""
    flex = tiny_flex()
    ckpt = {"state_dict": flex.state_dict(), "pytorch-lightning_version": lightning.__version__,
            "epoch": 0, "global_step": 0}
    flex.on_save_checkpoint(ckpt)
    path = tmp_path / "flex.ckpt"
    torch.save(ckpt, path)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=1)
    b, _ = batch()
    with pytest.raises(ValueError, match="--model FlexMDM") as err:
        trainer.validate(tiny(), dataloaders=[b], ckpt_path=str(path), verbose=False)
    assert "LoFlexMDM" in str(err.value)


def test_order_insert_weight_changes_only_what_the_order_network_sees():
    """order_insert_weight = 1 with insert_weight = 0.1: the loss value and the generator's gradient are those of
    insert_weight 0.1; the order network's pathwise gradient and the REINFORCE advantages are those of weight 1."""
    b, _ = batch()
    off = dict(reinforce_weight=0.0, reg_mixture=0.0, reg_endpoint=0.0, reg_kl=0.0)
    out = {}
    for name, kw in (("split", dict(insert_weight=0.1, order_insert_weight=1.0)), ("tied", dict(insert_weight=0.1)),
                     ("one", dict(insert_weight=1.0))):
        lo = tiny(seed=0, **kw, **off)
        perturb(lo, seed=2)
        out[name] = loss_grads(lo, b, seed=4)
    (l_s, logs_s, g_s), (l_t, _, g_t), (_, logs_1, g_1) = out["split"], out["tied"], out["one"]
    torch.testing.assert_close(l_s, l_t)
    gen = [n for n in g_s if not is_order(n)]
    order = [n for n in g_s if is_order(n) and nonzero(g_s[n])]
    assert order and any(nonzero(g_s[n]) for n in gen)
    for n in gen:
        torch.testing.assert_close(g_s[n], g_t[n], msg=n)
    for n in order:
        torch.testing.assert_close(g_s[n], g_1[n], msg=n)
    assert any(not torch.allclose(g_s[n], g_t[n]) for n in order)
    torch.testing.assert_close(logs_s["adv_abs_mean"], logs_1["adv_abs_mean"])


def test_reinforce_reward_is_per_mask_by_default_and_validated():
    """A state's REINFORCE reward averages the unmasking term over its masks, so fewer masks alone is not
    'easier' (summing over masks drives every b_in to order_b_min)."""
    lo = tiny(seed=0, a=1.0)
    from insertion_diffusion.losses import LossTerms

    z = torch.zeros(())
    terms = LossTerms(unmask=z, insert=z, per_row=z, unmask_rows=torch.tensor([4.0, 1.0]),
                      insert_rows=torch.tensor([0.5, 0.5]), masked_rows=torch.tensor([4, 1]), num_masked=z, correct=z)
    # equal per-mask difficulty: the same reward although row 0 has four times the masks
    assert torch.allclose(lo.difficulty(terms, L=10), torch.tensor([1.05, 1.05]))
    lo.advantage_normalization = "per_token"
    assert torch.allclose(lo.difficulty(terms, L=10), torch.tensor([0.45, 0.15]))
    with pytest.raises(ValueError, match="advantage_normalization"):
        tiny(seed=0, a=1.0, advantage_normalization="per_row")


def test_per_mask_time_reward_divides_by_the_hazard_shape():
    from insertion_diffusion.losses import LossTerms

    lo = tiny(seed=0, a=1.0, advantage_normalization="per_mask_time")
    z = torch.zeros(())
    terms = LossTerms(unmask=z, insert=z, per_row=z, unmask_rows=torch.tensor([4.0, 4.0]),
                      insert_rows=torch.tensor([0.0, 0.0]), masked_rows=torch.tensor([2, 2]), num_masked=z, correct=z)
    t = torch.tensor([0.5, 0.9])  # h(t) = 1 / (1 - t) = 2, 10
    assert torch.allclose(lo.difficulty(terms, L=10, t=t), torch.tensor([1.0, 0.2]))


def test_sequence_nll_matches_flexmdm_bound_at_unit_rates(monkeypatch):
    """With every clock uniform (a = b = 1) LoFlexMDM's forward process is FlexMDM's, so their NELBO
    estimates agree in expectation (the two draw event times with different RNG calls, so compare means
    over many replicated rows)."""
    flex, lo = matched_pair()
    b, _ = batch()
    reps = 150
    b = {k: v.repeat(reps, 1) for k, v in b.items()}
    B, L = b["input_ids"].shape
    b["index"] = torch.arange(B)
    monkeypatch.setattr(lo, "order_rates", lambda bt, t=None: (torch.ones(B, L), torch.ones(B, L)))
    with torch.no_grad():
        nll_lo, nll_flex = lo.sequence_nll(b), flex.sequence_nll(b)
    assert torch.isfinite(nll_lo).all() and (nll_lo > 0).all()
    assert nll_lo.mean().item() == pytest.approx(nll_flex.mean().item(), rel=0.1)


def test_generator_rate_cap_covers_the_largest_gap_target():
    """Near t = 0 a long row's EOS gap holds every noisy token: its target multiplier, the sum of their b_in,
    is >= (L - 2) * order_b_min. The default cap must sit above it with the gradient alive (a fixed cap of 100,
    the old default, clipped it to 100 with zero gradient for rows over ~100 tokens)."""
    L = 150
    model = LoFlexMDM(TOK, max_length=L, backbone=cfg(), sampler=SamplerConfig(steps=4),
                      order_backbone=TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0))
    z1 = torch.cat([torch.tensor([[BOS]]), torch.randint(0, 10, (1, L - 2)), torch.tensor([[EOS]])], 1)
    fixed = torch.zeros_like(z1, dtype=torch.bool)
    fixed[:, 0] = fixed[:, -1] = True
    attn = torch.ones_like(fixed)
    t = torch.tensor([1e-3])
    b_in = torch.full((1, L), 1.01)
    ones = torch.ones(1, L)
    st = partial_state(z1, fixed, attn, t, ones * 0.5, ones * 0.9, MASK, PAD)  # every noisy token deleted at t
    target = st.gap_sums(b_in).max()
    assert target.item() == pytest.approx((L - 2) * 1.01, rel=1e-5)
    raw = torch.tensor(target.item() + 5.0, requires_grad=True)  # a raw head output that should map above it
    rate = model.gen_bound(raw)
    rate.backward()
    assert rate.item() > target.item() and raw.grad.item() > 0
    assert model.gen_bound.b_max == L * 100.0  # max_length * order_b_max
    capped = LoFlexMDM(TOK, max_length=L, backbone=cfg(), generator_b_max=100.0)
    assert capped.gen_bound(torch.tensor(target.item())).item() == 100.0  # an explicit cap is still honoured


def test_bad_time_sampling_names_the_key():
    with pytest.raises(ValueError, match=r"model\.time_sampling='early:2': the exponent of early:<p> must be"):
        tiny(time_sampling="early:2")
