"""One round of the game as data: the masked rollouts, the judge's scores of the kept rows, the attacker's
reward, the diversity terms over the global batch, and the text around the players' token ids."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_align.game.diversity import DiversityHistory, SentenceEncoder, word_tokens
from lit_align.game.judge import SafetyJudge, SafetyScores
from lit_align.models.players import PlayerPolicies
from lit_align.rollout.logps import token_logps
from lit_align.rollout.sampler import Rollout, left_pad

__all__ = ["Round", "attacker_reward", "decode", "defender_inputs", "diversity_terms", "judge_kept", "masked",
           "response_kl", "round_metrics"]


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


def diversity_terms(history: DiversityHistory, encoder: SentenceEncoder | None, texts: list[str], keep: Tensor,
                    index: Tensor, *, include_batch: bool,
                    gather: Callable[[list], list[list]] = lambda x: [x]) -> tuple[Tensor, Tensor]:
    """(B,) SelfBLEU and cosine similarity of each kept attack prompt (0 on the others); the prompts then join
    ``history``.

    ``gather`` returns every rank's list (``engine.distributed.all_gather_objects``): the kept prompts of all
    ranks are taken in global-index order (``index``: (B,) the rows' global dataset indices), so the scores and
    the history are computed identically on every rank and equal one process on the global batch."""
    mine = [(int(i), t) for i, t, k in zip(index.tolist(), texts, keep.tolist()) if k]
    rows = sorted(row for part in gather(mine) for row in part)  # (N,) the global batch's kept prompts
    tokens = [word_tokens(t) for _, t in rows]
    bleu = history.self_bleu(tokens, include_batch=include_batch).float().cpu()  # (N,)
    embeddings = encoder.encode([t for _, t in rows]) if encoder is not None else None  # (N, D)
    cos = (history.cosine(embeddings, include_batch=include_batch).float().cpu() if embeddings is not None
           else torch.zeros_like(bleu))
    history.append(tokens, embeddings.cpu() if embeddings is not None else None)
    where = {i: n for n, (i, _) in enumerate(rows)}
    pick = torch.tensor([where.get(int(i), 0) for i in index.tolist()], dtype=torch.long)  # (B,)
    weight = keep.float().cpu()
    return (bleu[pick] * weight).to(keep.device), (cos[pick] * weight).to(keep.device)


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


def round_metrics(scores: SafetyScores, attacker: Tensor, bleu: Tensor, cos: Tensor, keep: Tensor,
                  mean: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """A training round's reward metrics over the kept rows (``mean(values, weight)``: over every rank's rows)."""
    weight = keep.float()
    return {k: mean(v, weight) for k, v in (
        ("asr", scores.unsafe), ("defender/reward", scores.defender_reward), ("attacker/reward", attacker),
        ("attacker/judge_reward", scores.attacker_reward), ("attacker/self_bleu", bleu), ("attacker/cos_sim", cos),
        ("attacker/diversity_penalty", scores.attacker_reward - attacker))}
