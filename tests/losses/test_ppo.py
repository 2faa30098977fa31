"""PPO building blocks (core spec §0.2 B3) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.losses.ppo import gae, kl_shaped_rewards, ppo_policy_loss, ppo_value_loss, whiten


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- gae ------------------------------------------------------------------------------------------------
def test_gae_spec_hand_check():
    """Spec [TOY]: delta = [0.1, 0.1, 0.7]; A_3 = 0.7, A_2 = 0.1 + 0.95 * 0.7 = 0.765,
    A_1 = 0.1 + 0.95 * 0.765 = 0.82675; returns = A + V = [0.92675, 0.965, 1.0]."""
    adv, ret = gae(_t([[0, 0, 1]]), _t([[0.1, 0.2, 0.3]]), _t([[1, 1, 1]]))
    torch.testing.assert_close(adv, _t([[0.82675, 0.765, 0.7]]))
    torch.testing.assert_close(ret, _t([[0.92675, 0.965, 1.0]]))


def test_gae_left_padding_and_rows_of_different_lengths():
    """Row 0: two prompt/pad positions with junk rewards and values, then the spec's example.
    Row 1: a 2-token response followed by right padding (junk again): rewards [0, 2], values
    [0.5, 0.5]: A_2 = 2 - 0.5 = 1.5, A_1 = 0 + 0.5 - 0.5 + 0.95 * 1.5 = 1.425; returns [1.925, 2.0]."""
    junk = 9.0
    rewards = _t([[junk, junk, 0, 0, 1], [junk, 0, 2, junk, junk]])
    values = _t([[junk, junk, 0.1, 0.2, 0.3], [junk, 0.5, 0.5, junk, junk]])
    mask = _t([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask)
    torch.testing.assert_close(adv, _t([[0, 0, 0.82675, 0.765, 0.7], [0, 1.425, 1.5, 0, 0]]))
    torch.testing.assert_close(ret, _t([[0, 0, 0.92675, 0.965, 1.0], [0, 1.925, 2.0, 0, 0]]))


def test_gae_discount():
    """gamma = 0.5, lam = 0.5, rewards [1, 1], values 0: A_2 = 1, A_1 = 1 + 0.25 * 1 = 1.25."""
    adv, ret = gae(_t([[1, 1]]), _t([[0, 0]]), _t([[1, 1]]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, _t([[1.25, 1.0]]))
    torch.testing.assert_close(ret, adv)


def test_gae_detached_and_empty_mask():
    values = _t([[0.1, 0.2]]).requires_grad_()
    adv, ret = gae(_t([[0, 1]]), values, _t([[0, 0]]))
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(adv, torch.zeros(1, 2)) and torch.equal(ret, torch.zeros(1, 2))


# -- whiten ---------------------------------------------------------------------------------------------
def test_whiten_hand_check():
    """x = [1, 2, 3] (99 masked out): mean 2, unbiased var 1 -> [-1, 0, 1]; shift_mean=False adds 2 back."""
    x, mask = _t([[1, 2, 3, 99]]), _t([[1, 1, 1, 0]])
    torch.testing.assert_close(whiten(x, mask), _t([[-1, 0, 1, 0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), _t([[1, 2, 3, 0]]))


@pytest.mark.parametrize("offset", [0.0, 1e3, -5e4])
def test_whiten_matches_the_two_pass_moments_far_from_zero(offset):
    """The one-pass float64 moments equal torch's float64 mean and unbiased variance of the masked values, also
    when the values sit far from 0 relative to their spread (std 1 around ``offset``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g) + offset
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    kept = x[mask.bool()].double()
    expected = torch.where(mask.bool(), ((x.double() - kept.mean()) / (kept.var() + 1e-8).sqrt()).float(), 0.0)
    torch.testing.assert_close(whiten(x, mask), expected, rtol=1e-5, atol=1e-5 * (1 + abs(offset) / 1e3))


