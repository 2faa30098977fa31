"""Tests for the batched KV-cache sampler (``lit_align.rollout.sampler``).

Tiny randomly initialised models are built locally from a config (no downloads).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_lm

from lit_align.rollout.sampler import Rollout, SamplingConfig, left_pad, sample

VOCAB = 1024
PAD = 0
# Left-padded prompts of different lengths (row 0 is the longest, row 2 the shortest).
PROMPTS = [
    [5, 17, 301, 44, 9, 12, 600, 71],
    [88, 23, 7],
    [400, 19],
    [3, 150, 99, 250, 811],
]


def _tiny(kind: str) -> transformers.PreTrainedModel:
    return tiny_lm(kind, vocab_size=VOCAB)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request) -> transformers.PreTrainedModel:
    return _tiny(request.param)


@pytest.fixture(scope="module")
def qwen() -> transformers.PreTrainedModel:
    return _tiny("qwen2")


def _batch(prompts: list[list[int]] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(prompts, PAD)


def _hf_greedy(model, ids, mask, max_new: int, eos: int | None) -> torch.Tensor:
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=PAD,
        use_cache=True,
    )
    return out[:, ids.shape[1] :]  # (B, R)


def _full_forward_logits(model, rollout: Rollout) -> torch.Tensor:
    """(B, R, V) logits predicting each response token, from one no-cache forward."""
    mask = rollout.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(
            input_ids=rollout.sequences, attention_mask=mask, position_ids=pos, use_cache=False
        ).logits.float()  # (B, P + R, V)
    p = rollout.prompt_ids.shape[1]
    r = rollout.response_ids.shape[1]
    return logits[:, p - 1 : p - 1 + r]


def _check_rollout_invariants(r: Rollout, eos: set[int], max_new: int) -> None:
    b, p = r.prompt_ids.shape
    rl = r.response_ids.shape[1]
    assert r.response_mask.shape == r.logps.shape == (b, rl)
    assert r.sequences.shape == r.attention_mask.shape == (b, p + rl)
    assert 1 <= rl <= max_new
    lengths = r.response_lengths
    assert int(lengths.max()) == rl  # R is the longest response, nothing more
    for i in range(b):
        n = int(lengths[i])
        assert n >= 1
        assert r.response_mask[i, :n].eq(1).all() and r.response_mask[i, n:].eq(0).all()  # prefix of ones
        toks = r.response_ids[i, :n].tolist()
        assert not (set(toks[:-1]) & eos), "no EOS before the last generated token"
        if n < max_new:
            assert toks[-1] in eos, "a row that stopped early ends with EOS"
        assert r.response_ids[i, n:].eq(PAD).all()
        assert r.logps[i, n:].eq(0).all()
        assert (r.logps[i, :n] <= 0).all()


# --------------------------------------------------------------------------- greedy vs HF


def test_greedy_matches_hf_generate(model):
    ids, mask = _batch()
    max_new = 12
    greedy = SamplingConfig(max_new_tokens=max_new, do_sample=False)

    # Without an EOS that ever fires: identical to HF on the whole (left-padded) batch.
    never = VOCAB + 7
    ref = _hf_greedy(model, ids, mask, max_new, never)
    out = sample(model, ids, mask, greedy, eos_token_id=never, pad_token_id=PAD)
    assert out.response_ids.shape == (len(PROMPTS), max_new)
    assert torch.equal(out.response_ids, ref)
    assert out.response_mask.eq(1).all()

    # Force row 1 to stop early: its EOS is the token it emits greedily at some step >= 2
    # (one it has not emitted before, so it really stops there).
    row_toks = ref[1].tolist()
    step = next(s for s in range(2, max_new - 2) if row_toks[s] not in row_toks[:s])
    eos = row_toks[step]
    ref_eos = _hf_greedy(model, ids, mask, max_new, eos)
    out_eos = sample(model, ids, mask, greedy, eos_token_id=eos, pad_token_id=PAD)
    assert int(out_eos.response_lengths[1]) == step + 1
    assert out_eos.response_ids.shape[1] > step + 1, "other rows keep generating after row 1 stopped"
    assert out_eos.response_ids.shape == ref_eos.shape
    assert torch.equal(out_eos.response_ids, ref_eos)
    # Same ids after EOS masking (both pad after EOS already, but compare the masked view too).
    m = out_eos.response_mask.bool()
    assert torch.equal(out_eos.response_ids[m], ref_eos[m])
    _check_rollout_invariants(out_eos, {eos}, max_new)

    # A list of EOS ids behaves like HF with the same list.
    eos_list = [eos, row_toks[step + 1]]
    ref_list = _hf_greedy(model, ids, mask, max_new, eos_list)
    out_list = sample(model, ids, mask, greedy, eos_token_id=eos_list, pad_token_id=PAD)
    assert torch.equal(out_list.response_ids, ref_list)


def test_greedy_matches_hf_without_padding(model):
    # Equal-length prompts: no padding at all (the sampler then drops the attention mask).
    ids, mask = _batch([[5, 17, 301, 44], [88, 23, 7, 2], [400, 19, 1, 3]])
    assert mask.eq(1).all()
    ref = _hf_greedy(model, ids, mask, 10, VOCAB + 7)
    out = sample(
        model, ids, mask, SamplingConfig(max_new_tokens=10, do_sample=False), eos_token_id=VOCAB + 7, pad_token_id=PAD
    )
    assert torch.equal(out.response_ids, ref)


def test_padding_does_not_change_a_row(qwen):
    # Row results must not depend on how much left padding the batch adds.
    cfg = SamplingConfig(max_new_tokens=8, do_sample=False)
    ids, mask = _batch()
    batched = sample(qwen, ids, mask, cfg, eos_token_id=VOCAB + 7, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = _batch([prompt])
        alone = sample(qwen, one_ids, one_mask, cfg, eos_token_id=VOCAB + 7, pad_token_id=PAD)
        assert torch.equal(alone.response_ids[0], batched.response_ids[i])
        torch.testing.assert_close(alone.logps[0], batched.logps[i], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=10, temperature=1.0),
        SamplingConfig(max_new_tokens=10, do_sample=False),
        SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.9),
    ],
    ids=["t1", "greedy", "t0.7-topk-topp"],
)
def test_logps_match_full_forward(model, cfg):
    ids, mask = _batch()
    eos = [11, 12, 13, 14, 15, 16, 17, 18]
    out = sample(model, ids, mask, cfg, eos_token_id=eos, pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    logits = _full_forward_logits(model, out)  # (B, R, V)
    temperature = cfg.temperature if cfg.do_sample else 1.0
    # Unfiltered, temperature-scaled distribution, even when top-k/top-p were used to sample.
    ref = torch.log_softmax(logits / temperature, dim=-1).gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1)
    ref = ref * out.response_mask
    torch.testing.assert_close(out.logps, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(qwen):
    ids, mask = _batch()
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95)

    def run(seed: int) -> Rollout:
        return sample(
            qwen,
            ids,
            mask,
            cfg,
            eos_token_id=VOCAB + 7,
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logps, b.logps)
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(top_k=1, temperature=0.5), SamplingConfig(top_p=1e-6, temperature=2.0)],
    ids=["top_k=1", "top_p~0"],
)
def test_degenerate_filters_equal_greedy(model, cfg):
    ids, mask = _batch()
    cfg.max_new_tokens = 10
    greedy = sample(
        model, ids, mask, SamplingConfig(max_new_tokens=10, do_sample=False), eos_token_id=VOCAB + 7, pad_token_id=PAD
    )
    sampled = sample(
        model, ids, mask, cfg, eos_token_id=VOCAB + 7, pad_token_id=PAD, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled.response_ids, greedy.response_ids)


def test_samples_stay_inside_top_k_and_top_p(qwen):
    ids, mask = _batch()
    gen = torch.Generator().manual_seed(5)
    out_k = sample(
        qwen,
        ids,
        mask,
        SamplingConfig(max_new_tokens=12, top_k=3),
        eos_token_id=VOCAB + 7,
        pad_token_id=PAD,
        generator=gen,
    )
    top3 = _full_forward_logits(qwen, out_k).topk(3, dim=-1).indices  # (B, R, 3)
    assert (top3 == out_k.response_ids.unsqueeze(-1)).any(-1).all()

    top_p = 0.3
    out_p = sample(
        qwen,
        ids,
        mask,
        SamplingConfig(max_new_tokens=12, top_p=top_p),
        eos_token_id=VOCAB + 7,
        pad_token_id=PAD,
        generator=gen,
    )
    probs = _full_forward_logits(qwen, out_p).softmax(-1)  # (B, R, V)
    chosen = probs.gather(-1, out_p.response_ids.unsqueeze(-1))  # (B, R, 1)
    mass_above = (probs * (probs > chosen)).sum(-1)  # mass of strictly more likely tokens
    assert (mass_above < top_p + 1e-4).all()
    nucleus_size = (probs.sort(-1, descending=True).values.cumsum(-1) < top_p).sum(-1) + 1
    assert (nucleus_size > 1).any(), "test is vacuous if the nucleus is always a single token"


def test_masks_and_pad_after_eos(qwen):
    ids, mask = _batch()
    eos = list(range(100, 300))  # ~20% of the vocabulary: rows stop at different steps
    max_new = 40
    out = sample(
        qwen,
        ids,
        mask,
        SamplingConfig(max_new_tokens=max_new),
        eos_token_id=eos,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    _check_rollout_invariants(out, set(eos), max_new)
    lengths = out.response_lengths
    assert len(set(lengths.tolist())) > 1, "rows should stop at different steps"
    assert out.response_ids.shape[1] < max_new, "early exit once every row has finished"
    assert torch.equal(out.prompt_ids, ids) and torch.equal(out.prompt_mask, mask)
    assert torch.equal(out.sequences, torch.cat([ids, out.response_ids], 1))
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], 1))


def test_pad_equal_to_eos_and_single_token(qwen):
    # Many tokenizers use EOS as pad: lengths must still stop at the first EOS.
    ids, mask = _batch()
    eos = list(range(100, 300))
    out = sample(
        qwen,
        ids,
        mask,
        SamplingConfig(max_new_tokens=40),
        eos_token_id=eos,
        pad_token_id=eos[0],
        generator=torch.Generator().manual_seed(0),
    )
    ref = sample(
        qwen,
        ids,
        mask,
        SamplingConfig(max_new_tokens=40),
        eos_token_id=eos,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out.response_mask, ref.response_mask)
    assert torch.equal(out.logps, ref.logps)
    m = out.response_mask.bool()
    assert torch.equal(out.response_ids[m], ref.response_ids[m])
    assert out.response_ids[~m].eq(eos[0]).all()

    one = sample(qwen, ids, mask, SamplingConfig(max_new_tokens=1), eos_token_id=(3, 4), pad_token_id=PAD)
    assert one.response_ids.shape == one.response_mask.shape == one.logps.shape == (len(PROMPTS), 1)
    assert one.response_mask.eq(1).all()


def test_one_cached_forward_per_token(qwen):
    calls: list[tuple[tuple[int, ...], object]] = []

    def hook(_module, args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("logits_to_keep")))

    ids, mask = _batch()
    handle = qwen.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = sample(qwen, ids, mask, SamplingConfig(max_new_tokens=6), eos_token_id=VOCAB + 7, pad_token_id=PAD)
    finally:
        handle.remove()
    b, p = ids.shape
    assert out.response_ids.shape[1] == 6
    assert calls == [((b, p), 1)] + [((b, 1), 1)] * 5  # prefill + one single-token step per further token


# --------------------------------------------------------------------------- fast path vs plain path

#: Many EOS ids, so that rows finish at different steps (about 12% of the vocabulary ends a row).
EARLY_EOS = list(range(1, 120))


def _plain_sample(model, ids, mask, config: SamplingConfig, eos: list[int], generator) -> Rollout:
    """The plain decoding loop the sampler's fast path must reproduce: a 2D attention mask that the model turns
    into a 4D one at every step, and the documented uniforms: (B, N) from one generator, or N per row from each
    row's own generator, column t for step t."""
    from transformers import DynamicCache

    from lit_align.rollout.sampler import _cache_kwarg, _select

    b, p = ids.shape
    n = config.max_new_tokens
    full_mask = torch.cat([mask, torch.ones(b, n, dtype=torch.long)], dim=1)  # (B, P + N)
    pos = mask.sum(-1, keepdim=True) + torch.arange(n)  # (B, N)
    cache = {_cache_kwarg(model): DynamicCache(config=model.config)}  # the keyword differs across transformers
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **cache,
                use_cache=True, logits_to_keep=1)
    if isinstance(generator, torch.Generator):
        uniforms = torch.rand(b, n, generator=generator)
    else:
        uniforms = torch.stack([torch.rand(n, generator=g) for g in generator])
    finished = torch.zeros(b, dtype=torch.bool)
    tokens_, logps_ = [], []
    for t in range(n):
        tokens, logps = _select(out.logits[:, -1].float(), config, uniforms[:, t])
        tokens = tokens.masked_fill(finished, PAD)
        tokens_.append(tokens)
        logps_.append(logps)
        finished |= torch.isin(tokens, torch.tensor(eos))
        if t == n - 1 or finished.all():
            break
        out = model(input_ids=tokens[:, None], attention_mask=full_mask[:, : p + t + 1],
                    position_ids=pos[:, t : t + 1], **cache, use_cache=True, logits_to_keep=1)
    response = torch.stack(tokens_, 1)  # (B, R)
    is_eos = torch.isin(response, torch.tensor(eos))
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, response.shape[1])
    resp_mask = torch.arange(response.shape[1]) < lengths[:, None]
    return Rollout(ids, mask, response, resp_mask.long(), torch.stack(logps_, 1).masked_fill(~resp_mask, 0.0))


