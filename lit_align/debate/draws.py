"""Per-row random draws for the debate: what a question samples depends on the question, never on its batch.

Every sampler call of a debate (an actor turn, a retry, a critic turn, a guided response, a one-step
rollout) is named, and each of its rows draws from its own ``torch.Generator`` seeded from
``(seed, step, purpose/call, key)`` (:func:`lit_align.engine.seeds.row_generators`), ``key`` being the
row's question's global dataset index (times ``k`` plus the copy, for rollouts). So the same question
samples the same text on one rank or several, in any batch, with any padding rows beside it (what
makes N ranks equal one process), and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lit_align.engine.seeds import derive_seed, row_generators

__all__ = ["RowSeeds"]


@dataclass(frozen=True)
class RowSeeds:
    """The seeds of a family of named draws (see the module docstring)."""

    seed: int
    """The run's sampling seed."""
    step: int
    """The clock the draws belong to (the debate: the phase for training data, the batch for evaluation)."""
    purpose: str
    """What the draws are for (``generate/trial3``, ``val``...); each call appends its own name."""

    def child(self, name: str) -> RowSeeds:
        """The draws of a part (``round2``, ``guided``...) of these."""
        return replace(self, purpose=f"{self.purpose}/{name}")

    def generators(self, call: str, keys: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per row of the sampler call ``call``, from each row's ``key``."""
        return row_generators(self.seed, self.step, f"{self.purpose}/{call}", keys, device)

    def rng(self, call: str, key: int) -> random.Random:
        """A ``random.Random`` for one row's non-token draw (e.g. the wrong target of a guided prompt)."""
        return random.Random(derive_seed(self.seed, self.step, f"{self.purpose}/{call}", key))
