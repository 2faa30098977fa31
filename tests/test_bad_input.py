"""Bad configuration or data fails early with a message naming the key or record and the fix.

YAML mistakes go through the real CLI (``cli_main``); data and model mistakes through the
DataModule and model builders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO
from transformers import PreTrainedTokenizerFast

from lit_align.cli import cli_main
from lit_align.data import DataSource, PreferenceDataModule, SFTDataModule
from lit_align.errors import DataError
from lit_align.models import TINY_TOKENIZER, ModelSpec, TinyArch, build_causal_lm, build_tokenizer

DPO_TINY = str(REPO / "configs/dpo/tiny.yaml")
SMALL = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 16}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _setup(cls=SFTDataModule, **kwargs):
    dm = cls(**{"val_fraction": 0.0, "tokenizer": TINY_TOKENIZER, **kwargs})
    dm.setup("fit")
    return dm


def _parse_error(capsys, *args: str) -> str:
    """Run the CLI on the tiny DPO config plus ``args``; it must exit with a parse error. Returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", DPO_TINY, *args, "--print_config"])
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def no_pad_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with an EOS but no pad token (and no ``<|pad|>`` in its vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "<unk>", *"the a cat dog sat on mat is good bad".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("no_pad_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return path


# --------------------------------------------------------------------------- records


def test_missing_field_names_field_record_and_the_fields_mapping(tmp_path):
    rows = [{"prompt": "p", "response": "r"}] * 2 + [{"prompt": "p", "answer": "r"}]
    with pytest.raises(DataError) as err:
        _setup(train=DataSource(_jsonl(tmp_path / "d.jsonl", rows)))
    msg = err.value.args[0]
    assert "record 3 (line 3)" in msg and "missing field 'response'" in msg and "d.jsonl" in msg
    assert "['answer', 'prompt']" in msg  # what the record has
    assert "fields: {response: <column>}" in msg


def test_missing_mapped_column_says_it_came_from_fields(tmp_path):
    source = DataSource(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}]), fields={"response": "answer"})
    with pytest.raises(DataError) as err:
        _setup(train=source)
    assert "missing field 'answer' (mapped from 'answer' by `fields`)" in err.value.args[0]


def test_preference_record_without_prompt_needs_a_conversation(tmp_path):
    with pytest.raises(DataError) as err:
        _setup(PreferenceDataModule, train=DataSource(_jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}])))
    assert "record 1 (line 1): missing field 'prompt'" in err.value.args[0]


@pytest.mark.parametrize("content", ["", "[]", "{\"data\": []}"], ids=["empty-jsonl", "empty-list", "empty-data"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / ("d.jsonl" if content == "" else "d.json")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"data source '.*d\.jsonl?' \(split='train'\) has no records"):
        _setup(train=DataSource(str(path)))


def test_limit_zero_is_an_empty_dataset():
    with pytest.raises(ValueError, match="'builtin:instructions'.*has no records"):
        _setup(train=DataSource("builtin:instructions", limit=0))


@pytest.mark.parametrize(
    ("row", "field", "kind"),
    [
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "int"),
        ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", "NoneType"),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "int"),
        ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "chosen", "list"),
    ],
)
def test_non_string_field(tmp_path, row, field, kind):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, row]
    with pytest.raises(DataError, match=f"record 2 \\(line 2\\): field '{field}' must be a string or a list of chat messages, "
                                        f"got {kind}"):
        _setup(PreferenceDataModule, train=DataSource(_jsonl(tmp_path / "p.jsonl", rows)))


def test_empty_string_field(tmp_path):
    with pytest.raises(ValueError, match=r"record 1 \(line 1\): field 'response' is empty"):
        _setup(train=DataSource(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "  "}])))


def test_invalid_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        _setup(train=DataSource(str(path)))


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(ValueError, match=r"record 2 \(line 2\): expected an object, got list"):
        _setup(train=DataSource(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, ["p", "r"]])))


def test_unsupported_file_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("prompt\tresponse\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'; use \.json, \.jsonl, \.parquet or \.csv"):
        _setup(train=DataSource(str(path)))


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a JSON list of records or \{'data': \[...\]\}"):
        _setup(train=DataSource(str(path)))


@pytest.mark.parametrize("path", ["./no/such/file.jsonl", "missing.parquet"])
def test_missing_data_file(path):
    with pytest.raises(FileNotFoundError, match=f"data source '{path}': no such file"):
        _setup(train=DataSource(path))


def test_prompt_longer_than_max_length_is_truncated_with_a_warning(tmp_path):
    """Documented handling: the prompt is cut from the left, the response survives, the batch fits."""
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [{"prompt": long_prompt, "response": "The short answer."}, {"prompt": "Hi?", "response": "Hello."}]
    dm = _setup(train=DataSource(_jsonl(tmp_path / "d.jsonl", rows)), max_length=24, batch_size=2, shuffle=False)
    assert dm.train_dataset.truncated == 1
    with pytest.warns(UserWarning, match=r"1 of 2 training examples are longer than data\.max_length=24"):
        batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[1] <= 24
    tok = dm.tokenizer
    response = batch.input_ids[0][batch.loss_mask[0].bool()].tolist()
    assert tok.decode(response) == "The short answer.<|endoftext|>"
    prompt = batch.input_ids[0][: batch.loss_mask[0].nonzero()[0].item()].tolist()
    assert tok.decode(prompt).endswith("word199<|end|>\n<|assistant|>\n")  # the end of the prompt is kept


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"max_length": 1}, "data.max_length"), ({"batch_size": 0}, "data.batch_size"),
     ({"val_fraction": 1.0}, "data.val_fraction")],
)
def test_bad_datamodule_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        _setup(train=DataSource("builtin:instructions", limit=4), **kwargs)


