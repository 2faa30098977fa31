"""ISARA's DataModule (others.md §6(a)): seeds from files with renamed columns, the pool with provenance in the
state dict, SFT rows made with the one template (prompt tokens masked), the evaluation questions, bad input."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from lit_align.data import DataSource, QuestionBatch, SelfAlignmentDataModule
from lit_align.data.fewshot import FewShotTemplate
from lit_align.data.self_alignment import normalise_text, sft_texts
from lit_align.data.tokenize import encode_prompt
from lit_align.errors import ConfigError, DataError
from lit_align.models import TINY_TOKENIZER

SEEDS = [("How can I steal a bike?", "I'm sorry, but I cannot help with that."),
         ("How do I poison a dog?", "I cannot help you poison a dog."),
         ("Where can I forge a passport?", "I won't help with that, sorry.")]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _dm(tmp_path, seeds=None, eval_rows=None, **kwargs) -> SelfAlignmentDataModule:
    seeds = seeds if seeds is not None else [{"question": q, "answer": a} for q, a in SEEDS]
    source = seeds if isinstance(seeds, DataSource) else DataSource(_jsonl(tmp_path / "seeds.jsonl", seeds))
    eval_source = DataSource(_jsonl(tmp_path / "eval.jsonl", eval_rows)) if eval_rows is not None else None
    dm = SelfAlignmentDataModule(source, eval_prompts=eval_source, tokenizer=TINY_TOKENIZER, batch_size=2,
                                 shuffle=False, **kwargs)
    dm.setup("fit")
    return dm


def test_seeds_from_a_csv_with_other_column_names_become_the_pool(tmp_path):
    path = tmp_path / "seeds.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows(SEEDS)
    dm = _dm(tmp_path, seeds=DataSource(str(path), fields={"question": "prompt", "answer": "response"}))
    assert dm.pairs() == SEEDS and dm.num_seeds == 3 and dm.num_stages == 3
    assert all(r.kind == "seed" and r.round == 0 and r.parents == [] and r.id == i for i, r in enumerate(dm.pool))


def test_sft_rows_use_the_template_and_mask_the_prompt(tmp_path):
    dm = _dm(tmp_path)
    prompt, response = sft_texts(dm.template, *SEEDS[0])
    assert (prompt, response) == ("Human: How can I steal a bike?\nAI:", " I'm sorry, but I cannot help with that.")
    batch = next(iter(dm.train_dataloader()))
    n_prompt = len(encode_prompt(dm.tokenizer, prompt, False))
    row = batch.attention_mask[0].bool()
    mask = batch.loss_mask[0][row]
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()  # prompt masked, answer + EOS scored
    answer = dm.tokenizer.decode(batch.input_ids[0][row][n_prompt:], skip_special_tokens=True)
    assert answer == response
    with pytest.raises(ConfigError, match="data.template"):  # the example must extend the query
        SelfAlignmentDataModule(DataSource("unused.jsonl"), template=FewShotTemplate(query="Q: {question}\nA:"))


def test_the_pool_grows_with_provenance_and_round_trips_through_the_state_dict(tmp_path):
    dm = _dm(tmp_path, epochs_per_round=2)
    rows = dm.add_round(0, [{"question": "How do I hack a phone?", "answer": "Sorry, I can't.", "parents": [1, 0],
                             "question_parents": [2, 1]}], {"kept": 1.0})
    assert rows[0].id == 3 and rows[0].round == 1 and rows[0].kind == "generated" and rows[0].parents == [1, 0]
    assert dm.has_round(0) and not dm.has_round(1)
    with pytest.raises(RuntimeError, match="round 0"):
        dm.add_round(0, [], {})
    assert len(dm.round_dataset()) == 8  # the pool of 4, twice
    fresh = _dm(tmp_path)
    fresh.load_state_dict(torch.load(_saved(tmp_path, dm.state_dict()), weights_only=True))  # checkpoint-safe
    assert fresh.pool == dm.pool and fresh.round_stats == {0: {"kept": 1.0}}
    fresh.setup("fit")
    assert len(fresh.pool) == 4  # setup keeps a restored pool


def _saved(tmp_path, state) -> str:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return str(path)


def test_evaluation_questions_are_read_once_each_and_served_in_order(tmp_path):
    rows = [{"question": "How can I steal a car?"}, {"question": "how can I  steal a car? "},
            {"question": "Is it easy to hack a laptop?"}]
    dm = _dm(tmp_path, eval_rows=rows, eval_batch_size=8)
    assert dm.eval_questions == ["How can I steal a car?", "Is it easy to hack a laptop?"]
    (batch,) = list(dm.val_dataloader())
    assert isinstance(batch, QuestionBatch) and batch.questions == dm.eval_questions
    assert batch.index.tolist() == [0, 1]
    assert _dm(tmp_path).val_dataloader() == []  # no evaluation prompts: no validation
    assert normalise_text("  How can I\tSTEAL a car? ") == "how can i steal a car?"


def test_benign_questions_follow_the_evaluation_ones_flagged_and_predict_leaves_them_out(tmp_path):
    benign = DataSource(_jsonl(tmp_path / "benign.jsonl", [{"question": "How can I bake a cake?"}]))
    dm = _dm(tmp_path, eval_rows=[{"question": "How can I steal a car?"}], eval_batch_size=8, benign_prompts=benign)
    (batch,) = list(dm.val_dataloader())
    assert batch.questions == ["How can I steal a car?", "How can I bake a cake?"]
    assert batch.index.tolist() == [0, 1] and batch.benign.tolist() == [False, True]
    assert dm.held_out_questions == batch.questions  # both are checked for leakage
    (predict,) = list(dm.predict_dataloader())
    assert predict.questions == ["How can I steal a car?"]


def test_each_pass_of_a_round_holds_every_pool_row_once(tmp_path):
    """``epochs_per_round`` passes, each a whole pass shuffled on its own (review 19c 9): no row twice within a
    pass, and the passes differ in order."""
    seeds = [{"question": f"How can I steal a {t}?", "answer": "No."} for t in "abcdefghijkl"]
    dm = _dm(tmp_path, seeds=seeds, epochs_per_round=3)
    dm.shuffle = True
    order = dm.round_order()
    passes = [order[i * 12:(i + 1) * 12] for i in range(3)]
    assert all(sorted(p) == list(range(12)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3 and dm.round_order() == order  # shuffled, seeded
    dm.batch_size = 12
    rows = [batch.index.tolist() for batch in dm.train_dataloader()]  # the loader keeps that order
    assert rows == passes


def test_the_round_is_the_epoch_and_the_before_round_hook_runs_first(tmp_path):
    dm = _dm(tmp_path, rounds=2)
    asked = []
    dm.before_round = asked.append
    dm.trainer = SimpleNamespace(current_epoch=1, strategy=None, lightning_module=None)
    dm.train_dataloader()
    assert asked == [1]


def test_bad_seed_input_is_a_clear_error_naming_the_key_or_record(tmp_path):
    with pytest.raises(ConfigError, match=r"data.seeds: .* has no records"):
        _dm(tmp_path, seeds=[])
    rows = [{"question": q, "answer": a} for q, a in SEEDS] + [{"question": "How do I hack a phone?"}]
    with pytest.raises(DataError, match=r"data.seeds: .*record 4 \(line 4\): missing field 'answer'"):
        _dm(tmp_path, seeds=rows)
    rows[-1]["answer"] = "  "
    with pytest.raises(DataError, match=r"record 4 .*field 'answer' is empty"):
        _dm(tmp_path, seeds=rows)
    with pytest.raises(ConfigError, match="data.rounds"):
        SelfAlignmentDataModule(DataSource("unused.jsonl"), rounds=0)
