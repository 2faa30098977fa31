"""GenerationCache keys and persistence, and cached, batch-independent ``generate_texts`` on a tiny HF LM."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_lm

from lit_align.errors import ConfigError, DataError
from lit_align.models import model_fingerprint
from lit_align.retrieval import GenerationCache, GenerationReport, fingerprint_tokenizer, generate_texts
from lit_align.rollout import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.0)
PROMPTS = ["Human: how do I steal a bike?\nAI:", "Human: hello\nAI:", "Human: what is a harbour?\nAI:",
           "Human: tell me about the town and its harbour in the north\nAI:", "Human: hi\nAI:"]


def _key(model: str = "m1", prompt: str = "prompt", sampling: SamplingConfig = SAMPLING, seed: int | None = 3,
         tokenizer: str = "t1") -> str:
    return GenerationCache.key(model, prompt, sampling, seed, tokenizer=tokenizer)


def test_key_changes_with_every_part():
    base = _key()
    assert base == _key(sampling=SamplingConfig(max_new_tokens=6))
    others = [_key(model="m2"), _key(prompt="prompt "), _key(sampling=SamplingConfig(max_new_tokens=6, temperature=0.7)),
              _key(sampling=SamplingConfig(max_new_tokens=6, do_sample=False)), _key(seed=4), _key(seed=None),
              _key(tokenizer="t2")]
    assert len({base, *others}) == 8 and all(len(k) == 64 for k in others)


def test_tokenizer_fingerprint_sees_a_changed_tokenizer(tokenizer):
    """The same weights with another tokenizer setting produce other input ids: another fingerprint, another key."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<extra_marker>"]})
    assert fingerprint_tokenizer(tokenizer) == fingerprint_tokenizer(copy.deepcopy(tokenizer))
    assert fingerprint_tokenizer(other) != fingerprint_tokenizer(tokenizer)


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


def test_resume_after_a_torn_line_keeps_every_later_entry(tmp_path):
    """A kill mid-write, then resumed runs: the torn fragment is cut, so the next appends start on a fresh line and
    every later entry survives two more reloads (they were glued onto the fragment and lost, then a DataError)."""
    path = tmp_path / "cache.jsonl"
    GenerationCache(path).put({"a": "x", "b": "y"})
    path.write_bytes(path.read_bytes()[:-7])  # cut inside record b
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = GenerationCache(path)
    resumed.put({"c": "z"})
    again = GenerationCache(path)
    assert again.state_dict()["entries"] == {"a": "x", "c": "z"}
    again.put({"d": "w"})
    assert GenerationCache(path).state_dict()["entries"] == {"a": "x", "c": "z", "d": "w"}
    path.write_bytes(path.read_bytes()[:-1])  # a whole last record whose newline was never written
    GenerationCache(path).put({"e": "v"})
    assert set(GenerationCache(path).state_dict()["entries"]) == {"a", "c", "d", "e"}


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
        record = json.loads((tmp_path / "gen.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert {k: record[k] for k in ("prompt", "seed", "model")} == {"prompt": PROMPTS[0], "seed": 1,
                                                                          "model": model_fingerprint(model)}
        assert record["sampling"]["temperature"] == 1.0 and record["tokenizer"] == fingerprint_tokenizer(tokenizer)
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
    with pytest.raises(ConfigError, match="seeds: sampled generation"):  # every sample would be one cached text
        generate_texts(model, tokenizer, ["a"], SAMPLING, seeds=None, cache=GenerationCache())


def test_greedy_needs_no_seeds(model, tokenizer):
    greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    assert generate_texts(model, tokenizer, PROMPTS, greedy, seeds=None) == [
        generate_texts(model, tokenizer, [p], greedy, seeds=None)[0] for p in PROMPTS]
    assert torch.is_grad_enabled()


def test_stop_generation_stops_rows_at_a_stop_string(model, tokenizer):
    """With ``stop_generation`` a row stops right after the token that completes a stop string (fewer tokens, the
    same text before it); the cut text equals the full generation's cut; the key includes the stop strings."""
    greedy = SamplingConfig(max_new_tokens=16, do_sample=False)
    full = generate_texts(model, tokenizer, PROMPTS[:2], greedy, seeds=None)
    body = full[0].lstrip()
    words = body.split()
    assert len(words) >= 4, full
    stop = [" " + words[2]]  # a stop string the first row writes mid-way; the second row may not write it
    raw = generate_texts(model, tokenizer, PROMPTS[:2], greedy, seeds=None, stop=stop, stop_generation=True, cut=False)
    n_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (raw[0], full[0])]
    assert stop[0] in raw[0] and n_tokens[0] < n_tokens[1]
    assert full[0].startswith(raw[0]) and raw[1] == full[1]
    cut = generate_texts(model, tokenizer, PROMPTS[:2], greedy, seeds=None, stop=stop, stop_generation=True)
    assert cut == generate_texts(model, tokenizer, PROMPTS[:2], greedy, seeds=None, stop=stop)
    assert _key() != GenerationCache.key("m1", "prompt", SAMPLING, 3, tokenizer="t1", stop=stop)
    assert _key() == GenerationCache.key("m1", "prompt", SAMPLING, 3, tokenizer="t1", stop=())


