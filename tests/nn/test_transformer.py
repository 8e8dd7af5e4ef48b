"""Unit tests of the transformer backbone and heads (insertion_diffusion/nn/transformer.py)."""

from __future__ import annotations

import pytest
import torch

from insertion_diffusion.nn.transformer import (
    AdaLNHead,
    Block,
    Dropout,
    ScalarHead,
    TimestepEmbedding,
    TokenConv,
    Transformer,
    TransformerConfig,
    apply_rotary,
    modulate,
    rotary_tables,
)

V = 17
CFG = TransformerConfig(num_layers=2, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
CONV_CFG = TransformerConfig(num_layers=2, d_model=32, num_heads=2, d_cond=16, dropout=0.0, conv_kernel=3)


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Randomise every parameter (AdaLN-zero init makes the blocks identities, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def tokens(B=3, W=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, W), generator=g)


def test_output_shapes():
    net = Transformer(V, CFG)
    x = tokens(B=3, W=9)
    t = torch.rand(3)
    h, cond = net(x, t, torch.ones(3, 9, dtype=torch.bool))
    assert h.shape == (3, 9, 32) and cond.shape == (3, 16)
    h2, _ = net(x, t, None)
    assert h2.shape == (3, 9, 32)
    assert AdaLNHead(32, 16, 11)(h, cond).shape == (3, 9, 11)
    s = ScalarHead(32, 16)(h, cond)
    assert s.shape == (3, 9) and s.dtype == torch.float32
    assert TimestepEmbedding(16)(t).shape == (3, 16)


def test_no_time_conditioning():
    cfg = TransformerConfig(
        num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0, time_conditioning=False
    )
    net = Transformer(V, cfg)
    assert net.time is None and net.blocks[0].ada is None
    x = tokens()
    h, cond = net(x, torch.rand(3), None)
    assert cond is None and h.shape == (3, 9, 32)
    # t is ignored.
    torch.testing.assert_close(h, net(x, torch.rand(3), None)[0])
    head = AdaLNHead(32, None, 5)
    assert head.ada is None and head(h, None).shape == (3, 9, 5)
    assert ScalarHead(32, None)(h, None).shape == (3, 9)


@pytest.mark.parametrize("cfg", [CFG, CONV_CFG], ids=["attention", "conv"])
def test_padding_invariance(cfg):
    net = perturbed(Transformer(V, cfg))
    B, W, extra = 4, 7, 5
    x = tokens(B, W, seed=1)
    lengths = torch.tensor([7, 3, 5, 1])
    valid = torch.arange(W)[None, :] < lengths[:, None]
    t = torch.rand(B, generator=torch.Generator().manual_seed(3))
    h, _ = net(x, t, valid)
    # Append PAD columns (and garbage in the already-padded slots): real positions must not change.
    x2 = torch.cat([x, torch.zeros(B, extra, dtype=torch.long)], 1)
    x2[:, :W][~valid] = tokens(B, W, seed=2)[~valid]
    valid2 = torch.cat([valid, torch.zeros(B, extra, dtype=torch.bool)], 1)
    h2, _ = net(x2, t, valid2)
    for b in range(B):
        n = lengths[b].item()
        # fp32 noise only: a wider row changes the attention kernel's blocking and so its summation order
        # (differences up to 2e-5 were seen with unseeded t; a leak of padding would be O(0.1))
        torch.testing.assert_close(h2[b, :n], h[b, :n], atol=1e-4, rtol=1e-4)
        # And each row equals the same row run alone, unpadded.
        alone, _ = net(x[b : b + 1, :n], t[b : b + 1], None)
        torch.testing.assert_close(alone[0], h[b, :n], atol=2e-4, rtol=1e-4)


def test_padding_mask_matters():
    """Sanity check that the previous test has power: without the mask, pads leak into real positions."""
    net = perturbed(Transformer(V, CFG))
    x = tokens(2, 8, seed=3)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[:, 5:] = False
    t = torch.rand(2)
    h_masked, _ = net(x, t, valid)
    h_unmasked, _ = net(x, t, None)
    assert not torch.allclose(h_masked[:, :5], h_unmasked[:, :5], atol=1e-4)


@pytest.mark.parametrize("cfg", [CFG, CONV_CFG], ids=["attention", "conv"])
@pytest.mark.parametrize("with_valid", [False, True])
def test_causal_attention_ignores_the_future(with_valid, cfg):
    net = perturbed(Transformer(V, cfg, causal=True))
    B, W = 2, 10
    x = tokens(B, W, seed=4)
    t = torch.rand(B)
    valid = torch.ones(B, W, dtype=torch.bool) if with_valid else None
    h, _ = net(x, t, valid)
    for j in (0, 3, 8):
        x2 = x.clone()
        x2[:, j + 1 :] = (x2[:, j + 1 :] + 1 + torch.arange(W - j - 1)) % V
        h2, _ = net(x2, t, valid)
        torch.testing.assert_close(h2[:, : j + 1], h[:, : j + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(h2[:, j + 1 :], h[:, j + 1 :], atol=1e-4)


def test_causal_with_padding():
    net = perturbed(Transformer(V, CFG, causal=True))
    x = tokens(2, 6, seed=5)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    t = torch.rand(2)
    h, _ = net(x, t, valid)
    h_ref, _ = net(x[1:, :4], t[1:], None)
    torch.testing.assert_close(h[1, :4], h_ref[0], atol=2e-4, rtol=1e-4)


def test_bidirectional_attention_sees_the_future():
    net = perturbed(Transformer(V, CFG, causal=False))
    x = tokens(2, 10, seed=6)
    t = torch.rand(2)
    h, _ = net(x, t, None)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % V
    h2, _ = net(x2, t, None)
    assert not torch.allclose(h2[:, 0], h[:, 0], atol=1e-4)


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    block = Block(CFG)
    x = torch.randn(3, 6, 32)
    cond = torch.randn(3, 16)
    W, hd = 6, 16
    rot = rotary_tables(W, hd, x.device, x.dtype)
    valid = torch.ones(3, 1, 1, W, dtype=torch.bool)
    torch.testing.assert_close(block(x, cond, rot, valid, False), x)
    torch.testing.assert_close(block(x, cond, rot, None, True), x)
    # The whole backbone is the embedding at init, whatever t.
    net = Transformer(V, CFG)
    toks = tokens()
    h, _ = net(toks, torch.rand(3), None)
    torch.testing.assert_close(h, net.embed(toks))
    # After perturbing, blocks are no longer the identity.
    perturbed(block)
    assert not torch.allclose(block(x, cond, rot, valid, False), x, atol=1e-3)


def test_heads_start_uniform_and_at_bias_init():
    h = torch.randn(2, 5, 32)
    cond = torch.randn(2, 16)
    assert (AdaLNHead(32, 16, 9)(h, cond) == 0).all()  # uniform logits
    out = ScalarHead(32, 16, bias_init=-2.0)(h, cond)
    torch.testing.assert_close(out, torch.full((2, 5), -2.0))


def test_time_conditioning_changes_the_output():
    net = perturbed(Transformer(V, CFG))
    x = tokens(2, 6, seed=7)
    h1, c1 = net(x, torch.tensor([0.1, 0.1]), None)
    h2, c2 = net(x, torch.tensor([0.1, 0.9]), None)
    torch.testing.assert_close(h1[0], h2[0])
    assert not torch.allclose(h1[1], h2[1], atol=1e-4)
    assert not torch.allclose(c1[1], c2[1])


def test_timestep_embedding_resolves_nearby_times():
    emb = TimestepEmbedding(16)
    t = torch.tensor([0.5, 0.5 + 1e-3])
    assert not torch.allclose(emb(t)[0], emb(t)[1], atol=1e-6)


def test_rotary_preserves_norms_and_encodes_relative_positions():
    W, hd = 12, 8
    cos, sin = rotary_tables(W, hd, torch.device("cpu"), torch.float32)
    assert cos.shape == sin.shape == (W, hd // 2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(hd, generator=g)
    k = torch.randn(hd, generator=g)
    qs = apply_rotary(q.expand(1, 1, W, hd), cos, sin)[0, 0]
    ks = apply_rotary(k.expand(1, 1, W, hd), cos, sin)[0, 0]
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(W))
    # <R_i q, R_j k> depends only on i - j.
    dots = qs @ ks.T
    for off in (0, 1, 3):
        d = torch.diagonal(dots, offset=off)
        torch.testing.assert_close(d, d[0].expand_as(d), atol=1e-4, rtol=1e-4)
    # Position 0 is unrotated; a partial rotary dim leaves the remaining dims untouched.
    torch.testing.assert_close(qs[0], q)
    cos2, sin2 = rotary_tables(W, 4, torch.device("cpu"), torch.float32)
    part = apply_rotary(q.expand(1, 1, W, hd), cos2, sin2)[0, 0]
    torch.testing.assert_close(part[:, 4:], q[4:].expand(W, 4))


@pytest.mark.parametrize("rotary_half", [4, 2])
def test_fused_rotary_and_modulation_match_their_formulas_and_gradients(rotary_half):
    # apply_rotary and modulate fuse their multiply-adds (torch.addcmul); both must stay the textbook formulas,
    # in value and in gradient, for a whole-head and a partial rotary dim.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    cos, sin = rotary_tables(5, 2 * rotary_half, torch.device("cpu"), torch.float32)
    r = rotary_half
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    got = apply_rotary(x, cos, sin)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g)
    (gx_want,) = torch.autograd.grad((want * w).sum(), x)
    (gx_got,) = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(gx_got, gx_want)

    h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    shift, scale = (torch.randn(2, 8, generator=g, requires_grad=True) for _ in range(2))
    want = h * (1 + scale[:, None, :]) + shift[:, None, :]
    got = modulate(h, shift, scale)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (h, shift, scale)),
                    torch.autograd.grad((want * w).sum(), (h, shift, scale)), strict=True):
        torch.testing.assert_close(a, b)


