"""Unlearning metrics of a classifier (UGradSL, Di et al., arXiv 2406.07698): UA, RA, TA, MIA-efficacy and
the Avg. Gap to the Retrain model.

* :func:`prediction_summary`: accuracy, mean loss and the per-row scores of one subset's logits (what
  ``ClassifierBase.evaluate_subset`` returns);
* :func:`mia_efficacy` / :class:`MIAEfficacy`: the share of forget rows that a membership-inference attack trained
  on retain (member) vs test (non-member) rows calls "non-member";
* :func:`unlearning_scores`: ``{UA, RA, TA, MIA}`` in percent; :func:`avg_gap`: mean |unlearned − Retrain| over them
  (closeness to Retrain is the goal, not the largest UA).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MIA_FEATURES", "UNLEARNING_KEYS", "MIAEfficacy", "avg_gap", "mia_efficacy", "prediction_summary",
           "row_scores", "unlearning_scores"]

#: The per-row scores an attack can read (see :func:`row_scores`).
MIA_FEATURES = ("confidence", "entropy", "loss")
#: The four scores of :func:`unlearning_scores`, the keys of the Avg. Gap.
UNLEARNING_KEYS = ("UA", "RA", "TA", "MIA")

MIAFeature = Literal["confidence", "entropy", "loss"]


def row_scores(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-row scores of a classifier's logits ``(N, K)`` against ``labels`` ``(N,)``, float32 ``(N,)`` each:
    ``confidence`` = softmax probability of the true class, ``entropy`` = entropy of the softmax (nats),
    ``loss`` = cross-entropy of the true class, ``correct`` = 1.0 where the argmax is the label."""
    logps = F.log_softmax(logits.float(), dim=-1)  # (N, K)
    true = logps.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)  # (N,)
    return {"confidence": true.exp(), "entropy": -(logps.exp() * logps).sum(-1), "loss": -true,
            "correct": (logits.argmax(-1) == labels).float()}


def prediction_summary(logits: Tensor, labels: Tensor, index: Tensor | None = None) -> dict[str, Any]:
    """One subset's evaluation: ``accuracy`` and ``loss`` (mean cross-entropy) as floats, and the per-row tensors
    of :func:`row_scores` (``confidence``, ``entropy``, ``loss`` is the mean, so the per-row losses are
    ``row_loss``; ``correct``), plus ``logits`` ``(N, K)``, ``labels`` and ``index`` ``(N,)`` (the rows' dataset
    indices, when given). An empty subset has NaN accuracy and loss."""
    rows = row_scores(logits, labels)
    n = labels.numel()
    return {"accuracy": rows["correct"].mean().item() if n else float("nan"),
            "loss": rows["loss"].mean().item() if n else float("nan"),
            "confidence": rows["confidence"], "entropy": rows["entropy"], "row_loss": rows["loss"],
            "correct": rows["correct"], "logits": logits, "labels": labels, "index": index}


def _feature(summary: Mapping[str, Any], feature: str) -> np.ndarray:
    """The per-row attack feature of a :func:`prediction_summary` dict."""
    return np.asarray(summary["row_loss" if feature == "loss" else feature], dtype=np.float64)


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Percentage of ``target`` rows an attack calls "non-member" (MIA-efficacy of the forget set).

    The attack: scikit-learn ``LogisticRegression`` on one standardised per-row score, trained to tell ``member``
    rows (label 1: the retain set, which the model trained on) from ``non_member`` rows (label 0: the test set),
    then applied to ``target`` (the forget set). The larger side is subsampled (``seed``) to the smaller's size, as
    in Jia et al.'s (NeurIPS 2023) attack code, so chance is 50%; the result does not depend on the rows' order. A
    model that forgot the rows as well as Retrain gives Retrain's value, not 100%. Jia et al. fit an RBF-kernel SVM;
    this is a single-threshold attack of the same family (see :class:`MIAEfficacy`).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # sorted: the subsample then depends on the rows' values only, not on their order (DDP gathers ranks' rows in
    # rank order, one process sees them in loader order)
    member, non_member = (np.sort(np.asarray(a, dtype=np.float64).reshape(-1)) for a in (member, non_member))
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if min(len(member), len(non_member), len(target)) == 0:
        raise ValueError(f"mia_efficacy needs member, non-member and target rows, got {len(member)}, "
                         f"{len(non_member)}, {len(target)}")
    rng = np.random.default_rng(seed)
    n = min(len(member), len(non_member))
    member, non_member = (a if len(a) == n else a[rng.choice(len(a), n, replace=False)] for a in (member, non_member))
    x = np.concatenate([member, non_member])[:, None]  # (2n, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    attack = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    return float(100.0 * (attack.predict(target[:, None]) == 0).mean())


