"""Validation of the game: means synced over ranks, and the diversity of every rank's attacks.

Each validation batch updates :class:`ValidationMeans` (torchmetrics ``MeanMetric``\\ s; a row whose attack
prompt decoded to nothing weighs 0) and keeps its :class:`SampleRow`\\ s; at the epoch's end
:func:`validation_row` reads the synced means and the diversity of the gathered attacks in global-index
order, so every rank holds the same row (the report's ``val_history``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.game.diversity import SentenceEncoder, bleu_diversity, embedding_diversity, word_tokens

__all__ = ["SampleRow", "ValidationMeans", "validation_row"]

MEANS = ("seed/asr", "seed/reward", "attack/asr", "attack/reward", "attacker/judge_reward", "attacker/kl",
         "defender/kl")
"""``seed/...``: the defender on the raw seeds; ``attack/...``: on the attacker's prompts; per-player KL."""


@dataclass(order=True)
class SampleRow:
    """One kept validation row (ordered by its global index)."""

    index: int
    seed: str
    attack: str
    response: str
    unsafe: bool
    reward: float


class ValidationMeans(nn.Module):
    """One ``MeanMetric`` per key of :data:`MEANS` (``compute`` syncs them over ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict({k.replace("/", "__"): MeanMetric() for k in MEANS})

    def update(self, key: str, values: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        self.metrics[key.replace("/", "__")].update(values.float(), 1.0 if weight is None else weight.float())

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def compute(self) -> dict[str, float]:
        """Every mean, synced (every rank computes every metric, in the same order); a key without any
        weight on any rank is left out."""
        out = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if not torch.isnan(value):
                out[name.replace("__", "/")] = float(value)
        self.reset()
        return out


def validation_row(means: dict[str, float], rows: list[SampleRow],
                   encoder: SentenceEncoder | None) -> dict[str, float]:
    """``means`` plus the diversity of the attacks of ``rows`` (every rank's, in global-index order):
    ``attacker/bleu_diversity`` and, with an encoder, ``attacker/embedding_diversity``."""
    row = dict(means)
    attacks = [r.attack for r in sorted(rows)]
    if len(attacks) >= 2:
        row["attacker/bleu_diversity"] = bleu_diversity([word_tokens(t) for t in attacks])
        if encoder is not None:
            row["attacker/embedding_diversity"] = embedding_diversity(encoder.encode(attacks).cpu())
    return row