def _row_generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(n)]


@pytest.mark.parametrize("generators", ["per_row", "one"])
@pytest.mark.parametrize(
    "cfg", [SamplingConfig(max_new_tokens=20), SamplingConfig(max_new_tokens=20, top_k=40, top_p=0.9, temperature=0.8)],
    ids=["plain", "top_k_top_p"],
)
def test_fast_path_equals_plain_path(model, cfg, generators):
    """Same tokens, masks and log-probs, bit for bit, as the plain loop, with rows finishing at different steps:
    the prepared decoding masks and the skipped noise of finished rows change nothing but the speed."""
    ids, mask = _batch(PROMPTS * 2)  # 8 rows
    gens = (lambda: _row_generators(len(ids))) if generators == "per_row" else (lambda: torch.Generator().manual_seed(5))
    fast = sample(model, ids, mask, cfg, eos_token_id=EARLY_EOS, pad_token_id=PAD, generator=gens())
    with torch.no_grad():
        plain = _plain_sample(model, ids, mask, cfg, EARLY_EOS, gens())
    lengths = fast.response_lengths
    assert lengths.min() < lengths.max() == fast.response_ids.shape[1]  # rows really stopped at different steps
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask)
    assert torch.equal(fast.logps, plain.logps)


def test_each_row_draws_its_uniforms_once(qwen):
    """With per-row generators a row's generator advances by exactly one (max_new_tokens,) uniform draw, whatever
    its length (finished rows draw nothing more), so a row's draws depend on its own generator alone."""
    ids, mask = _batch(PROMPTS * 2)
    gens = _row_generators(len(ids))
    out = sample(qwen, ids, mask, SamplingConfig(max_new_tokens=20), eos_token_id=EARLY_EOS, pad_token_id=PAD,
                 generator=gens)
    lengths = out.response_lengths.tolist()
    assert min(lengths) < max(lengths)  # rows finished at different steps
    for g, fresh in zip(gens, _row_generators(len(ids))):
        torch.rand(20, generator=fresh)
        assert torch.equal(g.get_state(), fresh.get_state())


