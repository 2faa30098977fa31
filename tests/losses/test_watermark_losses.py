"""The watermark detector's objective: which pairs carry the score penalty (reference code: the main one only)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.losses import DetectorPair, detector_loss, detector_objective


def _bce(margin: float) -> float:
    return math.log1p(math.exp(-margin))


def test_penalty_on_the_main_pair_only_by_default():
    """Hand check (reg 0.01): main [1] vs [0], one extra pair [2] vs [0] at weight 0.5."""
    s_w, s_h = torch.tensor([1.0]), torch.tensor([0.0])
    extra = [DetectorPair("paraphrase", torch.tensor([2.0]), torch.tensor([0.0]), 0.5)]
    loss, metrics = detector_objective(s_w, s_h, extra, reg=0.01)
    expected = _bce(1.0) + 0.01 * 1.0 + 0.5 * _bce(2.0)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(metrics["paraphrase/loss"]) == pytest.approx(_bce(2.0), abs=1e-6)
    assert float(metrics["paraphrase/accuracy"]) == 1.0 and float(metrics["accuracy"]) == 1.0
    every, _ = detector_objective(s_w, s_h, extra, reg=0.01, reg_extra=True)
    assert float(every) == pytest.approx(expected + 0.5 * 0.01 * 4.0, abs=1e-6)


def test_every_robustness_term_is_a_bare_pairwise_loss():
    """Paraphrase, substitution and other-LLM pairs at weight 1 add their -log sigmoid only; with no
    extra pair the objective is ``detector_loss``."""
    g = torch.Generator().manual_seed(0)
    s_w, s_h, para, sub, other = (torch.randn(4, generator=g) * 3 for _ in range(5))
    pairs = [DetectorPair("paraphrase", para, s_h), DetectorPair("substitution", sub, s_h),
             DetectorPair("other_llm", s_w, other)]
    loss, metrics = detector_objective(s_w, s_h, pairs, reg=1e-4)
    main, _ = detector_loss(s_w, s_h, reg=1e-4)
    bare = sum(detector_loss(p.watermarked, p.negatives, reg=0.0)[0] for p in pairs)
    torch.testing.assert_close(loss, main + bare)
    assert {"paraphrase/loss", "substitution/loss", "other_llm/loss"} <= set(metrics)
    alone, _ = detector_objective(s_w, s_h, reg=1e-4)
    torch.testing.assert_close(alone, main)
