"""The game's settings, one documented block each (``model.<block>.<field>`` in YAML).

GPO (Zheng et al. 2024, arXiv 2406.10977) script settings are given where the released code
(github.com/ruizheng20/gpo, ``train_gpo.sh``) fixes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_align.data.prompts import DEFENDER_TEMPLATE
from lit_align.errors import ConfigError, check_int
from lit_align.models import ModelSpec, RewardModelSpec
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["GPO_RATES", "CriticConfig", "check_reference", "gpo_adamw", "DiversityConfig", "GameSampling", "PoolConfig", "RewardConfig"]


#: GPO's learning rates (defender, attacker, critics) when an optimisation block gives neither optimiser nor lr.
GPO_RATES = {"defender": 5e-7, "attacker": 3e-6, "critic": 1.5e-6}


def gpo_adamw(eps: float):
    """``lr -> factory`` of GPO's optimiser: AdamW, betas (0.9, 0.95), ``eps`` (1e-6; the critics' 1e-8), no weight
    decay (the released code's ``get_parms``)."""
    return lambda lr: lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=0.0)


@dataclass
class GameSampling:
    """How both players generate (``model.sampling``)."""

    attacker_max_new_tokens: int = 64
    """Cap of an attack prompt (not documented by the GPO script)."""
    defender_max_new_tokens: int = 128
    """Cap of an answer (the GPO script: 512)."""
    temperature: float = 0.8
    """Sampling temperature of both players (GPO: 0.8)."""
    top_p: float = 0.9
    """Nucleus of both players (GPO: 0.9)."""
    defender_template: str = DEFENDER_TEMPLATE
    """The defender's prompt around an attack prompt, a ``str.format`` template with only ``{prompt}``."""
    seed: int | None = None
    """Seed of every draw: step ``k`` draws row ``i`` from ``(seed, k, purpose, i)`` (:mod:`lit_align.engine.seeds`),
    so a resumed run samples what the uninterrupted one would. ``None``: the run's global seed
    (``seed_everything``), fixed at the start and kept in checkpoints."""

    def __post_init__(self) -> None:
        for name in ("attacker_max_new_tokens", "defender_max_new_tokens"):
            check_int(f"model.sampling.{name}", getattr(self, name))
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"model.sampling: temperature must be > 0 and top_p in (0, 1], got "
                              f"{self.temperature}, {self.top_p}")
        if "{prompt}" not in self.defender_template:
            raise ConfigError(f"model.sampling.defender_template must contain '{{prompt}}', got "
                              f"{self.defender_template!r}")
        try:
            self.defender_template.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"model.sampling.defender_template is not a str.format template with only {{prompt}} "
                              f"({err!r}); double literal braces as '{{{{' and '}}}}'") from err

    def player(self, player: str) -> SamplingConfig:
        """The sampler settings of ``player`` (``attacker`` or ``defender``)."""
        cap = self.attacker_max_new_tokens if player == "attacker" else self.defender_max_new_tokens
        return SamplingConfig(max_new_tokens=cap, temperature=self.temperature, top_p=self.top_p)


@dataclass
class RewardConfig:
    """Per-token rewards and advantages of both players (``model.rewards``)."""

    kl_coef: float = 0.01
    """Per-token KL penalty of the defender to its starting policy (GPO ``kl_penalty_weight`` 0.01)."""
    attacker_kl_coef: float | None = None
    """The attacker's KL penalty; ``None``: :attr:`kl_coef`."""
    reward_clip: float | None = None
    """Clip of the sequence reward before it enters the rewards; ``None``: off, as launched."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = False
    """Normalise advantages over the batch's action tokens, of every rank (off as launched)."""

    def __post_init__(self) -> None:
        for name in ("kl_coef", "attacker_kl_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"model.rewards.{name} must be >= 0, got {value}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"model.rewards.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")

    def kl(self, player: str) -> float:
        """The KL coefficient of ``player``."""
        return self.attacker_kl_coef if player == "attacker" and self.attacker_kl_coef is not None else self.kl_coef


