"""Unlearning metrics against values worked out by hand and against independent libraries
(torchmetrics' ROUGE, scipy, scikit-learn), on ties, short and non-ASCII inputs."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from conftest import gloo_group, spawn_ranks
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.text.rouge import rouge_score as tm_rouge_score

from lit_align.metrics import (
    MeanNLL,
    MinKProbMIA,
    MultipleChoiceAccuracy,
    RougeLRecall,
    TruthRatio,
    binary_auc,
    forget_quality,
    harmonic_mean,
    ks_2samp_pvalue,
    ks_statistic,
    metric_conventions,
    min_k_prob_score,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)

LN2, LN4, LN8 = math.log(2), math.log(4), math.log(8)


# -- ROUGE-L ------------------------------------------------------------------------------------
def test_rouge_l_recall_hand_cases():
    """LCS over reference words:
    * "born in the town of Nettleby" vs "She was born in Nettleby": LCS = born in nettleby (3) / 5 = 0.6;
    * case and punctuation are ignored: "MIRA, baker!" vs "mira baker" = 2/2;
    * order matters: "b a" vs "a b" -> LCS 1 of 2;
    * extra predicted words are free: "x a y b z" vs "a b" = 1.0;
    * nothing in common = 0; a reference without words = 0;
    * stemming (default): "it worked" vs "it works" = 2/2 (both stem to "work"); without it 1/2;
    * rouge-score keeps ASCII letters and digits only: a CJK reference has no words (0.0), and
      "café" is the word "caf", so it does not match "cafe"."""
    assert rouge_l_recall("born in the town of Nettleby", "She was born in Nettleby") == pytest.approx(0.6)
    assert rouge_l_recall("MIRA, baker!", "mira baker") == 1.0
    assert rouge_l_recall("b a", "a b") == 0.5
    assert rouge_l_recall("x a y b z", "a b") == 1.0
    assert rouge_l_recall("cat", "dog house") == 0.0
    assert rouge_l_recall("anything", "?!") == 0.0
    assert rouge_l_recall("it worked", "it works") == 1.0
    assert rouge_l_recall("it worked", "it works", use_stemmer=False) == 0.5
    assert rouge_l_recall("東京に住む", "東京に住む") == 0.0
    assert rouge_l_recall("un café noir", "un cafe noir") == pytest.approx(2 / 3)


ROUGE_PAIRS = [
    ("born in the town of Nettleby", "She was born in Nettleby"),
    ("it worked", "it works"),
    ("The runners were running; she runs daily.", "runner runs and ran, running daily"),
    ("studies studying studied", "the student studies"),
    ("a a a b", "a b a b a"),  # repeated words: several LCS alignments
    ("b a b a", "a b"),
    ("word", "word"),  # one word
    ("word", "words"),
    ("", "something here"),  # empty prediction
    ("anything", ""),  # empty reference
    ("", ""),
    ("Mira's cake, 2 eggs!", "mira s cake 2 eggs"),  # punctuation, digits
    ("well-known e-mail (2024)", "well known email 2024"),
    ("Zoë Brontë lived in Orléans", "Zoe Bronte lived in Orleans"),  # accents
    ("Łódź ist schön, die Straße", "Lodz ist schon die Strasse"),
    ("東京 Tokyo 大学", "Tokyo 東京 university"),  # CJK mixed with Latin
    ("Москва столица", "Moscow is the capital"),  # Cyrillic
    ("generously generalised generalizations", "generalization generous general"),
]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_l_recall_equals_torchmetrics_rouge(use_stemmer):
    """torchmetrics' ROUGE (its own tokeniser and LCS, the same Porter stemmer) gives the same
    ROUGE-L recall on every pair: punctuation, ties between LCS alignments, one word, empty texts,
    accents, CJK and Cyrillic; the metric class averages the same values."""
    metric = RougeLRecall(use_stemmer=use_stemmer)
    expected = []
    for prediction, reference in ROUGE_PAIRS:
        ref = tm_rouge_score([prediction], [reference], rouge_keys="rougeL", use_stemmer=use_stemmer)
        expected.append(ref["rougeL_recall"].item())
        got = rouge_l_recall(prediction, reference, use_stemmer=use_stemmer)
        assert got == pytest.approx(expected[-1], abs=1e-6), (prediction, reference)
    metric.update(*zip(*ROUGE_PAIRS))
    assert metric.compute().item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    # stemming matters on these pairs: the two settings differ somewhere
    assert any(rouge_l_recall(p, r) != rouge_l_recall(p, r, use_stemmer=False) for p, r in ROUGE_PAIRS)


def test_rouge_metric_averages_over_batches():
    metric = RougeLRecall()
    metric.update(["born in the town of Nettleby"], ["She was born in Nettleby"])  # 0.6
    metric.update(["a b", "b a"], ["a b", "a b"])  # 1.0, 0.5
    assert metric.compute().item() == pytest.approx((0.6 + 1.0 + 0.5) / 3)
    unstemmed = RougeLRecall(use_stemmer=False)
    unstemmed.update(["it worked"], ["it works"])
    assert unstemmed.compute().item() == 0.5


# -- truth ratio --------------------------------------------------------------------------------
def test_truth_ratio_hand_values():
    """Row 0: P(a') = exp(-ln 2) = 1/2, P(perturbed) = 1/4 twice -> TR = (1/4) / (1/2) = 0.5.
    Row 1: P(a') = 1, perturbed P = 1/2 and 1/8: arithmetic mean 5/16 -> TR = 0.3125;
    geometric: exp(0 - (ln 2 + ln 8) / 2) = exp(-ln 4) = 0.25."""
    para = torch.tensor([LN2, 0.0])
    pert = torch.tensor([[LN4, LN4], [LN2, LN8]])
    torch.testing.assert_close(truth_ratio(para, pert), torch.tensor([0.5, 0.3125]))
    torch.testing.assert_close(truth_ratio(para, pert, mean="geometric"), torch.tensor([0.5, 0.25]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        truth_ratio(para, pert[0])
    with pytest.raises(ValueError, match="mean"):
        TruthRatio(mean="harmonic")


def test_truth_ratio_scores_and_metric():
    """TR = [0.5, 2]: forget score = mean(min(TR, 1/TR)) = (0.5 + 0.5) / 2 = 0.5;
    retain score = mean(max(0, 1 - TR)) = (0.5 + 0) / 2 = 0.25; mean TR = 1.25."""
    ratios = torch.tensor([0.5, 2.0])
    assert truth_ratio_score(ratios, "forget").item() == pytest.approx(0.5)
    assert truth_ratio_score(ratios, "retain").item() == pytest.approx(0.25)
    metric = TruthRatio()
    metric.update(torch.tensor([LN2]), torch.tensor([[LN4, LN4]]))  # TR 0.5
    metric.update(torch.tensor([LN4]), torch.tensor([[LN2]]))  # P(a') = 1/4, P(pert) = 1/2 -> TR 2
    out = metric.compute()
    torch.testing.assert_close(out["ratios"], torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert out["mean"].item() == pytest.approx(1.25)
    assert out["forget_score"].item() == pytest.approx(0.5)
    assert out["retain_score"].item() == pytest.approx(0.25)


# -- Kolmogorov-Smirnov -------------------------------------------------------------------------
def _d(x: list[float], y: list[float]) -> float:
    """KS statistic by hand: the largest CDF gap over every pooled value."""
    return max(abs(sum(a <= v for a in x) / len(x) - sum(b <= v for b in y) / len(y)) for v in x + y)


def _enumerated_pvalue(x: list[float], y: list[float]) -> float:
    """Brute force: over all C(n+m, n) ways to split the pooled values, the share with D >= D_obs."""
    pooled, n = x + y, len(x)
    d_obs = _d(x, y)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        xs = [pooled[i] for i in chosen]
        ys = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        hits += _d(xs, ys) >= d_obs - 1e-12
    return hits / total


def test_ks_exact_hand_cases():
    """x = [1,2,3], y = [4,5,6]: D = 1. Of the C(6,3) = 20 orderings only "all x first" and
    "all y first" reach D = 1, so p = 2/20 = 0.1. Likewise [1,2] vs [3,4]: 2 / C(4,2) = 1/3.
    Identical samples: D = 0, p = 1. One value each: both orderings give D = 1, p = 1."""
    assert ks_2samp_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert ks_2samp_pvalue(torch.tensor([4.0, 5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.1)
    assert ks_2samp_pvalue([1, 2], [3, 4]) == pytest.approx(1 / 3)
    assert ks_2samp_pvalue([0.3, 0.1, 0.2], [0.2, 0.1, 0.3]) == 1.0
    assert ks_2samp_pvalue([0.0], [1.0]) == 1.0
    assert ks_statistic([1, 2, 3], [2, 3, 4]) == pytest.approx(1 / 3)
    assert forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


@pytest.mark.parametrize("n,m", [(3, 3), (4, 6), (5, 3), (2, 7), (6, 6)])
def test_ks_exact_matches_enumeration(n, m):
    rng = random.Random(n * 10 + m)
    x = [rng.random() for _ in range(n)]
    y = [rng.random() + 0.2 for _ in range(m)]
    assert ks_2samp_pvalue(x, y, method="exact") == pytest.approx(_enumerated_pvalue(x, y), abs=1e-12)
    assert ks_statistic(x, y) == pytest.approx(_d(x, y), abs=1e-12)


@pytest.mark.parametrize("n,m", [(7, 5), (40, 60), (300, 300), (999, 1001), (1000, 1000), (1001, 1001), (1500, 900)])
def test_ks_equals_scipy_with_ties_around_the_old_switch(n, m):
    """Samples rounded to one decimal (many ties), sizes on both sides of n * m = 1e6 where the old
    hand-written test switched to the Kolmogorov limit: every method equals scipy's, and "auto"
    stays exact (scipy's rule: exact while both samples have at most 10,000 values)."""
    rng = np.random.default_rng(n * 7919 + m)
    x = rng.normal(0.0, 1.0, n).round(1)
    y = rng.normal(0.08, 1.0, m).round(1)
    for method in ("auto", "exact", "asymp"):
        expected = ks_2samp(x, y, method=method).pvalue
        got = ks_2samp_pvalue(x.tolist(), torch.tensor(y), method=method)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert ks_2samp_pvalue(x, y) == pytest.approx(ks_2samp(x, y, method="exact").pvalue, rel=1e-12, abs=1e-15)
    assert ks_statistic(x, y) == ks_2samp(x, y).statistic


def test_ks_rejects_empty_nan_and_unknown_method():
    with pytest.raises(ValueError, match="non-empty"):
        ks_2samp_pvalue([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        forget_quality([1.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="method"):
        ks_2samp_pvalue([1.0], [2.0], method="permutation")


# -- Min-K% and AUC -----------------------------------------------------------------------------
def test_min_k_prob_score_hand_values():
    """Row 0: 4 tokens, k = 0.5 keeps the 2 lowest (-4, -3): score = 3.5.
    Row 1: 3 scored tokens (the -100 is masked out), floor(1.5) = 1 token kept: -5 -> score 5.
    Row 2: k * 1 token < 1 still keeps one token: score 2. A row with no tokens is NaN."""
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -5.0, -3.0, -100.0], [-2.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    score = min_k_prob_score(logps, mask, k=0.5)
    torch.testing.assert_close(score[:3], torch.tensor([3.5, 5.0, 2.0]))
    assert torch.isnan(score[3])
    assert min_k_prob_score(logps[:1], mask[:1], k=1.0).item() == pytest.approx(2.5)  # plain mean NLL


def test_binary_auc_hand_values():
    """Identical score sets -> every positive/negative pair ties or cancels: 0.5. Separable -> 1.
    pos [0.9, 0.4] vs neg [0.5, 0.1]: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1, lost 0.4<0.5 -> 3/4.
    Scores far above 1 (where a sigmoid would round to 1.0): still ranked, pos [100, 50] vs neg [60, 40] -> 3/4."""
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    assert binary_auc(torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0]), labels) == pytest.approx(0.5)
    assert binary_auc(torch.tensor([5.0, 6.0, 7.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert binary_auc(torch.tensor([0.9, 0.4, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.75)
    assert binary_auc(torch.tensor([100.0, 50.0, 60.0, 40.0]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both classes"):
        binary_auc(torch.tensor([1.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="NaN"):
        binary_auc(torch.tensor([1.0, float("nan")]), torch.tensor([1, 0]))


@pytest.mark.parametrize("seed", range(4))
def test_binary_auc_equals_sklearn_and_torchmetrics_with_ties(seed):
    """Random scores rounded to one decimal (ties within and across classes), some large: equal to
    scikit-learn's roc_auc_score (the independent reference)."""
    g = torch.Generator().manual_seed(seed)
    n = 30 + 17 * seed
    scores = (torch.randn(n, generator=g, dtype=torch.float64) * (1 + 20 * seed)).round(decimals=1)
    labels = (torch.rand(n, generator=g) < 0.4).long()
    labels[:2] = torch.tensor([0, 1])
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert binary_auc(scores, labels) == pytest.approx(expected, abs=1e-6)  # torchmetrics computes in float32


def test_min_k_mia_metric():
    """Identical member / non-member log-probs -> AUC 0.5; forget texts far less likely -> 1.0."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -4.0]])
    mask = torch.ones_like(logps)
    same = MinKProbMIA(k=0.5)
    same.update(logps, mask, torch.tensor([1, 1]))
    same.update(logps, mask, torch.tensor([0, 0]))
    assert same.compute().item() == pytest.approx(0.5)
    separable = MinKProbMIA(k=0.5)
    separable.update(logps - 10, mask, torch.tensor([1, 1]))
    separable.update(logps, mask, torch.tensor([0, 0]))
    assert separable.compute().item() == 1.0


def test_min_k_mia_open_unlearning_convention():
    """open-unlearning labels forget scores 0 and holdout scores 1 and calls sklearn's roc_auc_score
    (src/evals/metrics/mia/utils.py): that convention here equals that recipe, and 1 - the default."""
    g = torch.Generator().manual_seed(3)
    logps = (-torch.rand(12, 6, generator=g) * 4).round(decimals=1)
    mask = (torch.rand(12, 6, generator=g) > 0.2).long()
    mask[:, 0] = 1
    labels = torch.tensor([1, 0] * 6)  # 1 = forget
    ours, theirs = MinKProbMIA(k=0.4), MinKProbMIA(k=0.4, convention="open_unlearning")
    for metric in (ours, theirs):
        metric.update(logps, mask, labels)
    scores = min_k_prob_score(logps, mask, k=0.4).numpy()
    recipe = roc_auc_score(1 - labels.numpy(), scores)  # forget -> 0, holdout -> 1
    assert theirs.compute().item() == pytest.approx(recipe, abs=1e-6)
    assert ours.compute().item() == pytest.approx(1 - recipe, abs=1e-6)
    assert 0.0 < recipe < 1.0 and recipe != 0.5
    with pytest.raises(ValueError, match="convention"):
        MinKProbMIA(convention="member_positive")


def test_metric_conventions_name_their_sources():
    default = metric_conventions(truth_ratio_mean="arithmetic", mia_convention="forget_positive", rouge_stemmer=True)
    other = metric_conventions(truth_ratio_mean="geometric", mia_convention="open_unlearning", rouge_stemmer=False)
    assert len(default) == len(other) == 3 and all("\n" not in line for line in default + other)
    assert "arithmetic" in default[0] and "WAGLE" in default[0]
    assert "geometric" in other[0] and "TOFU" in other[0] and "open-unlearning" in other[0]
    assert "forget = positive" in default[1] and "open-unlearning" in other[1]
    assert "Porter stemmer" in default[2] and "without stemming" in other[2]
    with pytest.raises(ValueError, match="truth_ratio_mean"):
        metric_conventions(truth_ratio_mean="median", mia_convention="forget_positive", rouge_stemmer=True)
    with pytest.raises(ValueError, match="mia_convention"):
        metric_conventions(truth_ratio_mean="geometric", mia_convention="x", rouge_stemmer=True)
    original = metric_conventions(truth_ratio_mean="geometric", mia_convention="open_unlearning", rouge_stemmer=True,
                                  truth_ratio_question="original")
    para = metric_conventions(truth_ratio_mean="geometric", mia_convention="open_unlearning", rouge_stemmer=True,
                              truth_ratio_question="paraphrased")
    assert original[:3] == para[:3] == metric_conventions(truth_ratio_mean="geometric", mia_convention="open_unlearning",
                                                          rouge_stemmer=True)
    assert "original question" in original[3] and "TOFU" in original[3] and "open-unlearning" in original[3]
    assert "paraphrased question" in para[3] and "TOFU and open-unlearning condition on the original" in para[3]
    with pytest.raises(ValueError, match="truth_ratio_question"):
        metric_conventions(truth_ratio_mean="geometric", mia_convention="forget_positive",
                           rouge_stemmer=True, truth_ratio_question="both")


# -- utility, NLL, multiple choice --------------------------------------------------------------
def test_harmonic_mean():
    """[1, 0.5]: 2 / (1 + 2) = 2/3; [0.2, 0.3, 0.6]: 3 / (5 + 10/3 + 5/3) = 0.3; any 0 -> 0."""
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.2, 0.3, 0.6]) == pytest.approx(0.3)
    assert harmonic_mean([0.7, 0.0, 0.9]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([-1.0])


def test_mean_nll_metric():
    """Tokens -1, -2 | -3 (third position masked): NLL = 6/3 = 2; P = mean(exp(-1.5), exp(-3));
    accuracy = 2 correct of 3 scored tokens. Splitting the batch in two gives the same numbers."""
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    correct = torch.tensor([[True, False, True], [True, False, False]])
    whole, split = MeanNLL(), MeanNLL()
    whole.update(logps, mask, correct)
    split.update(logps[:1], mask[:1], correct[:1])
    split.update(logps[1:], mask[1:], correct[1:])
    expected = {"nll": 2.0, "prob": (math.exp(-1.5) + math.exp(-3)) / 2, "accuracy": 2 / 3}
    for metric in (whole, split):
        out = metric.compute()
        assert {k: pytest.approx(v.item()) for k, v in out.items()} == expected


def test_multiple_choice_accuracy():
    """argmax rows: [0, 1, -inf] -> 1 (label 1, right); [2, 1, 0] -> 0 (label 1, wrong); [0, 0, 5] -> 2 (right)."""
    metric = MultipleChoiceAccuracy()
    metric.update(torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 1.0, 0.0]]), torch.tensor([1, 1]))
    metric.update(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([2]))
    assert metric.compute().item() == pytest.approx(2 / 3)


# -- two processes ------------------------------------------------------------------------------
def _metrics_worker(rank: int, world: int, init: str, queue) -> None:

    with gloo_group(rank, world, init):
        try:
            queue.put((rank, _shard_values(rank, world)))
        except Exception as err:  # report instead of leaving the parent waiting
            queue.put((rank, repr(err)))


def _shard_values(rank: int, world: int) -> dict[str, float]:
    """Update every metric with this rank's rows of a fixed data set; return the computed values."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(8, 5, generator=g) * 3
    mask = (torch.rand(8, 5, generator=g) > 0.2).long()
    correct = torch.rand(8, 5, generator=g) > 0.5
    labels = torch.tensor([1, 0] * 4)
    para, pert = torch.rand(8, generator=g), torch.rand(8, 3, generator=g)
    choices, answer = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    texts = [("a b c", "a c"), ("x y", "y x"), ("p q r", "q"), ("m", "n")] * 2
    rows = slice(rank, None, world)
    nll, mia, tr, mc, rouge = MeanNLL(), MinKProbMIA(), TruthRatio(), MultipleChoiceAccuracy(), RougeLRecall()
    nll.update(logps[rows], mask[rows], correct[rows])
    mia.update(logps[rows], mask[rows], labels[rows])
    tr.update(para[rows], pert[rows])
    mc.update(choices[rows], answer[rows])
    rouge.update(*zip(*texts[rows]))
    out = {f"nll_{k}": v.item() for k, v in nll.compute().items()}
    trs = tr.compute()
    out.update(mia=mia.compute().item(), tr_mean=trs["mean"].item(), tr_sorted=sorted(trs["ratios"].tolist()),
               mc=mc.compute().item(), rouge=rouge.compute().item())
    return out


def test_metrics_reduce_across_two_processes(tmp_path):
    """Two gloo processes, each updating with half the rows, compute what one process computes."""
    results = spawn_ranks(_metrics_worker, tmp_path)
    single = _shard_values(0, 1)
    for rank in (0, 1):
        assert results[rank].pop("tr_sorted") == pytest.approx(single["tr_sorted"])
        assert results[rank] == pytest.approx({k: v for k, v in single.items() if k != "tr_sorted"})
