"""The mean-pooling HF encoder (shared with the adversarial game) is a retrieval Encoder: CPU unit rows, a
fingerprint that follows its weights and settings, usable by the Retriever and EmbeddingCosine."""

from __future__ import annotations

import pytest
import torch

from lit_align.game import SentenceEncoder, build_sentence_encoder
from lit_align.models import ModelSpec, TinyArch
from lit_align.retrieval import EmbeddingCosine, Encoder, MeanPoolEncoder, Retriever, build_mean_pool_encoder

TINY = TinyArch(hidden_size=32, num_layers=1, intermediate_size=64)


@pytest.fixture(scope="module")
def encoder() -> MeanPoolEncoder:
    return build_mean_pool_encoder(ModelSpec(tiny=TINY), max_length=32)


def test_mean_pool_encoder_is_an_encoder_and_the_games_one(encoder):
    assert isinstance(encoder, Encoder) and isinstance(encoder, torch.nn.Module)
    assert SentenceEncoder is MeanPoolEncoder and build_sentence_encoder is build_mean_pool_encoder
    rows = encoder.encode(["how do I bake bread", "how do I bake bread", "tell me about the harbour"])
    assert rows.dtype == torch.float32 and rows.device.type == "cpu" and rows.shape[0] == 3
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(3))
    assert encoder.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="wrap it in a list"):
        encoder.encode("one string")


def test_fingerprint_follows_weights_and_settings(encoder):
    same = MeanPoolEncoder(encoder.model, encoder.tokenizer, max_length=32)
    assert encoder.fingerprint() == same.fingerprint() and encoder.fingerprint().startswith("MeanPoolEncoder(")
    assert MeanPoolEncoder(encoder.model, encoder.tokenizer, max_length=16).fingerprint() != encoder.fingerprint()
    other = build_mean_pool_encoder(ModelSpec(tiny=TINY, seed=1), max_length=32)
    assert other.fingerprint() != encoder.fingerprint()


def test_retriever_and_cosine_similarity_take_it(encoder):
    retriever = Retriever(encoder, near_duplicate=0.999)
    retriever.index(["how do I bake bread", "tell me about the harbour", "how do I bake bread"])
    assert retriever.search(["how do I bake bread"], 1, exclude_self=True) == [[1]]
    assert EmbeddingCosine(encoder)(["a cat"], ["a cat"]).item() == pytest.approx(1.0, abs=1e-5)
