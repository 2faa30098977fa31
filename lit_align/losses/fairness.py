"""Relaxed (probability-based) group-fairness losses and the validation accuracy loss of FIS (Pang et al.,
"Fair Classifiers Without Fair Training: An Influence-Guided Data Sampling Approach", arXiv 2402.12789).

The losses are differentiable surrogates of the hard gaps the metrics report (``lit_align.metrics.fairness``): they
average soft probabilities ``p(k|x)`` instead of counting argmax predictions (never backprop through hard
metrics). With ``Delta`` the relaxed gap vector,

    L_fair = mu / 2 * ||Delta||^2            L_acc = mean_i CE(logits_i, y_i)

* ``dp``  (demographic parity): ``H[i, k] = mean_{g=i} p(k|x)`` (M, K), clipped to [1e-3, 1], each row renormalised
  to sum 1; ``Delta`` holds ``(H[i, k] - H[j, k]) / (M (M - 1) K)`` for every group pair ``i < j`` and class ``k``
  (M = K = 2: two entries).
* ``eop`` (equal opportunity): ``Delta = mean_{g=i, y=1} p(1|x) - mean_{g=j, y=1} p(1|x)`` per pair ``i < j``
  (M = 2: one entry); ``1`` is ``positive_class``.
* ``eod`` (equalised odds): the ``eop`` difference computed separately on ``y = 0`` and on ``y = 1`` (M = 2: a
  2-vector).

A (group, label) cell without rows has no mean: the pairs that touch it are left out of ``Delta`` (a validation batch
without positives of one group has no EOp term rather than a fake one).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["FAIRNESS_KINDS", "accuracy_loss", "fairness_gaps", "fairness_loss"]

FairnessKind = Literal["dp", "eop", "eod"]
FAIRNESS_KINDS = ("dp", "eop", "eod")


def accuracy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``L_acc``: the mean cross-entropy of (N, K) ``logits`` against (N,) ``labels``."""
    return F.cross_entropy(logits, labels)


def _group_means(values: Tensor, groups: Tensor, rows: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group means of ``values`` (N, D) over the rows where ``rows`` (N,) bool holds: ``(means (M, D), present
    (M,) bool)``."""
    onehot = F.one_hot(groups.long(), num_groups).to(values.dtype) * rows.to(values.dtype).unsqueeze(1)  # (N, M)
    counts = onehot.sum(0)  # (M,)
    means = onehot.T @ values / counts.clamp_min(1).unsqueeze(1)  # (M, D)
    return means, counts > 0


def _pair_differences(means: Tensor, present: Tensor) -> Tensor:
    """``means[i] - means[j]`` for every pair ``i < j`` of present groups, flattened: (P * D,). A pair with an absent
    group is dropped; the reference code instead keeps it with ``H = 0`` for the absent group (clipped to 1e-3 and
    renormalised: a fake 0.5 gap). FIS's validation gradients refuse a validation set that lacks a group."""
    i, j = torch.triu_indices(means.shape[0], means.shape[0], offset=1, device=means.device)
    keep = present[i] & present[j]
    return (means[i[keep]] - means[j[keep]]).reshape(-1)


def fairness_gaps(probs: Tensor, labels: Tensor, groups: Tensor, kind: FairnessKind, *, num_groups: int = 2,
                  positive_class: int = 1, clip: float = 1e-3) -> Tensor:
    """The relaxed gap vector ``Delta`` (see the module docstring) from (N, K) class probabilities, (N,) labels and
    (N,) group ids in ``0..num_groups-1``. Shapes: ``dp`` (pairs * K,), ``eop`` (pairs,), ``eod`` (2 * pairs,)."""
    if kind not in FAIRNESS_KINDS:
        raise ConfigError(f"fairness must be one of {FAIRNESS_KINDS}, got {kind!r}")
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or groups.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (N, K) with (N,) labels and groups, got {tuple(probs.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(groups.shape)}")
    everyone = torch.ones_like(labels, dtype=torch.bool)
    if kind == "dp":
        m, k = num_groups, probs.shape[1]
        h, present = _group_means(probs, groups, everyone, m)  # (M, K)
        h = h.clamp(clip, 1.0)
        h = h / h.sum(1, keepdim=True)
        return _pair_differences(h, present) / (m * (m - 1) * k)
    p_pos = probs[:, positive_class].unsqueeze(1)  # (N, 1)
    positives = labels == positive_class
    row_sets = [positives] if kind == "eop" else [~positives, positives]  # eod: the FPR entry, then the TPR entry
    parts = [_pair_differences(*_group_means(p_pos, groups, rows, num_groups)) for rows in row_sets]
    return torch.cat(parts)


def fairness_loss(probs: Tensor, labels: Tensor, groups: Tensor, kind: FairnessKind, *, mu: float = 1.0,
                  num_groups: int = 2, positive_class: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_fair = mu / 2 * ||Delta||^2`` (mu = 1 in the paper's scripts) on (N, K) probabilities.

    Hand check (dp, M = K = 2): group 0 rows p = [0.2, 0.8], [0.4, 0.6]; group 1 row p = [0.9, 0.1]:
    ``H = [[0.3, 0.7], [0.9, 0.1]]``, ``Delta = [-0.6, 0.6] / 4 = [-0.15, 0.15]``, ``L = 0.5 * 0.045 = 0.0225``.

    Returns ``(loss, {"gap_norm": ||Delta||})``.
    """
    delta = fairness_gaps(probs, labels, groups, kind, num_groups=num_groups, positive_class=positive_class)
    loss = 0.5 * mu * delta.pow(2).sum()
    return loss, {"gap_norm": delta.detach().norm()}
