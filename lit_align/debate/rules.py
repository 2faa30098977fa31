"""ACC-Collab pair rules and actor-quality rules as small classes chosen in YAML by ``class_path``.

Estornell, Ton, Yao, Liu 2024, "ACC-Collab" (arXiv 2411.00053), Eq. 5 / Algorithm 1, and its released code
(github.com/LlenRotse/ACC-Collab, ``DPO.py``)::

    model:
      pair_rule:
        class_path: lit_align.debate.rules.CodeRule
        init_args: {threshold: 0.6, actor_quality: {class_path: lit_align.debate.rules.CorrectnessQuality}}

* :class:`PaperRule` (default): guided vs natural, ``Δy = r(z_y) - r(z) >= ε`` gives (z_y ≻ z), else
  ``Δ!y = r(z) - r(z_!y) >= ε`` gives (z ≻ z_!y) (:func:`~lit_align.debate.pairs.paper_rule`);
* :class:`CodeRule`: guided vs guided, (z_y ≻ z_!y) iff ``q(z_y) - q(z_!y) >= threshold``
  (:func:`~lit_align.debate.pairs.code_rule`), the actor's q given by an :class:`ActorQuality`:
  :class:`RolloutQuality` (one-step rollouts, as for the critic) or :class:`CorrectnessQuality` (the guided
  answer's own correctness, as released).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lit_align.debate.pairs import PairCandidate, code_rule, paper_rule
from lit_align.debate.rewards import GuidedResponse
from lit_align.errors import ConfigError

__all__ = ["ActorQuality", "CodeRule", "CorrectnessQuality", "PaperRule", "PairRule", "RolloutQuality", "strategy"]

Choice = tuple[str, str, float, float]
"""(chosen, rejected, reward of chosen, reward of rejected)."""


def _unit(key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} is a reward difference in [0, 1], got {value!r}")
    return float(value)


class ActorQuality(ABC):
    """How the code rule values the actor's guided responses (the critic's are always valued by rollouts)."""

    @abstractmethod
    def values(self, guided: Sequence[GuidedResponse]) -> list[float] | None:
        """Each response's quality, or ``None``: estimate it by one-step rollouts."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class RolloutQuality(ActorQuality):
    """The probability that the debate ends correct when continued from the response (K one-step rollouts)."""

    def values(self, guided: Sequence[GuidedResponse]) -> None:
        return None


class CorrectnessQuality(ActorQuality):
    """The guided answer's own correctness, 1 or 0 (the released code's actor data; no rollouts)."""

    def values(self, guided: Sequence[GuidedResponse]) -> list[float]:
        return [float(g.correct) for g in guided]


class PairRule(ABC):
    """Which (chosen, rejected) pair, if any, a candidate gives."""

    needs_natural_reward: bool = False
    """Whether the natural response's reward r(z) is estimated too."""
    keeps_natural_critic: bool = False
    """Whether the critic's trial-0 "guided" responses are its natural ones (the released code; those pairs
    are identical texts and dropped)."""

    def actor_quality(self) -> ActorQuality:
        """How the actor's guided responses are valued."""
        return RolloutQuality()

    @abstractmethod
    def choose(self, candidate: PairCandidate) -> Choice | None:
        """The pair of ``candidate``, or ``None``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


class PaperRule(PairRule):
    """The paper's rule: guided vs natural with threshold ``epsilon`` (its value was not found in the paper)."""

    needs_natural_reward = True

    def __init__(self, epsilon: float = 0.5) -> None:
        """
        Args:
            epsilon: the reward difference a guided response must gain over the natural one (or the natural
                one over the guided-away one), in [0, 1].
        """
        self.epsilon = _unit("model.pair_rule.init_args.epsilon", epsilon)

    def choose(self, candidate: PairCandidate) -> Choice | None:
        c = candidate
        if c.reward_natural is None:
            raise ValueError(f"{c.player} pair (question {c.question_index}, round {c.round}): the paper rule needs "
                             "the natural response's reward")
        branch = paper_rule(c.reward_natural, c.reward_toward, c.reward_away, self.epsilon)
        if branch == "toward":
            return c.toward, c.natural, c.reward_toward, c.reward_natural
        if branch == "away":
            return c.natural, c.away, c.reward_natural, c.reward_away
        return None


class CodeRule(PairRule):
    """The released code's rule: guided toward the truth vs guided away, quality difference >= ``threshold``."""

    keeps_natural_critic = True

    def __init__(self, threshold: float = 0.6, actor_quality: ActorQuality | None = None) -> None:
        """
        Args:
            threshold: the quality difference that keeps a pair, in [0, 1] (0.6 in the released ``DPO.py``).
            actor_quality: how the actor's responses are valued (default :class:`RolloutQuality`; the released
                code: :class:`CorrectnessQuality`).
        """
        self.threshold = _unit("model.pair_rule.init_args.threshold", threshold)
        self.quality = strategy(actor_quality, ActorQuality, "model.pair_rule.init_args.actor_quality") \
            if actor_quality is not None else RolloutQuality()

    def actor_quality(self) -> ActorQuality:
        return self.quality

    def choose(self, candidate: PairCandidate) -> Choice | None:
        c = candidate
        if not code_rule(c.reward_toward, c.reward_away, self.threshold):
            return None
        return c.toward, c.away, c.reward_toward, c.reward_away


def strategy(value: Any, base: type, key: str) -> Any:
    """A ``base`` instance from itself or a ``{class_path, init_args}`` mapping (as YAML writes it); the error
    names ``key``."""
    if isinstance(value, base):
        return value
    if isinstance(value, Mapping) and "class_path" in value:
        path = str(value["class_path"])
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or __name__), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{key}.class_path: cannot import {path!r} ({err})") from err
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{key}.class_path: {path!r} is not a {base.__name__}")
        return cls(**dict(value.get("init_args") or {}))
    raise ConfigError(f"{key} must be a {base.__name__} ({{class_path: ..., init_args: ...}}), got {value!r}")


torch.serialization.add_safe_globals([PaperRule, CodeRule, RolloutQuality, CorrectnessQuality])  # in checkpoints' hparams
