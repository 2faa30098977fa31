"""PPOModule on the tiny configs: PPO (critic), RLOO and GRPO raise a rule reward; resumes are exact; contrastive
rewards' offline baseline (offset invariance, mean zero under the starting policy, kept in checkpoints, cache keys);
bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import CSV_LOGGER, REPO
from tiny_bert import save_tiny_bert

from lit_align.cli import cli_main
from lit_align.errors import ConfigError
from lit_align.methods import PPOModule
from lit_align.methods.base import prompt_predictions
from lit_align.rewards import CallableReward, JudgeReward, ModelReward
from lit_align.rewards.contrastive import ContrastiveRewards
from lit_align.rollout.sampler import SamplingConfig, sample

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *CSV_LOGGER]


def _args(config: str, root, *extra: str) -> list[str]:
    return ["--config", str(REPO / f"configs/{config}/tiny.yaml"), *QUIET, "--trainer.default_root_dir", str(root),
            "--trainer.logger.save_dir", str(root), "--trainer.callbacks=[]", "--trainer.num_sanity_val_steps", "0",
            *extra]


def _val_reward(cli) -> float:
    (metrics,) = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)
    return metrics["val/reward"]


def _base_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.policy.get_base_model().state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("config", ["ppo", "grpo", "rloo"])
def test_each_estimator_raises_the_rule_reward_and_leaves_the_reference(config, tmp_path):
    """Validation samples one response per held-out prompt, seeded by the prompt: the same draws before and after
    training, so the rise is the policy's."""
    cli = cli_main(_args(config, tmp_path, "--trainer.limit_train_batches", "12", "--trainer.val_check_interval",
                         "12", "--trainer.enable_checkpointing", "false"), run=False)
    module = cli.model
    before = _val_reward(cli)
    base = _base_weights(module)
    lora = {k: v.clone() for k, v in module.policy.state_dict().items() if "lora_B" in k}
    cli.trainer.fit(module, cli.datamodule)
    after = _val_reward(cli)
    assert after > before + 0.05, (before, after)
    assert (module.critic is not None) == (config == "ppo")
    moved = max((module.policy.state_dict()[k] - v).abs().max().item() for k, v in lora.items())
    assert moved > 1e-3
    assert all(torch.equal(v, _base_weights(module)[k]) for k, v in base.items())  # the reference: adapter off


@pytest.mark.parametrize(("config", "per_batch"), [("ppo", 2), ("grpo", 1)])
def test_resume_mid_epoch_equals_an_uninterrupted_run(config, per_batch, tmp_path):
    """Two batches, a checkpoint, two more resumed from it: the policy, the critic, their optimisers, the step
    counter (the seeds) and the data position come back."""
    common = ["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0"]
    straight = cli_main(["fit", *_args(config, tmp_path / "straight", *common, "--trainer.enable_checkpointing", "false")])
    ckpt = tmp_path / "ckpt"
    cli_main(["fit", *_args(config, tmp_path / "first", *common, "--trainer.max_steps", str(2 * per_batch),
                            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                            "--trainer.callbacks.dirpath", str(ckpt), "--trainer.callbacks.every_n_train_steps",
                            str(2 * per_batch))])
    (saved,) = ckpt.iterdir()
    resumed = cli_main(["fit", *_args(config, tmp_path / "resumed", *common, "--trainer.enable_checkpointing",
                                      "false"), "--ckpt_path", str(saved)])
    assert resumed.model.step_count == straight.model.step_count == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert sorted(a) == sorted(b) and any(k.startswith("critic.") for k in a) == (config == "ppo")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- contrastive rewards --------------------------------------------------------------------------------------
def _offset(prompt: str) -> float:
    return (sum(map(ord, prompt)) % 7) / 2.0  # a per-prompt constant the rule reward does not have


def rule_reward(prompts, responses):
    from lit_align.game import RuleJudge

    return RuleJudge().score(prompts, responses).defender_reward


