"""The game configs parse through the real CLI (``fit --print_config``: validated, not instantiated, nothing
downloaded) and the real-scale ones carry the GPO script's settings (core.md §2.4-§2.6)."""

from __future__ import annotations

import pytest
from conftest import REPO, resolved_config

from lit_align.game import GameSchedule

TINY = "configs/game/tiny.yaml"
REAL_SCALE = ["configs/game/llama2_7b_hh_llamaguard.yaml", "configs/game/llama2_7b_pku_reward_model.yaml"]


def test_every_game_config_is_covered():
    found = {str(p.relative_to(REPO)) for p in (REPO / "configs/game").glob("*.yaml")}
    assert found == {TINY, *REAL_SCALE}


@pytest.mark.parametrize("config", [TINY, *REAL_SCALE])
def test_config_parses_to_the_game(config):
    cfg = resolved_config(config)
    assert cfg["model"]["class_path"] == "lit_align.methods.AdversarialGameModule"
    assert cfg["data"]["class_path"] == "lit_align.data.prompts.SeedPromptDataModule"
    # manual optimisation: Lightning counts optimiser steps, so budgets are in batches; the module clips
    assert cfg["trainer"]["max_steps"] == -1 and cfg["trainer"]["gradient_clip_val"] is None


@pytest.mark.parametrize("config", REAL_SCALE)
def test_real_scale_settings(config):
    cfg = resolved_config(config)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    header = "\n".join(line for line in (REPO / config).read_text().splitlines() if line.startswith("#"))
    assert "2406.10977" in header and f"lit-align fit --config {config}" in header
    assert "1 GPU" in header and "bf16-mixed" in header and "NOT FOUND" in header
    assert trainer["precision"] == "bf16-mixed" and trainer["limit_train_batches"] == 800  # 800 train steps
    assert trainer["val_check_interval"] == 100
    schedule = GameSchedule(**module["schedule"])
    assert (schedule.defender_steps, schedule.attacker_steps, schedule.first) == (400, 200, "defender")
    sampling, rewards, diversity, ppo = module["sampling"], module["rewards"], module["diversity"], module["ppo"]
    assert data["batch_size"] == 8 and ppo["epochs"] == 1 and ppo["minibatch_size"] is None
    assert (sampling["temperature"], sampling["top_p"], sampling["defender_max_new_tokens"]) == (0.8, 0.9, 512)
    assert (rewards["kl_coef"], rewards["gamma"], rewards["lam"]) == (0.01, 1.0, 0.95)
    assert (diversity["bleu_weight"], diversity["embedding_weight"], diversity["scope"]) == (5.0, 1.0, "history")
    assert module["critic"]["shared"] is True  # one critic for both players, as the reference code
    # the script's rates x 20 for LoRA, attacker = 2 x critic
    optimization = module["optimization"]
    assert optimization["attacker"]["lr"] == pytest.approx(2 * optimization["critic"]["lr"])
    assert module["defender"]["lora"] is not None and module["attacker"] is None  # two adapters, one base
    assert diversity["encoder"]["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert module["judge"]["class_path"] in ("lit_align.game.LlamaGuard", "lit_align.game.Classifier")
    for player in ("defender", "attacker", "critic"):
        scheduler = optimization[player]["scheduler"]
        assert scheduler["class_path"] == "lit_align.schedulers.WarmupInverseSqrtLR"
        assert {k: scheduler["init_args"][k] for k in ("warmup_steps", "floor")} == {"warmup_steps": 100, "floor": 0.1}
