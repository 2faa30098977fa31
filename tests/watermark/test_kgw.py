"""Tests for the KGW green-list watermark (``lit_align.watermark.kgw``).

Statistical tests use fixed seeds and tolerances several standard errors wide.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_lm

from lit_align.rollout.sampler import SamplingConfig, left_pad, sample
from lit_align.watermark import KGWWatermark, WatermarkedLM, watermarked_sample

VOCAB = 1024
PAD = 0
EOS = VOCAB  # never produced, so every row generates max_new_tokens


def _all_green_sequences(wm: KGWWatermark, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """(rows, length) ids where every token after the first is green given its predecessor."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(rows, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (rows,), generator=gen)
    for t in range(1, length):
        green = wm.green_mask(ids[:, t - 1], VOCAB).float()  # (rows, V)
        ids[:, t] = torch.multinomial(green, 1, generator=gen).squeeze(1)  # a random green token
    return ids


@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_z_score_on_all_green_text_matches_theory(gamma):
    """All T scored tokens green: z = (T − γT) / sqrt(Tγ(1−γ)) = sqrt(T(1−γ)/γ).

    With T = length − 1 (the first token has no predecessor): γ = 0.5, T = 63 gives
    sqrt(63) ≈ 7.94; γ = 0.25 gives sqrt(63 · 3) ≈ 13.75.
    """
    wm = KGWWatermark(VOCAB, gamma=gamma)
    ids = _all_green_sequences(wm, rows=6, length=64)
    z, green, scored = wm.score(ids, torch.ones_like(ids))
    assert scored.tolist() == [63] * 6
    assert green.tolist() == [63] * 6
    torch.testing.assert_close(z, torch.full((6,), math.sqrt(63 * (1 - gamma) / gamma)))
    assert wm.detect(z).all()


def test_z_score_by_hand():
    """G green of T scored: z = (G − γT)/sqrt(Tγ(1−γ)); γ = 0.5, T = 16, G = 12: (12 − 8)/2 = 2."""
    wm = KGWWatermark(VOCAB)
    z = wm.z_score(torch.tensor([12, 8, 0]), torch.tensor([16, 16, 0]))
    torch.testing.assert_close(z, torch.tensor([2.0, 0.0, 0.0]))  # T = 0 -> z = 0
    assert wm.detect(torch.tensor([4.5, 3.9])).tolist() == [True, False]


