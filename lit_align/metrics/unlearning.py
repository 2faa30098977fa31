"""Unlearning metrics: TOFU-style scores as pure functions, and torchmetrics ``Metric`` wrappers.

Pure functions (tensors or strings in, numbers out; each checked by hand in
``tests/metrics/test_unlearning_metrics.py``):

* :func:`rouge_l_recall` -- word-level LCS over the reference length (TOFU's ROUGE-L recall);
* :func:`truth_ratio` -- TOFU truth ratio from paraphrased / perturbed answer NLLs;
* :func:`ks_2samp_pvalue` / :func:`forget_quality` -- two-sided two-sample Kolmogorov--Smirnov
  p-value (exact lattice-path count for small samples, the Kolmogorov limit for large ones);
* :func:`min_k_prob_score` -- Min-K% Prob membership score; :func:`binary_auc` -- ROC-AUC;
* :func:`harmonic_mean` -- TOFU model utility.

Metric classes keep their states as sums or concatenations (``dist_reduce_fx="sum"`` /
``"cat"``), so ``compute()`` gives the same value on one process as on several that each saw a
shard of the data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "MeanNLL",
    "MinKProbMIA",
    "MultipleChoiceAccuracy",
    "RougeLRecall",
    "TruthRatio",
    "binary_auc",
    "forget_quality",
    "harmonic_mean",
    "kolmogorov_sf",
    "ks_2samp_pvalue",
    "ks_statistic",
    "min_k_prob_score",
    "rouge_l_recall",
    "rouge_tokens",
    "truth_ratio",
    "truth_ratio_score",
]

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits (any script); punctuation, '_' and spaces split


# -- text --------------------------------------------------------------------------------------
def rouge_tokens(text: str) -> list[str]:
    """Lowercased runs of letters/digits: ``"Mira's cake, 2 eggs!"`` -> ``['mira', 's', 'cake', '2', 'eggs']``.

    Whitespace and punctuation both separate words and are dropped (no stemming, no stop words);
    close to ``rouge_score``'s default tokeniser without the Porter stemmer, but also keeping
    non-Latin letters.
    """
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one-row dynamic programme, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_row = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = prev_row
    return row[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: ``LCS(prediction, reference) / len(reference)`` over :func:`rouge_tokens` words.

    1.0 when every reference word appears in the prediction in order (extra words are free),
    0.0 when none does, and 0.0 for a reference without words.
    Example: prediction "born in the town of Nettleby", reference "She was born in Nettleby"
    -> LCS ``born in nettleby`` = 3 words of 5 -> 0.6.

    No stemming: TOFU's published ROUGE numbers come from the ``rouge_score`` package with a Porter
    stemmer (``works``/``worked`` match there, not here), so compare runs scored the same way.
    """
    ref = rouge_tokens(reference)
    if not ref:
        return 0.0
    return _lcs_length(rouge_tokens(prediction), ref) / len(ref)


# -- truth ratio ---------------------------------------------------------------------------------
def truth_ratio(paraphrased_nll: Tensor, perturbed_nll: Tensor,
                mean: Literal["arithmetic", "geometric"] = "arithmetic") -> Tensor:
    """TOFU truth ratio of each question: ``mean_k P(perturbed_k | q') / P(paraphrased | q')``.

    ``P(a | q) = exp(-NLL)`` with NLL the mean per-token negative log-likelihood of the answer
    (a length-normalised probability). Computed in log space:
    ``TR = exp(nll_para + logsumexp_k(-nll_k) - log K)``. TR < 1: the model prefers the true
    (paraphrased) answer; TR ~ 1: it cannot tell the true answer from perturbed ones.

    Args:
        paraphrased_nll: (N,) mean-token NLL of the paraphrased true answer given the
            paraphrased question.
        perturbed_nll: (N, K) mean-token NLL of K perturbed (false) answers to the same question.
        mean: ``"arithmetic"`` averages the K probabilities (the formula above, as in WAGLE's TOFU
            evaluation: Jia et al. 2024, arXiv 2410.17509, released code github.com/OPTML-Group/WAGLE,
            ``src/metrics/Tofu.py``);
            ``"geometric"`` averages the K NLLs before exponentiating, as implementations that
            average losses first do: ``TR = exp(nll_para - mean_k nll_k)``.

    Returns:
        (N,) float truth ratios.
    """
    if paraphrased_nll.ndim != 1 or perturbed_nll.ndim != 2 or perturbed_nll.shape[0] != paraphrased_nll.shape[0]:
        raise ValueError(f"truth_ratio expects paraphrased_nll (N,) and perturbed_nll (N, K), got "
                         f"{tuple(paraphrased_nll.shape)} and {tuple(perturbed_nll.shape)}")
    if perturbed_nll.shape[1] == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer per question (K >= 1)")
    para, pert = paraphrased_nll.double(), perturbed_nll.double()
    if mean == "arithmetic":
        log_pert = torch.logsumexp(-pert, dim=1) - math.log(pert.shape[1])  # (N,) log mean_k P_k
    elif mean == "geometric":
        log_pert = -pert.mean(dim=1)  # (N,)
    else:
        raise ValueError(f"truth_ratio mean must be 'arithmetic' or 'geometric', got {mean!r}")
    return torch.exp(log_pert + para).to(paraphrased_nll.dtype if paraphrased_nll.is_floating_point() else torch.float32)


