"""A weighted mean that keeps NaN visible and honours its weights.

torchmetrics' ``MeanMetric`` either drops NaN values (``nan_strategy`` "warn"/"ignore", with a host sync per
update to find them) or, with ``nan_strategy="disable"``, also drops the weights: in torchmetrics 1.9 every
update then counts as weight 1, so an epoch value is the plain mean of the per-batch values, which depends on
how rows are split into batches and over processes. :class:`WeightedMean` is the two sums and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class WeightedMean(Metric):
    """``sum(value * weight) / sum(weight)`` over every update, summed over processes (NaN propagates)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        """Add ``value`` (any shape) with ``weight`` (broadcastable to it)."""
        value = torch.as_tensor(value, dtype=torch.float32, device=self.total.device)
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=torch.float32, device=self.total.device), value.shape)
        self.total += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> Tensor:
        return self.total / self.weight
