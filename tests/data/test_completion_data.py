"""TextCompletionDataModule: fixed-length prompts and human continuations, Q&A format, re-tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lit_align.data import DataSource
from lit_align.data.completion import CompletionBatch, TextCompletionDataModule, load_completion_records, retokenize
from lit_align.data.sampling import ResumableDataLoader
from lit_align.models import TINY_TOKENIZER


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _dm(train: DataSource, **kwargs) -> TextCompletionDataModule:
    dm = TextCompletionDataModule(train, **{"batch_size": 4, "tokenizer": TINY_TOKENIZER, "val_fraction": 0.0,
                                            **kwargs})
    dm.setup("fit")
    return dm


def test_builtin_corpus_has_one_text_record_per_line():
    records = load_completion_records(DataSource("builtin:corpus"), ("text",))
    assert len(records) == 400
    assert records[1]["text"] == "Marrowby is the capital of Kestovia. Many people visit it in the morning."
    assert len(load_completion_records(DataSource("builtin:corpus", limit=5), ("text",))) == 5


def test_builtin_corpus_prompts_and_continuations_have_exact_lengths():
    with pytest.warns(UserWarning, match=r"dropped \d+ of 400 records shorter than"):
        dm = _dm(DataSource("builtin:corpus"))
    tok, ds = dm.tokenizer, dm.train_dataset
    lengths = [len(tok(r["text"], add_special_tokens=False)["input_ids"])
               for r in load_completion_records(DataSource("builtin:corpus"), ("text",))]
    assert ds.dropped == sum(n < 16 for n in lengths) > 0 and len(ds) == 400 - ds.dropped
    assert [ex.index for ex in ds] == list(range(len(ds)))
    for ex in ds:
        assert len(ex.prompt) == 8 and len(ex.continuation) == 8  # the tiny tokenizer adds no BOS
        full = tok(load_completion_records(DataSource("builtin:corpus"), ("text",))[ex.source_index]["text"],
                   add_special_tokens=False)["input_ids"]
        assert ex.prompt + ex.continuation == full[:16]
        assert ex.prompt_text == tok.decode(full[:8]) and ex.human_text == tok.decode(full[8:16])

    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, CompletionBatch) and len(batch) == 4
    assert batch.prompt_ids.shape == (4, 8) and batch.prompt_mask.all()
    assert batch.human.input_ids.shape == (4, 16)
    assert batch.human.loss_mask[:, :8].sum() == 0 and batch.human.loss_mask[:, 8:].all()
    assert torch.equal(batch.human.input_ids[:, :8], batch.prompt_ids)
    assert batch.human_text == [ds[i].human_text for i in batch.index.tolist()]


def test_short_records_are_dropped_and_counted_and_all_short_is_an_error(tmp_path):
    rows = [{"text": "Marrowby is the capital of Kestovia. Many people visit it in the morning."},
            {"text": "A hollowgem."},
            {"text": "Wilf walked to the bridge in Spindle and bought grilled fish at noon."}]
    path = _write_jsonl(tmp_path / "docs.jsonl", rows)
    with pytest.warns(UserWarning, match=r"train: dropped 1 of 3 records shorter than data.prompt_tokens"):
        dm = _dm(DataSource(path), prompt_tokens=4, continuation_tokens=6)
    assert len(dm.train_dataset) == 2 and dm.train_dataset.dropped == 1
    assert [ex.source_index for ex in dm.train_dataset] == [0, 2]
    assert all(len(ex.prompt) == 4 and len(ex.continuation) == 6 for ex in dm.train_dataset)
    with pytest.raises(ValueError, match=r"all 3 train records.*data.prompt_tokens / data.continuation_tokens"):
        _dm(DataSource(path), prompt_tokens=32, continuation_tokens=128)


def test_qa_format_templates_prompt_and_appends_eos(tmp_path):
    """PKU style: prompt "### Question: {q}\\n ### Answer:", human " " + response + EOS; the cap cuts
    long responses (then without EOS, as a capped LLM generation); long prompts are dropped."""
    rows = [{"prompt": "What is 7 plus 5?", "response_0": "It is 12."},
            {"prompt": "Name a colour.", "response_0": "Blue is a colour of the sky in the morning and the sea."},
            {"prompt": "Tell me " + "a very long story " * 10, "response_0": "No."}]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 1 of 3 records with prompts longer than data.prompt_tokens = 32"):
        dm = _dm(DataSource(path, fields={"response": "response_0"}), format="qa", prompt_tokens=32,
                 continuation_tokens=8, shuffle=False)
    tok, ds = dm.tokenizer, dm.train_dataset
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first.prompt == tok("### Question: What is 7 plus 5?\n ### Answer:", add_special_tokens=False)["input_ids"]
    assert first.prompt_text == "### Question: What is 7 plus 5?\n ### Answer:"
    assert first.continuation == tok(" It is 12.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first.human_text == " It is 12." + tok.eos_token
    assert len(second.continuation) == 8 and second.continuation[-1] != tok.eos_token_id

    batch = next(iter(dm.train_dataloader()))
    assert batch.prompt_mask[0].tolist() == [0] * (batch.prompt_ids.shape[1] - len(first.prompt)) + [1] * len(first.prompt)
    assert batch.prompt_ids[0, -len(first.prompt):].tolist() == first.prompt  # left-padded
    row = batch.human.input_ids[0][batch.human.loss_mask[0].bool()].tolist()
    assert row == first.continuation

    stripped = _dm(DataSource(path, fields={"response": "response_0"}, limit=1), format="qa", prompt_tokens=32,
                   continuation_tokens=8, strip_leading_whitespace=True)
    assert stripped.train_dataset[0].human_text == "It is 12." + tok.eos_token


def test_append_eos_in_text_format_ends_the_document():
    """Text + EOS: a passage of exactly 15 tokens yields 8 + 7 tokens + EOS at lengths (8, 8)."""
    records = load_completion_records(DataSource("builtin:corpus"), ("text",))
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    i = next(i for i, r in enumerate(records) if len(tok(r["text"], add_special_tokens=False)["input_ids"]) == 15)
    with pytest.warns(UserWarning):
        plain = _dm(DataSource("builtin:corpus"))
    with pytest.warns(UserWarning):
        eos = _dm(DataSource("builtin:corpus"), append_eos=True)
    assert i not in {ex.source_index for ex in plain.train_dataset}
    ex = next(ex for ex in eos.train_dataset if ex.source_index == i)
    assert ex.continuation[-1] == tok.eos_token_id and ex.human_text.endswith(tok.eos_token)
    assert len(eos.train_dataset) > len(plain.train_dataset)


def test_retokenize_treats_human_and_llm_strings_identically():
    """The same string gives the same ids whichever side it came from; EOS text parses to the EOS id;
    a Llama-style leading-space strip applies to every text; max_tokens caps every text."""
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    human = " and Esme meet at the bridge." + tok.eos_token
    llm_ids = tok(human, add_special_tokens=False)["input_ids"]
    llm = tok.decode(llm_ids)
    a, b = retokenize([human, llm], tok)
    assert a == b == llm_ids and a[-1] == tok.eos_token_id
    s_h, s_l = retokenize([human, "and Esme meet at the bridge." + tok.eos_token], tok, strip_leading_whitespace=True)
    assert s_h == s_l
    assert [len(x) for x in retokenize([human, llm], tok, max_tokens=3)] == [3, 3]
    assert retokenize([], tok) == []


def test_resumable_loader_continues_with_the_next_batch():
    with pytest.warns(UserWarning):
        dm = _dm(DataSource("builtin:corpus", limit=120))
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(1)
    seen = []
    for batch in loader:
        seen.append(batch.index.tolist())
        loader.consumed += 1  # what on_after_batch_transfer does when a batch reaches the step
        if len(seen) == 2:
            break
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": 2}
    expected = next(b.index.tolist() for i, b in enumerate(loader) if i == 2)
    with pytest.warns(UserWarning):
        fresh = _dm(DataSource("builtin:corpus", limit=120)).train_dataloader()
    fresh.load_state_dict(state)
    assert next(iter(fresh)).index.tolist() == expected


def test_validation_split_and_fingerprint_are_deterministic():
    with pytest.warns(UserWarning):
        a = _dm(DataSource("builtin:corpus"), val_fraction=0.1)
    with pytest.warns(UserWarning):
        b = _dm(DataSource("builtin:corpus"), val_fraction=0.1)
    assert a.train_dataset.fingerprint() == b.train_dataset.fingerprint()
    assert a.val_dataset.fingerprint() != a.train_dataset.fingerprint()
    assert not {ex.source_index for ex in a.train_dataset} & {ex.source_index for ex in a.val_dataset}
    assert a.test_dataset is a.val_dataset


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="data.prompt_tokens and data.continuation_tokens must be positive"):
        TextCompletionDataModule(DataSource("builtin:corpus"), prompt_tokens=0)
    with pytest.raises(ValueError, match="data.format"):
        TextCompletionDataModule(DataSource("builtin:corpus"), format="chat")
    with pytest.raises(ValueError, match="only a 'text' field"):
        _dm(DataSource("builtin:corpus"), format="qa")
