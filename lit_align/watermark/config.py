"""The watermark method's settings, one documented block each (``model.init_args.<block>`` in YAML).

Where the paper (Xu, Yao, Liu 2024, arXiv 2403.10553) is silent the defaults follow its released code
(github.com/xiaojunxu/learning-to-watermark-llm: ``main.py``, ``utils.py``, ``model_utils.py``); each such
default says so and names the switch to lit_align's earlier rule. Every block validates itself on
construction and its errors name the config key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from lit_align.errors import require
from lit_align.models import ModelSpec, RewardModelSpec

__all__ = ["AlignmentMix", "DetectorTraining", "OtherLLM", "RewardShaping"]


def _check(ok: bool, key: str, rule: str, value) -> None:
    require(ok, f"model.{key}", rule, value)


@dataclass
class RewardShaping:
    """How the detector's score becomes the actor's PPO rewards and advantages (``model.rewards``)."""

    kl_coef: float = 0.1
    """Per-token KL penalty to the reference (the paper's ``kl_rl`` = 0.1)."""
    reward_clip: float = 5.0
    """The score is clipped to +-this before it enters the reward (5 in the reference)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = False
    """Normalise the advantages over the batch's action tokens, with every rank's moments (off in the reference)."""

    def __post_init__(self) -> None:
        _check(self.kl_coef >= 0, "rewards.kl_coef", ">= 0", self.kl_coef)
        _check(self.reward_clip > 0, "rewards.reward_clip", "> 0", self.reward_clip)
        _check(0 <= self.gamma <= 1, "rewards.gamma", "in [0, 1]", self.gamma)
        _check(0 <= self.lam <= 1, "rewards.lam", "in [0, 1]", self.lam)


@dataclass
class DetectorTraining:
    """What the detector is trained on and how (``model.detector_training``)."""

    pretrain_steps: int = 0
    """Stage 1 length in steps (the detector alone, on the original LLM's text); when co-training starts the
    critic becomes a copy of the detector so trained (the reference starts its value net from the stage-1
    detector checkpoint)."""
    reg: float = 1e-4
    """Weight of the squared-score penalty (1e-4 in the reference)."""
    reg_extra: bool = False
    """Also put the penalty on the robustness terms. False is the reference code's rule (``main.py`` adds it
    to the main pair only; the paper does not say); True is lit_align's earlier rule."""
    substitution_ratio: float = 0.0
    """Robustness term: also train on the generated text with this share of tokens replaced at random, still
    labelled watermarked (the paper: 0.2; 0: off)."""
    substitution_weight: float = 1.0
    """Weight of the substitution term (1.0 in the reference)."""
    paraphraser: Callable[[list[str]], list[str]] | None = None
    """Robustness term: also train on paraphrases of the generated text, still labelled watermarked (the paper:
    Pegasus at temperature 1.5, e.g. ``lit_align.metrics.HFParaphraser``); None: off."""
    paraphrase_weight: float = 1.0
    """Weight of the paraphrase term (1.0 in the reference)."""
    human_from_reference: bool = False
    """Take the "human" continuations from the frozen reference's samples (a control for tiny models: the
    classes start indistinguishable, so any separation comes from the actor's update)."""
    retokenize_text: bool = True
    """Read every continuation (the LLM's and the human's) as text decoded and encoded again, not as the
    sampled ids: a sampled id sequence can be one the tokenizer never produces from text, a shortcut that
    would separate the classes without a watermark. False: raw ids."""

    def __post_init__(self) -> None:
        steps = self.pretrain_steps
        _check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
               "detector_training.pretrain_steps", "an int >= 0", steps)
        _check(self.reg >= 0, "detector_training.reg", ">= 0", self.reg)
        _check(0.0 <= self.substitution_ratio < 1.0, "detector_training.substitution_ratio", "in [0, 1)",
               self.substitution_ratio)
        for name in ("substitution_weight", "paraphrase_weight"):
            _check(getattr(self, name) >= 0, f"detector_training.{name}", ">= 0", getattr(self, name))
        _check(self.paraphraser is None or callable(self.paraphraser), "detector_training.paraphraser",
               "callable (texts -> texts) or null", self.paraphraser)


@dataclass
class AlignmentMix:
    """Watermarking during alignment (``model.alignment``): the PPO reward becomes
    ``weight * detector + (1 - weight) * reward_model``. With another tokenizer the texts are decoded and
    re-encoded for it (cut to its ``model_max_length``), so an encoder classifier (BERT, DeBERTa; ``kind:
    sequence_classification``) serves as well as a decoder reward model. Frozen, replicated on every rank."""

    reward: RewardModelSpec
    """The frozen alignment reward model."""
    weight: float = 0.5
    """The detector's share of the reward (the paper's lambda = 0.5)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.weight <= 1.0, "alignment.weight", "in [0, 1] (the detector's share)", self.weight)


@dataclass
class OtherLLM:
    """"H+L": continuations sampled from another frozen LLM as negatives of the detector (``model.other_llm``).
    Replicated on every rank."""

    model: ModelSpec
    """The other LLM (a causal LM sharing the actor's tokenizer)."""
    mode: Literal["add", "replace"] = "add"
    """``add`` (the reference code's rule: ``main.py`` keeps the human pair and adds the pair "LLM text vs the
    other LLM's text" at ``weight``; the paper does not say) or ``replace`` (lit_align's earlier rule: the
    other LLM's text replaces the human text as the main pair's negatives, validation included)."""
    weight: float = 1.0
    """Weight of the added pair (1.0 in the reference code; ``add`` only)."""

    def __post_init__(self) -> None:
        _check(self.mode in ("add", "replace"), "other_llm.mode", "'add' (an extra pair, the reference code) or "
               "'replace' (instead of the human text)", self.mode)
        _check(self.weight >= 0, "other_llm.weight", ">= 0", self.weight)


# Saved with the hyperparameters in every checkpoint; allow them in weights-only loads
torch.serialization.add_safe_globals([RewardShaping, DetectorTraining, AlignmentMix, OtherLLM])
