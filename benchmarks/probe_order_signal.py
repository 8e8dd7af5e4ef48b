"""What each term of the LoFlexMDM objective asks of the order network, per path position.

Loads a LoFlexMDM star-graph checkpoint, takes its order network's rates ``b_in`` on test rows as a leaf tensor,
and computes the gradient of each term of the objective with respect to every token's ``b_in``:

- ``pathwise``: the generator loss through the target rates (what ``pathwise: true`` adds);
- ``reinforce``: the leave-one-out score-function term (the order signal of the method);
- ``reg``: the three schedule regularisers at their configured weights.

A descent step moves ``b_in`` along ``-grad``: a positive ``-grad`` asks for a larger ``b_in``, i.e. an
earlier insertion. The table averages ``-grad`` over rows by the token's distance from the goal (0 = the goal
token, the last of the target), with its standard error, so one can read whether the REINFORCE signal asks
for the goal side first (the order the paper reports) and how it compares in size with the other two terms.

It also prints how much the order network's last hidden states still vary across positions, before and after the
rate head's LayerNorm, relative to their common (mean) vector. A network whose states have become one large shared
vector gives every token the same ``b_in`` whatever the gradients say.

Example::

    python benchmarks/probe_order_signal.py --ckpt benchmarks/out/s5/medium_loflex/checkpoints/last.ckpt \\
        --preset medium --data-dir benchmarks/out/s5/data --batches 20
"""

from __future__ import annotations

import argparse
import math

import torch

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.metrics.order import rowwise_pearson
from insertion_diffusion.models import LoFlexMDM
from insertion_diffusion.order.kumaraswamy import schedule_regularizers
from insertion_diffusion.process.insertion import partial_state, stratified_times

TERMS = ("pathwise", "reinforce", "reg")


