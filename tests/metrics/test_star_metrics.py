"""Star metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import MetricCollection

from insertion_diffusion.metrics import ExactMatch, TokenAccuracy, ValidPathRate
from insertion_diffusion.metrics.star import is_valid_path, token_accuracy

# A small asymmetric star: 20 -> 10 (centre) -> 11 -> 12 is arm 0; 10 -> 13 -> 14 is another arm.
EDGES = [(10, 13), (20, 10), (11, 12), (13, 14), (10, 11)]
PROMPT = [v for e in EDGES for v in e] + [20, 12]  # ... source goal
GOLD_EDGES = [20, 10, 10, 11, 11, 12]
GOLD_NODES = [20, 10, 11, 12]


def test_exact_match():
    m = ExactMatch()
    m.update([[1, 2], [3], [], [5, 6]], [[1, 2], [4], [], [5]], [[0]] * 4)
    assert m.compute().item() == pytest.approx(2 / 4)
    m.update([[7]], [[7]], [[0]])
    assert m.compute().item() == pytest.approx(3 / 5)


def test_token_accuracy_per_example_then_averaged():
    assert token_accuracy([1, 2, 3], [1, 2]) == pytest.approx(2 / 3)
    assert token_accuracy([], []) == 1.0
    assert token_accuracy([], [1, 2]) == 0.0
    assert token_accuracy([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([2, 1], [1, 2]) == 0.0
    m = TokenAccuracy()
    m.update([[1, 2, 3], [], [5], [1, 9, 3]], [[1, 2], [], [6, 7], [1, 2, 3]], [[]] * 4)
    assert m.compute().item() == pytest.approx((2 / 3 + 1 + 0 + 2 / 3) / 4)


@pytest.mark.parametrize(
    ("tokens", "valid"),
    [
        (GOLD_EDGES, True),
        ([20, 10, 10, 13, 13, 14], False),  # wrong arm: ends at 14, not the goal
        ([20, 10, 10, 12], False),  # edge 10 -> 12 is not in the prompt
        ([20, 10, 10, 11, 11], False),  # odd length
        ([], False),  # empty prediction
        ([20, 10, 11, 12], False),  # chain broken: (20,10) then (11,12)
        ([10, 11, 11, 12], False),  # starts at the centre, not the source
        ([12, 11, 11, 10, 10, 20], False),  # reversed edges are not edges
    ],
)
def test_valid_path_edges(tokens, valid):
    assert is_valid_path(tokens, PROMPT, "edges") is valid


@pytest.mark.parametrize(
    ("tokens", "valid"),
    [
        (GOLD_NODES, True),
        ([20, 10, 13, 14], False),  # wrong arm
        ([20, 12], False),  # non-existent edge
        ([], False),
        ([20, 10, 11, 12, 12], False),  # repeats a node (12 -> 12 is not an edge either)
    ],
)
def test_valid_path_nodes(tokens, valid):
    assert is_valid_path(tokens, PROMPT, "nodes") is valid


def test_valid_path_rate_accumulates():
    m = ValidPathRate("edges")
    preds = [GOLD_EDGES, [20, 10, 10, 13, 13, 14], [20, 10, 10, 12], [20, 10, 10, 11, 11], []]
    m.update(preds, [GOLD_EDGES] * 5, [PROMPT] * 5)
    assert m.compute().item() == pytest.approx(1 / 5)
    n = ValidPathRate("nodes")
    n.update([GOLD_NODES, [20, 10, 13, 14]], [GOLD_NODES] * 2, [PROMPT] * 2)
    assert n.compute().item() == pytest.approx(1 / 2)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown target_format 'tokens'"):
        ValidPathRate("tokens")
    with pytest.raises(ValueError, match="even length"):
        is_valid_path([1, 2], [1, 2, 3], "edges")
    with pytest.raises(ValueError, match="2 preds, 1 refs"):
        ExactMatch().update([[1], [2]], [[1]], [[0], [0]])
    with pytest.raises(ValueError, match="1 prompts"):
        ValidPathRate().update([[1], [2]], [[1], [2]], [PROMPT])


def test_states_are_sums_so_merging_shards_is_exact():
    """Two ranks' states summed (what DDP sync does) give exactly the single-process value."""
    preds = [GOLD_EDGES, [20, 10], GOLD_EDGES[:4], [], [20, 10, 10, 11, 11, 12, 12]]
    refs = [GOLD_EDGES] * 5
    prompts = [PROMPT] * 5
    for cls in (ExactMatch, TokenAccuracy, ValidPathRate):
        full, a, b = cls(), cls(), cls()
        full.update(preds, refs, prompts)
        a.update(preds[:2], refs[:2], prompts[:2])
        b.update(preds[2:], refs[2:], prompts[2:])
        assert all(fx == "sum" or callable(fx) for fx in a._reductions.values())
        a.merge_state(b)
        assert torch.equal(a.compute(), full.compute()), cls.__name__


def test_collection_with_compute_groups_keeps_metrics_apart():
    """compute groups merge metrics with equal state names and values; ours must never be merged."""
    coll = MetricCollection(
        {"exact_match": ExactMatch(), "token_accuracy": TokenAccuracy(), "valid_path": ValidPathRate()},
        prefix="val/",
    )
    coll.update([GOLD_EDGES], [GOLD_EDGES], [PROMPT])  # every metric is 1.0 after this batch
    wrong_arm = [20, 10, 10, 13, 13, 14]
    coll.update([wrong_arm], [wrong_arm], [PROMPT])  # exact (against this reference), but not a valid path
    out = {k: v.item() for k, v in coll.compute().items()}
    assert out == pytest.approx({"val/exact_match": 1.0, "val/token_accuracy": 1.0, "val/valid_path": 0.5})
