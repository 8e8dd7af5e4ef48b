"""Shared sampling and order diagnostics of the insertion models (FlexMDM, LoFlexMDM)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from insertion_diffusion.metrics.order import OrderCorrelation
from insertion_diffusion.models.base import GenerativeModule, compact_fixed
from insertion_diffusion.process.rng import NoiseSource
from insertion_diffusion.sampling.tau_leaping import SampleOutput, SamplerConfig, tau_leaping


class InsertionModel(GenerativeModule):
    """A :class:`GenerativeModule` sampled by tau-leaping from the rates of :meth:`rates`.

    Subclasses set ``self.sampler_cfg`` and implement ``rates(x, t, valid) -> (logits, insert_rate,
    unmask_rate)``. Evaluation also logs ``order_corr_insert`` / ``order_corr_unmask``: the correlation
    between a generated token's position and the sampler step at which it was inserted / unmasked.
    """

    sampler_cfg: SamplerConfig

    def rates(self, x: Tensor, t: Tensor, valid: Tensor, t_next: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Rates at ``t`` (or, with ``t_next``, expected events over ``[t, t_next]``; see ``SamplerConfig``)."""
        raise NotImplementedError

    def diverging_schedule(self) -> str | None:
        """The setting (e.g. ``model.insertion_schedule=poly:0.25``) whose hazard is unbounded at ``t = 0``, or None."""
        return None

    def check_sampler(self) -> None:
        """A schedule whose hazard diverges at ``t = 0`` needs integrated hazards in the sampler."""
        name = self.diverging_schedule()
        if name is not None and not self.sampler_cfg.integrate_hazard:
            raise ValueError(
                f"{name} has an unbounded hazard at t = 0, so the sampler's first step cannot use rate * dt; "
                "set model.init_args.sampler.integrate_hazard: true"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not hasattr(self, "order_metrics"):
            self.order_metrics = torch.nn.ModuleDict({"insert": OrderCorrelation(), "unmask": OrderCorrelation()})

    def sample_full(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> SampleOutput:
        """Run the sampler from the fixed tokens of ``batch``; returns the whole :class:`SampleOutput`."""
        self.check_sampler()
        tok = self.tokenizer
        x0, fixed0, len0 = compact_fixed(batch["input_ids"], batch["fixed"], batch["attention_mask"], tok.pad_id)
        return tau_leaping(
            self.rates, x0, fixed0, len0, self.active_sampler_cfg(), max_length=self.max_length,
            mask_id=tok.mask_id, pad_id=tok.pad_id, eos_id=tok.eos_id,
            banned_ids=(tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id), generator=generator,
        )

    def sample(self, batch: dict[str, Tensor], generator: NoiseSource = None) -> tuple[Tensor, Tensor]:
        out = self.sample_full(batch, generator)
        metrics = getattr(self, "order_metrics", None)
        if metrics is not None and not self.training:
            generated = (torch.arange(out.x.shape[1], device=out.x.device)[None] < out.lengths[:, None]) & ~out.fixed
            metrics["insert"].to(out.x.device).update(out.insert_step, generated)
            metrics["unmask"].to(out.x.device).update(out.unmask_step, generated)
        return out.x, out.fixed

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = getattr(self, "order_metrics", None)
        # Decided by whether this stage generated at all (the same on every process), not by local counts: under
        # DDP every process must compute (and so sync) the metric, or the others wait for it.
        if metrics is not None and stage in self._eval_generated:
            for key, m in metrics.items():
                self.log(f"{stage}/order_corr_{key}", m.compute(), sync_dist=True)  # equal on every process
                m.reset()
        super()._eval_epoch_end(stage)

    def sampler_settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.sampler_cfg)
