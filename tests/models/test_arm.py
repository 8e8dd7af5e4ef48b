"""ARM (insertion_diffusion/models/arm.py) and its KV-cached decoding (sampling/autoregressive.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_rows import mixed_rows

from insertion_diffusion.models.arm import ARM
from insertion_diffusion.nn.transformer import Transformer, TransformerConfig
from insertion_diffusion.sampling.autoregressive import ARSamplerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer

TOK = IntegerTokenizer(10)
PAD, MASK, BOS, EOS = TOK.pad_id, TOK.mask_id, TOK.bos_id, TOK.eos_id
MAXLEN = 16


def tiny(seed=0, perturb=0.3, conv_kernel=0, **kwargs) -> ARM:
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=2, dropout=0.0, absolute_positions=True,
                            conv_kernel=conv_kernel)
    model = ARM(TOK, max_length=MAXLEN, backbone=cfg, **kwargs).eval()
    if perturb:  # move the zero-initialised heads so greedy decoding is not a tie everywhere
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return model


def batch(prompt_lens=(3, 1, 4, 2, 0, 5), target_lens=(5, 8, 0, 3, 6, 2), L=MAXLEN, seed=0):
    return mixed_rows(prompt_lens, target_lens, L, seed, with_index=True)


def test_forward_cached_equals_full_forward():
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=4, dropout=0.0, time_conditioning=False,
                            absolute_positions=True)
    net = Transformer(14, cfg, causal=True, max_length=12).eval()
    x = torch.randint(0, 14, (3, 12))
    with torch.no_grad():
        full, _ = net(x, None, None)
        cache = net.new_cache(3, 12, x.device, torch.float32)
        parts = [net.forward_cached(x[:, :5], cache, 0)]  # prefill
        parts += [net.forward_cached(x[:, p : p + 1], cache, p) for p in range(5, 9)]  # one at a time
        parts.append(net.forward_cached(x[:, 9:], cache, 9))  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_bidirectional_transformer_refuses_a_cache():
    net = Transformer(14, TransformerConfig(num_layers=1, d_model=16, num_heads=2), causal=False)
    with pytest.raises(ValueError, match="causal"):
        net.new_cache(1, 4, torch.device("cpu"), torch.float32)


def test_sequence_nll_is_the_exact_autoregressive_likelihood():
    model = tiny()
    b, prompts = batch()
    with torch.no_grad():
        nll = model.sequence_nll(b)
        ids = b["input_ids"]
        for r in range(ids.shape[0]):
            row = [BOS] + ids[r][b["attention_mask"][r]].tolist()
            logp = F.log_softmax(model(torch.tensor([row[:-1]]))[0].float(), -1)
            start = len(prompts[r])  # predictions of target tokens and EOS
            want = -sum(logp[i, row[i + 1]] for i in range(start, len(row) - 1))
            assert nll[r].item() == pytest.approx(float(want), rel=1e-5, abs=1e-5)


def test_loss_counts_target_and_eos_only():
    model = tiny()
    b, _ = batch()
    loss, logs = model.compute_loss(b)
    B, L = b["input_ids"].shape
    assert loss.item() == pytest.approx(model.sequence_nll(b).sum().item() / (B * L), rel=1e-5)
    assert 0.0 <= logs["token_acc"][0].item() <= 1.0


@pytest.mark.parametrize("conv_kernel", [0, 3], ids=["attention", "conv"])
@pytest.mark.parametrize("sampler", [ARSamplerConfig(top_k=1), ARSamplerConfig(temperature=0.0)])
def test_cache_equals_recompute_token_for_token_greedy(sampler, conv_kernel):
    model = tiny(sampler=sampler, conv_kernel=conv_kernel)
    b, _ = batch()
    x_cache, f_cache = model.sample(b, use_cache=True)
    x_full, f_full = model.sample(b, use_cache=False)
    assert torch.equal(x_cache, x_full) and torch.equal(f_cache, f_full)
    assert (x_cache[:, : 4] != PAD).any()


def test_cache_equals_recompute_when_sampling_with_the_same_seed():
    model = tiny(sampler=ARSamplerConfig(top_k=5, top_p=0.9, temperature=1.3))
    b, _ = batch()
    a, _ = model.sample(b, generator=torch.Generator().manual_seed(3), use_cache=True)
    c, _ = model.sample(b, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, c)


def test_samples_keep_prompts_stop_at_eos_and_pad_after():
    model = tiny(sampler=ARSamplerConfig(top_k=3))
    b, prompts = batch()
    x, fixed = model.sample(b, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, MAXLEN)
    for r, head in enumerate(prompts):
        assert x[r, : len(head)].tolist() == head
        assert fixed[r, : len(head)].all()
        row = x[r].tolist()
        specials_after = [t for t in row[len(head):] if t in (MASK, BOS)]
        assert not specials_after
        if EOS in row[len(head):]:
            e = row.index(EOS, len(head))
            assert fixed[r, e] and all(t == PAD for t in row[e + 1 :])
            assert int(fixed[r].sum()) == len(head) + 1


def test_training_learns_a_copy_task():
    """Target = the prompt, copied: a few hundred steps bring greedy decoding to exact copies."""
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, d_model=64, num_heads=4, dropout=0.0, absolute_positions=True)
    model = ARM(TOK, max_length=10, backbone=cfg, sampler=ARSamplerConfig(top_k=1), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def copy_batch(n):
        p = torch.randint(4, 14, (n, 3), generator=g)
        ids = torch.cat([p, torch.full((n, 1), BOS), p, torch.full((n, 1), EOS), torch.full((n, 2), PAD)], 1)
        fixed = torch.zeros_like(ids, dtype=torch.bool)
        fixed[:, :4] = True
        fixed[:, 7] = True
        return {"input_ids": ids, "fixed": fixed, "attention_mask": ids != PAD}

    model.train()
    for _ in range(300):
        loss, _ = model.compute_loss(copy_batch(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = copy_batch(64)
    x, _ = model.sample(test)
    assert (x[:, 4:8] == test["input_ids"][:, 4:8]).all(1).float().mean() > 0.9