def term_grads(model: LoFlexMDM, batch: dict, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-token gradients (B, L) of each objective term w.r.t. the order network's ``b_in``, and the noisy mask."""
    z1, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
    B, L = z1.shape
    noisy = attn & ~fixed
    t = stratified_times(B, model.time_eps, z1.device, gen)
    with torch.no_grad():
        b0, b_um = model.order_rates(batch, t)
    b_in = b0.clone().requires_grad_(True)
    n2 = noisy.repeat(2, 1)
    b_in2, b_um2 = b_in.repeat(2, 1), b_um.repeat(2, 1)
    t2 = t.repeat(2)
    with torch.no_grad():
        t_in, t_um = model.clock.sample_times(b_in2.masked_fill(~n2, 1.0), b_um2.masked_fill(~n2, 1.0), gen)
        st = partial_state(z1.repeat(2, 1), fixed.repeat(2, 1), attn.repeat(2, 1), t2, t_in, t_um,
                           model.tokenizer.mask_id, model.tokenizer.pad_id)
        logits, g_in, g_um = model(st.x, t2, st.valid)
    terms, per_row = model.state_terms(st, t2, b_in2, b_um2, logits, g_in, g_um)
    gen_loss = 0.5 * (per_row / L).view(2, B).sum(0).mean()
    logp = model.state_log_prob(st, t2, b_in2.masked_fill(~n2, 1.0), b_um2.masked_fill(~n2, 1.0), n2)
    diff = model.difficulty(terms, L, t2).detach()
    reinforce = model.reinforce_weight * 0.5 * ((diff[:B] - diff[B:]) * (logp[:B] - logp[B:])).mean()
    regs = schedule_regularizers(model.clock, b_in, noisy, generator=gen)
    reg = sum(model.reg_weights[k] * v for k, v in regs.items())
    out = {}
    for name, value in zip(TERMS, (gen_loss, reinforce, reg)):
        (g,) = torch.autograd.grad(value, b_in, retain_graph=True, allow_unused=True)
        out[name] = torch.zeros_like(b_in) if g is None else g * B  # per-row scale (the loss is a row mean)
    return out, noisy


def representation_spread(model: LoFlexMDM, batch: dict) -> tuple[float, float, float]:
    """``(|mean h|, |std over positions of h|, the same ratio after the rate head's LayerNorm)`` over noisy tokens."""
    noisy = batch["attention_mask"] & ~batch["fixed"]
    with torch.no_grad():
        t = torch.full((noisy.shape[0],), 0.5) if model.order_time_conditioning else None
        h, _ = model.order.net(batch["input_ids"], t, batch["attention_mask"])
        v, vn = h[noisy].float(), model.order.b_in_head.norm(h.float())[noisy]
    return float(v.mean(0).norm()), float(v.std(0).norm()), float(vn.std(0).norm() / vn.mean(0).norm().clamp_min(1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--data-dir", default="benchmarks/out/data")
    ap.add_argument("--batches", type=int, default=20, help="test batches of 64 rows (each row: 2 partial states)")
    ap.add_argument("--max-distance", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = LoFlexMDM.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    dm = StarGraphDataModule(preset=args.preset, data_dir=args.data_dir, num_test=64 * args.batches, eval_batch_size=64)
    dm.prepare_data()
    dm.setup("test")
    gen = torch.Generator().manual_seed(args.seed)
    D = args.max_distance
    sums = {k: torch.zeros(D + 1, dtype=torch.float64) for k in TERMS}
    sq = {k: torch.zeros(D + 1, dtype=torch.float64) for k in TERMS}
    count = torch.zeros(D + 1, dtype=torch.float64)
    b_sum = torch.zeros(D + 1, dtype=torch.float64)
    corr_rows = []
    for i, batch in enumerate(dm.test_dataloader()):
        if i >= args.batches:
            break
        grads, noisy = term_grads(model, batch, gen)
        # distance from the goal: the target's last token (just before EOS) has distance 0
        n_noisy = noisy.sum(1, keepdim=True)
        rank = noisy.long().cumsum(1) - 1
        dist = (n_noisy - 1 - rank).masked_fill(~noisy, -1)
        with torch.no_grad():
            b_now, _ = model.order_rates(batch, torch.full((noisy.shape[0],), 0.5))
        for d in range(D + 1):
            sel = dist == d
            count[d] += sel.sum()
            b_sum[d] += b_now[sel].double().sum()
            for k in TERMS:
                v = -grads[k][sel].double()
                sums[k][d] += v.sum()
                sq[k][d] += (v * v).sum()
        # per row: does REINFORCE ask for earlier insertion nearer the goal? corr(-grad, -distance)
        corr, ok = rowwise_pearson(-dist.double(), -grads["reinforce"].double(), noisy)
        corr_rows.extend(corr[ok].tolist())
    print(f"{args.ckpt}: {int(count[0])} rows; -grad w.r.t. b_in per token (positive = insert earlier), "
          "mean +- standard error")
    print(f"{'distance from goal':>18} {'tokens':>7} {'b_in':>7} " + " ".join(f"{k:>22}" for k in TERMS))
    for d in range(D + 1):
        if count[d] == 0:
            continue
        cells = []
        for k in TERMS:
            mean = sums[k][d] / count[d]
            var = max(0.0, float(sq[k][d] / count[d] - mean ** 2))
            cells.append(f"{float(mean):>+10.4f} +- {math.sqrt(var / count[d]):<9.4f}")
        print(f"{d:>18} {int(count[d]):>7} {float(b_sum[d] / count[d]):>7.4f} " + " ".join(f"{c:>22}" for c in cells))
    mean_norm, spread, ratio_ln = representation_spread(model, next(iter(dm.test_dataloader())))
    print(f"order network, last hidden state over noisy tokens: |mean| {mean_norm:.3g}, |std over positions| "
          f"{spread:.3g}; after the head's LayerNorm std/|mean| = {ratio_ln:.3g}")
    c = torch.tensor(corr_rows)
    print(f"per-row corr(REINFORCE -grad, closeness to goal): mean {c.mean():+.4f} +- {c.std() / math.sqrt(len(c)):.4f} "
          f"over {len(c)} rows (positive = the REINFORCE step favours inserting the goal side first)")


if __name__ == "__main__":
    main()
