"""Errors a person can read, the tiny -> real model switch, and help that documents (issue 14).

A known configuration or data error is one message with exit code 2, before any logger starts; an unknown
key names the closest accepted one; record numbers count from 1 with the file line; a path that can only be
local fails at once; examples cut to ``data.max_length`` are counted for every split; ``--<spec>.name_or_path``
replaces a config's ``tiny``; ``--help`` lists lit_align's classes and every spec field's docstring.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO

import lit_align.data
import lit_align.methods
from lit_align.cli import cli_main, main
from lit_align.cli_parser import model_override_args
from lit_align.data import DataSource, SFTDataModule, load_records
from lit_align.data.records import describe_record
from lit_align.errors import ConfigError, DataError, MissingPathError
from lit_align.models import TINY_TOKENIZER, ModelSpec, TinyArch, build_causal_lm, build_tokenizer

DPO_TINY = str(REPO / "configs/dpo/tiny.yaml")
SFT_TINY = str(REPO / "configs/sft/tiny.yaml")
WATERMARK_TINY = str(REPO / "configs/watermark/tiny.yaml")
SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``lit-align ARGS`` in-process through the console entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lit-align", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def _stdout_of(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny HF model and the bundled tokenizer written by ``save_pretrained`` (what a real model dir holds)."""
    path = tmp_path_factory.mktemp("my_model")
    tokenizer = build_tokenizer(ModelSpec(tiny=TinyArch()))
    build_causal_lm(ModelSpec(tiny=TinyArch(**SMALL)), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- one message, exit 2, early


def test_data_error_is_one_message_with_exit_2_before_wandb_starts(tmp_path, monkeypatch, capsys):
    """A bad record of a W&B run: one line naming the record (1-based, with its line), exit code 2, and no W&B
    run directory (the data is checked before any logger starts). ``--debug`` brings the traceback back."""
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    rows = [{"chosen": "a", "rejected": "b", "prompt": "p"}] * 5 + [{"prompt": "p", "chosen": "a"}]
    bad = _jsonl(tmp_path / "prefs.jsonl", rows)
    args = ["fit", "-c", DPO_TINY, "--data.init_args.train.path", bad, "--trainer.default_root_dir", str(tmp_path)]
    code, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in err and err.count("error:") == 1
    assert "record 6 (line 6): missing field 'rejected'" in err
    assert not any(wandb_dir.iterdir()), "a W&B run was started before the data was checked"
    monkeypatch.setattr(sys, "argv", ["lit-align", *args, "--debug"])
    with pytest.raises(DataError, match=r"record 6 \(line 6\)"):  # raised as it is: Python prints its traceback
        main()
    assert not any(wandb_dir.iterdir())


def test_known_error_through_a_real_process(tmp_path):
    """The console script: a config error jsonargparse wraps three times prints one message (naming the class
    that refused the value), exit code 2; ``LIT_ALIGN_DEBUG=1`` shows the traceback."""
    exe = Path(sys.executable).with_name("lit-align")
    args = [str(exe), "fit", "-c", DPO_TINY, "--model.init_args.loss.init_args.beta", "-1",
            "--trainer.default_root_dir", str(tmp_path), *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LIT_ALIGN_DEBUG", None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: DPOLoss: beta must be a finite number > 0, got -1.0"], proc.stderr[-3000:]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**env, "LIT_ALIGN_DEBUG": "1"},
                          cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "beta must be a finite number" in proc.stderr


