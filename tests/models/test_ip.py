"""The Insertion Process (insertion_diffusion/models/ip.py) and its order math (process/permutation.py)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import fit_test_predict
from model_rows import mixed_rows

from insertion_diffusion.models.base import eval_noise
from insertion_diffusion.models.ip import InsertionProcess, IPSamplerConfig
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.process.permutation import creation_state, gumbel_order, prefix_log_prob
from insertion_diffusion.process.rng import RowRNG
from insertion_diffusion.tokenizers import IntegerTokenizer

TOK = IntegerTokenizer(10)
PAD, MASK, BOS, EOS = TOK.pad_id, TOK.mask_id, TOK.bos_id, TOK.eos_id
MAXLEN = 16


def tiny(posterior="learned", seed=0, perturb=0.3, **kwargs) -> InsertionProcess:
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, dropout=0.0, absolute_positions=True)
    model = InsertionProcess(TOK, max_length=MAXLEN, backbone=cfg, posterior=posterior, **kwargs).eval()
    if perturb:  # move the zero-initialised heads: non-uniform policy and posterior
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def row(prompt: list[int], target: list[int], L: int = MAXLEN) -> dict[str, torch.Tensor]:
    head = prompt + [BOS] if prompt else []
    ids = head + target + [EOS]
    x = torch.full((1, L), PAD)
    x[0, : len(ids)] = torch.tensor(ids)
    attn = torch.zeros(1, L, dtype=torch.bool)
    attn[0, : len(ids)] = True
    fixed = attn.clone()
    fixed[0, len(head) : len(head) + len(target)] = False
    return {"input_ids": x, "fixed": fixed, "attention_mask": attn}


def log_policy(model, seq: list[int], n_fixed_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised log-probabilities of the actions on one partial sequence: (W, V) insertions and stop."""
    x = torch.tensor([seq])
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[0, :n_fixed_head] = True
    fixed[0, -1] = True
    with torch.no_grad():
        insert, stop = model.action_logits(x, fixed, torch.ones_like(fixed))
    log_z = torch.logsumexp(torch.cat([insert.flatten(), stop]), 0)
    return insert[0] - log_z, stop[0] - log_z


def is_subsequence(a: list[int], b: list[int]) -> bool:
    it = iter(b)
    return all(t in it for t in a)


def exact_log_likelihood(model, prompt: list[int], target: list[int]) -> float:
    """log p(target | prompt) by summing over every trajectory: a recursion over the partial strings."""
    head = prompt + [BOS] if prompt else []
    memo: dict[tuple[int, ...], float] = {}

    def reach(cur: tuple[int, ...]) -> float:  # log P(reach the target from this partial target, then stop)
        if cur in memo:
            return memo[cur]
        lp_ins, lp_stop = log_policy(model, head + list(cur) + [EOS], len(head))
        if list(cur) == target:
            memo[cur] = float(lp_stop)
            return memo[cur]
        terms = []
        for j in range(len(cur) + 1):  # gap left of target token j (j = len: left of EOS)
            for v in set(target):
                nxt = cur[:j] + (v,) + cur[j:]
                if is_subsequence(list(nxt), target) and len(nxt) <= len(target):
                    terms.append(float(lp_ins[len(head) + j, v]) + reach(nxt))
        memo[cur] = float(torch.logsumexp(torch.tensor(terms), 0)) if terms else -math.inf
        return memo[cur]

    return reach(())