def truth_ratio_score(ratios: Tensor, side: Literal["forget", "retain"]) -> Tensor:
    """TOFU's summary of truth ratios (a scalar in [0, 1], higher = more truthful-looking):

    * ``"forget"``: ``mean(min(TR, 1/TR))`` -- 1 when true and false answers are equally likely;
    * ``"retain"``: ``mean(max(0, 1 - TR))`` -- 1 when the true answer is far more likely.
    """
    ratios = ratios.double()
    if side == "forget":
        return torch.minimum(ratios, 1.0 / ratios).mean().float()
    if side == "retain":
        return (1.0 - ratios).clamp(min=0.0).mean().float()
    raise ValueError(f"truth_ratio_score side must be 'forget' or 'retain', got {side!r}")


# -- Kolmogorov-Smirnov --------------------------------------------------------------------------
def _as_list(x) -> list[float]:
    if isinstance(x, Tensor):
        return [float(v) for v in x.detach().flatten().cpu().tolist()]
    return [float(v) for v in x]


def _ks_counts(x: list[float], y: list[float]) -> int:
    """``h = n * m * D``, an integer: D = sup_v |F_x(v) - F_y(v)| over every sample value v."""
    n, m = len(x), len(y)
    xs, ys = sorted(x), sorted(y)
    i = j = h = 0
    for v in sorted(set(xs) | set(ys)):
        while i < n and xs[i] <= v:
            i += 1
        while j < m and ys[j] <= v:
            j += 1
        h = max(h, abs(i * m - j * n))  # |i/n - j/m| * n * m
    return h


def ks_statistic(x, y) -> float:
    """Two-sample KS statistic ``D = sup_v |F_x(v) - F_y(v)|`` (empirical CDFs; ties handled exactly)."""
    x, y = _as_list(x), _as_list(y)
    if not x or not y:
        raise ValueError("ks_statistic needs two non-empty samples")
    return _ks_counts(x, y) / (len(x) * len(y))


def kolmogorov_sf(lam: float) -> float:
    """Survival function of the Kolmogorov distribution: ``Q(lam) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 lam^2)``.

    For ``lam < 1`` the equivalent theta-function form
    ``1 - sqrt(2 pi)/lam * sum_{k>=1} exp(-(2k-1)^2 pi^2 / (8 lam^2))`` is summed instead (it
    converges fast where the alternating series does not). ``Q(1.0) = 0.2700``, ``Q(1.3581) = 0.05``.
    """
    if lam <= 0:
        return 1.0
    if lam < 1.0:
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * lam * lam)) for k in range(1, 20))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / lam * s))
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * s))


def _exact_pvalue(n: int, m: int, h: int) -> float:
    """P(D >= h / (n m)) under H0, counting monotone lattice paths from (0, 0) to (n, m).

    Under H0 every interleaving of the two sorted samples is equally likely: C(n+m, n) paths, a
    step right for an x, up for a y. After i x's and j y's the CDF gap is |i m - j n| / (n m).
    The paths that stay strictly inside ``|i m - j n| < h`` have D < D_obs; p = 1 - inside / total.
    Exact integer arithmetic.
    """
    row = [0] * (m + 1)  # row[j]: inside paths reaching (i, j)
    for i in range(n + 1):
        for j in range(m + 1):
            if abs(i * m - j * n) >= h:
                row[j] = 0
            elif i == 0 and j == 0:
                row[j] = 1
            else:
                row[j] = (row[j] if i > 0 else 0) + (row[j - 1] if j > 0 else 0)
    inside = row[m]
    return float(1 - Fraction(inside, math.comb(n + m, n)))


