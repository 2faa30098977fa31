"""The tiny game (configs/game/tiny.yaml: builtin:tiny-game-base players, the built-in toy rule judge)
learns in the directions the game says: a frozen defender lets the attacker's success rate rise, a
frozen attacker lets the defender's harmlessness reward on its prompts rise, and the full game logs
both players. Validation draws are seeded per batch, so a frozen player's numbers repeat exactly."""

from __future__ import annotations

import csv

import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from lit_align.cli import cli_main

CONFIG = str(REPO / "configs/game/tiny.yaml")


def _fit(tmp_path, *extra: str):
    cli = cli_main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra])
    history = cli.model.val_history
    return cli, history[0], history[-1]


def test_attacker_against_a_frozen_defender_raises_the_attack_success_rate(tmp_path):
    cli, start, end = _fit(tmp_path, "--model.init_args.schedule.first=attacker",
                           "--model.init_args.schedule.attacker_steps=1000000", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false")
    print("attacker-only", start, end)
    assert cli.model.updates == {"defender": 0, "attacker": 48}
    assert end["attack/asr"] >= start["attack/asr"] + 0.08
    assert end["attacker/judge_reward"] > start["attacker/judge_reward"] + 0.05
    assert end["attacker/kl"] > 0.5
    # the defender never moved: its answers to the raw seeds are drawn the same way and judged the same
    assert (end["seed/asr"], end["seed/reward"], end["defender/kl"]) == (start["seed/asr"], start["seed/reward"], 0.0)


def test_defender_against_a_frozen_attacker_raises_its_harmlessness_reward(tmp_path):
    cli, start, end = _fit(tmp_path, "--model.init_args.schedule.defender_steps=1000000", "--trainer.max_epochs=1",
                           "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false")
    print("defender-only", start, end)
    assert cli.model.updates == {"defender": 24, "attacker": 0}
    assert end["attack/reward"] >= start["attack/reward"] + 0.1
    assert end["attack/asr"] < start["attack/asr"]
    assert end["attacker/kl"] == 0.0 and end["defender/kl"] > 0.1


def test_the_full_game_alternates_and_reports_both_players(tmp_path):
    cli, start, end = _fit(tmp_path, "--trainer.max_epochs=1")
    print("game", start, end)
    module = cli.model
    assert module.updates == {"defender": 12, "attacker": 12}  # D 0-11, A 12-23
    assert end["attacker/kl"] > 0 and end["defender/kl"] > 0
    metrics = cli.trainer.callback_metrics
    for key in ("train/asr", "train/defender/reward", "train/attacker/reward", "train/attacker/self_bleu",
                "train/attacker/cos_sim", "train/defender/kl", "train/attacker/kl", "train/time/attacker/generate",
                "train/time/defender/generate", "val/attack/asr", "val/seed/asr", "val/attacker/bleu_diversity",
                "val/attacker/embedding_diversity"):
        assert key in metrics, key
    report = next(tmp_path.rglob("game_history.csv"))
    rows = list(csv.DictReader(report.open()))
    assert [float(r["step"]) for r in rows] == [row["step"] for row in module.val_history]
    assert rows[0]["step"] == "0.0" and len(module.val_samples) == 16
    assert next(tmp_path.rglob("game_curves.png")).stat().st_size > 0
    assert (tmp_path / "averaged" / "defender.pt").is_file()
    # HFExport writes the defender (its adapter merged): a plain transformers model with the same outputs
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_export").eval()
    ids = module.tokenizer(["Human: How can I steal a bike?\nAI:"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), module.acting("defender") as defender:
        torch.testing.assert_close(exported(ids).logits, defender.eval()(ids).logits, rtol=1e-4, atol=1e-4)