def test_rotary_dim_option():
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0, rotary_dim=8)
    net = perturbed(Transformer(V, cfg))
    assert net.rotary_dim == 8
    x = tokens()
    assert net(x, torch.rand(3), None)[0].shape == (3, 9, 32)
    with pytest.raises(ValueError, match=r"backbone setting rotary_dim=7 must be even and <= .* = 16 \(model\.backbone"):
        Transformer(V, TransformerConfig(num_layers=1, d_model=32, num_heads=2, rotary_dim=7))
    # rotary_dim left at its default: the message names what was set (d_model, num_heads), not rotary_dim
    with pytest.raises(ValueError, match=r"^backbone settings d_model=36 and num_heads=4 give an odd head dim 9; .*"
                                         r"rotary_dim to an even value below 9 \(model\.backbone"):
        Transformer(V, TransformerConfig(num_layers=1, d_model=36, num_heads=4))
    assert Transformer(V, TransformerConfig(num_layers=1, d_model=36, num_heads=4, rotary_dim=8)).rotary_dim == 8
    with pytest.raises(ValueError, match=r"backbone setting rotary_dim=32 .* = 16 \(model\.backbone"):
        Transformer(V, TransformerConfig(num_layers=1, d_model=32, num_heads=2, rotary_dim=32))


