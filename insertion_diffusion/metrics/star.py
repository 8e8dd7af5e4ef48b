"""Star-graph metrics: exact match, token accuracy and valid-path rate.

Every metric takes ``update(preds, refs, prompts)`` with three ``list[list[int]]``: generated target ids (special
tokens stripped), reference target ids and prompt ids (flattened edges ``u1 v1 u2 v2 ...`` then ``source goal``).
Prompt and target share one tokenizer, so node ids are compared directly without decoding.

States are sum-reduced tensors, so the DDP-synchronised value is exactly the single-process value. Each metric
uses its own state names: ``MetricCollection`` compute groups merge metrics whose state names and values match,
which would silently tie e.g. exact match to valid-path rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ExactMatch", "TokenAccuracy", "ValidPathRate", "is_valid_path", "token_accuracy"]

TARGET_FORMATS = ("edges", "nodes")


def _check_lengths(preds: Sequence, refs: Sequence, prompts: Sequence | None = None) -> None:
    if len(preds) != len(refs) or (prompts is not None and len(prompts) != len(preds)):
        counts = f"{len(preds)} preds, {len(refs)} refs" + (
            f", {len(prompts)} prompts" if prompts is not None else ""
        )
        raise ValueError(f"star metrics: got {counts}; pass one of each per example")


def token_accuracy(pred: Sequence[int], ref: Sequence[int]) -> float:
    """Position-wise matches after padding both lists to the longer length, over that length (empty/empty: 1)."""
    n = max(len(pred), len(ref))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(pred, ref)) / n


def is_valid_path(tokens: Sequence[int], prompt: Sequence[int], target_format: str = "edges") -> bool:
    """Whether ``tokens`` spell a simple path from the prompt's source to its goal over the prompt's edges.

    Args:
        tokens: the generated target, read as ``u v`` pairs (``"edges"``) or as a node sequence (``"nodes"``).
        prompt: flattened directed edges followed by ``source goal``.
        target_format: ``"edges"`` or ``"nodes"``.
    """
    if len(prompt) < 2 or len(prompt) % 2:
        raise ValueError(
            f"star prompt must be flattened edge pairs followed by source and goal (an even length >= 2), "
            f"got length {len(prompt)}"
        )
    source, goal = prompt[-2], prompt[-1]
    edges = set(zip(prompt[0:-2:2], prompt[1:-2:2]))
    if target_format == "edges":
        if not tokens or len(tokens) % 2:
            return False
        pairs = list(zip(tokens[0::2], tokens[1::2]))
        if any(prev[1] != nxt[0] for prev, nxt in zip(pairs, pairs[1:])):
            return False
        nodes = [pairs[0][0]] + [v for _, v in pairs]
    elif target_format == "nodes":
        if not tokens:
            return False
        nodes = list(tokens)
        pairs = list(zip(nodes, nodes[1:]))
    else:
        raise ValueError(f"unknown target_format {target_format!r}; choose one of {TARGET_FORMATS}")
    return (
        nodes[0] == source
        and nodes[-1] == goal
        and len(set(nodes)) == len(nodes)
        and all(pair in edges for pair in pairs)
    )


class _StarMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False


class ExactMatch(_StarMetric):
    """Fraction of examples whose generated target equals the reference exactly."""

    exact: Tensor
    em_total: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("exact", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("em_total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: list[list[int]], refs: list[list[int]], prompts: list[list[int]] | None = None
    ) -> None:
        _check_lengths(preds, refs)
        self.exact += sum(list(p) == list(r) for p, r in zip(preds, refs))
        self.em_total += len(preds)

    def compute(self) -> Tensor:
        return (self.exact.double() / self.em_total.clamp(min=1)).float()


class TokenAccuracy(_StarMetric):
    """Mean over examples of the position-wise accuracy of :func:`token_accuracy`."""

    acc_sum: Tensor
    acc_total: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("acc_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("acc_total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: list[list[int]], refs: list[list[int]], prompts: list[list[int]] | None = None
    ) -> None:
        _check_lengths(preds, refs)
        self.acc_sum += sum(token_accuracy(p, r) for p, r in zip(preds, refs))
        self.acc_total += len(preds)

    def compute(self) -> Tensor:
        return (self.acc_sum / self.acc_total.clamp(min=1)).float()


class ValidPathRate(_StarMetric):
    """Fraction of generated targets that are a source-to-goal path over the prompt's edges.

    A wrong arm, an edge absent from the prompt, a broken chain, an odd number of edge tokens or an empty output
    all count as invalid. See :func:`is_valid_path`.

    Args:
        target_format: how targets are written: ``"edges"`` (``p0 p1 p1 p2 ...``) or ``"nodes"`` (``p0 p1 ...``).
    """

    valid: Tensor
    valid_total: Tensor

    def __init__(self, target_format: str = "edges", **kwargs) -> None:
        if target_format not in TARGET_FORMATS:
            raise ValueError(f"unknown target_format {target_format!r}; choose one of {TARGET_FORMATS}")
        super().__init__(**kwargs)
        self.target_format = target_format
        self.add_state("valid", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("valid_total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[list[int]], refs: list[list[int]], prompts: list[list[int]]) -> None:
        _check_lengths(preds, refs, prompts)
        self.valid += sum(is_valid_path(p, q, self.target_format) for p, q in zip(preds, prompts))
        self.valid_total += len(preds)

    def compute(self) -> Tensor:
        return (self.valid.double() / self.valid_total.clamp(min=1)).float()
