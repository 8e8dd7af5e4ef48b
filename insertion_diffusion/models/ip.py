"""The Insertion Process (IP, arXiv 2606.02133): one token inserted per step, order inferred variationally.

Generative model. A bidirectional transformer reads the current partial sequence (prompt, BOS, the tokens
created so far, EOS) and gives one joint distribution over the next action: "insert token ``v`` into the gap
left of position ``j``" for every open gap ``j`` (left of a target token or of EOS, never inside the prompt) and
every ordinary token ``v``, or "stop". The logit of ``(j, v)`` is the token head at position ``j``; the logit of
stop is a scalar head at EOS; one softmax covers all of them. Sampling repeats this until stop (or the maximum
length), so a row of ``n`` target tokens takes ``n + 1`` network passes; the loop is over steps only.

Training. The creation order ``sigma`` of the target positions is latent. With a posterior ``q(sigma | x)``
(Plackett-Luce with scores from a small order network, or uniform), the evidence lower bound is

    log p(x) >= E_q [ sum_{k=0}^{n-1} ( log p(a_k | x_{S_k}) - log q(sigma_{k+1} | S_k) ) ] + log p(stop | x),

where ``S_k`` is the set created after ``k`` steps and ``a_k`` the action (slot, token) that creates
``sigma_{k+1}``. Orders and action paths correspond one to one (the slots are the order's inversion code, see
:mod:`insertion_diffusion.process.permutation`), so this is the usual evidence lower bound with the order as the
latent variable. Each row draws one step ``k`` uniformly from ``0..n`` and one prefix ``S_k`` from ``q``, and the step's term is
taken in expectation over the next position under ``q`` given ``S_k`` (a Rao-Blackwellised term that one
network pass on ``x_{S_k}`` gives exactly); ``(n + 1)`` times it is an unbiased estimate of the bound. The
generator minimises ``-bound``. The order network gets the pathwise gradient of the term (through ``q``'s
next-position weights) plus REINFORCE on the prefix's ``log q`` with a leave-one-out baseline over
``num_orders`` orders per row that share ``k`` (only ``k``: each order has its own Gumbel noise). ``posterior: uniform`` drops the
order network (every order equally likely; the ILM-style objective).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from insertion_diffusion.metrics.order import rowwise_pearson
from insertion_diffusion.models.base import (
    INFERENCE_SETTINGS,
    GenerativeModule,
    compact_fixed,
    eval_noise,
    run_fp32,
)
from insertion_diffusion.nn.transformer import (
    AdaLNHead,
    ScalarHead,
    Transformer,
    TransformerConfig,
    without_time,
)
from insertion_diffusion.process.permutation import (
    creation_state,
    gumbel_order,
    insert_at,
    prefix_log_prob,
)
from insertion_diffusion.process.rng import NoiseSource, RowRNG, uniform
from insertion_diffusion.sampling.filters import check_token_filters, sample_tokens
from insertion_diffusion.tokenizers import Tokenizer

POSTERIORS = ("learned", "uniform")


@dataclasses.dataclass
class IPSamplerConfig:
    """Settings of insertion sampling (one action per step: a gap and a token, or stop).

    Attributes:
        top_k: keep the k most likely actions (1 = greedy; None = all).
        top_p: nucleus mass over actions (None or 1.0 = off).
        temperature: logits temperature (0 = greedy).
    """

    top_k: int | None = 1
    top_p: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_token_filters(self.top_k, self.top_p, self.temperature)


class InsertionProcess(GenerativeModule):
    """Insertion Process: an insertion policy trained on a variational bound over creation orders.

    Args:
        tokenizer, max_length: linked from the DataModule.
        backbone: size of the policy transformer (time conditioning is switched off: there is no time).
        order_backbone: size of the order network (default: ``backbone``); unused with ``posterior: uniform``.
        posterior: ``learned`` (Plackett-Luce scores from the order network) or ``uniform``.
        num_orders: creation orders drawn per row and step (>= 2 for the learned posterior's leave-one-out
            baseline); they run through the policy as one batched forward.
        sampler: decoding settings for evaluation and prediction.
        **kwargs: optimiser, evaluation and ``compile`` settings of :class:`GenerativeModule`.
    """

    row_noise = True
    nonfinite_hint = "lower model.lr or set trainer.gradient_clip_val"

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
        backbone: TransformerConfig | None = None,
        order_backbone: TransformerConfig | None = None,
        posterior: str = "learned",
        num_orders: int = 2,
        sampler: IPSamplerConfig | None = None,
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
        if posterior not in POSTERIORS:
            raise ValueError(f"model.posterior={posterior!r}; allowed values: {', '.join(POSTERIORS)}")
        if num_orders < 1 or (posterior == "learned" and num_orders < 2):
            raise ValueError(
                f"model.num_orders must be >= 2 with posterior: learned (the leave-one-out baseline needs two "
                f"orders per row) and >= 1 otherwise, got {num_orders}"
            )
        self.backbone_cfg = without_time(backbone or TransformerConfig())
        self.order_cfg = without_time(order_backbone or self.backbone_cfg)
        self.posterior, self.num_orders = posterior, int(num_orders)
        self.sampler_cfg = sampler or IPSamplerConfig()
        self.save_hyperparameters(ignore=["tokenizer", "max_length", *INFERENCE_SETTINGS])
        self.save_linked_hparams()
        V, d = self.tokenizer.vocab_size, self.backbone_cfg.d_model
        self.net = Transformer(V, self.backbone_cfg, max_length=self.max_length)
        self.token_head = AdaLNHead(d, None, V)
        self.stop_head = ScalarHead(d, None)
        self.order_net: Transformer | None = None
        self.order_head: ScalarHead | None = None
        if posterior == "learned":
            self.order_net = Transformer(V, self.order_cfg, max_length=self.max_length)
            self.order_head = ScalarHead(self.order_cfg.d_model, None)  # zero-initialised: uniform at the start
        self.last_creation_steps: Tensor | None = None  # (B, max_length) of the last sample() call
        self._eval_elbo: tuple[Tensor, Tensor] | None = None

    # --- network --------------------------------------------------------------------------------------
    def action_logits(self, x: Tensor, fixed: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised log-probabilities of every action on partial sequences.

        Args:
            x, fixed, valid: (B, W) compacted partial sequences (EOS last among the valid positions).

        Returns:
            ``(insert, stop)``: (B, W, V) fp32, the logit of inserting token ``v`` into the gap left of position
            ``j`` (``-inf`` for closed gaps, special tokens, and every gap of a row at ``max_length``); (B,) the
            logit of stopping.
        """
        tok = self.tokenizer
        h, _ = self.net(x, None, valid)
        logits = run_fp32(self.token_head, h)  # fp32 outside autocast: the softmax spans every gap and token
        lengths = valid.sum(1)
        open_gap = valid & (~fixed | (x == tok.eos_id)) & (lengths < self.max_length)[:, None]
        logits = logits.masked_fill(~open_gap[..., None], float("-inf"))
        logits[..., : tok.num_special] = float("-inf")
        eos_pos = (lengths - 1).clamp_min(0)
        stop = torch.gather(self.stop_head(h, None), 1, eos_pos[:, None]).squeeze(1)
        return logits, stop

    def order_scores(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Plackett-Luce scores (B, L) fp32 of the clean rows (zeros for the uniform posterior)."""
        if self.order_net is None:
            return torch.zeros(ids.shape, device=ids.device)
        h, _ = self.order_net(ids, None, valid)
        return self.order_head(h, None)

    # --- the bound ------------------------------------------------------------------------------------
    def bound_terms(self, batch: dict[str, Tensor], generator: NoiseSource) -> dict[str, Tensor]:
        """One-sample estimates of the evidence lower bound per row and order.

        Returns a dict of (R, B) tensors, ``R = num_orders``: ``elbo`` (differentiable in both networks),
        ``log_q_prefix`` (differentiable in the order network), and (B,) ``n`` target counts.
        """
        ids, fixed, attn = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        B, L = ids.shape
        R = self.num_orders
        target = attn & ~fixed
        n = target.sum(1)
        scores = self.order_scores(ids, attn)
        # One step k per row, shared by the row's orders (their rewards then differ by the order only).
        u = uniform((B,), generator, ids.device, "ip/k")
        k = torch.minimum((u * (n + 1).float()).long(), n)
        noise = generator.repeat(R) if isinstance(generator, RowRNG) else generator
        rep = lambda t: t.repeat(R, *([1] * (t.ndim - 1)))  # noqa: E731 (R copies, row-major like RowRNG.repeat)
        ids_r, fixed_r, attn_r, target_r, scores_r, k_r, n_r = map(rep, (ids, fixed, attn, target, scores, k, n))
        rank = gumbel_order(scores_r, target_r, noise)
        st = creation_state(ids_r, fixed_r, attn_r, rank, k_r, self.tokenizer.pad_id)
        W = int(st.lengths.max())
        insert, stop = self.action_logits(st.x[:, :W], st.fixed[:, :W], st.valid[:, :W])
        # The bound's arithmetic in fp32 whatever the trainer's precision (the logits already are).
        with torch.autocast(device_type=ids.device.type, enabled=False):
            log_z = torch.logsumexp(torch.cat([insert.flatten(1), stop[:, None]], dim=1), dim=1)  # (RB,)
            owner = st.owner.clamp_max(W - 1)
            log_p = torch.gather(insert.flatten(1), 1, owner * insert.shape[-1] + ids_r) - log_z[:, None]  # (RB, L)
            # Next-position posterior given the created set: softmax of the scores over the missing positions.
            s = torch.where(st.missing, scores_r.float(), torch.full_like(scores_r, float("-inf"), dtype=torch.float32))
            q = torch.softmax(torch.where(st.missing.any(1, keepdim=True), s, torch.zeros_like(s)), dim=1)
            q = torch.where(st.missing, q, torch.zeros_like(q))
            log_q = torch.log(q.clamp_min(1e-30))
            step_term = (q * torch.where(st.missing, log_p - log_q, torch.zeros_like(log_p))).sum(1)
            final = k_r == n_r
            term = torch.where(final, stop - log_z, step_term)
            elbo = (n_r + 1).float() * term
            log_q_prefix = prefix_log_prob(scores_r, rank, target_r, k_r)
        return {"elbo": elbo.view(R, B), "log_q_prefix": log_q_prefix.view(R, B), "n": n}

    def compute_loss(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.bound_terms(batch, generator)
        elbo, log_q = terms["elbo"], terms["log_q_prefix"]
        if not self.training:  # evaluation asks for the same bound again (sequence_nll, same noise): keep it
            self._eval_elbo = (batch["input_ids"], elbo.detach())
        B, L = batch["input_ids"].shape
        R = elbo.shape[0]
        # Summed over rows and divided by B * L, as every method in the package (comparable, DDP-exact).
        nelbo = -elbo.mean(0).sum() / (B * L)
        logs: dict[str, Tensor] = {"loss_generator": nelbo.detach()}
        loss = nelbo
        if self.order_net is not None:
            reward = elbo.detach()
            advantage = reward - (reward.sum(0, keepdim=True) - reward) / (R - 1)  # leave-one-out baseline
            reinforce = -(advantage * log_q).mean(0).sum() / (B * L)
            loss = loss + reinforce
            logs["reinforce"] = reinforce.detach()
            logs["adv_abs_mean"] = advantage.abs().mean()
        return loss, logs

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor:
        """A one-step estimate of the negative bound per row (nats), (B,): an upper bound on ``-log p`` in
        expectation, averaged over ``num_orders`` orders and evaluation noise keyed by the row."""
        cached, self._eval_elbo = self._eval_elbo, None
        if cached is not None and cached[0] is batch["input_ids"]:
            return -cached[1].mean(0)  # computed by compute_loss on this batch with the same evaluation noise
        return -self.bound_terms(batch, eval_noise(self, batch))["elbo"].mean(0)

    # --- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, Tensor]:
        tok, cfg = self.tokenizer, self.sampler_cfg
        start, valid, lengths = compact_fixed(batch["input_ids"], batch["fixed"], batch["attention_mask"], tok.pad_id)
        B, Lmax = start.shape[0], self.max_length
        x = torch.full((B, Lmax + 1), tok.pad_id, dtype=torch.long, device=start.device)
        fixed = torch.zeros_like(x, dtype=torch.bool)
        cut = min(start.shape[1], Lmax + 1)
        x[:, :cut], fixed[:, :cut] = start[:, :cut], valid[:, :cut]
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        made = torch.full_like(x, -1)  # the step that created each position (-1: fixed)
        # Each step inserts at most one token per row, so the widest row after ``step`` steps is known on the host
        # (no sync for the width); a row of start length l stops by step Lmax - l at the latest. Like ARM's
        # decoder, the loop ends early once every row has stopped (one flag read per step).
        w0, l0 = int(lengths.max()), int(lengths.min())
        for step in range(Lmax - l0 + 1):
            W = min(Lmax, w0 + step)
            cols = torch.arange(W, device=x.device)[None, :]
            insert, stop = self.action_logits(x[:, :W], fixed[:, :W], cols < lengths[:, None])
            V = insert.shape[-1]
            joint = torch.cat([insert.flatten(1), stop[:, None]], dim=1)
            a = sample_tokens(joint, cfg.top_k, cfg.top_p, cfg.temperature, generator, stream=f"ip/step{step}")
            go = ~done & (a < W * V)
            gap = torch.div(a, V, rounding_mode="floor")
            x = insert_at(x, gap, a % V, go)
            fixed = insert_at(fixed, gap, torch.zeros_like(go), go)
            made = insert_at(made, gap, torch.full_like(a, step), go)
            lengths = lengths + go.long()
            done = done | ~go
            if bool(done.all()):
                break
        self.last_creation_steps = made[:, :Lmax]
        return x[:, :Lmax], fixed[:, :Lmax]

    # --- order diagnostics ----------------------------------------------------------------------------
    def _eval_rows(self, batch: dict[str, Tensor], batch_idx: int, stage: str, padding_only: bool = False) -> None:
        """Also log how the order relates to position (negative: the end of the sequence first; on star graphs
        the goal side): ``order_corr_posterior``, the correlation between a position and its step in the
        posterior's most likely order (learned posterior only), and ``order_corr_sample``, between a generated
        position and the sampler step that created it (when evaluation generates)."""
        self.last_creation_steps = None
        super()._eval_rows(batch, batch_idx, stage, padding_only)
        names = ["order_corr_posterior"] if self.order_net is not None else []
        if getattr(self, f"{stage}_metrics", None) is not None:
            names.append("order_corr_sample")
        if padding_only:
            for name in names:
                self._eval_log(f"{stage}/{name}", 0.0, 0, True)
            return
        zero = torch.zeros((), device=self.device)
        with torch.no_grad():
            for name in names:
                if name == "order_corr_posterior":
                    gen = batch["attention_mask"] & ~batch["fixed"]
                    scores = self.order_scores(batch["input_ids"], batch["attention_mask"]).masked_fill(~gen, float("-inf"))
                    step = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1).float()
                else:
                    step = self.last_creation_steps.float()
                    gen = self.last_creation_steps >= 0
                corr, ok = rowwise_pearson(gen.long().cumsum(1).float(), step, gen)
                self._eval_log(f"{stage}/{name}", corr[ok].mean() if ok.any() else zero, int(ok.sum().clamp_min(1)))

    def sampler_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler_cfg)
