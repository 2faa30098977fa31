"""QA data for deliberation: every hub layout on local fixtures, answer normalisation, bad records,
the built-in tiny QA set and the DataModule's batches and resumable loader."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import move_data_to_device

from lit_align.data.qa import (
    LETTERS,
    QABatch,
    QADataModule,
    QAExample,
    build_tiny_qa,
    load_qa,
    normalize_answer,
    parse_bbh_options,
    write_tiny_qa,
)
from lit_align.data.records import BUILTIN_DIR, DataSource
from lit_align.data.sampling import ResumableDataLoader
from lit_align.errors import DataError


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _sciq_row(i: int) -> dict:
    return {"question": f"Which gas is number {i}?", "correct_answer": f"right{i}", "distractor1": f"w1_{i}",
            "distractor2": f"w2_{i}", "distractor3": f"w3_{i}", "support": "" if i == 0 else f"Passage {i}."}


def test_qa_example_interface():
    ex = QAExample("Which is red?", "B", "multiple_choice", ["chair", "red"])
    assert ex.options == ("chair", "red") and isinstance(hash(ex), int) and ex.answer_text == "red"
    assert ex.letters == "AB" and ex.wrong_answers == ("A",) and (ex.context, ex.index, ex.source_index) == (None, 0, 0)
    assert QAExample("Is 3 odd?", "yes", "yes_no").wrong_answers == ("no",)
    assert QAExample("What is 2 plus 2?", "4", "numeric").answer_text == "4"
    assert LETTERS == "ABCDEFGHIJ"
    with pytest.raises(ValueError, match="letters 'AB'"):
        QAExample("Q?", "C", "multiple_choice", ("x", "y"))
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        QAExample("Q?", "True", "yes_no")


def test_normalize_answer():
    assert [normalize_answer(v, "yes_no") for v in (True, False, "Yes.", "false", 1, "0")] == \
        ["yes", "no", "yes", "no", "yes", "no"]
    opts = ("a", "b", "c")
    assert [normalize_answer(v, "multiple_choice", opts) for v in (2, "b", "(C)", "A.", "b ")] == ["C", "B", "C", "A", "B"]
    assert normalize_answer("a", "multiple_choice", ("b", "a")) == "A"  # a letter wins over an option's text
    assert normalize_answer("c", "multiple_choice", ("x", "c")) == "B"  # ... when it is one of the options
    assert normalize_answer("y", "multiple_choice", ("x", "y", "z")) == "B"  # the exact text of an option
    assert [normalize_answer(v, "numeric") for v in (7, "7.0", " 1,000 ", "-2.50", 0.5, "1e2")] == \
        ["7", "7", "1000", "-2.5", "0.5", "100"]
    for value, kind, match in [("maybe", "yes_no", "not yes/no"), ("D", "multiple_choice", "outside the 3"),
                               (3, "multiple_choice", "outside the 3"), ("seven", "numeric", "not a number"),
                               ("", "yes_no", "empty"), (True, "numeric", "boolean")]:
        with pytest.raises(ValueError, match=match):
            normalize_answer(value, kind, opts)


def test_qa_format_csv_and_jsonl(tmp_path):
    path = tmp_path / "mine.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["question", "options", "answer", "context"],
                                 ["Which is a fruit?", "chair|pear|cow", "pear", ""],
                                 ["Is 3 odd?", "", "Yes", "Odd numbers."],
                                 ["What is 2 plus 3?", "", "5", ""]])
    a, b, c = load_qa(DataSource(str(path)))
    assert (a.kind, a.options, a.answer, a.context) == ("multiple_choice", ("chair", "pear", "cow"), "B", None)
    assert (b.kind, b.answer, b.context, b.source_index) == ("yes_no", "yes", "Odd numbers.", 1)
    assert (c.kind, c.answer) == ("numeric", "5")
    renamed = _jsonl(tmp_path / "renamed.jsonl", [{"q": "Pick one", "gold": "(A)", "opts": ["x", "y"], "kind": "multiple_choice"}])
    [ex] = load_qa(DataSource(renamed, fields={"question": "q", "answer": "gold", "options": "opts"}), "qa")
    assert (ex.question, ex.answer, ex.options) == ("Pick one", "A", ("x", "y"))


def test_boolq_and_mmlu_layouts(tmp_path):
    boolq = _jsonl(tmp_path / "boolq.jsonl", [
        {"question": "do iran and afghanistan speak the same language", "answer": True, "passage": "Persian ..."},
        {"question": "is the sky green", "answer": False, "passage": "The sky is blue."},
    ])
    a, b = load_qa(DataSource(boolq))  # auto: `passage` -> boolq
    assert (a.kind, a.answer, a.context, b.answer) == ("yes_no", "yes", "Persian ...", "no")
    assert a.question == "do iran and afghanistan speak the same language"
    mmlu = _jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question": "Pick D", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 3},
    ])
    a, b = load_qa(DataSource(mmlu), "mmlu")
    assert (a.kind, a.options, a.answer, a.answer_text, b.answer) == ("multiple_choice", ("3", "4", "5", "6"), "B", "4", "D")
    assert load_qa(DataSource(mmlu)) == [a, b]  # auto: `choices` -> mmlu


def test_hub_id_path_reads_a_local_dataset_folder(tmp_path, monkeypatch):
    """An HF id goes through ``datasets.load_dataset`` with split (here a local folder, offline)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "arc"
    folder.mkdir()
    row = {"id": "x", "question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
           "answerKey": "B"}
    _jsonl(folder / "train.jsonl", [row])
    _jsonl(folder / "test.jsonl", [{**row, "answerKey": "A"}])
    [ex] = load_qa(DataSource(str(folder), split="test"), "arc")
    assert (ex.options, ex.answer) == (("ice", "fire"), "A")


