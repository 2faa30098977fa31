"""Detection metrics, perplexity and attacks against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_lm

from lit_align.metrics.detection import (
    DetectionMetrics,
    Paraphraser,
    ShuffleWordsParaphraser,
    fpr_at_tpr,
    perplexity,
    random_substitution,
    roc_curve_points,
    tpr_at_fpr,
    word_deletion,
)
from lit_align.metrics.unlearning import binary_auc


def test_fpr_at_tpr_matches_the_percentile_definition():
    """core.md §3.9 item 5. Positives {1,2,3,4}: the 25th percentile (linear) is 1 + 0.75 * (2 - 1) = 1.75;
    negatives {0, 2.5}: only 2.5 is above it, FPR@TPR75 = 1/2. At TPR 100% the threshold is min = 1
    (FPR 1/2); at TPR 25% it is the 75th percentile 3.25 (FPR 0)."""
    pos, neg = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.5])
    assert fpr_at_tpr(pos, neg, 0.75) == 0.5
    assert fpr_at_tpr(pos, neg, 1.0) == 0.5
    assert fpr_at_tpr(pos, neg, 0.25) == 0.0
    assert fpr_at_tpr([3.0, 4.0], [0.0, 2.5], 0.75) == 0.0  # separable: no negative above 3.25


def test_tpr_at_fpr_thresholds_on_the_negatives():
    """Negatives 0..99, FPR budget 1% = one negative: the threshold 98.5 flags {98.5, 200} of the positives
    and only the negative 99, TPR = 2/4. At FPR 50% (50 negatives) the threshold 50 flags negatives 50..99
    and all four positives."""
    neg = torch.arange(100, dtype=torch.float64)
    pos = torch.tensor([50.0, 98.0, 98.5, 200.0])
    assert tpr_at_fpr(pos, neg, 0.01) == 0.5
    assert tpr_at_fpr(pos, neg, 0.5) == 1.0


def _brute_force_tpr_at_fpr(pos: torch.Tensor, neg: torch.Tensor, fpr: float) -> tuple[float, float]:
    """Every candidate threshold (each score, and +inf): flag scores >= it; keep those whose realised FPR is
    at most ``fpr``; return the best TPR and the realised FPR of that threshold."""
    best = (0.0, 0.0)
    for t in [*torch.cat([pos, neg]).tolist(), math.inf]:
        realised = (neg >= t).double().mean().item()
        if realised <= fpr + 1e-12:
            best = max(best, ((pos >= t).double().mean().item(), realised))
    return best


@pytest.mark.parametrize("n_neg", [16, 64, 150])
def test_tpr_at_fpr_never_exceeds_the_fpr_budget(n_neg):
    """On small sets the realised FPR stays within the target (1%: zero negatives of 16 or 64, one of 150)
    and the TPR is the best any threshold reaches under that budget, found by trying every threshold."""
    g = torch.Generator().manual_seed(n_neg)
    neg = torch.randn(n_neg, generator=g, dtype=torch.float64)
    pos = torch.randn(40, generator=g, dtype=torch.float64) + 1.5
    for target in (0.01, 0.05, 0.1):
        tpr, realised = _brute_force_tpr_at_fpr(pos, neg, target)
        assert realised <= target
        assert tpr_at_fpr(pos, neg, target) == pytest.approx(tpr)
    if n_neg < 100:  # 1% allows no negative: the threshold sits above the highest one (the old rule let it in)
        assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx((pos > neg.max()).double().mean().item())


def test_tpr_at_fpr_with_ties_counts_a_tied_positive_with_its_negative():
    """Scores tied across classes move together: negatives {1, 2, 3, 3}, positives {3, 3, 4}. At 25% one
    negative may be flagged, but the threshold 3 flags two, so the best is the threshold 4: TPR 1/3. At 50%
    the threshold 3 (two negatives) flags all three positives."""
    pos, neg = torch.tensor([3.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 3.0])
    assert tpr_at_fpr(pos, neg, 0.25) == pytest.approx(1 / 3)
    assert tpr_at_fpr(pos, neg, 0.5) == 1.0


@pytest.mark.parametrize("bad", [0.0, 1.5, 90])
def test_rates_must_be_fractions(bad):
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        fpr_at_tpr([1.0], [0.0], bad)


def test_detection_metrics_auroc_half_for_identical_and_one_for_separable():
    """Identical score multisets: every positive-negative pair is a tie or mirrored, AUROC = 0.5.
    Separable (all positives above all negatives): AUROC 1, TPR@1%FPR 1, FPR@90/99%TPR 0."""
    m = DetectionMetrics()
    same = torch.tensor([0.1, 0.4, 0.7, 0.9])
    m.update(same, torch.ones(4))
    m.update(same, torch.zeros(4))
    assert m.compute()["auroc"].item() == 0.5

    m = DetectionMetrics()
    m.update(torch.tensor([2.0, 3.0, 0.0]), torch.tensor([1, 1, 0]))
    m.update(torch.tensor([4.0, -1.0]), torch.tensor([1, 0]))
    out = m.compute()
    assert set(out) == {"auroc", "tpr_at_fpr_1", "fpr_at_tpr_90", "fpr_at_tpr_99"}
    assert out["auroc"].item() == 1.0 and out["tpr_at_fpr_1"].item() == 1.0
    assert out["fpr_at_tpr_90"].item() == 0.0 and out["fpr_at_tpr_99"].item() == 0.0


def test_detection_metrics_levels_name_the_keys_and_match_the_functions():
    m = DetectionMetrics(fpr_levels=(0.005, 0.1), tpr_levels=(0.75,))
    pos, neg = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.5])
    m.update(torch.cat([pos, neg]), torch.tensor([1, 1, 1, 1, 0, 0]))
    out = m.compute()
    assert set(out) == {"auroc", "tpr_at_fpr_0_5", "tpr_at_fpr_10", "fpr_at_tpr_75"}
    assert out["fpr_at_tpr_75"].item() == 0.5
    # AUROC by hand: pairs (pos > neg) over 8: vs 0 all 4 win; vs 2.5 only 3 and 4 win -> 6/8
    assert out["auroc"].item() == 0.75


def test_roc_curve_points_by_hand_and_area_equals_binary_auc():
    """Scores 0.9(+) 0.8(-) 0.8(+) 0.1(-): thresholds inf, 0.9, 0.8, 0.1 give
    (fpr, tpr) = (0,0), (0,1/2), (1/2,1), (1,1); trapezoids 0 + 1/2 * 3/4 + 1/2 * 1 = 0.875 = binary_auc."""
    scores, labels = torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([1, 0, 1, 0])
    fpr, tpr, thr = roc_curve_points(scores, labels)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert thr[0].item() == math.inf and thr[1:].tolist() == pytest.approx([0.9, 0.8, 0.1])
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(0.875) == binary_auc(scores, labels)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_points_equal_torchmetrics_binary_roc_with_ties(seed):
    """Scores in [0, 1] rounded to 0.05 (many ties within and across classes): the same (fpr, tpr) points as
    torchmetrics' binary_roc, and the same thresholds after the first (torchmetrics starts at 1.0, here +inf)."""
    from torchmetrics.functional.classification import binary_roc

    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(40 + 13 * seed, generator=g, dtype=torch.float64) * 20).round() / 20
    labels = (torch.rand(len(scores), generator=g) < 0.5).long()
    labels[:2] = torch.tensor([0, 1])
    fpr, tpr, thr = roc_curve_points(scores, labels)
    ref_fpr, ref_tpr, ref_thr = binary_roc(scores, labels)
    torch.testing.assert_close(fpr, ref_fpr.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(tpr, ref_tpr.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(thr[1:], ref_thr[1:].double())


def test_perplexity_is_exp_of_mean_token_nll_per_sample_then_averaged():
    model = tiny_lm("qwen2", vocab_size=50, hidden_size=32, seed=0)
    ids = torch.tensor([[3, 5, 7, 9], [4, 6, 8, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1): token t + 1 given the prefix
    expected = torch.stack([nll[0, :3].mean().exp(), nll[1, :2].mean().exp()])
    per_row = perplexity(model, ids, attn, attn, reduction="none")
    assert torch.allclose(per_row, expected, rtol=1e-4)
    assert perplexity(model, ids, attn, attn).item() == pytest.approx(expected.mean().item(), rel=1e-4)


def test_random_substitution_changes_exactly_the_ratio_of_masked_tokens():
    """Rows with 8 and 4 continuation tokens at ratio 0.5 get 4 and 2 changes, none in the prompt."""
    ids = torch.arange(24).reshape(2, 12) % 10
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 4:12] = 1
    mask[1, 4:8] = 1
    out = random_substitution(ids, mask, 0.5, vocab_size=10, generator=torch.Generator().manual_seed(0))
    changed = out != ids
    assert changed[0].sum().item() == 4 and changed[1].sum().item() == 2
    assert not (changed & ~mask.bool()).any() and out.max() < 10
    same = random_substitution(ids, mask, 0.5, vocab_size=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert torch.equal(random_substitution(ids, mask, 0.0, 10), ids)


def test_word_deletion_and_shuffle_paraphraser():
    text = "one two three four five six seven eight nine ten"
    out = word_deletion(text, 0.3, random.Random(0))
    kept = out.split()
    assert len(kept) == 7 and all(w in text.split() for w in kept)
    assert kept == [w for w in text.split() if w in kept]  # order kept
    para = ShuffleWordsParaphraser(seed=0)
    assert isinstance(para, Paraphraser)
    (shuffled,) = para([text])
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
