"""Ranked preference data (Curry-DPO, others.md §9): the pair builder, difficulty levels, the stage loaders, the
sources (local files, UltraFeedback and OASST schemas read through the HF-id path from local files) and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_align.data import DataSource, PreferenceBatch, RankedPreferenceDataModule, build_pairs
from lit_align.data.ranked import assign_levels, curriculum_order
from lit_align.data.tiny_ranked import MAX_QUALITY, gold_quality
from lit_align.errors import ConfigError, DataError
from lit_align.models import TINY_TOKENIZER


def _dm(train: str | DataSource = "builtin:ranked_preferences", *, setup: bool = True, **kwargs):
    source = train if isinstance(train, DataSource) else DataSource(train, limit=kwargs.pop("limit", 40))
    kwargs = {"batch_size": 4, "max_length": 64, "tokenizer": TINY_TOKENIZER, "val_fraction": 0.0, **kwargs}
    dm = RankedPreferenceDataModule(source, **kwargs)
    if setup:
        dm.setup("fit")
    return dm


def _at_epoch(dm: RankedPreferenceDataModule, epoch: int, training: bool = True) -> RankedPreferenceDataModule:
    dm.trainer = SimpleNamespace(current_epoch=epoch, strategy=None, lightning_module=None, training=training)
    return dm


def _served(dm: RankedPreferenceDataModule, epoch: int) -> list[int]:
    """The pair indices the train loader serves at ``epoch``, in order."""
    loader = _at_epoch(dm, epoch).train_dataloader()
    positions = [i for batch in loader for i in batch.index.tolist()]
    assert positions == list(range(len(loader.dataset)))  # index = position in the stage (its reference table)
    return [loader.dataset.rows[i] for i in positions]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- pair builder (§9(g)1)


def test_best_vs_rest_pairs_easiest_first():
    """Ratings [5, 4, 3, 2]: the best against each other one, largest gap first."""
    assert build_pairs([5, 4, 3, 2]) == [(0, 3, 3.0), (0, 2, 2.0), (0, 1, 1.0)]
    assert build_pairs([2, 5, 3, 4]) == [(1, 0, 3.0), (1, 2, 2.0), (1, 3, 1.0)]  # the best found wherever it is


def test_ties_give_no_pair_and_two_responses_one():
    assert build_pairs([4, 4, 2]) == [(0, 2, 2.0)]  # (R1, R2) tied: no pair
    assert build_pairs([3, 3, 3]) == []
    assert build_pairs([1.5, 2.0]) == [(1, 0, 0.5)]  # M = 2: one pair
    assert build_pairs([3, 3, 3], "all_pairs") == build_pairs([3, 3], "best_vs_worst") == []


def test_all_pairs_and_best_vs_worst():
    """[3, 1, 2, 0]: C(4, 2) = 6 pairs by gap (ties in rank order); best vs worst is the single (0, 3)."""
    assert build_pairs([3, 1, 2, 0], "all_pairs") == [(0, 3, 3.0), (0, 1, 2.0), (2, 3, 2.0), (0, 2, 1.0),
                                                      (2, 1, 1.0), (1, 3, 1.0)]
    assert build_pairs([3, 1, 2, 0], "best_vs_worst") == [(0, 3, 3.0)]
    assert build_pairs([1, 1, 2], "all_pairs") == [(2, 0, 1.0), (2, 1, 1.0)]
    with pytest.raises(ConfigError, match="data.pairs"):
        build_pairs([1, 2], "best_vs_median")


def test_levels_per_prompt_and_global():
    """Per prompt: the pair's rank among its prompt's pairs by easiness; an int: equal chunks of all pairs."""
    prompts, easiness = [0, 0, 0, 1, 1], [3.0, 2.0, 1.0, 0.5, 4.0]
    assert assign_levels(prompts, easiness) == [0, 1, 2, 1, 0]
    assert assign_levels(prompts, easiness, 2) == [0, 0, 1, 1, 0]  # sorted: 4.0, 3.0, 2.0 | 1.0, 0.5
    order = curriculum_order([0, 1, 0, 1], [1.0, 5.0, 2.0, 3.0], [0, 1], shuffle_seed=None)
    assert order == [2, 0, 1, 3]  # level 0 then level 1, each easiest first


# --------------------------------------------------------------------------- stages (§9(g)4, §9(h)2 and 4)


def test_iterative_stage_k_serves_only_level_k_easy_to_hard():
    dm = _dm()
    levels = dm.pair_levels()
    gaps = [p.gap for p in dm.pair_table]
    assert dm.num_stages == 3 and dm.num_prompts == 40 and dm.num_pairs == 120
    served = [_served(dm, k) for k in range(3)]
    for k, rows in enumerate(served):
        assert {levels[i] for i in rows} == {k}
        assert sorted(rows) == sorted(i for i, lv in enumerate(levels) if lv == k)  # every level-k pair, once
        assert {gaps[i] for i in rows} == {3.0 - k}  # built-in set: easy (gap 3), medium (2), hard (1)
        assert dm.stage_counts(k) == {"prompts": 40, "pairs": 40}
    assert served[0] != sorted(served[0])  # shuffled within the stage...
    assert _served(dm, 1) == served[1]  # ...seeded: the same order again (exact resume)
    with pytest.raises(ConfigError, match="trainer.max_epochs to 3"):
        _served(dm, 3)
    assert _at_epoch(dm, 3, training=False).current_stage() == 2  # validate / test after a finished fit: the last


def test_non_iterative_is_one_stage_monotone_in_difficulty():
    dm = _dm(curriculum="non_iterative", shuffle_within_stage=False, order="random")
    assert dm.num_stages == 1
    rows = _served(dm, 0)
    levels, easiness = dm.pair_levels(), dm.easiness()
    assert sorted(rows) == list(range(dm.num_pairs))
    assert [levels[i] for i in rows] == sorted(levels[i] for i in rows)  # never back to an easier level
    for a, b in zip(rows, rows[1:]):
        assert levels[a] < levels[b] or easiness[a] >= easiness[b]  # and easiest first within a level
    shuffled = _served(_dm(curriculum="non_iterative", order="random"), 0)
    assert shuffled != rows and [levels[i] for i in shuffled] == [levels[i] for i in rows]  # within levels only
    assert dm.stage_counts(0) == {"prompts": 40, "pairs": 120}  # prompts and pairs counted apart


@pytest.mark.parametrize("replicas", [2, 4])
def test_non_iterative_stage_stays_monotone_on_every_rank(replicas):
    """41 prompts give 123 pairs, which do not divide among 2 or 4 ranks: the sampler pads each rank's share with the
    stage's last (hardest) pairs, so every rank still runs easy to hard (padding with the first pairs, as
    DistributedSampler does, ended one rank's stage on the easiest pair)."""
    dm = _dm(curriculum="non_iterative", shuffle_within_stage=False, order="random", limit=41)
    assert dm.num_pairs % replicas
    levels, easiness = dm.pair_levels(), dm.easiness()
    for rank in range(replicas):
        strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank})
        dm.trainer = SimpleNamespace(current_epoch=0, strategy=strategy, lightning_module=None, training=True)
        loader = dm.train_dataloader()
        rows = [loader.dataset.rows[i] for batch in loader for i in batch.index.tolist()]
        assert len(rows) == math.ceil(dm.num_pairs / replicas)
        for a, b in zip(rows, rows[1:]):
            assert levels[a] < levels[b] or (levels[a] == levels[b] and easiness[a] >= easiness[b]), (rank, a, b)