@dataclass
class DiversityConfig:
    """The attacker's diversity terms (``model.diversity``): reward ``judge - bleu_weight SelfBLEU -
    embedding_weight CosSim``."""

    bleu_weight: float = 5.0
    """Weight of SelfBLEU against earlier attack prompts (GPO script: 5)."""
    embedding_weight: float = 1.0
    """Weight of the mean cosine similarity of sentence embeddings (GPO script: 1); > 0 needs :attr:`encoder`."""
    scope: Literal["history", "batch_and_history"] = "batch_and_history"
    """``history``: against every earlier attack prompt (the reference code); ``batch_and_history``: also
    against the other prompts of the same (global) batch."""
    history_window: int | None = None
    """Keep only the last prompts of the history; ``None``: all, as the code."""
    encoder: ModelSpec | None = None
    """The sentence encoder of the cosine term (e.g. ``sentence-transformers/all-MiniLM-L6-v2``)."""

    def __post_init__(self) -> None:
        if self.scope not in ("history", "batch_and_history"):
            raise ConfigError(f"model.diversity.scope must be 'history' or 'batch_and_history', got {self.scope!r}")
        if self.embedding_weight > 0 and self.encoder is None:
            raise ConfigError("model.diversity.embedding_weight > 0 needs model.diversity.encoder (a sentence encoder, "
                              "e.g. {name_or_path: sentence-transformers/all-MiniLM-L6-v2}); or set "
                              "model.diversity.embedding_weight: 0")
        if self.history_window is not None:
            check_int("model.diversity.history_window", self.history_window)


@dataclass
class PoolConfig:
    """Past attackers and averaged policies (``model.pool``)."""

    snapshot_every: int = 0
    """Attacker updates between snapshots of its trainable weights; 0: no pool."""
    size: int = 8
    """Snapshots kept (the most recent)."""
    prob: float = 0.0
    """Probability that a defender-only step attacks with a random snapshot (the attacker's past mixture)."""
    average_policies: bool = True
    """Keep the uniform running mean of each player's trainable weights (a surrogate of the averaged policy)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"model.pool.prob must be in [0, 1], got {self.prob}")
        if self.snapshot_every < 0 or self.size < 1:
            raise ConfigError(f"model.pool.snapshot_every must be >= 0 and model.pool.size >= 1, got "
                              f"{self.snapshot_every}, {self.size}")
        if self.prob > 0 and self.snapshot_every < 1:
            raise ConfigError("model.pool.prob > 0 needs model.pool.snapshot_every >= 1 (no snapshots are taken "
                              "otherwise)")


@dataclass
class CriticConfig:
    """The players' critics (``model.critic``)."""

    model: RewardModelSpec | None = None
    """Their architecture: a ``scalar_head`` reward-model spec on the players' tokenizer; ``None``: the
    defender's spec (its LoRA included: a frozen copy of the base, trainable adapters and a zero head)."""
    init_from: str | None = None
    """A reward-model checkpoint the critics start from (GPO: its Llama-2 RM)."""
    shared: bool = False
    """One critic for both players (the reference code's choice, whose value loss spikes at stage switches);
    ``False``: one per player."""


def check_reference(reference: str, specs: dict[str, ModelSpec]) -> None:
    """``model.reference``: ``auto``, ``adapter`` (LoRA on every player) or ``copy``."""
    if reference not in ("auto", "adapter", "copy"):
        raise ConfigError(f"model.reference must be 'auto', 'adapter' or 'copy' (new text is scored every "
                          f"step: nothing can be precomputed), got {reference!r}")
    if reference == "adapter" and any(s.lora is None for s in specs.values()):
        raise ConfigError("model.reference: 'adapter' needs LoRA on both players (model.defender.lora and "
                          "model.attacker.lora); use 'copy' or 'auto'")


# configs are saved with the hyperparameters in every checkpoint; allow them in weights-only loads
torch.serialization.add_safe_globals([CriticConfig, DiversityConfig, GameSampling, PoolConfig, RewardConfig])
