"""Exact cosine kNN (``cosine_topk``) and the text ``Retriever``: brute-force agreement, deterministic ties,
exclusions (ISARA §6(g)1, FEWL §5(h)2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_align.errors import ConfigError
from lit_align.retrieval import HashEncoder, Retriever, cosine_topk


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _brute_force(queries: torch.Tensor, keys: torch.Tensor, k: int, banned=None) -> list[list[int]]:
    """Rank every key by (-cosine, index) with Python floats: the specification of the ordering."""
    out = []
    for qi, q in enumerate(queries.tolist()):
        scored = [(-sum(a * b for a, b in zip(q, key)), j) for j, key in enumerate(keys.tolist())
                  if banned is None or not banned[qi][j]]
        out.append([j for _, j in sorted(scored)[:k]])
    return out


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_cosine_topk_matches_brute_force(k):
    queries, keys = _unit(7, 16, seed=1), _unit(40, 16, seed=2)
    scores, idx = cosine_topk(queries, keys, k)
    assert idx.tolist() == _brute_force(queries, keys, k)
    assert scores.shape == (7, k)
    torch.testing.assert_close(scores, (queries @ keys.T).gather(-1, idx))
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first


def test_ties_go_to_the_lower_index_and_are_stable():
    """Duplicate keys score identically; the lower index comes first, in every call and for every position of
    the copies in the matrix."""
    base = _unit(5, 8, seed=3)
    keys = torch.cat([base, base[[1]], base, base[[1]]])  # copies of key 1 at 1, 5, 7, 11; of key 0 at 0, 6
    query = base[[1]]
    for _ in range(3):
        _, idx = cosine_topk(query, keys, 4)
        assert idx[0].tolist() == [1, 5, 7, 11]
    queries = torch.cat([_unit(3, 8, seed=4), base])  # any query: copies of a key stay in index order
    _, idx = cosine_topk(queries, keys, 12)
    for row in idx.tolist():
        assert [j for j in row if j in (0, 6)] == [0, 6]
        assert [j for j in row if j in (1, 5, 7, 11)] == [1, 5, 7, 11]


def test_exclude_mask_and_near_duplicate_threshold():
    queries, keys = _unit(4, 12, seed=5), _unit(20, 12, seed=6)
    banned = torch.rand(4, 20, generator=torch.Generator().manual_seed(7)) < 0.3
    _, idx = cosine_topk(queries, keys, 5, exclude=banned)
    assert idx.tolist() == _brute_force(queries, keys, 5, banned.tolist())

    near = torch.cat([keys, F.normalize(queries[[0]] + 0.01 * keys[[0]], dim=-1)])  # key 20: near query 0
    _, plain = cosine_topk(queries[[0]], near, 3)
    assert plain[0, 0].item() == 20
    _, kept = cosine_topk(queries[[0]], near, 3, near_duplicate=0.99)
    assert 20 not in kept[0].tolist()
    assert kept[0].tolist() == plain[0, 1:].tolist() + [_brute_force(queries[[0]], near, 4)[0][3]]


def test_too_few_eligible_keys_is_an_error_naming_k():
    queries, keys = _unit(2, 4, seed=8), _unit(3, 4, seed=9)
    with pytest.raises(ValueError, match=r"k=4 .*only 3 eligible"):
        cosine_topk(queries, keys, 4)
    banned = torch.zeros(2, 3, dtype=torch.bool)
    banned[1, :2] = True
    with pytest.raises(ValueError, match=r"neighbours=2 but query 1 has only 1 eligible"):
        cosine_topk(queries, keys, 2, exclude=banned, key="neighbours")
    with pytest.raises(ConfigError, match="neighbours must be an int >= 1"):
        cosine_topk(queries, keys, 0, key="neighbours")


QUESTIONS = ["how do I steal a bike", "how do I bake bread", "what is the capital of france",
             "how do I steal a car", "how do I steal a bike", "how can I steal a bike fast"]


def test_a_query_identical_to_a_stored_text_comes_first():
    """§6(g)1: a stored question, asked again, is its own nearest item (copies: lower index first)."""
    retriever = Retriever(HashEncoder(dim=512))
    retriever.index(QUESTIONS)
    assert retriever.search(["how do I bake bread"], 1) == [[1]]
    assert retriever.search(["how do I steal a bike"], 3)[0][:2] == [0, 4]
    assert retriever.search(["how do I steal a bike"], 3) == retriever.search(["how do I steal a bike"], 3)


def test_search_exclude_self_and_near_duplicates():
    retriever = Retriever(HashEncoder(dim=512))
    retriever.index(QUESTIONS)
    found = retriever.search(["how do I steal a bike", "how do I bake bread"], 3, exclude_self=True)
    assert 0 not in found[0] and 4 not in found[0] and 1 not in found[1]
    strict = Retriever(HashEncoder(dim=512), near_duplicate=0.75)
    strict.index(QUESTIONS)
    sims = strict.keys[5] @ strict.keys.T
    assert sims[0] >= 0.75 and sims[4] >= 0.75  # "how can I steal a bike fast" ~ "how do I steal a bike" (5 of 6 words)
    plain = retriever.search(["how can I steal a bike fast"], 6)[0]
    assert strict.search(["how can I steal a bike fast"], 3)[0] == [j for j in plain if sims[j] < 0.75][:3]


def test_neighbours_never_the_item_nor_a_near_duplicate():
    """§5(h)2: neighbours of a stored question exclude itself, its exact copies, and near-duplicates."""
    retriever = Retriever(HashEncoder(dim=512))
    retriever.index(QUESTIONS)
    for pos, row in zip(range(6), retriever.neighbours(range(6), 3)):
        assert pos not in row and all(QUESTIONS[j] != QUESTIONS[pos] for j in row)
    strict = Retriever(HashEncoder(dim=512), near_duplicate=0.75)
    strict.index(QUESTIONS)
    row = strict.neighbours([0], 2)[0]
    assert 5 not in row and 0 not in row and 4 not in row
    with pytest.raises(ValueError, match="k=6 but query 0 has only"):
        retriever.neighbours([0], 6)


def test_add_is_incremental_and_index_rebuilds():
    retriever = Retriever(HashEncoder(dim=64))
    retriever.index(QUESTIONS[:3])
    retriever.add(QUESTIONS[3:])
    full = Retriever(HashEncoder(dim=64))
    full.index(QUESTIONS)
    assert torch.equal(retriever.keys, full.keys) and len(retriever) == 6
    retriever.index(["only one"])
    assert len(retriever) == 1 and retriever.search(["only one"], 1) == [[0]]


def test_faiss_backend_is_refused_with_the_key_when_not_installed():
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"retriever.backend='faiss' needs the faiss package"):
            Retriever(HashEncoder(), backend="faiss")
    else:  # installed: the same neighbours as the exact torch backend
        texts = QUESTIONS * 3  # exact copies: ties that straddle faiss's shortlist
        exact, approx = Retriever(HashEncoder(dim=64)), Retriever(HashEncoder(dim=64), backend="faiss")
        exact.index(texts)
        approx.index(texts)
        for k in (1, 2, 4, 7, 12):
            assert approx.search(QUESTIONS, k) == exact.search(QUESTIONS, k)
            assert approx.neighbours(range(6), k) == exact.neighbours(range(6), k)
