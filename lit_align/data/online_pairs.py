"""Online preference pairs: a prompt's candidate responses -> ranked (chosen, rejected) -> padded sequences.

Pure helpers of :class:`~lit_align.methods.OnlineDPOModule` (no model runs here). Token layout of every sequence
is the DPO one (:class:`~lit_align.data.batches.SequenceBatch`): prompt tokens, then response tokens (scored,
``loss_mask`` 1), then right padding. Truncation follows SELM's released trainer (TRL's ``tokenize_row``): when
the prompt plus the longest of a row's responses exceeds ``max_length``, the prompt keeps its **last**
``max_prompt_length`` tokens; responses that still do not fit are cut from the right. One prompt serves all of a
row's sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_align.containers import SequenceBatch
from lit_align.data.tokenize import prompt_response_batch

__all__ = ["OnlinePairs", "fit_row", "pair_batch"]


def fit_row(prompt: list[int], responses: list[list[int]], max_length: int,
            max_prompt_length: int) -> tuple[list[int], list[list[int]]]:
    """One prompt and its responses cut to fit ``max_length`` each: the prompt keeps its last
    ``max_prompt_length`` tokens when ``prompt + longest response`` is too long, then each response is cut to
    ``max_length - len(prompt)``."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    longest = max(map(len, responses))
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses]


@dataclass
class OnlinePairs:
    """The step's labelled rows, one per prompt.

    Attributes:
        chosen: (B, T_c) prompt + chosen response.
        rejected: (B, T_r) prompt + rejected response.
        reference: (B, T_y) prompt + the reference model's greedy response (SELM's ``y_ref``), or ``None``.
        kept: (B,) bool, rows whose candidates were not all tied (the others carry a placeholder pair and are
            left out of the loss).
        chosen_new: (B,) bool, the chosen response is a new (generated) candidate.
        rejected_new: (B,) bool, the rejected response is a new candidate.
    """

    chosen: SequenceBatch
    rejected: SequenceBatch
    reference: SequenceBatch | None
    kept: Tensor
    chosen_new: Tensor
    rejected_new: Tensor

    def __len__(self) -> int:
        return len(self.kept)


def pair_batch(prompts: list[list[int]], candidates: list[list[list[int]]], picks: list[tuple[int, int] | None],
               num_new: int, index: Tensor, pad_token_id: int, *, reference: list[list[int]] | None = None,
               max_length: int = 1024, max_prompt_length: int = 512) -> OnlinePairs:
    """The :class:`OnlinePairs` of B prompts (token ids, unpadded), their candidates' token ids (the ``num_new``
    generated ones first) and the ``(chosen, rejected)`` pick of each (``None``: no pair; the row gets candidates
    0 and 1 as a placeholder and ``kept`` False). ``reference``: each prompt's ``y_ref`` token ids."""
    rows = []
    for b, (prompt, cands, pick) in enumerate(zip(prompts, candidates, picks)):
        c, r = pick if pick is not None else (0, 1)
        extra = [reference[b]] if reference is not None else []
        rows.append(fit_row(prompt, [cands[c], cands[r], *extra], max_length, max_prompt_length))
    chosen = prompt_response_batch([(p, rs[0]) for p, rs in rows], index, pad_token_id)
    rejected = prompt_response_batch([(p, rs[1]) for p, rs in rows], index, pad_token_id)
    ref = prompt_response_batch([(p, rs[2]) for p, rs in rows], index, pad_token_id) if reference is not None else None
    kept = torch.tensor([p is not None for p in picks])
    chosen_new = torch.tensor([p is not None and p[0] < num_new for p in picks])
    rejected_new = torch.tensor([p is not None and p[1] < num_new for p in picks])
    return OnlinePairs(chosen, rejected, ref, kept, chosen_new, rejected_new)