def test_sciq_rotation_varies_the_correct_letter(tmp_path):
    path = _jsonl(tmp_path / "sciq.jsonl", [_sciq_row(i) for i in range(6)])
    examples = load_qa(DataSource(path))  # auto: `correct_answer` -> sciq
    assert [ex.answer for ex in examples] == ["A", "B", "C", "D", "A", "B"]  # never a fixed slot
    for i, ex in enumerate(examples):
        assert ex.kind == "multiple_choice" and len(ex.options) == 4
        assert ex.answer_text == f"right{i}"  # the right text sits at the answer letter
        for k in (1, 2, 3):  # distractor k at LETTERS[(k + i) % 4], as documented
            assert ex.options[(k + i) % 4] == f"w{k}_{i}"
    assert examples[0].context is None and examples[1].context == "Passage 1."


def test_arc_letter_and_digit_labels(tmp_path):
    path = _jsonl(tmp_path / "arc.jsonl", [
        {"question": "Q1", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"question": "Q2", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
        {"question": "Q3", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    ])
    examples = load_qa(DataSource(path))  # auto: `answerKey` -> arc
    assert [ex.answer for ex in examples] == ["C", "D", "A"]
    assert examples[2].options == ("a", "b", "c")
    bad = _jsonl(tmp_path / "bad_arc.jsonl", [
        {"question": "Q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "E"}])
    with pytest.raises(ValueError, match=r"bad_arc.jsonl', record 1 \(line 1\): answerKey 'E' is not one of"):
        load_qa(DataSource(bad), "arc")


def test_bbh_kinds_and_option_parsing(tmp_path):
    date = ("Today is Christmas Eve of 1937. What is the date 10 days ago in MM/DD/YYYY?\nOptions:\n"
            "(A) 12/14/2026\n(B) 12/14/1950\n(C) 12/14/1937\n(D) 07/14/1938")
    question, options = parse_bbh_options(date)
    assert question.endswith("in MM/DD/YYYY?") and options == ("12/14/2026", "12/14/1950", "12/14/1937", "07/14/1938")
    assert parse_bbh_options("Options:\n(A) one\ncontinued\n(B) two") == ("", ("one continued", "two"))
    assert parse_bbh_options("no options here") == ("no options here", ())
    path = _jsonl(tmp_path / "bbh.jsonl", [
        {"input": date, "target": "(C)"},
        {"input": "not ( True ) and ( True ) is", "target": "False"},
        {"input": "Is the argument deductively valid?", "target": "valid"},
        {"input": "Did the man intend it?", "target": "Yes"},
        {"input": "I have a cat and two dogs. How many animals do I have?", "target": "3"},
    ])
    mc, tf, valid, yes, num = load_qa(DataSource(path))  # auto: `input` + `target` -> bbh
    assert (mc.kind, mc.answer, mc.answer_text, mc.question) == ("multiple_choice", "C", "12/14/1937", question)
    assert [(e.kind, e.answer) for e in (tf, valid, yes, num)] == \
        [("yes_no", "no"), ("yes_no", "yes"), ("yes_no", "yes"), ("numeric", "3")]
    free = _jsonl(tmp_path / "dyck.jsonl", [{"input": "Complete: ( [", "target": "] )"}])
    with pytest.raises(ValueError, match=r"dyck.jsonl', record 1 \(line 1\): BBH target .*free-form BBH tasks"):
        load_qa(DataSource(free), "bbh")
    no_block = _jsonl(tmp_path / "noblock.jsonl", [{"input": "Pick one.", "target": "(B)"}])
    with pytest.raises(ValueError, match="no 'Options:' block"):
        load_qa(DataSource(no_block), "bbh")


@pytest.mark.parametrize(("fmt", "row", "match"), [
    ("qa", {"question": "Is 3 odd?", "answer": ""}, r"record 2 \(line 2\): the question has no gold answer"),
    ("qa", {"question": "Is 3 odd?"}, r"record 2 \(line 2\): the question has no gold answer .* is missing"),
    ("boolq", {"question": "is it", "passage": "p", "answer": None}, r"record 2 \(line 2\): the question has no gold answer"),
    ("qa", {"question": "Which?", "answer": "A", "kind": "multiple_choice"}, r"record 2 \(line 2\): a multiple-choice question with no options"),
    ("qa", {"question": "Which?", "answer": "A", "options": [], "kind": "multiple_choice"},
     r"record 2 \(line 2\): a multiple-choice question with no options"),
    ("mmlu", {"question": "Which?", "choices": [], "answer": 0}, r"record 2 \(line 2\): a multiple-choice question with no options"),
    ("qa", {"question": "Which?", "answer": "E", "options": ["x", "y"]}, r"record 2 \(line 2\): answer letter 'E' is outside the 2"),
    ("mmlu", {"question": "Which?", "choices": ["x", "y"], "answer": 5}, r"record 2 \(line 2\): answer index 5 is outside"),
    ("qa", {"question": "Is it?", "answer": "perhaps", "kind": "yes_no"}, r"record 2 \(line 2\): yes/no answer 'perhaps' is not"),
    ("boolq", {"question": "is it", "passage": "p", "answer": "sometimes"}, r"record 2 \(line 2\): yes/no answer"),
    ("qa", {"question": "Who?", "answer": "Ada Lovelace"}, r"record 2 \(line 2\): cannot tell the kind .* free-form"),
    ("qa", {"question": "", "answer": "yes"}, r"record 2 \(line 2\): field 'question' is empty"),
])
def test_bad_records_name_the_record(tmp_path, fmt, row, match):
    good = {"qa": {"question": "Is 2 even?", "answer": "yes"},
            "boolq": {"question": "is it", "passage": "p", "answer": True},
            "mmlu": {"question": "Q", "choices": ["a", "b"], "answer": 0}}[fmt]
    path = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=f"data source '.*bad.jsonl', {match}"):
        load_qa(DataSource(path), fmt)


def test_format_errors(tmp_path):
    with pytest.raises(ValueError, match="data.format must be one of"):
        QADataModule(train=DataSource("builtin:tiny_qa"), format="squad")
    with pytest.raises(ValueError, match="no built-in QA set 'tiny_qa/test'"):
        load_qa(DataSource("builtin:tiny_qa/test"))
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="cannot tell the QA format .* set data.format"):
        load_qa(DataSource(other))
    with pytest.raises(DataError, match="missing field 'question'.*fields: {question: <column>}"):
        load_qa(DataSource(other), "qa")


def test_builtin_files_are_the_generator_output(tmp_path):
    written = write_tiny_qa(tmp_path)
    for path in written:
        assert path.read_bytes() == (Path(str(BUILTIN_DIR)) / path.name).read_bytes(), path.name
    splits = build_tiny_qa()
    train, val = load_qa(DataSource("builtin:tiny_qa")), load_qa(DataSource("builtin:tiny_qa/val"))
    assert train == splits["train"] and val == splits["val"] and (len(train), len(val)) == (400, 80)
    assert not {(e.question, e.options) for e in train} & {(e.question, e.options) for e in val}
    for split in (train, val):
        kinds = Counter(e.kind for e in split)
        assert kinds["yes_no"] == kinds["multiple_choice"] == len(split) // 2
        answers = Counter(e.answer for e in split if e.kind == "yes_no")
        assert answers["yes"] == answers["no"]
        for k in (2, 3, 4):  # given the number of options, every letter is right about equally often
            letters = Counter(e.answer for e in split if len(e.options) == k)
            assert set(letters) == set(LETTERS[:k]) and max(letters.values()) - min(letters.values()) <= 1
        assert all(len(e.question) <= 40 for e in split)
        for e in split:  # each passage states the fact, then the answer as guided prompts write it
            shown = f"{e.answer}) {e.options[LETTERS.index(e.answer)]}" if e.options else e.answer
            assert e.context.endswith(f". So the answer is {shown}."), e


def _dm(**kw) -> QADataModule:
    dm = QADataModule(train=DataSource("builtin:tiny_qa"), **kw)
    dm.setup("fit")
    return dm


def test_datamodule_batches_and_examples():
    dm = _dm(val=DataSource("builtin:tiny_qa/val"), batch_size=4, eval_batch_size=5)
    assert len(dm.examples("train")) == 400 and dm.examples("val") == dm.examples("test")
    assert [e.index for e in dm.examples("val")] == list(range(80))
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, QABatch) and len(batch) == 5
    assert batch.index.tolist() == [0, 1, 2, 3, 4] and batch.examples == dm.examples("val")[:5]
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, QABatch) and moved.examples == batch.examples
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
    split = _dm(val_fraction=0.25)  # a seeded hold-out of train
    assert (len(split.examples("train")), len(split.examples("val"))) == (300, 100)
    assert {e.source_index for e in split.examples("train")}.isdisjoint(e.source_index for e in split.examples("val"))
    assert _dm(val_fraction=0.0).examples("val") == []
    lazy = QADataModule(train=DataSource("builtin:tiny_qa", limit=10), val_fraction=0.0)
    assert len(lazy.examples()) == 10  # sets itself up
    assert dataclasses.is_dataclass(batch.examples[0])


def test_resume_mid_epoch_continues_with_the_next_batch():
    loader = _dm(val_fraction=0.0, batch_size=8).train_dataloader()
    loader.sampler.set_epoch(1)
    seen = []
    for batch in loader:
        seen.append(batch.index.tolist())
        loader.consumed += 1  # what on_after_batch_transfer does when a batch reaches the step
        if len(seen) == 2:
            break
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": 2}
    expected = [b.index.tolist() for b in loader][2:]
    fresh = _dm(val_fraction=0.0, batch_size=8).train_dataloader()
    fresh.load_state_dict(state)
    assert [b.index.tolist() for b in fresh] == expected and len(expected) == 50 - 2
