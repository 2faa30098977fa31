"""The one padding helper: token-id rows of different lengths -> a padded ``(ids, mask)`` pair (torch's
``pad_sequence`` on either side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["pad_rows"]


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, *, side: Literal["left", "right"],
             min_width: int = 0) -> tuple[Tensor, Tensor]:
    """Pad ``rows`` to the longest (at least ``min_width``) with ``pad_value``.

    ``side="left"`` puts the padding before each row (prompts for generation, see
    :func:`lit_align.rollout.sampler.sample`), ``"right"`` after it (sequences to score or train on).

    Returns:
        ``(ids, mask)``, both (B, width) long; ``mask`` is 1 on real tokens.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        return torch.zeros((0, min_width), dtype=torch.long), torch.zeros((0, min_width), dtype=torch.long)
    tensors = [torch.as_tensor(list(row), dtype=torch.long) for row in rows]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_value, padding_side=side)  # (B, T)
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_side=side)  # (B, T)
    if ids.shape[1] < min_width:
        extra = (min_width - ids.shape[1], 0) if side == "left" else (0, min_width - ids.shape[1])
        ids, mask = F.pad(ids, extra, value=pad_value), F.pad(mask, extra, value=0)
    return ids, mask