def test_num_stages_cuts_all_pairs_into_equal_levels():
    dm = _dm(pairs="all_pairs", num_stages=2)
    assert dm.num_pairs == 240 and dm.num_stages == 2
    gaps = [p.gap for p in dm.pair_table]
    first, second = (_served(dm, k) for k in range(2))
    assert len(first) == len(second) == 120
    assert min(gaps[i] for i in first) >= max(gaps[i] for i in second)
    with pytest.raises(ConfigError, match="data.num_stages=500"):
        _dm(num_stages=500)


def test_ref_logprob_margin_order_is_lazy_and_checkpointed():
    """The loader exists (with its length) before the margins; it is ordered when iterated; a larger reference
    margin is easier; the margins travel in the DataModule's state."""
    dm = _dm(order="ref_logprob_margin", shuffle_within_stage=False)
    assert dm.needs_reference_margins
    loader = _at_epoch(dm, 0).train_dataloader()
    assert len(loader) == 10
    with pytest.raises(ConfigError, match="set_reference_margins"):
        next(iter(loader))
    margins = torch.arange(dm.num_pairs, dtype=torch.float32).flip(0) * (-1) ** torch.arange(dm.num_pairs)
    dm.set_reference_margins(margins)
    assert not dm.needs_reference_margins
    rows = [loader.dataset.rows[i] for batch in loader for i in batch.index.tolist()]
    assert len(rows) == 40 and margins[rows].tolist() == sorted(margins[rows].tolist(), reverse=True)
    for prompt in {dm.pair_table[i].prompt for i in rows}:  # each prompt's stage-0 pair: its largest margin
        mine = [j for j, p in enumerate(dm.pair_table) if p.prompt == prompt]
        assert max(margins[mine]) in margins[rows]
    resumed = _dm(order="ref_logprob_margin", shuffle_within_stage=False)
    resumed.load_state_dict(dm.state_dict())
    assert _served(resumed, 2) == _served(dm, 2)
    with pytest.raises(ValueError, match="3 margins for 120"):
        dm.set_reference_margins(torch.zeros(3))