def test_val_fraction_that_leaves_no_training_records():
    with pytest.raises(ValueError, match=r"data\.val_fraction=0\.5 leaves no training records out of 1"):
        _setup(train=DataSource("builtin:instructions", limit=1), val_fraction=0.5)


def test_chat_template_requested_without_one(no_pad_tokenizer_dir):
    with pytest.raises(ValueError, match="data.chat_template is true but the tokenizer has no chat template"):
        _setup(train=DataSource("builtin:instructions", limit=4), tokenizer=str(no_pad_tokenizer_dir),
               chat_template=True)


def test_datamodule_without_any_tokenizer():
    dm = SFTDataModule(DataSource("builtin:instructions", limit=4))
    with pytest.raises(ValueError, match="data.tokenizer is not set"):
        dm.setup("fit")


# --------------------------------------------------------------------------- YAML through the CLI


def test_cli_string_where_an_int_is_expected(capsys):
    err = _parse_error(capsys, "--data.init_args.batch_size", "abc")
    assert 'Parser key "batch_size"' in err and "Expected a <class 'int'>. Got value: abc" in err


def test_config_file_string_where_an_int_is_expected(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    max_length: long\n", encoding="utf-8")
    err = _parse_error(capsys, "--config", str(bad))
    assert 'Parser key "max_length"' in err and "Got value: long" in err


def test_config_file_unknown_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batchsize: 4\n", encoding="utf-8")
    assert "batchsize" in _parse_error(capsys, "--config", str(bad))


def test_config_file_negative_model_size(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    model:\n      tiny: {hidden_size: -4}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="model.tiny.hidden_size must be positive, got -4"):
        cli_main(["fit", "--config", DPO_TINY, "--config", str(bad), "--trainer.default_root_dir", str(tmp_path),
                  *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------- model specs and builders


def test_nonexistent_model_path():
    spec = ModelSpec(name_or_path="./does/not/exist")
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path='\./does/not/exist': no such directory"):
        build_tokenizer(spec)
    tok = build_tokenizer(ModelSpec(tiny=TinyArch(**SMALL)))
    with pytest.raises(FileNotFoundError, match=r"model\.name_or_path='\./does/not/exist'"):
        build_causal_lm(spec, tok)


def test_nonexistent_tokenizer_path():
    with pytest.raises(FileNotFoundError, match=r"model\.tokenizer='/no/such/tokenizer'"):
        build_tokenizer(ModelSpec(tiny=TinyArch(), tokenizer="/no/such/tokenizer"))


@pytest.mark.parametrize("kwargs", [{}, {"name_or_path": "org/model", "tiny": TinyArch()}], ids=["neither", "both"])
def test_exactly_one_of_name_or_path_and_tiny(kwargs):
    with pytest.raises(ValueError, match="set exactly one of `name_or_path`.*and `tiny`"):
        ModelSpec(**kwargs)


@pytest.mark.parametrize(("kwargs", "key"), [({"hidden_size": 0}, "model.tiny.hidden_size"),
                                            ({"hidden_size": 10, "num_heads": 4}, "model.tiny: hidden_size")])
def test_bad_tiny_architecture(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TinyArch(**kwargs)


def test_missing_pad_token_eos_reuses_eos_with_a_warning(no_pad_tokenizer_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_align.models.causal_lm"):
        tok = build_tokenizer(ModelSpec(name_or_path=str(no_pad_tokenizer_dir), missing_pad_token="eos"))
    assert tok.pad_token == tok.eos_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    assert "has no pad token: using eos" in caplog.text


def test_missing_pad_token_add_resizes_the_embeddings(no_pad_tokenizer_dir, tmp_path):
    """A saved model whose tokenizer lacks a pad token: 'add' adds ``<|pad|>`` and the loaded model grows by one row.

    The tokenizer is given by ``model.tokenizer``: a tokenizer saved next to a Qwen2 ``config.json`` is
    loaded by transformers as ``Qwen2Tokenizer``, which brings its own pad token.
    """
    plain = build_tokenizer(ModelSpec(name_or_path=str(no_pad_tokenizer_dir)))  # pad = eos
    vocab = len(plain)
    saved = build_causal_lm(ModelSpec(tiny=TinyArch(**SMALL)), plain)
    saved.config.pad_token_id = saved.generation_config.pad_token_id = None  # a checkpoint without pad token
    saved.save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path), tokenizer=str(no_pad_tokenizer_dir), missing_pad_token="add")
    tok = build_tokenizer(spec)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == vocab and len(tok) == vocab + 1
    model = build_causal_lm(spec, tok)
    assert model.get_input_embeddings().num_embeddings == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert model.generation_config.pad_token_id == vocab


def test_missing_pad_token_error_names_the_key(no_pad_tokenizer_dir):
    with pytest.raises(ValueError, match="tokenizer has no pad token; set model.missing_pad_token to 'eos' or 'add'"):
        build_tokenizer(ModelSpec(name_or_path=str(no_pad_tokenizer_dir), missing_pad_token="error"))
