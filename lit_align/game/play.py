"""One round of the game as data: the masked rollouts, the judge's scores of the kept rows, the attacker's
reward and the diversity terms over the global batch. No model runs here except the judge and the encoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lit_align.game.diversity import DiversityHistory, SentenceEncoder, word_tokens
from lit_align.game.judge import SafetyJudge, SafetyScores
from lit_align.rollout.sampler import Rollout

__all__ = ["Round", "attacker_reward", "diversity_terms", "judge_kept", "masked"]


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
