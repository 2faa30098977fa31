"""Set-level diversity of generated texts, to watch self-training for collapse (ISARA §6(h)3), and the GPO
attacker's embedding diversity (the adversarial game's evaluation uses this one too)."""

from __future__ import annotations

from collections.abc import Sequence

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


def embedding_diversity(embeddings: Tensor, include_self: bool = False) -> float:
    """``1 - mean_cos / 2`` over the pairs of a set of (N, D) unit-norm embeddings (as the released GPO code).

    ``mean_cos`` is the mean of the off-diagonal cosine similarities, or (``include_self=True``, as the GPO
    reference code) of the whole N x N matrix, diagonal of ones included. Note the formula's range: identical
    embeddings give 0.5, orthogonal ones 1, opposite ones 1.5 (it is not ``(1 - mean_cos) / 2``). With
    ``include_self=False`` and N = 1 there is no pair: ``mean_cos`` is taken as 0 (diversity 1). An empty set raises.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) matrix, got shape {tuple(embeddings.shape)}")
    emb = embeddings.detach().double()
    gram = emb @ emb.T  # (N, N)
    n = emb.shape[0]
    if include_self:
        mean_cos = gram.mean()
    else:
        mean_cos = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1)) if n > 1 else gram.new_zeros(())
    return float(1.0 - mean_cos / 2.0)