# -- kl-shaped rewards ------------------------------------------------------------------------------------
def test_kl_shaped_rewards_hand_check():
    """KL terms -0.1 * (-1 + 1.5) = -0.05 and -0.1 * (-2 + 1) = 0.1; score 7 clipped to 5 at the last
    token: r = [0, -0.05, 5.1]. Sequence KL estimate 0.5 - 1 = -0.5."""
    rewards, metrics = kl_shaped_rewards(_t([[0, -1, -2]]), _t([[0, -1.5, -1]]), _t([7]), _t([[0, 1, 1]]))
    torch.testing.assert_close(rewards, _t([[0, -0.05, 5.1]]))
    torch.testing.assert_close(metrics["kl"], torch.tensor(-0.5))
    torch.testing.assert_close(metrics["score"], torch.tensor(7.0))
    torch.testing.assert_close(metrics["score_clipped"], torch.tensor(5.0))
    torch.testing.assert_close(metrics["reward"], torch.tensor(5.05))


def test_kl_shaped_rewards_zero_at_init_apart_from_the_clipped_terminal_score():
    """Policy == reference: every reward is 0 but the clipped score, at each row's last response token
    (left-padded prompt, right-padded responses of lengths 3, 1 and 2)."""
    logps = torch.randn(3, 6)
    mask = _t([[0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    rewards, metrics = kl_shaped_rewards(logps, logps.clone(), _t([12.0, -7.5, 0.25]), mask, kl_coef=0.1)
    expected = torch.zeros(3, 6)
    expected[0, 3], expected[1, 2], expected[2, 4] = 5.0, -5.0, 0.25
    assert torch.equal(rewards, expected)
    assert metrics["kl"] == 0
    unclipped, _ = kl_shaped_rewards(logps, logps.clone(), _t([12.0, -7.5, 0.25]), mask, reward_clip=None)
    assert unclipped[0, 3] == 12.0 and unclipped[1, 2] == -7.5


def test_kl_shaped_rewards_row_without_response_gets_nothing():
    rewards, _ = kl_shaped_rewards(torch.zeros(2, 3), torch.zeros(2, 3), _t([1, 3]), _t([[0, 0, 0], [0, 1, 0]]))
    assert torch.equal(rewards, _t([[0, 0, 0], [0, 3, 0]]))


# -- policy loss -------------------------------------------------------------------------------------------
def _policy(ratios, advantages, mask=None, clip=0.2):
    old = torch.zeros(1, len(ratios))
    logps = torch.log(_t([ratios])).requires_grad_()
    mask = _t([mask or [1] * len(ratios)])
    loss, metrics = ppo_policy_loss(logps, old, _t([advantages]), mask, clip=clip)
    loss.backward()
    return loss, metrics, logps.grad


def test_policy_loss_hand_check_clipped_above():
    """ratios [1.5, 0.5, 1.1], advantages [1, 1, -2]: per token max(-A rho, -A clip(rho)):
    max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(2.2, 2.2) = 2.2; mean 0.5 / 3,
    clip fraction 1/3. approx_kl = mean((rho - 1) - log rho)."""
    loss, metrics, grad = _policy([1.5, 0.5, 1.1], [1, 1, -2])
    torch.testing.assert_close(loss, torch.tensor(0.5 / 3))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(1 / 3))
    k3 = sum((r - 1) - math.log(r) for r in [1.5, 0.5, 1.1]) / 3
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(k3))
    torch.testing.assert_close(metrics["ratio"], torch.tensor(3.1 / 3))
    # d/dlogp of -A rho / 3 is -A rho / 3; the clipped token gets none
    torch.testing.assert_close(grad, _t([[0.0, -0.5 / 3, 2.2 / 3]]))


def test_policy_loss_clipped_below_and_mask():
    """ratio 0.5 with A = -1: max(0.5, 0.8) = 0.8 (clipped from below, no gradient); ratio 1.1 with
    A = -1: max(1.1, 1.1) = 1.1; the third token is masked out. Loss (0.8 + 1.1) / 2 = 0.95."""
    loss, metrics, grad = _policy([0.5, 1.1, 3.0], [-1, -1, 100], mask=[1, 1, 0])
    torch.testing.assert_close(loss, torch.tensor(0.95))
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(grad, _t([[0.0, 1.1 / 2, 0.0]]))


def test_policy_loss_unclipped_variant():
    """clip=None (what the GPO launch script ran): mean(-A rho) = (-1.5 - 0.5 + 2.2) / 3, every token gets
    its gradient -A rho / 3."""
    loss, metrics, grad = _policy([1.5, 0.5, 1.1], [1, 1, -2], clip=None)
    torch.testing.assert_close(loss, torch.tensor(0.2 / 3))
    assert metrics["clip_frac"] == 0
    torch.testing.assert_close(grad, _t([[-1.5 / 3, -0.5 / 3, 2.2 / 3]]))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    loss, metrics, _ = _policy([1.0, 1.0], [2.0, -1.0])
    torch.testing.assert_close(loss, torch.tensor(-0.5))
    assert metrics["approx_kl"] == 0 and metrics["clip_frac"] == 0


# -- value loss ---------------------------------------------------------------------------------------------
def test_value_loss_hand_check():
    """V = [1, 0], V_old = [0.5, 0], G = [2, 1], clip 0.2: V_clip = [0.7, 0]; token 1: max(1, 1.69)
    = 1.69 (clipped active), token 2: max(1, 1) = 1; loss 0.5 * 2.69 / 2 = 0.6725, clip frac 1/2.
    Gradient: the clipped token's V_clip is constant in V -> 0; token 2: 0.5 * 2 (V - G) / 2 = -0.5."""
    values = _t([[1.0, 0.0]]).requires_grad_()
    loss, metrics = ppo_value_loss(values, _t([[0.5, 0.0]]), _t([[2.0, 1.0]]), _t([[1, 1]]), clip=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.6725))
    torch.testing.assert_close(metrics["value_clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(values.grad, _t([[0.0, -0.5]]))


def test_value_loss_unclipped_when_inside_range_or_disabled():
    """Inside the clip range (and with clip=None) it is 0.5 mean (V - G)^2 = 0.5 * (1 + 4) / 2 = 1.25."""
    values, returns, mask = _t([[1.0, 2.0, 5.0]]), _t([[2.0, 0.0, 0.0]]), _t([[1, 1, 0]])
    inside, m = ppo_value_loss(values, values.clone(), returns, mask)
    off, _ = ppo_value_loss(values, values + 10, returns, mask, clip=None)
    torch.testing.assert_close(inside, torch.tensor(1.25))
    torch.testing.assert_close(off, torch.tensor(1.25))
    assert m["value_clip_frac"] == 0


def test_value_loss_explained_variance():
    """A perfect critic explains all the variance; a constant one none."""
    returns, mask = _t([[1.0, 2.0, 3.0]]), _t([[1, 1, 1]])
    _, perfect = ppo_value_loss(returns.clone(), returns.clone(), returns, mask)
    _, constant = ppo_value_loss(torch.full((1, 3), 2.0), torch.full((1, 3), 2.0), returns, mask)
    torch.testing.assert_close(perfect["explained_variance"], torch.tensor(1.0))
    torch.testing.assert_close(constant["explained_variance"], torch.tensor(0.0))


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), "values"),
        (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam=1.5), "lam"),
        (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=-1), "gamma"),
        (lambda: gae(torch.zeros(3), torch.zeros(3), torch.ones(3)), "mask"),
        (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 2)),
         "old_logps"),
        (lambda: ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), clip=0),
         "clip"),
        (lambda: ppo_value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2, 2), torch.ones(1, 2)),
         "returns"),
        (lambda: kl_shaped_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)),
         "scores"),
        (lambda: kl_shaped_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                                   kl_coef=-0.1), "kl_coef"),
        (lambda: kl_shaped_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3),
                                   reward_clip=0), "reward_clip"),
        (lambda: whiten(torch.zeros(2, 3), torch.ones(2, 2)), "x"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