def exact_bound(model, batch, prompt: list[int], target: list[int], s: torch.Tensor | None = None):
    """The bound, by enumerating every creation order with its Plackett-Luce probability; a float, or with the
    target positions' scores ``s`` (n,) given, a tensor differentiable in them."""
    head = prompt + [BOS] if prompt else []
    n = len(target)
    given = s is not None
    if not given:
        s = model.order_scores(batch["input_ids"], batch["attention_mask"])[0, len(head) : len(head) + n].detach()
    total = torch.zeros(())
    for sigma in itertools.permutations(range(n)):
        log_q_sigma, value, created = torch.zeros(()), torch.zeros(()), []
        for i in sigma:
            rest = [j for j in range(n) if j not in created]
            q_of = dict(zip(rest, torch.softmax(s[rest], 0)))
            cur = [target[j] for j in sorted(created)]
            lp_ins, _ = log_policy(model, head + cur + [EOS], len(head))
            slot = sum(1 for j in created if j < i)
            value = value + float(lp_ins[len(head) + slot, target[i]]) - torch.log(q_of[i])
            log_q_sigma = log_q_sigma + torch.log(q_of[i])
            created.append(i)
        total = total + torch.exp(log_q_sigma) * value
    _, lp_stop = log_policy(model, head + target + [EOS], len(head))
    total = total + float(lp_stop)
    return total if given else float(total)


@pytest.mark.parametrize("posterior", ["learned", "uniform"])
@pytest.mark.parametrize(("prompt", "target"), [([5, 6], [7, 8, 9]), ([], [5, 5, 8]), ([4], [6, 6, 6])])
def test_bound_estimate_is_unbiased_and_below_the_exact_likelihood(posterior, prompt, target):
    model = tiny(posterior)
    with torch.no_grad():
        one = row(prompt, target)
        log_p = exact_log_likelihood(model, prompt, target)
        bound = exact_bound(model, one, prompt, target)
        N = 3000  # the same row N times, each with its own noise
        many = {k: v.expand(N, -1).clone() for k, v in one.items()}
        est = model.bound_terms(many, RowRNG(7, torch.arange(N)))["elbo"]
    mean, se = float(est.mean()), float(est.std()) / math.sqrt(est.numel())
    assert bound <= log_p + 1e-5, (bound, log_p)
    assert abs(mean - bound) < 4 * se + 1e-4, (mean, bound, se)


def test_orders_and_insertion_paths_correspond_one_to_one():
    # Summing the path probability over all n! orders gives exactly p(x) (summed over insertion paths by string),
    # repeated tokens included: the slots of an order are its inversion code, so no path is counted twice.
    model = tiny()
    for prompt, target in (([5], [6, 6, 6]), ([], [5, 8, 5, 8])):
        head = prompt + [BOS] if prompt else []
        total = 0.0
        for sigma in itertools.permutations(range(len(target))):
            log_path, created = 0.0, []
            for i in sigma:
                lp_ins, _ = log_policy(model, head + [target[j] for j in sorted(created)] + [EOS], len(head))
                log_path += float(lp_ins[len(head) + sum(1 for j in created if j < i), target[i]])
                created.append(i)
            total += math.exp(log_path)
        _, lp_stop = log_policy(model, head + target + [EOS], len(head))
        assert math.isclose(math.log(total) + float(lp_stop), exact_log_likelihood(model, prompt, target), abs_tol=1e-4)


def test_order_network_gradient_matches_the_exact_bound(monkeypatch):
    # Pathwise + leave-one-out REINFORCE, averaged over many draws, against autograd of the enumerated bound.
    model = tiny()
    prompt, target = [4], [5, 8, 5]
    one = row(prompt, target)
    head = len(prompt) + 1
    s = torch.tensor([0.8, -0.5, 0.3], requires_grad=True)
    exact = torch.autograd.grad(exact_bound(model, one, prompt, target, s), s)[0]

    def scores(ids, valid):
        full = torch.zeros(ids.shape)
        full[:, head : head + len(target)] = s
        return full

    monkeypatch.setattr(model, "order_scores", scores)
    N, chunks, L = 1500, 8, one["input_ids"].shape[1]
    grads = []
    for c in range(chunks):
        batch = {k: v.expand(N, -1).clone() for k, v in one.items()}
        loss, _ = model.compute_loss(batch, generator=RowRNG(100 + c, torch.arange(N)))
        grads.append(torch.autograd.grad(loss, s)[0] * -L)  # loss ~ -bound / L per row
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(chunks)
    assert ((mean - exact).abs() < 4 * se + 2e-3).all(), (mean, exact, se)
    assert exact.abs().max() > 0.05  # the check has something to find


