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

from lit_align.game.diversity import bleu_diversity, word_tokens
from lit_align.retrieval import MeanPoolEncoder, embedding_diversity

__all__ = ["GameValidation", "SampleRow", "ValidationMeans", "validation_row"]

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
                   encoder: MeanPoolEncoder | None) -> dict[str, float]:
    """``means`` plus the diversity of the attacks of ``rows`` (every rank's, in global-index order):
    ``attacker/bleu_diversity`` and, with an encoder, ``attacker/embedding_diversity``."""
    row = dict(means)
    attacks = [r.attack for r in sorted(rows)]
    if len(attacks) >= 2:
        row["attacker/bleu_diversity"] = bleu_diversity([word_tokens(t) for t in attacks])
        if encoder is not None:
            row["attacker/embedding_diversity"] = embedding_diversity(encoder.encode(attacks).cpu())
    return row


class GameValidation(nn.Module):
    """One validation run after another: the synced means, the kept rows, and the report's history.

    :attr:`history` (one row per validation, the sanity check included; a second one at the same step, a
    resume's sanity check, replaces the first) and :attr:`samples` (the last validation's first rows by
    global index) are the same on every rank and go into checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.means = ValidationMeans()
        self.rows: list[SampleRow] = []
        self.history: list[dict[str, float]] = []
        self.samples: list[dict] = []

    def start(self) -> None:
        self.rows = []
        self.means.reset()

    def add(self, index: list[int], seeds: list[str], seed_scores, game, kl: dict[str, torch.Tensor]) -> None:
        """One batch: the defender's ``seed_scores`` on the raw seeds, the ``game`` round (a
        :class:`~lit_align.game.play.Round`) and each player's (B,) KL on it."""
        self.means.update("seed/asr", seed_scores.unsafe)
        self.means.update("seed/reward", seed_scores.defender_reward)
        for key, values in (("attack/asr", game.scores.unsafe), ("attack/reward", game.scores.defender_reward),
                            ("attacker/judge_reward", game.scores.attacker_reward),
                            ("attacker/kl", kl["attacker"]), ("defender/kl", kl["defender"])):
            self.means.update(key, values, game.keep)
        self.rows.extend(SampleRow(i, s, a, r, bool(u), float(w)) for i, s, a, r, u, w, k in zip(
            index, seeds, game.texts, game.responses, game.scores.unsafe.tolist(),
            game.scores.defender_reward.tolist(), game.keep.tolist()) if k)

    def finish(self, step: int, gather, encoder: MeanPoolEncoder | None, num_samples: int,
               record: bool = True) -> dict[str, float]:
        """The run's row (``gather``: every rank's rows, ``engine.distributed.all_gather_objects``); recorded
        in :attr:`history` and :attr:`samples` when ``record`` (validation, not test)."""
        rows = sorted(r for part in gather(self.rows) for r in part)
        row = validation_row(self.means.compute(), rows, encoder)
        if record and row:
            if self.history and self.history[-1]["step"] == step:
                self.history.pop()
            self.history.append({"step": float(step), **row})
            self.samples = [{"seed": r.seed, "attack": r.attack, "response": r.response, "unsafe": r.unsafe,
                             "reward": r.reward} for r in rows[:num_samples]]
        return row
