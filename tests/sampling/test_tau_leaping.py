"""Unit tests of the tau-leaping sampler (insertion_diffusion/sampling/tau_leaping.py) with dummy rate models."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.sampling import SamplerConfig, tau_leaping
from insertion_diffusion.sampling.tau_leaping import insert_masks

PAD, MASK, BOS, EOS = 0, 1, 2, 3
SPECIALS = (PAD, MASK, BOS, EOS)
V = 14


class DummyModel:
    """Fixed logits favouring ``favour``, a constant insertion rate per gap and a constant unmasking rate.

    Records every call's inputs, so tests can inspect intermediate states.
    """

    def __init__(self, insert_rate=1.0, unmask_rate=2.0, favour=5, strength=3.0, special_bias=0.0):
        self.insert_rate, self.unmask_rate = insert_rate, unmask_rate
        self.favour, self.strength, self.special_bias = favour, strength, special_bias
        self.calls = []
        self.spans = []  # t_next - t of every call (None without integrate_hazard)

    def __call__(self, x, t, valid, t_next=None):
        B, W = x.shape
        self.calls.append((x.clone(), t.clone(), valid.clone()))
        self.spans.append(None if t_next is None else t_next - t)
        logits = torch.zeros(B, W, V)
        logits[..., self.favour] = self.strength
        logits[..., list(SPECIALS)] += self.special_bias
        ins = torch.full((B, W), float(self.insert_rate))
        um = torch.full((B, W), float(self.unmask_rate))
        return logits, ins, um


def start_state(prompts, width=None):
    """[prompt][BOS][EOS] rows (or [EOS] for an empty prompt with bos=False), all fixed."""
    rows = [p + [BOS, EOS] if p is not None else [EOS] for p in prompts]
    W = width or max(map(len, rows))
    x = torch.full((len(rows), W), PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    fixed = torch.arange(W)[None, :] < lengths[:, None]
    return x, fixed, lengths


PROMPTS = [[4, 7, 9], [12], [8, 8, 6, 10, 11], [5, 13], [4] * 2, [9, 4, 6], [11], [7, 7, 7, 7]]


def run(model, prompts=PROMPTS, max_length=24, seed=0, banned=SPECIALS, **cfg):
    x, fixed, lengths = start_state(prompts)
    cfg.setdefault("steps", 30)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return tau_leaping(
        model,
        x,
        fixed,
        lengths,
        SamplerConfig(**cfg),
        max_length=max_length,
        mask_id=MASK,
        pad_id=PAD,
        eos_id=EOS,
        banned_ids=banned,
        generator=g,
    )


def check_invariants(out, prompts, max_length):
    B = len(prompts)
    assert out.x.shape == (B, max_length)
    assert (out.lengths <= max_length).all()
    assert not (out.x == MASK).any()
    for b, prompt in enumerate(prompts):
        n = out.lengths[b].item()
        row = out.x[b].tolist()
        head = (prompt + [BOS]) if prompt is not None else []
        assert row[: len(head)] == head  # nothing was inserted left of prompt tokens or BOS
        assert row[n - 1] == EOS
        assert all(v == PAD for v in row[n:])
        assert all(v >= len(SPECIALS) for v in row[len(head) : n - 1])  # generated tokens are content
        fx = out.fixed[b].tolist()
        assert [v for v, f in zip(row, fx) if f] == head + [EOS]
        assert fx[: len(head)] == [True] * len(head) and fx[n - 1]
        assert not any(fx[len(head) : n - 1]) and not any(fx[n:])


def test_invariants_with_a_dummy_model():
    model = DummyModel(insert_rate=1.5)
    out = run(model)
    check_invariants(out, PROMPTS, 24)
    assert (out.lengths > torch.tensor([len(p) + 2 for p in PROMPTS])).any(), "nothing was generated"
    # The favoured token dominates the generated content.
    gen = out.x[~out.fixed & (out.x != PAD)]
    assert (gen == 5).float().mean() > 0.5


def test_unconditional_start_from_eos():
    prompts = [None] * 6
    out = run(DummyModel(insert_rate=2.0), prompts=prompts, max_length=16)
    check_invariants(out, prompts, 16)
    assert (out.lengths > 1).any()


def test_greedy_de_novo_rows_differ_through_their_random_insertions():
    """Greedy tokens do not make unconditional generation deterministic: every row starts from the same [EOS],
    but the insertion counts are drawn per row, so rows end with different lengths (and, for a real model,
    different contexts for their greedy tokens). This is why `top_k: 1` is usable for de novo molecules."""
    prompts = [None] * 16
    out = run(DummyModel(insert_rate=1.5), prompts=prompts, max_length=24, top_k=1, confidence="top_prob")
    check_invariants(out, prompts, 24)
    assert len(set(out.lengths.tolist())) > 1


@pytest.mark.parametrize("trim", [False, True])
def test_model_sees_increasing_times_and_valid_masks(trim):
    model = DummyModel()
    run(model, steps=12, trim=trim)
    assert len(model.calls) == 12
    ts = [t[0].item() for _, t, _ in model.calls]
    dt = (1 - 1e-5) / 13
    assert ts == pytest.approx([s * dt for s in range(12)], abs=1e-6)
    for x, t, valid in model.calls:
        assert (t == t[0]).all() and 0.0 <= t[0].item() < 1.0
        # trimmed: exactly the longest row's width; untrimmed: the full max_length
        assert x.shape[1] == (int(valid.sum(1).max()) if trim else 24)
        assert ((x != PAD) == valid).all()  # valid is exactly the non-PAD prefix


def test_trimming_changes_only_the_width_the_network_sees():
    a = run(DummyModel(insert_rate=1.5, strength=0.5), seed=3, trim=True)
    b = run(DummyModel(insert_rate=1.5, strength=0.5), seed=3, trim=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.unmask_step, b.unmask_step) and torch.equal(a.insert_step, b.insert_step)


def test_step_bookkeeping():
    out = run(DummyModel(insert_rate=1.5), steps=20)
    gen = (~out.fixed) & (out.x != PAD)
    assert (out.insert_step[gen] >= 0).all() and (out.unmask_step[gen] >= 0).all()
    # A mask inserted at step s is unmasked at a later step (unmasking runs before insertion each step).
    assert (out.unmask_step[gen] > out.insert_step[gen]).all()
    assert (out.unmask_step[gen] <= 19).all() and (out.insert_step[gen] <= 18).all()
    assert (out.unmask_step[~gen] == -1).all() and (out.insert_step[~gen] == -1).all()


def test_same_seed_same_output_different_seed_different_output():
    a = run(DummyModel(insert_rate=1.5, strength=0.5), seed=3)
    b = run(DummyModel(insert_rate=1.5, strength=0.5), seed=3)
    c = run(DummyModel(insert_rate=1.5, strength=0.5), seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.unmask_step, b.unmask_step) and torch.equal(a.insert_step, b.insert_step)
    assert not torch.equal(a.x, c.x)


def test_last_step_fills_remaining_masks_with_argmax():
    # No unmasking before the last step: every generated token is the argmax, filled at step S-1.
    out = run(DummyModel(insert_rate=2.0, unmask_rate=0.0, favour=9, strength=0.1), steps=10)
    gen = (~out.fixed) & (out.x != PAD)
    assert gen.any()
    assert (out.x[gen] == 9).all()
    assert (out.unmask_step[gen] == 9).all()


def test_single_step_only_fills():
    x, fixed, lengths = start_state(PROMPTS)
    out = run(DummyModel(insert_rate=100.0), steps=1)
    assert torch.equal(out.lengths, lengths)
    assert torch.equal(out.x[:, : x.shape[1]], x)


def test_banned_ids_are_never_generated():
    # The model prefers special tokens; banning them leaves only content tokens.
    out = run(DummyModel(insert_rate=2.0, special_bias=10.0, strength=0.0), steps=15)
    check_invariants(out, PROMPTS, 24)
    gen = (~out.fixed) & (out.x != PAD)
    assert gen.any() and (out.x[gen] >= 4).all()


@pytest.mark.parametrize("rate", [1e3, 1e9])
def test_huge_insertion_rate_never_overflows(rate):
    model = DummyModel(insert_rate=rate)
    out = run(model, max_length=12, steps=15)
    assert (out.lengths <= 12).all()
    for _x, _, valid in model.calls:
        assert (valid.sum(1) <= 12).all()
    # Every step would overflow: nothing is ever inserted.
    assert torch.equal(out.lengths, torch.tensor([len(p) + 2 for p in PROMPTS]))
    check_invariants(out, PROMPTS, 12)


def test_large_insertion_rate_fills_up_to_max_length():
    model = DummyModel(insert_rate=3.0)
    prompts = [[4]] * 16
    out = run(model, prompts=prompts, max_length=10, steps=40)
    check_invariants(out, prompts, 10)
    for _x, _, valid in model.calls:
        assert (valid.sum(1) <= 10).all()
    assert (out.lengths >= 7).float().mean() > 0.5  # most rows grow close to the cap


def test_insertion_growth_matches_tau_leaping_expectation():
    """No unmasking: every allowed gap gets Poisson(c dt) masks per step and each mask opens a new gap,
    so E[#allowed gaps] grows by (1 + c dt) per step: E[len - #fixed + 1] = (1 + c dt)^(S - 1)."""
    c, S, B = 1.0, 20, 400
    prompts = [[4, 5]] * B
    out = run(DummyModel(insert_rate=c, unmask_rate=0.0), prompts=prompts, max_length=32, steps=S, seed=5)
    assert (out.lengths < 32).all()  # no overflow skipped an insertion
    dt = (1 - 1e-5) / (S + 1)
    expected = (1 + c * dt) ** (S - 1)
    allowed = (out.lengths - 4 + 1).double()
    assert abs(allowed.mean().item() - expected) < 4.5 * allowed.std().item() / math.sqrt(B)


def test_integrated_hazard_counts_are_used_as_given():
    """integrate_hazard: the sampler passes t_next = t + dt and uses the returned rates as expected counts per
    step (no further * dt): with a constant 'rate' c per step, E[#allowed gaps] = (1 + c)^(S - 1)."""
    c, S, B = 0.1, 12, 400
    model = DummyModel(insert_rate=c, unmask_rate=0.0)
    out = run(model, prompts=[[4, 5]] * B, max_length=40, steps=S, seed=5, integrate_hazard=True)
    dt = (1 - 1e-5) / (S + 1)
    assert all(span is not None and torch.allclose(span, torch.full_like(span, dt)) for span in model.spans)
    assert (out.lengths < 40).all()
    allowed = (out.lengths - 4 + 1).double()
    expected = (1 + c) ** (S - 1)
    assert abs(allowed.mean().item() - expected) < 4.5 * allowed.std().item() / math.sqrt(B)
    plain = DummyModel(insert_rate=c, unmask_rate=0.0)
    run(plain, prompts=[[4, 5]] * 4, max_length=40, steps=S, seed=5)
    assert all(span is None for span in plain.spans)


def test_unmasking_probability_per_step():
    """Masks fire with probability 1 - exp(-r dt) per step; the rest are filled at the last step."""
    r, S, m, B = 1.0, 20, 10, 400
    x = torch.full((B, m + 1), MASK)
    x[:, -1] = EOS
    fixed = torch.zeros(B, m + 1, dtype=torch.bool)
    fixed[:, -1] = True
    out = tau_leaping(
        DummyModel(insert_rate=0.0, unmask_rate=r),
        x,
        fixed,
        torch.full((B,), m + 1),
        SamplerConfig(steps=S),
        max_length=m + 1,
        mask_id=MASK,
        pad_id=PAD,
        eos_id=EOS,
        banned_ids=SPECIALS,
        generator=torch.Generator().manual_seed(6),
    )
    dt = (1 - 1e-5) / (S + 1)
    steps = out.unmask_step[:, :m].flatten().double()
    p_early = 1 - math.exp(-r * dt * (S - 1))
    frac = (steps < S - 1).double().mean().item()
    assert abs(frac - p_early) < 4.5 * math.sqrt(p_early * (1 - p_early) / steps.numel())
    p_first = 1 - math.exp(-r * dt)
    frac0 = (steps == 0).double().mean().item()
    assert abs(frac0 - p_first) < 4.5 * math.sqrt(p_first * (1 - p_first) / steps.numel())
    assert not (out.x == MASK).any()


class ConfidenceProbe:
    """Masks only (no insertion). Row b fires exactly ``b + 1`` masks per step in the model's own order
    (the leftmost masks get an enormous unmasking rate, others 0); confidence increases to the right."""

    def __call__(self, x, t, valid):
        B, W = x.shape
        pos = torch.arange(W, dtype=torch.float32)
        logits = torch.zeros(B, W, V)
        logits[..., 5] = pos + 1.0  # more peaked (more confident) further right
        is_mask = valid & (x == MASK)
        rank_left = is_mask.long().cumsum(1) - 1
        k = torch.arange(B)[:, None] + 1
        um = torch.where(is_mask & (rank_left < k), torch.tensor(1e9), torch.tensor(0.0))
        return logits, torch.zeros(B, W), um


@pytest.mark.parametrize("mode", ["none", "top_prob", "prob_diff", "entropy"])
def test_confidence_modes_keep_the_number_of_unmasked_positions_per_step(mode):
    B, m, S = 3, 9, 12
    x = torch.full((B, m + 1), MASK)
    x[:, -1] = EOS
    fixed = torch.zeros(B, m + 1, dtype=torch.bool)
    fixed[:, -1] = True
    out = tau_leaping(
        ConfidenceProbe(),
        x,
        fixed,
        torch.full((B,), m + 1),
        SamplerConfig(steps=S, confidence=mode, top_k=1),
        max_length=m + 1,
        mask_id=MASK,
        pad_id=PAD,
        eos_id=EOS,
        banned_ids=SPECIALS,
        generator=torch.Generator().manual_seed(0),
    )
    assert not (out.x == MASK).any() and (out.x[:, :m] == 5).all() and (out.x[:, m] == EOS).all()
    for b in range(B):
        k = b + 1
        steps = out.unmask_step[b, :m].tolist()
        # Exactly k positions per step until the masks run out.
        counts = [steps.count(s) for s in range(S)]
        assert counts[: m // k] == [k] * (m // k), (mode, b, counts)
        assert sum(counts) == m
        if mode == "none":
            expected = [j // k for j in range(m)]  # left to right, k at a time
        else:
            expected = [(m - 1 - j) // k for j in range(m)]  # most confident (rightmost) first
        assert steps == expected, (mode, b, steps)
    assert (out.unmask_step[:, m] == -1).all()


def test_top_k_one_is_greedy_in_the_sampler():
    class TwoPeaks(DummyModel):
        def __call__(self, x, t, valid):
            logits, ins, um = super().__call__(x, t, valid)
            logits[..., 7] = 2.9  # second best: sampled often without top_k
            return logits, ins, um

    greedy = run(TwoPeaks(insert_rate=2.0), top_k=1)
    gen = (~greedy.fixed) & (greedy.x != PAD)
    assert gen.any() and (greedy.x[gen] == 5).all()
    sampled = run(TwoPeaks(insert_rate=2.0), top_k=None)
    gen = (~sampled.fixed) & (sampled.x != PAD)
    assert set(sampled.x[gen].unique().tolist()) >= {5, 7}
    low_t = run(TwoPeaks(insert_rate=2.0), temperature=1e-3)
    gen = (~low_t.fixed) & (low_t.x != PAD)
    assert (low_t.x[gen] == 5).all()


def test_top_p_in_the_sampler():
    # p(5) ~ 0.62 under these logits: top_p=0.5 keeps token 5 only.
    out = run(DummyModel(insert_rate=2.0, strength=3.0), top_p=0.5)
    gen = (~out.fixed) & (out.x != PAD)
    assert gen.any() and (out.x[gen] == 5).all()


def test_initial_state_wider_than_max_length_is_rejected():
    x, fixed, lengths = start_state(PROMPTS)
    with pytest.raises(ValueError, match="max_length"):
        tau_leaping(
            DummyModel(),
            x,
            fixed,
            lengths,
            SamplerConfig(steps=2),
            max_length=x.shape[1] - 1,
            mask_id=MASK,
            pad_id=PAD,
            eos_id=EOS,
        )


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"steps": 0}, "steps"),
        ({"confidence": "greedy"}, "confidence"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_sampler_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplerConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# insert_masks


def reference_insert(x, counts, lengths, extras):
    B, L = x.shape
    out_x = torch.full_like(x, PAD)
    out_e = [torch.zeros_like(e) if e.dtype == torch.bool else torch.full_like(e, -1) for e in extras]
    new_len = []
    for b in range(B):
        row, erow = [], [[] for _ in extras]
        for j in range(lengths[b].item()):
            c = counts[b, j].item()
            row += [MASK] * c + [x[b, j].item()]
            for k, e in enumerate(extras):
                fill = False if e.dtype == torch.bool else -1
                erow[k] += [fill] * c + [e[b, j].item()]
        new_len.append(len(row))
        out_x[b, : len(row)] = torch.tensor(row, dtype=x.dtype)
        for k in range(len(extras)):
            out_e[k][b, : len(row)] = torch.tensor(erow[k], dtype=extras[k].dtype)
    return out_x, torch.tensor(new_len), out_e


def test_insert_masks_matches_python_reference():
    g = torch.Generator().manual_seed(0)
    B, L = 9, 16
    for _ in range(20):
        lengths = torch.randint(1, 8, (B,), generator=g)
        x = torch.randint(4, V, (B, L), generator=g)
        x[torch.arange(L)[None, :] >= lengths[:, None]] = PAD
        counts = torch.randint(0, 3, (B, L), generator=g)
        counts[torch.arange(L)[None, :] >= lengths[:, None]] = 0
        # Respect the caller's contract lengths + sum(counts) <= L.
        for b in range(B):
            while lengths[b] + counts[b].sum() > L:
                j = counts[b].nonzero()[0, 0]
                counts[b, j] -= 1
        flag = torch.rand(B, L, generator=g) < 0.5
        steps = torch.randint(0, 50, (B, L), generator=g)
        new_x, new_len, new_flag, new_steps = insert_masks(x, counts, lengths, MASK, PAD, flag, steps)
        ref_x, ref_len, (ref_flag, ref_steps) = reference_insert(x, counts, lengths, [flag, steps])
        assert torch.equal(new_len, ref_len)
        assert torch.equal(new_x, ref_x)
        assert torch.equal(new_flag, ref_flag)
        assert torch.equal(new_steps, ref_steps)


def test_insert_masks_simple_case():
    x = torch.tensor([[4, 5, EOS, PAD, PAD, PAD]])
    counts = torch.tensor([[1, 0, 2, 0, 0, 0]])
    new_x, new_len = insert_masks(x, counts, torch.tensor([3]), MASK, PAD)
    assert new_x.tolist() == [[MASK, 4, 5, MASK, MASK, EOS]]
    assert new_len.tolist() == [6]
    # No counts: unchanged.
    same, n = insert_masks(x, torch.zeros_like(counts), torch.tensor([3]), MASK, PAD)
    assert torch.equal(same, x) and n.tolist() == [3]
