"""RLOO and GRPO advantages against hand derivations and their defining identities."""

import math

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.losses import grpo_advantages, rloo_advantages


def test_rloo_by_hand_and_leave_one_out():
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    a = rloo_advantages(r, 3)
    torch.testing.assert_close(a, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # the baseline of sample i excludes r_i: changing r_i moves A_i by exactly the change and the others by
    # -change / (k - 1)
    bumped = rloo_advantages(r + torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0]), 3)
    torch.testing.assert_close(bumped - a, torch.tensor([-1.0, -1.0, 2.0, 0.0, 0.0, 0.0]))
    g = torch.randn(40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo_advantages(g, 4).view(10, 4).sum(-1), torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(rloo_advantages(g, 4), (4 / 3 * (g.view(10, 4) - g.view(10, 4).mean(-1, True))).reshape(-1))


def test_grpo_by_hand_with_and_without_std():
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7) + 1e-4)
    a = grpo_advantages(r, 3)
    torch.testing.assert_close(a[:3], expected)
    torch.testing.assert_close(a[3:], torch.zeros(3))  # equal rewards: no signal, no division by zero
    torch.testing.assert_close(grpo_advantages(r, 3, scale_by_std=False), torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0]))


def test_groups_never_mix_prompts():
    """Adding a constant to one prompt's rewards changes no advantage (a per-prompt baseline)."""
    r = torch.randn(12, generator=torch.Generator().manual_seed(1))
    shifted = r + torch.repeat_interleave(torch.tensor([0.0, 10.0, -3.0]), 4)
    for fn in (rloo_advantages, grpo_advantages):
        torch.testing.assert_close(fn(shifted, 4), fn(r, 4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_bad_group_sizes(fn):
    with pytest.raises(ConfigError, match="group_size .* must be an int >= 2"):
        fn(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"rewards must be \(B \* k,\)"):
        fn(torch.zeros(5), 2)