def ks_2samp_pvalue(x, y, method: Literal["auto", "exact", "asymp"] = "auto", exact_max_cells: int = 1_000_000) -> float:
    """Two-sided p-value of the two-sample Kolmogorov--Smirnov test of ``x`` and ``y``.

    Args:
        x, y: 1-d samples (tensors or sequences of numbers), of sizes n and m.
        method: ``"exact"`` counts lattice paths (the distribution of D under H0 for continuous
            data, as scipy's ``method="exact"``); ``"asymp"`` uses the Kolmogorov limit
            ``Q(sqrt(n m / (n + m)) * D)`` (:func:`kolmogorov_sf`); ``"auto"`` is exact when
            ``n * m <= exact_max_cells`` (about a second of pure-Python work at the default).
        exact_max_cells: size limit of the exact computation under ``"auto"``.

    Returns:
        p in [0, 1]: the probability, if both samples came from one continuous distribution, of a
        statistic at least as large as the observed one. Identical samples give 1.0;
        ``x=[1,2,3], y=[4,5,6]`` gives 2/20 = 0.1.
    """
    x, y = _as_list(x), _as_list(y)
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError(f"ks_2samp_pvalue needs two non-empty samples, got sizes {n} and {m}")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("ks_2samp_pvalue got NaN values")
    h = _ks_counts(x, y)
    if h == 0:
        return 1.0
    if method == "auto":
        method = "exact" if n * m <= exact_max_cells else "asymp"
    if method == "exact":
        return _exact_pvalue(n, m, h)
    if method == "asymp":
        return kolmogorov_sf(math.sqrt(n * m / (n + m)) * h / (n * m))
    raise ValueError(f"ks_2samp_pvalue method must be 'auto', 'exact' or 'asymp', got {method!r}")


def forget_quality(tr_unlearned, tr_retain_only, method: Literal["auto", "exact", "asymp"] = "auto") -> float:
    """TOFU forget quality: KS p-value between the truth ratios, on the forget set, of the
    unlearned model and of the model trained on the retain set only. Higher = closer to retraining."""
    return ks_2samp_pvalue(tr_unlearned, tr_retain_only, method=method)