class MIAEfficacy(Metric):
    """MIA-efficacy as a DDP-safe torchmetric: :func:`mia_efficacy` over rows gathered from every rank.

    ``update(logits, labels, part)`` adds a batch of one part: ``"member"`` (retain rows), ``"non_member"`` (test
    rows) or ``"target"`` (forget rows); per-row ``feature`` values are kept (``dist_reduce_fx="cat"``).
    ``compute()`` fits the attack and returns the percentage of target rows called non-member.

    ``feature`` defaults to ``"confidence"``, the softmax probability of the true class: the "prediction
    confidence" attack of Jia et al. (NeurIPS 2023, "Model sparsity can simplify machine unlearning"), whose
    MIA-efficacy SalUn's and UGradSL's tables report. They fit an SVM (RBF kernel), which can carve several
    intervals of the score; the logistic regression here is a single-threshold attack of the same family, so its
    numbers are comparable in kind, not equal to theirs. ``"entropy"`` and ``"loss"`` (cross-entropy) are the other
    scores of that family.
    """

    full_state_update = False
    PARTS = ("member", "non_member", "target")

    def __init__(self, feature: MIAFeature = "confidence", seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if feature not in MIA_FEATURES:
            raise ValueError(f"MIAEfficacy.feature must be one of {', '.join(MIA_FEATURES)}, got {feature!r}")
        self.feature, self.seed = feature, seed
        for part in self.PARTS:
            self.add_state(part, default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor, part: str) -> None:
        if part not in self.PARTS:
            raise ValueError(f"MIAEfficacy.update: part must be one of {', '.join(self.PARTS)}, got {part!r}")
        getattr(self, part).append(row_scores(logits, labels)[self.feature])

    def compute(self) -> Tensor:
        parts = [getattr(self, p) for p in self.PARTS]
        values = [(torch.cat(v) if isinstance(v, list) else v).double().cpu().numpy() if len(v) else np.zeros(0)
                  for v in parts]
        return torch.tensor(mia_efficacy(*values, seed=self.seed))


def unlearning_scores(forget: Mapping[str, Any], retain: Mapping[str, Any], test: Mapping[str, Any],
                      feature: MIAFeature = "confidence", seed: int = 0) -> dict[str, float]:
    """UGradSL's four scores in percent from three :func:`prediction_summary` dicts (``evaluate_subset``):

    * ``UA`` = 100 (1 − accuracy on the forget set); ``RA`` = 100 · accuracy on the retain set;
    * ``TA`` = 100 · accuracy on ``test`` (for class-wise forgetting pass the test rows of the remaining classes);
    * ``MIA`` = :func:`mia_efficacy` of the forget rows, the attack trained on retain vs ``test`` rows on ``feature``.
    """
    if feature not in MIA_FEATURES:
        raise ValueError(f"unlearning_scores: feature must be one of {', '.join(MIA_FEATURES)}, got {feature!r}")
    mia = mia_efficacy(_feature(retain, feature), _feature(test, feature), _feature(forget, feature), seed=seed)
    return {"UA": 100.0 * (1.0 - forget["accuracy"]), "RA": 100.0 * retain["accuracy"],
            "TA": 100.0 * test["accuracy"], "MIA": mia}


def avg_gap(scores: Mapping[str, float], retrain: Mapping[str, float],
            keys: Iterable[str] = UNLEARNING_KEYS) -> float:
    """Avg. Gap (UGradSL's tables): the mean over ``keys`` of |scores[k] − retrain[k]|, the distance of an
    unlearned model's scores from the Retrain model's (lower is better; 0 for identical scores)."""
    keys = tuple(keys)
    missing = [k for k in keys if k not in scores or k not in retrain]
    if not keys or missing:
        raise ValueError(f"avg_gap needs every key of {keys} in both score dicts; missing: {missing} "
                         f"(scores: {sorted(scores)}, retrain: {sorted(retrain)})")
    return float(np.mean([abs(float(scores[k]) - float(retrain[k])) for k in keys]))
