"""GroupFairness (FIS §4(e), §4(g)2): a hand-built prediction table, scikit-learn confusion matrices, and
per-rank states summed (DDP's reduction) equal to one process on every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from lit_align.metrics import GroupFairness


def test_hand_built_table():
    """Group 0 (5 rows): y = 1 1 0 0 0, ŷ = 1 0 1 0 0 -> P(ŷ=1) = 2/5, TPR = 1/2, FPR = 1/3, 3 correct.
    Group 1 (4 rows): y = 1 1 1 0, ŷ = 1 1 0 0 -> P(ŷ=1) = 2/4, TPR = 2/3, FPR = 0/1, 3 correct.
    DP = |0.4 - 0.5| = 0.1; EOp = |1/2 - 2/3| = 1/6; EOd = (1/6 + |1/3 - 0|) / 2 = 1/4;
    accuracy = 6/9; F1: TP = 3, FP = 1, FN = 2 -> 2*3 / (6 + 1 + 2) = 2/3."""
    y = torch.tensor([1, 1, 0, 0, 0, 1, 1, 1, 0])
    pred = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 0])
    g = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    metric = GroupFairness()
    metric.update(torch.nn.functional.one_hot(pred, 2).float(), y, g)  # logits: the argmax is taken
    out = metric.compute()
    expected = {"accuracy": 6 / 9, "f1": 2 / 3, "dp_gap": 0.1, "eop_gap": 1 / 6, "eod_gap": 0.25}
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


def _sklearn_reference(y, pred, g, groups):
    """The §4(e) definitions from scikit-learn's per-group confusion matrices (rows: true 0/1, columns: ŷ 0/1)."""
    rates = {"dp": [], "tpr": [], "fpr": []}
    for k in range(groups):
        (tn, fp), (fn, tp) = confusion_matrix(y[g == k], pred[g == k], labels=[0, 1])
        rates["dp"].append((tp + fp) / (tn + fp + fn + tp))
        rates["tpr"].append(tp / (tp + fn))
        rates["fpr"].append(fp / (fp + tn))
    gap = {k: max(v) - min(v) for k, v in rates.items()}
    return {"accuracy": accuracy_score(y, pred), "f1": f1_score(y, pred), "dp_gap": gap["dp"],
            "eop_gap": gap["tpr"], "eod_gap": (gap["tpr"] + gap["fpr"]) / 2}


@pytest.mark.parametrize("groups", [2, 3])
def test_matches_scikit_learn_confusion_matrices(groups):
    rng = np.random.default_rng(groups)
    y, g = rng.integers(0, 2, 500), rng.integers(0, groups, 500)
    pred = np.where(rng.random(500) < 0.3, 1 - y, y)
    pred[rng.random(500) < 0.2 * g] = 1  # groups 1 and 2 get more positive predictions
    metric = GroupFairness(num_groups=groups)
    for rows in np.array_split(np.arange(500), 7):  # several batches
        metric.update(torch.from_numpy(pred[rows]), torch.from_numpy(y[rows]), torch.from_numpy(g[rows]))
    out, expected = metric.compute(), _sklearn_reference(y, pred, g, groups)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key
    assert expected["dp_gap"] > 0.05  # the table is unfair enough for the gaps to mean something


def test_rank_states_summed_equal_one_process_on_the_union():
    """Two ranks' metrics merged with their declared reduction (what DDP's sync does) = one metric on all rows."""
    torch.manual_seed(0)
    logits, y, g = torch.randn(300, 2), torch.randint(0, 2, (300,)), torch.randint(0, 2, (300,))
    whole, rank0, rank1 = GroupFairness(), GroupFairness(), GroupFairness()
    whole.update(logits, y, g)
    rank0.update(logits[:120], y[:120], g[:120])
    rank1.update(logits[120:], y[120:], g[120:])
    assert {fx.__name__ for fx in rank0._reductions.values()} == {"dim_zero_sum"}  # dist_reduce_fx="sum"
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), whole.compute()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], msg=key)
    for name, count in whole.counts().items():
        torch.testing.assert_close(rank0.counts()[name], count, msg=name)


def test_bad_groups_and_undefined_gaps():
    metric = GroupFairness()
    with pytest.raises(ValueError, match="groups must be integers in 0..1"):
        metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="groups must be integers"):
        metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([0.0, float("nan")]))
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([0, 0]))  # group 1 never seen
    out = metric.compute()
    assert out["accuracy"] == 1 and out["dp_gap"].isnan()  # a gap needs two groups with rows
