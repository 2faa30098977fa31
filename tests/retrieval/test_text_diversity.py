"""Set diversity for collapse tracking (ISARA §6(h)3): distinct-n and embedding diversity on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.retrieval import distinct_n, embedding_diversity


def test_distinct_n_by_hand():
    """["a b a b", "a b c"]: unigrams a b a b a b c -> 3 unique of 7; bigrams ab ba ab ab bc -> 3 of 5."""
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(texts, 4) == pytest.approx(1.0)  # one 4-gram
    assert distinct_n(texts, 5) == 0.0 and distinct_n([], 1) == 0.0 and distinct_n(["", " "], 1) == 0.0
    assert distinct_n(["x y", "x y"], 2) == 0.5  # a collapsed set scores low
    with pytest.raises(ConfigError, match="n must be an int >= 1"):
        distinct_n(texts, 0)


def test_embedding_diversity_by_hand():
    """Identical rows: 1 - 1 = 0. Orthogonal rows: 1 - 0 = 1. Rows at 60 degrees and one orthogonal third:
    cosines 0.5, 0, 0 -> 1 - 0.5 / 3. Rows are re-normalised first (scale does not matter)."""
    assert embedding_diversity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)
    assert embedding_diversity(torch.eye(5)) == pytest.approx(1.0)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.5, 3**0.5 / 2, 0.0], [0.0, 0.0, 7.0]])
    assert embedding_diversity(rows) == pytest.approx(1 - 0.5 / 3)
    assert embedding_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    assert embedding_diversity(torch.ones(1, 3)) == 0.0 and embedding_diversity(torch.zeros(0, 3)) == 0.0