def test_inverse_cdf_picks_only_tokens_with_weight():
    """u = 0 and u just below 1 pick the first and the last token of positive weight, never an excluded one, also
    when the scaled target would round up to the total."""
    from lit_align.rollout.sampler import _inverse_cdf

    scores = torch.tensor([[float("-inf"), 0.0, -1.0, float("-inf")], [-2.0, float("-inf"), 0.0, float("-inf")]])
    low = _inverse_cdf(scores, torch.zeros(2))
    high = _inverse_cdf(scores, torch.full((2,), 1.0 - 2.0**-24))
    assert low.tolist() == [1, 0] and high.tolist() == [2, 2]
    one = _inverse_cdf(scores, torch.ones(2))  # out of range: still the last token with weight
    assert one.tolist() == [2, 2]


def test_decoding_steps_get_one_prepared_mask(qwen):
    """Padded prompts: the prefill gets the 2D mask, every decoding step a view of one prepared (B, 1, 1, P + t + 1)
    boolean mask, so the model builds none of its own."""
    masks: list[torch.Tensor] = []
    handle = qwen.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    ids, mask = _batch()
    try:
        sample(qwen, ids, mask, SamplingConfig(max_new_tokens=4), eos_token_id=VOCAB + 7, pad_token_id=PAD)
    finally:
        handle.remove()
    b, p = ids.shape
    assert masks[0].shape == (b, p)
    assert [tuple(m.shape) for m in masks[1:]] == [(b, 1, 1, p + t + 1) for t in range(3)]
    assert all(m.dtype == torch.bool and m.untyped_storage().data_ptr() == masks[1].untyped_storage().data_ptr()
               for m in masks[1:])
    assert torch.equal(masks[-1][:, 0, 0, :p].long(), mask)


