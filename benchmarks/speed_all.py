"""Training and sampling speed of every method (ARM, MDLM, HDLM, FlexMDM, LoFlexMDM, Insertion Process) at two sizes, on star-easy rows.

For each (method, size), in a fresh subprocess (so that its peak memory is its own):

* training: median seconds per step, tokens/s (``B * L`` per step), model FLOPs per step (torch's FLOP
  counter), MFU against a dense fp32 matmul measured in the same subprocess, peak resident memory;
* sampling: one full run for the batch; seconds per sampler step (network evaluations), sequences/s, and the
  share of the run spent outside the network forward (host-side bookkeeping of the sampler).

Then, in the parent: sequences/s of each method against ARM with its KV cache (ratios), and ARM and HDLM
decoding of 128-token sequences with vs without their caches. HDLM's ``steps`` are ticks per block: the
per-method runs use ``steps // 4`` per block (star-easy rows end in about four generated blocks of 4).

Run: ``python benchmarks/speed_all.py [--threads 2] [--sizes 2x128,4x256] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import count_flops, matmul_peak_flops, median_seconds

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import ARM, HDLM, MDLM, FlexMDM, InsertionProcess, LoFlexMDM
from insertion_diffusion.models.ip import IPSamplerConfig
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.sampling import ARSamplerConfig, HDLMSamplerConfig, MDLMSamplerConfig, SamplerConfig
from insertion_diffusion.sampling.autoregressive import autoregressive_decode
from insertion_diffusion.sampling.hyperschedule import hyperschedule_sample
from insertion_diffusion.tokenizers import IntegerTokenizer

METHODS = ("arm", "mdlm", "hdlm", "flexmdm", "loflexmdm", "ip")
STEPLESS = ("arm", "ip")  # samplers whose number of network passes follows the sequence, not a setting


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(method: str, layers: int, width: int, tok, max_length: int, steps: int):
    timed = method in ("flexmdm", "loflexmdm")
    cfg = TransformerConfig(num_layers=layers, d_model=width, num_heads=4, d_cond=min(128, width), dropout=0.0,
                            time_conditioning=timed, absolute_positions=True)
    if method == "arm":
        return ARM(tok, max_length, backbone=cfg, sampler=ARSamplerConfig(top_k=1))
    if method == "mdlm":
        return MDLM(tok, max_length, backbone=cfg, sampler=MDLMSamplerConfig(steps=steps, top_k=1, cache=False))
    if method == "hdlm":
        return HDLM(tok, max_length, backbone=cfg, sampler=HDLMSamplerConfig(steps=max(1, steps // 4), top_k=1))
    if method == "flexmdm":
        return FlexMDM(tok, max_length, backbone=cfg, sampler=SamplerConfig(steps=steps, top_k=1))
    order = TransformerConfig(num_layers=max(1, layers // 2), d_model=width, num_heads=4, d_cond=min(128, width),
                              dropout=0.0, absolute_positions=True, time_conditioning=method != "ip")
    if method == "ip":
        return InsertionProcess(tok, max_length, backbone=cfg, order_backbone=order, sampler=IPSamplerConfig(top_k=1))
    return LoFlexMDM(tok, max_length, backbone=cfg, order_backbone=order, sampler=SamplerConfig(steps=steps, top_k=1))


class ForwardTimer:
    """Wraps ``module.<name>`` and accumulates the wall time spent inside it."""

    def __init__(self, module: torch.nn.Module, name: str = "forward") -> None:
        self.module, self.seconds, self.calls = module, 0.0, 0
        self._orig = getattr(module, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = self._orig(*a, **kw)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        setattr(module, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def one(method: str, layers: int, width: int, batch_size: int, steps_list: list[int], repeats: int) -> dict:
    """Measure one (method, size); returns a JSON-able dict."""
    rss0 = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        dm = StarGraphDataModule(preset="easy", data_dir=tmp, num_train=256, num_val=16, num_test=batch_size,
                                 batch_size=batch_size, eval_batch_size=batch_size)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        dm.setup("test")
        test_batch = next(iter(dm.test_dataloader()))
    torch.manual_seed(0)
    model = build(method, layers, width, dm.tokenizer, dm.max_length, steps_list[0])
    if method == "mdlm":
        model.length_counts[8] = 1  # star-easy targets: 8 tokens (4 edges)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss, _ = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    flops = count_flops(train_step)
    sec = median_seconds(train_step, repeats)
    peak = matmul_peak_flops()
    B, L = batch["input_ids"].shape
    out = {"method": method, "size": f"{layers}x{width}", "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "train_step_s": sec, "train_tokens_per_s": B * L / sec, "train_gflop": flops / 1e9,
           "mfu": flops / sec / peak, "peak_gflops": peak / 1e9, "sampling": []}

    model.eval()
    # The network: model.forward (transformer + heads); the cached paths of ARM and HDLM run the transformer's
    # forward_cached and the output head directly.
    timers = [ForwardTimer(model.net if method == "ip" else model)]  # IP's policy pass is its transformer + heads
    if method in ("arm", "hdlm"):  # cached samplers: the transformer's forward_cached and the output head
        head = model.lm_head if method == "arm" else model.token_head
        timers += [ForwardTimer(model.net, "forward_cached"), ForwardTimer(head)]
    gen = torch.Generator().manual_seed(0)
    for steps in steps_list if method not in STEPLESS else [None]:
        if steps is not None:
            model.sampler_cfg.steps = max(1, steps // 4) if method == "hdlm" else steps
        model.sample(test_batch, gen)  # warm-up
        for tm in timers:
            tm.reset()
        t0 = time.perf_counter()
        model.sample(test_batch, gen)
        total = time.perf_counter() - t0
        inside = sum(tm.seconds for tm in timers)
        n_eval = timers[1].calls if method in ("arm", "hdlm") else timers[0].calls
        out["sampling"].append({
            "steps": steps, "seconds": total, "network_calls": n_eval, "seq_per_s": test_batch["input_ids"].shape[0] / total,
            "step_s": total / max(1, n_eval), "outside_forward": 1.0 - inside / total,
        })
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_before_mb"] = rss0
    return out


def arm_cache_ratio(length: int, vocab: int, batch_size: int, layers: int, width: int) -> tuple[float, float]:
    """Seconds to decode ``length`` tokens for a batch with and without the KV cache (EOS banned so every row
    runs the full length)."""
    tok = IntegerTokenizer(vocab)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=layers, d_model=width, num_heads=4, dropout=0.0, absolute_positions=True)
    model = ARM(tok, length + 1, backbone=cfg, sampler=ARSamplerConfig(top_k=1)).eval()
    prompt = torch.full((batch_size, 1), tok.bos_id)
    plen = torch.ones(batch_size, dtype=torch.long)
    banned = (tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id)
    res = []
    for use_cache in (True, False):
        def run(use_cache=use_cache):
            with torch.no_grad():
                return autoregressive_decode(model.decoder(use_cache), prompt, plen, length + 1, model.sampler_cfg,
                                             tok.eos_id, tok.pad_id, banned)

        res.append(median_seconds(run, 3, warmup=1))
    return res[0], res[1]


def hdlm_cache_ratio(length: int, vocab: int, batch_size: int, layers: int, width: int, block_size: int = 4,
                     ticks: int = 4) -> tuple[float, float, int, int]:
    """HDLM sampling of ``length`` tokens after a one-token prompt, with the KV cache of finished blocks and with
    the prefix re-run every tick (EOS and PAD banned so every row runs the full length): seconds each, and the
    columns each ran through the network."""
    tok = IntegerTokenizer(vocab)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=layers, d_model=width, num_heads=4, dropout=0.0, absolute_positions=True)
    model = HDLM(tok, length + 1, backbone=cfg, block_size=block_size,
                 sampler=HDLMSamplerConfig(steps=ticks, top_k=1, confidence="top_prob")).eval()
    x = torch.full((batch_size, length + 1), tok.mask_id)
    x[:, 0] = tok.bos_id
    region = torch.ones_like(x, dtype=torch.bool)
    region[:, 0] = False
    banned = (tok.mask_id, tok.bos_id, tok.eos_id, tok.pad_id)
    res, cols = [], []
    for use_cache in (True, False):
        def run(use_cache=use_cache):
            out, stats = hyperschedule_sample(model.window_fn(use_cache), x, region, model.annealing, model.sampler_cfg,
                                              (tok.eos_id, tok.pad_id), banned)
            cols.append(stats.columns)
            return out

        res.append(median_seconds(run, 3, warmup=1))
    return res[0], res[1], cols[0], cols[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="2x128,4x256")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", default="32,128", help="sampler steps of the diffusion methods")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-ratios", default="arm,hdlm",
                    help="128-token cache-vs-recompute comparisons to run (comma list of arm, hdlm; empty: none)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    if args.one:
        method, size = args.one.split(":")
        layers, width = map(int, size.split("x"))
        print(json.dumps(one(method, layers, width, args.batch_size, steps, args.repeats)))
        return

    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--one", f"{method}:{size}", "--threads", str(args.threads),
                 "--batch-size", str(args.batch_size), "--steps", args.steps, "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['method']:>9} {r['size']:>6} | {r['params_m']:5.2f}M | train {r['train_step_s'] * 1e3:7.1f} ms/step "
                  f"{r['train_tokens_per_s']:8.0f} tok/s {r['train_gflop']:6.2f} GFLOP MFU {100 * r['mfu']:5.1f} % "
                  f"(peak {r['peak_gflops']:.0f} GFLOP/s) | peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(+{r['peak_rss_mb'] - r['rss_before_mb']:.0f})", flush=True)
            for s in r["sampling"]:
                print(f"{'':>17} sample steps={s['steps']!s:>4}: {s['seq_per_s']:8.1f} seq/s, {s['network_calls']:4d} "
                      f"forwards, {s['step_s'] * 1e3:6.1f} ms/forward-step, outside forward {100 * s['outside_forward']:4.1f} %",
                      flush=True)
    print("\nsampling throughput relative to ARM with KV cache (same size, batch, greedy):")
    for size in args.sizes.split(","):
        arm = next((r for r in rows if r["method"] == "arm" and r["size"] == size), None)
        if arm is None:
            continue
        base = arm["sampling"][0]["seq_per_s"]
        for r in rows:
            if r["size"] != size or r["method"] == "arm":
                continue
            for s in r["sampling"]:
                print(f"  {size:>6} {r['method']:>9} steps={s['steps']!s:>4}: x{s['seq_per_s'] / base:.2f} of ARM ({base:.1f} seq/s)")
    ratios = [r for r in args.cache_ratios.split(",") if r]
    summary: dict = {"rows": rows}
    if "arm" in ratios:
        with_c, without = arm_cache_ratio(128, 40, args.batch_size, 4, 256)
        print(f"\nARM 4x256, 128-token sequences, batch {args.batch_size}: cache {with_c:.2f} s, recompute {without:.2f} s "
              f"-> KV cache x{without / with_c:.2f}")
        summary.update(arm_cache_s=with_c, arm_recompute_s=without)
    if "hdlm" in ratios:
        h_c, h_r, cols_c, cols_r = hdlm_cache_ratio(128, 40, args.batch_size, 4, 256)
        print(f"HDLM 4x256, 128-token sequences, blocks of 4, 4 ticks per block, batch {args.batch_size}: cache "
              f"{h_c:.2f} s ({cols_c} columns run), recompute {h_r:.2f} s ({cols_r} columns) -> KV cache x{h_r / h_c:.2f}")
        summary.update(hdlm_cache_s=h_c, hdlm_recompute_s=h_r, hdlm_cache_columns=cols_c, hdlm_recompute_columns=cols_r)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