def test_bound_arithmetic_stays_fp32_under_autocast():
    model = tiny()
    b, _ = mixed_rows(L=MAXLEN, with_index=True)
    with torch.no_grad():
        ref = model.bound_terms(b, RowRNG(0, torch.arange(6)))["elbo"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.bound_terms(b, RowRNG(0, torch.arange(6)))["elbo"]
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.5)  # only the transformer ran in bf16


def test_sequence_nll_reuses_the_evaluation_bound():
    model = tiny()
    b, _ = mixed_rows(L=MAXLEN, with_index=True)
    with torch.no_grad():
        fresh = model.sequence_nll(b)
        model.compute_loss(b, generator=eval_noise(model, b))
        cached = model.sequence_nll(b)
    torch.testing.assert_close(cached, fresh)


def test_bound_is_tight_for_a_single_target_token():
    # One target token: a single order, so the bound is exact. The estimate is 2 x (the insertion term) at k = 0
    # and 2 x (the stop term) at k = 1; their mean is the bound.
    model = tiny()
    with torch.no_grad():
        one = row([5, 6], [9])
        est = model.bound_terms({k: v.expand(64, -1).clone() for k, v in one.items()}, RowRNG(0, torch.arange(64)))
        log_p = exact_log_likelihood(model, [5, 6], [9])
    values = torch.unique(est["elbo"].round(decimals=4))
    assert values.numel() == 2
    torch.testing.assert_close(values.mean(), torch.tensor(log_p), atol=1e-3, rtol=0)


def test_gumbel_order_and_prefix_log_prob_follow_plackett_luce():
    scores = torch.tensor([[2.0, 0.0, -1.0, 5.0]])
    target = torch.tensor([[True, True, True, False]])
    N = 20000
    rank = gumbel_order(scores.expand(N, -1), target.expand(N, -1), RowRNG(3, torch.arange(N)))
    assert (rank[:, 3] == 4).all() and torch.equal(rank[:, :3].sort(1).values, torch.arange(3).expand(N, 3))
    first = torch.bincount(rank[:, :3].argmin(1), minlength=3).float() / N
    torch.testing.assert_close(first, torch.softmax(scores[0, :3], 0), atol=0.015, rtol=0)
    # log q of a fixed order [0, 2, 1], prefix lengths 0..3
    r = torch.tensor([[0, 2, 1, 4]]).expand(4, -1)
    lq = prefix_log_prob(scores.expand(4, -1), r, target.expand(4, -1), torch.arange(4))
    p0 = math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    p1 = math.log(math.exp(-1) / (1 + math.exp(-1)))
    torch.testing.assert_close(lq, torch.tensor([0.0, p0, p0 + p1, p0 + p1]), atol=1e-5, rtol=0)


def test_creation_state_compacts_and_assigns_gaps():
    b = row([5], [7, 8, 9])  # [5 BOS 7 8 9 EOS]
    rank = torch.tensor([[16, 16, 1, 16, 0, 16] + [16] * 10])
    rank[0, 3] = 2
    st = creation_state(b["input_ids"], b["fixed"], b["attention_mask"], rank, torch.tensor([1]), PAD)
    assert st.x[0, :4].tolist() == [5, BOS, 9, EOS] and st.lengths.tolist() == [4]
    assert st.fixed[0, :4].tolist() == [True, True, False, True]
    assert st.missing[0, :6].tolist() == [False, False, True, True, False, False]
    assert st.owner[0, 2].item() == 2 and st.owner[0, 3].item() == 2  # both missing tokens go left of 9


