"""Metrics: pure scoring functions and DDP-safe torchmetrics wrappers (unlearning evaluation)."""

from lit_align.metrics.unlearning import (
    MeanNLL,
    MinKProbMIA,
    MultipleChoiceAccuracy,
    RougeLRecall,
    TruthRatio,
    binary_auc,
    forget_quality,
    harmonic_mean,
    kolmogorov_sf,
    ks_2samp_pvalue,
    ks_statistic,
    min_k_prob_score,
    rouge_l_recall,
    rouge_tokens,
    truth_ratio,
    truth_ratio_score,
)

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
