"""A tabular zero-sum matrix game: a toy check of the Nash-gap guarantee of GPO (Zheng et al. 2024, "Toward
Optimal LLM Alignments Using Two-Player Games", arXiv 2406.10977: the max-min game of its Eq. 3.1, played
with tabular policies, e.g. on matching pennies).

The defender plays rows with mixed strategy ``p`` and maximises, the attacker plays columns with
mixed strategy ``q`` and minimises the payoff ``J(p, q) = p^T A q``. The Nash gap of a pair is::

    NEGap(p, q) = max_i (A q)_i - min_j (p^T A)_j   >= 0,   0 exactly at a Nash equilibrium.

Players update with multiplicative weights (mirror descent with the entropy mirror map), step ``eta``::

    defender   p <- p^(1 - eta eps) * exp(+eta A q)    / Z
    attacker   q <- q^(1 - eta eps) * exp(-eta A^T p)  / Z

With ``eps = 0`` (the default) this is plain multiplicative weights. With ``eps > 0`` it is the
mirror-descent step on the entropy-regularised game ``J(p, q) + eps H(p) - eps H(q)`` (each player
is rewarded for its own entropy; the same ``eps`` for both). This plays the role of the paper's
entropy-regularised variant (its Algorithm 3 regularises the attacker), whose equilibrium is
interior and whose last iterate converges.

The averaged policies (uniform mean of the iterates after each step) converge to the equilibrium
at rate ``O(T^{-1/2})`` as in the paper's Theorem 3.2. The last iterate of unregularised
multiplicative weights does not converge on matching pennies: it spirals outward. This is the gap
between the theory (averaged policies) and the practical system (last PPO iterate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_align.game.schedule import GameSchedule

__all__ = ["TabularResult", "nash_gap", "play_matrix_game"]


def _as_matrix(A) -> Tensor:
    A = torch.as_tensor(A, dtype=torch.float64)
    if A.ndim != 2 or A.numel() == 0:
        raise ValueError(f"A must be a non-empty (rows, cols) payoff matrix, got shape {tuple(A.shape)}")
    return A


def _as_simplex(x, n: int, name: str) -> Tensor:
    if x is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.shape != (n,) or (x < 0).any() or not math.isclose(float(x.sum()), 1.0, abs_tol=1e-9):
        raise ValueError(f"{name} must be a probability vector of length {n}, got {x.tolist()}")
    if (x == 0).any():
        raise ValueError(f"{name} must be strictly positive (multiplicative weights never revive a zero), got {x.tolist()}")
    return x


def nash_gap(A, p, q) -> float:
    """``max_i (A q)_i - min_j (p^T A)_j`` for the row maximiser ``p`` and the column minimiser ``q``.

    Hand check on matching pennies ``A = [[1, -1], [-1, 1]]``: at ``p = q = (1/2, 1/2)`` both
    ``A q`` and ``p^T A`` are 0, so the gap is 0; at ``p = q = (1, 0)``, ``A q = (1, -1)`` and
    ``p^T A = (1, -1)``, so the gap is ``1 - (-1) = 2``.

    Args:
        A: (rows, cols) payoff to the row player.
        p: (rows,) mixed strategy of the row (maximising) player.
        q: (cols,) mixed strategy of the column (minimising) player.
    """
    A = _as_matrix(A)
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    return float((A @ q).max() - (p @ A).min())


@dataclass
class TabularResult:
    """Outcome of :func:`play_matrix_game`."""

    last_p: Tensor
    """(rows,) the defender's last iterate."""
    last_q: Tensor
    """(cols,) the attacker's last iterate."""
    avg_p: Tensor
    """(rows,) uniform mean of the defender's iterates after each step."""
    avg_q: Tensor
    """(cols,) uniform mean of the attacker's iterates after each step."""
    gap_last: float
    """Nash gap of the last iterates."""
    gap_avg: float
    """Nash gap of the averaged policies after the final step."""
    gap_avg_curve: list[float] = field(default_factory=list)
    """Nash gap of the averaged policies after each step (length ``steps``)."""
    gap_last_curve: list[float] = field(default_factory=list)
    """Nash gap of the last iterates after each step (length ``steps``)."""


def _mw_step(x: Tensor, grad: Tensor, eta: float, entropy: float) -> Tensor:
    """One multiplicative-weights step ``x^(1 - eta eps) exp(eta grad) / Z`` in log space."""
    logits = (1.0 - eta * entropy) * torch.log(x) + eta * grad
    return torch.softmax(logits, dim=0)


def play_matrix_game(
    A,
    schedule: GameSchedule,
    steps: int,
    eta: float = 0.1,
    entropy: float = 0.0,
    p0=None,
    q0=None,
) -> TabularResult:
    """Play the zero-sum matrix game with multiplicative weights under ``schedule``.

    At step ``t`` only the players in ``schedule.active(t)`` update; with both active (simultaneous)
    each update uses the other player's iterate from before the step. Averages are the uniform
    mean of the iterates after each of the ``steps`` steps (a frozen player's iterate counts again).

    Args:
        A: (rows, cols) payoff to the defender (rows, maximiser); the attacker (columns) minimises.
        schedule: which players update at each step.
        steps: number of steps (>= 1).
        eta: step size (> 0).
        entropy: entropy-regularisation strength ``eps`` (>= 0, with ``eta * eps < 1``); see the module docstring.
        p0: (rows,) strictly positive start of the defender; default uniform.
        q0: (cols,) strictly positive start of the attacker; default uniform.

    Returns:
        A :class:`TabularResult` (float64 tensors).
    """
    A = _as_matrix(A)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if not 0 <= entropy * eta < 1:
        raise ValueError(f"entropy must be >= 0 with eta * entropy < 1, got entropy={entropy}, eta={eta}")
    p = _as_simplex(p0, A.shape[0], "p0")
    q = _as_simplex(q0, A.shape[1], "q0")
    sum_p, sum_q = torch.zeros_like(p), torch.zeros_like(q)
    curve, last_curve = [], []
    for t in range(steps):
        active = schedule.active(t)
        new_p = _mw_step(p, A @ q, eta, entropy) if "defender" in active else p
        new_q = _mw_step(q, -(p @ A), eta, entropy) if "attacker" in active else q
        p, q = new_p, new_q
        sum_p += p
        sum_q += q
        curve.append(nash_gap(A, sum_p / (t + 1), sum_q / (t + 1)))
        last_curve.append(nash_gap(A, p, q))
    avg_p, avg_q = sum_p / steps, sum_q / steps
    return TabularResult(last_p=p, last_q=q, avg_p=avg_p, avg_q=avg_q, gap_last=nash_gap(A, p, q),
                         gap_avg=curve[-1], gap_avg_curve=curve, gap_last_curve=last_curve)
