"""Rankers for online preference learning: which of a prompt's candidate responses is best, which worst.

Online DPO and SELM (Zhang et al. 2024, arXiv 2405.19332, others.md §7(c)) label their own generations: for each
prompt a ranker orders the candidates (the new responses and any dataset responses), the best becomes ``chosen``
and the worst ``rejected``. One interface for every kind of judge::

    ranks = ranker.rank(prompts, candidates)   # prompts: B strings; candidates: B lists of strings
    ranks[b][j]                                # rank of candidates[b][j]: 1 = best, lower is better, ties share one

Rankers read **text only**: the prompt as the user wrote it (not chat-templated) and the candidate texts without
special tokens (§7(h)5, what PairRM was trained on). Three kinds, chosen in YAML by ``class_path``:

* :class:`RewardRanker`: any :class:`~lit_align.rewards.Reward` (a reward model trained by lit_align or an HF
  sequence classifier through :class:`~lit_align.rewards.ModelReward`, a judge, a rule), higher score = better;
* :class:`PairRMRanker`: PairRM (Jiang et al. 2023, ``llm-blender/PairRM``), the pairwise ranker the SELM paper
  used, through the optional ``llm-blender`` package;
* :class:`CallableRanker`: any function ``(prompts, candidates) -> scores or ranks``, e.g. a gold judge.

:func:`select_pair` turns one prompt's ranks into the ``(chosen, rejected)`` indices.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.data.tokenize import encode_prompts, encode_responses
from lit_align.errors import ConfigError
from lit_align.rewards.sources import Reward, RewardInput
from lit_align.rollout.sampler import left_pad

__all__ = ["CallableRanker", "PairRMRanker", "Ranker", "RewardRanker", "ranks_from_scores", "select_pair"]

Ranks = list[list[int]]


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """Competition ranks of one prompt's candidates, higher score = better: ``[0.2, 0.9, 0.2] -> [2, 1, 2]``
    (the best is 1; tied scores share the better rank; NaN ranks last)."""
    values = [float("-inf") if s != s else float(s) for s in scores]
    return [1 + sum(other > v for other in values) for v in values]


def select_pair(ranks: Sequence[int]) -> tuple[int, int] | None:
    """``(chosen, rejected)`` candidate indices for one prompt: chosen has the lowest rank, rejected the highest.

    Ties are resolved by candidate order as in SELM's released code (numpy ``argmin`` / ``argmax`` of the ranks,
    both the first occurrence): among equally best candidates the **first** is chosen, among equally worst the
    **first** is rejected (so with the new responses listed first, a new response wins a tie for best and loses a
    tie for worst). When every candidate has the same rank there is no preference and no pair (``None``); the
    caller drops the prompt and counts it.
    """
    if len(ranks) < 2:
        raise ValueError(f"select_pair needs at least 2 candidates, got {len(ranks)}")
    best, worst = min(ranks), max(ranks)
    if best == worst:
        return None
    chosen = next(j for j, r in enumerate(ranks) if r == best)
    rejected = next(j for j, r in enumerate(ranks) if r == worst)
    return chosen, rejected


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its first parameter's device, else its first buffer's, else the CPU."""
    anchor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return anchor.device if anchor is not None else torch.device("cpu")


def _check_ranks(ranks: Ranks, candidates: list[list[str]], who: str) -> Ranks:
    if len(ranks) != len(candidates) or any(len(r) != len(c) for r, c in zip(ranks, candidates)):
        raise ValueError(f"{who} returned ranks shaped {[len(r) for r in ranks]} for candidates shaped "
                         f"{[len(c) for c in candidates]}; a ranker returns one rank per candidate")
    return [[int(x) for x in r] for r in ranks]


