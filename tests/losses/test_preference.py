"""Preference and NLL losses against values worked out by hand (derivations in each docstring)."""

import math

import pytest
import torch

from lit_align.losses import DPOLoss, IPOLoss, PreferenceLoss, dpo_loss, ipo_loss, nll_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _pairs(pc, pr, rc, rr):
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr))


# --------------------------------------------------------------------------------------- DPO


def test_dpo_equal_logps_is_log2():
    """policy == reference: h = 0 for every pair, loss = -log sigmoid(0) = -log(1/2) = log 2.

    Holds for any beta and any log-probs, so use arbitrary ones and beta = 0.3.
    """
    pc, pr = torch.tensor([-3.0, -10.0, -0.5]), torch.tensor([-4.0, -2.0, -7.0])
    loss, metrics = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not counted as correct


def test_dpo_numeric_case():
    """h = (pi_c - ref_c) - (pi_r - ref_r) = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta = 0.5.

    loss = -log sigmoid(0.5 * 2) = -log sigmoid(1) = log(1 + e^-1) = 0.313261687...
    """
    loss, _ = dpo_loss(*_pairs([-1.0], [-3.0], [-2.0], [-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)
    assert loss.item() == pytest.approx(0.3132616875182228, abs=1e-12)


def test_dpo_batch_mean():
    """Two pairs, beta = 1: h_1 = 2 - 0 = 2, h_2 = 0 - 1 = -1 (ref log-probs all 0).

    loss = (log(1 + e^-2) + log(1 + e^1)) / 2 = (0.126928 + 1.313262) / 2 = 0.720095.
    """
    loss, _ = dpo_loss(*_pairs([2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]), beta=1.0)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_label_smoothing():
    """Same pair as ``test_dpo_numeric_case`` (beta h = 1) with eps = 0.1.

    loss = -(1 - eps) log sigmoid(1) - eps log sigmoid(-1)
         = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617.
    Cross-check: log sigmoid(z) - log sigmoid(-z) = z, so loss = -log sigmoid(1) + eps * 1 = 0.3132617 + 0.1.
    """
    loss, _ = dpo_loss(*_pairs([-1.0], [-3.0], [-2.0], [-2.0]), beta=0.5, label_smoothing=0.1)
    expected = -0.9 * _log_sigmoid(1.0) - 0.1 * _log_sigmoid(-1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 0.1, abs=1e-12)


def test_dpo_label_smoothing_at_equal_logps_is_log2():
    """h = 0: -(1 - eps) log(1/2) - eps log(1/2) = log 2 whatever eps."""
    z = torch.zeros(4)
    loss, _ = dpo_loss(z, z, z, z, label_smoothing=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_is_stable_for_large_margins():
    """beta h = -1000: log sigmoid(-1000) = -1000 - log(1 + e^-1000) = -1000 exactly in float; no inf/NaN."""
    loss, _ = dpo_loss(*_pairs([0.0], [0.0], [1000.0], [0.0]), beta=1.0)
    assert loss.item() == pytest.approx(1000.0)
    loss, _ = dpo_loss(*_pairs([1000.0], [0.0], [0.0], [0.0]), beta=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_preference_metrics():
    """beta = 0.5, two pairs.

    pair 1: pi_c = -1, ref_c = -2 -> reward_c = 0.5 * 1 = 0.5;  pi_r = -3, ref_r = -2 -> reward_r = -0.5
    pair 2: pi_c = -4, ref_c = -3 -> reward_c = -0.5;           pi_r = -1, ref_r = -2 -> reward_r = 0.5
    rewards/chosen = (0.5 - 0.5) / 2 = 0, rewards/rejected = 0, margins = (1 + -1) / 2 = 0,
    accuracies = (1 + 0) / 2 = 0.5, logps/chosen = (-1 - 4) / 2 = -2.5, logps/rejected = (-3 - 1) / 2 = -2.
    Change pair 2's pi_c to -2 (reward_c = 0.5): chosen = 0.5, margins = (1 + 0) / 2 = 0.5, accuracies = 0.5
    (pair 2 ties), logps/chosen = -1.5.
    """
    pc, pr, rc, rr = _pairs([-1.0, -4.0], [-3.0, -1.0], [-2.0, -3.0], [-2.0, -2.0])
    pc.requires_grad_(True)
    for fn in (dpo_loss, ipo_loss):
        _, m = fn(pc, pr, rc, rr, beta=0.5)
        expected = {
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/margins": 0.0,
            "rewards/accuracies": 0.5,
            "logps/chosen": -2.5,
            "logps/rejected": -2.0,
        }
        assert set(m) == set(expected)
        for key, value in expected.items():
            assert m[key].item() == pytest.approx(value, abs=1e-12), key
            assert not m[key].requires_grad and m[key].ndim == 0, key

    _, m = dpo_loss(torch.tensor([-1.0, -2.0]), pr.float(), rc.float(), rr.float(), beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.5)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["logps/chosen"].item() == pytest.approx(-1.5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_gradient_signs(label_smoothing):
    """d loss / d pi_c = -beta [(1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)] and d loss / d pi_r is its negative.

    At h = 0 that is -beta (1 - 2 eps) / 2 (per pair, then / B for the mean): with beta = 0.1, B = 2,
    eps = 0 -> -0.025, eps = 0.2 -> -0.015. Negative: raising the chosen log-prob lowers the loss,
    raising the rejected one raises it; the reference gets the opposite gradients.
    """
    pc, pr, rc, rr = (torch.zeros(2, requires_grad=True) for _ in range(4))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing)
    loss.backward()
    expected = -0.1 * (1 - 2 * label_smoothing) / 2 / 2
    torch.testing.assert_close(pc.grad, torch.full((2,), expected))
    torch.testing.assert_close(pr.grad, torch.full((2,), -expected))
    torch.testing.assert_close(rc.grad, torch.full((2,), -expected))
    torch.testing.assert_close(rr.grad, torch.full((2,), expected))

    # Finite step: pi_c up by 1 lowers the loss from log 2 to -log sigmoid(0.1) - eps * 0.1 ... < log 2.
    higher, _ = dpo_loss(pc.detach() + 1, pr.detach(), rc.detach(), rr.detach(), label_smoothing=label_smoothing)
    assert higher.item() < loss.item()


# --------------------------------------------------------------------------------------- IPO


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_equal_logps(beta):
    """h = 0: loss = (0 - 1 / (2 beta))^2 = 1 / (4 beta^2): 25 for beta 0.1, 1 for 0.5, 1/16 for 2."""
    x = torch.tensor([-1.5, -0.25])
    loss, _ = ipo_loss(x, x + 1, x.clone(), x + 1, beta=beta)
    assert loss.item() == pytest.approx(1 / (4 * beta**2), rel=1e-6)


def test_ipo_numeric_case():
    """beta = 0.25 -> target 1 / (2 beta) = 2.

    pair 1: h = (-1 - -2) - (-3 - -2) = 1 + 1 = 2 -> (2 - 2)^2 = 0
    pair 2: h = (-1 - -1) - (-1 - -2) = 0 - 1 = -1 -> (-1 - 2)^2 = 9
    loss = (0 + 9) / 2 = 4.5.
    """
    loss, _ = ipo_loss(*_pairs([-1.0, -1.0], [-3.0, -1.0], [-2.0, -1.0], [-2.0, -2.0]), beta=0.25)
    assert loss.item() == pytest.approx(4.5, abs=1e-12)


def test_ipo_gradient_signs():
    """d loss / d pi_c = 2 (h - 1 / (2 beta)) / B: at h = 0, beta = 0.5, B = 1 that is 2 * (0 - 1) = -2.

    Below the target margin raising the chosen log-prob lowers the loss; above it (h = 3 > 1) the
    gradient is 2 * (3 - 1) = 4 > 0: IPO pulls the margin back instead of pushing it forever.
    """
    pc, pr, rc, rr = (torch.zeros(1, requires_grad=True) for _ in range(4))
    ipo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-2.0]))
    torch.testing.assert_close(pr.grad, torch.tensor([2.0]))

    pc = torch.tensor([3.0], requires_grad=True)
    ipo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5)[0].backward()
    torch.testing.assert_close(pc.grad, torch.tensor([4.0]))


