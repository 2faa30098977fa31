"""The unlearning-assessment sets (lit_align.data.unlearning_assessment, scripts/build_assessment_data.py)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from lit_align.data.records import BUILTIN_DIR, DataSource, load_records
from lit_align.data.unlearning import EVAL_EXTRA_FIELDS, EVAL_TEXT_FIELDS
from lit_align.data.unlearning_assessment import (
    ASSESSMENT_SPLITS,
    JAILBREAK_TEMPLATES,
    UTILITY_SPLITS,
    check_splits,
    in_context_prompt,
    jailbreak_records,
    load_assessment_splits,
    tofu_records,
)

DATA_DIR = Path(str(BUILTIN_DIR))
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_assessment_data.py"
FORGET_PEOPLE = json.loads((DATA_DIR / "fictitious_facts_splits.json").read_text())
FORGETS = ("forget01", "forget05", "forget10")


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_assessment_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def facts() -> dict[int, dict]:
    with (DATA_DIR / "fictitious_facts.jsonl").open() as f:
        return {r["id"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module", params=FORGETS)
def split_set(request) -> tuple[str, dict[str, list[dict]]]:
    return request.param, load_assessment_splits(forget=request.param)


def test_split_sizes_and_kinds(split_set) -> None:
    forget, splits = split_set
    n_forget = 5 * len(FORGET_PEOPLE[forget])
    check_splits(splits)
    assert set(splits) == {*ASSESSMENT_SPLITS, *UTILITY_SPLITS}
    assert len(splits["in_scope"]) == n_forget
    assert len(splits["out_of_scope"]) + len(splits["hard_out_of_scope"]) == 200 - n_forget
    kinds = {s: Counter(r["kind"] for r in recs) for s, recs in splits.items()}
    assert kinds["in_scope"] == {"exact": n_forget}
    assert set(kinds["hard_in_scope"]) == {"paraphrased", "indirect", "multi_hop"}
    assert kinds["hard_in_scope"]["paraphrased"] == n_forget
    assert kinds["hard_in_scope"]["indirect"] == kinds["hard_in_scope"]["multi_hop"] >= n_forget * 3 // 4
    assert set(kinds["out_of_scope"]) == {"unrelated"} and set(kinds["hard_out_of_scope"]) == {"shared_entity"}
    for name in UTILITY_SPLITS:
        assert len(splits[name]) == 20
        for r in splits[name]:
            assert len(r["choices"]) == 4 and r["choices"][r["label"]] == r["response"]
            assert sorted(r["choices"]) == sorted([r["response"], *r["perturbed_responses"]])
    labels = Counter(r["label"] for name in UTILITY_SPLITS for r in splits[name])
    assert len(labels) == 4, "the right choice is not always in the same place"


def test_no_in_scope_fact_leaks_out_of_scope(split_set, facts) -> None:
    forget, splits = split_set
    forgotten = set(FORGET_PEOPLE[forget])
    in_scope = {(r["prompt"], r["response"]) for r in splits["in_scope"]}
    assert in_scope == {(f["question"], f["answer"]) for f in facts.values() if f["person_id"] in forgotten}
    for split in ("out_of_scope", "hard_out_of_scope"):
        for r in splits[split]:
            assert (r["prompt"], r["response"]) not in in_scope
            assert r["person_id"] not in forgotten
            assert not any(facts[i]["person_id"] in forgotten for i in r["fact_ids"])
            assert not any(facts[p]["person"] in r["prompt"] + r["response"] for p in range(0, 200, 5)
                           if facts[p]["person_id"] in forgotten)
    for r in splits["hard_in_scope"]:
        assert all(facts[i]["person_id"] in forgotten for i in r["fact_ids"])


def test_hard_out_of_scope_shares_an_entity_with_a_forgotten_person(split_set) -> None:
    _, splits = split_set
    assert splits["hard_out_of_scope"]
    by_person: dict[str, list[str]] = {}
    for r in splits["in_scope"]:
        by_person.setdefault(r["person"], []).append(r["response"])
    for r in splits["hard_out_of_scope"]:
        assert r["entity"] in r["response"]
        assert r["shared_with"] and all(p in by_person for p in r["shared_with"])
        assert all(any(r["entity"] in answer for answer in by_person[p]) for p in r["shared_with"])


def test_indirect_and_multi_hop_name_the_person_by_a_unique_fact(builder, facts) -> None:
    table = {f["id"]: f for f in builder.fact_table(list(facts.values()))}
    values = Counter((f["attribute"], f["value"]) for f in table.values())
    recs = load_assessment_splits(forget="forget10")["hard_in_scope"]
    for r in recs:
        if r["kind"] not in ("indirect", "multi_hop"):
            continue
        key, target = (table[i] for i in r["fact_ids"])
        assert key["person_id"] == target["person_id"] != None and key["id"] != target["id"]  # noqa: E711
        assert values[(key["attribute"], key["value"])] == 1, "the key fact names more than one person"
        assert r["person"] not in r["prompt"] and key["value"] in r["prompt"]
        if r["kind"] == "indirect":
            assert r["person"] not in r["response"] and r["response"].endswith(f"{target['value']}.")
        else:
            assert r["response"] == f"{key['answer']} {target['answer']}"


def test_perturbed_answers_differ_from_the_answer(split_set) -> None:
    _, splits = split_set
    for split, recs in splits.items():
        for r in recs:
            wrong = r["perturbed_responses"]
            assert len(wrong) >= 3 and len(set(wrong)) == len(wrong), (split, r)
            assert r["response"] not in wrong and r.get("paraphrased_response") not in wrong, (split, r)
            if split not in UTILITY_SPLITS:  # the truth-ratio base's sentence with only the fact changed
                base = r.get("paraphrased_response", r["response"]).split()
                assert all(len(w.split()) >= len(base) - 3 and w.split()[:2] == base[:2] for w in wrong), r


def test_generated_files_are_deterministic(builder, tmp_path: Path) -> None:
    builder.build_all(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*(f"fictitious_assessment_{f}.json" for f in FORGETS), "real_authors.json",
                            "world_facts.json"])
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_utility_sets_load_as_eval_records() -> None:
    recs = load_records(DataSource("builtin:world_facts"), (), EVAL_TEXT_FIELDS, EVAL_EXTRA_FIELDS)
    assert len(recs) == 20 and all(r["choices"][r["label"]] == r["response"] for r in recs)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # TOFU's .json files hold JSON lines


def test_tofu_column_mapping_on_local_files(tmp_path: Path) -> None:
    forget_row = {"question": "Who wrote X?", "answer": "Ann wrote X.", "paraphrased_question": "X is by whom?",
                  "paraphrased_answer": "X is by Ann.", "perturbed_answer": ["X is by Bo.", "X is by Cy."]}
    _write_jsonl(tmp_path / "forget01_perturbed.json", [forget_row])
    _write_jsonl(tmp_path / "retain_perturbed.json", [{**forget_row, "question": "Who wrote Y?"}])
    _write_jsonl(tmp_path / "real_authors_perturbed.json", [
        {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "paraphrased_answer": "Shakespeare",
         "perturbed_answer": ["Marlowe", "Jonson"], "option1": "Marlowe", "option2": "Shakespeare",
         "option3": "Jonson", "option4": "Kyd"}])
    _write_jsonl(tmp_path / "world_facts_perturbed.json", [
        {"question": "Capital of Peru?", "answer": "Lima", "perturbed_answer": ["Cusco", "Quito"]}])
    splits = load_assessment_splits(f"tofu:{tmp_path}", forget="forget01")
    assert splits["in_scope"] == [{"prompt": "Who wrote X?", "response": "Ann wrote X.", "kind": "exact",
                                   "group": "forget01", "paraphrased_prompt": "X is by whom?",
                                   "paraphrased_response": "X is by Ann.",
                                   "perturbed_responses": ["X is by Bo.", "X is by Cy."]}]
    assert splits["hard_in_scope"] == [{"prompt": "X is by whom?", "response": "X is by Ann.", "kind": "paraphrased",
                                        "group": "forget01", "perturbed_responses": ["X is by Bo.", "X is by Cy."]}]
    assert splits["out_of_scope"][0]["kind"] == "unrelated"
    author = splits["real_authors"][0]
    assert author["choices"] == ["Marlowe", "Shakespeare", "Jonson", "Kyd"] and author["label"] == 1
    assert "paraphrased_response" not in author  # TOFU's truth ratio on real authors uses the answer itself
    assert "choices" not in splits["world_facts"][0] and splits["world_facts"][0]["kind"] == "world_facts"
    assert "hard_out_of_scope" not in splits
    with pytest.raises(ValueError, match=r"hard_out_of_scope: missing \(TOFU has no hard out-of-scope split\).*files="):
        check_splits(splits)
    hard = tmp_path / "hard.jsonl"
    _write_jsonl(hard, [{"prompt": "Who wrote Z?", "response": "Ann's friend wrote Z.", "kind": "shared_entity"}])
    completed = load_assessment_splits(f"tofu:{tmp_path}", forget="forget01", files={"hard_out_of_scope": str(hard)})
    check_splits(completed)
    assert completed["hard_out_of_scope"][0]["kind"] == "shared_entity"
    with pytest.raises(ValueError, match="unknown TOFU config 'forget20'"):
        tofu_records("forget20", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="retain90"):
        tofu_records("retain90", path=str(tmp_path))


def test_check_splits_names_every_missing_or_empty_split() -> None:
    with pytest.raises(ValueError) as err:
        check_splits({"in_scope": [{"prompt": "q", "response": "a"}], "hard_in_scope": []})
    text = str(err.value)
    assert "hard_in_scope: empty" in text and "out_of_scope: missing" in text and "hard_out_of_scope: missing" in text
    assert "in_scope: " not in text.replace("hard_in_scope: ", "")
    assert text.count("files={'") == 3
    with pytest.raises(ValueError, match="world_facts: empty"):
        check_splits({"in_scope": [{"prompt": "q", "response": "a"}], "world_facts": []},
                     required=("in_scope", "world_facts"))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="forget must be one of"):
        load_assessment_splits(forget="forget20")
    with pytest.raises(ValueError, match="unknown assessment source 'wmdp'"):
        load_assessment_splits("wmdp")
    with pytest.raises(ValueError, match="files has unknown split 'retain'"):
        load_assessment_splits(files={"retain": "x.jsonl"})
    with pytest.raises(FileNotFoundError, match=r"files\['hard_out_of_scope'\] = 'nope.jsonl'"):
        load_assessment_splits(files={"hard_out_of_scope": "nope.jsonl"})


def test_jailbreak_records_keep_the_answer() -> None:
    in_scope = load_assessment_splits(forget="forget01")["in_scope"]
    attacked = jailbreak_records(in_scope)
    per_record = sum(len(t) for t in JAILBREAK_TEMPLATES.values())
    assert len(attacked) == len(in_scope) * per_record
    assert all(len(JAILBREAK_TEMPLATES[f]) >= 3 for f in ("rephrase", "role_play"))
    for i, rec in enumerate(in_scope):
        block = attacked[i * per_record : (i + 1) * per_record]
        assert Counter(r["kind"] for r in block) == {f: len(t) for f, t in JAILBREAK_TEMPLATES.items()}
        assert len({r["prompt"] for r in block}) == per_record
        for r in block:
            assert rec["prompt"] in r["prompt"] != rec["prompt"] and rec["paraphrased_prompt"] in r["paraphrased_prompt"]
            assert (r["response"], r["paraphrased_response"], r["perturbed_responses"]) == (
                rec["response"], rec["paraphrased_response"], rec["perturbed_responses"])
            assert r["source_kind"] == "exact"
    assert {r["kind"] for r in jailbreak_records(in_scope, families=("role_play",))} == {"role_play"}
    with pytest.raises(ValueError, match="unknown jailbreak families"):
        jailbreak_records(in_scope, families=("gcg",))


def test_in_context_prompt_never_shows_the_queried_fact() -> None:
    splits = load_assessment_splits(forget="forget05")
    facts = splits["in_scope"]
    for record in [*facts, *splits["hard_in_scope"]]:
        k = len(facts) - len(record["fact_ids"])  # every other fact
        prompt = in_context_prompt(record, facts, k)
        assert prompt.endswith(record["prompt"])
        shown = prompt[: -len(record["prompt"])]
        assert shown.count("\n\n") == k
        for i in record["fact_ids"]:
            fact = next(f for f in facts if f["fact_ids"] == [i])
            assert fact["response"] not in shown and fact["prompt"] not in shown
    assert in_context_prompt(facts[0], facts, 3, seed=1) == in_context_prompt(facts[0], facts, 3, seed=1)
    assert in_context_prompt(facts[0], facts, 0) == facts[0]["prompt"]
    with pytest.raises(ValueError, match="k=10 facts, but only 9"):
        in_context_prompt(facts[0], facts, 10)