# --------------------------------------------------------------------------- validation & housekeeping


def test_right_padding_raises(qwen):
    ids = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding"):
        sample(qwen, ids, mask, SamplingConfig(max_new_tokens=2), eos_token_id=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one real token"):
        sample(
            qwen,
            ids,
            torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]),
            SamplingConfig(max_new_tokens=2),
            eos_token_id=1,
            pad_token_id=PAD,
        )
    with pytest.raises(ValueError, match="shape"):
        sample(qwen, ids, mask[:, :3], SamplingConfig(max_new_tokens=2), eos_token_id=1, pad_token_id=PAD)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(do_sample="yes"), "do_sample"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def _argmax_decode(model, ids, mask, max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_new) tokens and their raw log-probs by plain argmax decoding: one full forward (no cache)
    per step over the left-padded batch, positions counted from each row's first real token."""
    seq, m = ids.clone(), mask.clone()
    tokens, logps = [], []
    with torch.no_grad():
        for _ in range(max_new):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1].float()
            nxt = logits.argmax(-1)  # (B,)
            tokens.append(nxt)
            logps.append(torch.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1))
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def test_greedy_ignores_temperature(qwen):
    """Greedy output is the same for every temperature (0 included, which sampling refuses) and any
    top-k / top-p, and equals argmax decoding; its log-probs are those of the raw distribution."""
    ids, mask = _batch()
    max_new, never = 6, VOCAB + 7
    expected, expected_logps = _argmax_decode(qwen, ids, mask, max_new)
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (0.3, 0, 1.0), (1.0, 0, 1.0), (5.0, 2, 0.1)]:
        config = SamplingConfig(max_new_tokens=max_new, do_sample=False, temperature=temperature, top_k=top_k,
                                top_p=top_p)
        out = sample(qwen, ids, mask, config, eos_token_id=never, pad_token_id=PAD)
        assert torch.equal(out.response_ids, expected), (temperature, top_k, top_p)
        torch.testing.assert_close(out.logps, expected_logps, rtol=1e-4, atol=1e-4)
    assert len(set(expected.flatten().tolist())) > 1, "a degenerate model would make the test trivial"


