"""Callbacks after real tiny fits: HF export loads with plain transformers / peft; sample tables are written."""

from __future__ import annotations

import csv
import json

import torch
from conftest import CSV_LOGGER, REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.cli import cli_main
from lit_align.models import build_causal_lm, is_peft_model

SAMPLES = {"every_n_steps": 2, "num_prompts": 2, "max_new_tokens": 6}


def _fit(root, steps: int, callbacks: list[dict], *extra: str, logger: list[str] = CSV_LOGGER):
    """A tiny DPO fit with ``callbacks`` as the whole callback stack (a later --config replaces the list)."""
    stack = root / "callbacks.yaml"
    stack.parent.mkdir(parents=True, exist_ok=True)
    stack.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))  # JSON is YAML
    save_dir = ["--trainer.logger.save_dir", str(root)] if logger else []
    return cli_main([
        "fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--config", str(stack),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
        "--trainer.enable_progress_bar", "false", "--model.init_args.reference_cache_dir", str(root / "cache"),
        *logger, *save_dir, *extra,
    ])


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("Name three primary colours.")["input_ids"]])  # (1, T)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()  # (1, T, V)


def test_hf_export_and_sample_csv_after_a_full_fine_tune(tmp_path):
    cli = _fit(tmp_path, 3, [
        {"class_path": "lit_align.callbacks.HFExport"},
        {"class_path": "lit_align.callbacks.SampleGenerations", "init_args": SAMPLES},
    ])
    module = cli.model
    export = tmp_path / "hf_export"
    loaded = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert json.loads((export / "config.json").read_text())["use_cache"] is True  # KV cache on for inference
    assert module.policy.config.use_cache is False  # the training setting is restored after the export
    assert tokenizer.get_vocab() == module.tokenizer.get_vocab()
    assert tokenizer.pad_token_id == module.tokenizer.pad_token_id and tokenizer.chat_template
    trained, start = module.policy.state_dict(), build_causal_lm(module.spec, module.tokenizer).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    assert any(not torch.equal(trained[n], start[n]) for n in trained), "training did not change the weights"
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(module.policy, tokenizer), rtol=0, atol=0)

    # every_n_steps=2 over 3 steps: a table at step 2, then one at the end of fit (step 3)
    (path,) = tmp_path.rglob("samples.csv")
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["step", "prompt", "completion"]
    assert [int(r[0]) for r in rows] == [2, 2, 3, 3]
    assert all(r[1] for r in rows) and rows[0][1] == rows[2][1] and rows[1][1] == rows[3][1]
    val = cli.datamodule.val_dataset
    assert rows[0][1] == module.tokenizer.decode(val[0].prompt, skip_special_tokens=True)


def test_sample_table_once_per_optimiser_step_under_gradient_accumulation(tmp_path):
    """Two micro-batches per step: global_step stays at 2 for both, yet step 2 is sampled once."""
    _fit(tmp_path, 3, [{"class_path": "lit_align.callbacks.SampleGenerations", "init_args": SAMPLES}],
         "--trainer.accumulate_grad_batches", "2")
    (path,) = tmp_path.rglob("samples.csv")
    with path.open(newline="", encoding="utf-8") as f:
        steps = [int(r[0]) for r in list(csv.reader(f))[1:]]
    assert steps == [2, 2, 3, 3]


def test_hf_export_of_a_lora_policy_loads_with_peft_and_merged(tmp_path):
    from peft import AutoPeftModelForCausalLM

    merged_dir = tmp_path / "merged"
    cli = _fit(tmp_path, 2, [
        {"class_path": "lit_align.callbacks.HFExport"},
        {"class_path": "lit_align.callbacks.HFExport", "init_args": {"dirpath": str(merged_dir), "merge_lora": True}},
    ], "--model.init_args.model.lora", "{r: 4, alpha: 8}", "--model.init_args.reference", "adapter")
    policy, tokenizer = cli.model.policy, cli.model.tokenizer
    assert is_peft_model(policy), "exporting a merged copy must leave the training policy a peft model"
    expected = _logits(policy, tokenizer)
    with policy.disable_adapter():
        base = _logits(policy, tokenizer)
    assert (expected - base).abs().max() > 1e-4, "the adapters did not train"

    export = tmp_path / "hf_export"
    assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(export)
    torch.testing.assert_close(_logits(adapter, tokenizer), expected, rtol=1e-5, atol=1e-5)

    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not is_peft_model(merged) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, AutoTokenizer.from_pretrained(merged_dir)), expected,
                               rtol=1e-4, atol=1e-4)


def test_sample_table_goes_to_wandb_and_to_csv_when_wandb_logs(tmp_path, monkeypatch, finish_wandb):
    """The W&B table ``samples`` and, beside it, the plain ``samples.csv`` in the run's directory
    (``<save_dir>/<project>/<run id>``, save_dir being $WANDB_DIR here), with the same rows."""
    wandb_dir = tmp_path / "wandb_root"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    cli = _fit(tmp_path / "run", 1, [
        {"class_path": "lit_align.callbacks.SampleGenerations", "init_args": {**SAMPLES, "every_n_steps": 1}},
    ], logger=[])  # the CLI's default logger: W&B, offline here
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    tables = list((run_dir / "files" / "media" / "table").glob("samples_*.table.json"))
    assert tables, sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    newest = json.loads(max(tables, key=lambda p: p.stat().st_mtime_ns).read_text())
    assert newest["columns"] == ["step", "prompt", "completion"]
    assert [row[0] for row in newest["data"]] == [1, 1, 1, 1]  # step 1, and again at the end of fit
    (path,) = tmp_path.rglob("samples.csv")
    assert path == wandb_dir / "lit_align" / cli.trainer.logger.version / "samples.csv"
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert header == newest["columns"]
    assert rows == [[str(step), prompt, completion] for step, prompt, completion in newest["data"]]
