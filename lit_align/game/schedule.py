"""Who updates at each optimisation step of the GPO game (Zheng et al. 2024, "Toward Optimal LLM Alignments
Using Two-Player Games", arXiv 2406.10977; released code github.com/ruizheng20/gpo, ``gpo/gpo_trainer.py``).

Within each cycle of ``defender_steps + attacker_steps`` steps, the first block updates only one
player (and its critic) and the second block only the other. With the defaults the
defender goes first::

    step    0 ..  199   defender        (block of k = defender_steps)
    step  200 ..  599   attacker        (block of m = attacker_steps)
    step  600 ..  799   defender        (next cycle)

``mode="simultaneous"`` updates both players every step (the usual setting of the tabular theory).

Both block lengths are config values because the sources disagree, and the disagreement is
unresolved:

* ``preset="paper"``: defender 200 steps, then attacker 400 steps per round, defender first. This is
  the split that reviews of the paper describe (a second-hand source).
* ``preset="code"``: defender 400 steps, then attacker 200 steps, defender first. This is the released
  launch script of Zheng et al. (``train_gpo.sh``): D 0-399, A 400-599, D 600-799 over 800 steps.

Every caller (experience making, the optimiser step, logging) must ask the same
:meth:`GameSchedule.active`. The reference code decided the stage twice, and one of the two
conditions was always false, so its experiences were always built as defender-stage data (``gpo/gpo_trainer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["PLAYERS", "GamePhase", "GameSchedule"]

#: The two players, in the order used for simultaneous steps.
PLAYERS: tuple[str, str] = ("defender", "attacker")

_PRESETS = {
    "paper": {"defender_steps": 200, "attacker_steps": 400, "first": "defender"},
    "code": {"defender_steps": 400, "attacker_steps": 200, "first": "defender"},
}


@dataclass(frozen=True)
class GamePhase:
    """Where a step falls in the schedule."""

    players: tuple[str, ...]
    """The players updated at this step: ``("defender",)``, ``("attacker",)`` or both."""
    cycle: int
    """Index of the cycle (one defender block plus one attacker block); the step itself in simultaneous mode."""
    offset: int
    """Index of the step within its block (0 on the first step of a block)."""
    block_length: int
    """Number of steps of the current block (1 in simultaneous mode)."""

    @property
    def block_start(self) -> bool:
        """True on the first step of a block (where a stage switch happens)."""
        return self.offset == 0


@dataclass
class GameSchedule:
    """Alternating (or simultaneous) update schedule of the defender and the attacker."""

    defender_steps: int = 200
    """Defender block length ``k`` (optimisation steps per cycle in which only the defender and the critic update)."""
    attacker_steps: int = 400
    """Attacker block length ``m`` (optimisation steps per cycle in which only the attacker and the critic update)."""
    first: Literal["defender", "attacker"] = "defender"
    """Which player's block opens each cycle."""
    mode: Literal["alternate", "simultaneous"] = "alternate"
    """``alternate``: blocks as above; ``simultaneous``: both players update at every step (block lengths unused)."""
    preset: Literal["paper", "code"] | None = None
    """Overrides ``defender_steps``, ``attacker_steps`` and ``first``: ``paper`` = D 200 then A 400
    (reviews of the paper), ``code`` = D 400 then A 200 (the released launch script); ``None`` uses the
    fields as given."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in _PRESETS:
                raise ValueError(
                    f"model.schedule.preset must be 'paper', 'code' or null, got {self.preset!r}"
                )
            for key, value in _PRESETS[self.preset].items():
                setattr(self, key, value)
        if self.first not in PLAYERS:
            raise ValueError(f"model.schedule.first must be 'defender' or 'attacker', got {self.first!r}")
        if self.mode not in ("alternate", "simultaneous"):
            raise ValueError(f"model.schedule.mode must be 'alternate' or 'simultaneous', got {self.mode!r}")
        for key in ("defender_steps", "attacker_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"model.schedule.{key} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"model.schedule.{key} must be >= 0, got {value}")
            if self.mode == "alternate" and value < 1:
                raise ValueError(
                    f"model.schedule.{key} must be >= 1 in alternate mode, got {value}: give each player at "
                    "least one step per cycle, or set model.schedule.mode to 'simultaneous'"
                )

    @property
    def cycle_length(self) -> int:
        """Steps per cycle: ``defender_steps + attacker_steps`` (1 in simultaneous mode)."""
        return 1 if self.mode == "simultaneous" else self.defender_steps + self.attacker_steps

    def phase(self, step: int) -> GamePhase:
        """Where optimisation step ``step`` (0-based, e.g. Lightning's ``global_step``) falls.

        Hand check with ``defender_steps=3, attacker_steps=2``, defender first: steps 0-2 defender
        (offsets 0, 1, 2), steps 3-4 attacker (offsets 0, 1), step 5 defender of cycle 1.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if self.mode == "simultaneous":
            return GamePhase(players=PLAYERS, cycle=step, offset=0, block_length=1)
        second = "attacker" if self.first == "defender" else "defender"
        lengths = {"defender": self.defender_steps, "attacker": self.attacker_steps}
        cycle, within = divmod(step, self.cycle_length)
        if within < lengths[self.first]:
            return GamePhase(players=(self.first,), cycle=cycle, offset=within, block_length=lengths[self.first])
        return GamePhase(players=(second,), cycle=cycle, offset=within - lengths[self.first],
                         block_length=lengths[second])

    def active(self, step: int) -> tuple[str, ...]:
        """The players updated at ``step``: ``("defender",)``, ``("attacker",)`` or ``("defender", "attacker")``."""
        return self.phase(step).players


# Specs are saved with the hyperparameters in every checkpoint; allow them in weights-only loads
# (``Trainer.fit(ckpt_path=...)`` of a module built in Python).
torch.serialization.add_safe_globals([GameSchedule])