@pytest.mark.parametrize("kwargs", [{"dropout": 0.5}, {"dropout": 0.0, "attention_dropout": 0.5}])
def test_dropout_only_in_training_mode(kwargs):
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, **kwargs)
    net = perturbed(Transformer(V, cfg))
    x = tokens()
    t = torch.rand(3)
    net.eval()
    torch.testing.assert_close(net(x, t, None)[0], net(x, t, None)[0])
    net.train()
    torch.manual_seed(0)
    a = net(x, t, None)[0]
    b = net(x, t, None)[0]
    assert not torch.allclose(a, b)


WHERE = r" \(model\.backbone or model\.order_backbone\)$"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "num_heads": 4}, r"backbone setting d_model=30 must be divisible by num_heads=4"),
        ({"num_layers": 0}, r"backbone setting num_layers=0 must be >= 1"),
        ({"d_model": 0}, r"backbone setting d_model=0 must be >= 1"),
        # checked before divisibility: num_heads = 0 used to raise ZeroDivisionError
        ({"num_heads": 0}, r"backbone setting num_heads=0 must be >= 1"),
        ({"d_cond": 0}, r"backbone setting d_cond=0 must be >= 1"),
        ({"dropout": 1.0}, r"backbone setting dropout=1\.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"backbone setting dropout=-0\.1 must be in \[0, 1\)"),
        ({"attention_dropout": 1.0}, r"backbone setting attention_dropout=1\.0 must be in \[0, 1\)"),
        ({"conv_kernel": 1}, r"backbone setting conv_kernel=1 must be 0 \(off\) or >= 2"),
        ({"conv_kernel": -3}, r"backbone setting conv_kernel=-3 must be 0 \(off\) or >= 2"),
    ],
)
def test_config_validation_names_the_setting_and_the_config_section(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}.*{WHERE}"):
        TransformerConfig(**kwargs)


def test_no_dropout_in_training_mode_is_deterministic():
    """dropout = attention_dropout = 0: train and eval forwards agree (no hidden randomness anywhere)."""
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    net = perturbed(Transformer(V, cfg))
    x, t = tokens(), torch.rand(3)
    a = net.train()(x, t, None)[0]
    torch.testing.assert_close(a, net.eval()(x, t, None)[0])


