"""Task metrics (torchmetrics, DDP-correct): each takes ``update(preds, refs, prompts)`` with id lists."""

from insertion_diffusion.metrics.star import ExactMatch, TokenAccuracy, ValidPathRate

__all__ = ["ExactMatch", "TokenAccuracy", "ValidPathRate"]
