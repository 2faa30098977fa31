"""An encoder whose cosines differ between DDP ranks, for ``test_isara_distributed.py``: it stands for the
numeric differences between devices (batched bf16, a cosine one ulp from ``near_duplicate``) that must not give
the ranks different pools. Imported by class path in the ``lit-align`` subprocesses (this folder on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lit_align.engine.distributed import rank_and_world
from lit_align.retrieval import HashEncoder

__all__ = ["RankSkewedEncoder"]


class RankSkewedEncoder(HashEncoder):
    """``HashEncoder(dim)`` on rank 0 (and in one process); on every other rank words hashed into 8 buckets, whose
    collisions make most cosines high: those ranks retrieve other demonstrations and would drop most questions as
    duplicates."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__(dim=dim, ngram=1)
        self.other = HashEncoder(dim=8, ngram=1)

    def encode(self, texts: Sequence[str]) -> Tensor:
        return super().encode(texts) if rank_and_world()[0] == 0 else self.other.encode(texts)