def test_random_text_is_standard_normal():
    """Without the watermark each token is green with probability γ, so z ~ N(0, 1) approx.

    4000 rows: the mean's standard error is 1/sqrt(4000) ≈ 0.016 and the std's ≈ 0.011.
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4000, 200), generator=gen)
    for gamma in (0.5, 0.25):
        z = KGWWatermark(VOCAB, gamma=gamma).score(ids).z
        assert abs(z.mean().item()) < 0.07
        assert abs(z.std().item() - 1.0) < 0.05
        assert (z > 4.0).float().mean().item() < 1e-3


def test_green_lists_have_size_gamma_v_and_look_independent():
    """Each list holds ≈ γV tokens (Binomial sd sqrt(Vγ(1−γ)) ≈ 16 for V = 1024); lists of
    different previous tokens are nearly uncorrelated (pairwise correlation sd ≈ 1/sqrt(V) = 0.03)."""
    wm = KGWWatermark(VOCAB, gamma=0.5)
    masks = wm.green_mask(torch.arange(VOCAB), VOCAB).float()  # (V, V)
    sizes = masks.sum(-1)
    assert (sizes - 512).abs().max() < 6 * 16
    corr = torch.corrcoef(masks)
    corr.fill_diagonal_(0.0)
    assert corr.abs().max() < 0.2
    assert corr.abs().mean() < 0.03


@pytest.mark.parametrize("gamma", [0.5, 0.3, 0.8])
def test_fast_green_path_equals_int64_reference(gamma):
    """The int32 (B, V) path used in generation agrees with the exact int64 pairwise rule."""
    wm = KGWWatermark(4000, gamma=gamma, key=7)
    prev = torch.randint(0, 4000, (64,), generator=torch.Generator().manual_seed(1))
    fast = wm.green_mask(prev, 4000)
    ref = wm.is_green(prev[:, None], torch.arange(4000)[None])
    assert torch.equal(fast, ref)
    assert abs(fast.float().mean().item() - gamma) < 0.01


def test_bias_changes_only_green_logits_by_exactly_delta():
    wm = KGWWatermark(VOCAB, delta=2.0)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (5, 7), generator=gen)  # (B, t)
    logits = torch.randn(5, VOCAB, generator=gen)  # (B, V)
    out = wm.bias_logits(input_ids, logits)
    green = wm.green_mask(input_ids[:, -1], VOCAB)  # seeded by the last token only
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert torch.equal(out[green], logits[green] + 2.0)
    assert torch.equal(out[~green], logits[~green])
    assert 0 < green.sum() < green.numel()
    # bf16 logits stay bf16.
    assert wm.bias_logits(input_ids, logits.bfloat16()).dtype == torch.bfloat16


def test_bias_does_not_modify_its_input():
    wm = KGWWatermark(VOCAB)
    logits = torch.zeros(2, VOCAB)
    wm.bias_logits(torch.tensor([[1], [2]]), logits)
    assert torch.equal(logits, torch.zeros(2, VOCAB))


def test_score_masks_padding_and_first_token():
    """Padding (left or right) and the first real token are never scored; score_mask restricts further."""
    wm = KGWWatermark(VOCAB)
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(1, VOCAB, (10,), generator=gen)
    ref = wm.score(seq[None])
    left = torch.cat([torch.zeros(4, dtype=torch.long), seq])[None]
    left_mask = torch.cat([torch.zeros(4, dtype=torch.long), torch.ones(10, dtype=torch.long)])[None]
    right = torch.cat([seq, torch.zeros(4, dtype=torch.long)])[None]
    for ids, mask in ((left, left_mask), (right, left_mask.flip(-1))):
        out = wm.score(ids, mask)
        assert out.scored_count.item() == 9
        assert torch.equal(out.green_count, ref.green_count) and torch.equal(out.z, ref.z)
    # Only the last 4 tokens eligible: their predecessors still count as context.
    score_mask = torch.zeros(1, 10, dtype=torch.long)
    score_mask[:, 6:] = 1
    part = wm.score(seq[None], score_mask=score_mask)
    assert part.scored_count.item() == 4
    assert part.green_count.item() == int(wm.is_green(seq[5:9], seq[6:]).sum())


def test_ignore_repeated_ngrams_scores_each_bigram_once():
    ids = torch.tensor([[5, 9, 5, 9, 5, 9, 3]])  # bigrams (5,9) x3, (9,5) x2, (9,3) x1
    plain = KGWWatermark(VOCAB).score(ids)
    dedup = KGWWatermark(VOCAB, ignore_repeated_ngrams=True).score(ids)
    assert plain.scored_count.item() == 6
    assert dedup.scored_count.item() == 3
    wm = KGWWatermark(VOCAB)
    expected = sum(int(wm.is_green(torch.tensor(p), torch.tensor(t))) for p, t in [(5, 9), (9, 5), (9, 3)])
    assert dedup.green_count.item() == expected


def test_key_changes_green_lists_and_is_deterministic():
    ids = torch.randint(0, VOCAB, (8, 50), generator=torch.Generator().manual_seed(0))
    a, b = KGWWatermark(VOCAB, key=1), KGWWatermark(VOCAB, key=1)
    assert torch.equal(a.score(ids).green_count, b.score(ids).green_count)
    assert torch.equal(a.score(ids).z, a.score(ids).z)
    c = KGWWatermark(VOCAB, key=2)
    assert not torch.equal(a.green_mask(torch.arange(8), VOCAB), c.green_mask(torch.arange(8), VOCAB))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_green_lists_on_cpu_and_gpu():
    wm = KGWWatermark(VOCAB, gamma=0.3)
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    cpu = wm.score(ids)
    gpu = wm.score(ids.cuda())
    assert torch.equal(cpu.green_count, gpu.green_count.cpu())
    assert torch.equal(wm.green_mask(ids[:, -1], VOCAB), wm.green_mask(ids[:, -1].cuda(), VOCAB).cpu())
    logits = torch.randn(8, VOCAB)
    torch.testing.assert_close(wm.bias_logits(ids, logits), wm.bias_logits(ids.cuda(), logits.cuda()).cpu())


def test_bad_arguments():
    for kwargs in ({"gamma": 0.0}, {"gamma": 1.0}, {"delta": -1.0}, {"key": -1}, {"key": 2**32}):
        with pytest.raises(ValueError):
            KGWWatermark(VOCAB, **kwargs)
    with pytest.raises(ValueError, match="vocab_size"):
        KGWWatermark(0)
    wm = KGWWatermark(VOCAB)
    with pytest.raises(ValueError, match="mask"):
        wm.score(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="bias_logits"):
        wm.bias_logits(torch.zeros(2, dtype=torch.long), torch.zeros(2, VOCAB))
    assert "secret" in repr(wm) and "15485863" not in repr(wm)


@pytest.fixture(scope="module")
def model():
    return tiny_lm("qwen2", vocab_size=VOCAB)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (12, 7, 9, 12, 5, 10)]
    return left_pad(seqs, PAD)


def _response_z(wm: KGWWatermark, rollout) -> torch.Tensor:
    score_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    return wm.score(rollout.sequences, rollout.attention_mask, score_mask=score_mask).z


def test_generation_with_bias_is_detected(model):
    """Greedy decoding of a tiny random LM: the bias makes continuations green-heavy (high z),
    while the same model without bias scores near 0."""
    wm = KGWWatermark(VOCAB, gamma=0.5, delta=2.0)
    ids, mask = _prompts()
    config = SamplingConfig(max_new_tokens=40, do_sample=False)
    plain = sample(model, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD)
    marked = watermarked_sample(model, ids, mask, config, wm, eos_token_id=EOS, pad_token_id=PAD)
    z_plain, z_marked = _response_z(wm, plain), _response_z(wm, marked)
    assert z_marked.min() > 4.0
    assert z_plain.abs().max() < 4.0
    assert z_marked.mean() > z_plain.mean() + 4.0
    # Sampling too (temperature 1): still clearly detected on average.
    sampled = watermarked_sample(model, ids, mask, SamplingConfig(max_new_tokens=40), wm, eos_token_id=EOS,
                                 pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert _response_z(wm, sampled).mean() > 3.0


def test_watermarked_generation_matches_manual_biased_greedy(model):
    """The wrapped model's greedy tokens equal argmax of (logits + δ·green) computed step by step
    without a cache, and the call is deterministic."""
    wm = KGWWatermark(VOCAB)
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    config = SamplingConfig(max_new_tokens=8, do_sample=False)
    out = watermarked_sample(model, ids, mask, config, wm, eos_token_id=EOS, pad_token_id=PAD)
    again = watermarked_sample(model, ids, mask, config, wm, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.response_ids, again.response_ids)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=seq).logits[:, -1].float()
            seq = torch.cat([seq, wm.bias_logits(seq, logits).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.response_ids, seq[:, 6:])
    assert isinstance(WatermarkedLM(model, wm).config, type(model.config))
