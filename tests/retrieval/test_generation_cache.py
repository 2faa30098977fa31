"""GenerationCache keys and persistence, and cached, batch-independent ``generate_texts`` on a tiny HF LM."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_lm

from lit_align.errors import ConfigError, DataError
from lit_align.models import model_fingerprint
from lit_align.retrieval import GenerationCache, generate_texts
from lit_align.rollout import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.0)
PROMPTS = ["Human: how do I steal a bike?\nAI:", "Human: hello\nAI:", "Human: what is a harbour?\nAI:",
           "Human: tell me about the town and its harbour in the north\nAI:", "Human: hi\nAI:"]


def test_key_changes_with_every_part():
    base = GenerationCache.key("m1", "prompt", SAMPLING, 3)
    assert base == GenerationCache.key("m1", "prompt", SamplingConfig(max_new_tokens=6), 3)
    others = [GenerationCache.key("m2", "prompt", SAMPLING, 3), GenerationCache.key("m1", "prompt ", SAMPLING, 3),
              GenerationCache.key("m1", "prompt", SamplingConfig(max_new_tokens=6, temperature=0.7), 3),
              GenerationCache.key("m1", "prompt", SamplingConfig(max_new_tokens=6, do_sample=False), 3),
              GenerationCache.key("m1", "prompt", SAMPLING, 4), GenerationCache.key("m1", "prompt", SAMPLING, None)]
    assert len({base, *others}) == 7 and all(len(k) == 64 for k in others)


def test_put_get_persist_and_reload(tmp_path):
    path = tmp_path / "sub" / "cache.jsonl"
    cache = GenerationCache(path)
    assert len(cache) == 0 and cache.get("a") is None
    cache.put({"a": "first", "b": "sé\ncond"})
    cache.put({"a": "first"})  # unchanged: not written again
    assert cache.get("b") == "sé\ncond" and len(cache) == 2
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    again = GenerationCache(path)
    assert again.get("a") == "first" and again.get("b") == "sé\ncond" and len(again) == 2

    memory = GenerationCache()
    memory.load_state_dict(again.state_dict())
    assert memory.state_dict() == {"entries": {"a": "first", "b": "sé\ncond"}}


def test_torn_last_line_is_skipped_and_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "text": "x"}) + "\n" + '{"key": "b", "te', encoding="utf-8")
    with pytest.warns(UserWarning, match="torn last line"):
        assert GenerationCache(path).get("a") == "x"
    path.write_text('{"key": 1\n' + json.dumps({"key": "a", "text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cache.jsonl, line 1"):
        GenerationCache(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_lm("qwen2", vocab_size=len(tokenizer), hidden_size=32, seed=0)


def test_texts_do_not_depend_on_batching(model, tokenizer):
    """Row i draws from its own generator seeded from seeds[i]: the same texts in one batch, in batches of 2
    and one at a time; another seed gives another text."""
    seeds = [11, 12, 13, 14, 15]
    batched = generate_texts(model, tokenizer, PROMPTS, SAMPLING, seeds=seeds)
    pairs = generate_texts(model, tokenizer, PROMPTS, SAMPLING, seeds=seeds, batch_size=2)
    alone = [generate_texts(model, tokenizer, [p], SAMPLING, seeds=[s])[0] for p, s in zip(PROMPTS, seeds)]
    assert batched == pairs == alone
    assert len(set(batched)) > 1 and all(isinstance(t, str) for t in batched)
    reseeded = generate_texts(model, tokenizer, PROMPTS, SAMPLING, seeds=[s + 100 for s in seeds])
    assert reseeded != batched


def test_cache_hits_run_no_forward_and_stop_strings_cut(model, tokenizer, tmp_path):
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        cache = GenerationCache(tmp_path / "gen.jsonl")
        seeds = [1, 2, 3, 4, 5]
        first = generate_texts(model, tokenizer, PROMPTS, SAMPLING, seeds=seeds, cache=cache, batch_size=2)
        assert len(calls) > 0 and len(cache) == 5
        calls.clear()
        reloaded = GenerationCache(tmp_path / "gen.jsonl")
        again = generate_texts(model, tokenizer, PROMPTS, SAMPLING, seeds=seeds, cache=reloaded,
                               model_fingerprint=model_fingerprint(model))
        assert again == first and calls == []
        # one new prompt: only it is generated; a repeated (prompt, seed) is generated once
        more = generate_texts(model, tokenizer, PROMPTS[:2] + ["Human: a cat\nAI:"] * 2, SAMPLING,
                              seeds=[1, 2, 9, 9], cache=reloaded)
        assert more[:2] == first[:2] and more[2] == more[3] and len(reloaded) == 6 and calls
        cut_at = first[0][2:4]
        assert len(cut_at) == 2
        cut = generate_texts(model, tokenizer, PROMPTS[:1], SAMPLING, seeds=[1], cache=reloaded, stop=cut_at)
        assert cut == [first[0][: first[0].find(cut_at)]]
    finally:
        hook.remove()


def test_bad_generation_arguments_name_the_key(model, tokenizer):
    with pytest.raises(ConfigError, match="seeds: 1 seeds for 2 prompts"):
        generate_texts(model, tokenizer, ["a", "b"], SAMPLING, seeds=[1])
    with pytest.raises(ConfigError, match="seeds must be ints >= 0"):
        generate_texts(model, tokenizer, ["a"], SAMPLING, seeds=[-1])
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        generate_texts(model, tokenizer, ["a"], SAMPLING, seeds=None, batch_size=0)


def test_greedy_needs_no_seeds(model, tokenizer):
    greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    assert generate_texts(model, tokenizer, PROMPTS, greedy, seeds=None) == [
        generate_texts(model, tokenizer, [p], greedy, seeds=None)[0] for p in PROMPTS]
    assert torch.is_grad_enabled()