def test_config_mutated_after_construction_is_rechecked(qwen):
    cfg = SamplingConfig()
    cfg.top_p = 2.0
    ids, mask = _batch()
    with pytest.raises(ValueError, match="top_p"):
        sample(qwen, ids, mask, cfg, eos_token_id=1, pad_token_id=PAD)


def test_training_mode_restored():
    model = _tiny("qwen2")
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    ids, mask = _batch()

    model.train()
    model.model.layers[0].eval()  # mixed modes must come back exactly
    before = [m.training for m in model.modules()]
    sample(model, ids, mask, SamplingConfig(max_new_tokens=3), eos_token_id=VOCAB + 7, pad_token_id=PAD)
    assert seen and not any(seen), "generation runs in eval mode"
    assert [m.training for m in model.modules()] == before

    model.eval()
    sample(model, ids, mask, SamplingConfig(max_new_tokens=3), eos_token_id=VOCAB + 7, pad_token_id=PAD)
    assert not any(m.training for m in model.modules())

    # Restored even when generation fails.
    model.train()
    bad = torch.full_like(ids, VOCAB + 5)  # out-of-range ids make the embedding raise
    with pytest.raises(IndexError):
        sample(model, bad, mask, SamplingConfig(max_new_tokens=3), eos_token_id=1, pad_token_id=PAD)
    assert model.training