def offset_reward(prompts, responses):
    return rule_reward(prompts, responses) + torch.tensor([_offset(p) for p in prompts])


def _contrastive_cli(root, fn, *extra: str, lr: str = "3.0e-3"):
    args = _args("ppo", root, "--data.init_args.train.limit", "16", "--trainer.limit_train_batches", "1",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
                 "--model.init_args.reward", "lit_align.rewards.CallableReward",
                 "--model.init_args.reward.init_args.fn", f"test_ppo_module.{fn}",
                 "--model.init_args.contrastive", "{samples: 3}", "--model.init_args.optimization.policy.lr", lr, *extra)
    return cli_main(args, run=False)


def test_contrastive_baseline_cancels_a_per_prompt_offset(tmp_path):
    """r_CR = r - b(x): adding c(x) to the reward adds it to every baseline score too, so r_CR is unchanged."""
    plain, shifted = (_contrastive_cli(tmp_path / name, fn) for name, fn in (("a", "rule_reward"), ("b", "offset_reward")))
    for cli in (plain, shifted):
        cli.trainer.fit(cli.model, cli.datamodule)
    ta, tb = plain.model.baseline, shifted.model.baseline
    assert ta.uids == tb.uids and len(ta.uids) == 16  # every training prompt (data.train.limit)
    prompts = {ex.uid: ex.prompt for ex in plain.datamodule.train_dataset.examples}
    offsets = torch.tensor([_offset(prompts[u]) for u in ta.uids])
    torch.testing.assert_close(tb.baseline - ta.baseline, offsets)
    torch.testing.assert_close(ta.baseline, ta.scores.mean(-1))  # b(x) = mean of the k stored scores
    # the same rollout through both modules' reward path: equal contrastive rewards
    batch = next(iter(plain.datamodule.train_dataloader()))
    rollout = plain.model._rollout(batch, 1, "check")
    ra = plain.model._rewards(batch, rollout, {})
    rb = shifted.model._rewards(batch, rollout, {})
    torch.testing.assert_close(ra, rb)
    # a reward whose level differs strongly across prompts varies far less once contrasted with b(x)
    raw = shifted.model._score(batch, rollout, 1)
    assert float(rb.var()) < 0.5 * float(raw.var()), (float(rb.var()), float(raw.var()))
    # lookup is by prompt id, whatever the batch order
    shuffled = list(reversed(batch.uids))
    torch.testing.assert_close(ta.lookup(shuffled), ta.lookup(batch.uids).flip(0))


def test_contrastive_reward_has_mean_zero_under_the_starting_policy(tmp_path):
    """With the policy frozen at its start (learning rate ~0), fresh samples' r - b(x) averages to ~0 within
    three standard errors of the reward's spread."""
    cli = _contrastive_cli(tmp_path, "rule_reward", "--model.init_args.contrastive", "{samples: 8}", lr="1.0e-30")
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    loader = cli.datamodule.train_dataloader()
    values = []
    for batch in loader:
        rollout = module._rollout(batch, 8, "fresh")
        values.append(module._rewards(batch, rollout, {}, k=8))
    r = torch.cat(values)
    assert abs(float(r.mean())) < 3 * float(r.std()) / len(r) ** 0.5 + 1e-6, (float(r.mean()), float(r.std()))


