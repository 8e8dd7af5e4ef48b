"""BoundedRate and OrderNetwork (insertion_diffusion/order/network.py): bounds, validation, shapes,
time conditioning, the shared-backbone variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insertion_diffusion.nn.transformer import Transformer, TransformerConfig
from insertion_diffusion.order.network import BoundedRate, OrderNetwork


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


V = 14


def cfg(time_conditioning: bool = False) -> TransformerConfig:
    return TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0,
                             time_conditioning=time_conditioning)


def rows(B=3, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randint(4, V, (B, L), generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, 7:] = False
    z1[~valid] = 0
    return z1, valid


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its (often zero) initialisation so outputs depend on the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --- BoundedRate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["softplus", "exp"])
@pytest.mark.parametrize(("lo", "hi"), [(0.0, 100.0), (1.01, 100.0), (0.001, 5.0), (2.0, 2.5)])
def test_bounded_rate_stays_within_bounds(fn, lo, hi):
    br = BoundedRate(lo, hi, fn)
    s = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.tensor([-1e30, 1e30, 0.0])])
    b = br(s)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (b >= lo).all() and (b <= hi).all()
    assert b.min().item() == pytest.approx(lo, abs=1e-6)
    assert b.max().item() == hi
    assert (b[1:2001] >= b[:2000]).all()  # monotone


def test_bounded_rate_formula_and_live_gradient_near_b_min():
    br = BoundedRate(1.01, 100.0, "softplus")
    s = torch.tensor([-6.0, -2.0, 0.0, 3.0, 200.0], requires_grad=True)
    b = br(s)
    want = (1.01 + F.softplus(s.detach())).clamp_max(100.0)
    torch.testing.assert_close(b, want)
    (g,) = torch.autograd.grad(b.sum(), s)
    assert (g[:4] > 0).all() and g[4] == 0  # alive near b_min, flat above the ceiling
    be = BoundedRate(0.5, 10.0, "exp")(torch.tensor([-3.0, 1.0, 5.0]))
    torch.testing.assert_close(be, torch.tensor([0.5 + torch.exp(torch.tensor(-3.0)).item(), 0.5 + 2.718281828, 10.0]))


def test_bounded_rate_half_precision_input_gives_fp32():
    b = BoundedRate(0.0, 100.0)(torch.tensor([-1.0, 2.0], dtype=torch.bfloat16))
    assert b.dtype == torch.float32


@pytest.mark.parametrize(("lo", "hi"), [(5.0, 1.0), (-1.0, 10.0), (2.0, 2.0), (-3.0, -1.0)])
def test_bounded_rate_invalid_bounds_name_both(lo, hi):
    with pytest.raises(ValueError, match="b_min") as err:
        BoundedRate(lo, hi)
    assert f"b_min={lo}" in str(err.value) and f"b_max={hi}" in str(err.value)


def test_bounded_rate_invalid_function():
    with pytest.raises(ValueError, match=r"fn='sigmoid' is not one of: softplus, exp"):
        BoundedRate(0.0, 1.0, "sigmoid")


# --- OrderNetwork -----------------------------------------------------------------------------------------


def test_order_network_init_near_b_min_and_fixed_b_um():
    net = OrderNetwork(V, cfg(), b_min=1.01, b_max=100.0)
    z1, valid = rows()
    b_in, b_um = net(z1, valid, None)
    assert b_um is None and net.b_um_head is None
    assert b_in.shape == z1.shape and b_in.dtype == torch.float32
    # zero-initialised output layer with bias -2: b = b_min + softplus(-2) everywhere
    torch.testing.assert_close(b_in, torch.full_like(b_in, 1.01 + F.softplus(torch.tensor(-2.0)).item()))


@pytest.mark.parametrize("fn", ["softplus", "exp"])
@pytest.mark.parametrize("learn_b_um", [False, True])
def test_order_network_outputs_within_bounds(fn, learn_b_um):
    net = OrderNetwork(V, cfg(), b_min=1.5, b_max=6.0, rate_fn=fn, learn_b_um=learn_b_um)
    perturb(net)
    heads = [net.b_in_head] + ([net.b_um_head] if learn_b_um else [])
    with torch.no_grad():
        for h in heads:
            h.mlp[2].bias.fill_(0.5)
    z1, valid = rows()
    b_in, b_um = net(z1, valid, None)
    outs = [b_in] + ([b_um] if learn_b_um else [])
    if not learn_b_um:
        assert b_um is None
    for b in outs:
        assert b.shape == z1.shape and torch.isfinite(b).all()
        assert (b >= 1.5).all() and (b <= 6.0).all()
        assert b.std() > 0  # depends on the tokens after perturbation
    # drive the heads to the extremes: exactly the bounds
    for bias, bound in ((1e4, 6.0), (-1e4, 1.5)):
        with torch.no_grad():
            for h in heads:
                h.mlp[2].weight.zero_()
                h.mlp[2].bias.fill_(bias)
        b_in, b_um = net(z1, valid, None)
        for b in [b_in] + ([b_um] if learn_b_um else []):
            torch.testing.assert_close(b, torch.full_like(b, bound))


@pytest.mark.parametrize(("lo", "hi"), [(10.0, 2.0), (-0.5, 3.0)])
def test_order_network_invalid_bounds(lo, hi):
    with pytest.raises(ValueError, match="b_max") as err:
        OrderNetwork(V, cfg(), b_min=lo, b_max=hi)
    assert f"b_min={lo}" in str(err.value) and f"b_max={hi}" in str(err.value)


def test_order_network_time_conditioning():
    z1, valid = rows()
    t1, t2 = torch.full((3,), 0.1), torch.full((3,), 0.9)
    timed = OrderNetwork(V, cfg(True), time_conditioning=True, learn_b_um=True)
    perturb(timed)
    a1, u1 = timed(z1, valid, t1)
    a2, u2 = timed(z1, valid, t2)
    assert not torch.allclose(a1, a2) and not torch.allclose(u1, u2)
    assert timed.b_in_head.ada is not None
    # time-free network: t is ignored (and None is accepted)
    free = OrderNetwork(V, cfg(False), time_conditioning=False)
    perturb(free)
    f0, _ = free(z1, valid, None)
    f1, _ = free(z1, valid, t1)
    torch.testing.assert_close(f0, f1)
    assert free.b_in_head.ada is None and free.net.time is None
    # a time-conditioned backbone with time_conditioning=False heads: heads get no conditioning
    heads_free = OrderNetwork(V, cfg(True), time_conditioning=False)
    assert heads_free.b_in_head.ada is None


def test_order_network_rates_are_per_token_and_ignore_padding():
    net = OrderNetwork(V, cfg())
    perturb(net)
    z1, valid = rows(B=2, L=8)
    valid[1, 5:] = False
    b1, _ = net(z1, valid, None)
    z1b = z1.clone()
    z1b[1, 5:] = 7  # change only padded positions of row 1
    b2, _ = net(z1b, valid, None)
    torch.testing.assert_close(b1[1, :5], b2[1, :5])
    torch.testing.assert_close(b1[0], b2[0])
    z1c = z1.clone()
    z1c[0, 2] = (z1c[0, 2] - 4 + 1) % (V - 4) + 4  # change a real token of row 0
    b3, _ = net(z1c, valid, None)
    assert not torch.allclose(b3[0], b1[0])
    torch.testing.assert_close(b3[1], b1[1])  # rows are independent


def test_order_network_shared_backbone():
    backbone = Transformer(V, cfg(True))
    net = OrderNetwork(V, cfg(True), backbone=backbone)
    assert net.shared and net.net is backbone
    own = {id(p) for p in net.parameters()} - {id(p) for p in backbone.parameters()}
    head_params = {id(p) for p in net.b_in_head.parameters()}
    assert own == head_params
    perturb(net)
    z1, valid = rows()
    b_in, _ = net(z1, valid, None)
    b_in.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert not OrderNetwork(V, cfg()).shared
