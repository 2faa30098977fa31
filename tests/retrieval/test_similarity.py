"""SIM(premise, hypothesis) in [0, 1] (FEWL §5(a), §5(h)4): hand-computed values of the lexical similarities,
the embedding cosine's two mappings, the range check, and a real (tiny, random) BERT cross-encoder."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_bert import save_tiny_bert

from lit_align.errors import ConfigError, MissingPathError
from lit_align.retrieval import (
    CallableSimilarity,
    CrossEncoderSimilarity,
    EmbeddingCosine,
    ExactMatch,
    HashEncoder,
    TokenJaccard,
)


def test_token_jaccard_values():
    """{the, cat, sat} vs {the, cat, ran}: 2 shared of 4 -> 0.5; case and punctuation ignored; no words on
    both sides -> 1.0; no words on one side -> 0.0."""
    sim = TokenJaccard()
    values = sim(["The cat sat.", "A b", "", "  ", "x"], ["the CAT ran", "a, B!", "", "?", ""])
    assert values.tolist() == [0.5, 1.0, 1.0, 1.0, 0.0]
    assert values.dtype == torch.float32


def test_exact_match_normalises_space_and_case():
    values = ExactMatch()([" Paris  is\tnice ", "Paris", "a"], ["paris is nice", "Paris.", "A"])
    assert values.tolist() == [1.0, 0.0, 1.0]


def test_embedding_cosine_mappings_stay_in_unit_interval():
    """Hash rows: identical texts -> cosine 1 (both mappings 1); shared-nothing texts ~ 0 (clamp ~0, affine
    ~0.5); the affine map is (1 + c) / 2 of the clamp's input."""
    encoder = HashEncoder(dim=1024)
    a = ["steal a bike", "steal a bike", "bake bread", "alpha beta gamma"]
    b = ["steal a bike", "steal a car", "quantum orbit", "delta epsilon zeta"]
    clamp, affine = EmbeddingCosine(encoder)(a, b), EmbeddingCosine(encoder, "affine")(a, b)
    cos = (encoder.encode(a) * encoder.encode(b)).sum(-1)
    torch.testing.assert_close(clamp, cos.clamp(0, 1))
    torch.testing.assert_close(affine, ((1 + cos) / 2).clamp(max=1))
    assert clamp[0] == pytest.approx(1.0) and affine[0] == pytest.approx(1.0)
    assert bool(((clamp >= 0) & (clamp <= 1) & (affine >= 0) & (affine <= 1)).all())
    with pytest.raises(ConfigError, match="similarity.mapping must be one of 'clamp', 'affine'"):
        EmbeddingCosine(encoder, "sigmoid")


@pytest.mark.parametrize("bad", [1.3, -0.1, math.nan, math.inf])
def test_out_of_range_similarity_is_refused_naming_the_key(bad):
    sim = CallableSimilarity(lambda p, h: [0.5, bad], key="fewl.similarity")
    with pytest.raises(ValueError, match=r"CallableSimilarity \(config key 'fewl.similarity'\) returned .* for pair 1"):
        sim(["a", "b"], ["c", "d"])


def test_callable_similarity_passes_values_and_checks_counts():
    sim = CallableSimilarity(lambda p, h: [float(x == y) for x, y in zip(p, h)])
    assert sim(["a", "b"], ["a", "c"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 pairs"):
        CallableSimilarity(lambda p, h: [0.5])(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="2 premises but 1 hypotheses"):
        sim(["a", "b"], ["c"])


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_encoders")
    return {n: save_tiny_bert(root / f"labels{n}", num_labels=n, seed=n) for n in (1, 3)}


def test_cross_encoder_reads_premise_then_hypothesis(bert_dirs):
    """One logit -> sigmoid of the model's logit on the pair encoded as (premise, hypothesis); swapping the
    arguments changes the value (the model is asymmetric: segment ids and positions differ)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sim = CrossEncoderSimilarity(bert_dirs[1], batch_size=2)
    premises = ["the town has a harbour", "you can not steal it", "a cat"]
    hypotheses = ["sorry, i can not help", "the harbour is in town", "a dog"]
    forward, backward = sim(premises, hypotheses), sim(hypotheses, premises)
    model = AutoModelForSequenceClassification.from_pretrained(bert_dirs[1]).eval()
    tok = AutoTokenizer.from_pretrained(bert_dirs[1])
    with torch.no_grad():
        expected = model(**tok(premises, hypotheses, padding=True, return_tensors="pt")).logits[:, 0].sigmoid()
    torch.testing.assert_close(forward, expected)
    assert not torch.allclose(forward, backward)
    assert bool(((forward > 0) & (forward < 1)).all())
    assert sim.fingerprint() == CrossEncoderSimilarity(bert_dirs[1]).fingerprint()


def test_nli_cross_encoder_uses_the_entailment_label(bert_dirs):
    sim = CrossEncoderSimilarity(bert_dirs[3], label=2)
    values = sim(["a town", "the harbour"], ["a harbour", "a town"])
    assert bool(((values > 0) & (values < 1)).all())
    with pytest.raises(ConfigError, match=r"similarity.label must name the entailment label of this 3-label model"):
        CrossEncoderSimilarity(bert_dirs[3])(["a"], ["b"])


def test_cross_encoder_missing_directory_names_the_key(tmp_path):
    with pytest.raises(MissingPathError, match=r"similarity.name_or_path=.*no such directory"):
        CrossEncoderSimilarity(str(tmp_path / "nope"))(["a"], ["b"])
