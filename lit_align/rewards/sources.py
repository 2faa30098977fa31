"""Reward sources for online RL: what scores a sampled response. One interface for every kind of scorer.

A :class:`Reward` reads a :class:`RewardInput` (the prompts and responses as text, and the rollout's token ids
in the policy's vocabulary) and returns one float per row. YAML chooses the source by ``class_path``; sources that
load a checkpoint do it in :meth:`Reward.build`, called when the module is built::

    reward:                       # a reward model trained by lit_align (RewardModelModule), or any scalar scorer
      class_path: lit_align.rewards.ModelReward
      init_args: {model: {model: {name_or_path: outputs/rm-tiny/hf_export}, kind: sequence_classification}}
    reward:                       # any judge of the two-player game: a rule, Llama Guard, an HF classifier
      class_path: lit_align.rewards.JudgeReward
      init_args: {judge: {class_path: lit_align.game.RuleJudge}}
    reward:                       # a weighted mix
      class_path: lit_align.rewards.Mix
      init_args:
        terms: [{class_path: lit_align.rewards.ModelReward, init_args: {...}},
                {class_path: lit_align.rewards.CallableReward, init_args: {fn: my_pkg.rules.length_penalty}}]
        weights: [1.0, 0.1]

The game's judges (:mod:`lit_align.game.judge`) read the same ``(prompts, responses)`` text, so
:class:`JudgeReward` turns any of them into a reward: the defender's reward (``p_safe``, or an HF reward model's
logit with ``lit_align.game.Classifier``, ``output: reward``) or the attacker's (a classifier's probability of a
label: ``Classifier(output: p_unsafe, unsafe_label: <label>)`` with ``output: attacker_reward``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.errors import ConfigError
from lit_align.game.judge import JudgeFactory, SafetyJudge, build_judge
from lit_align.models import RewardModelSpec, build_reward_model, build_tokenizer, freeze
from lit_align.models.reference import model_fingerprint
from lit_align.modes import eval_mode
from lit_align.watermark.text import encode_for

__all__ = ["CallableReward", "JudgeReward", "Mix", "ModelReward", "PromptOffset", "Reward", "RewardInput"]


@dataclass
class RewardInput:
    """What a reward reads about B sampled rows.

    Attributes:
        prompts: B prompt texts as the user wrote them (before the chat template).
        responses: B responses decoded without special tokens (up to and without the EOS).
        sequences: (B, T) long, the policy's token ids: left-padded prompt (templated) + response (its EOS
            included when one was sampled), right-padded.
        attention_mask: (B, T) long, 1 on the real tokens of ``sequences``.
        tokenizer: the policy's tokenizer.
    """

    prompts: list[str]
    responses: list[str]
    sequences: Tensor
    attention_mask: Tensor
    tokenizer: PreTrainedTokenizerBase

    def __len__(self) -> int:
        return len(self.prompts)


class Reward(nn.Module):
    """Base of the reward sources: frozen, scored without gradient in eval mode.

    Subclasses implement :meth:`_score` and, if they load weights, :meth:`build` (called once by the
    method's ``configure_model`` with the policy's tokenizer and the reward's config key, named in errors).
    :meth:`fingerprint` identifies the scorer (weights included) for caches such as the contrastive
    baseline's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # the device of weightless rewards

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.reward") -> None:
        """Load what the reward needs; the default needs nothing."""

    def fingerprint(self) -> str:
        """A stable id of the scorer: its class and settings (and weights, for model rewards)."""
        return type(self).__qualname__

    def _score(self, batch: RewardInput) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, batch: RewardInput) -> Tensor:
        """(B,) float32 rewards on the device of ``batch.sequences``."""
        with eval_mode(self):
            scores = torch.as_tensor(self._score(batch), dtype=torch.float32)
        if scores.shape != (len(batch),):
            raise ValueError(f"{type(self).__name__} returned {tuple(scores.shape)} scores for {len(batch)} rows; "
                             "a reward returns one number per row")
        return scores.to(batch.sequences.device)


