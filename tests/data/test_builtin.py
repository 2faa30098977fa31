"""Tests for the built-in tiny datasets and the bundled tiny tokenizer (package data).

Checks the documented schemas of ``lit_align/data/builtin``, the properties of
``lit_align/models/assets/tiny_tokenizer`` and that both generator scripts in
``scripts/`` reproduce the shipped files byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

DATA_DIR = Path(str(files("lit_align") / "data/builtin"))
TOKENIZER_DIR = Path(str(files("lit_align") / "models/assets/tiny_tokenizer"))
SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"

GENERATED_DATA_FILES = [
    "instructions.jsonl",
    "preferences.jsonl",
    "fictitious_facts.jsonl",
    "fictitious_facts_splits.json",
    "ranked_preferences.json",
    "corpus.txt",
]
JSONL_SCHEMAS: dict[str, tuple[int, dict[str, type]]] = {
    "instructions.jsonl": (300, {"prompt": str, "response": str}),
    "preferences.jsonl": (300, {"prompt": str, "chosen": str, "rejected": str}),
    "fictitious_facts.jsonl": (
        200,
        {
            "id": int,
            "person_id": int,
            "person": str,
            "question": str,
            "answer": str,
            "paraphrased_question": str,
            "paraphrased_answer": str,
            "perturbed_answers": list,
        },
    ),
}
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def read_jsonl(name: str) -> list[dict[str, Any]]:
    """Parse one built-in jsonl file."""
    with (DATA_DIR / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_script(name: str, *args: str | Path) -> None:
    """Run a generator script from ``scripts/`` in a fresh interpreter."""
    subprocess.run([sys.executable, str(SCRIPTS_DIR / name), *map(str, args)], check=True)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# --------------------------------------------------------------------------- data files


@pytest.mark.parametrize("name", sorted(JSONL_SCHEMAS))
def test_jsonl_schema(name: str) -> None:
    count, schema = JSONL_SCHEMAS[name]
    records = read_jsonl(name)
    assert len(records) == count
    for record in records:
        assert list(record) == list(schema)
        for key, kind in schema.items():
            assert type(record[key]) is kind, (key, record)
            if kind is str:
                assert record[key].strip(), (key, record)


def test_prompts_are_unique() -> None:
    for name in ("instructions.jsonl", "preferences.jsonl"):
        prompts = [r["prompt"] for r in read_jsonl(name)]
        assert len(set(prompts)) == len(prompts), name


def test_preferences_differ() -> None:
    assert all(r["chosen"] != r["rejected"] for r in read_jsonl("preferences.jsonl"))


def test_fictitious_facts() -> None:
    records = read_jsonl("fictitious_facts.jsonl")
    assert [r["id"] for r in records] == list(range(len(records)))
    names: dict[int, str] = {}
    for r in records:
        assert names.setdefault(r["person_id"], r["person"]) == r["person"]
        perturbed = r["perturbed_answers"]
        assert len(perturbed) >= 3
        assert all(isinstance(p, str) and p.strip() for p in perturbed)
        assert len(set(perturbed)) == len(perturbed)
        assert r["answer"] not in perturbed
        assert r["person"] in r["question"] and r["person"] in r["answer"]
    assert sorted(names) == list(range(len(names)))
    assert len(set(names.values())) == len(names)


def test_fictitious_facts_splits() -> None:
    splits = json.loads((DATA_DIR / "fictitious_facts_splits.json").read_text(encoding="utf-8"))
    assert list(splits) == ["forget01", "forget05", "forget10"]
    people = {r["person_id"] for r in read_jsonl("fictitious_facts.jsonl")}
    for ids in splits.values():
        assert ids and all(isinstance(i, int) for i in ids)
        assert len(set(ids)) == len(ids)
        assert set(ids) < people  # nonempty retain set
    assert set(splits["forget01"]) <= set(splits["forget05"]) <= set(splits["forget10"])


def test_corpus() -> None:
    lines = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 600
    assert all(line.strip() for line in lines)
    assert len(set(lines)) == len(lines)


def test_data_script_is_deterministic(tmp_path: Path) -> None:
    run_script("build_builtin_data.py", "--out", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(GENERATED_DATA_FILES)
    for name in GENERATED_DATA_FILES:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == 1024
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 2048
    assert tokenizer.tokenize("<|user|>hi<|end|>")[0] == "<|user|>"


@pytest.mark.parametrize(
    "text",
    [
        "Mira Ironwood was born in Nettleby.",
        "  leading and trailing spaces  \n\ttab, newline\r\n",
        "Ünïcödé café, 日本語, emoji 🙂 and dashes — done",
        "<|user|>\nhi<|end|>\n<|assistant|>\n",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_efficient_on_builtin_data(tokenizer: PreTrainedTokenizerBase) -> None:
    text = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8")
    assert len(tokenizer(text)["input_ids"]) < len(text.encode("utf-8")) / 3


def test_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 7 plus 5?"},
        {"role": "assistant", "content": "7 plus 5 is 12."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 7 plus 5?<|end|>\n<|assistant|>\n7 plus 5 is 12.<|end|>\n"
    )
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert encoded["input_ids"] == tokenizer(text)["input_ids"]
    assert encoded["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|user|>")


def test_tokenizer_dir_is_small() -> None:
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 200_000


def test_tokenizer_script_is_deterministic(tmp_path: Path) -> None:
    run_script("build_tokenizer.py", "--data", DATA_DIR, "--out", tmp_path)
    shipped = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
