"""The advantage estimators (GAE, RLOO, GRPO) and the loss aggregations, against values derived by hand."""

import math

import pytest
import torch

from lit_align.engine import GAE, GRPO, RLOO, PPOConfig
from lit_align.errors import ConfigError
from lit_align.losses.ppo import aggregate, gae, k3_kl, ppo_policy_loss


def _masks(rows: int, length: int, lengths: list[int]):
    steps = torch.zeros(rows, length)
    for i, n in enumerate(lengths):
        steps[i, length - n:] = 1.0
    return steps, steps.clone()


def test_rloo_broadcasts_the_leave_one_out_advantage_over_each_sample_s_actions():
    # two prompts, k = 2; returns are the summed shaped rewards: [1, 3] and [2, 2]
    steps, actions = _masks(4, 3, [2, 1, 3, 2])
    rewards = torch.zeros(4, 3)
    rewards[0, 2], rewards[1, 2], rewards[2, 2], rewards[3, 2] = 1.0, 3.0, 2.0, 2.0
    rewards[0, 1] = -0.5  # a KL term: row 0's return is 0.5
    adv, _ = RLOO(group_size=2)(rewards, torch.zeros(4, 3), steps, actions)
    # row 0: 0.5 - 3 = -2.5 (the baseline excludes the sample itself), row 1: 3 - 0.5 = 2.5
    expected = torch.tensor([-2.5, 2.5, 0.0, 0.0])[:, None] * actions
    torch.testing.assert_close(adv, expected)


def test_grpo_normalises_within_the_group_and_never_across_groups():
    steps, actions = _masks(6, 2, [2] * 6)
    scores = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])
    rewards = torch.zeros(6, 2)
    rewards[:, 1] = scores
    adv, _ = GRPO(group_size=3)(rewards, torch.zeros(6, 2), steps, actions)
    std = math.sqrt(7.0)
    expected = torch.tensor([-2 / (std + 1e-4), -1 / (std + 1e-4), 3 / (std + 1e-4), 0, 0, 0])
    torch.testing.assert_close(adv[:, 0], expected)
    torch.testing.assert_close(adv[:, 1], expected)
    unscaled, _ = GRPO(group_size=3, scale_by_std=False)(rewards, torch.zeros(6, 2), steps, actions)
    torch.testing.assert_close(unscaled[:, 0], torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))


def test_gae_estimator_equals_the_pure_function_and_whitens_over_actions():
    torch.manual_seed(0)
    steps, actions = _masks(3, 5, [3, 5, 2])
    rewards, values = torch.randn(3, 5) * steps, torch.randn(3, 5) * steps
    adv, ret = GAE(gamma=0.9, lam=0.8, whiten=False)(rewards, values, steps, actions)
    ref_adv, ref_ret = gae(rewards, values, steps, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, ref_adv * actions)
    torch.testing.assert_close(ret, ref_ret * actions)
    white, _ = GAE(gamma=0.9, lam=0.8)(rewards, values, steps, actions)
    picked = white[actions.bool()]
    assert abs(float(picked.mean())) < 1e-5 and abs(float(picked.std()) - 1.0) < 1e-3


@pytest.mark.parametrize("estimator", [RLOO, GRPO])
def test_group_estimators_refuse_one_sample_per_prompt(estimator):
    with pytest.raises(ConfigError, match="model.estimator.init_args.group_size.*GAE"):
        estimator(group_size=1)


def test_aggregations_by_hand():
    x = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(aggregate(x, mask, "token_mean")) == pytest.approx(3.0)
    assert float(aggregate(x, mask, "sequence_mean")) == pytest.approx(3.5)
    assert float(aggregate(x, mask, "constant", max_tokens=4)) == pytest.approx(1.125)
    with pytest.raises(ConfigError, match="model.ppo.aggregation"):
        aggregate(x, mask, "sum")
    with pytest.raises(ConfigError, match="model.ppo.aggregation"):
        PPOConfig(aggregation="sum")


def test_policy_loss_sequence_mean_weights_each_sample_equally():
    # a zero log-ratio: the loss is -mean(A); one long row with A = 1, one short row with A = -1
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logps = torch.zeros(2, 3, requires_grad=True)
    token, _ = ppo_policy_loss(logps, torch.zeros(2, 3), adv, mask)
    sequence, _ = ppo_policy_loss(logps, torch.zeros(2, 3), adv, mask, aggregation="sequence_mean")
    assert float(token.detach()) == pytest.approx(-0.5) and float(sequence.detach()) == pytest.approx(0.0)


def test_k3_kl_by_hand():
    value = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert float(value) == pytest.approx(0.5 - math.log(0.5) - 1.0)
    assert float(k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3]))) == 0.0