class Ranker(nn.Module):
    """Base of the rankers: :meth:`rank` candidates per prompt, lower rank = better.

    Subclasses implement :meth:`_rank`; those that load weights implement :meth:`build` (called once by the
    method's ``configure_model`` with the policy's tokenizer and the ranker's config key, named in errors).
    :meth:`fingerprint` identifies the ranker (weights included) for caches.
    """

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.ranker") -> None:
        """Load what the ranker needs; the default needs nothing."""

    def fingerprint(self) -> str:
        """A stable id of the ranker and its settings."""
        return type(self).__qualname__

    def _rank(self, prompts: list[str], candidates: list[list[str]]) -> Ranks:
        raise NotImplementedError

    @torch.no_grad()
    def rank(self, prompts: list[str], candidates: list[list[str]]) -> Ranks:
        """Ranks of ``candidates[b]`` (B lists of >= 2 strings) for ``prompts[b]``: 1 = best, lower is better."""
        if len(prompts) != len(candidates):
            raise ValueError(f"rank: {len(prompts)} prompts but {len(candidates)} candidate lists")
        if any(len(c) < 2 for c in candidates):
            raise ValueError("rank: every prompt needs at least 2 candidates to rank")
        return _check_ranks(self._rank(prompts, candidates), candidates, type(self).__name__)