def test_loader_resumes_mid_stage_and_batches_are_preference_batches():
    dm = _dm()
    loader = _at_epoch(dm, 1).train_dataloader()
    batches = list(loader)
    assert isinstance(batches[0], PreferenceBatch)
    loader.consumed = 3
    again = _at_epoch(dm, 1).train_dataloader()
    again.load_state_dict(loader.state_dict())
    assert [b.index.tolist() for b in again] == [b.index.tolist() for b in batches[3:]]
    assert dm.split_loaders()["train"].dataset is loader.dataset  # reference tables score the stage's rows
    assert [i for b in dm.pair_loader() for i in b.index.tolist()] == list(range(dm.num_pairs))


def test_validation_holds_out_whole_prompts():
    dm = _dm(val_fraction=0.25)
    train = {tuple(ex.prompt) for ex in dm.train_dataset}
    val = {tuple(ex.prompt) for ex in dm.val_dataset}
    assert len(val) == 10 and len(dm.val_dataset) == 30 and not train & val


# --------------------------------------------------------------------------- built-in set and its gold quality


def test_builtin_ratings_are_the_gold_quality():
    records = json.loads(Path(str(__import__("lit_align").data.BUILTIN_DIR / "ranked_preferences.json")).read_text())
    assert len(records) == 300 and len({r["prompt"] for r in records}) == 300
    for r in records:
        assert sorted(r["ratings"]) == [0, 1, 2, 3]
        assert r["ratings"] == [gold_quality(r["prompt"], text) for text in r["responses"]]
    assert gold_quality('Echo the word "lamp".', 'The word is "lamp".') == MAX_QUALITY
    assert gold_quality('Echo the word "lamp".', 'The word is "lamb".') == 2.0  # one substitution
    assert gold_quality('Say "lamp" back to me.', 'The word is "lap".') == 2.0  # one deletion
    assert gold_quality('Echo the word "lamp".', 'The word is "clamps".') == 1.0  # two insertions
    assert gold_quality('Echo the word "lamp".', 'The word is "river".') == 0.0
    assert gold_quality('Echo the word "lamp".', 'lamp, "lamp" I said') == 1.5  # not the set's sentence: half
    assert gold_quality('Echo the word "lamp".', "no idea") == 0.0
    with pytest.raises(ValueError, match="not a builtin:ranked_preferences prompt"):
        gold_quality("Hello", "hi")


# --------------------------------------------------------------------------- sources


def _uf_completion(text: str, overall: float, aspects: list[str]) -> dict:
    names = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    return {"response": text, "overall_score": overall,
            "annotations": {n: {"Rating": a, "Rationale": "r"} for n, a in zip(names, aspects)}}


def test_ultrafeedback_schema_through_the_dataset_loader(tmp_path):
    """openbmb/UltraFeedback's layout, read as an HF dataset directory; both rating keys."""
    rows = [
        {"source": "s", "instruction": "Name a colour.", "completions": [
            _uf_completion("Red.", 9.0, ["5", "5", "5", "N/A"]), _uf_completion("Dog.", 2.0, ["1", "2", "1", "2"]),
            _uf_completion("Blue, I think.", 9.0, ["4", "4", "4", "4"]),
            _uf_completion("Hmm.", 5.0, ["2", "2", "3", "3"])]},
        {"source": "s", "instruction": "Say hi.", "completions": [
            _uf_completion("Hi!", 8.0, ["5", "5", "5", "5"]), _uf_completion("Go away.", 3.0, ["1", "1", "1", "1"])]},
    ]
    (tmp_path / "uf").mkdir()
    _write(tmp_path / "uf" / "train.jsonl", rows)
    source = DataSource(str(tmp_path / "uf"))
    fine = _dm(source, format="ultrafeedback")
    # fine-grained means: 5 (N/A skipped), 1.5, 4, 2.5 -> best "Red." vs Dog (3.5), Hmm (2.5), Blue (1)
    assert [(p.prompt, p.chosen, p.rejected, p.gap) for p in fine.pair_table] == [
        (0, 0, 1, 3.5), (0, 0, 3, 2.5), (0, 0, 2, 1.0), (1, 0, 1, 4.0)]
    overall = _dm(source, format="ultrafeedback", rating_key="overall_score")
    assert [(p.chosen, p.rejected, p.gap) for p in overall.pair_table] == [(0, 1, 7.0), (0, 3, 4.0), (0, 1, 5.0)]
    assert overall.num_prompts == 2 and overall.num_pairs == 3  # "Red." and "Blue" tie at 9: no pair


