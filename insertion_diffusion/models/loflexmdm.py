"""LoFlexMDM: FlexMDM whose per-token insertion/unmasking clocks come from a trainable order network.

The order network ``phi`` reads the clean sequence and gives every position Kumaraswamy clock rates
``b_in[i]`` (and ``b_um[i]``, fixed to 1 by default) with a shared shape ``a``. Partial states are drawn
from those clocks in closed form, the generator is trained by rate matching against the implied target
rates, and ``phi`` is trained jointly on the same loss through (i) the pathwise gradient of the targets,
(ii) a two-sample leave-one-out REINFORCE term and (iii) schedule regularisers::

    J = (L1 + L2) / 2 + sg(L1 - L2) (log p(z1_t | x) - log p(z2_t | x)) / 2 + sum_k w_k R_k

Both partial states of a row go through the generator in ONE batched forward.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from insertion_diffusion.losses import bregman_rate, rate_matching_terms
from insertion_diffusion.metrics.order import rowwise_pearson
from insertion_diffusion.models.base import INFERENCE_SETTINGS, eval_noise, run_fp32
from insertion_diffusion.models.insertion_base import InsertionModel
from insertion_diffusion.nn.transformer import AdaLNHead, ScalarHead, Transformer, TransformerConfig
from insertion_diffusion.order.kumaraswamy import KumaraswamyClock, schedule_regularizers
from insertion_diffusion.order.network import RATE_FNS, BoundedRate, OrderNetwork
from insertion_diffusion.process.insertion import (
    CLEAN,
    DELETED,
    MASKED,
    parse_time_sampling,
    partial_state,
    stratified_times,
    training_times,
)
from insertion_diffusion.process.rng import NoiseSource, RowRNG
from insertion_diffusion.sampling.tau_leaping import SamplerConfig
from insertion_diffusion.tokenizers import Tokenizer

ADVANTAGE_NORMALIZATIONS = ("per_mask", "per_mask_time", "per_token")
REG_FRAMES = ("relative", "absolute")


class LoFlexMDM(InsertionModel):
    """Insertion model with learnable order dynamics.

    Args:
        tokenizer, max_length: linked from the DataModule.
        backbone: generator size.
        order_backbone: order-network size (default: 2 layers at the generator's width).
        a: shared Kumaraswamy shape (> 0). ``a = 1`` with ``b = 1`` is FlexMDM's linear schedule.
        learn_b_um: learn per-token unmasking rates too (less stable); default: ``b_um = 1``.
        shared_backbone: the order network reuses the generator's transformer (own rate heads only).
        order_b_min, order_b_max: bounds of the order network's rates (``b >= 1`` never delays insertion
            beyond the order-free schedule ``F(t; a, 1)``, leaving time to unmask).
        order_rate_fn: "softplus" or "exp" squashing of the order rates.
        generator_b_min, generator_b_max: bounds of the generator's predicted rate multipliers. A gap's target is
            the sum of its deleted tokens' ``b_in``: near ``t = 0`` the EOS gap of a long row holds every noisy token,
            so the target reaches ``(max_length - 1) * order_b_min`` and beyond. The default ``generator_b_max``
            (None) is therefore ``max_length * order_b_max``, the largest target any gap can have; a fixed cap
            below it (100 before the tenth session) clips the insertion rate of long rows where its gradient is 0.
        order_time_conditioning: the order network also sees ``t`` (rates ``b(z1, t)``).
        reinforce_weight: weight of the REINFORCE term.
        pathwise: let the order network also get the pathwise gradient through the target rates.
        reg_mixture, reg_endpoint, reg_kl: weights of the three schedule regularisers.
        reg_frame: what the regularisers pull towards. "relative" (default): the order-free schedule
            ``F(t; a, 1)``; the terms are computed on the clock ``s = t^a``, where every token's law is
            Kumaraswamy(1, b), so they are zero at ``b = 1`` for every ``a`` and only the per-token departures
            are penalised. "absolute": the uniform law in ``t`` itself (method.md 6.3 read literally); with
            ``a != 1`` no ``b`` makes them zero and they push every ``b`` to a bound (measured: ``a = 0.25``
            sent every ``b_in`` to ``order_b_min`` within 100 steps). The two agree at ``a = 1``, the paper's
            setting. In the relative frame the endpoint windows are in ``s``: ``t < eps^(1/a)`` and
            ``t > (1 - eps)^(1/a)``. Its zero, ``b = 1``, lies just below the default ``order_b_min = 1.01``, so
            it still pulls rates towards the floor, weakly. Checkpoints saved before ``reg_frame`` existed
            (eleventh session) with ``a != 1`` were trained with "absolute"; set it to resume them unchanged.
        order_lr: learning rate of the order network (default: ``lr``).
        time_eps: training times are stratified over ``[time_eps, 1 - time_eps]``.
        time_sampling: where training times fall: "uniform", or "early:<p>[:<share>]" (a share of the rows,
            default 1/2, at ``u ** (1/p)``, importance-weighted so the objective is unchanged; for ``a < 1``, whose
            first moments uniform times almost never show; see :func:`~insertion_diffusion.process.insertion.training_times`).
        insert_weight: weight of the insertion-rate term in the generator's loss (as in FlexMDM).
        order_insert_weight: weight of the insertion term in what the order network optimises: its pathwise
            gradient through the target rates and its REINFORCE reward. method.md trains ``phi`` on
            ``L_um / |M| + L_in / L`` (weight 1); the default (None) ties it to ``insert_weight``, which is what
            every run recorded in docs/results.md used. The generator's gradient and the loss value do not
            depend on it.
        generator_states: how many of the two partial states per row train the generator. 2 (the method):
            both, in one batched forward of 2B rows. 1: only the first; the second runs through the generator
            without autograd and serves the REINFORCE baseline and the order network's pathwise gradient. This
            halves the generator's backward pass (LoFlexMDM / FlexMDM step time measured 1.92x instead of
            2.58x, see docs/loflexmdm.md) at the price of a noisier generator gradient (one partial state per row,
            as FlexMDM has). Under AdamW the generator's gradient, halved by the ``(L1 + L2) / 2`` average,
            needs no rescaling.
        advantage_normalization: how a partial state's loss is normalised into the REINFORCE reward:
            "per_mask" (unmasking term / number of masks + insertion term / L; the default), "per_mask_time"
            (the same divided by ``h_a(t)``, which removes the ``1/(1-t)`` scale from the estimator) or
            "per_token" (both / L, as the generator's loss). See :meth:`difficulty`.
        sampler: tau-leaping settings for evaluation and prediction.
        **optimiser, evaluation and compile settings**: as :class:`~insertion_diffusion.models.base.GenerativeModule`.
    """

    row_noise = True
    nonfinite_hint = "lower model.order_lr / model.lr or raise the regulariser weights (model.reg_*)"

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        order_backbone: TransformerConfig | None = None,
        a: float = 1.0,
        learn_b_um: bool = False,
        shared_backbone: bool = False,
        order_b_min: float = 1.01,
        order_b_max: float = 100.0,
        order_rate_fn: str = "softplus",
        generator_b_min: float = 0.0,
        generator_b_max: float | None = None,
        order_time_conditioning: bool = False,
        reinforce_weight: float = 1.0,
        pathwise: bool = True,
        reg_mixture: float = 1.0,
        reg_endpoint: float = 1.0,
        reg_kl: float = 1.0,
        reg_frame: str = "relative",
        order_lr: float | None = None,
        time_eps: float = 1e-3,
        time_sampling: str = "uniform",
        insert_weight: float = 0.1,
        order_insert_weight: float | None = None,
        advantage_normalization: str = "per_mask",
        generator_states: int = 2,
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
        if not a > 0:
            raise ValueError(f"model.a must be > 0, got {a}")
        if generator_b_max is None:
            generator_b_max = float(max_length) * order_b_max
        for name, lo, hi in (("order", order_b_min, order_b_max), ("generator", generator_b_min, generator_b_max)):
            if not 0.0 <= lo < hi:
                raise ValueError(
                    f"model.{name}_b_min={lo} and model.{name}_b_max={hi} must satisfy 0 <= b_min < b_max"
                )
        if not 0.0 <= time_eps < 0.5:
            raise ValueError(f"model.time_eps must be in [0, 0.5), got {time_eps}")
        # Checked here rather than left to BoundedRate, which cannot know the config key it came from.
        if order_rate_fn not in RATE_FNS:
            raise ValueError(f"model.order_rate_fn={order_rate_fn!r} is not one of: {', '.join(RATE_FNS)}")
        self.backbone_cfg = backbone or TransformerConfig()
        cfg = self.backbone_cfg
        self.order_cfg = order_backbone or TransformerConfig(
            num_layers=2, d_model=cfg.d_model, num_heads=cfg.num_heads, d_cond=cfg.d_cond, dropout=cfg.dropout,
            time_conditioning=order_time_conditioning, absolute_positions=cfg.absolute_positions,
        )
        if order_backbone is not None and order_backbone.time_conditioning != order_time_conditioning:
            self.order_cfg = TransformerConfig(**{**vars(order_backbone), "time_conditioning": order_time_conditioning})
        self.clock = KumaraswamyClock(a)
        self.sampler_cfg = sampler or SamplerConfig(integrate_hazard=self.diverging_schedule() is not None)
        self.check_sampler()
        self.learn_b_um = learn_b_um
        self.order_time_conditioning = order_time_conditioning
        self.reinforce_weight, self.pathwise = reinforce_weight, pathwise
        self.reg_weights = {"mixture": reg_mixture, "endpoint": reg_endpoint, "kl": reg_kl}
        if reg_frame not in REG_FRAMES:
            raise ValueError(f"model.reg_frame={reg_frame!r}; allowed values: {', '.join(REG_FRAMES)}")
        self.reg_frame = reg_frame
        # On the clock s = t^a the schedule F(t; a, b) = 1 - (1 - s)^b is Kumaraswamy(1, b): regularising there
        # measures only the order network's departure from the shared shape.
        self.reg_clock = KumaraswamyClock(1.0) if reg_frame == "relative" else self.clock
        self.order_lr = order_lr
        self.time_eps = time_eps
        self.time_early = parse_time_sampling(time_sampling) or (None, 0.5)  # (p, share) for training_times
        if not insert_weight > 0:
            raise ValueError(f"model.insert_weight must be > 0, got {insert_weight}")
        self.insert_weight = insert_weight
        if order_insert_weight is not None and not order_insert_weight > 0:
            raise ValueError(f"model.order_insert_weight must be > 0 (or null: model.insert_weight), got {order_insert_weight}")
        self.order_insert_weight = insert_weight if order_insert_weight is None else float(order_insert_weight)
        if advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"model.advantage_normalization={advantage_normalization!r}; allowed values: "
                f"{', '.join(ADVANTAGE_NORMALIZATIONS)}"
            )
        self.advantage_normalization = advantage_normalization
        if generator_states not in (1, 2):
            raise ValueError(f"model.generator_states={generator_states!r}; allowed values: 1, 2")
        self.generator_states = generator_states
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()

        V = self.tokenizer.vocab_size
        cond = cfg.d_cond if cfg.time_conditioning else None
        self.net = Transformer(V, cfg, max_length=self.max_length)
        self.token_head = AdaLNHead(cfg.d_model, cond, V)
        self.gap_head = ScalarHead(cfg.d_model, cond, bias_init=-2.0)
        self.um_head = ScalarHead(cfg.d_model, cond) if learn_b_um else None
        self.gen_bound = BoundedRate(generator_b_min, generator_b_max, "softplus")
        self.order = OrderNetwork(
            V, self.order_cfg, order_b_min, order_b_max, order_rate_fn, learn_b_um,
            backbone=self.net if shared_backbone else None, time_conditioning=order_time_conditioning,
            max_length=self.max_length,
        )
        self._order_rows: list[Tensor] = []

    def diverging_schedule(self) -> str | None:
        return f"model.a={self.clock.a:g} (< 1)" if self.clock.a < 1.0 else None

    # --- networks -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Generator: token logits (B, W, V), insertion rate multipliers ``b_in`` (B, W), and ``b_um`` (B, W)
        when learned (else None): the rates are ``b * h_a(t)``."""
        h, cond = self.net(x, t, valid)
        # The heads run in fp32 under mixed precision: logits and rate multipliers define the rates.
        logits = run_fp32(self.token_head, h, cond)
        b_in = self.gen_bound(run_fp32(self.gap_head, h, cond))
        b_um = self.gen_bound(run_fp32(self.um_head, h, cond)) if self.um_head is not None else None
        return logits, b_in, b_um

    def order_rates(self, batch: dict[str, Tensor], t: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The order network's ``(b_in, b_um)`` (B, L) for clean rows (``b_um`` = 1 unless learned)."""
        z1, attn = batch["input_ids"], batch["attention_mask"]
        b_in, b_um = self.order(z1, attn, t if self.order_time_conditioning else None)
        # Under DDP training a non-finite rate makes the loss non-finite and the base stops every process together
        # before the update (raising here, on one process only, would leave the others waiting).
        if self.raise_nonfinite_here() and not (
            torch.isfinite(b_in).all() and (b_um is None or torch.isfinite(b_um).all())
        ):
            raise FloatingPointError(
                "the order network produced a non-finite rate (NaN/inf); training stopped — the last saved "
                "checkpoint is untouched; lower model.order_lr / model.lr or raise regulariser weights"
            )
        return b_in, (b_um if b_um is not None else torch.ones_like(b_in))

    # --- loss -----------------------------------------------------------------------------------------
    def state_terms(
        self, st, t: Tensor, b_in: Tensor, b_um: Tensor, logits: Tensor, g_in: Tensor, g_um: Tensor | None,
        insert_weight: float | None = None, target_insert_weight: float | None = None,
    ):
        """Per-row rate-matching loss of partial states ``st`` given clock rates ``b_in``, ``b_um`` (B, L).

        Target rates: a gap's insertion rate is the sum of its deleted tokens' hazards ``b_in h_a(t)``; a
        mask's unmasking rate is ``b_um h_a(t)`` of its source token. Returns ``(LossTerms, per_row)``.

        ``target_insert_weight``: the insertion term's weight in the gradient through the *targets* (that is,
        to the order network), when it differs from ``insert_weight`` (the weight of the value and of the
        gradient to the generator's prediction). A term of value 0 carries the difference.
        """
        h = self.clock.h(t)[:, None]
        target_in = st.gap_sums(b_in * h)
        target_um = torch.gather(b_um, 1, st.src) * h
        allowed = st.valid & (~st.fixed | (st.x == self.tokenizer.eos_id))
        w = self.insert_weight if insert_weight is None else insert_weight
        terms = rate_matching_terms(logits, st.target, st.is_mask, target_um, target_in, g_in * h, allowed, w)
        per_row = terms.per_row
        if target_insert_weight is not None and target_insert_weight != w and target_in.requires_grad:
            # d/d(target) of (w_t - w) * D(target, sg(pred)), with its value subtracted: only the gradient remains
            through_target = (bregman_rate(target_in, (g_in * h).detach()) * allowed.float()).sum(1)
            per_row = per_row + (target_insert_weight - w) * (through_target - through_target.detach())
        if g_um is not None:
            um_breg = (bregman_rate(target_um, g_um * h) * st.is_mask).sum(1)
            per_row = per_row + um_breg
            terms.unmask_rows = terms.unmask_rows + um_breg
        return terms, per_row

    def difficulty(self, terms, L: int, t: Tensor | None = None) -> Tensor:
        """Per-row loss used as the REINFORCE reward (lower = easier partial state), (2B,).

        ``per_mask`` (default, as in the method): the unmasking term averaged over the row's masks plus the
        insertion term over ``L``. Summing over masks instead (``per_token``) rewards states with FEWER
        masks, i.e. later insertion, and drives every ``b_in`` to ``order_b_min`` (observed: within ~250
        steps on star-medium). The insertion term enters at ``order_insert_weight``.
        """
        insert_rows = terms.insert_rows * (self.order_insert_weight / self.insert_weight)
        if self.advantage_normalization == "per_token":
            return (terms.unmask_rows + insert_rows) / L
        reward = terms.unmask_rows / terms.masked_rows.clamp_min(1) + insert_rows / L
        if self.advantage_normalization == "per_mask_time" and t is not None:
            # Both states of a row share t: dividing by h_a(t) rescales rows, never flips a comparison, and
            # removes the 1/(1-t) blow-up that dominates the estimator's variance near t = 1.
            reward = reward / self.clock.h(t)
        return reward

    def state_log_prob(self, st, t: Tensor, b_in: Tensor, b_um: Tensor, noisy: Tensor) -> Tensor:
        """``log p_phi(z_t | z1)`` per row (B,): closed-form state log-probabilities summed over noisy tokens."""
        log_d, log_m, log_c = self.clock.log_state_probs(t[:, None], b_in, b_um)
        lp = torch.where(st.state == DELETED, log_d, torch.where(st.state == MASKED, log_m, log_c))
        return (lp * noisy.float()).sum(1)

    def generator_outputs(self, st, t2: Tensor, B: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Generator outputs for the 2B partial states (first states, then second states).

        With ``generator_states=2`` one batched forward with autograd; with 1 the second half runs under
        ``no_grad``: its outputs are constants, so the order network still gets the pathwise gradient of both
        states (through the target rates) while the generator's backward covers only B rows.
        """
        if self.generator_states == 2:
            return self(st.x, t2, st.valid)
        first = self(st.x[:B], t2[:B], st.valid[:B])
        with torch.no_grad():
            second = self(st.x[B:], t2[B:], st.valid[B:])
        return tuple(None if a is None else torch.cat([a, b]) for a, b in zip(first, second))

    def compute_loss(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The joint objective ``J`` of a batch (generator loss, REINFORCE, regularisers).

        ``generator``: a ``torch.Generator`` (or None), or a :class:`~insertion_diffusion.process.rng.RowRNG`
        over the batch's rows (what training and evaluation pass). Every term is a mean over rows with the fixed
        normaliser ``L``, so the DDP gradient mean over equal per-process batches is the global-batch gradient.
        """
        z1, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B, L = z1.shape
        noisy = attn & ~fixed
        t, w = training_times(B, self.time_eps, z1.device, generator, *self.time_early)
        # the two partial states of a row draw independent noise (and share the row's time)
        state_noise = generator.repeat(2) if isinstance(generator, RowRNG) else generator
        b_in, b_um = self.order_rates(batch, t)

        # Two independent partial states per row, through the generator as one batch of 2B rows.
        t2, z2, f2, a2, n2 = t.repeat(2), z1.repeat(2, 1), fixed.repeat(2, 1), attn.repeat(2, 1), noisy.repeat(2, 1)
        b_in2, b_um2 = b_in.repeat(2, 1), b_um.repeat(2, 1)
        t_in, t_um = self.clock.sample_times(b_in2.masked_fill(~n2, 1.0), b_um2.masked_fill(~n2, 1.0), state_noise)
        st = partial_state(z2, f2, a2, t2, t_in, t_um, self.tokenizer.mask_id, self.tokenizer.pad_id)
        logits, g_in, g_um = self.generator_outputs(st, t2, B)
        tb_in = b_in2 if self.pathwise else b_in2.detach()
        tb_um = b_um2 if self.pathwise else b_um2.detach()
        terms, per_row = self.state_terms(st, t2, tb_in, tb_um, logits, g_in, g_um,
                                          target_insert_weight=self.order_insert_weight)
        per_row = per_row * w.repeat(2) / L  # the time weight (1 under uniform times) of each row's states
        loss_1, loss_2 = per_row[:B], per_row[B:]
        gen_loss = 0.5 * (loss_1 + loss_2).mean()

        logp = self.state_log_prob(st, t2, b_in2.masked_fill(~n2, 1.0), b_um2.masked_fill(~n2, 1.0), n2)
        diff = self.difficulty(terms, L, t2).detach()
        adv = (diff[:B] - diff[B:]) * w
        dlogp = logp[:B] - logp[B:]
        reinforce = 0.5 * (adv * dlogp).mean()

        regs = schedule_regularizers(self.reg_clock, b_in, noisy, generator=generator)
        if self.learn_b_um:
            regs_um = schedule_regularizers(self.reg_clock, b_um, noisy, generator=generator, stream="reg_grid_um")
            regs = {k: v + u for (k, v), u in zip(regs.items(), regs_um.values())}
        reg = sum(self.reg_weights[k] * v for k, v in regs.items())
        loss = gen_loss + self.reinforce_weight * reinforce + reg

        with torch.no_grad():
            bsel = b_in[noisy]
            logs = {
                "loss_generator": gen_loss.detach(),
                "loss_unmask": terms.unmask.detach() / (2 * B * L),
                "loss_insert": terms.insert.detach() / (2 * B * L),
                "reinforce": reinforce.detach(),
                "adv_abs_mean": adv.abs().mean(),
                "adv_abs_max": adv.abs().max(),
                "dlogp_abs_mean": dlogp.detach().abs().mean(),
                "dlogp_abs_max": dlogp.detach().abs().max(),
                "masked_token_acc": (terms.correct / terms.num_masked.clamp_min(1), terms.num_masked),
                "b_in_mean": bsel.mean() if bsel.numel() else torch.zeros(()),
                "b_in_std": bsel.std() if bsel.numel() > 1 else torch.zeros(()),
                **{f"reg_{k}": v.detach() for k, v in regs.items()},
            }
        if self.raise_nonfinite_here() and not torch.isfinite(loss):
            raise FloatingPointError(
                f"LoFlexMDM loss is not finite ({float(loss.detach())}); training stopped — the last saved checkpoint is "
                "untouched; lower model.lr / model.order_lr"
            )
        return loss, logs

    # --- likelihood -----------------------------------------------------------------------------------
    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """One-sample negative-ELBO estimate per row (nats), (B,), under the order network's forward process.

        Any endpoint-conditioned forward process gives a bound: the path-space KL to the model's CTMC, i.e.
        the generator's rate-matching loss with the insertion term at weight 1 (see FlexMDM.sequence_nll).
        """
        z1, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B = z1.shape[0]
        noisy = attn & ~fixed
        g = eval_noise(self, batch)
        t = stratified_times(B, self.time_eps, z1.device, g)
        b_in, b_um = self.order_rates(batch, t)
        t_in, t_um = self.clock.sample_times(b_in.masked_fill(~noisy, 1.0), b_um.masked_fill(~noisy, 1.0), g)
        st = partial_state(z1, fixed, attn, t, t_in, t_um, self.tokenizer.mask_id, self.tokenizer.pad_id)
        logits, g_in, g_um = self(st.x, t, st.valid)
        _, per_row = self.state_terms(st, t, b_in, b_um, logits, g_in, g_um, insert_weight=1.0)
        return per_row * (1.0 - 2.0 * self.time_eps)

    # --- sampling -------------------------------------------------------------------------------------
    def rates(self, x: Tensor, t: Tensor, valid: Tensor, t_next: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The sampler's view: ``b * h_a(t)`` per position, or with ``t_next`` the rates integrated over the
        step, ``b * (U(t_next) - U(t))`` (``U`` the clock's time change)."""
        logits, g_in, g_um = self(x, t, valid)
        if t_next is None:
            h = self.clock.h(t)[:, None]
        else:
            h = (self.clock.time_change(t_next) - self.clock.time_change(t))[:, None]
        unmask = (g_um if g_um is not None else torch.ones_like(g_in)) * h
        return logits, g_in * h, unmask

    # --- optimiser: a separate group (and learning rate) for the order network -------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        conf = super().configure_optimizers()
        opt = conf["optimizer"]
        order_ids = {id(p) for n, p in self.named_parameters() if n.startswith("order.") and not n.startswith("order.net.")}
        if not self.order.shared:
            order_ids |= {id(p) for p in self.order.net.parameters()}
        groups = []
        for g in opt.param_groups:
            gen = [p for p in g["params"] if id(p) not in order_ids]
            ord_ = [p for p in g["params"] if id(p) in order_ids]
            groups.append({**g, "params": gen})
            groups.append({**g, "params": ord_, "lr": self.order_lr or self.lr, "initial_lr": self.order_lr or self.lr})
        new_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        sched = conf["lr_scheduler"]["scheduler"]
        conf["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(new_opt, sched.lr_lambdas[0])
        conf["optimizer"] = new_opt
        return conf

    # --- order diagnostics ----------------------------------------------------------------------------
    def _eval_rows(self, batch: dict[str, Tensor], batch_idx: int, stage: str, padding_only: bool = False) -> None:
        super()._eval_rows(batch, batch_idx, stage, padding_only)
        if padding_only:
            self._eval_log(f"{stage}/order_corr_phi", 0.0, 0, padding_only)
            return
        with torch.no_grad():
            b_in, _ = self.order_rates(batch, torch.full((batch["input_ids"].shape[0],), 0.5, device=self.device))
            gen = batch["attention_mask"] & ~batch["fixed"]
            e_t = self.clock.expected_time(b_in)
            pos = gen.long().cumsum(1).float()
            corr, ok = rowwise_pearson(pos, e_t, gen)
            self._eval_log(f"{stage}/order_corr_phi", corr[ok].mean() if ok.any() else torch.zeros((), device=self.device),
                           int(ok.sum().clamp_min(1)))
            if batch_idx == 0:
                self._order_rows = [e_t.cpu(), gen.cpu(), b_in.cpu()]

    def _eval_epoch_end(self, stage: str) -> None:
        if self._order_rows and self.logger is not None and hasattr(self.logger.experiment, "add_figure"):
            e_t, gen, b_in = self._order_rows
            self.logger.experiment.add_histogram(f"{stage}/b_in", b_in[gen], self.global_step)
            self.logger.experiment.add_figure(f"{stage}/learned_order", order_figure(e_t, gen), self.global_step)
        self._order_rows = []
        super()._eval_epoch_end(stage)


def distance_from_goal(generated: Tensor) -> Tensor:
    """How many generated tokens follow each position of its row's generated part, (B, L) long.

    0 marks the last generated token (just before EOS: the goal of a star path), 1 the one before it, and so
    on; positions outside the generated part get -1. Counting from the end lines up rows whose generated
    parts have different lengths (star medium/hard) at the goal, where the order of interest is anchored.

    Args:
        generated: (B, L) bool, the positions the model generates (``attention_mask & ~fixed``).
    """
    after = generated.long().flip(1).cumsum(1).flip(1) - 1  # generated tokens at or after i, minus i itself
    return after.masked_fill(~generated, -1)


def mean_time_by_distance(expected_time: Tensor, generated: Tensor) -> Tensor:
    """Mean expected insertion time at each distance from the goal, (n,), ``n`` the longest generated part.

    Entry ``d`` averages over the rows whose generated part is longer than ``d`` (see
    :func:`distance_from_goal`); with no generated token at all it is a single 0.

    Args:
        expected_time: (B, L) expected insertion times; generated: (B, L) bool.
    """
    dist = distance_from_goal(generated)
    n = int(dist.max()) + 1 if generated.any() else 1
    d, e_t = dist[generated], expected_time[generated].float()
    sums = torch.zeros(n).index_add_(0, d, e_t)
    counts = torch.zeros(n).index_add_(0, d, torch.ones_like(e_t))
    return sums / counts.clamp_min(1)


def order_figure(expected_time: Tensor, generated: Tensor, max_rows: int = 64):
    """Expected insertion time against distance from the goal (x = 0: the last generated token), as a figure.

    The mean over rows (:func:`mean_time_by_distance`) is drawn over up to ``max_rows`` individual rows.

    Args:
        expected_time: (B, L) expected insertion times; generated: (B, L) bool.

    Returns:
        a matplotlib Figure (5 x 3.2 inches), the form ``SummaryWriter.add_figure`` takes.
    """
    dist = distance_from_goal(generated)
    mean = mean_time_by_distance(expected_time, generated)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in range(min(max_rows, expected_time.shape[0])):
        m = generated[r]
        ax.plot(dist[r][m].numpy(), expected_time[r][m].numpy(), color="0.8", lw=0.6)
    ax.plot(range(len(mean)), mean.numpy(), color="C0", lw=2, marker="o", label="mean")
    ax.set_xlabel("distance from the goal (tokens before EOS; 0 = goal)")
    ax.set_ylabel("expected insertion time")
    ax.set_title("learned order (order network)")
    ax.legend()
    fig.tight_layout()
    return fig


__all__ = ["CLEAN", "LoFlexMDM", "distance_from_goal", "mean_time_by_distance", "order_figure"]