def test_left_pad_and_rollout_to():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long

    r = Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=torch.tensor([[5, 9], [6, 7]]),
        response_mask=torch.tensor([[1, 0], [1, 1]]),
        logps=torch.tensor([[-1.0, 0.0], [-2.0, -3.0]]),
    )
    assert r.response_lengths.tolist() == [1, 2]
    assert r.sequences.tolist() == [[1, 2, 3, 5, 9], [9, 9, 4, 6, 7]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    moved = r.to("cpu")
    assert isinstance(moved, Rollout) and torch.equal(moved.logps, r.logps)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # softmax([2, 1, 0, -1, -9]) ~ [0.644, 0.237, 0.087, 0.032, 0.000]
        (SamplingConfig(), None),
        (SamplingConfig(top_k=2), [0.731, 0.269, 0.0, 0.0, 0.0]),
        (SamplingConfig(top_p=0.8), [0.731, 0.269, 0.0, 0.0, 0.0]),  # 0.644 < 0.8 <= 0.881
        # top-p on the top-k renormalised probs [0.665, 0.245, 0.090] (as HF): 0.665 >= 0.655 keeps
        # one token, while the unrenormalised 0.644 < 0.655 would keep two.
        (SamplingConfig(top_k=3, top_p=0.655), [1.0, 0.0, 0.0, 0.0, 0.0]),
        (SamplingConfig(temperature=2.0, top_k=2), None),
    ],
    ids=["plain", "top_k", "top_p", "top_k+top_p", "temperature"],
)
def test_sampling_distribution(cfg, expected):
    """Empirical token frequencies of the vectorised selector match the filtered distribution."""
    from lit_align.rollout.sampler import _select

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -9.0]).expand(40_000, 5)
    scaled = logits[0] / cfg.temperature
    if expected is None:
        probs = scaled.softmax(-1)
        if cfg.top_k:
            probs = torch.where(probs >= probs.topk(cfg.top_k).values[-1], probs, 0.0)
        expected = (probs / probs.sum()).tolist()
    tokens, logps = _select(logits, cfg, torch.rand(len(logits), generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.tensor(expected), atol=0.01, rtol=0)
    # Log-probs are always those of the unfiltered, temperature-scaled distribution.
    torch.testing.assert_close(logps, scaled.log_softmax(-1)[tokens])
