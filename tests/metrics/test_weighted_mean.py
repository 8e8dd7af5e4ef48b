"""WeightedMean (insertion_diffusion/metrics/mean.py): weights count, NaN shows, processes sum."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

from insertion_diffusion.metrics.mean import WeightedMean


def test_weights_count_where_meanmetric_with_nan_disabled_ignores_them():
    ours, theirs = WeightedMean(), MeanMetric(nan_strategy="disable")
    for value, weight in [(0.5, 26.0), (1.0, 6.0)]:
        ours.update(torch.tensor(value), weight)
        theirs.update(torch.tensor(value), weight=weight)
    assert math.isclose(float(ours.compute()), (0.5 * 26 + 6) / 32, rel_tol=1e-6)
    # the behaviour that made the package replace it (torchmetrics 1.9): every update weighs 1
    assert math.isclose(float(theirs.compute()), 0.75, rel_tol=1e-6)


def test_vector_updates_and_nan_propagates():
    m = WeightedMean()
    m.update(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]))
    assert math.isclose(float(m.compute()), 10 / 4)
    m.update(torch.tensor(float("nan")), 1.0)
    assert math.isnan(float(m.compute()))


def test_split_updates_give_the_same_value_as_one():
    values, weights = torch.rand(7), torch.randint(1, 9, (7,)).float()
    whole, parts = WeightedMean(), WeightedMean()
    whole.update(values, weights)
    for idx in ([0, 2, 4], [6], [1, 3, 5]):
        parts.update((values[idx] * weights[idx]).sum() / weights[idx].sum(), weights[idx].sum())
    torch.testing.assert_close(parts.compute(), whole.compute())
