"""Scoring a debate phase's preference pairs for DPO (Rafailov et al. 2023, the loss of ACC-Collab's
training): tokenised (prompt + chosen) and (prompt + rejected) rows, their summed log-probs, and the
per-rank shares of a list of pairs (:mod:`~lit_align.debate.sharding`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.data.tokenize import prompt_response_batch
from lit_align.debate.config import DebateSettings, DPOSettings
from lit_align.debate.pairs import PreferencePair
from lit_align.debate.protocol import format_prompt
from lit_align.debate.sharding import gather_share, rank_share
from lit_align.models.causal_lm import eval_mode
from lit_align.rollout.logps import token_logps

__all__ = ["PairScorer", "dpo_order"]


@dataclass
class PairScorer:
    """Log-probs of pairs under a model."""

    tokenizer: PreTrainedTokenizerBase
    dpo: DPOSettings
    debate: DebateSettings
    chunk_tokens: int | None = None
    """Rows per LM-head chunk in log-prob computation (memory only)."""

    def batch(self, pairs: Sequence[PreferencePair], device) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded (prompt + chosen) and (prompt + rejected) rows, ``loss_mask`` on the responses."""
        eos, cap = self.tokenizer.eos_token_id, self.dpo.max_response_tokens
        rows, index = [], []
        for i, pair in enumerate(pairs):
            prompt = format_prompt(self.tokenizer, pair.prompt, self.debate.chat_template)[-self.dpo.max_prompt_tokens:]
            sampled = self.debate.sampling(pair.player).max_new_tokens
            for response in (pair.chosen, pair.rejected):
                ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
                # EOS only where the response ended: a text cut by max_new_tokens or here never emitted one
                ended = len(ids) < min(sampled, cap)
                rows.append((prompt, ids[:cap] + ([eos] if ended else [])))
                index.append(i)
        batch = prompt_response_batch(rows, index, self.tokenizer.pad_token_id)
        return batch.input_ids.to(device), batch.attention_mask.to(device), batch.loss_mask.to(device)

    def logps(self, model: nn.Module, pairs: Sequence[PreferencePair]) -> Tensor:
        """(N, 2) summed log-probs of (chosen, rejected) under ``model`` (with gradients)."""
        device = next(model.parameters()).device
        ids, mask, loss_mask = self.batch(pairs, device)
        out = token_logps(model, ids, mask, loss_mask, chunk_tokens=self.chunk_tokens)
        return out.logps.mul(out.mask).sum(-1).view(-1, 2)

    @torch.no_grad()
    def scored(self, model: nn.Module, pairs: Sequence[PreferencePair]) -> Tensor:
        """(N, 2) log-probs of every pair in eval mode, on the CPU, on every rank: each rank scores its share in
        ``dpo.batch_size`` chunks (the same number of forwards everywhere) and the shares are gathered."""
        positions, _ = rank_share(len(pairs))
        mine = [pairs[i] for i in positions]
        out = []
        with eval_mode(model):
            for start in range(0, len(mine), self.dpo.batch_size):
                out.append(self.logps(model, mine[start:start + self.dpo.batch_size]).float().cpu())
        return gather_share(torch.cat(out) if out else torch.zeros(0, 2), len(pairs))


def dpo_order(n: int, epochs: int, size: int, rng: random.Random) -> list[list[int]]:
    """``epochs`` shuffled passes over ``n`` pairs in minibatches of ``size`` (the global minibatch); a
    minibatch never straddles two epochs, so no pair appears twice in one step."""
    order = []
    for _ in range(epochs):
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += [epoch[i:i + size] for i in range(0, n, size)]
    return order