# ------------------------------------------------------------------------- validation & configs


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss])
def test_shape_errors(fn):
    ok = torch.zeros(3)
    with pytest.raises(ValueError, match="same \\(B,\\) shape"):
        fn(ok, torch.zeros(4), ok, ok)
    with pytest.raises(ValueError, match="same \\(B,\\) shape"):
        fn(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="same \\(B,\\) shape"):
        fn(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_argument_errors():
    z = torch.zeros(2)
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(z, z, z, z, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            ipo_loss(z, z, z, z, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            DPOLoss(beta=beta)
        with pytest.raises(ValueError, match="beta"):
            IPOLoss(beta=beta)
    for eps in (-0.1, 0.5, 0.9):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(z, z, z, z, label_smoothing=eps)
        with pytest.raises(ValueError, match="label_smoothing"):
            DPOLoss(label_smoothing=eps)


def test_config_objects_call_the_functions():
    """The config objects forward their hyper-parameters and declare the reduction their inputs need."""
    pc, pr, rc, rr = _pairs([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0])
    dpo = DPOLoss(beta=0.5, label_smoothing=0.1)
    ipo = IPOLoss(beta=0.25)
    assert isinstance(dpo, PreferenceLoss) and isinstance(ipo, PreferenceLoss)
    assert DPOLoss.reduction == dpo.reduction == "sum"
    assert IPOLoss.reduction == ipo.reduction == "mean"
    assert dpo(pc, pr, rc, rr)[0].item() == dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)[0].item()
    assert ipo(pc, pr, rc, rr)[0].item() == ipo_loss(pc, pr, rc, rr, beta=0.25)[0].item()
    assert repr(dpo) == "DPOLoss(beta=0.5, label_smoothing=0.1)"
    assert repr(ipo) == "IPOLoss(beta=0.25)"
    with pytest.raises(TypeError):
        PreferenceLoss()  # abstract


def test_config_objects_from_class_path():
    """jsonargparse (what LightningCLI uses) picks the loss by ``class_path`` and validates its arguments."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=PreferenceLoss)
    cfg = parser.parse_args(["--loss", '{"class_path": "lit_align.losses.IPOLoss", "init_args": {"beta": 0.5}}'])
    loss = parser.instantiate(cfg).loss
    assert isinstance(loss, IPOLoss) and loss.beta == 0.5 and loss.reduction == "mean"

    cfg = parser.parse_args(
        ["--loss", '{"class_path": "lit_align.losses.DPOLoss", "init_args": {"label_smoothing": 0.2}}']
    )
    loss = parser.instantiate(cfg).loss
    assert isinstance(loss, DPOLoss) and (loss.beta, loss.label_smoothing) == (0.1, 0.2)


# --------------------------------------------------------------------------------------- NLL


def test_nll_token_and_sequence_reductions():
    """token_logps = [[log 1/2, log 1/4, 0], [log 1/8, 0, 0]] (NLLs ln2, 2 ln2 | 3 ln2), masks [[1,1,0],[1,0,0]].

    token:    (ln2 + 2 ln2 + 3 ln2) / 3 = 2 ln2 = 1.386294
    sequence: mean((ln2 + 2 ln2) / 2, 3 ln2 / 1) = (1.5 + 3) / 2 ln2 = 2.25 ln2 = 1.559581
    metrics: nll = 2 ln2 (token mean for both), ppl = e^(2 ln 2) = 4, tokens = 3.
    """
    logps = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.125), 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ln2 = math.log(2)
    loss, m = nll_loss(logps, mask)
    assert loss.item() == pytest.approx(2 * ln2, abs=1e-12)
    assert m["nll"].item() == pytest.approx(2 * ln2, abs=1e-12)
    assert m["ppl"].item() == pytest.approx(4.0, abs=1e-12)
    assert m["tokens"].item() == 3
    loss, m = nll_loss(logps, mask, reduction="sequence")
    assert loss.item() == pytest.approx(2.25 * ln2, abs=1e-12)
    assert m["nll"].item() == pytest.approx(2 * ln2, abs=1e-12)


def test_nll_ignores_unmasked_values_and_empty_rows():
    """Unmasked entries (here -inf and NaN) must not leak. Row 2 has no scored token.

    token:    (1 + 3) / 2 = 2;   sequence: mean over rows with tokens only = (1 + 3) / 2 = 2
    (row 0: one token NLL 1; row 1: one token NLL 3). Gradient of the token loss: -1/2 on the two
    scored entries, 0 elsewhere (also at the -inf / NaN entries).
    """
    logps = torch.tensor([[-1.0, float("-inf")], [float("nan"), -3.0], [-5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True], [False, False]])
    loss, m = nll_loss(logps, mask)
    assert loss.item() == pytest.approx(2.0)
    assert m["tokens"].item() == 2
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, 0.0], [0.0, -0.5], [0.0, 0.0]]))
    loss, _ = nll_loss(logps, mask, reduction="sequence")
    assert loss.item() == pytest.approx(2.0)


def test_nll_no_tokens_is_zero():
    """Nothing scored: loss 0 (not NaN) with a graph, nll 0, ppl e^0 = 1, tokens 0."""
    logps = torch.randn(2, 3, requires_grad=True)
    for reduction in ("token", "sequence"):
        loss, m = nll_loss(logps, torch.zeros(2, 3), reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        assert (m["nll"].item(), m["ppl"].item(), m["tokens"].item()) == (0.0, 1.0, 0.0)


def test_nll_errors():
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        nll_loss(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        nll_loss(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        nll_loss(torch.zeros(2, 3), torch.ones(2, 3), reduction="sum")


def test_nll_loss_with_a_global_token_count():
    """Rank 0 holds [[log 1/2, log 1/4]] (2 tokens), rank 1 holds [[log 1/8]] (1 token); the global
    token mean is (1 + 2 + 3) log 2 / 3 = 2 log 2. Dividing each rank's sum by 3 / 2 (global count
    over 2 ranks) and averaging the ranks gives ((3 log 2) / 1.5 + (3 log 2) / 1.5) / 2 = 2 log 2,
    whereas averaging the ranks' own token means gives (1.5 log 2 + 3 log 2) / 2 = 2.25 log 2."""
    ln2 = math.log(2.0)
    rank0 = nll_loss(torch.tensor([[-ln2, -2 * ln2]]), torch.ones(1, 2), num_tokens=1.5)[0]
    rank1 = nll_loss(torch.tensor([[-3 * ln2]]), torch.ones(1, 1), num_tokens=1.5)[0]
    assert float((rank0 + rank1) / 2) == pytest.approx(2 * ln2)
