"""The debate configs parse through the real CLI (validated, not instantiated, nothing downloaded) and the
real-scale ones carry the reference code's settings (core.md §1.8, §1.9)."""

from __future__ import annotations

import pytest
from conftest import REPO, resolved_config

TINY = "configs/debate/tiny.yaml"
REAL_SCALE = ["configs/debate/mistral7b_boolq.yaml", "configs/debate/llama3_8b_mmlu.yaml"]


def test_every_debate_config_is_covered():
    found = {str(p.relative_to(REPO)) for p in (REPO / "configs/debate").glob("*.yaml")}
    assert found == {TINY, *REAL_SCALE}


@pytest.mark.parametrize("config", REAL_SCALE)
def test_real_scale_settings(config):
    cfg = resolved_config(config)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    header = "\n".join(line for line in (REPO / config).read_text().splitlines() if line.startswith("#"))
    assert "2411.00053" in header and f"lit-align fit --config {config}" in header
    assert "1 GPU" in header and "bf16-mixed" in header and "NOT FOUND" in header
    assert cfg["model"]["class_path"] == "lit_align.methods.DebateModule"
    assert trainer["precision"] == "bf16-mixed" and trainer["max_steps"] == -1 and trainer["max_epochs"] == -1
    assert (module["rounds"], module["trials"], module["k"]) == (5, 5, 10)
    assert (module["temperature"], module["top_p"], module["max_tries"]) == (0.7, 0.9, 2)
    assert module["pair_rule"] == "paper" and module["critic_rollout_actor"] == "current"
    assert (module["questions_per_phase"], module["max_pairs"]) == (6000, 20000)
    assert (module["beta"], module["dpo_epochs"], module["lr"], module["weight_decay"]) == (0.1, 3, 1.41e-5, 0.1)
    assert (module["max_prompt_tokens"], module["max_response_tokens"]) == (512, 512)
    assert module["actor"]["lora"]["r"] == 128 and module["actor"]["lora"]["alpha"] == 256
    assert module["critic"] is None and module["iterations"] == 1 and module["order"] == ["actor", "critic"]
    assert data["seed"] == 101 and cfg["data"]["class_path"] == "lit_align.data.qa.QADataModule"