def test_gradients_reach_every_parameter_after_perturbation():
    net = perturbed(Transformer(V, CFG), scale=0.1).train()
    head = perturbed(AdaLNHead(32, 16, V)).train()
    x = tokens()
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, 6:] = False
    h, cond = net(x, torch.rand(3), valid)
    head(h, cond).logsumexp(-1)[valid].sum().backward()
    for name, p in list(net.named_parameters()) + list(head.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("causal", [False, True])
def test_token_conv_reaches_exactly_its_window(causal):
    """Position i mixes i-1..i+1 (bidirectional, kernel 3) or i-2..i (causal, kernel 3), nothing else."""
    conv = perturbed(TokenConv(8, 3, causal))
    h = torch.randn(1, 9, 8, requires_grad=True)
    conv(h, None)[0, 4].sum().backward()
    touched = (h.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == ([2, 3, 4] if causal else [3, 4, 5])


def test_token_conv_ignores_padding_and_needs_odd_kernel_when_bidirectional():
    conv = perturbed(TokenConv(8, 3, False))
    h = torch.randn(2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    h2 = h.clone()
    h2[1, 4:] = 100.0
    torch.testing.assert_close(conv(h, valid)[1, :4], conv(h2, valid)[1, :4])
    with pytest.raises(ValueError, match="odd"):
        TokenConv(8, 4, False)
    with pytest.raises(ValueError, match="odd"):
        Transformer(V, TransformerConfig(num_layers=1, d_model=32, num_heads=2, conv_kernel=4))
    TokenConv(8, 4, True)  # causal: any width >= 2


def test_token_conv_starts_without_a_shared_offset():
    """At initialisation the convolution adds nothing common to every position (zero bias), so the tokens' own
    embeddings still tell them apart after the next LayerNorm."""
    torch.manual_seed(0)
    net = Transformer(V, TransformerConfig(num_layers=2, d_model=64, num_heads=2, conv_kernel=3,
                                           time_conditioning=False), max_length=16)
    conv = net.convs[0]
    assert torch.count_nonzero(conv.conv.bias) == 0
    zeros = torch.zeros(1, 5, 64)
    torch.testing.assert_close(conv(zeros, None), zeros)
    # distinct tokens stay distinct: after LayerNorm the spread across positions is of the order of the mean
    x = torch.arange(4, 4 + 12)[None] % V
    h = torch.nn.functional.layer_norm(conv(net.embed(x), None), (64,))[0]
    assert h.std(0).norm() > 0.5 * h.mean(0).norm()


@pytest.mark.parametrize("kernel", [2, 3])
def test_cached_decoding_with_conv_equals_full_forward(kernel):
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=2, dropout=0.0, time_conditioning=False,
                            conv_kernel=kernel)
    net = perturbed(Transformer(V, cfg, causal=True))
    x = tokens(2, 8, seed=9)
    full, _ = net(x, None, None)
    cache = net.new_cache(2, 8, x.device, torch.float32)
    assert len(cache[0]) == 3  # keys, values and the conv's input history
    steps = [net.forward_cached(x[:, :3], cache, 0)]  # prefill, then one token at a time
    steps += [net.forward_cached(x[:, i : i + 1], cache, i) for i in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_dropout_keeps_the_configured_share_and_the_mean(p):
    """The 15-bit mask drops a share p of elements (to 2**-15), independently per element, and rescales the
    rest so the expectation is unchanged; the gradient is the same mask times the same scale."""
    torch.manual_seed(0)
    drop = Dropout(p).train()
    x = torch.ones(1_000_003, requires_grad=True)  # not a multiple of 4: the last 64-bit draw is partly used
    y = drop(x)
    kept = y != 0
    share = kept.float().mean().item()
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(share - (1 - p)) < 5 * sd
    # neighbouring elements share a 64-bit draw: their masks must still be independent
    pairs = kept[:-3].view(-1)[: (x.numel() - 3) // 4 * 4].view(-1, 4)
    both = (pairs[:, 0] & pairs[:, 3]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 / pairs.shape[0]) ** 0.5
    scale = 32768 / (32768 - round(p * 32768))
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert abs(y.mean().item() - 1.0) < 5 * sd * scale
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())


def test_cpu_dropout_is_the_identity_in_eval_mode_and_repeatable_under_a_seed():
    x = torch.randn(4, 7, 8)
    drop = Dropout(0.3)
    torch.testing.assert_close(drop.eval()(x), x)
    drop.train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), a)
    assert not torch.equal(drop(x), a)
    torch.testing.assert_close(Dropout(0.0).train()(x), x)
