"""The LightningModule base every generative method shares.

It owns what is not method-specific: the tokenizer (saved in checkpoints), the optimiser and its
learning-rate schedule, logging, evaluation by generation (task metrics come from the DataModule's
``make_metrics``), a table of samples in TensorBoard, and the ``predict`` records. A method implements
:meth:`GenerativeModule.compute_loss` and :meth:`GenerativeModule.sample`.

Batch contract: ``input_ids`` (B, L) long, ``fixed`` (B, L) bool (prompt, BOS, EOS), ``attention_mask``
(B, L) bool. Evaluation reads the prompt (fixed tokens) and the reference (the other real tokens) from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from insertion_diffusion.metrics.mean import WeightedMean
from insertion_diffusion.process.rng import NoiseSource, RowRNG, mix_ints
from insertion_diffusion.tokenizers import Tokenizer, as_tokenizer

LR_SCHEDULES = ("constant", "cosine", "wsd", "wsd:<fraction>")


# Evaluation scalars beside the task metrics: mean generated and reference lengths (tokens, no specials).
LENGTH_KEYS = ("length_generated", "length_reference")


def parse_lr_schedule(name: str, key: str = "model.lr_schedule") -> tuple[str, float]:
    """``(kind, decay_fraction)`` of an ``lr_schedule`` setting; ``wsd`` decays over the last 20 % by default.

    Raises ``ValueError`` naming ``key`` and the allowed values for anything else.
    """
    kind, _, arg = str(name).partition(":")
    if kind in ("constant", "cosine") and not arg:
        return kind, 0.0
    if kind == "wsd":
        try:
            frac = float(arg) if arg else 0.2
        except ValueError:
            frac = float("nan")
        if 0.0 < frac <= 1.0:
            return kind, frac
    raise ValueError(
        f"{key}={name!r}; allowed values: {', '.join(LR_SCHEDULES)} (fraction in (0, 1], e.g. wsd:0.25)"
    )


def lr_factor(step: int, warmup: int, total: float, kind: str, floor: float, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then ``constant`` (1), ``cosine`` (from 1 at the end of warm-up to
    ``floor`` at step ``total``), or ``wsd`` (warm-up, stable, decay: 1 until the last ``decay_fraction`` of the
    ``total`` steps, then linear to ``floor``). ``wsd`` keeps the peak rate through the early plateau that star
    graphs show and only anneals at the end, where cosine had already cut it by the time learning started.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    start = total - decay_fraction * (total - warmup)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1.0, total - start))
    return 1.0 - (1.0 - floor) * progress

# Settings that only affect evaluation and prediction, or how the model runs rather than what it computes
# (``compile``). They are kept out of the checkpoint's hyper-parameters: LightningCLI re-applies a checkpoint's
# hyper-parameters over the command line for validate/test/predict with --ckpt_path, which would silently undo
# e.g. ``--model.init_args.sampler.steps 500`` at test time.
INFERENCE_SETTINGS = ("sampler", "eval_seed", "num_logged_samples", "compile")

_EPOCH_SHIFT = 32  # training sample ids are epoch * 2**32 + position in the epoch


def split_rows(ids: Tensor, fixed: Tensor, valid: Tensor, num_special: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split rows into (prompt ids, generated/reference ids), special tokens dropped.

    The prompt is the fixed part, the rest is the sequence proper. Returns python lists (one host copy).
    """
    content = valid & (ids >= num_special)
    ids_l, fixed_l, content_l = ids.tolist(), (content & fixed).tolist(), (content & ~fixed).tolist()
    prompts = [[i for i, f in zip(r, m) if f] for r, m in zip(ids_l, fixed_l)]
    seqs = [[i for i, f in zip(r, m) if f] for r, m in zip(ids_l, content_l)]
    return prompts, seqs


