"""C-AdvUL / C-AdvIPO losses against values worked out by hand (§8(g)6-7; derivations in each docstring)."""

import math

import pytest
import torch

from lit_align.errors import ConfigError
from lit_align.losses import CAdvIPO, CAdvUL, away_loss, ipo_loss, toward_loss, windowed_mean_logps


def _one_token(logp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 2) row whose one scored token has log-prob ``logp`` (its CE is ``-logp``); the other is padding."""
    return torch.tensor([[logp, 123.0]], dtype=torch.float64, requires_grad=True), torch.tensor([[1, 0]])


def test_away_soft_floor_exact():
    """§8(g)6: CE = 6 (> 5): -CE = -6 < c_away = -5, so L = -5 + 0.001 * (-6) = -5.006; CE = 1: L = -1."""
    logps, mask = _one_token(-6.0)
    loss, metrics = away_loss(logps, mask, cutoff=-5.0)
    assert loss.item() == pytest.approx(-5.006, abs=1e-12)
    assert metrics["ce"].item() == pytest.approx(6.0) and metrics["floored"].item() == 1.0
    loss, metrics = away_loss(*_one_token(-1.0), cutoff=-5.0)
    assert loss.item() == pytest.approx(-1.0, abs=1e-12) and metrics["floored"].item() == 0.0


def test_toward_soft_floor_exact():
    """§8(g)6: CE = 0.2 < c_toward = 0.5: L = 0.5 + 0.001 * 0.2 = 0.5002; CE = 2: L = 2."""
    loss, metrics = toward_loss(*_one_token(-0.2), cutoff=0.5)
    assert loss.item() == pytest.approx(0.5002, abs=1e-12) and metrics["floored"].item() == 1.0
    loss, _ = toward_loss(*_one_token(-2.0), cutoff=0.5)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize("fn,inside,outside,cutoff", [(away_loss, -1.0, -6.0, -5.0), (toward_loss, -2.0, -0.2, 0.5)])
def test_floor_shrinks_gradient_1000x(fn, inside, outside, cutoff):
    """d L / d logp: away (L = -CE = logp) is 1 inside, 0.001 past the floor; toward (L = CE = -logp) is -1
    inside, -0.001 past it."""
    grads = []
    for logp in (inside, outside):
        logps, mask = _one_token(logp)
        fn(logps, mask, cutoff=cutoff)[0].backward()
        grads.append(logps.grad[0, 0].item())
    assert abs(grads[0]) == pytest.approx(1.0) and abs(grads[1]) == pytest.approx(1e-3)
    assert math.copysign(1, grads[0]) == math.copysign(1, grads[1])


def test_away_is_the_batch_token_mean():
    """Two rows, 1 and 2 scored tokens with log-probs -1 | -2, -3: CE = (1 + 2 + 3) / 3 = 2, L = -2."""
    logps = torch.tensor([[-1.0, 0.0], [-2.0, -3.0]])
    loss, _ = away_loss(logps, torch.tensor([[1, 0], [1, 1]]))
    assert loss.item() == pytest.approx(-2.0)


def test_log_1_minus_p_away():
    """Tokens with p = 1/2, 1/4 and log p = -6 (< cutoff -5, windowed out), all scored (N = 3):
    L = -(log(1/2) + log(3/4) + 0) / 3 = (log 2 + log 4/3) / 3."""
    logps = torch.tensor([[math.log(0.5), math.log(0.25), -6.0]], requires_grad=True)
    loss, metrics = away_loss(logps, torch.ones(1, 3), kind="log_1_minus_p")
    assert loss.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 3, rel=1e-6)
    assert metrics["floored"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert logps.grad[0, 2].item() == 0.0  # outside the window
    # a certain token (log p = 0) stays finite: clamped to log(1 - 1e-6)
    certain, _ = away_loss(torch.zeros(1, 1), torch.ones(1, 1), kind="log_1_minus_p")
    assert certain.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_windowed_mean_logps():
    """Row 1: log-probs [-1, -6, -2] all scored, lower -5: (-1 + 0 - 2) / 3 = -1 (denominator counts all 3);
    row 2: [-7, pad, pad] with one scored token: 0 / 1 = 0. Upper -1.5 (toward_cutoff 1.5) drops the likely
    token: (0 - 6 - 2) / 3; upper 0 (the released toward_cutoff 0) or no bound is no window: -3 and -7."""
    logps = torch.tensor([[-1.0, -6.0, -2.0], [-7.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert windowed_mean_logps(logps, mask, lower=-5.0).tolist() == pytest.approx([-1.0, 0.0])
    assert windowed_mean_logps(logps, mask, upper=-1.5).tolist() == pytest.approx([-8.0 / 3, -7.0])
    assert windowed_mean_logps(logps, mask, upper=-0.0).tolist() == pytest.approx([-3.0, -7.0])
    assert windowed_mean_logps(logps, mask).tolist() == pytest.approx([-3.0, -7.0])


def test_released_toward_window_is_an_upper_bound():
    """The released get_batch_logps(upper_cutoff=-toward_cutoff): toward_cutoff 0.5 zeroes safe tokens with
    log p > -0.5 (reviewer's example: [-0.1, -0.3, -2, -7] -> (-2 - 7) / 4 = -2.25); 0 keeps them all (-2.35)."""
    safe = torch.tensor([[-0.1, -0.3, -2.0, -7.0]])
    harm = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    for cutoff, expected in ((0.5, -2.25), (0.0, -2.35)):
        _, toward = CAdvIPO(toward_cutoff=cutoff, reference_cutoffs=True).reference_means(harm, mask, safe, mask)
        assert toward.item() == pytest.approx(expected)


def test_ipo_at_init_is_four():
    """§8(g)7: policy == reference (same model, clean inputs, delta = 0): h = 0 and
    L_IPO = (0 - 1/(2 * 0.25))^2 = 2^2 = 4, through the windowed mean log-probs the module feeds it."""
    safe = windowed_mean_logps(torch.tensor([[-0.5, -1.5]]), torch.ones(1, 2), upper=-0.0)
    harm = windowed_mean_logps(torch.tensor([[-2.0, -3.0]]), torch.ones(1, 2), lower=-5.0)
    loss, metrics = ipo_loss(safe, harm, safe.clone(), harm.clone(), beta=0.25)
    assert loss.item() == pytest.approx(4.0) and metrics["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("cutoff", [float("nan"), float("inf"), "a", True])
def test_bad_cutoff_names_the_key(cutoff):
    with pytest.raises(ConfigError, match="model.objective.init_args.away_cutoff"):
        away_loss(torch.zeros(1, 1), torch.ones(1, 1), cutoff=cutoff)
    with pytest.raises(ConfigError, match="away_kind"):
        away_loss(torch.zeros(1, 1), torch.ones(1, 1), kind="gradient_ascent")


def test_objectives_combine_the_terms():
    """CAdvUL: 0.5 * away + 0.5 * toward with away CE 6 (floored: -5.006) and toward CE 2: 0.5 * (-5.006 + 2)
    = -1.503. CAdvIPO with the reference equal to the policy's plain means and no token below -5: h = 0, loss 4."""
    away, toward, mask = torch.tensor([[-6.0]]), torch.tensor([[-2.0]]), torch.ones(1, 1)
    loss, metrics = CAdvUL()(away, mask, toward, mask)
    assert loss.item() == pytest.approx(-1.503) and metrics["away_loss"].item() == pytest.approx(-5.006)
    away = torch.tensor([[-1.0, -3.0]])
    ipo = CAdvIPO(beta=0.25)
    refs = ipo.reference_means(away, torch.ones(1, 2), toward, mask)
    loss, metrics = ipo(away, torch.ones(1, 2), toward, mask, *refs)
    assert loss.item() == pytest.approx(4.0) and metrics["h"].item() == 0.0
    with pytest.raises(ConfigError, match="model.objective.init_args.beta"):
        CAdvIPO(beta=0.0)


@pytest.mark.parametrize("objective", [CAdvUL(), CAdvIPO()], ids=["ul", "ipo"])
def test_metric_keys_name_what_the_objective_returns(objective):
    """Validation logs every ``metric_keys`` entry on every rank (0 with weight 0 where a rank has no pairs), so
    the names must be exactly the returned ones, in order."""
    logps, mask = torch.tensor([[-1.0, -6.0, -2.0]]), torch.ones(1, 3)
    _, metrics = objective(logps, mask, logps, mask, torch.tensor([-2.0]), torch.tensor([-3.0]))
    assert tuple(metrics) == objective.metric_keys
