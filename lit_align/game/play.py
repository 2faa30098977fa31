"""One round of the game as data: the masked rollouts, the judge's scores of the kept rows, the attacker's
reward, the diversity terms over the global batch, each player's experience, and the text around the players'
token ids."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.engine.distributed import sum_over_ranks
from lit_align.game.config import DiversityConfig, RewardConfig
from lit_align.game.diversity import DiversityHistory, word_tokens
from lit_align.game.judge import SafetyJudge, SafetyScores
from lit_align.models.players import PlayerPolicies
from lit_align.retrieval import MeanPoolEncoder
from lit_align.rollout.experience import Experience, make_experience
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import Rollout, left_pad

__all__ = ["KeptPrompts", "Round", "attacker_reward", "decode", "defender_inputs", "diversity_terms", "experience",
           "judge_kept", "masked", "response_kl", "round_metrics", "score_round"]


@dataclass
class KeptPrompts:
    """One rank's kept attack prompts, as the diversity terms gather them (n rows)."""

    index: list[int]
    """(n,) the rows' global dataset indices."""
    tokens: list[list[str]]
    """(n,) each prompt's words (:func:`~lit_align.game.diversity.word_tokens`)."""
    embeddings: Tensor | None
    """(n, D) the sentence encoder's embeddings on the CPU; ``None`` without an encoder or without rows."""

    @staticmethod
    def merge(parts: list[KeptPrompts]) -> KeptPrompts:
        """Every rank's rows in one, in global-index order."""
        index = [i for part in parts for i in part.index]
        order = sorted(range(len(index)), key=index.__getitem__)
        tokens = [t for part in parts for t in part.tokens]
        found = [part.embeddings for part in parts if part.embeddings is not None]
        embeddings = torch.cat(found)[order] if found else None  # (N, D)
        return KeptPrompts([index[o] for o in order], [tokens[o] for o in order], embeddings)


@dataclass
class Round:
    """One round on a batch of B seeds: attack, answer, verdict (no learning)."""

    attack: Rollout
    """The attacker's samples, rows not kept masked out (no actions)."""
    answer: Rollout
    """The defender's answers, rows not kept masked out."""
    texts: list[str]
    """B decoded attack prompts ("" where the attack decoded to nothing)."""
    responses: list[str]
    """B decoded answers."""
    keep: Tensor
    """(B,) bool: the attack prompt is not empty. Other rows stay in place (every rank runs the same
    forwards) but enter no reward, loss or metric."""
    scores: SafetyScores
    """(B,) the judge's scores of the kept rows; zeros (and safe) on the others."""


def attacker_reward(judge_reward: Tensor, self_bleu: Tensor, cos_sim: Tensor, *, bleu_weight: float,
                    embedding_weight: float) -> Tensor:
    """The attacker's sequence reward (as ``gpo/gpo_trainer.py``): ``judge_reward - bleu_weight * SelfBLEU -
    embedding_weight * CosSim``, all (B,). With a judge, ``judge_reward`` is P(unsafe): ``p_unsafe - 5 SB - 1 CS``
    at the script's weights."""
    return judge_reward - bleu_weight * self_bleu - embedding_weight * cos_sim


def masked(rollout: Rollout, keep: Tensor) -> Rollout:
    """The rollout with the responses of the rows not kept ((B,) bool ``keep``) masked out: no actions."""
    return replace(rollout, response_mask=rollout.response_mask * keep[:, None].to(rollout.response_mask))


def judge_kept(judge: SafetyJudge, prompts: list[str], responses: list[str], keep: Tensor) -> SafetyScores:
    """The judge's scores of the kept rows, zeros (and safe) on the others; (B,) each, on ``keep``'s device."""
    rows = keep.nonzero().flatten().tolist()
    size = len(prompts)
    out = SafetyScores(defender_reward=torch.zeros(size), attacker_reward=torch.zeros(size),
                       unsafe=torch.zeros(size, dtype=torch.bool)).to(keep.device)
    if rows:
        scores = judge.score([prompts[r] for r in rows], [responses[r] for r in rows]).to(keep.device)
        for name in ("defender_reward", "attacker_reward", "unsafe"):
            getattr(out, name)[rows] = getattr(scores, name).to(getattr(out, name).dtype)
    return out


