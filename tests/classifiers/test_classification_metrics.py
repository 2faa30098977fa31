"""UGradSL's classifier metrics (§2(e), §2(g)5): per-row scores, MIA-efficacy, UA/RA/TA/MIA and the Avg. Gap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_align.metrics import MIAEfficacy, avg_gap, mia_efficacy, prediction_summary, row_scores, unlearning_scores


def test_row_scores_by_hand():
    """logits (0, ln 3): softmax (1/4, 3/4). True class 1: confidence 3/4, loss -ln(3/4); true class 0: 1/4.
    Entropy -(1/4 ln 1/4 + 3/4 ln 3/4) either way."""
    rows = row_scores(torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]]), torch.tensor([1, 0]))
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(rows["confidence"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(rows["loss"], torch.tensor([-math.log(0.75), -math.log(0.25)]))
    torch.testing.assert_close(rows["entropy"], torch.tensor([entropy, entropy]))
    torch.testing.assert_close(rows["correct"], torch.tensor([1.0, 0.0]))


def test_mia_efficacy_counts_target_rows_called_non_member():
    """Members score in (0.5, 1), non-members in (0, 0.5): the attack is the threshold 0.5. Of the target rows
    0.1, 0.2, 0.3 (non-member-like) and 0.9 (member-like), 3 of 4 are called non-member: 75%. The member side is
    10x larger and is subsampled to the non-members' size."""
    rng = np.random.default_rng(0)
    member, non_member = rng.uniform(0.5, 1, 2000), rng.uniform(0, 0.5, 200)
    assert mia_efficacy(member, non_member, np.array([0.1, 0.2, 0.3, 0.9])) == 75.0
    assert mia_efficacy(member, non_member, np.array([0.8, 0.9])) == 0.0
    # the subsample depends on the values only (DDP gathers rows in another order than one process reads them)
    target = rng.uniform(0.3, 0.7, 50)
    assert mia_efficacy(member, non_member, target) == mia_efficacy(rng.permutation(member), non_member[::-1], target)
    with pytest.raises(ValueError, match="needs member, non-member and target rows"):
        mia_efficacy(member, non_member, np.array([]))


def _logits(confidence: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits whose true-class (class 1) probability is ``confidence``."""
    p = torch.tensor(confidence, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], -1), torch.ones(len(p), dtype=torch.long)


def test_torchmetric_equals_the_function_and_merges_like_ddp():
    rng = np.random.default_rng(1)
    member, non_member, target = rng.beta(5, 2, 300), rng.beta(2, 2, 200), rng.beta(3, 2, 100)
    metric, rank0, rank1 = MIAEfficacy(), MIAEfficacy(), MIAEfficacy()
    for part, conf in (("member", member), ("non_member", non_member), ("target", target)):
        logits, labels = _logits(conf)
        metric.update(logits, labels, part)
        half = len(conf) // 2
        rank0.update(logits[:half], labels[:half], part)
        rank1.update(logits[half:], labels[half:], part)
    conf = {p: row_scores(*_logits(c))["confidence"].numpy() for p, c in
            (("m", member), ("n", non_member), ("t", target))}
    expected = mia_efficacy(conf["m"], conf["n"], conf["t"])
    assert 0 < expected < 100
    assert metric.compute().item() == pytest.approx(expected)
    rank0.merge_state(rank1)  # "cat" states: the union of both ranks' rows
    assert rank0.compute().item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="feature must be one of confidence, entropy, loss"):
        MIAEfficacy(feature="margin")


def test_unlearning_scores_in_percent():
    """Forget: 1 of 4 right -> UA 75. Retain: 3 of 4 -> RA 75. Test: 2 of 4 -> TA 50. Retain rows are mostly
    confident (member), test rows near 0.5 (non-member); forget row 0 (true-class probability 0.9) looks like a
    member, rows 1-3 (0.2) like non-members -> MIA 75 (the share of forget rows predicted non-member)."""
    y = torch.zeros(4, dtype=torch.long)
    forget = prediction_summary(_logits(np.array([0.9, 0.2, 0.2, 0.2]))[0].flip(-1), y)  # class 0 prob 0.9, 0.2...
    retain = prediction_summary(torch.tensor([[5.0, 0], [5, 0], [5, 0], [0, 5]]), y)
    test = prediction_summary(torch.tensor([[0.1, 0], [0.1, 0], [0, 0.1], [0, 0.1]]), y)
    assert forget["accuracy"] == 0.25 and retain["accuracy"] == 0.75 and test["accuracy"] == 0.5
    scores = unlearning_scores(forget, retain, test, feature="confidence")
    assert scores["UA"] == pytest.approx(75) and scores["RA"] == pytest.approx(75) and scores["TA"] == pytest.approx(50)
    assert set(scores) == {"UA", "RA", "TA", "MIA"} and scores["MIA"] == pytest.approx(75)
    assert unlearning_scores(forget, retain, test, feature="loss")["UA"] == pytest.approx(75)
    # a clear-cut case for every feature: retain rows right and confident (loss <= 0.02), test rows unsure (loss
    # 0.64-0.74); forget rows 0-1 like retain, 2-3 like test -> half predicted non-member: MIA 50
    retain = prediction_summary(torch.tensor([[5.0, 0], [5, 0], [4, 0], [4, 0]]), y)
    test = prediction_summary(torch.tensor([[0.1, 0], [0.1, 0], [0, 0.1], [0, 0.1]]), y)
    forget = prediction_summary(torch.tensor([[5.0, 0], [4, 0], [0, 0.1], [0, 0.3]]), y)
    for feature in ("confidence", "entropy", "loss"):
        assert unlearning_scores(forget, retain, test, feature=feature)["MIA"] == pytest.approx(50), feature
    forget = prediction_summary(torch.tensor([[0, 0.1], [0, 0.2], [0, 0.1], [0, 0.3]]), y)  # all like test rows
    assert unlearning_scores(forget, retain, test, feature="loss")["MIA"] == pytest.approx(100)


def test_avg_gap_by_hand():
    """|10-12| + |90-95| + |80-79| + |20-30| = 2 + 5 + 1 + 10 = 18, over 4 keys: 4.5."""
    scores = {"UA": 10.0, "RA": 90.0, "TA": 80.0, "MIA": 20.0}
    retrain = {"UA": 12.0, "RA": 95.0, "TA": 79.0, "MIA": 30.0}
    assert avg_gap(scores, retrain) == pytest.approx(4.5)
    assert avg_gap(retrain, scores) == pytest.approx(4.5)
    assert avg_gap(scores, dict(scores)) == 0.0  # identical models: no gap
    assert avg_gap(scores, retrain, keys=("UA", "MIA")) == pytest.approx(6.0)
    with pytest.raises(ValueError, match=r"missing: \['MIA'\]"):
        avg_gap({k: v for k, v in scores.items() if k != "MIA"}, retrain)
