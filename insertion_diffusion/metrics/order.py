"""How a sampler's generation order relates to position: a per-row Pearson correlation, averaged."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def rowwise_pearson(pos: Tensor, value: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson correlation of ``pos`` and ``value`` over the ``mask``ed entries of each row.

    Args:
        pos, value: (B, L) float; mask: (B, L) bool.

    Returns:
        ``(corr, ok)``: (B,) correlations and a (B,) bool of rows where it is defined (>= 2 entries and
        non-zero variance on both sides).
    """
    m = mask.float()
    n = m.sum(1)
    mean_p = (pos * m).sum(1) / n.clamp_min(1)
    mean_v = (value * m).sum(1) / n.clamp_min(1)
    dp = (pos - mean_p[:, None]) * m
    dv = (value - mean_v[:, None]) * m
    cov = (dp * dv).sum(1)
    var_p, var_v = (dp * dp).sum(1), (dv * dv).sum(1)
    ok = (n >= 2) & (var_p > 1e-12) & (var_v > 1e-12)
    corr = torch.where(ok, cov / (var_p * var_v).clamp_min(1e-24).sqrt(), torch.zeros_like(cov))
    return corr, ok


class OrderCorrelation(Metric):
    """Mean over rows of corr(position in the generated part, step at which it was generated).

    Positions count from the start of the generated part (for star graphs the goal is last), so a
    negative value means the end of the sequence is generated first. Rows where it is undefined (fewer
    than two generated tokens, or all generated at one step) are skipped and counted separately.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("corr_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, steps: Tensor, generated: Tensor) -> None:
        """Args: steps (B, L) step per position; generated (B, L) bool, the generated (non-fixed) positions."""
        pos = generated.long().cumsum(1).float()
        corr, ok = rowwise_pearson(pos, steps.float(), generated)
        self.corr_sum += corr[ok].double().sum()
        self.rows += ok.sum()

    def compute(self) -> Tensor:
        return (self.corr_sum / self.rows.clamp_min(1)).float()
