"""``benchmarks/online_step.py``'s lit_align side is the settings it claims: the tiny GRPO/RLOO config on the saved
model, full fine-tuning, 8 prompts x 4 samples of 32 tokens, KL 0 in the reward and in the loss (no timing here)."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import REPO

from lit_align.cli import cli_main

sys.path.append(str(REPO / "benchmarks"))  # last: its script names must not shadow other modules

import online_step  # noqa: E402


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_lit_align_side_has_the_stated_settings(method, tmp_path):
    online_step.build_model(str(tmp_path / "model"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(online_step.lit_align_config(str(tmp_path / "model"), method, 3)))
    cli = cli_main(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    module, data = cli.model, cli.datamodule
    assert module.spec.lora is None and module.spec.name_or_path == str(tmp_path / "model")
    assert type(module.estimator).__name__ == method.upper() and module.group_size == online_step.GROUP
    assert module.sampling.max_new_tokens == online_step.NEW_TOKENS and module.sampling.temperature == 1.0
    assert module.kl_coef == 0.0 and module.ppo.kl_loss_coef == 0.0 and module.ppo.epochs == 1
    assert module.players["policy"].optimization.lr == online_step.LR
    data.tokenizer_name = str(tmp_path / "model")  # no trainer here: the module's tokenizer, by name
    data.setup("fit")
    assert len(data.train_dataset) == data.batch_size == online_step.PROMPTS  # one batch: the same 8 every step
    assert sorted(data.template.format(prompt=e.prompt) for e in data.train_dataset) == sorted(online_step.prompts())
    assert cli.trainer.max_steps == 3
