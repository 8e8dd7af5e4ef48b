"""HDLM: hyperschedule diffusion with epsilon-hybrid noise and a KV-cached block sampler (Fathi et al. 2025).

A masked diffusion model whose positions do not share one time: blocks of ``block_size`` columns are annealed one
after another on a common clock (:class:`~insertion_diffusion.process.hyperschedule.BlockAnnealing`). With
``window = 1`` it generates block by block, left to right, denoising inside each block; wider windows overlap
the blocks. Attention is block-causal (a column sees its own block and the blocks before it), so finished blocks
are cached like an autoregressive prefix (:mod:`insertion_diffusion.sampling.hyperschedule`).

Row layout. The generated part of a row is ``[target][EOS][PAD...]`` up to ``max_length``: EOS and the padding
after it are predicted like any token, so the model chooses the length as it goes (an autoregressive model's
stopping rule, a block at a time). The prompt (and BOS) is never noised.

Loss. With ``hybrid_eps = 0`` it is the NELBO of absorbing diffusion with per-position schedules (module
docstring of :mod:`~insertion_diffusion.process.hyperschedule`), SUBS-style: unmasked columns are carried over
and cost nothing. With ``hybrid_eps > 0`` the unmasked columns are corrupted with that probability and the model
also learns to restore them, with the paper's weights ``hybrid_weight * (1 - eps) / F(tau)`` (corrupted) and
``hybrid_weight * eps / F(tau)`` (intact); the masked columns keep their NELBO weight (the paper writes the
discrete-time ``1 / p_mask``). That objective is no longer a bound; ``sequence_nll`` always reports the
absorbing bound (no corruption), which holds for the model used as an absorbing sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from insertion_diffusion.models.base import INFERENCE_SETTINGS, GenerativeModule, eval_noise
from insertion_diffusion.nn.transformer import AdaLNHead, Transformer, TransformerConfig, without_time
from insertion_diffusion.process.hyperschedule import BlockAnnealing, hybrid_noise
from insertion_diffusion.process.insertion import stratified_times
from insertion_diffusion.process.rng import NoiseSource
from insertion_diffusion.sampling.hyperschedule import (
    CachedWindow,
    HDLMSamplerConfig,
    HDLMSampleStats,
    RecomputeWindow,
    hyperschedule_sample,
)
from insertion_diffusion.schedules import make_schedule
from insertion_diffusion.tokenizers import Tokenizer


class HDLM(GenerativeModule):
    """Block-annealed masked diffusion with block-causal attention.

    Training noise (clock, masks, corruption) is per-row (``row_noise``): the same on any number of processes.

    Args:
        tokenizer, max_length: linked from the DataModule.
        backbone: transformer size (time conditioning is switched off: each position's noise level is visible
            from the tokens, and a time-free network is what makes the cache exact).
        block_size: columns per block.
        window: blocks partly noised at once (1 = block-autoregressive).
        unmasking_schedule: CDF ``F`` of a position's clean time within its block's local time.
        hybrid_eps: probability that an unmasked column is corrupted to a random token in training (0: pure
            absorbing noise, the NELBO).
        hybrid_weight: ``lambda``, the weight of the unmasked columns' loss when ``hybrid_eps > 0``.
        time_eps: training clocks are stratified over ``[time_eps, 1 - time_eps]`` of each row's clock range, and
            a block's NELBO weight is capped at its value at local time ``1 - time_eps``.
        sampler: block sampler settings.
        **kwargs: optimiser and evaluation settings of :class:`GenerativeModule`.
    """

    row_noise = True

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        block_size: int = 4,
        window: int = 1,
        unmasking_schedule: str = "linear",
        hybrid_eps: float = 0.0,
        hybrid_weight: float = 1.0,
        time_eps: float = 1e-3,
        sampler: HDLMSamplerConfig | None = None,
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
        if not 0.0 <= hybrid_eps < 1.0:
            raise ValueError(f"model.hybrid_eps={hybrid_eps} must be in [0, 1) (0 = pure absorbing noise)")
        if hybrid_weight < 0.0:
            raise ValueError(f"model.hybrid_weight={hybrid_weight} must be >= 0")
        if not 0.0 <= time_eps < 0.5:
            raise ValueError(f"model.time_eps must be in [0, 0.5), got {time_eps}")
        self.backbone_cfg = without_time(backbone or TransformerConfig())
        self.sampler_cfg = sampler or HDLMSamplerConfig()
        self.annealing = BlockAnnealing(block_size, window, make_schedule(unmasking_schedule, "model.unmasking_schedule"))
        self.hybrid_eps, self.hybrid_weight, self.time_eps = hybrid_eps, hybrid_weight, time_eps
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()
        V = self.tokenizer.vocab_size
        self.net = Transformer(V, self.backbone_cfg, causal=True, max_length=self.max_length, block_size=block_size)
        self.token_head = AdaLNHead(self.backbone_cfg.d_model, None, V)
        self.last_sample_stats = HDLMSampleStats()

    # --- network --------------------------------------------------------------------------------------
    def _banned(self) -> list[int]:
        return [self.tokenizer.mask_id, self.tokenizer.bos_id]

    def forward(self, x: Tensor) -> Tensor:
        """Clean-token logits (B, W, V) of every column (MASK and BOS never predicted), block-causal."""
        h, _ = self.net(x, None, None)
        logits = self.token_head(h, None).float()
        logits[..., self._banned()] = float("-inf")
        return logits

    def layout(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Rows padded with PAD to ``max_length`` and their generated columns: ``(ids, region)``, each (B, W).

        The generated part starts after the prompt (its fixed head, BOS included) and runs to the end of the
        width: target, EOS, then PAD, all predicted."""
        ids, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B, L = ids.shape
        W = self.max_length
        if L > W:
            raise ValueError(f"batch width {L} exceeds the model's max_length {W}")
        tok = self.tokenizer
        head = (fixed & attn & (ids != tok.eos_id)).long().cumprod(1).sum(1)
        out = torch.full((B, W), tok.pad_id, dtype=ids.dtype, device=ids.device)
        out[:, :L] = torch.where(attn, ids, torch.full_like(ids, tok.pad_id))
        region = torch.arange(W, device=ids.device)[None, :] >= head[:, None]
        return out, region

    def _terms(self, batch: dict[str, Tensor], generator: NoiseSource, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row loss sums (B,), the masked and correctly predicted masked counts, and the NELBO part (B,)."""
        ids, region = self.layout(batch)
        B, W = ids.shape
        blocks = self.annealing.blocks(W, ids.device)
        first_col = torch.where(region, torch.arange(W, device=ids.device)[None], torch.full_like(ids, W)).min(1).values
        lo, hi = self.annealing.clock_range(first_col.clamp_max(W - 1) // self.annealing.block_size, W)
        span = hi - lo
        u = lo + stratified_times(B, self.time_eps, ids.device, generator) * span
        clean_prob = self.annealing.clean_prob(u, blocks)
        tok = self.tokenizer
        # Corruption draws EOS and PAD too: a wrongly placed end is the sampler's costliest mistake (it cuts the
        # row), so the model must also learn to spot one.
        candidates = torch.cat([torch.tensor([tok.eos_id, tok.pad_id]), torch.arange(tok.num_special, tok.vocab_size)])
        x, masked, corrupted = hybrid_noise(ids, region, clean_prob, eps, tok.mask_id, candidates, generator)
        logits = self(x)
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, W)
        w_mask = span[:, None] * self.annealing.elbo_weights(u, blocks, tau_max=1.0 - self.time_eps)
        nelbo = (torch.where(masked, w_mask * ce, torch.zeros_like(ce))).sum(1)
        rows = nelbo
        if eps > 0.0:
            kept = region & ~masked
            w_kept = torch.where(corrupted, torch.full_like(ce, 1.0 - eps), torch.full_like(ce, eps))
            w_kept = self.hybrid_weight * w_kept / clean_prob.clamp_min(1e-3)
            rows = rows + torch.where(kept, w_kept * ce, torch.zeros_like(ce)).sum(1)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == ids) & masked).sum()
        return rows, masked.sum(), correct, nelbo

    # --- training -------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, dict[str, Tensor]]:
        eps = self.hybrid_eps if self.training else 0.0
        rows, n_masked, correct, _ = self._terms(batch, generator, eps)
        loss = rows.sum() / rows.shape[0] / self.max_length
        return loss, {"masked_token_acc": (correct / n_masked.clamp_min(1), n_masked)}

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """One-sample absorbing NELBO per row (nats) of ``[target][EOS][PAD...]``, (B,)."""
        return self._terms(batch, eval_noise(self, batch), 0.0)[3] * (1.0 - 2.0 * self.time_eps)

    # --- sampling -------------------------------------------------------------------------------------
    def window_fn(self, use_cache: bool | None = None):
        """The sampler's network access: a :class:`CachedWindow` (default, per ``sampler.use_cache``) or a
        :class:`RecomputeWindow`."""
        use_cache = self.sampler_cfg.use_cache if use_cache is None else use_cache
        if not use_cache:
            return RecomputeWindow(self)
        ref = next(self.parameters())

        def step(tokens: Tensor, cache: Any, pos: int) -> Tensor:
            logits = self.token_head(self.net.forward_cached(tokens, cache, pos), None).float()
            logits[..., self._banned()] = float("-inf")
            return logits

        return CachedWindow(step, lambda b: self.net.new_cache(b, self.max_length, ref.device, ref.dtype))

    @torch.no_grad()
    def sample(
        self, batch: dict[str, Tensor], generator: NoiseSource = None, use_cache: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        ids, region = self.layout(batch)
        tok = self.tokenizer
        x = torch.where(region, torch.full_like(ids, tok.mask_id), ids)
        cfg = self.active_sampler_cfg()
        if cfg.correction_threshold is not None and self.hybrid_eps == 0.0:
            raise ValueError(
                "sampler.correction_threshold needs a model trained with model.hybrid_eps > 0 (this one has 0: "
                "its predictions at unmasked columns were never trained); set it to null"
            )
        x, self.last_sample_stats = hyperschedule_sample(
            self.window_fn(use_cache), x, region, self.annealing, cfg, end_ids=(tok.eos_id, tok.pad_id),
            banned_ids=self._banned(), generator=generator,
        )
        fixed = ~region | (x == tok.eos_id)
        return x, fixed

    def sampler_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler_cfg)
