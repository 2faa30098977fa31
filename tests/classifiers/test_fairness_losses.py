"""Relaxed fairness losses of FIS (others.md §4(b)), against values worked out by hand."""

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.losses import accuracy_loss, fairness_gaps, fairness_loss

# rows: (p(0), p(1)), label, group
PROBS = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
LABELS = torch.tensor([1, 0, 1, 0, 1])
GROUPS = torch.tensor([0, 0, 1, 1, 1])


def test_dp_two_entries_clipped_renormalised_and_divided_by_m_m1_k():
    """H[0] = mean(rows 0, 1) = [0.3, 0.7]; H[1] = mean(rows 2, 3, 4) = [0.7, 0.3]; no clipping needed;
    Delta = (H[0] - H[1]) / (2 * 1 * 2) = [-0.1, 0.1]; L = 1/2 * 0.02 = 0.01 (mu = 1), 0.02 with mu = 2."""
    delta = fairness_gaps(PROBS, LABELS, GROUPS, "dp")
    assert delta.tolist() == pytest.approx([-0.1, 0.1])
    assert fairness_loss(PROBS, LABELS, GROUPS, "dp")[0].item() == pytest.approx(0.01)
    assert fairness_loss(PROBS, LABELS, GROUPS, "dp", mu=2.0)[0].item() == pytest.approx(0.02)


def test_dp_clip_then_renormalise():
    """Group 0 mean [0, 1] clips to [1e-3, 1] and renormalises to [1e-3/1.001, 1/1.001]; group 1 is [0.5, 0.5]:
    Delta[0] = (0.000999 - 0.5) / 4."""
    probs = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    delta = fairness_gaps(probs, torch.tensor([1, 1]), torch.tensor([0, 1]), "dp")
    assert delta[0].item() == pytest.approx((1e-3 / 1.001 - 0.5) / 4)
    assert delta[1].item() == pytest.approx((1 / 1.001 - 0.5) / 4)


def test_dp_three_groups_has_one_entry_per_pair_and_class():
    """M = 3, K = 2: three pairs x two classes = 6 entries, divided by 3 * 2 * 2 = 12."""
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    delta = fairness_gaps(probs, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), "dp", num_groups=3)
    assert delta.shape == (6,)
    assert delta[:2].tolist() == pytest.approx([(0.2 - 0.6) / 12, (0.8 - 0.4) / 12])


def test_eop_and_eod_by_hand():
    """EOp on y = 1: group 0 row 0 p1 = 0.8; group 1 rows 2, 4 p1 = mean(0.1, 0.5) = 0.3 -> Delta = [0.5].
    EOd adds y = 0 first: group 0 row 1 p1 = 0.6, group 1 row 3 p1 = 0.3 -> Delta = [0.3, 0.5];
    L_eod = 0.5 * (0.09 + 0.25) = 0.17."""
    assert fairness_gaps(PROBS, LABELS, GROUPS, "eop").tolist() == pytest.approx([0.5])
    assert fairness_gaps(PROBS, LABELS, GROUPS, "eod").tolist() == pytest.approx([0.3, 0.5])
    assert fairness_loss(PROBS, LABELS, GROUPS, "eod")[0].item() == pytest.approx(0.17)


def test_a_group_without_positives_has_no_eop_term():
    """Group 1 has no y = 1 row: no EOp pair exists, the loss is 0 rather than a fake gap."""
    loss, _ = fairness_loss(PROBS[:2], torch.tensor([1, 1]), torch.tensor([0, 0]), "eop")
    assert loss.item() == 0.0


def test_losses_are_differentiable_and_accuracy_loss_is_mean_ce():
    logits = torch.randn(5, 2, requires_grad=True)
    loss, _ = fairness_loss(logits.softmax(-1), LABELS, GROUPS, "dp")
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert accuracy_loss(torch.zeros(3, 2), torch.tensor([0, 1, 1])).item() == pytest.approx(0.6931, abs=1e-4)


def test_unknown_kind_names_the_key():
    with pytest.raises(ConfigError, match="fairness must be one of"):
        fairness_gaps(PROBS, LABELS, GROUPS, "parity")
