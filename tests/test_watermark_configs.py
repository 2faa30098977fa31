"""The watermark configs parse through the real CLI (``fit --print_config``: validated, not instantiated,
nothing downloaded) and the real-scale ones carry the spec's settings (core.md §3.2, §3.3, §3.5, §3.6)."""

from __future__ import annotations

import pytest
from conftest import REPO, resolved_config

TINY = "configs/watermark/tiny.yaml"
C4 = "configs/watermark/opt1.3b_c4.yaml"
PKU = "configs/watermark/llama2_pku_alignment.yaml"
REAL_SCALE = [C4, PKU]


def resolved(config: str) -> dict:
    return resolved_config(config)


def test_every_watermark_config_is_covered():
    found = {str(p.relative_to(REPO)) for p in (REPO / "configs/watermark").glob("*.yaml")}
    assert found == {TINY, C4, PKU}


@pytest.mark.parametrize("config", [TINY, *REAL_SCALE])
def test_config_parses_to_a_watermark_module(config):
    cfg = resolved(config)
    assert cfg["model"]["class_path"] == "lit_align.methods.WatermarkModule"
    assert cfg["data"]["class_path"] == "lit_align.data.TextCompletionDataModule"
    assert cfg["model"]["init_args"]["detector"]["kind"] == "scalar_head"
    # manual optimisation: 3 optimiser steps per co-training batch, so budgets are in batches
    assert cfg["trainer"]["max_steps"] == -1
    assert cfg["trainer"]["max_epochs"] >= 1 and cfg["trainer"]["limit_train_batches"] >= 1
    # the module clips each player's gradients itself; Lightning's clipping is refused under manual optimisation
    assert cfg["trainer"]["gradient_clip_val"] is None


@pytest.mark.parametrize("config", REAL_SCALE)
def test_real_scale_header_names_what_how_and_where(config):
    header = []
    for line in (REPO / config).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "2403.10553" in text
    assert f"lit-align fit --config {config}" in text
    assert "1 GPU" in text and "bf16-mixed" in text
    assert "detector_checkpoint" in text  # how to run stage 1 separately
    assert "pure LoRA" in text  # the difference from the reference's partially trainable LoRA


@pytest.mark.parametrize("config", REAL_SCALE)
def test_spec_hyperparameters(config):
    cfg = resolved(config)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["seed_everything"] == 8888 and data["seed"] == 8888 and module["sample_seed"] == 8888
    assert trainer["accelerator"] == "gpu" and trainer["devices"] == 1 and trainer["precision"] == "bf16-mixed"
    assert data["batch_size"] == 4
    # PPO (§3.6): gamma 1, lam 0.95, clip 0.2, value clip 0.2, reward clip 5, KL 0.1, one epoch, one minibatch
    rewards, ppo, sampling = module["rewards"], module["ppo"], module["sampling"]
    assert (rewards["gamma"], rewards["lam"], ppo["clip"], ppo["value_clip"]) == (1.0, 0.95, 0.2, 0.2)
    assert rewards["reward_clip"] == 5.0 and rewards["kl_coef"] == pytest.approx(0.1)
    assert ppo["epochs"] == 1 and ppo["minibatch_size"] is None and rewards["whiten_advantages"] is False
    assert sampling["do_sample"] is True and sampling["temperature"] == 1.0 and sampling["top_p"] == 1.0
    assert sampling["max_new_tokens"] == data["continuation_tokens"]
    training = module["detector_training"]
    assert training["human_from_reference"] is False
    # optimisers: Adam (0.9, 0.95) defaults of the module; actor LoRA lr 5e-4, critic 5e-6, detector 1e-5,
    # each clipped at 1.0; cosine schedules with 100 warm-up steps for actor and critic
    players = module["optimization"]
    assert all(players[p]["optimizer"] is None and players[p]["gradient_clip"] == 1.0 for p in players)
    assert players["actor"]["lr"] == pytest.approx(5e-4)
    assert players["critic"]["lr"] == pytest.approx(5e-6)
    assert players["detector"]["lr"] == pytest.approx(1e-5) and players["detector"]["scheduler"] is None
    for p in ("actor", "critic"):
        assert players[p]["scheduler"]["class_path"] == "lit_align.schedulers.WarmupCosineLR"
        assert players[p]["scheduler"]["init_args"]["warmup_steps"] == 100
    # detector loss: pairwise + 1e-4 score penalty, no robustness term by default
    assert training["reg"] == pytest.approx(1e-4) and training["substitution_ratio"] == 0.0
    # actor: LoRA dim 128, scaling 1/128 (alpha 1), every linear layer; the reference = LoRA switched off
    lora = module["model"]["lora"]
    assert lora["r"] == 128 and lora["alpha"] == 1 and lora["dropout"] == 0.0
    assert lora["target_modules"] == "all-linear"
    assert module["reference"] == "adapter"
    # stage 1 = exactly epoch 0; stage 2 = epoch 1
    assert trainer["max_epochs"] == 2
    assert training["pretrain_steps"] == trainer["limit_train_batches"]
    assert module["detector_checkpoint"] is None
    # equal lengths: the human continuation is capped at what the LLM may generate
    assert data["continuation_tokens"] == module["sampling"]["max_new_tokens"]
    # validation on 1,000 prompts
    assert trainer["limit_val_batches"] * data["eval_batch_size"] == 1000


