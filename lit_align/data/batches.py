"""Typed batches. Every tensor is on the batch's device; shapes in the field docs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ForgetRetainBatch", "PreferenceBatch", "SequenceBatch"]


@dataclass
class SequenceBatch:
    """Prompt and response concatenated, right-padded.

    Attributes:
        input_ids: (B, T) prompt tokens then response tokens then padding.
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on response tokens (the ones scored / trained on).
        index: (B,) stable example index in its dataset (reference caches key on it).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    index: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())

    def select(self, rows: Tensor) -> SequenceBatch:
        """The rows ``rows`` ((N,) long indices or a (B,) bool mask) as a new batch."""
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], self.index[rows])

    @staticmethod
    def cat(parts: list[SequenceBatch], pad_token_id: int) -> SequenceBatch:
        """Stack batches row-wise, right-padding to the longest (one forward for chosen + rejected)."""
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(t: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return SequenceBatch(
            input_ids=torch.cat([pad(p.input_ids, pad_token_id) for p in parts]),
            attention_mask=torch.cat([pad(p.attention_mask, 0) for p in parts]),
            loss_mask=torch.cat([pad(p.loss_mask, 0) for p in parts]),
            index=torch.cat([p.index for p in parts]),
        )


@dataclass
class PreferenceBatch:
    """A batch of (prompt, chosen, rejected) triples; row i of ``chosen`` and ``rejected`` share a prompt.

    Attributes:
        chosen: prompt + preferred response, (B, T_c) tensors.
        rejected: prompt + dispreferred response, (B, T_r) tensors.
        index: (B,) stable example index.
    """

    chosen: SequenceBatch
    rejected: SequenceBatch
    index: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens


@dataclass
class ForgetRetainBatch:
    """A batch for unlearning: forget examples plus the rows paired with them.

    Attributes:
        forget: (B, T_f) prompt + the answer to forget; ``index`` = forget example index.
        retain: (B * R, T_r) retain examples, ``R`` per forget example (rows ``b * R .. b * R + R - 1``
            go with forget row ``b``); ``index`` = retain example index. ``None`` without a retain set.
        mismatch: (B * K, T_m) each forget prompt with ``K`` random answers from the mismatch pool (LLMU),
            rows ``b * K .. b * K + K - 1`` for forget row ``b``; ``index`` = forget index. ``None`` without a pool.
        refusal: (B, T_p) each forget prompt with a refusal answer (PO); ``index`` = forget index.
            ``None`` without refusals.
        index: (B,) = ``forget.index``.
    """

    forget: SequenceBatch
    retain: SequenceBatch | None
    mismatch: SequenceBatch | None
    refusal: SequenceBatch | None
    index: Tensor

    def __len__(self) -> int:
        """Number of forget examples."""
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens over every part."""
        return sum(p.num_tokens for p in (self.forget, self.retain, self.mismatch, self.refusal) if p is not None)
