"""ARM: a left-to-right autoregressive baseline on the shared transformer blocks.

Every row gets a start token (``[BOS]``) in front, so an unconditional row ``[target][EOS]`` and a conditional
row ``[prompt][BOS][target][EOS]`` are both modelled as next-token prediction; the loss covers the target
tokens and EOS only (the prompt is given). Sampling is left to right with a key/value cache, greedy or with
temperature / top-k / top-p, stopping per row at EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from insertion_diffusion.models.base import INFERENCE_SETTINGS, GenerativeModule
from insertion_diffusion.nn.transformer import AdaLNHead, Transformer, TransformerConfig, without_time
from insertion_diffusion.process.rng import NoiseSource
from insertion_diffusion.sampling.autoregressive import (
    ARSamplerConfig,
    CachedDecoder,
    RecomputeDecoder,
    autoregressive_decode,
)
from insertion_diffusion.tokenizers import Tokenizer


class ARM(GenerativeModule):
    """Causal transformer trained by next-token prediction on the generated part.

    Args:
        tokenizer: linked from the DataModule.
        max_length: linked from the DataModule (the model handles ``max_length + 1`` positions: start token).
        backbone: transformer size (time conditioning is switched off: there is no time).
        sampler: decoding settings for evaluation and prediction.
        **kwargs: optimiser, evaluation and ``compile`` settings of :class:`GenerativeModule`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        sampler: ARSamplerConfig | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 200,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        eval_seed: int = 0,
        num_logged_samples: int = 8,
        compile: bool = False,
    ) -> None:
        super().__init__(
            tokenizer, max_length, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
            lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, eval_seed=eval_seed,
            num_logged_samples=num_logged_samples, compile=compile,
        )
        self.backbone_cfg = without_time(backbone or TransformerConfig())
        self.sampler_cfg = sampler or ARSamplerConfig()
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()
        V = self.tokenizer.vocab_size
        self.net = Transformer(V, self.backbone_cfg, causal=True, max_length=self.max_length + 1)
        self.lm_head = AdaLNHead(self.backbone_cfg.d_model, None, V)

    # --- network --------------------------------------------------------------------------------------
    def with_start(self, input_ids: Tensor) -> Tensor:
        """(B, L) rows -> (B, L + 1) with the start token in front."""
        start = torch.full_like(input_ids[:, :1], self.tokenizer.bos_id)
        return torch.cat([start, input_ids], dim=1)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Next-token logits (B, W, V) for tokens x (B, W); ``valid`` masks trailing padding keys."""
        h, _ = self.net(x, None, valid)
        return self.lm_head(h, None)

    def _token_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-position NLL (B, L) of each row's tokens, the positions that count (target tokens + EOS) and
        the logits (B, L, V)."""
        ids, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        x = self.with_start(ids)[:, :-1]
        valid = torch.cat([torch.ones_like(attn[:, :1]), attn[:, :-1]], dim=1)
        logits = self(x, valid)
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
        counted = attn & (~fixed | (ids == self.tokenizer.eos_id))
        return nll, counted, logits

    # --- training -------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        nll, counted, logits = self._token_nll(batch)
        B, L = nll.shape
        # Summed over the batch and divided by B * L, as every method in the package (comparable, DDP-exact).
        loss = (nll * counted).sum() / (B * L)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == batch["input_ids"]) & counted).sum()
            acc = correct / counted.sum().clamp_min(1)
        return loss, {"token_acc": (acc, counted.sum())}

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """Exact ``-log p(target, EOS | prompt)`` per row (nats), (B,)."""
        nll, counted, _ = self._token_nll(batch)
        return (nll * counted).sum(1)

    # --- sampling -------------------------------------------------------------------------------------
    def decoder(self, use_cache: bool | None = None):
        """The :class:`Decoder` for sampling (cached by default, per ``sampler.use_cache``)."""
        use_cache = self.sampler_cfg.use_cache if use_cache is None else use_cache
        if not use_cache:
            return RecomputeDecoder(lambda x: self(x))
        ref = next(self.parameters())
        width = self.max_length + 1

        def step(tokens: Tensor, cache: Any, pos: int) -> Tensor:
            return self.lm_head(self.net.forward_cached(tokens, cache, pos), None)

        return CachedDecoder(step, lambda b: self.net.new_cache(b, width, ref.device, ref.dtype))

    @torch.no_grad()
    def sample(
        self, batch: dict[str, Tensor], generator: NoiseSource = None, use_cache: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        ids, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        tok = self.tokenizer
        # The prompt part of a row is its fixed tokens before the first non-fixed or EOS position.
        is_prompt = fixed & attn & (ids != tok.eos_id)
        prompt_len = is_prompt.long().cumprod(1).sum(1)
        x, lengths = autoregressive_decode(
            self.decoder(use_cache), self.with_start(ids), prompt_len + 1, self.max_length + 1, self.sampler_cfg,
            eos_id=tok.eos_id, pad_id=tok.pad_id, banned_ids=(tok.pad_id, tok.mask_id, tok.bos_id),
            generator=generator,
        )
        x = x[:, 1:]
        cols = torch.arange(x.shape[1], device=x.device)[None]
        out_fixed = (cols < prompt_len[:, None]) | ((x == tok.eos_id) & (cols == lengths[:, None] - 2))
        return x, out_fixed

    def sampler_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler_cfg)
