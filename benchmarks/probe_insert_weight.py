"""Does the insertion-rate term drown the token head? FlexMDM on a copy task at two insertion weights.

Task: prompt = 26 random tokens, target = the prompt's last 8 tokens (a pure attention copy). Prints the
masked-token accuracy (training batches, mean of the last 50 steps) every 50 steps for each weight, run
one after the other in this process with the same seed and model size.

Run: ``python benchmarks/probe_insert_weight.py [--steps 300] [--weights 1.0 0.1]``
"""

from __future__ import annotations

import argparse

import torch

from insertion_diffusion.models import FlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer


def copy_batch(batch_size: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = torch.randint(4, 24, (batch_size, 26), generator=gen)
    row = torch.cat([p, torch.full((batch_size, 1), 2), p[:, -8:], torch.full((batch_size, 1), 3)], 1)
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    ids[:, : row.shape[1]] = row
    attn = ids != 0
    fixed = torch.zeros_like(attn)
    fixed[:, :27] = True
    fixed[:, row.shape[1] - 1] = True
    return {"input_ids": ids, "fixed": fixed, "attention_mask": attn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = IntegerTokenizer(20)
    for w in args.weights:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = FlexMDM(tok, 42, backbone=TransformerConfig(2, 64, 4, d_cond=64, dropout=0.0, absolute_positions=True),
                        insert_weight=w)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        accs = []
        for step in range(args.steps):
            loss, logs = model.compute_loss(copy_batch(64, 42, gen), generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            accs.append(float(logs["masked_token_acc"][0]))
            if (step + 1) % 50 == 0:
                print(f"insert_weight={w:<4} step {step + 1:4d}: masked-token accuracy {sum(accs[-50:]) / 50:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