def diversity_terms(history: DiversityHistory, encoder: MeanPoolEncoder | None, texts: list[str], keep: Tensor,
                    index: Tensor, *, include_batch: bool,
                    gather: Callable[[KeptPrompts], list[KeptPrompts]] = lambda x: [x]) -> tuple[Tensor, Tensor]:
    """(B,) SelfBLEU and cosine similarity of each kept attack prompt (0 on the others); then every rank's kept
    prompts join ``history``.

    Each rank splits and encodes only its own kept prompts; ``gather`` (``engine.distributed.all_gather_objects``)
    brings every rank's :class:`KeptPrompts` and puts them in global-index order (``index``: (B,) the rows' global
    dataset indices), so the batch and the history are the same on every rank and equal one process on the
    global batch. Each rank then scores its own rows against them: the SelfBLEU, the costly part, is split
    between the ranks rather than repeated on each."""
    rows = keep.nonzero().flatten().tolist()  # this rank's kept rows
    embeddings = encoder.encode([texts[r] for r in rows]).cpu() if encoder is not None and rows else None  # (n, D)
    parts = gather(KeptPrompts(index[rows].tolist(), [word_tokens(texts[r]) for r in rows], embeddings))
    batch = KeptPrompts.merge(parts)  # (N,) the global batch's kept prompts, in global-index order
    where = {i: n for n, i in enumerate(batch.index)}
    mine = [where[int(i)] for i in index[rows].tolist()]  # (n,) this rank's rows in the global batch
    bleu, cos = torch.zeros(len(texts)), torch.zeros(len(texts))  # (B,)
    bleu[rows] = history.self_bleu(batch.tokens, include_batch=include_batch, rows=mine)
    if batch.embeddings is not None:
        cos[rows] = history.cosine(batch.embeddings, include_batch=include_batch).float().cpu()[mine]
    history.append(batch.tokens, batch.embeddings)
    return bleu.to(keep.device), cos.to(keep.device)


def score_round(game: Round, history: DiversityHistory, encoder: MeanPoolEncoder | None, index: Tensor,
                diversity: DiversityConfig, gather: Callable[[KeptPrompts], list[KeptPrompts]] = lambda x: [x],
                ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Each player's (B,) sequence reward in a round, and the round's :func:`round_metrics`: the defender's is
    the judge's, the attacker's the judge's less its diversity terms (:func:`diversity_terms` over the global
    batch, whose kept prompts then join ``history``)."""
    bleu, cos = diversity_terms(history, encoder, game.texts, game.keep, index, gather=gather,
                                include_batch=diversity.scope == "batch_and_history")
    attacker = attacker_reward(game.scores.attacker_reward, bleu, cos, bleu_weight=diversity.bleu_weight,
                               embedding_weight=diversity.embedding_weight)
    rewards = {"defender": game.scores.defender_reward, "attacker": attacker}
    return rewards, round_metrics(game.scores, attacker, bleu, cos, game.keep)


def experience(players: PlayerPolicies, player: str, critic: nn.Module, rollout: Rollout, scores: Tensor,
               rewards: RewardConfig) -> Experience:
    """The ``player``'s PPO experience of a round (its policy against its reference, ``critic`` its value
    model, (B,) ``scores`` its sequence rewards); rows without actions stay in place, so every rank holds the
    same shapes, and whitening takes every rank's moments."""
    with players.acting(player) as policy:
        reference, context = players.reference(player, policy)
        return make_experience(policy, reference, critic, rollout, scores, kl_coef=rewards.kl(player),
                               reward_clip=rewards.reward_clip, gamma=rewards.gamma, lam=rewards.lam,
                               whiten_advantages=rewards.whiten_advantages, reference_context=context,
                               keep_shape=True, reduce=sum_over_ranks)


def decode(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """The B responses of a rollout as stripped text (special tokens dropped)."""
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip()
            for r, m in zip(rollout.response_ids, rollout.response_mask)]


def defender_inputs(tokenizer: PreTrainedTokenizerBase, template: str, prompts: list[str],
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, P) left-padded ids and mask of the defender's prompts: ``template`` around each attack prompt."""
    ids, mask = left_pad([tokenizer(template.format(prompt=p))["input_ids"] for p in prompts], tokenizer.pad_token_id)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def response_kl(players: PlayerPolicies, player: str, rollout: Rollout, chunk_tokens: int | None = None) -> Tensor:
    """(B,) summed log-ratio of each sampled response, the player's policy vs its reference."""
    mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)  # (B, T)
    with players.acting(player) as policy:
        logps = token_logps(policy, rollout.sequences, rollout.attention_mask, mask, chunk_tokens=chunk_tokens)
        reference, context = players.reference(player, policy)
        with context() if context is not None else nullcontext():
            ref = token_logps(reference, rollout.sequences, rollout.attention_mask, mask, chunk_tokens=chunk_tokens)
    return ((logps.logps - ref.logps) * logps.mask).sum(-1)


def round_metrics(scores: SafetyScores, attacker: Tensor, bleu: Tensor, cos: Tensor,
                  keep: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """A training round's reward metrics as ``(values, weight)`` pairs: each the mean over the kept rows of every
    rank (``engine.distributed.means_over_ranks``, one collective for all of them)."""
    weight = keep.float()
    return {k: (v, weight) for k, v in (
        ("asr", scores.unsafe), ("defender/reward", scores.defender_reward), ("attacker/reward", attacker),
        ("attacker/judge_reward", scores.attacker_reward), ("attacker/self_bleu", bleu), ("attacker/cos_sim", cos),
        ("attacker/diversity_penalty", scores.attacker_reward - attacker))}
