"""Exact cosine nearest neighbours in torch, deterministic under ties, and a text :class:`Retriever` on top.

Ties are broken by the lower key index: scores are sorted with a *stable* descending sort, and computed in
float64 then rounded to float32, so two identical keys get bit-identical scores whatever their position in
the matrix product. A faiss backend (``backend="faiss"``, exact inner product) is used only where the
``faiss`` package imports; its candidates are re-scored and re-sorted here, so both backends return the same
neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_align.errors import ConfigError, check_choice
from lit_align.retrieval.encoders import Encoder, _check_texts

__all__ = ["Retriever", "cosine_topk"]

#: Query rows scored at once (bounds the (q, n) score matrix).
_CHUNK = 1024


def _scores(queries: Tensor, keys: Tensor) -> Tensor:
    """(q, n) float32 cosine scores, computed in float64 so identical keys score identically."""
    return (queries.double() @ keys.double().T).float()


def _check_topk_args(queries: Tensor, keys: Tensor, k: int, exclude: Tensor | None,
                     near_duplicate: float | None, key: str) -> None:
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"cosine_topk: queries (q, d) and keys (n, d) must share d, got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{key} must be an int >= 1, got {k!r}")
    if exclude is not None and (exclude.dtype != torch.bool or exclude.shape != (queries.shape[0], keys.shape[0])):
        raise ValueError(f"cosine_topk: exclude must be a bool tensor of shape {(queries.shape[0], keys.shape[0])}, "
                         f"got {exclude.dtype} {tuple(exclude.shape)}")
    if near_duplicate is not None and not (isinstance(near_duplicate, (int, float))
                                           and not isinstance(near_duplicate, bool) and math.isfinite(near_duplicate)):
        raise ConfigError(f"near_duplicate must be a finite cosine threshold or null, got {near_duplicate!r}")


def _topk_chunk(scores: Tensor, k: int, banned: Tensor, key: str, offset: int) -> tuple[Tensor, Tensor]:
    """Top-k of one (c, n) score block with ``banned`` (c, n) positions removed; ties -> lower index."""
    eligible = (~banned).sum(-1)  # (c,)
    if bool((eligible < k).any()):
        row = int((eligible < k).nonzero()[0, 0])
        raise ValueError(f"{key}={k} but query {offset + row} has only {int(eligible[row])} eligible keys (of "
                         f"{scores.shape[1]}, after excluding itself, excluded and near-duplicate keys); lower {key} "
                         "or add more items")
    masked = scores.masked_fill(banned, float("-inf"))
    order = masked.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (c, k) stable: lower index first
    return scores.gather(-1, order), order


def cosine_topk(queries: Tensor, keys: Tensor, k: int, *, exclude: Tensor | None = None,
                near_duplicate: float | None = None, key: str = "k") -> tuple[Tensor, Tensor]:
    """Exact cosine kNN of L2-normalised rows.

    Args:
        queries: (q, d). keys: (n, d).
        k: neighbours per query; fewer than ``k`` eligible keys for some query -> ``ValueError`` naming ``key``.
        exclude: (q, n) bool, True = never return this key for this query.
        near_duplicate: keys whose cosine to the query is >= this are excluded too (None: no threshold).
        key: the config key of ``k``, named in errors.

    Returns:
        ``(scores, indices)``, both (q, k), best first; equal scores are ordered by the lower key index.
    """
    _check_topk_args(queries, keys, k, exclude, near_duplicate, key)
    out_scores, out_idx = [], []
    for start in range(0, max(queries.shape[0], 1), _CHUNK):
        scores = _scores(queries[start:start + _CHUNK], keys)  # (c, n)
        banned = torch.zeros_like(scores, dtype=torch.bool) if exclude is None else exclude[start:start + _CHUNK]
        if near_duplicate is not None:
            banned = banned | (scores >= near_duplicate)
        top_scores, top_idx = _topk_chunk(scores, k, banned, key, start)
        out_scores.append(top_scores)
        out_idx.append(top_idx)
    return torch.cat(out_scores), torch.cat(out_idx)


def _faiss_candidates(queries: Tensor, keys: Tensor, k: int) -> Tensor:
    """(q, m) candidate key indices from a faiss exact inner-product index (m = min(n, k)), -1 = none."""
    try:
        import faiss
    except ImportError as err:
        raise ConfigError("retriever.backend='faiss' needs the faiss package (pip install faiss-cpu); "
                          "or use backend='torch' (exact, the default)") from err
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys.contiguous().numpy())
    _, found = index.search(queries.contiguous().numpy(), min(k, keys.shape[0]))
    return torch.from_numpy(found).long()


class Retriever:
    """Nearest stored texts by cosine of an :class:`Encoder`'s embeddings.

    ``near_duplicate``: a stored text whose cosine to the query is >= this threshold is never returned (by
    :meth:`search` and :meth:`neighbours`); None disables it. ``backend``: ``"torch"`` (exact, default) or
    ``"faiss"`` (needs the faiss package; used to shortlist candidates for queries, which are then re-ranked
    exactly here)."""

    def __init__(self, encoder: Encoder, near_duplicate: float | None = None, backend: str = "torch") -> None:
        if not isinstance(encoder, Encoder):
            raise ConfigError(f"retriever.encoder must be an Encoder, got {type(encoder).__name__}")
        _check_topk_args(torch.zeros(0, 1), torch.zeros(0, 1), 1, None, near_duplicate, "k")
        check_choice("retriever.backend", backend, ("torch", "faiss"))
        if backend == "faiss":
            _faiss_candidates(torch.zeros(1, 1), torch.zeros(1, 1), 1)  # fail now, naming the key
        self.encoder = encoder
        self.near_duplicate = near_duplicate
        self.backend = backend
        self.texts: list[str] = []
        self.keys = torch.zeros(0, 0)  # (n, d)

    def __len__(self) -> int:
        return len(self.texts)

    def index(self, texts: Sequence[str]) -> None:
        """Replace the stored texts by ``texts`` (encoded once)."""
        self.texts, self.keys = [], torch.zeros(0, 0)
        self.add(texts)

    def add(self, texts: Sequence[str]) -> None:
        """Append ``texts`` to the stored ones (only the new texts are encoded)."""
        texts = _check_texts(texts, "texts")
        if not texts:
            return
        rows = self.encoder.encode(texts)  # (m, d)
        self.keys = rows if not self.texts else torch.cat([self.keys, rows])
        self.texts.extend(texts)

    def _require_items(self) -> None:
        if not self.texts:
            raise ValueError("Retriever has no items: call index(texts) first")

    def _topk(self, queries: Tensor, k: int, exclude: Tensor, key: str) -> list[list[int]]:
        if self.backend == "faiss" and k < len(self):
            return self._topk_faiss(queries, k, exclude, key)
        _, idx = cosine_topk(queries, self.keys, k, exclude=exclude, near_duplicate=self.near_duplicate, key=key)
        return idx.tolist()

    def _topk_faiss(self, queries: Tensor, k: int, exclude: Tensor, key: str) -> list[list[int]]:
        """Shortlist with faiss, rank the shortlist exactly here. The shortlist doubles until, for every query, k
        keys survive the exclusions and the k-th score is above the shortlist's lowest (so a tie at the edge of
        the shortlist cannot hide a lower-index key)."""
        wanted = min(len(self), 2 * k)
        while True:
            cand = _faiss_candidates(queries, self.keys, wanted)  # (q, m), -1 = none
            valid = cand >= 0
            rows = torch.arange(len(queries)).unsqueeze(-1).expand_as(cand)
            ban = torch.ones_like(exclude)
            ban[rows[valid], cand[valid]] = False
            try:
                scores, idx = cosine_topk(queries, self.keys, k, exclude=ban | exclude,
                                          near_duplicate=self.near_duplicate, key=key)
            except ValueError:
                if wanted >= len(self):
                    raise
                wanted = min(len(self), 2 * wanted)
                continue
            edge = _scores(queries, self.keys).gather(-1, cand.clamp(min=0)).masked_fill(~valid, 2.0).amin(-1)
            if wanted >= len(self) or bool((scores[:, -1] > edge).all()):
                return idx.tolist()
            wanted = min(len(self), 2 * wanted)

    def _same_text(self, texts: list[str]) -> Tensor:
        """(len(texts), n) bool: True where the stored text equals the given one."""
        where: dict[str, list[int]] = {}
        for i, text in enumerate(self.texts):
            where.setdefault(text, []).append(i)
        mask = torch.zeros(len(texts), len(self), dtype=torch.bool)
        for row, text in enumerate(texts):
            mask[row, where.get(text, [])] = True
        return mask

    def search(self, queries: Sequence[str], k: int, *, exclude_self: bool = False,
               key: str = "k") -> list[list[int]]:
        """Indices of the ``k`` stored texts nearest each query, best first (ties: lower index). With
        ``exclude_self`` a stored text equal to the query string is never returned."""
        self._require_items()
        queries = _check_texts(queries, "queries")
        exclude = self._same_text(queries) if exclude_self else torch.zeros(len(queries), len(self), dtype=torch.bool)
        return self._topk(self.encoder.encode(queries), k, exclude, key)

    def neighbours(self, positions: Sequence[int], k: int, *, key: str = "k") -> list[list[int]]:
        """For stored items at ``positions``: their ``k`` nearest OTHER items, best first. Never the item itself
        nor an item with the same text, nor (with ``near_duplicate``) a near-duplicate of it."""
        self._require_items()
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not 0 <= p < len(self)]
        if bad:
            raise IndexError(f"neighbours: positions {bad[:5]} out of range for {len(self)} items")
        exclude = self._same_text([self.texts[p] for p in positions])  # itself and exact copies
        return self._topk(self.keys[positions], k, exclude, key)
