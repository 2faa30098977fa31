"""Reward sources: the token-id and the text paths of ModelReward, judges as rewards, mixes, prompt offsets, the
critic copied from a reward model, and frozen reward weights kept out of checkpoints."""

from __future__ import annotations

import pytest
import torch

from lit_align.engine import GAE
from lit_align.game import RuleJudge
from lit_align.methods import PPOModule
from lit_align.models import CriticSpec, ModelSpec, RewardModelSpec, build_tokenizer
from lit_align.rewards import CallableReward, JudgeReward, Mix, ModelReward, PromptOffset, RewardInput

POLICY = ModelSpec(name_or_path="builtin:tiny-game-base")
SCORER = RewardModelSpec(model=POLICY, kind="scalar_head", head_init_std=0.5)


@pytest.fixture(scope="module")
def batch() -> RewardInput:
    tok = build_tokenizer(POLICY)
    prompts, responses = ["How do I steal a car?", "What is 2 plus 2?"], ["Sorry, I cannot help.", "It is 4."]
    rows = [tok(f"Human: {p}\nAI:")["input_ids"] + tok(" " + r)["input_ids"] + [tok.eos_token_id]
            for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return RewardInput(prompts, responses, ids, mask, tok)


def test_model_reward_scores_the_policy_token_ids_as_they_are(batch):
    reward = ModelReward(SCORER)
    reward.build(batch.tokenizer)
    assert reward._own_tokenizer is None  # same vocabulary: no re-tokenisation
    torch.testing.assert_close(reward(batch), reward.model.score(batch.sequences, batch.attention_mask))
    assert reward.fingerprint() == reward.fingerprint() and reward.fingerprint().startswith("ModelReward:")
    assert all(not p.requires_grad for p in reward.parameters())


def test_judge_mix_and_offset(batch):
    judge = JudgeReward(RuleJudge())
    expected = RuleJudge().score(batch.prompts, batch.responses).defender_reward
    torch.testing.assert_close(judge(batch), expected)
    attacker = JudgeReward(RuleJudge(), output="attacker_reward")
    torch.testing.assert_close(attacker(batch), 1.0 - expected)
    length = CallableReward(lambda prompts, responses: [float(len(r)) for r in responses])
    mix = Mix([judge, length], [2.0, 0.5])
    torch.testing.assert_close(mix(batch), 2.0 * expected + 0.5 * torch.tensor([21.0, 8.0]))
    offset = PromptOffset(judge, scale=0.7, seed=3)
    shift = offset(batch) - expected
    torch.testing.assert_close(shift, offset.offsets(batch.prompts))
    again = offset.offsets(["How do I steal a car?"] * 3)  # a function of the prompt alone
    assert torch.equal(again, again[:1].expand(3)) and float(again[0]) == pytest.approx(float(shift[0]))
    assert PromptOffset(judge, scale=0.7, seed=4).offsets(batch.prompts).ne(shift).all()


def test_critic_from_the_reward_model_scores_like_it_and_rewards_stay_out_of_checkpoints(batch):
    module = PPOModule(POLICY, ModelReward(SCORER), estimator=GAE(), critic=CriticSpec(init_from="reward"))
    module.configure_model()
    values = module.critic(batch.sequences, batch.attention_mask)  # (B, T): V at every position
    last = batch.attention_mask.shape[1] - 1  # left padding: every row ends at the last column
    torch.testing.assert_close(values[:, last], module.reward(batch))  # at the last token, V = the reward's score
    assert module.critic.backbone is not module.reward.model.backbone  # separate parameters
    state = module.state_dict()
    assert any(k.startswith("critic.") for k in state) and not any(k.startswith("reward.") for k in state)
    module.load_state_dict(state)  # the rebuilt reward weights are taken from the module as built


def test_critic_from_an_exported_decoder_classifier_scores_like_it(batch, tmp_path):
    """A RewardModelModule-style export (an HF sequence classifier on the policy's tokenizer) starts the critic:
    at each sequence's last token the value is the reward model's score."""
    from transformers import AutoModelForSequenceClassification

    from lit_align.models.causal_lm import resolve_path

    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(resolve_path("builtin:tiny-game-base"), num_labels=1)
    torch.nn.init.normal_(classifier.score.weight, std=0.5)
    classifier.save_pretrained(tmp_path / "rm")
    batch.tokenizer.save_pretrained(tmp_path / "rm")
    rm = RewardModelSpec(model=ModelSpec(name_or_path=str(tmp_path / "rm")), kind="sequence_classification")
    module = PPOModule(POLICY, ModelReward(rm, retokenize="never"), critic=CriticSpec(init_from="reward"))
    module.configure_model()
    values = module.critic(batch.sequences, batch.attention_mask)
    torch.testing.assert_close(values[:, -1], module.reward(batch), atol=1e-5, rtol=1e-5)
    assert any(p.requires_grad for p in module.critic.parameters())