# -- membership inference ------------------------------------------------------------------------
def min_k_prob_score(token_logps: Tensor, mask: Tensor, k: float = 0.5) -> Tensor:
    """Min-K% Prob membership score of each sequence: ``-mean`` of its lowest ``k`` share of token log-probs.

    Args:
        token_logps: (B, T) per-token log-probs.
        mask: (B, T) 1 on the scored tokens.
        k: share of each row's scored tokens kept (0 < k <= 1); a row of n tokens keeps the
            ``max(1, floor(k * n))`` smallest log-probs.

    Returns:
        (B,) float scores; higher = less likely = looks less like training data. NaN for a row
        without scored tokens.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_prob_score k must be in (0, 1], got {k}")
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ in shape")
    valid = mask.bool()
    lengths = valid.sum(-1)  # (B,)
    keep = (lengths.double() * k).floor().long().clamp(min=1)  # (B,)
    ordered = token_logps.float().masked_fill(~valid, float("inf")).sort(dim=-1).values  # (B, T) ascending
    take = torch.arange(ordered.shape[-1], device=ordered.device) < keep.unsqueeze(-1)  # (B, T)
    total = ordered.masked_fill(~take, 0.0).sum(-1)  # (B,)
    score = -total / keep
    return score.masked_fill(lengths == 0, float("nan"))


def binary_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC-AUC = P(score of a random positive > score of a random negative), ties counted 1/2.

    Computed from mid-ranks (Mann--Whitney U / (n_pos n_neg)). Args: ``scores`` (N,) float,
    ``labels`` (N,) with 1 = positive, 0 = negative; both classes must be present.
    """
    scores, labels = scores.detach().double().flatten().cpu(), labels.detach().flatten().cpu().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"binary_auc: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"binary_auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    if torch.isnan(scores).any():
        raise ValueError("binary_auc got NaN scores")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    mid_ranks = ends - (counts.double() - 1) / 2  # (U,)
    rank_sum = mid_ranks[inverse][labels].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def harmonic_mean(values) -> float:
    """``n / sum(1 / v)`` of non-negative numbers; 0.0 if any is 0 (TOFU's model utility)."""
    vals = _as_list(values)
    if not vals:
        raise ValueError("harmonic_mean needs at least one value")
    if any(v < 0 or math.isnan(v) for v in vals):
        raise ValueError(f"harmonic_mean needs non-negative numbers, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


# -- torchmetrics --------------------------------------------------------------------------------
class MeanNLL(Metric):
    """Answer likelihood: token-mean NLL, length-normalised probability and token accuracy.

    ``update(token_logps, mask, correct=None)`` with (B, T) tensors (``correct``: argmax == target,
    optional). ``compute()`` returns ``{"nll": sum NLL / tokens, "prob": mean over sequences of
    exp(-mean token NLL) (TOFU's P(a|q)), "accuracy": correct tokens / tokens (NaN if never given)}``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("nll_sum", "tokens", "prob_sum", "sequences", "correct_sum", "correct_tokens"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_logps: Tensor, mask: Tensor, correct: Tensor | None = None) -> None:
        mask = mask.double()
        logps = token_logps.double() * mask  # (B, T)
        lengths = mask.sum(-1)  # (B,)
        rows = lengths > 0
        self.nll_sum += -logps.sum()
        self.tokens += mask.sum()
        self.prob_sum += torch.exp(logps.sum(-1)[rows] / lengths[rows]).sum()
        self.sequences += rows.sum()
        if correct is not None:
            self.correct_sum += (correct.double() * mask).sum()
            self.correct_tokens += mask.sum()

    def compute(self) -> dict[str, Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.tokens.device)
        return {
            "nll": self.nll_sum / self.tokens if self.tokens > 0 else nan,
            "prob": self.prob_sum / self.sequences if self.sequences > 0 else nan,
            "accuracy": self.correct_sum / self.correct_tokens if self.correct_tokens > 0 else nan,
        }


class RougeLRecall(Metric):
    """Mean :func:`rouge_l_recall` of predictions against references; ``update(predictions, references)``."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"RougeLRecall: {len(predictions)} predictions but {len(references)} references")
        self.total += sum(rouge_l_recall(p, r) for p, r in zip(predictions, references))
        self.count += len(references)

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class TruthRatio(Metric):
    """Per-question truth ratios (:func:`truth_ratio`), concatenated over batches and ranks.

    ``update(paraphrased_nll (N,), perturbed_nll (N, K))``. ``compute()`` returns
    ``{"ratios": (N_total,) tensor, "mean": mean TR, "forget_score": mean min(TR, 1/TR),
    "retain_score": mean max(0, 1 - TR)}`` (see :func:`truth_ratio_score`). Under DDP the order
    of ``ratios`` follows the ranks, which the KS test does not depend on.
    """

    full_state_update = False

    def __init__(self, mean: Literal["arithmetic", "geometric"] = "arithmetic", **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean = mean
        self.add_state("ratios", default=[], dist_reduce_fx="cat")

    def update(self, paraphrased_nll: Tensor, perturbed_nll: Tensor) -> None:
        self.ratios.append(truth_ratio(paraphrased_nll.double(), perturbed_nll.double(), mean=self.mean))

    def compute(self) -> dict[str, Tensor]:
        empty = isinstance(self.ratios, list) and not self.ratios  # a list before sync, a tensor after it
        ratios = torch.zeros(0, dtype=torch.float64) if empty else dim_zero_cat(self.ratios).double()
        if ratios.numel() == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"ratios": ratios, "mean": nan, "forget_score": nan, "retain_score": nan}
        return {"ratios": ratios, "mean": ratios.mean(), "forget_score": truth_ratio_score(ratios, "forget"),
                "retain_score": truth_ratio_score(ratios, "retain")}


class MinKProbMIA(Metric):
    """Membership-inference AUC of the Min-K% Prob score (:func:`min_k_prob_score`).

    ``update(token_logps (B, T), mask (B, T), labels (B,))`` with label 1 for the forget set and
    0 for the non-member set (held-out or retain). ``compute()`` gives the ROC-AUC of the score
    with the forget set as positives: ~0.5 when forget and non-member texts look alike, 1.0 when
    every forget text is less likely than every non-member text.
    """

    full_state_update = False

    def __init__(self, k: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"MinKProbMIA k must be in (0, 1], got {k}")
        self.k = k
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, token_logps: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.scores.append(min_k_prob_score(token_logps, mask, self.k).double())
        self.labels.append(labels.to(self.scores[-1].device).long().reshape(-1))

    def compute(self) -> Tensor:
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        return torch.tensor(binary_auc(scores, labels), dtype=torch.float64)


class MultipleChoiceAccuracy(Metric):
    """Share of questions whose highest-scoring choice is the labelled one.

    ``update(choice_scores (B, C), labels (B,))``: scores are e.g. summed log-likelihoods of each
    choice; pad missing choices with ``-inf``. Ties go to the first choice (``argmax``).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, choice_scores: Tensor, labels: Tensor) -> None:
        if choice_scores.ndim != 2 or labels.shape != choice_scores.shape[:1]:
            raise ValueError(f"MultipleChoiceAccuracy expects scores (B, C) and labels (B,), got "
                             f"{tuple(choice_scores.shape)} and {tuple(labels.shape)}")
        self.correct += (choice_scores.argmax(-1) == labels.to(choice_scores.device)).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total if self.total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