class ModelReward(Reward):
    """A scalar scorer (:class:`~lit_align.models.RewardModel`): an HF sequence-classification reward model
    (``kind: sequence_classification``, e.g. a ``RewardModelModule`` export) or a causal LM with a scalar head.

    With the policy's vocabulary it reads the rollout's token ids as they are (the templated prompt and the
    response with its EOS): the exact sequence, no re-tokenisation. With another vocabulary (a hub reward
    model on another base) the text is decoded and encoded with the reward model's tokenizer
    (``retokenize: auto``) or refused (``never``)."""

    def __init__(self, model: RewardModelSpec, retokenize: Literal["auto", "never"] = "auto") -> None:
        """
        Args:
            model: the reward model to load (frozen).
            retokenize: ``auto``: re-encode the text when the reward model's tokenizer differs from the
                policy's; ``never``: refuse that.
        """
        super().__init__()
        self.spec = RewardModelSpec(**model) if isinstance(model, dict) else model
        if retokenize not in ("auto", "never"):
            raise ConfigError(f"model.reward.init_args.retokenize must be 'auto' or 'never', got {retokenize!r}")
        self.retokenize = retokenize
        self.model: nn.Module | None = None
        self._own_tokenizer: PreTrainedTokenizerBase | None = None  # set when it differs from the policy's
        self._fingerprint: str | None = None

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.reward") -> None:
        own = build_tokenizer(self.spec.model, key=f"{key}.init_args.model.model", needs_eos=False)
        if own.get_vocab() != tokenizer.get_vocab():
            if self.retokenize == "never":
                raise ConfigError(f"{key}.init_args.model: the reward model's tokenizer differs from the policy's; "
                                  f"set {key}.init_args.retokenize: auto to score the decoded text with the reward "
                                  "model's own tokenizer, or give it the policy's tokenizer")
            self._own_tokenizer = own
        self.model = freeze(build_reward_model(self.spec, own, key=f"{key}.init_args.model"))
        self._fingerprint = model_fingerprint(self.model)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            raise RuntimeError("ModelReward.fingerprint: build() first")
        return f"ModelReward:{self._fingerprint}"

    def _score(self, batch: RewardInput) -> Tensor:
        ids, mask = batch.sequences, batch.attention_mask
        if self._own_tokenizer is not None:  # another vocabulary: through text
            ids, mask = encode_for(self._own_tokenizer, batch.tokenizer, ids, mask)
        return self.model.score(ids, mask)


class JudgeReward(Reward):
    """A judge of the two-player game (:mod:`lit_align.game.judge`) as a reward: ``defender_reward``
    (``p_safe``; an HF reward model's logit with ``lit_align.game.Classifier``, ``output: reward``) or
    ``attacker_reward`` (``p_unsafe``: a classifier's probability of ``unsafe_label``). The judge reads the
    prompt and response text with its own tokenizer."""

    def __init__(self, judge: JudgeFactory | SafetyJudge | Callable | None = None,
                 output: Literal["defender_reward", "attacker_reward"] = "defender_reward") -> None:
        """
        Args:
            judge: ``class_path: lit_align.game.RuleJudge`` (the toy refusal scorer), ``LlamaGuard``,
                ``Classifier``, or a callable ``(prompts, responses) -> P(unsafe)``; ``None``: RuleJudge.
            output: which of the judge's scores is the reward.
        """
        super().__init__()
        if output not in ("defender_reward", "attacker_reward"):
            raise ConfigError(f"model.reward.init_args.output must be 'defender_reward' or 'attacker_reward', got "
                              f"{output!r}")
        self.factory, self.output = judge, output
        self.judge: nn.Module | None = judge if isinstance(judge, SafetyJudge) else None

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.reward") -> None:
        self.judge = build_judge(self.factory, key=f"{key}.init_args.judge")

    def fingerprint(self) -> str:
        judge = self.judge if self.judge is not None else self.factory
        weights = model_fingerprint(judge) if isinstance(judge, nn.Module) and any(judge.parameters()) else ""
        return f"JudgeReward:{self.output}:{type(judge).__qualname__}:{_settings(judge)}:{weights}"

    def _score(self, batch: RewardInput) -> Tensor:
        if self.judge is None:
            self.build(batch.tokenizer)
        return getattr(self.judge.score(batch.prompts, batch.responses), self.output)


