"""UGradSL's classifier objective against hand-derived values and its intended effects on a tiny MLP.

Spec: shared/methods/others.md §2(b) (losses, adaptive alpha), §2(g) 1-4 (minimal CPU tests; item 5, Avg. Gap, is
tested with the metrics), §2(h) 1, 2, 4 (sign, log space, sum vs mean). K = 5 classes throughout (§2(g)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_align.errors import ConfigError
from lit_align.losses import adaptive_alpha, feature_distances, gls_cross_entropy, ugradsl_objective

K = 5
LOG2 = math.log(2.0)


def _soft_target_ce(logits, labels, alpha, reduction="mean"):
    """Cross-entropy with the smoothed target ``(1 - alpha) onehot(y) + alpha / K`` written directly (the
    definition of §2(b)); ``alpha`` a number or an (N,) tensor."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1, 1)
    target = (1 - alpha) * F.one_hot(labels, logits.shape[-1]).float() + alpha / logits.shape[-1]
    rows = -(target * logits.log_softmax(-1)).sum(-1)
    return rows.sum() if reduction == "sum" else rows.mean()


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, K, (n,), generator=g)


def _trained_mlp(x, y, seed=0):
    """A tiny MLP fitted to (x, y): unlearning starts from a model that knows its forget set."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, K))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad()
    return net


# -- §2(g)1: GLS ------------------------------------------------------------------------------------------------
def test_gls_is_ce_at_zero_and_the_soft_target_ce_for_any_alpha():
    logits, labels = torch.randn(8, K), torch.randint(0, K, (8,))
    torch.testing.assert_close(gls_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels))
    for alpha in (0.3, -0.5, -4.0):
        for reduction in ("mean", "sum"):
            torch.testing.assert_close(gls_cross_entropy(logits, labels, alpha, reduction=reduction),
                                       _soft_target_ce(logits, labels, alpha, reduction))
    per_row = torch.tensor([0.3, -0.5, -4.0, 0.0, 1.0, -1.0, -8.0, 0.5])  # adaptive alpha: one rate per row
    torch.testing.assert_close(gls_cross_entropy(logits, labels, per_row), _soft_target_ce(logits, labels, per_row))


def test_gls_large_alpha_does_not_overflow():
    """Log space (§2(h)2): logits of 1e4 and alpha = -1e6 stay finite (softmax probabilities would be 0 and their
    log -inf); the value equals the closed form ``-(1 - a) log p_y - a mean_k log p_k`` computed in float64."""
    logits = torch.tensor([[1e4, 0.0, -1e4, 5.0, 3.0]])
    labels = torch.tensor([2])
    for alpha in (-1e6, -8.0, 1.0):
        value = gls_cross_entropy(logits, labels, alpha)
        assert torch.isfinite(value)
        logp = logits.double().log_softmax(-1)
        expected = -(1 - alpha) * logp[0, 2] - alpha * logp.mean()
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gls_rejects_bad_alpha():
    logits, labels = torch.randn(3, K), torch.tensor([0, 1, 2])
    with pytest.raises(ConfigError, match="alpha"):
        gls_cross_entropy(logits, labels, 1.5)
    with pytest.raises(ConfigError, match="alpha"):
        gls_cross_entropy(logits, labels, torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="shape"):
        gls_cross_entropy(logits, labels, torch.zeros(2))


# -- §2(g)4: why a custom loss ----------------------------------------------------------------------------------
def test_torch_builtin_smoothing_cannot_smooth_negatively():
    """others §2(g)4 expects ``CrossEntropyLoss(label_smoothing=alpha < 0)`` to be rejected. torch 2.13 does not
    reject it: it silently ignores the negative rate and returns plain cross-entropy (worse than an error). Either
    way PyTorch gives no negative smoothing, hence :func:`gls_cross_entropy`; a rate above 1 is refused."""
    logits, labels = torch.randn(4, K, generator=torch.Generator().manual_seed(0)) * 3, torch.tensor([0, 1, 2, 3])
    try:
        builtin = torch.nn.CrossEntropyLoss(label_smoothing=-0.5)(logits, labels)
    except RuntimeError as err:  # a torch version that validates the sign
        assert "label_smoothing" in str(err)
    else:
        torch.testing.assert_close(builtin, F.cross_entropy(logits, labels))
        assert (builtin - gls_cross_entropy(logits, labels, -0.5)).abs() > 1e-2
    with pytest.raises(RuntimeError, match="label_smoothing"):
        torch.nn.CrossEntropyLoss(label_smoothing=1.5)(logits, labels)


# -- the objective ----------------------------------------------------------------------------------------------
def test_objective_hand_values_and_normalisation():
    """Uniform logits: l_GLS = CE = log 2 with K = 2 for any alpha. Mean: ``p log 2 - (1 - p) log 2``. Sum with
    |B_f| = 1, |B_r| = 3: ``3 p log 2 - (1 - p) log 2`` (the retain set weighs 3x: why 'mean' is the default)."""
    f, fy = torch.zeros(1, 2), torch.tensor([0])
    r, ry = torch.zeros(3, 2), torch.tensor([0, 1, 1])
    loss, m = ugradsl_objective(f, fy, r, ry, alpha=-4.0, p=0.25)
    assert loss.item() == pytest.approx(-0.5 * LOG2)
    assert m["retain_term"].item() == pytest.approx(0.25 * LOG2)
    assert m["forget_term"].item() == pytest.approx(-0.75 * LOG2)
    assert m["retain_ce"].item() == pytest.approx(LOG2) and m["forget_gls"].item() == pytest.approx(LOG2)
    loss, m = ugradsl_objective(f, fy, r, ry, alpha=-4.0, p=0.25, normalize="sum")
    assert loss.item() == pytest.approx(0.75 * LOG2 - 0.75 * LOG2, abs=1e-7)
    assert m["retain_term"].item() == pytest.approx(0.75 * LOG2)
    assert m["retain_ce"].item() == pytest.approx(LOG2)  # the logged CE stays a mean


def test_objective_sign_pitfall():
    """§2(h)1: the forget term is MINUS the GLS loss. Since ``d log p_k / dz_y = [k = y] - p_y``,
    ``dl/dz_y = -(1 - alpha)(1 - p_y) - alpha (1/K - p_y)``; at alpha = -1 that is ``p_y + 1/K - 2 < 0``, so the
    objective's gradient ``2 - p_y - 1/K`` is positive and a descent step lowers ``z_y`` (ascent on l_GLS), whereas
    descending ``+l_GLS`` would raise it (train toward the forget label)."""
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0])
    loss, _ = ugradsl_objective(logits, labels, None, None, alpha=-1.0, p=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0] > 0  # a descent step lowers the true-class logit: ascent on l_GLS
    torch.testing.assert_close(loss, -gls_cross_entropy(logits, labels, -1.0))
    (wrong,) = torch.autograd.grad(gls_cross_entropy(logits, labels, -1.0), logits)
    assert wrong[0, 0] < 0  # +l_GLS would raise it


def test_objective_bad_input():
    f, fy = torch.zeros(2, K), torch.tensor([0, 1])
    for p in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match=r"\bp\b"):
            ugradsl_objective(f, fy, f, fy, alpha=-1.0, p=p)
    with pytest.raises(ConfigError, match="normalize"):
        ugradsl_objective(f, fy, f, fy, alpha=-1.0, p=0.5, normalize="batch")
    with pytest.raises(ValueError, match="retain batch"):
        ugradsl_objective(f, fy, None, None, alpha=-1.0, p=0.5)
    with pytest.raises(ValueError, match="forget batch"):
        ugradsl_objective(None, None, f, fy, alpha=-1.0, p=0.5)


def test_p0_alpha_minus1_step_forgets():
    """§2(g)2: p = 0, alpha = -1, one SGD step on a model that knows its forget set lowers the forget rows'
    true-class probability and max probability and raises their prediction entropy."""
    x, y = _data()
    net = _trained_mlp(x, y)

    def probs():
        with torch.no_grad():
            return net(x).softmax(-1)

    before = probs()
    loss, metrics = ugradsl_objective(net(x), y, None, None, alpha=-1.0, p=0.0)
    assert set(metrics) == {"forget_gls", "forget_ce", "forget_term", "alpha", "alpha_min"}
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    after = probs()
    entropy = lambda q: -(q * q.log()).sum(-1).mean()  # noqa: E731
    assert after.gather(-1, y[:, None]).mean() < before.gather(-1, y[:, None]).mean()
    assert after.max(-1).values.mean() < before.max(-1).values.mean()
    assert entropy(after) > entropy(before)


def test_p1_is_retain_fine_tuning():
    """§2(g)3: with p = 1 the gradients equal plain retain cross-entropy's (the forget batch contributes nothing)."""
    x, y = _data(16)
    net = _trained_mlp(x[:8], y[:8])
    loss, _ = ugradsl_objective(net(x[:8]), y[:8], net(x[8:]), y[8:], alpha=-4.0, p=1.0)
    got = torch.autograd.grad(loss, list(net.parameters()))
    want = torch.autograd.grad(F.cross_entropy(net(x[8:]), y[8:]), list(net.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# -- adaptive alpha ---------------------------------------------------------------------------------------------
def test_feature_distances_and_adaptive_alpha_by_hand():
    u = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    d = feature_distances(u, v)
    torch.testing.assert_close(d, torch.tensor([[0.0, (1 - 1 / math.sqrt(2)) / 2, 1.0]]))
    torch.testing.assert_close(adaptive_alpha(u, v, beta=0.2), torch.tensor([-2.0]))
    torch.testing.assert_close(adaptive_alpha(u, v, beta=0.2, sign="positive"), torch.tensor([1.0]))  # capped
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # |B_f| = 2: c = [2, 1] -> alpha = -[1, 0.5]
    torch.testing.assert_close(adaptive_alpha(two, v, beta=0.2), torch.tensor([-1.0, -0.5]))
    torch.testing.assert_close(adaptive_alpha(two, v, beta=0.0, sign="positive"), torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError, match="beta"):
        adaptive_alpha(u, v, beta=1.5)
    with pytest.raises(ConfigError, match="adaptive_alpha_sign"):
        adaptive_alpha(u, v, beta=0.5, sign="minus")


def test_adaptive_alpha_scale_options_bound_a_small_forget_batch():
    """R1 finding 6: one forget row beside 64 near retain rows gets alpha = -64 with the paper's |B_f| divisor;
    ``by="retain"`` bounds it by 1 and ``max_abs`` caps it; the objective reports the most negative rate."""
    u, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.01]]).repeat(64, 1)
    assert adaptive_alpha(u, v, beta=0.1).item() == -64.0  # the paper's normalisation, unbounded
    assert adaptive_alpha(u, v, beta=0.1, by="retain").item() == -1.0
    assert adaptive_alpha(u, v, beta=0.1, max_abs=2.0).item() == -2.0
    hand = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(adaptive_alpha(u, hand, beta=0.2, by="retain"), torch.tensor([-2.0 / 3]))
    torch.testing.assert_close(adaptive_alpha(u, hand, beta=0.2, max_abs=1.5), torch.tensor([-1.5]))
    _, metrics = ugradsl_objective(torch.zeros(2, 3), torch.tensor([0, 1]), None, None,
                                   alpha=torch.tensor([-0.5, -3.0]), p=0.0)
    assert metrics["alpha_min"].item() == -3.0 and metrics["alpha"].item() == pytest.approx(-1.75)
    with pytest.raises(ConfigError, match="adaptive_alpha_by"):
        adaptive_alpha(u, v, beta=0.1, by="both")
    with pytest.raises(ConfigError, match="max_abs_alpha"):
        adaptive_alpha(u, v, beta=0.1, max_abs=0.0)


def test_rule_checks_are_the_loss_checks():
    """R1 finding 10: one validation: a bool alpha is refused, and the rule's messages are the loss functions'
    (with the config key in front)."""
    from lit_align.methods import UGradSL

    with pytest.raises(ConfigError, match=r"rule\.init_args\.alpha must be a finite number"):
        UGradSL(alpha=True)
    for kwargs, fn in (({"beta": 1.5}, lambda: adaptive_alpha(torch.ones(1, 2), torch.ones(1, 2), beta=1.5)),
                       ({"adaptive_alpha_sign": "minus"},
                        lambda: adaptive_alpha(torch.ones(1, 2), torch.ones(1, 2), beta=0.5, sign="minus")),
                       ({"normalize": "max"}, lambda: ugradsl_objective(None, None, torch.zeros(1, 2), torch.tensor([0]),
                                                                        alpha=0.0, p=1.0, normalize="max"))):
        with pytest.raises(ConfigError) as rule_err:
            UGradSL(alpha=None, **kwargs)
        with pytest.raises(ConfigError) as fn_err:
            fn()
        assert str(rule_err.value).startswith("model.init_args.rule.init_args.")
        assert str(rule_err.value).removeprefix("model.init_args.rule.init_args.") == str(fn_err.value)
