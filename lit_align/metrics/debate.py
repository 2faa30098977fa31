"""Debate metrics of ACC-Collab (Estornell, Ton, Yao, Liu 2024, arXiv 2411.00053): accuracy after each round
and how answers change."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["DebateAccuracy"]


class DebateAccuracy(Metric):
    """Accuracy of the actor's answer after each of ``rounds`` rounds, over debates (DDP-safe sums).

    ``update(correct)`` takes a (B, R) bool tensor: row b, column t = the actor's round-t answer to
    question b was right (an unparseable answer counts as wrong: dropping it would inflate the accuracy).
    ``compute()`` returns:

    * ``round_<t>``: accuracy after round t (``round_<R-1>`` is the team's answer, the headline);
    * ``improvement``: ``(acc_last - acc_0) / acc_0`` (the paper's relative improvement, its Fig. 2; 0 when
      ``acc_0`` is 0) and ``gain``: ``acc_last - acc_0``;
    * ``right_to_wrong`` / ``wrong_to_right``: share of debates whose answer went from right at
      round 0 to wrong at the last round, and the reverse.
    """

    full_state_update = False

    def __init__(self, rounds: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self.add_state("correct", default=torch.zeros(rounds, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("right_to_wrong", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("wrong_to_right", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        if correct.dim() != 2 or correct.shape[1] != self.rounds:
            raise ValueError(f"DebateAccuracy.update takes a (B, {self.rounds}) tensor, got {tuple(correct.shape)}")
        c = correct.to(torch.float64)
        self.correct += c.sum(0)
        self.right_to_wrong += (c[:, 0] * (1 - c[:, -1])).sum()
        self.wrong_to_right += ((1 - c[:, 0]) * c[:, -1]).sum()
        self.total += c.shape[0]

    def compute(self) -> dict[str, Tensor]:
        total = self.total.clamp(min=1)
        acc = self.correct / total
        out = {f"round_{t}": acc[t].float() for t in range(self.rounds)}
        first, last = acc[0], acc[-1]
        out["gain"] = (last - first).float()
        out["improvement"] = torch.where(first > 0, (last - first) / first.clamp(min=1e-12), 0.0).float()
        out["right_to_wrong"] = (self.right_to_wrong / total).float()
        out["wrong_to_right"] = (self.wrong_to_right / total).float()
        return out
