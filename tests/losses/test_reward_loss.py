"""The Bradley-Terry reward-model loss by hand: margin, centring, metrics, gradients."""

import math

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.losses import bradley_terry_loss


def test_by_hand():
    c, r = torch.tensor([2.0]), torch.tensor([0.0])
    loss, m = bradley_terry_loss(c, r)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2)))
    assert bradley_terry_loss(c, r, margin=torch.tensor([2.0]))[0].item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(c, r, center_coef=0.1)[0].item() == pytest.approx(math.log1p(math.exp(-2)) + 0.4)
    assert (m["accuracy"].item(), m["margin"].item(), m["chosen"].item(), m["rejected"].item()) == (1.0, 2.0, 2.0, 0.0)


def test_gradient_pushes_the_pair_apart_and_ties_count_as_wrong():
    c = torch.tensor([0.5, 1.0], requires_grad=True)
    r = torch.tensor([0.5, -1.0], requires_grad=True)
    loss, m = bradley_terry_loss(c, r)
    loss.backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()  # descent raises chosen, lowers rejected
    assert m["accuracy"].item() == 0.5  # the tie is not a win


def test_bad_input():
    with pytest.raises(ValueError, match="same non-empty"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ConfigError, match="center_coef"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1.0)