def test_oasst_ranks_become_ratings_on_their_own_scale(tmp_path):
    def msg(mid, parent, role, text, rank=None, **extra):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, **extra}

    rows = [msg("p1", None, "prompter", "What is tea?"),
            msg("a1", "p1", "assistant", "A drink.", 1.0),
            msg("a2", "p1", "assistant", "A hot drink from leaves.", 0.0),
            msg("a3", "p1", "assistant", "No.", 2.0), msg("a4", "p1", "assistant", "Unranked.", None),
            msg("a5", "p1", "assistant", "Deleted.", 3.0, deleted=True),
            msg("p2", "a2", "prompter", "Which leaves?"),
            msg("b1", "p2", "assistant", "Camellia sinensis.", 0.0), msg("b2", "p2", "assistant", "Any.", 1.0)]
    (tmp_path / "oasst").mkdir()
    _write(tmp_path / "oasst" / "train.jsonl", rows)
    source = DataSource(str(tmp_path / "oasst"))
    first = _dm(source, format="oasst")
    # ratings -rank: [-1, -0, -2] -> best a2 (index 1) vs a3 (rank gap 2) then a1 (gap 1)
    assert [(p.chosen, p.rejected, p.gap) for p in first.pair_table] == [(1, 2, 2.0), (1, 0, 1.0)]
    deep = _dm(source, format="oasst", oasst_all_turns=True)
    assert deep.num_prompts == 2 and deep.num_pairs == 3
    prompt = deep.tokenizer.decode(deep.train_dataset[2].prompt)
    assert "What is tea?" in prompt and "A hot drink from leaves." in prompt and "Which leaves?" in prompt


def test_local_file_with_renamed_fields(tmp_path):
    path = _write(tmp_path / "r.jsonl", [{"q": "Pick.", "outs": ["a", "b", "c"], "scores": [0.5, 2.5, 1.0]}])
    dm = _dm(DataSource(path, fields={"prompt": "q", "responses": "outs", "ratings": "scores"}))
    assert [(p.chosen, p.rejected, p.gap) for p in dm.pair_table] == [(1, 0, 2.0), (1, 2, 1.5)]


# --------------------------------------------------------------------------- bad input


def test_a_stage_whose_order_changes_size_is_a_clear_error():
    """A stage is sized before its pairs are ordered (the loader's length); an order that returns another number of
    pairs is refused with the stage and both sizes named (it was a bare assert)."""
    from lit_align.data.ranked import StageDataset

    dm = _dm()
    stage = StageDataset(lambda: [0, 1], 3, dm.train_dataset, 0)
    with pytest.raises(RuntimeError, match="stage 0: the curriculum order holds 2 pairs but the stage was sized 3"):
        stage[0]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["only"], "ratings": [1]}, "has 1 response"),
    ({"prompt": "p", "responses": ["a", "b"], "ratings": ["4", 2]}, "rating 0 is '4', not a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "ratings": [1, math.nan]}, "rating 1 is nan"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ratings": [1, 2]}, "3 responses but 2 ratings"),
    ({"prompt": "p", "responses": ["a", ""], "ratings": [1, 2]}, "response 1 is empty"),
    ({"prompt": "p", "answers": ["a", "b"], "ratings": [1, 2]}, "missing field 'responses'"),
])
def test_bad_records_name_the_record_and_the_fix(tmp_path, record, message):
    good = {"prompt": "q", "responses": ["x", "y"], "ratings": [1, 2]}
    path = _write(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError, match=message) as err:
        _dm(path)
    assert f"data source {path!r}, record 2 (line 2)" in str(err.value) and "skip_invalid" in str(err.value)
    dm = _dm(path, skip_invalid=True)
    assert dm.num_prompts == 1


def test_no_pairs_at_all_is_an_error(tmp_path):
    path = _write(tmp_path / "tied.jsonl", [{"prompt": "q", "responses": ["x", "y"], "ratings": [2, 2]}])
    with pytest.raises(DataError, match="give no preference pairs: every record's ratings are tied"):
        _dm(path)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="data.order"):
        _dm(order="length", setup=False)
    with pytest.raises(ConfigError, match="data.curriculum"):
        _dm(curriculum="mixed", setup=False)
    with pytest.raises(ConfigError, match="data.format"):
        _dm(format="hh", setup=False)