def _settings(obj: object) -> str:
    """sha256 of an object's plain settings (its public str / number / bool / sequence attributes)."""
    plain = (str, int, float, bool, tuple, list, type(None))
    items = sorted((k, repr(v)) for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, plain))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


class CallableReward(Reward):
    """Any function ``(prompts, responses) -> B floats`` (a rule, a regex check, a unit test runner)."""

    def __init__(self, fn: Callable) -> None:
        """
        Args:
            fn: ``(prompts: list[str], responses: list[str]) -> B floats`` (a sequence or a tensor); in YAML its
                import path, e.g. ``fn: my_pkg.rules.length_penalty``.
        """
        super().__init__()
        if not callable(fn):
            raise ConfigError(f"model.reward.init_args.fn must be a callable (prompts, responses) -> scores, got "
                              f"{type(fn).__name__}")
        self.fn = fn

    def fingerprint(self) -> str:
        fn = self.fn
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        return f"CallableReward:{name}:{_settings(fn) if hasattr(fn, '__dict__') else ''}"

    def _score(self, batch: RewardInput) -> Tensor:
        return torch.as_tensor(self.fn(batch.prompts, batch.responses), dtype=torch.float32)


class PromptOffset(Reward):
    """A proxy reward for experiments: ``base`` plus a per-prompt offset ``scale * z(x)``, ``z(x) ~ N(0, 1)``
    drawn from the prompt text's hash and ``seed`` (the same for every response to one prompt). It is the
    miscalibration contrastive rewards remove (Shen et al. 2024): a reward model that rates some prompts higher
    whatever the answer; the gold reward (``base``) has no such offset."""

    def __init__(self, base: Reward, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if not scale >= 0:
            raise ConfigError(f"model.reward.init_args.scale must be >= 0, got {scale}")
        self.base, self.scale, self.seed = base, float(scale), int(seed)

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.reward") -> None:
        self.base.build(tokenizer, f"{key}.init_args.base")

    def fingerprint(self) -> str:
        return f"PromptOffset:{self.scale}:{self.seed}:{self.base.fingerprint()}"

    def offsets(self, prompts: Sequence[str]) -> Tensor:
        """(B,) ``scale * z(x)`` of each prompt."""
        def z(prompt: str) -> float:
            digest = hashlib.sha256(f"{self.seed}|{prompt}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            return float(torch.randn((), generator=g))

        return torch.tensor([self.scale * z(p) for p in prompts])

    def _score(self, batch: RewardInput) -> Tensor:
        return self.base(batch).cpu() + self.offsets(batch.prompts)


class Mix(Reward):
    """A weighted sum of rewards; :attr:`last` holds each term's latest (B,) scores for logging."""

    def __init__(self, terms: Sequence[Reward], weights: Sequence[float]) -> None:
        super().__init__()
        if not terms or len(terms) != len(weights):
            raise ConfigError(f"model.reward.init_args: give one weight per term (got {len(terms)} terms and "
                              f"{len(weights)} weights)")
        self.terms = nn.ModuleList(terms)
        self.weights = [float(w) for w in weights]
        self.last: dict[str, Tensor] = {}

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.reward") -> None:
        for i, term in enumerate(self.terms):
            term.build(tokenizer, f"{key}.init_args.terms[{i}]")

    def fingerprint(self) -> str:
        return "Mix:" + "|".join(f"{w}*{t.fingerprint()}" for w, t in zip(self.weights, self.terms))

    def _score(self, batch: RewardInput) -> Tensor:
        parts = [term(batch) for term in self.terms]
        self.last = {f"{i}_{type(t).__name__}": p for i, (t, p) in enumerate(zip(self.terms, parts))}
        return sum(w * p for w, p in zip(self.weights, parts))