class RewardRanker(Ranker):
    """Ranks by a :class:`~lit_align.rewards.Reward`'s score (higher = better; equal scores tie).

    The reward reads a :class:`~lit_align.rewards.RewardInput`: the prompt and candidate texts, and token ids in
    the policy's vocabulary, made here from the text (prompt rendered with ``template`` and, when
    ``chat_template`` is on, the tokenizer's chat template; each candidate encoded with EOS appended), so a
    generated candidate and a dataset response are scored the same way. A reward model on another vocabulary
    re-encodes the text itself (``ModelReward(retokenize: auto)``).

    Example YAML::

        ranker:
          class_path: lit_align.rewards.RewardRanker
          init_args:
            reward: {class_path: lit_align.rewards.ModelReward,
                     init_args: {model: {model: {name_or_path: outputs/rm-tiny/hf_export}, kind: sequence_classification}}}
    """

    def __init__(self, reward: Reward, template: str = "{prompt}", chat_template: bool | None = None,
                 batch_size: int = 32) -> None:
        """
        Args:
            reward: the scorer (``class_path: lit_align.rewards.ModelReward``, ``JudgeReward``, ``CallableReward``...).
            template: ``str.format`` template with ``{prompt}`` the reward model saw prompts in.
            chat_template: wrap the rendered prompt in the policy tokenizer's chat template; ``None``: when it has
                one and ``template`` is ``"{prompt}"``.
            batch_size: candidate rows scored per forward.
        """
        super().__init__()
        if "{prompt}" not in template:
            raise ConfigError(f"model.ranker.init_args.template must contain '{{prompt}}', got {template!r}")
        if batch_size < 1:
            raise ConfigError(f"model.ranker.init_args.batch_size must be >= 1, got {batch_size}")
        self.reward, self.template, self.chat_template, self.batch_size = reward, template, chat_template, batch_size
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.ranker") -> None:
        self.tokenizer = tokenizer
        self.reward.build(tokenizer, f"{key}.init_args.reward")

    def fingerprint(self) -> str:
        return f"RewardRanker:{self.template!r}:{self.chat_template}:{self.reward.fingerprint()}"

    def _input(self, prompts: list[str], responses: list[str]) -> RewardInput:
        tok = self.tokenizer
        chat = bool(tok.chat_template) and self.template == "{prompt}" if self.chat_template is None \
            else self.chat_template
        unique = list(dict.fromkeys(prompts))  # a prompt's candidates share its encoding
        encoded = dict(zip(unique, encode_prompts(tok, [self.template.format(prompt=p) for p in unique], chat)))
        rows = [encoded[p] + r for p, r in zip(prompts, encode_responses(tok, responses))]
        ids, mask = left_pad(rows, tok.pad_token_id)  # (N, T): the reward reads the last real token
        device = _device_of(self.reward)
        return RewardInput(prompts, responses, ids.to(device), mask.to(device), tok)

    def scores(self, prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        """The reward of every candidate, shaped like ``candidates``."""
        if self.tokenizer is None:
            raise RuntimeError("RewardRanker: build(tokenizer) first")
        flat = [(p, c) for p, cs in zip(prompts, candidates) for c in cs]
        out: list[float] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            out += self.reward(self._input([p for p, _ in chunk], [c for _, c in chunk])).tolist()
        it = iter(out)
        return [[next(it) for _ in cs] for cs in candidates]

    def _rank(self, prompts: list[str], candidates: list[list[str]]) -> Ranks:
        return [ranks_from_scores(s) for s in self.scores(prompts, candidates)]


class CallableRanker(Ranker):
    """Any function ``(prompts, candidates) -> B lists`` of scores (higher = better, ``returns: scores``) or of
    ranks (lower = better, ``returns: ranks``): a gold judge of a synthetic task, an API judge."""

    def __init__(self, fn: Callable, returns: Literal["scores", "ranks"] = "scores") -> None:
        """
        Args:
            fn: ``(prompts: list[str], candidates: list[list[str]]) -> list[list[float]]``; in YAML its import path.
            returns: whether ``fn`` gives scores (higher = better) or ranks (lower = better).
        """
        super().__init__()
        if not callable(fn):
            raise ConfigError(f"model.ranker.init_args.fn must be a callable (prompts, candidates) -> scores, got "
                              f"{type(fn).__name__}")
        if returns not in ("scores", "ranks"):
            raise ConfigError(f"model.ranker.init_args.returns must be 'scores' or 'ranks', got {returns!r}")
        self.fn, self.returns = fn, returns

    def fingerprint(self) -> str:
        name = f"{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', type(self.fn).__qualname__)}"
        return f"CallableRanker:{self.returns}:{name}"

    def _rank(self, prompts: list[str], candidates: list[list[str]]) -> Ranks:
        out = self.fn(prompts, candidates)
        out = [v.tolist() if isinstance(v, Tensor) else list(v) for v in out]
        if self.returns == "ranks":
            return out
        return [ranks_from_scores(s) for s in out]


class PairRMRanker(Ranker):
    """PairRM (Jiang, Ren, Lin 2023, "LLM-Blender", arXiv 2306.02561; ``llm-blender/PairRM``), the ranker of
    SELM's released code: a DeBERTa-v3 cross-encoder that compares two candidates for one prompt; a prompt's
    candidates are ranked by their aggregated pairwise wins (``Blender.rank``, lower = better).

    Needs the optional ``llm-blender`` package (``pip install llm-blender``, or from
    github.com/yuchenlin/LLM-Blender). **Untested in this repository**: the PyPI release (0.0.2) does not import
    with transformers 5 (it reads ``transformers.utils.hub.TRANSFORMERS_CACHE``, since removed), so neither the
    package nor a randomly initialised PairRM could be run here; the wiring follows the package's documented
    ``Blender.loadranker`` / ``Blender.rank`` API. The prompt and candidates are passed as plain text, as PairRM
    was trained (§7(h)5).
    """

    def __init__(self, name_or_path: str = "llm-blender/PairRM", batch_size: int = 8,
                 device: str | None = None) -> None:
        """
        Args:
            name_or_path: the ranker checkpoint (hub id or directory) for ``Blender.loadranker``.
            batch_size: the ``batch_size`` handed to ``Blender.rank`` (its internal batching; one call per step).
            device: where the ranker runs (default: the package's choice).
        """
        super().__init__()
        self.name_or_path, self.batch_size, self.device_name = name_or_path, batch_size, device
        self._blender = None

    def build(self, tokenizer: PreTrainedTokenizerBase, key: str = "model.ranker") -> None:
        try:
            import llm_blender
        except Exception as err:  # ImportError, or the package failing on a newer transformers
            raise ConfigError(f"{key}: PairRMRanker needs the optional `llm-blender` package (pip install llm-blender), "
                              f"which could not be imported here ({type(err).__name__}: {err}). Use "
                              "lit_align.rewards.RewardRanker or CallableRanker instead") from err
        blender = llm_blender.Blender()
        kwargs = {"device": self.device_name} if self.device_name else {}
        blender.loadranker(self.name_or_path, **kwargs)
        self._blender = blender

    def fingerprint(self) -> str:
        return f"PairRMRanker:{hashlib.sha256(self.name_or_path.encode()).hexdigest()[:16]}"

    def _rank(self, prompts: list[str], candidates: list[list[str]]) -> Ranks:
        if self._blender is None:
            self.build(None)
        return [list(map(int, r)) for r in self._blender.rank(prompts, candidates, return_scores=False,
                                                               batch_size=self.batch_size)]
