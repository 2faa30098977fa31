"""Every shipped YAML parses through the real CLI; the tiny ones run to the end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
PRESETS = sorted((REPO / "callbacks").glob("*.yaml"))
#: Top config folders of evaluation-only modules (``lit-align test``, no training step): their tiny configs are run
#: by their own tests (tests/methods/test_fewl_eval.py, test_summarization_eval.py, test_unlearning_assessment.py),
#: not by the fit / validate / predict runs below.
EVALUATION_ONLY = {"fewl", "eval"}
TINY = [c for c in CONFIGS
        if c.name == "tiny.yaml" and c.relative_to(REPO / "configs").parts[0] not in EVALUATION_ONLY]


def _print_config(*configs: Path) -> str:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


#: Every config shipped, by method: its CPU tiny run(s) and its real-scale runs. A new or removed YAML
#: must be listed here (so a config cannot vanish, or appear untested, unnoticed).
EXPECTED_CONFIGS = {
    "classifier": ["digits.yaml", "adult_erm.yaml"],  # run by tests/classifiers/test_classifier_module.py
    "adv_training": ["ul_tiny.yaml", "ipo_tiny.yaml", "ul_phi-3-mini.yaml", "ipo_phi-3-mini.yaml", "ul_zephyr-7b.yaml",
                     "ipo_mistral-7b.yaml"],
    "curry_dpo": ["tiny.yaml", "zephyr-7b_ultrafeedback.yaml"],
    "debate": ["tiny.yaml", "llama3_8b_mmlu.yaml", "mistral7b_boolq.yaml"],
    "eval/summarization": ["tiny.yaml", "cnndm_3shot.yaml", "xsum_0shot.yaml"],
    "dpo": ["tiny.yaml", "llama3.1-8b_ultrafeedback_fsdp.yaml", "qwen2.5-0.5b_ultrafeedback_lora.yaml"],
    "eval/unlearning_assessment": ["tiny.yaml"],
    "fis": ["adult.yaml", "compas.yaml", "celeba_vit.yaml"],  # compas.yaml runs in tests/classifiers/test_fis.py
    "fewl": ["tiny.yaml", "sft_tiny.yaml", "truthfulqa.yaml"],
    "game": ["tiny.yaml", "llama2_7b_hh_llamaguard.yaml", "llama2_7b_pku_reward_model.yaml"],
    "grpo": ["tiny.yaml", "qwen2.5-1.5b_hh.yaml"],
    "isara": ["tiny.yaml", "opt-350m.yaml", "llama-7b.yaml"],
    "online_dpo": ["tiny.yaml"],
    "ppo": ["tiny.yaml", "contrastive_tiny.yaml", "qwen2.5-0.5b_hh.yaml", "pythia1b_tldr_contrastive.yaml"],
    "rloo": ["tiny.yaml"],
    "rm": ["tiny.yaml"],
    "selm": ["tiny.yaml", "zephyr-7b_ultrafeedback.yaml", "llama-3-8b-instruct.yaml"],
    "sft": ["tiny.yaml", "tiny_debate.yaml", "tiny_game.yaml", "tiny_isara.yaml", "tiny_tofu.yaml", "qwen2.5-0.5b_alpaca.yaml"],
    "unlearning/ga": ["tiny.yaml"],
    "unlearning/graddiff": ["tiny.yaml"],
    "unlearning/llmu": ["tiny.yaml", "opt-1.3b_pku.yaml"],
    "unlearning/npo": ["tiny.yaml", "tofu_llama2-7b.yaml"],
    "unlearning/po": ["tiny.yaml"],
    "unlearning/ugradsl": ["tiny.yaml"],
    # run by tests/classifiers/test_classifier_unlearning.py (the class-wise one) and the benchmark (both digits)
    "ugradsl_cls": ["class_wise_digits.yaml", "random_digits.yaml", "cifar10_class_wise_resnet18.yaml",
                    "cifar10_random_resnet18.yaml", "cifar100_class_wise_resnet18.yaml", "cifar100_random_resnet18.yaml"],
    "wagle": ["graddiff_tiny.yaml", "npo_tiny.yaml", "tofu_graddiff_llama2-7b.yaml", "tofu_npo_llama2-7b.yaml",
              "tofu_po_llama2-7b.yaml", "wmdp_graddiff_zephyr-7b.yaml", "wmdp_npo_zephyr-7b.yaml"],
    "watermark": ["tiny.yaml", "llama2_pku_alignment.yaml", "opt1.3b_c4.yaml"],
}


def test_configs_are_found():
    found = {str(c.relative_to(REPO / "configs")) for c in CONFIGS}
    expected = {f"{folder}/{name}" for folder, names in EXPECTED_CONFIGS.items() for name in names}
    assert found == expected, f"missing: {sorted(expected - found)}; not listed here: {sorted(found - expected)}"
    assert len(found) == 74
    assert {str(c.relative_to(REPO / "configs")) for c in TINY} == {
        n for n in expected if n.endswith("/tiny.yaml") and n.split("/")[0] not in EVALUATION_ONLY}
    assert len(TINY) == 19
    assert [p.name for p in PRESETS] == ["ddp_cpu.yaml", "default.yaml", "fsdp.yaml", "fsdp2_cpu.yaml", "wandb.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses(config):
    printed = _print_config(config)
    assert "class_path: lit_align.methods." in printed


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_callback_preset_parses_with_a_method(preset):
    printed = _print_config(REPO / "configs/dpo/tiny.yaml", preset)
    assert "callbacks:" in printed


def test_interpolation_follows_cli_overrides(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                  "--print_config"])
    assert f"reference_cache_dir: {tmp_path}/cache" in out.getvalue()


@pytest.mark.parametrize("config", TINY, ids=lambda p: str(p.relative_to(REPO)))
def test_tiny_config_runs_to_the_end(config, tmp_path):
    # configs budgeted in epochs (multi-player, manual optimisation: max_steps -1) run one short epoch here
    multi_player = "watermark" in str(config) or "game" in str(config)
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"] if multi_player else []
    if "game" in str(config):
        short += ["--trainer.val_check_interval", "1.0"]
    if "debate" in str(config):  # a smaller pipeline: it stops itself after its last phase
        short = [f"--model.init_args.{k}={v}" for k, v in (("generate.questions_per_phase", 8), ("generate.trials", 1),
                                                          ("generate.k", 2), ("debate.rounds", 2), ("dpo.epochs", 1))]
        short += ["--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=8"]
    if config.parent.name == "rm":  # learning is checked in tests/methods/test_reward_model.py
        short = ["--trainer.max_steps", "10"]
    cli = cli_main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path),
                    *short])
    if "debate" in str(config):
        assert cli.model.phase_state.stage == "done"
    elif cli.trainer.max_steps == -1:
        assert cli.trainer.current_epoch == cli.trainer.max_epochs
    else:
        assert cli.trainer.global_step == cli.trainer.max_steps
    assert (tmp_path / "hf_export" / "config.json").is_file()
    assert list(tmp_path.rglob("last.ckpt"))


@pytest.mark.parametrize("config", TINY, ids=lambda p: str(p.relative_to(REPO)))
def test_validate_test_and_predict_subcommands(config, tmp_path):
    common = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
              "false", *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path)]
    if config.parent.name in ("game", "debate"):  # their evaluations generate: smaller batches keep this quick
        common += ["--data.init_args.eval_batch_size", "8", "--data.init_args.batch_size", "8"]
    for sub in ("validate", "test"):
        cli = cli_main([sub, *common, f"--trainer.limit_{'val' if sub == 'validate' else sub}_batches", "2"])
        prefix = "val" if sub == "validate" else "test"
        # every method logs a loss; the game has none to log: its headline is the attack success rate; online
        # RL's is the reward of fresh samples
        key = {"game": "attack/asr", "debate": "accuracy", "ppo": "reward", "grpo": "reward",
               "rloo": "reward", "isara": "harmful_rate"}.get(config.parent.name, "loss")
        assert f"{prefix}/{key}" in cli.trainer.callback_metrics
    cli = cli_main(["predict", *common, "--trainer.limit_predict_batches", "1"])
    rows = [row for batch in cli.trainer.predict_loop.predictions for row in batch]
    fields = {"prompt", "chosen", "rejected"} if config.parent.name == "rm" else {"prompt", "completion"}
    assert rows and all(set(r) == fields and r["prompt"] for r in rows)
    (written,) = tmp_path.rglob("predictions.jsonl")  # the same rows, with their dataset index
    assert [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()] == [
        {"index": i, **r} for i, r in enumerate(rows)]