def compact_fixed(input_ids: Tensor, fixed: Tensor, attention_mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The generation start state of each row: its fixed tokens only, compacted -> (x, fixed, lengths)."""
    keep = fixed & attention_mask
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lengths = keep.sum(1)
    valid = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
    x = torch.where(valid, torch.gather(input_ids, 1, order), torch.full_like(input_ids, pad_id))
    return x, valid, lengths


def eval_noise(module: L.LightningModule, batch: dict[str, Tensor]) -> RowRNG:
    """Per-row evaluation noise keyed by each row's ``index`` in its split and the module's ``eval_seed``: the
    same rows get the same noise at every evaluation, on any number of processes, in any batch."""
    rows = batch.get("index")
    if rows is None:
        rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return RowRNG(int(getattr(module, "eval_seed", 0)), rows)


def ratio_value(v: Any) -> Any:
    """The value of a ``compute_loss`` log entry: a plain value, or the first item of a ``(ratio, count)``
    pair (a ratio whose evaluation mean is weighted by ``count``)."""
    return v[0] if isinstance(v, tuple) else v


def select_rows(batch: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """The rows ``keep`` (B,) bool of every per-row tensor of ``batch``; other entries unchanged."""
    B = keep.shape[0]
    return {k: v[keep] if isinstance(v, Tensor) and v.ndim and v.shape[0] == B else v for k, v in batch.items()}


def run_fp32(head: nn.Module, h: Tensor, cond: Tensor | None = None) -> Tensor:
    """Run an output head outside autocast, in its parameters' dtype (fp32 under mixed precision): rates and
    logits that feed the rate-matching losses are not rounded to bf16/fp16."""
    dtype = next(head.parameters()).dtype
    with torch.autocast(device_type=h.device.type, enabled=False):
        return head(h.to(dtype), None if cond is None else cond.to(dtype))


class GenerativeModule(L.LightningModule):
    """Shared training/evaluation plumbing.

    Args:
        tokenizer: the task's tokenizer (linked from the DataModule by the CLI).
        max_length: the longest sequence (prompt included) the model handles (linked from the DataModule).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        lr_schedule: "constant" after warm-up; "cosine" decay to ``min_lr_ratio * lr`` at the last step; or
            "wsd" / "wsd:<fraction>" (constant, then a linear decay to ``min_lr_ratio * lr`` over the last
            fraction of the steps, 0.2 by default). The decaying schedules need a finite ``trainer.max_steps``.
        min_lr_ratio: floor of the decaying schedules.
        eval_seed: seed of the generator used when sampling for evaluation and prediction.
        num_logged_samples: rows of generated samples logged as a TensorBoard text table per evaluation.
        compile: compile the backbone (``self.net``) with ``torch.compile`` when the trainer sets the model up
            (the state dict keeps its keys; not stored in the checkpoint's hyper-parameters).

    Training noise. A method that sets ``row_noise = True`` receives ``compute_loss(batch, generator=rng)``
    with a :class:`~insertion_diffusion.process.rng.RowRNG` keyed by each sample's position in the run
    (:meth:`training_noise`) and the run's noise seed (``seed_everything``; kept in checkpoints): its noise is then a function
    of the rows alone, so DDP over any number of processes computes the one-process gradient and a resumed
    run redraws the uninterrupted run's noise. Evaluation passes a ``RowRNG`` keyed by the rows' ``index``.
    Torch's global generator (dropout, methods without row noise) is re-seeded at every training batch from
    ``(noise seed, epoch, batch, rank)``, which makes a resumed run exact without saving RNG states.

    Non-finite values. A non-finite training loss (any process) or gradient stops ``fit`` with a
    ``FloatingPointError`` before the optimiser step, on every process at once; the exception checkpoint
    (:class:`~insertion_diffusion.callbacks.guards.ExceptionCheckpoint`) is not written for it, so the last
    good checkpoint stays the newest.
    """

    #: The method's ``compute_loss`` takes ``generator`` and draws all its noise through it (RowRNG-ready).
    row_noise: bool = False
    #: Appended to the message when training stops on a non-finite loss or gradient.
    nonfinite_hint: str = "lower model.lr or set trainer.gradient_clip_val"

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        max_length: int,
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
        super().__init__()
        parse_lr_schedule(lr_schedule)  # fail at construction, naming the key
        if max_length < 2:
            raise ValueError(f"model.max_length must be >= 2, got {max_length}")
        self.tokenizer = as_tokenizer(tokenizer)
        self.max_length = int(max_length)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_schedule, self.min_lr_ratio = warmup_steps, lr_schedule, min_lr_ratio
        self.eval_seed = eval_seed
        self.num_logged_samples = num_logged_samples
        self.compile_net = bool(compile)
        # Seed of the training noise: PL_GLOBAL_SEED (seed_everything) at setup, or the checkpoint's on resume.
        self.noise_seed: int | None = None
        self._step_ok: Tensor | None = None
        self._step_loss: Tensor | None = None
        self._step_logs: dict[str, Tensor] = {}
        self._eval_generated: set[str] = set()
        self._sample_rows: list[tuple[str, str, str]] = []
        # Token-weighted means of the per-row NLL (see sequence_nll); synced across ranks by torchmetrics.
        self._nll_meters = torch.nn.ModuleDict({s: WeightedMean() for s in ("val", "test")})
        # Weighted means of the other evaluation scalars (losses and their parts), created as they are logged.
        self._eval_meters = torch.nn.ModuleDict()

    def save_linked_hparams(self) -> None:
        """Store the values linked from the data (tokenizer as a plain dict, max length) in the checkpoint's
        hparams so ``load_from_checkpoint`` needs no data. They are kept out of the initial hparams that
        Lightning merges with the DataModule's (whose own ``max_length`` may be unresolved, e.g. None)."""
        self.hparams["tokenizer"] = self.tokenizer.to_config()
        self.hparams["max_length"] = self.max_length

    # --- to implement -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the scalar loss and a dict of scalars to log (or of ``(ratio, count)`` pairs, see :func:`ratio_value`)."""
        raise NotImplementedError

    def sample(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, Tensor]:
        """Generate for the prompts of ``batch``.

        Returns:
            ``(x, fixed)``: (B, W) tokens with PAD beyond each length, fixed part included, and the
            (B, W) bool mask of the fixed (prompt/BOS/EOS) positions in ``x``.
        """
        raise NotImplementedError

    def sampler_settings(self) -> dict[str, Any]:
        """Sampler settings recorded in predictions' provenance."""
        return {}

    def active_sampler_cfg(self) -> Any:
        """``self.sampler_cfg``, with ``steps = val_steps`` while ``fit`` runs its validations.

        A config can so test and predict with the paper's number of steps and still validate cheaply during
        training. ``validate``, ``test`` and ``predict`` always use ``steps``.
        """
        cfg = self.sampler_cfg
        val_steps = getattr(cfg, "val_steps", None)
        trainer = self._trainer
        if val_steps is not None and trainer is not None and getattr(trainer.state.fn, "value", None) == "fit":
            return dataclasses.replace(cfg, steps=val_steps)
        return cfg

    def sequence_nll(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Negative log-likelihood (or an upper bound on it: a NELBO) of each row's generated part, in nats.

        Returns ``(B,)`` or ``None`` for a method without one. Evaluation logs
        ``<stage>/nll_per_token``: the summed NLL over the summed ``target tokens + 1`` (the +1 is the
        end-of-sequence / length decision every method pays for in some form), so methods compare on one scale.
        """
        return None

    # --- training -------------------------------------------------------------------------------------
    def training_noise(self, batch: dict[str, Tensor], batch_idx: int = 0) -> RowRNG:
        """The :class:`RowRNG` of a training batch.

        Its rows are the samples' positions in the run, numbered the way the training sampler
        (:class:`~insertion_diffusion.data.base.TrainSampler`) lays a global batch out over processes:
        ``epoch * 2**32 + batch_idx * B * W + rank + W * k`` for row ``k`` of process ``rank``. One process at
        batch ``2B`` and two at ``B`` therefore draw the same noise for the same sample, and a resumed run (Lightning
        restores ``epoch`` and ``batch_idx``) the same as the uninterrupted one. A batch may bring its own
        ``sample_id`` (B,) instead.
        """
        ids = batch.get("sample_id")
        if ids is None:
            B, dev = batch["input_ids"].shape[0], batch["input_ids"].device
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
            start = (int(self.current_epoch) << _EPOCH_SHIFT) + batch_idx * B * world + rank
            ids = start + world * torch.arange(B, device=dev)
        return RowRNG(self.noise_seed or 0, ids)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout and any other use of torch's global generator: a fresh, reproducible stream per batch.
        seed = mix_ints(self.noise_seed or 0, 0x5EED, int(self.current_epoch), batch_idx, int(self.global_rank))
        torch.manual_seed(seed & ((1 << 63) - 1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.row_noise:
            loss, logs = self.compute_loss(batch, generator=self.training_noise(batch, batch_idx))
        else:
            loss, logs = self.compute_loss(batch)
        self._track_finite(loss, logs)
        B = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for k, v in logs.items():
            self.log(f"train/{k}", ratio_value(v), batch_size=B)
        return loss

    def _track_finite(self, loss: Tensor, logs: dict[str, Any]) -> None:
        """Remember (without a host sync) whether this micro-batch's loss is finite, for the step's check."""
        ok = torch.isfinite(loss.detach()).all()
        self._step_ok = ok if self._step_ok is None else self._step_ok & ok
        self._step_loss = loss.detach()
        values = {k: ratio_value(v) for k, v in logs.items()}
        self._step_logs = {k: v.detach() for k, v in values.items() if isinstance(v, Tensor)}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        ok = self._step_ok if self._step_ok is not None else torch.ones((), dtype=torch.bool, device=self.device)
        self._step_ok = None
        # fp16 loss scaling produces inf gradients on purpose (the scaler skips those steps)
        if self._trainer is None or not str(self.trainer.precision).startswith("16"):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        bad = not bool(ok)
        if self._trainer is not None and self.trainer.world_size > 1:
            # every process stops together (a process whose own loss is finite would otherwise wait forever)
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(self._nonfinite_message())

    def raise_nonfinite_here(self) -> bool:
        """Whether a method may raise ``FloatingPointError`` on a non-finite value where it finds it: yes unless
        training under DDP, where one process raising alone leaves the others waiting in the gradient
        all-reduce; there the check of :meth:`on_before_optimizer_step` stops all processes together."""
        return not (self.training and self._trainer is not None and self.trainer.world_size > 1)

    def _nonfinite_message(self) -> str:
        loss = float(self._step_loss) if self._step_loss is not None else float("nan")
        terms = [k for k, v in self._step_logs.items() if v.numel() and not bool(torch.isfinite(v).all())]
        where = f"non-finite terms: {', '.join(terms)}" if terms else "non-finite gradient or loss on another process"
        return (
            f"{type(self).__name__} training stopped at step {self.global_step}: the loss ({loss:g}) or its gradient "
            f"is not finite ({where}); no update was applied and no checkpoint was written for this step, the last "
            f"saved checkpoint is kept; {self.nonfinite_hint}"
        )

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        warm, floor = self.warmup_steps, self.min_lr_ratio
        kind, frac = parse_lr_schedule(self.lr_schedule)
        if kind != "constant" and not math.isfinite(total):
            raise ValueError(f"model.lr_schedule={self.lr_schedule!r} needs a finite trainer.max_steps (or max_epochs)")

        def factor(step: int) -> float:
            return lr_factor(step, warm, total, kind, floor, frac)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- evaluation -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        make = getattr(dm, "make_metrics", None)
        if make is not None and not hasattr(self, "val_metrics"):
            self.val_metrics = make("val/")
            self.test_metrics = make("test/")
        if self.noise_seed is None:
            self.noise_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        net = getattr(self, "net", None)
        if self.compile_net and isinstance(net, nn.Module) and getattr(net, "_compiled_call_impl", None) is None:
            net.compile()

    def _generator(self, batch_idx: int, batch: dict[str, Tensor] | None = None) -> NoiseSource:
        """The sampling noise of an evaluation/prediction batch.

        With the rows' ``index`` (every shipped DataModule sets it): a :class:`RowRNG` keyed by ``eval_seed`` and
        each row's index, so a row generates the same sequence in any batch, at any ``eval_batch_size`` and on
        any number of processes (up to floating-point differences between batch shapes). Without it: a
        ``torch.Generator`` seeded by ``eval_seed``, the batch position and the rank.
        """
        index = batch.get("index") if batch is not None else None
        if index is not None and index.numel():
            return RowRNG(mix_ints(self.eval_seed, 1), index.reshape(-1))
        g = torch.Generator(device=self.device)
        g.manual_seed(self.eval_seed * 1_000_003 + batch_idx * 7919 + self.global_rank)
        return g

    def generate(self, batch: dict[str, Tensor], batch_idx: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Sample for a batch; returns (prompts, generated, references) as id lists without specials."""
        out, fixed = self.sample(batch, generator=self._generator(batch_idx, batch))
        n_sp = self.tokenizer.num_special
        valid = out != self.tokenizer.pad_id
        _, generated = split_rows(out, fixed, valid, n_sp)
        prompts, refs = split_rows(batch["input_ids"], batch["fixed"], batch["attention_mask"], n_sp)
        return prompts, generated, refs

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> None:
        """Drop the rows a distributed evaluation sampler repeated (``is_padding``), then evaluate the rest."""
        pad = batch.get("is_padding")
        if pad is not None:
            keep = ~pad.bool()
            n = int(keep.sum())
            if n == 0:
                # Still log every key (at weight 0): each process must sync the same keys at the epoch end.
                self._eval_rows(batch, batch_idx, stage, padding_only=True)
                return
            if n < keep.numel():
                batch = select_rows(batch, keep)
        self._eval_rows(batch, batch_idx, stage)

    def _eval_log(self, name: str, value: Any, weight: int, padding_only: bool = False, **kwargs: Any) -> None:
        """Log the ``weight``-weighted epoch mean of a scalar through a :class:`WeightedMean`.

        Its sum-reduced float states make the DDP value exact when processes hold different numbers of rows
        (``self.log(..., sync_dist=True)`` averages an integer row count and is off then). Every process logs the
        same keys in the same order (``padding_only`` adds nothing), as the epoch-end sync requires.
        """
        key = name.replace("/", "__")
        if key not in self._eval_meters:
            self._eval_meters[key] = WeightedMean()
        meter = self._eval_meters[key].to(self.device)
        if not padding_only:
            meter.update(torch.as_tensor(value, device=self.device).detach().float(), weight=float(weight))
        self.log(name, meter, metric_attribute=f"_eval_meters.{key}", **kwargs)

    def _eval_rows(self, batch: dict[str, Tensor], batch_idx: int, stage: str, padding_only: bool = False) -> None:
        """Losses, NLL and (when the data defines task metrics) generation metrics of real rows; with
        ``padding_only`` the logged values carry no weight and nothing is generated."""
        B = batch["input_ids"].shape[0]
        if self.row_noise:
            loss, logs = self.compute_loss(batch, generator=eval_noise(self, batch))
        else:
            loss, logs = self.compute_loss(batch)
        # A method whose training objective carries estimator terms (LoFlexMDM's REINFORCE, regularisers)
        # reports its generator loss here: that is the quantity comparable across checkpoints and methods.
        loss = logs.get("loss_generator", loss)
        self._eval_log(f"{stage}/loss", loss, B, padding_only, prog_bar=True)
        for k, v in logs.items():
            # A ratio (value, count) is averaged over its counts (e.g. masked tokens), not over rows: the epoch
            # value is then the same for any batch layout and number of processes.
            value, weight = v if isinstance(v, tuple) else (v, B)
            self._eval_log(f"{stage}/{k}", value, weight, padding_only)
        with torch.no_grad():
            nll = self.sequence_nll(batch)
        if nll is not None:
            meter = self._nll_meters[stage].to(self.device)
            if not padding_only:
                sp = self.tokenizer.num_special
                n_tokens = ((batch["input_ids"] >= sp) & batch["attention_mask"] & ~batch["fixed"]).sum(1) + 1
                meter.update(nll.detach().float() / n_tokens, weight=n_tokens.float())
            self.log(f"{stage}/nll_per_token", meter, batch_size=B)
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is None:
            return
        self._eval_generated.add(stage)
        if padding_only:
            for key in LENGTH_KEYS:
                self._eval_log(f"{stage}/{key}", 0.0, 0, padding_only=True)
            return
        prompts, generated, refs = self.generate(batch, batch_idx)
        # ``index`` lets set-valued metrics recognise rows; metrics whose update() does not take it never see it
        # (torchmetrics filters keyword arguments).
        metrics.to(self.device).update(generated, refs, prompts, index=batch.get("index"))
        # Mean lengths in tokens (no specials): a model or sampler whose lengths drift from the data's shows here
        # first (2-core MOSES runs with early insertion wrote 26 tokens where the data has 35).
        for key, rows in zip(LENGTH_KEYS, (generated, refs)):
            self._eval_log(f"{stage}/{key}", sum(map(len, rows)) / B, B)
        if batch_idx == 0 and self.num_logged_samples:
            tok = self.tokenizer
            self._sample_rows = [
                (tok.decode(p), tok.decode(g), tok.decode(r))
                for p, g, r in list(zip(prompts, generated, refs))[: self.num_logged_samples]
            ]

    def _eval_epoch_end(self, stage: str) -> None:
        self._eval_generated.discard(stage)
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is not None:
            values = metrics.compute()
            # already reduced over processes by torchmetrics: sync_dist averages equal values (silences a warning)
            self.log_dict(values, prog_bar=True, sync_dist=True)
            metrics.reset()
        if self._sample_rows and self.logger is not None and hasattr(self.logger.experiment, "add_text"):
            lines = ["| prompt | generated | reference |", "|---|---|---|"]
            lines += [f"| {p} | {g} | {r} |" for p, g, r in self._sample_rows]
            self.logger.experiment.add_text(f"{stage}/samples", "\n".join(lines), self.global_step)
        self._sample_rows = []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict[str, Any]]:
        prompts, generated, refs = self.generate(batch, batch_idx)
        tok = self.tokenizer
        # De novo rows (molecules) mark themselves ``has_reference = False``: their target is a data molecule, not
        # a reference for this generation, so it is left out of the record.
        # The flag is read per row, so a batch that mixes both kinds keeps the references it has.
        flag = batch.get("has_reference")
        has_ref = [True] * len(prompts) if flag is None else torch.as_tensor(flag).reshape(-1).tolist()
        return [
            {"prompt": tok.decode(p), "generated": tok.decode(g), **({"reference": tok.decode(r)} if h else {})}
            for p, g, r, h in zip(prompts, generated, refs, has_ref)
        ]

    # --- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["insertion_diffusion"] = {
            "model_class": type(self).__name__,
            "tokenizer": self.tokenizer.to_config(),
            "noise_seed": self.noise_seed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("insertion_diffusion")
        if meta is None:
            return
        if meta["model_class"] != type(self).__name__:
            raise ValueError(
                f"checkpoint was trained with model {meta['model_class']}, but the model is {type(self).__name__}; "
                f"use --model {meta['model_class']} (or the matching config)"
            )
        if meta.get("noise_seed") is not None:
            self.noise_seed = int(meta["noise_seed"])  # a resumed run continues the interrupted run's noise
        saved = as_tokenizer(meta["tokenizer"])
        if saved != self.tokenizer:
            raise ValueError(
                f"checkpoint vocabulary ({saved.vocab_size} ids) differs from the data's tokenizer "
                f"({self.tokenizer.vocab_size} ids); use the data settings the checkpoint was trained with"
            )
