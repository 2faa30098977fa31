"""What one ACC-Collab phase accumulates, in one place: reset when a phase starts, saved and loaded whole."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import Tensor

from lit_align.debate.pairs import PreferencePair

__all__ = ["PhaseState"]


@dataclass
class PhaseState:
    """The state of the current phase (one player's generate stage, then its DPO run).

    A phase starts as ``PhaseState()``; :class:`~lit_align.methods.DebateModule` checkpoints it with
    :meth:`state_dict` and restores it with :meth:`from_state_dict`, so a run resumes mid-phase exactly.
    """

    stage: Literal["generate", "train", "done"] = "generate"
    """``generate`` (debates, guided responses, rewards, pairs), ``train`` (DPO) or ``done`` (no phase left)."""
    questions_done: int = 0
    """Questions generated on in this phase (training questions first, then DPO-validation ones)."""
    pairs: list[PreferencePair] = field(default_factory=list)
    """This phase's DPO pairs."""
    val_pairs: list[PreferencePair] = field(default_factory=list)
    """This phase's DPO-validation pairs (held-out questions)."""
    ref_logps: Tensor | None = None
    """(N, 2) the reference's log-probs of each pair's (chosen, rejected), scored once when DPO starts."""
    val_ref_logps: Tensor | None = None
    """(N_val, 2) the same for the validation pairs."""
    order: list[list[int]] = field(default_factory=list)
    """The DPO minibatches (pair indices), ``dpo_epochs`` shuffled passes."""
    position: int = 0
    """The next minibatch."""
    best_val_loss: float | None = None
    """The best DPO-validation loss of this DPO run."""
    best_weights: dict[str, Tensor] | None = None
    """The player's trainable weights at ``best_val_loss`` (restored at the end of the run)."""
    bad_evals: int = 0
    """DPO-validation checks since the last new best (early stopping after ``dpo_patience``)."""

    def cap(self, max_pairs: int | None, max_val_pairs: int | None, rng: random.Random) -> None:
        """Keep seeded random subsets of at most ``max_pairs`` pairs and ``max_val_pairs`` validation pairs."""
        if max_pairs is not None and len(self.pairs) > max_pairs:
            self.pairs = rng.sample(self.pairs, max_pairs)
        if max_val_pairs is not None and len(self.val_pairs) > max_val_pairs:
            self.val_pairs = rng.sample(self.val_pairs, max_val_pairs)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (pairs as dicts)."""
        state = {name: getattr(self, name) for name in self.__dataclass_fields__}
        state["pairs"] = [asdict(p) for p in self.pairs]
        state["val_pairs"] = [asdict(p) for p in self.val_pairs]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PhaseState:
        """The inverse of :meth:`state_dict`."""
        state = dict(state)
        state["pairs"] = [PreferencePair(**p) for p in state.get("pairs", [])]
        state["val_pairs"] = [PreferencePair(**p) for p in state.get("val_pairs", [])]
        state["order"] = [list(rows) for rows in state.get("order", [])]
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})
