"""The debate's settings, grouped: how the team debates, what a generate stage makes, how DPO trains.

Each is a documented dataclass validated on construction; errors name the key as written in YAML
(``model.debate.rounds``, ``model.generate.k``, ``model.dpo.patience``...). :func:`coerce` turns the plain
mappings a script passes (``{"rounds": 3}``) into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import torch

from lit_align.errors import ConfigError, check_choice, check_int
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["DPOSettings", "DebateSettings", "GenerateSettings", "acc_adamw", "coerce"]

T = TypeVar("T")


def acc_adamw(lr: float):
    """The players' default optimiser at ``lr``: the released code's (TRL's AdamW, weight decay 0.1)."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.1)


@dataclass
class DebateSettings:
    """How the actor and the critic debate (training data, validation and prediction alike)."""

    rounds: int = 5
    """Debate rounds R (the paper: 5, rounds 0..4)."""
    temperature: float = 0.7
    """Sampling temperature of debates, guided responses and rollouts (the paper: 0.7)."""
    top_p: float = 0.9
    """Nucleus sampling of the same (the paper: 0.9)."""
    max_new_tokens: int = 256
    """The actor's response cap."""
    critic_max_new_tokens: int | None = None
    """The critic's response cap (``None``: ``max_new_tokens``)."""
    max_tries: int = 2
    """Re-samples of an unparseable actor answer (the released code: 2); then it counts as wrong."""
    chat_template: bool | None = None
    """Format prompts with the tokenizer's chat template (``None``: when it has one)."""

    def __post_init__(self) -> None:
        check_int("model.debate.rounds", self.rounds, 1)
        check_int("model.debate.max_tries", self.max_tries, 0)
        check_int("model.debate.max_new_tokens", self.max_new_tokens, 1)
        check_int("model.debate.critic_max_new_tokens", self.critic_max_new_tokens, 1, optional=True)
        try:
            self.sampling("actor")
        except ValueError as err:
            raise ConfigError(f"model.debate: {err}") from err

    def sampling(self, player: str) -> SamplingConfig:
        """The sampler settings of ``player``'s turns."""
        cap = self.critic_max_new_tokens if player == "critic" and self.critic_max_new_tokens else self.max_new_tokens
        return SamplingConfig(max_new_tokens=cap, temperature=self.temperature, top_p=self.top_p)


@dataclass
class GenerateSettings:
    """What a phase's generate stage makes: debates, guided responses, rewards and pairs."""

    trials: int = 5
    """Natural debates per question per phase (the code: 5)."""
    k: int = 10
    """One-step rollouts per reward estimate (the paper's K was not found; the critic-data code: 10)."""
    questions_per_phase: int | None = None
    """Training questions a phase generates on (``None``: the whole training split; the code: 6000)."""
    max_pairs: int | None = 20000
    """Cap on a phase's pairs, a seeded random subset (the code: 20000; ``None``: all)."""
    dpo_val_questions: int = 0
    """Questions a phase generates DPO-validation pairs on, after the training ones (the code: 1000; 0: no
    DPO validation, no early stopping)."""
    max_val_pairs: int | None = 4000
    """Cap on a phase's validation pairs (the code: 4000; ``None``: all)."""
    pair_rounds: Literal["all", "code"] = "all"
    """``all`` rounds, or the released code's ranges (actor 1..R-1, critic 0..R-1)."""
    critic_rollout_actor: Literal["current", "initial"] = "current"
    """The actor of the critic phase's debates and rollouts: ``current`` (the paper's best response) or
    ``initial`` (the released scripts: the starting checkpoint)."""

    def __post_init__(self) -> None:
        check_int("model.generate.trials", self.trials, 1)
        check_int("model.generate.k", self.k, 1)
        check_int("model.generate.questions_per_phase", self.questions_per_phase, 1, optional=True)
        check_int("model.generate.max_pairs", self.max_pairs, 1, optional=True)
        check_int("model.generate.dpo_val_questions", self.dpo_val_questions, 0)
        check_int("model.generate.max_val_pairs", self.max_val_pairs, 1, optional=True)
        check_choice("model.generate.pair_rounds", self.pair_rounds, ("all", "code"))
        check_choice("model.generate.critic_rollout_actor", self.critic_rollout_actor, ("current", "initial"))


@dataclass
class DPOSettings:
    """A phase's DPO run on its pairs (sigmoid loss; the reference is the player as the run starts)."""

    beta: float = 0.1
    """DPO's inverse temperature (TRL's default, as in the released code)."""
    label_smoothing: float = 0.0
    """Conservative-DPO label smoothing (0: plain DPO)."""
    epochs: int = 3
    """Passes over the phase's pairs (the code: 3)."""
    batch_size: int = 4
    """Pairs per optimiser step, per rank (the code: batch 2 x 2 accumulation)."""
    max_prompt_tokens: int = 512
    """DPO truncation of prompts (they lose their start)."""
    max_response_tokens: int = 512
    """DPO truncation of responses."""
    eval_every: int = 50
    """Optimiser steps between DPO validations (the code: 50); the last step is always evaluated."""
    patience: int | None = 5
    """Evaluations without a new best validation loss before a phase stops early (the code: 5; ``None``:
    never early)."""
    restore_best: bool = True
    """End each phase with the player's weights at its best validation loss (``load_best_model_at_end``)."""
    reset_optimizer: bool = True
    """Start each DPO run with a fresh optimiser state (each released DPO run did)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"model.dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"model.dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_int("model.dpo.epochs", self.epochs, 1)
        check_int("model.dpo.batch_size", self.batch_size, 1)
        check_int("model.dpo.max_prompt_tokens", self.max_prompt_tokens, 1)
        check_int("model.dpo.max_response_tokens", self.max_response_tokens, 1)
        check_int("model.dpo.eval_every", self.eval_every, 1)
        check_int("model.dpo.patience", self.patience, 1, optional=True)


def coerce(value: T | Mapping[str, Any] | None, cls: type[T], key: str) -> T:
    """``value`` as a ``cls``: itself, the defaults for ``None``, or built from a mapping (unknown keys named)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(f.name for f in fields(cls))}")
        return cls(**value)
    raise ConfigError(f"{key} must be a block of {cls.__name__} settings, got {type(value).__name__}")


torch.serialization.add_safe_globals([DebateSettings, GenerateSettings, DPOSettings])  # in checkpoints' hparams
