"""HDLM (models/hdlm.py), its hyperschedule (process/hyperschedule.py), block-causal attention and the cached
block sampler (sampling/hyperschedule.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import fit_test_predict
from model_rows import mixed_rows

from insertion_diffusion.models.base import eval_noise
from insertion_diffusion.models.hdlm import HDLM
from insertion_diffusion.nn.transformer import Transformer, TransformerConfig
from insertion_diffusion.process.hyperschedule import BlockAnnealing, hybrid_noise
from insertion_diffusion.process.rng import RowRNG
from insertion_diffusion.sampling.hyperschedule import HDLMSamplerConfig
from insertion_diffusion.schedules import make_schedule
from insertion_diffusion.tokenizers import IntegerTokenizer

TOK = IntegerTokenizer(10)
PAD, MASK, BOS, EOS = TOK.pad_id, TOK.mask_id, TOK.bos_id, TOK.eos_id
MAXLEN = 16


def tiny(seed=0, perturb=0.3, conv_kernel=0, **kwargs) -> HDLM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=2, dropout=0.0, absolute_positions=True,
                            conv_kernel=conv_kernel)
    kwargs.setdefault("sampler", HDLMSamplerConfig(steps=3))
    model = HDLM(TOK, max_length=MAXLEN, backbone=cfg, **kwargs).eval()
    if perturb:  # move the zero-initialised head so predictions differ between columns
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def batch(prompt_lens=(3, 1, 4, 2, 0, 5), target_lens=(5, 8, 0, 3, 6, 2), seed=0):
    return mixed_rows(prompt_lens, target_lens, MAXLEN, seed, with_index=True)[0]


# --- block-causal attention and its cache ----------------------------------------------------------------
@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_block_causal_attention_sees_its_block_and_earlier_ones_only(conv_kernel):
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=2, dropout=0.0, time_conditioning=False,
                            absolute_positions=True, conv_kernel=conv_kernel)
    net = Transformer(14, cfg, causal=True, max_length=12, block_size=4).eval()
    x = torch.randint(4, 14, (2, 12))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1 - 4) % 10 + 4  # change one token of block 1 (columns 4..7)
    with torch.no_grad():
        hx, _ = net(x, None, None)
        hy, _ = net(y, None, None)
    changed = (hx - hy).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 8  # block 0 untouched; all of block 1 (also column 4) and later


def test_cached_windows_equal_the_full_forward():
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=4, dropout=0.0, time_conditioning=False,
                            absolute_positions=True, conv_kernel=3)
    net = Transformer(14, cfg, causal=True, max_length=12, block_size=3).eval()
    x = torch.randint(4, 14, (3, 12))
    with torch.no_grad():
        full, _ = net(x, None, None)
        cache = net.new_cache(3, 12, x.device, torch.float32)
        # a prefill to column 6, a re-run of block 2 with other tokens (overwritten below), then windows
        net.forward_cached(x[:, :6], cache, 0)
        net.forward_cached(torch.randint(4, 14, (3, 3)), cache, 6)
        a = net.forward_cached(x[:, 6:9], cache, 6)
        b = net.forward_cached(x[:, 9:12], cache, 9)
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, 6:], atol=1e-5, rtol=1e-5)


def test_block_size_needs_a_causal_transformer():
    with pytest.raises(ValueError, match="block_size=4 must be >= 1, and > 1 only with causal=True"):
        Transformer(14, TransformerConfig(num_layers=1, d_model=16, num_heads=2), block_size=4)


# --- the hyperschedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,window,schedule", [(1, 1, "linear"), (2, 2, "linear"), (3, 1, "cosine")])
def test_nelbo_weights_integrate_to_one_per_column(block_size, window, schedule):
    # E_u[(hi - lo) * w(u) * P(masked | u)] = int F'(tau) dtau = 1 for every column the clock passes over:
    # the weights are the per-column rates of the forward process (a factor of window or span would show).
    ann = BlockAnnealing(block_size, window, make_schedule(schedule))
    W = 9
    blocks = ann.blocks(W)
    lo, hi = ann.clock_range(torch.tensor([1]), W)
    u = lo + (torch.arange(200_000, dtype=torch.float64) + 0.5).float() / 200_000 * (hi - lo)
    integrand = (hi - lo) * ann.elbo_weights(u, blocks) * (1.0 - ann.clean_prob(u, blocks))
    mean = integrand.mean(0)
    first = block_size  # the rows' generated part starts in block 1
    torch.testing.assert_close(mean[first:], torch.ones(W - first), atol=2e-3, rtol=0)
    tau = ann.local_time(u, blocks)
    assert (ann.elbo_weights(u, blocks)[(tau == 0) | (tau == 1)] == 0).all()  # no rate outside the window


def test_local_time_runs_block_after_block():
    ann = BlockAnnealing(2, 1, make_schedule("linear"))
    tau = ann.local_time(torch.tensor([0.5, 1.25, 3.0]), ann.blocks(6))
    assert tau.tolist() == [[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.25, 0.25, 0.0, 0.0], [1.0] * 6]


def test_hybrid_noise_masks_and_corrupts_the_generated_columns_only():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 14, (400, 10), generator=g)
    region = torch.zeros(400, 10, dtype=torch.bool)
    region[:, 3:] = True
    clean = torch.full((400, 10), 0.25)
    candidates = torch.tensor([EOS, PAD, *range(4, 14)])
    x, masked, corrupted = hybrid_noise(ids, region, clean, 0.2, MASK, candidates, generator=RowRNG(0, torch.arange(400)))
    assert torch.equal(x[:, :3], ids[:, :3]) and not (masked | corrupted)[:, :3].any()
    assert (x[masked] == MASK).all() and not (masked & corrupted).any()
    assert abs(masked[:, 3:].float().mean().item() - 0.75) < 0.02
    assert abs(corrupted[:, 3:].sum().item() / (~masked[:, 3:]).sum().item() - 0.2) < 0.03
    assert torch.isin(x[corrupted], candidates).all() and (x[corrupted] == EOS).any() and (x[corrupted] == PAD).any()
    kept = region & ~masked & ~corrupted
    assert torch.equal(x[kept], ids[kept])


# --- the model ------------------------------------------------------------------------------------------
def test_loss_is_finite_with_gradients_and_never_noises_the_prompt():
    for eps in (0.0, 0.1):
        model = tiny(hybrid_eps=eps).train()
        b = batch()
        loss, logs = model.compute_loss(b, generator=RowRNG(0, b["index"]))
        assert torch.isfinite(loss) and loss > 0 and 0.0 <= float(logs["masked_token_acc"][0]) <= 1.0
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    ids, region = model.layout(b)
    heads = [4, 2, 5, 3, 0, 6]  # prompt + BOS
    assert region.sum(1).tolist() == [MAXLEN - h for h in heads]
    last = b["attention_mask"].sum(1) - 1
    assert (ids[:, -1] == PAD).all() and (ids.gather(1, last[:, None]) == EOS).all()


def test_block_size_one_nelbo_is_the_autoregressive_likelihood():
    # With one column per block and window 1, the expected NELBO is sum_c -log p(x_c | x_<c, MASK at c):
    # an autoregressive likelihood computed in one causal pass.
    model = tiny(block_size=1, window=1, time_eps=0.0)
    b = batch(prompt_lens=(3,), target_lens=(4,))
    ids, region = model.layout(b)
    with torch.no_grad():
        exact = 0.0
        for c in range(MAXLEN):
            if region[0, c]:
                x = ids.clone()
                x[0, c] = MASK
                exact += F.cross_entropy(model(x)[0, c][None], ids[0, c][None]).item()
        n = 4000
        rep = {k: v.expand(n, *v.shape[1:]) if k != "index" else torch.arange(n) for k, v in b.items()}
        estimate = model.sequence_nll(rep).mean().item()
    assert abs(estimate - exact) < 0.05 * exact, (estimate, exact)


def test_sequence_nll_is_seeded():
    model = tiny()
    b = batch()
    with torch.no_grad():
        a, again = model.sequence_nll(b), model.sequence_nll(b)
    assert torch.equal(a, again) and torch.isfinite(a).all() and (a >= 0).all()
    assert eval_noise(model, b) is not None


@pytest.mark.parametrize("window,confidence,conv_kernel,correction", [
    (1, "top_prob", 0, None), (2, "none", 0, None), (2, "top_prob", 3, 0.3), (3, "none", 3, None),
])
def test_cached_sampler_equals_recomputation_and_computes_fewer_columns(window, confidence, conv_kernel, correction):
    sampler = HDLMSamplerConfig(steps=3, confidence=confidence, top_k=None, correction_threshold=correction)
    model = tiny(window=window, sampler=sampler, conv_kernel=conv_kernel, hybrid_eps=0.1 if correction else 0.0)
    b = batch()
    cached, _ = model.sample(b, generator=RowRNG(5, b["index"]), use_cache=True)
    stats_cached = model.last_sample_stats
    recomputed, _ = model.sample(b, generator=RowRNG(5, b["index"]), use_cache=False)
    stats_full = model.last_sample_stats
    assert torch.equal(cached, recomputed)
    _, region = model.layout(b)
    ends = region & ((cached == EOS) | (cached == PAD))
    assert ((cached == EOS) & ends).sum(1).le(1).all()  # a row ends once, at its first EOS/PAD, with EOS
    first_end = torch.where(ends, torch.arange(MAXLEN), MAXLEN).min(1).values
    ended = ends.any(1)
    assert (cached.gather(1, first_end[:, None].clamp_max(MAXLEN - 1))[ended] == EOS).all()
    assert stats_cached.network_calls == stats_full.network_calls
    assert stats_cached.corrections == stats_full.corrections and (stats_cached.corrections > 0) == bool(correction)
    assert stats_cached.columns < stats_full.columns


def test_samples_keep_prompts_end_once_and_never_leave_masks():
    model = tiny(sampler=HDLMSamplerConfig(steps=2))
    b = batch()
    out, fixed = model.sample(b, generator=RowRNG(1, b["index"]))
    ids, region = model.layout(b)
    assert torch.equal(out[~region], ids[~region])
    assert not (out == MASK).any() and not (out[region] == BOS).any()
    for row, reg in zip(out.tolist(), region.tolist()):
        gen = [t for t, r in zip(row, reg) if r]
        if EOS in gen:
            assert all(t == PAD for t in gen[gen.index(EOS) + 1 :]) and PAD not in gen[: gen.index(EOS)]
        else:
            assert PAD not in gen
    assert (fixed == ~region | (out == EOS)).all()
    # a row's sample does not depend on the rest of its batch (noise keyed by the row)
    sub = {k: v[2:4] for k, v in b.items()}
    part, _ = model.sample(sub, generator=RowRNG(1, sub["index"]))
    assert torch.equal(part, out[2:4])


def test_a_rows_sample_does_not_depend_on_its_batch():
    # The batch's shortest prompt sets where the clock starts; the noise must not depend on it.
    model = tiny(window=2, sampler=HDLMSamplerConfig(steps=3, top_k=None))
    b = batch()
    full, _ = model.sample(b, generator=RowRNG(1, b["index"]))
    for rows in ([0], [0, 2, 5], [3, 1]):
        sub = {k: v[rows] for k, v in b.items()}
        part, _ = model.sample(sub, generator=RowRNG(1, sub["index"]))
        assert torch.equal(part, full[rows]), rows


def test_greedy_block_size_one_sampler_is_greedy_decoding_with_a_mask_at_the_cursor():
    model = tiny(block_size=1, window=1, sampler=HDLMSamplerConfig(steps=1, top_k=1))
    b = batch(prompt_lens=(3,), target_lens=(4,))
    out, _ = model.sample(b)
    ids, region = model.layout(b)
    x = ids.clone()
    x[region] = MASK
    with torch.no_grad():
        for c in range(4, MAXLEN):
            x[0, c] = model(x)[0, c].argmax()
    ended = (x[0, 4:] == EOS) | (x[0, 4:] == PAD)
    if ended.any():
        first = 4 + int(ended.nonzero()[0])
        x[0, first] = EOS
        x[0, first + 1 :] = PAD
    assert torch.equal(out, x)


def test_correction_redraws_unlikely_tokens_of_open_blocks():
    model = tiny(hybrid_eps=0.1, sampler=HDLMSamplerConfig(steps=4, correction_threshold=0.5), window=2)
    b = batch()
    model.sample(b, generator=RowRNG(0, b["index"]))
    assert model.last_sample_stats.corrections > 0


def test_training_learns_a_fixed_row():
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, dropout=0.0, absolute_positions=True)
    model = HDLM(TOK, max_length=10, backbone=cfg, block_size=2, sampler=HDLMSamplerConfig(steps=2, top_k=1))
    b = mixed_rows((2,), (4,), 10, 0, with_index=True)[0]
    rows = {k: v.expand(16, *v.shape[1:]).clone() for k, v in b.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        loss, _ = model.compute_loss(rows, generator=RowRNG(step, torch.arange(16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out, _ = model.sample(b)
    ids, _ = model.layout(b)
    assert out[0].tolist() == ids[0].tolist()


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"model\.block_size=0 must be >= 1"):
        HDLM(TOK, max_length=MAXLEN, block_size=0)
    with pytest.raises(ValueError, match=r"model\.window=0 must be >= 1"):
        HDLM(TOK, max_length=MAXLEN, window=0)
    with pytest.raises(ValueError, match=r"model\.hybrid_eps=1\.0 must be in \[0, 1\)"):
        HDLM(TOK, max_length=MAXLEN, hybrid_eps=1.0)
    with pytest.raises(ValueError, match=r"sampler\.correction_threshold=1\.5 must be in \(0, 1\)"):
        HDLMSamplerConfig(correction_threshold=1.5)
    model = tiny(sampler=HDLMSamplerConfig(correction_threshold=0.2))
    with pytest.raises(ValueError, match=r"needs a model trained with model\.hybrid_eps > 0"):
        model.sample(batch())
    with pytest.raises(ValueError, match="exceeds the model's max_length"):
        model.layout(mixed_rows((3,), (4,), MAXLEN + 2, 0)[0])


def test_cli_fit_test_predict_with_the_shipped_config(tmp_path, monkeypatch, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "star" / "easy_hdlm.yaml"
    small = ["--model.backbone.num_layers", "1", "--model.backbone.d_model", "32", "--trainer.max_steps", "4",
             "--trainer.val_check_interval", "2", "--model.sampler.steps", "2"]
    records = fit_test_predict(config, "star-easy-hdlm", "HDLM", small, tmp_path, monkeypatch, capsys)
    assert all(r["provenance"]["sampler"]["steps"] == 2 for r in records)
