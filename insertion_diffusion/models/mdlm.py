"""MDLM: fixed-length absorbing-state masked diffusion (the "MDM" baseline), SUBS parameterisation.

Time convention as everywhere in the package: ``t = 0`` all generated positions masked, ``t = 1`` clean; a
position is clean at ``t`` with probability ``F(t)`` (``unmasking_schedule``). The continuous-time NELBO is

    E_t [ sum_{i masked in z_t} h(t) * (-log p_theta(x_i | z_t)) ],     h = F' / (1 - F)

(for ``F(t) = t``, ``h = 1/(1-t)``: MDLM's ``1/t`` weight in its reversed time). SUBS: the model never predicts
``[MASK]`` or another special token, and unmasked positions are carried over unchanged.

Length. The row layout is ``[prompt][BOS][target][EOS][PAD...]``; only target positions are ever masked, EOS
and PAD are never predicted, and attention ignores PAD, so the model never learns to emit padding. The number of
target tokens is therefore chosen before sampling: drawn from the target-length distribution counted on the
training batches (kept in the checkpoint). ``sequence_nll`` adds that length's ``-log P(n)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from insertion_diffusion.models.base import INFERENCE_SETTINGS, GenerativeModule, eval_noise
from insertion_diffusion.nn.transformer import AdaLNHead, Transformer, TransformerConfig
from insertion_diffusion.process.insertion import stratified_times
from insertion_diffusion.process.rng import NoiseSource, categorical, uniform
from insertion_diffusion.sampling.ancestral import MDLMSamplerConfig, SampleStats, ancestral_sample
from insertion_diffusion.schedules import make_schedule
from insertion_diffusion.tokenizers import Tokenizer


class MDLM(GenerativeModule):
    """Masked diffusion over a fixed-length canvas with the length drawn from the data.

    Training noise (times and masks) is per-row (``row_noise``): the same on any number of processes and on
    resume.

    Args:
        tokenizer, max_length: linked from the DataModule.
        backbone: transformer size. ``time_conditioning`` defaults to off (SUBS needs no time input, and a
            time-free network lets the sampler skip steps that changed nothing).
        unmasking_schedule: CDF ``F`` of the time a position becomes clean: "linear", "cosine", "poly:<p>".
        time_eps: training times are stratified over ``[time_eps, 1 - time_eps]``.
        sampler: ancestral sampler settings.
        **kwargs: optimiser and evaluation settings of :class:`GenerativeModule`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        unmasking_schedule: str = "linear",
        time_eps: float = 1e-3,
        sampler: MDLMSamplerConfig | None = None,
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
        if not 0.0 <= time_eps < 0.5:
            raise ValueError(f"model.time_eps must be in [0, 0.5), got {time_eps}")
        self.backbone_cfg = backbone or TransformerConfig(time_conditioning=False)
        self.sampler_cfg = sampler or MDLMSamplerConfig()
        self.schedule = make_schedule(unmasking_schedule, "model.unmasking_schedule")
        self.time_eps = time_eps
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()
        V, cfg = self.tokenizer.vocab_size, self.backbone_cfg
        self.net = Transformer(V, cfg, max_length=self.max_length)
        self.token_head = AdaLNHead(cfg.d_model, cfg.d_cond if cfg.time_conditioning else None, V)
        # Target-length histogram of the training rows (counted as batches stream by, summed over processes;
        # saved with the weights). Float, so that weight averaging (EMA) of buffers keeps it a histogram.
        self.register_buffer("length_counts", torch.zeros(self.max_length + 1))
        self.last_sample_stats = SampleStats()

    # --- network --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, valid: Tensor) -> Tensor:
        """SUBS logits (B, W, V): special tokens get ``-inf``, so the prediction is a clean task token."""
        h, cond = self.net(x, t, valid)
        logits = self.token_head(h, cond).float()
        logits[..., : self.tokenizer.num_special] = float("-inf")
        return logits

    def _target_positions(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["attention_mask"] & ~batch["fixed"]

    row_noise = True

    def _masked_terms(self, batch: dict[str, Tensor], generator: NoiseSource) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Noise a batch at stratified times; return per-row weighted CE sums (B,), masked counts (B,),
        the number of correct argmax predictions at masked positions and the mask."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0]
        target = self._target_positions(batch)
        t = stratified_times(B, self.time_eps, ids.device, generator)
        u = uniform(ids.shape, generator, ids.device, "mask")
        masked = target & (u >= self.schedule.cdf(t)[:, None])
        x = torch.where(masked, torch.full_like(ids, self.tokenizer.mask_id), ids)
        logits = self(x, t, attn)
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
        ce = torch.where(masked, ce, torch.zeros_like(ce))  # SUBS carry-over: unmasked positions cost nothing
        w = self.schedule.hazard(t)[:, None]
        rows = (w * ce).sum(1)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == ids) & masked).sum()
        return rows, masked.sum(1), correct, masked

    # --- training -------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, dict[str, Tensor]]:
        if self.training:
            self.count_lengths(batch)
        rows, n_masked, correct, _ = self._masked_terms(batch, generator)
        B, L = batch["input_ids"].shape
        loss = rows.sum() / (B * L)
        return loss, {"masked_token_acc": (correct / n_masked.sum().clamp_min(1), n_masked.sum())}

    @torch.no_grad()
    def count_lengths(self, batch: dict[str, Tensor]) -> None:
        """Add the batch's target lengths to ``length_counts``, summed over all processes (DDP copies rank 0's
        buffers to the others before each forward, so a per-process count would keep rank 0's rows only)."""
        lengths = self._target_positions(batch).sum(1)
        counts = torch.bincount(lengths, minlength=self.max_length + 1)[: self.max_length + 1].float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.length_counts += counts

    def length_log_probs(self) -> Tensor:
        """log P(n) over target lengths ``0..max_length`` (uniform before any data). A pseudo-count of 1e-3
        per length keeps unseen lengths finite in ``sequence_nll`` (and practically never sampled)."""
        counts = self.length_counts.float()
        if counts.sum() == 0:
            counts = torch.ones_like(counts)
        counts = counts + 1e-3
        return torch.log(counts / counts.sum())

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """One-sample NELBO per row (nats), (B,), plus the length's ``-log P(n)``."""
        rows, _, _, _ = self._masked_terms(batch, eval_noise(self, batch))
        lengths = self._target_positions(batch).sum(1)
        return rows * (1.0 - 2.0 * self.time_eps) - self.length_log_probs()[lengths]

    # --- sampling -------------------------------------------------------------------------------------
    def start_canvas(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``[prompt][BOS] n*[MASK] [EOS] [PAD...]`` with ``n`` drawn from the length distribution.

        Returns ``(x, masked, fixed)``, each (B, max_length).
        """
        ids, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        tok = self.tokenizer
        B, W = ids.shape[0], self.max_length
        is_prompt = fixed & attn & (ids != tok.eos_id)
        plen = is_prompt.long().cumprod(1).sum(1)
        probs = self.length_log_probs().exp()
        n = categorical(probs.expand(B, -1), generator, "length")
        n = torch.minimum(n, W - 1 - plen)  # room for EOS
        cols = torch.arange(W, device=ids.device)[None]
        prompt_part = torch.zeros(B, W, dtype=torch.long, device=ids.device)
        prompt_part[:, : ids.shape[1]] = ids[:, :W]
        in_prompt = cols < plen[:, None]
        masked = (cols >= plen[:, None]) & (cols < (plen + n)[:, None])
        eos = cols == (plen + n)[:, None]
        x = torch.full((B, W), tok.pad_id, dtype=torch.long, device=ids.device)
        x = torch.where(in_prompt, prompt_part, x)
        x = torch.where(masked, torch.full_like(x, tok.mask_id), x)
        x = torch.where(eos, torch.full_like(x, tok.eos_id), x)
        return x, masked, in_prompt | eos

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, Tensor]:
        x, masked, fixed = self.start_canvas(batch, generator)
        valid = x != self.tokenizer.pad_id
        x, self.last_sample_stats = ancestral_sample(
            lambda z, t: self(z, t, valid), x, masked, self.schedule, self.active_sampler_cfg(), generator=generator,
            time_dependent=self.backbone_cfg.time_conditioning,
        )
        return x, fixed

    def sampler_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler_cfg)