def test_report_names_each_prompts_key_and_cache_hit(model, tokenizer, tmp_path):
    """review20c #8: generate_texts itself reports which prompts came from the cache (one key rule); the keys of a
    call without ``stop_generation`` leave the stop strings out, so its hits are counted right."""
    from lit_align.retrieval import GenerationReport

    greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    cache = GenerationCache(tmp_path / "c.jsonl")
    first, again = GenerationReport(), GenerationReport()
    generate_texts(model, tokenizer, PROMPTS[:2], greedy, seeds=None, cache=cache, stop=["\n"], report=first)
    generate_texts(model, tokenizer, [PROMPTS[0], PROMPTS[2], PROMPTS[2]], greedy, seeds=None, cache=cache,
                   stop=["\n"], report=again)
    assert first.cached == [False, False] and first.generated == 2
    assert again.cached == [True, False, False] and again.generated == 1
    assert again.keys[0] == first.keys[0] and all(k in cache for k in again.keys)


def test_finish_reason_comes_from_the_sampler_and_is_cached(model, tokenizer, tmp_path):
    """review20c #5: each text's finish reason is the sampler's, exactly: a row whose 2nd greedy token is made the
    EOS token ends "eos" (after 2 tokens), a row that writes a stop string (its 3rd token) ends "stop", the
    third "length"; a reload of the cache file gives the same reasons without generating."""
    import copy

    greedy = SamplingConfig(max_new_tokens=4, do_sample=False)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[4]]
    plain = GenerationReport()
    full = generate_texts(model, tokenizer, prompts, greedy, seeds=None, report=plain)
    assert plain.finish == ["length"] * 3
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in full]
    eos_id, stop_word = tokens[0][1], tokenizer.decode(tokens[1][2:3])
    assert eos_id not in tokens[1] + tokens[2] and stop_word not in full[0] + full[2], "pick other rows"
    eos_tok = copy.deepcopy(tokenizer)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(eos_id)
    cache, report = GenerationCache(tmp_path / "c.jsonl"), GenerationReport()
    texts = generate_texts(model, eos_tok, prompts, greedy, seeds=None, cache=cache, stop=[stop_word],
                           stop_generation=True, cut=False, report=report)
    assert report.finish == ["eos", "stop", "length"], texts
    assert texts == [tokenizer.decode(tokens[0][:2]), tokenizer.decode(tokens[1][:3]), full[2]]
    # re-tokenizing the text (the old rule) would not see that row 3 ran out: its 4 tokens re-tokenize to more
    assert len(tokenizer(full[2], add_special_tokens=False)["input_ids"]) != 4
    again = GenerationReport()
    generate_texts(model, eos_tok, prompts, greedy, seeds=None, cache=GenerationCache(tmp_path / "c.jsonl"),
                   stop=[stop_word], stop_generation=True, cut=False, report=again)
    assert again.cached == [True] * 3 and again.finish == report.finish


class _CountingTokenizer:
    """The real tokenizer, recording the longest id list each ``batch_decode`` call gets."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, []

    def batch_decode(self, ids, **kwargs):
        self.longest.append(max((len(row) for row in ids), default=0))
        return self.tokenizer.batch_decode(ids, **kwargs)


def test_stop_test_decodes_a_tail_window_and_keeps_the_leading_whitespace_rule(tokenizer):
    """review20c #12: after a row has started, each step decodes only a tail window (not the whole response); the
    stop point is the same as a whole-text test's, and a stop string in the leading whitespace does not stop."""
    from lit_align.retrieval.generation import _stop_test

    text = "\n\n" + " ".join(f"word{i}" for i in range(40)) + "\n\nArticle: next"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = _CountingTokenizer(tokenizer)
    stop_when = _stop_test(counting, ("\n\n", "Article:"))
    stops = [next(n for n in range(1, len(ids) + 1) if stop_when(torch.tensor([ids[:n]]), [0]))]
    whole = [n for n in range(1, len(ids) + 1)
             if any(s in tokenizer.decode(ids[:n]).lstrip() for s in ("\n\n", "Article:"))]
    assert stops[0] == whole[0] and tokenizer.decode(ids[:stops[0]]).endswith("word39\n\n")
    window = 4 * len("Article:") + 4  # one decode per step: the whole text until the window is past the start
    assert len(counting.longest) == stops[0] and stops[0] > 2 * window
    assert counting.longest[window - 1] == window and max(counting.longest[window + 4:]) == window
