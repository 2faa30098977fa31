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
    debate, generate, dpo = module["debate"], module["generate"], module["dpo"]
    assert (debate["rounds"], generate["trials"], generate["k"]) == (5, 5, 10)
    assert (debate["temperature"], debate["top_p"], debate["max_tries"]) == (0.7, 0.9, 2)
    assert module["pair_rule"] == {"class_path": "lit_align.debate.rules.PaperRule", "init_args": {"epsilon": 0.5}}
    assert generate["critic_rollout_actor"] == "current"
    assert (generate["questions_per_phase"], generate["max_pairs"]) == (6000, 20000)
    assert (dpo["beta"], dpo["epochs"], dpo["eval_every"], dpo["patience"]) == (0.1, 3, 50, 5)
    for player in ("actor", "critic"):
        optimizer = module["optimization"][player]["optimizer"]
        assert optimizer["class_path"] == "torch.optim.AdamW"
        assert (optimizer["init_args"]["lr"], optimizer["init_args"]["weight_decay"]) == (1.41e-5, 0.1)
    assert (dpo["max_prompt_tokens"], dpo["max_response_tokens"]) == (512, 512)
    assert module["actor"]["lora"]["r"] == 128 and module["actor"]["lora"]["alpha"] == 256
    assert module["critic"] is None and module["iterations"] == 1 and module["order"] == ["actor", "critic"]
    assert data["seed"] == 101 and cfg["data"]["class_path"] == "lit_align.data.qa.QADataModule"