def test_contrastive_baseline_is_kept_in_checkpoints_and_cached(tmp_path, monkeypatch):
    first = _contrastive_cli(tmp_path / "a", "rule_reward", "--trainer.enable_checkpointing", "true",
                             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                             "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--model.init_args.contrastive",
                             f"{{samples: 3, cache: {tmp_path / 'table.pt'}}}")
    first.trainer.fit(first.model, first.datamodule)
    assert (tmp_path / "table.pt").is_file()
    (saved,) = (tmp_path / "ckpt").iterdir()
    second = _contrastive_cli(tmp_path / "b", "rule_reward", "--trainer.max_epochs", "2",
                              "--model.init_args.contrastive", "{samples: 3}")

    def refuse(self):
        raise AssertionError("the baseline was recomputed on resume")

    monkeypatch.setattr(PPOModule, "_make_baseline", refuse)
    second.trainer.fit(second.model, second.datamodule, ckpt_path=str(saved))
    assert second.model.step_count == 2  # it trained on (a second epoch) from the restored table
    torch.testing.assert_close(second.model.baseline.baseline, first.model.baseline.baseline)
    # the cache file of one reward model is refused for another
    monkeypatch.undo()
    other = _contrastive_cli(tmp_path / "c", "offset_reward", "--model.init_args.contrastive",
                             f"{{samples: 3, cache: {tmp_path / 'table.pt'}}}")
    with pytest.raises(ConfigError, match=r"model.contrastive.cache=.*another reward model"):
        other.trainer.fit(other.model, other.datamodule)


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_names_the_key(tmp_path):
    from lit_align.engine import GRPO, RLOO
    from lit_align.models import CriticSpec, ModelSpec, RewardModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-game-base")
    with pytest.raises(ConfigError, match="model.estimator.init_args.group_size"):
        RLOO(group_size=1)
    with pytest.raises(ConfigError, match="model.estimator.init_args.group_size"):
        GRPO(group_size=1)
    with pytest.raises(ConfigError, match="model.critic"):
        PPOModule(spec, JudgeReward(), estimator=GRPO(), critic=CriticSpec())
    with pytest.raises(ConfigError, match="model.reference"):
        PPOModule(spec, JudgeReward(), reference="precomputed")
    with pytest.raises(ConfigError, match="model.contrastive.samples"):
        ContrastiveRewards(samples=0)
    with pytest.raises(ConfigError, match=r"model.optimization: no block for model.optimization.critic"):
        PPOModule(spec, JudgeReward(), optimization={"policy": {}})
    # a reward model on another vocabulary: refused with retokenize: never, scored through text with auto
    bert = save_tiny_bert(tmp_path / "bert")
    rm = RewardModelSpec(model=ModelSpec(name_or_path=bert), kind="sequence_classification")
    module = PPOModule(spec, ModelReward(rm, retokenize="never"), estimator=RLOO(group_size=2))
    with pytest.raises(ConfigError, match=r"model.reward.init_args.model.*retokenize: auto"):
        module.configure_model()
    reward = ModelReward(rm)
    reward.build(module.tokenizer)
    ids = torch.tensor(module.tokenizer(["Human: hi\nAI: sorry"])["input_ids"])
    from lit_align.rewards import RewardInput

    scores = reward(RewardInput(["hi"], ["sorry"], ids, torch.ones_like(ids), module.tokenizer))
    assert scores.shape == (1,) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="one number per row"):
        CallableReward(lambda p, r: [1.0, 2.0])(RewardInput(["a"], ["b"], ids, torch.ones_like(ids), module.tokenizer))


def test_prompt_predictions_decode_greedily_whatever_the_sampling(tmp_path):
    """``prompt_predictions`` (PPO's ``predict_step``; online DPO's too): one ``{prompt, completion}`` row per prompt
    of the batch; the completion is the policy's greedy response even when the method samples (temperature 5 here:
    two sampled calls would differ), cut at the config's length; the policy is left in train mode."""
    cli = cli_main(_args("ppo", tmp_path, "--data.init_args.eval_batch_size", "3"), run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.tokenizer = module.tokenizer
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    hot = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=5.0)
    rows = prompt_predictions(module, batch, hot)
    assert [r["prompt"] for r in rows] == batch.prompts and len(rows) == 3
    assert prompt_predictions(module, batch, hot) == rows
    out = sample(module.policy, batch.input_ids, batch.attention_mask, SamplingConfig(max_new_tokens=6, do_sample=False),
                 eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id)
    greedy = [module.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
              for r, m in zip(out.response_ids, out.response_mask)]
    assert [r["completion"] for r in rows] == greedy and any(greedy)
    assert module.policy.training
