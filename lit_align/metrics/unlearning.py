"""Unlearning metrics: TOFU-style scores as pure functions, and torchmetrics ``Metric`` wrappers.

Where a standard library computes a metric, the function calls it, so the numbers can be compared
with published ones (each checked against the library in ``tests/metrics/test_unlearning_metrics.py``):

* :func:`rouge_l_recall` -- ROUGE-L recall from ``rouge-score`` (Porter stemmer by default, as TOFU and WAGLE);
* :func:`truth_ratio` -- TOFU truth ratio from paraphrased / perturbed answer NLLs (arithmetic or
  geometric mean over the perturbed answers; see its docstring for whose code uses which);
* :func:`ks_2samp_pvalue` / :func:`forget_quality` -- ``scipy.stats.ks_2samp``'s two-sided p-value;
* :func:`min_k_prob_score` -- Min-K% Prob membership score; :func:`binary_auc` -- ROC-AUC from torchmetrics;
* :func:`harmonic_mean` -- TOFU model utility;
* :func:`embedding_accuracy` -- WAGLE's forget accuracy FA (sentence embeddings);
* :func:`seed_interval` -- mean and Student-t interval over seeds (``scipy.stats.t.interval``);
* :func:`metric_conventions` -- the lines a report header prints so a reader knows which of these
  conventions produced its numbers.

Metric classes keep their states as sums or concatenations (``dist_reduce_fx="sum"`` /
``"cat"``), so ``compute()`` gives the same value on one process as on several that each saw a
shard of the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from scipy.stats import ks_2samp
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from lit_align.data.rouge import rouge_scorer

if TYPE_CHECKING:
    from lit_align.retrieval import Encoder

__all__ = [
    "MIA_CONVENTIONS",
    "MeanNLL",
    "MinKProbMIA",
    "MultipleChoiceAccuracy",
    "RougeLRecall",
    "TRUTH_RATIO_MEANS",
    "TruthRatio",
    "binary_auc",
    "embedding_accuracy",
    "forget_quality",
    "harmonic_mean",
    "ks_2samp_pvalue",
    "ks_statistic",
    "metric_conventions",
    "min_k_prob_score",
    "rouge_l_recall",
    "seed_interval",
    "truth_ratio",
    "truth_ratio_score",
]

#: Values of :func:`truth_ratio`'s ``mean``.
TRUTH_RATIO_MEANS = ("arithmetic", "geometric")
#: Values of :class:`MinKProbMIA`'s ``convention``.
MIA_CONVENTIONS = ("forget_positive", "open_unlearning")


# -- text --------------------------------------------------------------------------------------
def rouge_l_recall(prediction: str, reference: str, *, use_stemmer: bool = True) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference``: ``LCS / len(reference)`` in words.

    Exactly ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)``'s
    ``score(reference, prediction)["rougeL"].recall``, the score TOFU's and WAGLE's evaluations report.
    Its tokeniser lowercases the text and keeps runs of ASCII letters and digits only: punctuation
    and every other character separate words and are dropped, so ``"café"`` is the word ``caf`` and
    a reference written only in CJK (or other non-Latin) script has no words and scores 0.0. With
    ``use_stemmer`` the Porter stemmer is applied to words longer than three letters
    (``"works"`` and ``"worked"`` both become ``work``).

    Example: prediction "born in the town of Nettleby", reference "She was born in Nettleby"
    -> LCS ``born in nettleby`` = 3 words of 5 -> 0.6. A reference without words gives 0.0.
    """
    return float(rouge_scorer(("rougeL",), bool(use_stemmer)).score(reference, prediction)["rougeL"].recall)


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
        mean: ``"arithmetic"`` (the default) averages the K probabilities, the formula above, as
            WAGLE's code does (Jia et al. 2024, arXiv 2410.17509, github.com/OPTML-Group/WAGLE,
            ``src/metrics/Tofu.py``); ``"geometric"`` averages the K NLLs before exponentiating,
            ``TR = exp(nll_para - mean_k nll_k)`` (the geometric mean of the K probabilities), as
            TOFU's evaluation and open-unlearning's ``truth_ratio`` (``src/evals/metrics/memorization.py``,
            which averages the perturbed answers' losses first) do. The geometric mean is never larger,
            so TR and forget quality differ between the two: report which one was used
            (:func:`metric_conventions`).

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
        raise ValueError(f"truth_ratio mean must be one of {TRUTH_RATIO_MEANS}, got {mean!r}")
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


def _ks_samples(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both samples as float64 arrays; errors for an empty sample or NaN values."""
    xs, ys = np.asarray(_as_list(x), dtype=np.float64), np.asarray(_as_list(y), dtype=np.float64)
    if xs.size == 0 or ys.size == 0:
        raise ValueError(f"{name} needs two non-empty samples, got sizes {xs.size} and {ys.size}")
    if np.isnan(xs).any() or np.isnan(ys).any():
        raise ValueError(f"{name} got NaN values")
    return xs, ys


def ks_statistic(x, y) -> float:
    """Two-sample KS statistic ``D = sup_v |F_x(v) - F_y(v)|`` (``scipy.stats.ks_2samp``'s statistic)."""
    xs, ys = _ks_samples(x, y, "ks_statistic")
    return float(ks_2samp(xs, ys).statistic)


def ks_2samp_pvalue(x, y, method: Literal["auto", "exact", "asymp"] = "auto") -> float:
    """Two-sided p-value of the two-sample Kolmogorov--Smirnov test: ``scipy.stats.ks_2samp(x, y, method=method)``.

    Args:
        x, y: 1-d samples (tensors or sequences of numbers).
        method: passed to scipy: ``"auto"`` (scipy's default: exact when both samples have at most
            10,000 values, else asymptotic), ``"exact"`` or ``"asymp"``.

    Returns:
        p in [0, 1]: the probability, if both samples came from one continuous distribution, of a
        statistic at least as large as the observed one. Identical samples give 1.0;
        ``x=[1,2,3], y=[4,5,6]`` gives 2/20 = 0.1.
    """
    if method not in ("auto", "exact", "asymp"):
        raise ValueError(f"ks_2samp_pvalue method must be 'auto', 'exact' or 'asymp', got {method!r}")
    xs, ys = _ks_samples(x, y, "ks_2samp_pvalue")
    return float(ks_2samp(xs, ys, method=method).pvalue)


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

    torchmetrics' ``binary_auroc`` (exact thresholds). torchmetrics passes scores outside [0, 1]
    through a sigmoid, which in float64 merges scores above ~37 into ties; the scores are therefore
    replaced by their dense ranks scaled into [0, 1] first (same order, same ties, same AUC).
    torchmetrics returns float32: the value is within ~1e-7 of the exact fraction.
    Args: ``scores`` (N,) float, ``labels`` (N,) with 1 = positive, 0 = negative; both classes must be present.
    """
    scores, labels = scores.detach().double().flatten().cpu(), labels.detach().flatten().cpu().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"binary_auc: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"binary_auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    if torch.isnan(scores).any():
        raise ValueError("binary_auc got NaN scores")
    values, ranks = torch.unique(scores, return_inverse=True)
    unit = ranks.double() / max(1, len(values) - 1)  # (N,) in [0, 1], order and ties kept
    return float(binary_auroc(unit, labels.long(), thresholds=None))


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


# -- report headers ------------------------------------------------------------------------------
_TRUTH_RATIO_LINES = {
    "arithmetic": "truth ratio: arithmetic mean of the perturbed answers' probabilities (WAGLE's code, "
                  "src/metrics/Tofu.py); TOFU and open-unlearning use the geometric mean",
    "geometric": "truth ratio: geometric mean of the perturbed answers' probabilities (TOFU's and "
                 "open-unlearning's evaluation); WAGLE's code uses the arithmetic mean",
}
_MIA_LINES = {
    "forget_positive": "mia_auc: Min-K% Prob ROC-AUC with forget = positive, as WAGLE's TOFU evaluation (1.0: every "
                       "forget text less likely than every non-member); open-unlearning reports 1 - this value",
    "open_unlearning": "mia_auc: Min-K% Prob ROC-AUC with non-member = positive, open-unlearning's convention "
                       "(1.0: every forget text more likely than every non-member, i.e. still memorised)",
}


_TRUTH_RATIO_QUESTION_LINES = {
    "original": "truth ratio question: a' and the perturbed answers scored after the original question (TOFU's "
                "eval_everything.yaml question_key: question; open-unlearning's question_key: question)",
    "paraphrased": "truth ratio question: a' and the perturbed answers scored after the paraphrased question q' "
                   "(core.md §4.8's formula); TOFU and open-unlearning condition on the original question",
}


def metric_conventions(*, truth_ratio_mean: str, mia_convention: str, rouge_stemmer: bool,
                       truth_ratio_question: str | None = None) -> list[str]:
    """One line per convention behind a report's numbers, naming whose evaluation uses it.

    For report headers (CSV ``# `` comment lines, printed tables, a JSON ``"conventions"`` field), e.g.
    ``metric_conventions(truth_ratio_mean="arithmetic", mia_convention="forget_positive", rouge_stemmer=True)``;
    ``truth_ratio_question`` (``original`` or ``paraphrased``) adds the line on the truth ratio's question.
    Raises ``ValueError`` for an unknown mean, convention or question.
    """
    if truth_ratio_mean not in _TRUTH_RATIO_LINES:
        raise ValueError(f"metric_conventions truth_ratio_mean must be one of {TRUTH_RATIO_MEANS}, "
                         f"got {truth_ratio_mean!r}")
    if mia_convention not in _MIA_LINES:
        raise ValueError(f"metric_conventions mia_convention must be one of {MIA_CONVENTIONS}, got {mia_convention!r}")
    if truth_ratio_question is not None and truth_ratio_question not in _TRUTH_RATIO_QUESTION_LINES:
        raise ValueError(f"metric_conventions truth_ratio_question must be one of "
                         f"{sorted(_TRUTH_RATIO_QUESTION_LINES)}, got {truth_ratio_question!r}")
    rouge = ("rouge: ROUGE-L recall from rouge-score with the Porter stemmer (as TOFU and WAGLE score)" if rouge_stemmer
             else "rouge: ROUGE-L recall from rouge-score without stemming (TOFU and WAGLE stem: not comparable)")
    lines = [_TRUTH_RATIO_LINES[truth_ratio_mean], _MIA_LINES[mia_convention], rouge]
    if truth_ratio_question is not None:
        lines.append(_TRUTH_RATIO_QUESTION_LINES[truth_ratio_question])
    return lines


def embedding_accuracy(encoder: Encoder, answers: Sequence[str], truths: Sequence[str],
                       perturbed: Sequence[Sequence[str]]) -> float:
    """WAGLE's forget accuracy FA (core.md §4.8) on any set: the share of questions whose answer's sentence
    embedding is closer (cosine) to the true answer than to every perturbed answer.

    A question without perturbed answers has no test and is skipped: the denominator counts only the questions
    that have some. NaN when none has (or there is no question).
    """
    if not (len(answers) == len(truths) == len(perturbed)):
        raise ValueError(f"embedding_accuracy needs one truth and one perturbed list per answer, got "
                         f"{len(answers)} answers, {len(truths)} truths, {len(perturbed)} perturbed lists")
    usable = [(a, y, list(ps)) for a, y, ps in zip(answers, truths, perturbed) if len(ps)]
    if not usable:
        return float("nan")
    texts = [t for a, y, ps in usable for t in (a, y, *ps)]
    vectors = torch.nn.functional.normalize(encoder.encode(texts).float(), dim=-1)
    pos, hits = 0, 0
    for _, _, ps in usable:
        block = vectors[pos : pos + 2 + len(ps)]
        pos += 2 + len(ps)
        sims = block[1:] @ block[0]
        hits += int(bool(sims[0] > sims[1:].max()))
    return hits / len(usable)


def seed_interval(values: Sequence[float | None], confidence: float = 0.95) -> tuple[float, float, float, float, int]:
    """``(mean, low, high, std, n)`` over the finite values of seeds: ``scipy.stats.t.interval(confidence, n - 1,
    loc=mean, scale=scipy.stats.sem(values))`` and the sample std (ddof 1). ``n`` counts the seeds used: a NaN or
    missing seed is left out of the interval and shows as ``n < len(values)``. One seed gives NaN bounds and std;
    none gives NaN everywhere and ``n = 0``."""
    from scipy import stats

    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if not n:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    mean = float(np.mean(vals))
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan"), 1
    std = float(np.std(vals, ddof=1))
    if std == 0.0:  # scipy gives NaN bounds for a zero-width interval
        return mean, mean, mean, 0.0, n
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(vals))
    return mean, float(low), float(high), std, n


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
    """Mean :func:`rouge_l_recall` of predictions against references; ``update(predictions, references)``.

    ``use_stemmer``: the Porter stemmer of ``rouge-score`` (default on, as TOFU and WAGLE score).
    """

    full_state_update = False

    def __init__(self, use_stemmer: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.use_stemmer = use_stemmer
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"RougeLRecall: {len(predictions)} predictions but {len(references)} references")
        self.total += sum(rouge_l_recall(p, r, use_stemmer=self.use_stemmer) for p, r in zip(predictions, references))
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
        if mean not in TRUTH_RATIO_MEANS:
            raise ValueError(f"TruthRatio mean must be one of {TRUTH_RATIO_MEANS}, got {mean!r}")
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
    (higher score = less likely text); ~0.5 in both conventions when forget and non-member texts look alike.

    Args:
        k: share of each text's lowest-probability tokens averaged (:func:`min_k_prob_score`).
        convention: which class is the positive one.

            * ``"forget_positive"`` (default): forget texts are the positives (forget = 1, retain or
              holdout = 0, as WAGLE's TOFU evaluation describes its MIA). 1.0 when every
              forget text is less likely than every non-member text (unlearned past the
              non-members), 0.0 when every forget text is more likely (still memorised).
            * ``"open_unlearning"``: non-member texts are the positives, as open-unlearning's
              ``mia_auc`` (``src/evals/metrics/mia/utils.py``) labels forget scores 0 and holdout
              scores 1 over the same kind of score; its stated convention: the AUC is 1 when the
              forget data is much more likely than the holdout data. The value is
              ``1 - forget_positive``.
    """

    full_state_update = False

    def __init__(self, k: float = 0.5, convention: Literal["forget_positive", "open_unlearning"] = "forget_positive",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"MinKProbMIA k must be in (0, 1], got {k}")
        if convention not in MIA_CONVENTIONS:
            raise ValueError(f"MinKProbMIA convention must be one of {MIA_CONVENTIONS}, got {convention!r}")
        self.k, self.convention = k, convention
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, token_logps: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.scores.append(min_k_prob_score(token_logps, mask, self.k).double())
        self.labels.append(labels.to(self.scores[-1].device).long().reshape(-1))

    def compute(self) -> Tensor:
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels)
        if self.convention == "open_unlearning":
            labels = 1 - labels  # non-members positive
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