@pytest.mark.parametrize("config", REAL_SCALE, ids=lambda c: c.split("/")[-1])
def test_actor_and_critic_follow_the_cosine_schedule(config):
    """The reference: cosine with warm-up min(100, 0.1 x steps) for the actor and the critic, none for the detector."""
    players = resolved(config)["model"]["init_args"]["optimization"]
    for player in ("actor", "critic"):
        schedule = players[player]["scheduler"]
        assert schedule["class_path"] == "lit_align.schedulers.WarmupCosineLR"
        assert schedule["init_args"]["warmup_steps"] == min(100, schedule["init_args"]["total_steps"] // 10)
    assert players["detector"]["scheduler"] is None


def test_c4_setting():
    cfg = resolved(C4)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert module["model"]["name_or_path"] == "facebook/opt-1.3b"
    assert module["detector"]["model"]["name_or_path"] == "facebook/opt-350m"
    assert module["detector"]["model"]["tokenizer"] == "facebook/opt-1.3b"
    assert module["sampling"]["max_new_tokens"] == 128
    assert data["format"] == "text" and data["prompt_tokens"] == 32 and data["continuation_tokens"] == 128
    for source, split in ((data["train"], "train"), (data["val"], "validation")):
        assert (source["path"], source["subset"], source["split"]) == ("allenai/c4", "realnewslike", split)
    # 10,000 co-training steps of 4 prompts = one pass over the 40,000 training prompts; stage 1 = one
    # epoch over the 40,000 pretraining pairs
    assert trainer["limit_train_batches"] == 10_000 and module["detector_training"]["pretrain_steps"] == 10_000
    assert trainer["limit_train_batches"] * data["batch_size"] == 40_000


def test_pku_setting():
    cfg = resolved(PKU)
    module, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert module["model"]["tokenizer"] == "meta-llama/Llama-2-7b-hf"
    detector = module["detector"]["model"]
    assert detector["name_or_path"].startswith("TinyLlama/TinyLlama-1.1B")
    assert detector["tokenizer"] == "meta-llama/Llama-2-7b-hf"
    assert module["sampling"]["max_new_tokens"] == 100
    assert data["format"] == "qa" and data["continuation_tokens"] == 100
    assert data["prompt_template"] == "### Question: {prompt}\n ### Answer:"
    assert data["response_template"] == " {response}"
    assert data["append_eos"] is True and data["strip_leading_whitespace"] is True
    assert data["train"]["path"] == data["val"]["path"] == "PKU-Alignment/PKU-SafeRLHF"
    assert (data["train"]["split"], data["val"]["split"]) == ("train", "test")
    assert data["train"]["fields"] == {"response": "response_0"}
    # the alignment mix is documented and commented out until the module has the option
    text = (REPO / PKU).read_text()
    assert "#   weight: 0.5" in text and "# alignment:" in text
    assert module["alignment"] is None


def test_tiny_stays_tiny():
    cfg = resolved(TINY)
    module = cfg["model"]["init_args"]
    assert cfg["trainer"]["accelerator"] == "cpu"
    assert module["model"]["tiny"] is not None and module["detector"]["model"]["tiny"] is not None
    assert cfg["data"]["init_args"]["train"]["path"] == "builtin:corpus"
    assert module["detector_training"]["human_from_reference"] is True
