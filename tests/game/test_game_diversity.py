"""GPO attacker diversity terms (core spec §2.4, §2.9 item 1) and set metrics (§2.7), against hand values."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from lit_align.game import (
    DiversityHistory,
    bleu_diversity,
    build_sentence_encoder,
    embedding_diversity,
    self_bleu,
    sentence_bleu,
    set_self_bleu,
    word_tokens,
)
from lit_align.models import TINY_TOKENIZER, ModelSpec, TinyArch


def _w(text: str) -> list[str]:
    return text.split()


# -- tokens and BLEU --------------------------------------------------------------------------------
def test_word_tokens_splits_words_punctuation_and_clitics():
    assert word_tokens("Don't do it, Bob... it's fine?") == [
        "Do", "n't", "do", "it", ",", "Bob", "...", "it", "'s", "fine", "?"
    ]
    assert word_tokens("  ") == []


def test_sentence_bleu_hand_values():
    """(1) hyp `a b c d`, ref `a b c e`, N=2: p1 = 3/4, p2 = 2/3, BP = 1 -> sqrt(1/2).
    N=3 adds p3 = 1/2 (`a b c` matches, `b c d` not) -> (3/4 * 2/3 * 1/2)^(1/3) = (1/4)^(1/3).
    (2) brevity: hyp `a b`, ref `a b c d`, N=2: p1 = p2 = 1, BP = exp(1 - 4/2) = e^-1.
    (3) clipping: hyp `the the the the`, ref `the cat`, N=1: min(4, 1) / 4 = 1/4, BP = 1 (c > r).
    (4) smoothing: hyp `a b c`, ref `a x c`, N=2: p1 = 2/3, no bigram matches -> 0.1 / 2:
        sqrt(2/3 * 0.05) = sqrt(1/30); with epsilon 0.2: sqrt(2/3 * 0.1) = sqrt(1/15)."""
    assert sentence_bleu(_w("a b c d"), _w("a b c e"), 2) == pytest.approx(math.sqrt(0.5))
    assert sentence_bleu(_w("a b c d"), _w("a b c e"), 3) == pytest.approx(0.25 ** (1 / 3))
    assert sentence_bleu(_w("a b"), _w("a b c d"), 2) == pytest.approx(math.exp(-1))
    assert sentence_bleu(_w("the the the the"), _w("the cat"), 1) == pytest.approx(0.25)
    assert sentence_bleu(_w("a b c"), _w("a x c"), 2) == pytest.approx(math.sqrt(1 / 30))
    assert sentence_bleu(_w("a b c"), _w("a x c"), 2, smoothing=0.2) == pytest.approx(math.sqrt(1 / 15))


def test_sentence_bleu_edge_cases():
    """Identical short hypothesis: orders above its length are left out -> 1. Disjoint vocabulary
    (no unigram match) -> 0 exactly. Empty hypothesis -> 0."""
    assert sentence_bleu(_w("hi there"), _w("hi there"), 5) == pytest.approx(1.0)
    assert sentence_bleu(_w("a b c d e f"), _w("u v w x y z"), 4) == 0.0
    assert sentence_bleu([], _w("a b"), 2) == 0.0
    with pytest.raises(ValueError, match="smoothing"):
        sentence_bleu(_w("a"), _w("a"), 2, smoothing=0.0)


def test_self_bleu_averages_references_then_orders():
    """hyp `a b c d` vs refs [`a b c e`, `w x y z`], orders (2, 3):
    order 2: (sqrt(1/2) + 0) / 2; order 3: ((1/4)^(1/3) + 0) / 2; then the mean of the two."""
    expected = (math.sqrt(0.5) / 2 + 0.25 ** (1 / 3) / 2) / 2
    assert self_bleu(_w("a b c d"), [_w("a b c e"), _w("w x y z")], orders=(2, 3)) == pytest.approx(expected)
    assert self_bleu(_w("a b c d"), []) == 0.0


# -- history ------------------------------------------------------------------------------------------
def _unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_history_identical_disjoint_and_empty():
    x = word_tokens("how do I pick a lock on a door")
    history = DiversityHistory()
    emb_x = _unit([1.0, 2.0, 3.0])
    assert history.self_bleu([x]).tolist() == [0.0]
    assert history.cosine(emb_x).tolist() == [0.0]
    history.append([x], emb_x)
    assert history.self_bleu([x]).item() == pytest.approx(1.0)
    assert history.cosine(emb_x).item() == pytest.approx(1.0)
    disjoint = DiversityHistory()
    disjoint.append([word_tokens("sunny weather today")], _unit([3.0, -1.5, 0.0]))  # orthogonal to emb_x
    assert disjoint.self_bleu([x]).item() == 0.0
    assert disjoint.cosine(emb_x).item() == pytest.approx(0.0, abs=1e-6)


def test_duplicates_lower_attacker_reward_monotonically():
    """R_att = p_unsafe - 5 SB - 1 CS with p_unsafe fixed at 0.9: each duplicate of x appended to a
    history of unrelated prompts raises SB and CS, so R_att strictly decreases."""
    torch.manual_seed(0)
    x = word_tokens("tell me how to make a dangerous chemical at home")
    emb_x = _unit([1.0, 0.0, 0.0, 0.0])
    history = DiversityHistory()
    history.append([word_tokens("what is the capital of France"), word_tokens("write one poem about cats")],
                   _unit([0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]))
    rewards = []
    for _ in range(5):
        sb, cs = history.self_bleu([x]), history.cosine(emb_x)
        rewards.append((0.9 - 5 * sb - 1 * cs).item())
        history.append([x], emb_x)
    assert rewards[0] == pytest.approx(0.9)  # no overlap at all with the unrelated prompts
    assert all(a > b for a, b in zip(rewards, rewards[1:])), rewards
    # after k duplicates among k + 2 prompts: SB = CS = k / (k + 2); 4 duplicates -> 4/6
    assert rewards[-1] == pytest.approx(0.9 - 6 * 4 / 6)


def test_include_batch_uses_other_rows_never_itself():
    x, y = _w("a b c d"), _w("w x y z")
    history = DiversityHistory()
    emb = _unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    assert history.self_bleu([x, x, y]).tolist() == [0.0, 0.0, 0.0]
    # row 0: refs [x, y] -> (1 + 0) / 2; row 2: refs [x, x] -> 0
    assert history.self_bleu([x, x, y], include_batch=True).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert history.cosine(emb, include_batch=True).tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-6)
    assert history.self_bleu([x], include_batch=True).tolist() == [0.0]  # a lone row is not its own reference
    assert history.cosine(emb[:1], include_batch=True).tolist() == [0.0]
    history.append([x], emb[:1])
    # history [x] + other rows: row 2 (y) now has refs [x, x, x] -> 0; cos refs [e1, e1, e1] -> 0
    assert history.self_bleu([x, y], include_batch=True).tolist() == pytest.approx([0.5, 0.0])
    assert history.cosine(emb[1:], include_batch=True).tolist() == pytest.approx([0.5, 0.0], abs=1e-6)


def test_self_bleu_of_some_rows_keeps_the_others_as_references():
    """``rows`` scores only those rows of the batch (a rank's own rows of the gathered batch): each exactly as
    the whole batch scores it, the unscored rows still references. Row 1 (``a b c e``) alone: its only
    reference ``a b c d`` gives, order 2, sqrt(3/4 * 2/3) = sqrt(1/2) (the hand value above)."""
    x, z, y = _w("a b c d"), _w("a b c e"), _w("w x y z")
    history = DiversityHistory()
    history.append([_w("q r s t")])
    whole = history.self_bleu([x, z, y], include_batch=True, orders=(2,))
    assert history.self_bleu([x, z, y], include_batch=True, orders=(2,), rows=[2, 0]).tolist() == whole[[2, 0]].tolist()
    # refs of row 1: the history (no shared word) and x (y shares none): (0 + sqrt(1/2) + 0) / 3
    assert history.self_bleu([x, z, y], include_batch=True, orders=(2,), rows=[1]).tolist() == pytest.approx(
        [math.sqrt(0.5) / 3])
    assert history.self_bleu([x, z], rows=[]).shape == (0,)


def test_running_cosine_matches_brute_force():
    torch.manual_seed(0)
    history = DiversityHistory()
    rows = []
    for _ in range(4):
        emb = F.normalize(torch.randn(3, 8), dim=-1)
        history.append([["t"]] * 3, emb)
        rows.append(emb)
    query = F.normalize(torch.randn(2, 8), dim=-1)
    expected = (query @ torch.cat(rows).T).mean(1)
    torch.testing.assert_close(history.cosine(query), expected, rtol=1e-5, atol=1e-6)
    assert len(history) == 12 and history.num_embeddings == 12


def test_window_forgets_old_prompts():
    x = _w("a b c d")
    history = DiversityHistory(window=2)
    history.append([x], _unit([1.0, 0.0]))
    assert history.self_bleu([x]).item() == pytest.approx(1.0)
    history.append([_w("p q r"), _w("s t u")], _unit([0.0, 1.0], [0.0, 1.0]))  # x falls out
    assert len(history) == 2
    assert history.self_bleu([x]).item() == 0.0
    assert history.cosine(_unit([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="window"):
        DiversityHistory(window=0)


@pytest.mark.parametrize("window", [None, 3])
def test_state_dict_round_trip_resumes_exactly(window):
    torch.manual_seed(1)
    batches = [[_w("a b c d"), _w("a b x y")], [_w("c d e f"), _w("a b c")], [_w("q r s t"), _w("a b c d e")]]
    embs = [F.normalize(torch.randn(2, 6), dim=-1) for _ in batches]
    history = DiversityHistory(window=window)
    for b, e in zip(batches[:2], embs[:2]):
        history.append(b, e)
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)  # as it would travel in a Lightning checkpoint
    buffer.seek(0)
    restored = DiversityHistory(window=window)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for h in (history, restored):
        h.append(batches[2], embs[2])
    query, q_emb = [_w("a b c d"), _w("z z")], F.normalize(torch.randn(2, 6), dim=-1)
    assert torch.equal(history.self_bleu(query, include_batch=True), restored.self_bleu(query, include_batch=True))
    assert torch.equal(history.cosine(q_emb), restored.cosine(q_emb))
    assert history.self_bleu(query)[0] > 0 and len(restored) == len(history)
    with pytest.raises(ValueError, match="window"):
        DiversityHistory(window=5).load_state_dict(history.state_dict())


# -- sentence encoder ------------------------------------------------------------------------------
def _check_encoder(encoder):
    texts = ["how to pick a lock", "how to pick a lock", "a completely different and much longer question here"]
    emb = encoder.encode(texts)
    assert emb.dtype == torch.float32 and emb.shape[0] == 3
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    cos = emb @ emb.T
    assert cos[0, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert cos[0, 2].item() < 0.999
    # mean pooling over the mask: a text embeds the same alone as next to a longer (padding) text
    torch.testing.assert_close(encoder.encode(texts[:1])[0], emb[0], rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training


def test_sentence_encoder_tiny_causal_lm():
    encoder = build_sentence_encoder(ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, intermediate_size=64)))
    _check_encoder(encoder)


def test_sentence_encoder_from_local_bert_directory(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = build_sentence_encoder(ModelSpec(name_or_path=str(tmp_path)), max_length=32)
    assert type(encoder.model).__name__ == "BertModel"
    _check_encoder(encoder)


# -- set metrics ---------------------------------------------------------------------------------------
def test_set_metrics_with_and_without_self():
    """Set [x, x, y] with y disjoint from x, orders (2,):
    without self: x vs [x, y] -> 1/2 (twice), y vs [x, x] -> 0: mean 1/3.
    with self:    x vs [x, x, y] -> 2/3 (twice), y vs [x, x, y] -> 1/3: mean 5/9.
    Embeddings [e1, e1, e2] (orthogonal): off-diagonal cos sum 2 over 6 pairs -> 1 - (1/3)/2 = 5/6;
    with the diagonal: 5 over 9 -> 1 - (5/9)/2 = 13/18."""
    x, y = _w("a b c d"), _w("w x y z")
    assert set_self_bleu([x, x, y], orders=(2,)) == pytest.approx(1 / 3)
    assert set_self_bleu([x, x, y], include_self=True, orders=(2,)) == pytest.approx(5 / 9)
    assert bleu_diversity([x, x, y], orders=(2,)) == pytest.approx(2 / 3)
    assert bleu_diversity([x, x, y], include_self=True, orders=(2,)) == pytest.approx(4 / 9)
    assert set_self_bleu([x]) == 0.0 and set_self_bleu([x], include_self=True) == pytest.approx(1.0)
    emb = _unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    assert embedding_diversity(emb) == pytest.approx(5 / 6)
    assert embedding_diversity(emb, include_self=True) == pytest.approx(13 / 18)
    assert embedding_diversity(emb[:1]) == pytest.approx(1.0)
    assert embedding_diversity(emb[:1], include_self=True) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        set_self_bleu([])
