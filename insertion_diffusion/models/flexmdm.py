"""FlexMDM: variable-length masked diffusion by inserting and filling masks, with uniform order.

Every position shares the same insertion and unmasking schedules (``linear`` by default). The
generator predicts token logits and, per gap, the expected number of missing tokens ``g_j``; the
insertion rate is ``g_j * lambda_in(t)``. See :mod:`insertion_diffusion.losses` for the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from insertion_diffusion.losses import rate_matching_terms
from insertion_diffusion.models.base import INFERENCE_SETTINGS, eval_noise, run_fp32
from insertion_diffusion.models.insertion_base import InsertionModel
from insertion_diffusion.nn.transformer import AdaLNHead, ScalarHead, Transformer, TransformerConfig
from insertion_diffusion.process.insertion import (
    parse_time_sampling,
    partial_state,
    sample_event_times,
    stratified_times,
    training_times,
)
from insertion_diffusion.process.rng import NoiseSource
from insertion_diffusion.sampling.tau_leaping import SamplerConfig
from insertion_diffusion.schedules import make_schedule
from insertion_diffusion.tokenizers import Tokenizer

INSERTION_HEADS = ("expectation", "distribution")


class FlexMDM(InsertionModel):
    """FlexMDM with uniform (shared) insertion and unmasking schedules.

    Args:
        tokenizer: linked from the DataModule.
        max_length: linked from the DataModule.
        backbone: transformer size.
        insertion_schedule: CDF of insertion times: "linear", "cosine" or "poly:<p>".
        unmasking_schedule: CDF of unmasking times (truncated after insertion), same choices.
        insertion_head: "expectation" (predict the expected gap length; Bregman loss) or "distribution"
            (logits over gap lengths 0..max_length; cross-entropy, the rate uses its mean).
        time_eps: training times are stratified over ``[time_eps, 1 - time_eps]``.
        time_sampling: where training times fall: "uniform", or "early:<p>[:<share>]" (a share of the rows,
            default 1/2, at ``u ** (1/p)``, importance-weighted so the objective is unchanged; for early-insertion
            schedules such as ``poly:<p>``, whose first moments uniform times almost never show; see
            :func:`~insertion_diffusion.process.insertion.training_times`).
        insert_weight: weight of the insertion-rate term against the unmasking term (see
            :mod:`insertion_diffusion.losses` for why it is below 1).
        sampler: settings of the tau-leaping sampler used for evaluation and prediction.
        **kwargs: optimiser, evaluation and ``compile`` settings of :class:`GenerativeModule`.
    """

    row_noise = True

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        insertion_schedule: str = "linear",
        unmasking_schedule: str = "linear",
        insertion_head: str = "expectation",
        time_eps: float = 1e-3,
        time_sampling: str = "uniform",
        insert_weight: float = 0.1,
        sampler: SamplerConfig | None = None,
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
        if insertion_head not in INSERTION_HEADS:
            raise ValueError(f"model.insertion_head={insertion_head!r}; allowed values: {', '.join(INSERTION_HEADS)}")
        if not 0.0 <= time_eps < 0.5:
            raise ValueError(f"model.time_eps must be in [0, 0.5), got {time_eps}")
        self.backbone_cfg = backbone or TransformerConfig()
        self.insertion = make_schedule(insertion_schedule, "model.insertion_schedule")
        self.unmasking = make_schedule(unmasking_schedule, "model.unmasking_schedule")
        # Without an explicit sampler (e.g. load_from_checkpoint), integrate hazards where the schedule needs it.
        self.sampler_cfg = sampler or SamplerConfig(integrate_hazard=self.diverging_schedule() is not None)
        self.check_sampler()
        self.insertion_head = insertion_head
        self.time_eps = time_eps
        self.time_early = parse_time_sampling(time_sampling) or (None, 0.5)  # (p, share) for training_times
        if not insert_weight > 0:
            raise ValueError(f"model.insert_weight must be > 0, got {insert_weight}")
        self.insert_weight = insert_weight
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()

        V, cfg = self.tokenizer.vocab_size, self.backbone_cfg
        self.net = Transformer(V, cfg, max_length=self.max_length)
        cond = cfg.d_cond if cfg.time_conditioning else None
        self.token_head = AdaLNHead(cfg.d_model, cond, V)
        if insertion_head == "expectation":
            # softplus(-2) ~ 0.13: start by predicting short gaps, not zero (the loss is log-barrier at 0).
            self.gap_head = ScalarHead(cfg.d_model, cond, bias_init=-2.0)
        else:
            self.gap_head = AdaLNHead(cfg.d_model, cond, self.max_length + 1)

    def diverging_schedule(self) -> str | None:
        for key, sched in (("insertion_schedule", self.insertion), ("unmasking_schedule", self.unmasking)):
            if sched.diverges_at_zero:
                return f"model.{key}={sched.name}"
        return None

    # --- network --------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Run the generator.

        Args:
            x: (B, W) tokens of ``x_t``; t: (B,) times; valid: (B, W) bool.

        Returns:
            ``(logits, gap)``: token logits (B, W, V) and gap predictions, either expected lengths (B, W)
            (expectation head) or logits over lengths (B, W, max_length + 1) (distribution head).
        """
        h, cond = self.net(x, t, valid)
        # The heads run in fp32 under mixed precision: the logits and gap predictions are (parts of) rates.
        logits = run_fp32(self.token_head, h, cond)
        if self.insertion_head == "expectation":
            return logits, F.softplus(run_fp32(self.gap_head, h, cond))
        return logits, run_fp32(self.gap_head, h, cond).float()

    def expected_gap(self, gap_out: Tensor) -> Tensor:
        """Expected gap length (B, W) from the gap head's output."""
        if self.insertion_head == "expectation":
            return gap_out
        k = torch.arange(gap_out.shape[-1], device=gap_out.device, dtype=gap_out.dtype)
        return (gap_out.softmax(-1) * k).sum(-1)

    # --- training -------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The rate-matching loss of a batch, summed and divided by ``B * L``.

        ``generator``: a ``torch.Generator`` (or None), or a :class:`~insertion_diffusion.process.rng.RowRNG`
        over the batch's rows (what training and evaluation pass; see ``GenerativeModule``).
        """
        z1, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B, L = z1.shape
        t, w = training_times(B, self.time_eps, z1.device, generator, *self.time_early)
        t_in, t_um = sample_event_times(z1.shape, self.insertion, self.unmasking, z1.device, generator)
        st = partial_state(z1, fixed, attn, t, t_in, t_um, self.tokenizer.mask_id, self.tokenizer.pad_id)
        logits, gap_out = self(st.x, t, st.valid)
        # Both terms are linear in a common factor of the hazards, so the time weight rides on them.
        lam_in = (self.insertion.hazard(t) * w)[:, None]
        lam_um = (self.unmasking.hazard(t) * w)[:, None]
        allowed = st.valid & (~st.fixed | (st.x == self.tokenizer.eos_id))
        if self.insertion_head == "expectation":
            terms = rate_matching_terms(
                logits, st.target, st.is_mask, lam_um, st.gap * lam_in, gap_out * lam_in, allowed, self.insert_weight
            )
            insert = terms.insert
        else:
            terms = rate_matching_terms(logits, st.target, st.is_mask, lam_um, st.gap, st.gap, allowed)
            ce = F.cross_entropy(gap_out.flatten(0, 1), st.gap.long().clamp_max(self.max_length).flatten(), reduction="none")
            insert = self.insert_weight * (lam_in * ce.view(B, -1) * allowed).sum()
        norm = B * L
        loss = (terms.unmask + insert) / norm
        logs = {
            "loss_unmask": terms.unmask.detach() / norm,
            "loss_insert": insert.detach() / norm,
            "masked_token_acc": (terms.correct / terms.num_masked.clamp_min(1), terms.num_masked),
        }
        return loss, logs

    # --- likelihood -----------------------------------------------------------------------------------
    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """One-sample estimate of the negative ELBO per row (nats), (B,).

        The rate-matching loss with the insertion term at weight 1 is the path-space KL between the
        endpoint-conditioned forward process and the model's CTMC, which bounds ``-log p(x)`` (the
        unmasking Bregman term reduces to the rate-weighted cross-entropy because the model's rates over
        tokens sum to the true total rate). Times are uniform on ``[time_eps, 1 - time_eps]``; the
        ``2 * time_eps`` of the time axis left out is ignored. The noise is keyed by each row's ``index`` and
        ``eval_seed``, so the estimate does not depend on the batch or the number of processes.
        """
        z1, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B = z1.shape[0]
        g = eval_noise(self, batch)
        t = stratified_times(B, self.time_eps, z1.device, g)
        t_in, t_um = sample_event_times(z1.shape, self.insertion, self.unmasking, z1.device, g)
        st = partial_state(z1, fixed, attn, t, t_in, t_um, self.tokenizer.mask_id, self.tokenizer.pad_id)
        logits, gap_out = self(st.x, t, st.valid)
        lam_in = self.insertion.hazard(t)[:, None]
        lam_um = self.unmasking.hazard(t)[:, None]
        allowed = st.valid & (~st.fixed | (st.x == self.tokenizer.eos_id))
        terms = rate_matching_terms(
            logits, st.target, st.is_mask, lam_um, st.gap * lam_in, self.expected_gap(gap_out) * lam_in, allowed, 1.0
        )
        return terms.per_row * (1.0 - 2.0 * self.time_eps)

    # --- sampling -------------------------------------------------------------------------------------
    def rates(self, x: Tensor, t: Tensor, valid: Tensor, t_next: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The sampler's view: (logits, insertion rate per gap, unmasking rate per position).

        With ``t_next`` the rates are integrated over ``[t, t_next]`` (expected events in the step).
        """
        logits, gap_out = self(x, t, valid)
        if t_next is None:
            h_in, h_um = self.insertion.hazard(t), self.unmasking.hazard(t)
        else:
            h_in = self.insertion.cumulative_hazard(t_next) - self.insertion.cumulative_hazard(t)
            h_um = self.unmasking.cumulative_hazard(t_next) - self.unmasking.cumulative_hazard(t)
        insert_rate = self.expected_gap(gap_out) * h_in[:, None]
        unmask_rate = h_um[:, None].expand_as(insert_rate)
        return logits, insert_rate, unmask_rate
