"""Record loading: every local format, built-ins, field mapping, ``limit``, chat records, local HF datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_align.data import DataSource, load_records
from lit_align.errors import DataError

ROWS = [
    {"prompt": "What is 2 plus 2?", "response": "4."},
    {"prompt": "Name a colour.", "response": "Blue, with a comma."},
    {"prompt": "Quote \"this\".", "response": "Line one\nline two."},
]



def _without_source(records: list[dict], path: str) -> list[dict]:
    """Records name their source; check it, then compare the rest."""
    assert all(r["_source"] == path for r in records)
    return [{k: v for k, v in r.items() if k != "_source"} for r in records]

def _write(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format named by ``path``'s suffix (``.data.json`` for ``{"data": [...]}``)."""
    if path.name.endswith(".data.json"):
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")  # blank line ignored
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(path)
    return path


@pytest.mark.parametrize("name", ["rows.json", "rows.data.json", "rows.jsonl", "rows.csv", "rows.parquet"])
def test_each_local_format_loads_the_same_records(tmp_path, name):
    path = str(_write(tmp_path / name, ROWS))
    records = _without_source(load_records(DataSource(path), ["prompt", "response"]), path)
    assert records == [{"_source_index": i, **r} for i, r in enumerate(ROWS)]


def test_extra_columns_are_dropped_and_optional_fields_kept_when_present(tmp_path):
    rows = [{"prompt": "p0", "response": "r0", "id": 7, "note": "n"}, {"prompt": "p1", "response": "r1"}]
    path = str(_write(tmp_path / "x.jsonl", rows))
    records = _without_source(load_records(DataSource(path), ["prompt", "response"], ["note"]), path)
    assert records == [
        {"_source_index": 0, "prompt": "p0", "response": "r0", "note": "n"},
        {"_source_index": 1, "prompt": "p1", "response": "r1"},
    ]


@pytest.mark.parametrize(
    ("name", "required", "count"),
    [
        ("instructions", ["prompt", "response"], 300),
        ("preferences", ["prompt", "chosen", "rejected"], 300),
        ("fictitious_facts", ["question", "answer"], 200),
    ],
)
def test_builtin_datasets_load(name, required, count):
    records = load_records(DataSource(f"builtin:{name}"), required)
    assert len(records) == count
    assert [r["_source_index"] for r in records] == list(range(count))
    assert all(isinstance(r[k], str) and r[k] for r in records for k in required)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ValueError, match="no built-in dataset 'instruction'") as err:
        load_records(DataSource("builtin:instruction"), ["prompt"])
    for known in ("fictitious_facts", "instructions", "preferences", "ranked_preferences"):
        assert repr(known) in str(err.value)
    assert "fictitious_facts_splits" not in str(err.value)  # a .json built-in that is not records


def test_field_mapping_renames_columns(tmp_path):
    rows = [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]
    source = DataSource(str(_write(tmp_path / "qa.csv", rows)), fields={"prompt": "question", "response": "answer"})
    assert _without_source(load_records(source, ["prompt", "response"]), source.path) == [
        {"_source_index": 0, "prompt": "q0", "response": "a0"},
        {"_source_index": 1, "prompt": "q1", "response": "a1"},
    ]


def test_limit_keeps_the_first_records():
    full = load_records(DataSource("builtin:instructions"), ["prompt", "response"])
    assert load_records(DataSource("builtin:instructions", limit=5), ["prompt", "response"]) == full[:5]


def test_conversational_records(tmp_path):
    """Message lists pass as text fields; an absent or null optional prompt is left out."""
    user = {"role": "user", "content": "Hi"}

    def reply(text):
        return [user, {"role": "assistant", "content": text}]

    rows = [
        {"chosen": reply("Hello!"), "rejected": reply("Go.")},
        {"prompt": None, "chosen": reply("Hey."), "rejected": reply("No.")},
        {"prompt": [user], "chosen": "Hello.", "rejected": "Bye."},
    ]
    records = load_records(DataSource(str(_write(tmp_path / "chat.jsonl", rows))), ["chosen", "rejected"], ["prompt"])
    assert "prompt" not in records[0] and "prompt" not in records[1]
    assert records[0]["chosen"] == rows[0]["chosen"]
    assert records[2]["prompt"] == [user]


def test_local_hf_dataset_folder_loads_offline(tmp_path, monkeypatch):
    """A directory of data files is an HF dataset id that ``datasets.load_dataset`` reads without network."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"q": "q0", "a": "a0"}, {"q": "q1", "a": "a1"}])
    _write(folder / "test.jsonl", [{"q": "t0", "a": "b0"}])
    fields = {"prompt": "q", "response": "a"}
    train = load_records(DataSource(str(folder), fields=fields), ["prompt", "response"])
    test = _without_source(load_records(DataSource(str(folder), split="test", fields=fields), ["prompt", "response"]),
                           str(folder))
    assert [r["prompt"] for r in train] == ["q0", "q1"]
    assert test == [{"_source_index": 0, "prompt": "t0", "response": "b0"}]
    with pytest.raises(ValueError, match="split='validation'"):
        load_records(DataSource(str(folder), split="validation", fields=fields), ["prompt", "response"])


def test_templates_build_a_field_from_several_columns(tmp_path):
    rows = [{"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
            {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    path = _write(tmp_path / "alpaca.jsonl", rows)
    source = DataSource(str(path), templates={"prompt": "{instruction}\n\n{input}"}, fields={"response": "output"})
    records = load_records(source, ["prompt", "response"])
    assert [r["prompt"] for r in records] == ["Summarise.\n\nA long text.", "Say hi."]  # no trailing blank lines
    assert [r["response"] for r in records] == ["Short.", "Hi."]
    bad = DataSource(str(path), templates={"prompt": "{instr}"}, fields={"response": "output"})
    with pytest.raises(DataError, match=r"record 1 \(line 1\): template for 'prompt' names column 'instr'"):
        load_records(bad, ["prompt", "response"])


def test_a_limited_hf_dataset_is_streamed_not_converted_whole(tmp_path, monkeypatch):
    """An HF dataset (here a local dataset directory, read by ``datasets.load_dataset``) with ``limit`` is
    streamed: the first ``limit`` rows come back and no Arrow conversion of the split is written to the
    datasets cache; without ``limit`` the whole split is converted (and cached) as before."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    limited = load_records(DataSource(path=str(folder), limit=3), required=("prompt", "response"))
    assert [r["prompt"] for r in limited] == ["p0", "p1", "p2"]
    assert not list(cache.rglob("*.arrow")), "limit must not convert the whole split"
    whole = load_records(DataSource(path=str(folder)), required=("prompt", "response"))
    assert len(whole) == 50 and list(cache.rglob("*.arrow"))