def test_reinforce_term_reaches_only_the_order_network():
    model = tiny().train()
    b, _ = mixed_rows(L=MAXLEN, with_index=True)
    b = {k: v.repeat(8, *([1] * (v.ndim - 1))) for k, v in b.items()}  # many draws: orders that differ
    terms = model.bound_terms(b, RowRNG(0, torch.arange(b["input_ids"].shape[0])))
    reward = terms["elbo"].detach()
    assert (reward[0] != reward[1]).any()
    adv = reward - reward.flip(0)
    (-(adv * terms["log_q_prefix"]).sum()).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for n, p in model.named_parameters() if not n.startswith("order_"))
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if n.startswith("order_"))


def test_loss_is_finite_with_gradients_everywhere():
    model = tiny().train()
    b, _ = mixed_rows(L=MAXLEN, with_index=True)
    loss, logs = model.compute_loss(b, generator=RowRNG(0, torch.arange(b["input_ids"].shape[0])))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) >= {"loss_generator", "reinforce"}
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_sampler_keeps_prompts_and_never_leaves_special_tokens():
    model = tiny(sampler=IPSamplerConfig(top_k=None, temperature=1.0))
    b, prompts = mixed_rows(L=MAXLEN, with_index=True)
    out, fixed = model.sample(b, generator=RowRNG(1, b["index"]))
    again, _ = model.sample(b, generator=RowRNG(1, b["index"]))
    assert torch.equal(out, again)
    for r, head in enumerate(prompts):
        seq = out[r][out[r] != PAD].tolist()
        assert seq[: len(head)] == head and seq[-1] == EOS and len(seq) <= MAXLEN
        assert all(t >= TOK.num_special for t in seq[len(head) : -1])
        assert fixed[r, : len(head)].all() and fixed[r, len(seq) - 1]
    # the creation steps: -1 on fixed positions, each generated position made at its own step 0..n-1
    made = model.last_creation_steps
    for r in range(out.shape[0]):
        gen = (out[r] != PAD) & ~fixed[r]
        assert torch.equal(made[r][gen].sort().values, torch.arange(int(gen.sum())))
        assert (made[r][~gen] == -1).all()
    # a row's sample does not depend on the rest of its batch (noise keyed by the row)
    sub = {k: v[2:4] for k, v in b.items()}
    part, _ = model.sample(sub, generator=RowRNG(1, sub["index"]))
    assert torch.equal(part[:, : out.shape[1]], out[2:4])


def test_training_learns_a_fixed_row():
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, dropout=0.0, absolute_positions=True)
    model = InsertionProcess(TOK, max_length=MAXLEN, backbone=cfg, posterior="learned")
    b = row([5, 6], [9, 4, 7, 7])
    batch = {k: v.expand(16, -1).clone() for k, v in b.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        loss, _ = model.compute_loss(batch, generator=RowRNG(step, torch.arange(16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out, _ = model.sample(b, generator=RowRNG(0, torch.arange(1)))
    assert out[0, :8].tolist() == b["input_ids"][0, :8].tolist()
    assert exact_log_likelihood(model, [5, 6], [9, 4, 7, 7]) > math.log(0.5)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"model\.posterior='random'; allowed values: learned, uniform"):
        InsertionProcess(TOK, max_length=MAXLEN, posterior="random")
    with pytest.raises(ValueError, match=r"model\.num_orders must be >= 2 with posterior: learned"):
        InsertionProcess(TOK, max_length=MAXLEN, num_orders=1)
    with pytest.raises(ValueError, match=r"sampler\.top_k"):
        IPSamplerConfig(top_k=0)


def test_cli_fit_test_predict_with_the_shipped_config(tmp_path, monkeypatch, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "star" / "easy_ip.yaml"
    small = ["--model.backbone.num_layers", "1", "--model.backbone.d_model", "32", "--model.order_backbone.num_layers",
             "1", "--model.order_backbone.d_model", "16", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    records = fit_test_predict(config, "star-easy-ip", "InsertionProcess", small, tmp_path, monkeypatch, capsys)
    assert all(r["provenance"]["sampler"]["top_k"] == 1 for r in records)
