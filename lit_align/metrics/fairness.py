"""Group fairness of a classifier's predictions (FIS, Pang et al., arXiv 2402.12789): accuracy, F1 and the
demographic-parity, equal-opportunity and equalised-odds gaps between sensitive groups, from per-group counts."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["GROUP_COUNTS", "GroupFairness", "fairness_from_counts"]

#: The per-group counts :class:`GroupFairness` keeps (ŷ = the prediction, y = the label, "1" = the positive class).
GROUP_COUNTS = {
    "n": "rows",
    "correct": "rows with ŷ = y",
    "pred_pos": "rows with ŷ = 1",
    "true_pos": "rows with ŷ = 1 and y = 1",
    "pos": "rows with y = 1",
    "false_pos": "rows with ŷ = 1 and y = 0",
    "neg": "rows with y = 0 (y != positive class)",
}


def _rate(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` per group, NaN where a group has no rows in ``den``."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.nan)


def _gap(rates: Tensor) -> Tensor:
    """Largest minus smallest rate over the groups where it is defined (``|r_0 - r_1|`` for two groups); NaN when
    fewer than two groups have rows to measure it on."""
    defined = rates[~rates.isnan()]
    return defined.max() - defined.min() if defined.numel() >= 2 else torch.tensor(torch.nan, dtype=rates.dtype)


def fairness_from_counts(counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accuracy, F1 and the fairness gaps from per-group counts (``GROUP_COUNTS``' keys, each a ``(G,)`` tensor).

    * ``accuracy`` = Σ correct / Σ n; ``f1`` = 2 TP / (2 TP + FP + FN) of the positive class over all groups (0 when
      there is no positive row or prediction, as scikit-learn's ``zero_division=0``);
    * ``dp_gap`` = |P(ŷ=1 | g=0) − P(ŷ=1 | g=1)|; ``eop_gap`` = |TPR_0 − TPR_1|;
      ``eod_gap`` = (|TPR_0 − TPR_1| + |FPR_0 − FPR_1|) / 2 (FIS's ``compute_metrics_fair``).

    With more than two groups each |a − b| is the largest minus the smallest rate over the groups; a rate is
    measured only over groups with rows in its denominator (a gap is NaN when fewer than two have).
    """
    c = {k: v.to(torch.float64) for k, v in counts.items()}
    tp, fp, fn = c["true_pos"].sum(), c["false_pos"].sum(), (c["pos"] - c["true_pos"]).sum()
    f1_den = 2 * tp + fp + fn
    eop = _gap(_rate(c["true_pos"], c["pos"]))
    fpr_gap = _gap(_rate(c["false_pos"], c["neg"]))
    return {
        "accuracy": c["correct"].sum() / c["n"].sum().clamp(min=1),
        "f1": torch.where(f1_den > 0, 2 * tp / f1_den.clamp(min=1), 0.0),
        "dp_gap": _gap(_rate(c["pred_pos"], c["n"])),
        "eop_gap": eop,
        "eod_gap": (eop + fpr_gap) / 2,
    }


class GroupFairness(Metric):
    """Accuracy, F1, DP / EOp / EOd gaps between sensitive groups, DDP-safe.

    ``update(preds, target, groups)``: ``preds`` are logits / probabilities ``(B, K)`` (argmax taken) or predicted
    labels ``(B,)``; ``target`` labels ``(B,)``; ``groups`` the sensitive attribute ``(B,)`` in ``0..num_groups-1``.
    The states are per-group counts (:data:`GROUP_COUNTS`, each ``(num_groups,)``) summed over batches and, under
    DDP, over ranks (``dist_reduce_fx="sum"``), so the result equals one process that saw every row.
    ``compute()`` returns :func:`fairness_from_counts`' dict (``accuracy``, ``f1``, ``dp_gap``, ``eop_gap``,
    ``eod_gap``), float32. ``positive_class`` is the label called 1 in the definitions (with more than two classes,
    ŷ = 1 means "predicted positive_class").
    """

    full_state_update = False

    def __init__(self, num_groups: int = 2, positive_class: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_groups, int) or num_groups < 2:
            raise ValueError(f"GroupFairness.num_groups must be an int >= 2, got {num_groups!r}")
        self.num_groups, self.positive_class = num_groups, positive_class
        for name in GROUP_COUNTS:
            self.add_state(name, default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        pred = preds.argmax(-1) if preds.dim() == 2 else preds  # (B,)
        if not (pred.shape == target.shape == groups.shape and pred.dim() == 1):
            raise ValueError(f"GroupFairness.update takes preds (B, K) or (B,), target (B,) and groups (B,); got "
                             f"{tuple(preds.shape)}, {tuple(target.shape)}, {tuple(groups.shape)}")
        if groups.is_floating_point() or (groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups)):
            raise ValueError(f"GroupFairness: groups must be integers in 0..{self.num_groups - 1}, got values "
                             f"{groups.unique().tolist()[:10]}")
        onehot = torch.nn.functional.one_hot(groups.long(), self.num_groups).to(torch.float64)  # (B, G)
        y_pos, p_pos = target == self.positive_class, pred == self.positive_class
        for name, rows in (("n", torch.ones_like(y_pos)), ("correct", pred == target), ("pred_pos", p_pos),
                           ("true_pos", p_pos & y_pos), ("pos", y_pos), ("false_pos", p_pos & ~y_pos),
                           ("neg", ~y_pos)):
            setattr(self, name, getattr(self, name) + rows.to(torch.float64) @ onehot)

    def counts(self) -> dict[str, Tensor]:
        """The per-group counts seen so far on this process (``GROUP_COUNTS``' keys, ``(num_groups,)`` each)."""
        return {name: getattr(self, name) for name in GROUP_COUNTS}

    def compute(self) -> dict[str, Tensor]:
        return {k: v.float() for k, v in fairness_from_counts(self.counts()).items()}
