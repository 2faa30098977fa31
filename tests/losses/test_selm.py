"""SELM's loss (others.md §7(g) 1-3) against hand-derived values, and its config object."""

import copy
import math

import pytest
import torch
from conftest import tiny_lm

from lit_align.errors import ConfigError
from lit_align.losses import DPOLoss, SELMLoss, dpo_loss, selm_loss
from lit_align.rollout import sequence_logps


def _scored(model, prompts, responses):
    """(B,) summed response log-probs of ``responses`` after ``prompts`` (token ids), right-padded."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attn = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    loss_mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r))
                              for p, r in zip(prompts, responses)])
    return sequence_logps(model, ids, attn, loss_mask)


def test_selm_loss_is_log2_at_initialisation():
    """§7(g)1: a tiny LM as the policy and a deep copy as the reference, on synthetic prompts with chosen,
    rejected and reference responses of different lengths. pi == ref gives Delta = 0 and rho = 0 for every
    example, so loss = -log sigmoid(0) + alpha beta 0 = log 2 (and rho's metric is 0)."""
    policy = tiny_lm(vocab_size=50, hidden_size=32)
    reference = copy.deepcopy(policy)
    prompts = [[1, 2, 3], [4, 5]]
    chosen, rejected, y_ref = [[6, 7], [8, 9, 10]], [[11], [12, 13, 14, 15]], [[16, 17, 18], [19]]
    logps = [_scored(m, prompts, ys) for ys in (chosen, rejected) for m in (policy, reference)]
    pc, rc, pr, rr = logps
    pi_ref, ref_ref = _scored(policy, prompts, y_ref), _scored(reference, prompts, y_ref)
    loss, metrics = selm_loss(pc, pr, rc, rr, pi_ref, ref_ref, beta=0.01, alpha=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["optimism"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["logps/pi_response"].item() == pytest.approx(metrics["logps/ref_response"].item(), abs=1e-6)


def test_selm_numeric_case():
    """One example: h = (-1 - -2) - (-3 - -2) = 2, rho = -4 - -5 = 1, beta = 0.5, alpha = 0.2:
    loss = -log sigmoid(0.5 * 2) + 0.2 * 0.5 * 1 = log(1 + e^-1) + 0.1 = 0.4132617 (the sign is +, §7(h)1)."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    loss, metrics = selm_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(-4.0), t(-5.0), beta=0.5, alpha=0.2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 0.1, abs=1e-12)
    assert metrics["logps/pi_response"].item() == -4.0 and metrics["logps/ref_response"].item() == -5.0
    assert metrics["optimism"].item() == 1.0


def test_selm_alpha_zero_equals_dpo_loss_and_gradients():
    """§7(g)2: with alpha = 0 the optimism term vanishes, so the loss, every metric dpo_loss reports and the
    gradients of the four pair log-probs equal dpo_loss's; the reference response gets zero gradient."""
    g = torch.Generator().manual_seed(0)
    leaves = [(torch.randn(5, generator=g, dtype=torch.float64) * 10).requires_grad_() for _ in range(6)]
    twins = [x.detach().clone().requires_grad_() for x in leaves[:4]]
    loss, metrics = selm_loss(*leaves, beta=0.1, alpha=0.0)
    expected, expected_metrics = dpo_loss(*twins, beta=0.1)
    loss.backward()
    expected.backward()
    assert loss.item() == expected.item()
    for key, value in expected_metrics.items():
        assert metrics[key].item() == value.item(), key
    for mine, theirs in zip(leaves[:4], twins):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0)
    assert torch.count_nonzero(leaves[4].grad) == 0 and torch.count_nonzero(leaves[5].grad) == 0


def test_selm_config_object_with_alpha_zero_equals_dpo_config_object():
    """SELMLoss(alpha=0) and DPOLoss give the same loss on the same inputs (the class-level form of §7(g)2)."""
    x = [torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -5.0]), torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -4.0])]
    selm, _ = SELMLoss(beta=0.2, alpha=0.0)(*x, torch.tensor([-7.0, -1.0]), torch.tensor([-3.0, -2.0]))
    dpo, _ = DPOLoss(beta=0.2)(*x)
    assert selm.item() == pytest.approx(dpo.item(), abs=1e-7)


def test_selm_gradient_of_policy_reference_logps_is_alpha_beta_over_b():
    """§7(g)3: d loss / d pi_ref_b = alpha beta / B for every b (the term is linear in rho and averaged over
    B = 4); d loss / d ref_ref_b = -alpha beta / B. Leaf tensors, arbitrary values."""
    beta, alpha, b = 0.01, 0.001, 4
    leaves = [torch.randn(b, dtype=torch.float64).requires_grad_() for _ in range(6)]
    loss, _ = selm_loss(*leaves, beta=beta, alpha=alpha)
    loss.backward()
    torch.testing.assert_close(leaves[4].grad, torch.full((b,), alpha * beta / b, dtype=torch.float64))
    torch.testing.assert_close(leaves[5].grad, torch.full((b,), -alpha * beta / b, dtype=torch.float64))


def test_selm_bad_input():
    with pytest.raises(ConfigError, match="loss_type.*sigmoid"):
        SELMLoss(alpha=0.001, loss_type="ipo")
    with pytest.raises(ConfigError, match=r"^model\.loss\.init_args\.alpha must be a finite number >= 0 \(0 is plain"):
        SELMLoss(alpha=-1.0)
    z = torch.zeros(3)
    with pytest.raises(ConfigError, match=r"^alpha must be a finite number >= 0 \(0 is plain online DPO\), got nan"):
        selm_loss(z, z, z, z, z, z, alpha=float("nan"))  # the function names its own argument, one check for both
    with pytest.raises(ConfigError, match="beta"):
        SELMLoss(beta=0.0)
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="reference response"):
        SELMLoss()(z, z, z, z)
    with pytest.raises(ValueError, match="reference-response"):
        selm_loss(z, z, z, z, torch.zeros(2), z)
    assert SELMLoss.needs_reference_response and not DPOLoss.needs_reference_response
    assert (SELMLoss().beta, SELMLoss().alpha) == (0.01, 0.001)