@pytest.mark.parametrize(("extra", "expected"), [
    (["--model.init_args.loss.init_args.bta", "1"], "DPOLoss has no option 'bta'; did you mean 'beta'?"),
    (["--model.init_args.model.tiny.hiden_size", "8"], "TinyArch has no option 'hiden_size'; did you mean 'hidden_size'?"),
    (["--data.init_args.train.pth", "x"], "DataSource has no option 'pth'; did you mean 'path'?"),
    ("trainr:\n  max_steps: 3\n", "unknown option 'trainr.max_steps'; did you mean 'trainer.max_steps'?"),
    ("data:\n  init_args:\n    batchsize: 4\n", "has no option 'batchsize'; did you mean 'batch_size'?"),
], ids=["cli-loss", "cli-tiny", "cli-source", "yaml-top", "yaml-data"])
def test_unknown_key_suggests_the_closest_one_in_a_short_message(extra, expected, tmp_path, capsys):
    if isinstance(extra, str):
        (tmp_path / "bad.yaml").write_text(extra, encoding="utf-8")
        extra = ["-c", str(tmp_path / "bad.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", DPO_TINY, *extra, "--print_config"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in err
    assert len(err.splitlines()) <= 4 and "usage:" not in err  # no dump of every trainer flag


# --------------------------------------------------------------------------- records, paths, max_length


def test_record_numbers_count_from_one_with_the_line(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,response\np,r\n"multi\nline",r\np,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"record 3 \(line 5\): field 'response' is empty"):
        load_records(DataSource(str(csv_path)), ["prompt", "response"])
    assert describe_record("builtin:instructions", 0) == "data source 'builtin:instructions', record 1 (line 1)"
    assert describe_record("org/hub_dataset", 4) == "data source 'org/hub_dataset', record 5"


def test_paths_that_can_only_be_local_fail_at_once(tmp_path, monkeypatch):
    """No hub look-up (a minute of retries when online) for what is meant as a local path, and an offline miss
    names HF_HUB_OFFLINE."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "mydata.jsonl").write_text('{"prompt": "p", "response": "r"}\n', encoding="utf-8")
    (tmp_path / "models").mkdir()
    start = time.perf_counter()
    with pytest.raises(MissingPathError, match=r"data source 'data/train': no such file or directory"):
        load_records(DataSource("data/train"), ["prompt"])
    with pytest.raises(MissingPathError, match=r"did you mean 'mydata\.jsonl'\?"):
        load_records(DataSource("mydata"), ["prompt"])
    with pytest.raises(MissingPathError, match=r"model\.name_or_path='models/mine': no such directory"):
        build_tokenizer(ModelSpec(name_or_path="models/mine"))
    assert time.perf_counter() - start < 5
    # as in a process started with HF_HUB_OFFLINE=1 (huggingface_hub and datasets read it once, at import)
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(MissingPathError, match="HF_HUB_OFFLINE is set"):
        load_records(DataSource("no-such-org/no-such-dataset"), ["prompt"])
    with pytest.raises(MissingPathError, match=r"model\.name_or_path='no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        build_tokenizer(ModelSpec(name_or_path="no-such-org/no-such-model"))
    assert time.perf_counter() - start < 5


def test_cut_examples_are_counted_for_every_split_and_no_room_is_refused(tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    rows = [{"prompt": long_prompt, "response": "Yes."}, {"prompt": "Hi?", "response": "Hello."}]
    source = DataSource(_jsonl(tmp_path / "d.jsonl", rows))
    dm = SFTDataModule(train=source, val=source, test=source, max_length=32, tokenizer=TINY_TOKENIZER)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record]
    assert any("1 of 2 validation examples are longer than data.max_length=32" in m for m in messages)
    assert any("1 of 2 test examples are longer than data.max_length=32" in m for m in messages)
    dm = SFTDataModule(train=source, val_fraction=0.0, max_length=4, tokenizer=TINY_TOKENIZER, chat_template=True)
    with pytest.raises(ConfigError, match=r"data\.max_length=4 leaves no room for a response: the chat template"):
        dm.setup("fit")


# --------------------------------------------------------------------------- tiny -> real model


def test_model_override_args_rewrites_only_spec_switches():
    assert model_override_args(["fit", "--model.init_args.model.name_or_path", "./m", "--trainer.max_steps=2"]) == [
        "fit", '--model.init_args.model={"name_or_path": "./m", "tiny": null}', "--trainer.max_steps=2"]
    assert model_override_args(["--model.model.tiny=null"]) == ['--model.model={"tiny": null}']
    keep = ["--model.init_args.model.name_or_path", "./m", "--model.init_args.model.tiny.hidden_size", "8"]
    assert model_override_args(keep) == keep  # both given on purpose: ModelSpec says set exactly one


def test_name_or_path_on_the_command_line_replaces_tiny(saved_model, tmp_path):
    """The README one-liner: a tiny config trains a local save_pretrained model; the watermark detector's spec
    and ``tiny null`` switch the same way."""
    cli = cli_main(["fit", "-c", DPO_TINY, "--model.init_args.model.name_or_path", str(saved_model),
                    "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), *CSV_LOGGER,
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.callbacks", "null",
                    "--trainer.enable_progress_bar", "false", "--data.init_args.train.limit", "24"])
    assert cli.model.spec.name_or_path == str(saved_model) and cli.model.spec.tiny is None
    assert cli.trainer.global_step == 1
    assert cli.model.policy.config.hidden_size == SMALL["hidden_size"]  # the saved weights, not the tiny spec
    printed = _stdout_of(["fit", "-c", WATERMARK_TINY, "--model.init_args.detector.model.name_or_path",
                          str(saved_model), "--print_config"])
    import yaml

    detector = yaml.safe_load(printed)["model"]["init_args"]["detector"]["model"]
    assert detector["name_or_path"] == str(saved_model) and detector["tiny"] is None
    printed = _stdout_of(["fit", "-c", SFT_TINY, "--model.init_args.model.tiny", "null",
                          "--model.init_args.model.name_or_path=" + str(saved_model), "--print_config"])
    assert yaml.safe_load(printed)["model"]["init_args"]["model"]["tiny"] is None


# --------------------------------------------------------------------------- help


def test_help_lists_lit_align_classes_and_every_spec_field_docstring():
    top = _stdout_of(["fit", "--help"])
    for package, names in ((lit_align.methods, lit_align.methods.__all__), (lit_align.data, lit_align.data.__all__)):
        for name in names:
            obj = getattr(package, name)
            if isinstance(obj, type) and name.endswith(("Module", "DataModule")):
                assert f"{package.__name__}.{name}" in top, name
    method = _stdout_of(["fit", "--model.help", "lit_align.methods.DPOModule"])
    assert "Hub model id (``org/name``), a local directory" in method  # ModelSpec.name_or_path
    tiny = _stdout_of(["fit", "--model.help", "lit_align.methods.DPOModule", "--model.model.tiny.help"])
    assert "Model width." in tiny and "Key/value heads (grouped-query attention)." in tiny  # TinyArch
    lora = _stdout_of(["fit", "--model.help", "lit_align.methods.DPOModule", "--model.model.lora.help"])
    assert "Adapter rank." in lora and "Scaling numerator" in lora  # LoRASpec
