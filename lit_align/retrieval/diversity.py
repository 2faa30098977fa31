"""Set-level diversity of generated texts, to watch self-training for collapse (ISARA §6(h)3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import check_int

__all__ = ["distinct_n", "embedding_diversity"]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over the whole set.

    Words are white-space separated tokens, compared as they are (no lower-casing). 0.0 when the set has no
    n-gram at all (empty texts, or all shorter than n)."""
    check_int("n", n, 1)
    if isinstance(texts, str):
        raise TypeError("distinct_n: texts must be a sequence of strings, got one string; wrap it in a list")
    grams = [tuple(tokens[i:i + n]) for tokens in (t.split() for t in texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def embedding_diversity(embeddings: Tensor) -> float:
    """1 - mean cosine over all pairs i < j of the (n, d) rows (re-normalised here); 0.0 for fewer than 2 rows.

    Identical rows give 0; orthogonal rows give 1; values up to 2 are possible for opposed rows."""
    if embeddings.ndim != 2:
        raise ValueError(f"embedding_diversity: expected (n, d) embeddings, got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if n < 2:
        return 0.0
    rows = F.normalize(embeddings.double(), dim=-1)  # (n, d)
    total = rows.sum(0)  # sum_i,j cos(i, j) = |sum_i r_i|^2, including the n diagonal terms
    pair_sum = (total @ total - (rows * rows).sum()) / 2  # sum over i < j
    return float(1.0 - pair_sum / (n * (n - 1) / 2))
