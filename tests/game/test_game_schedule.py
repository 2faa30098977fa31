"""GPO alternation schedule (core spec §2.6) and the tabular Nash-gap toy (§2.2, §2.9 item 5)."""

from __future__ import annotations

import pytest

from lit_align.game.schedule import GameSchedule
from lit_align.game.tabular import nash_gap, play_matrix_game

D, A = ("defender",), ("attacker",)
PENNIES = [[1.0, -1.0], [-1.0, 1.0]]
#: A non-uniform start (the uniform start is already the equilibrium of matching pennies).
P0, Q0 = (0.7, 0.3), (0.6, 0.4)


# -- schedule ---------------------------------------------------------------------------------------------
def test_defender_first_blocks():
    """(D, A) = (3, 2): steps 0-2 defender, 3-4 attacker, 5 defender again (spec §2.9 item 4)."""
    schedule = GameSchedule(defender_steps=3, attacker_steps=2)
    assert [schedule.active(t) for t in range(8)] == [D, D, D, A, A, D, D, D]
    phases = [schedule.phase(t) for t in (0, 2, 3, 4, 5)]
    assert [(p.cycle, p.offset, p.block_length) for p in phases] == [(0, 0, 3), (0, 2, 3), (0, 0, 2), (0, 1, 2), (1, 0, 3)]
    assert [p.block_start for p in phases] == [True, False, True, False, True]


def test_attacker_first_blocks():
    schedule = GameSchedule(defender_steps=1, attacker_steps=2, first="attacker")
    assert [schedule.active(t) for t in range(7)] == [A, A, D, A, A, D, A]


@pytest.mark.parametrize(("preset", "d", "a"), [("paper", 200, 400), ("code", 400, 200)])
def test_presets_override_block_lengths(preset, d, a):
    schedule = GameSchedule(defender_steps=7, attacker_steps=9, first="attacker", preset=preset)
    assert (schedule.defender_steps, schedule.attacker_steps, schedule.first) == (d, a, "defender")
    stages = [schedule.active(t)[0] for t in range(800)]
    assert stages[:d] == ["defender"] * d and stages[d:d + a] == ["attacker"] * a
    assert stages[d + a] == "defender"
    assert stages.count("defender") == 800 - stages.count("attacker")
    if preset == "code":  # the launch script: D 0-399, A 400-599, D 600-799
        assert stages[399:401] == ["defender", "attacker"] and stages[599:601] == ["attacker", "defender"]


def test_simultaneous_updates_both_players_every_step():
    schedule = GameSchedule(mode="simultaneous", defender_steps=0, attacker_steps=0)
    assert all(schedule.active(t) == ("defender", "attacker") for t in range(5))
    assert schedule.phase(4).cycle == 4


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"defender_steps": 0}, "model.schedule.defender_steps"),
        ({"attacker_steps": -1}, "model.schedule.attacker_steps"),
        ({"attacker_steps": -1, "mode": "simultaneous"}, "model.schedule.attacker_steps"),
        ({"defender_steps": 2.5}, "model.schedule.defender_steps"),
        ({"first": "critic"}, "model.schedule.first"),
        ({"mode": "sequential"}, "model.schedule.mode"),
        ({"preset": "iclr"}, "model.schedule.preset"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        GameSchedule(**kwargs)


def test_bad_step():
    with pytest.raises(ValueError, match="step"):
        GameSchedule().active(-1)


# -- tabular toy ------------------------------------------------------------------------------------------
def test_nash_gap_hand_values():
    """Uniform play is the equilibrium of matching pennies (gap 0); pure (1, 0) vs (1, 0):
    A q = (1, -1), p^T A = (1, -1): gap 1 - (-1) = 2."""
    assert nash_gap(PENNIES, [0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert nash_gap(PENNIES, [1.0, 0.0], [1.0, 0.0]) == pytest.approx(2.0)
    result = play_matrix_game(PENNIES, GameSchedule(mode="simultaneous"), 50)  # uniform start stays put
    assert result.gap_last == pytest.approx(0.0, abs=1e-12)


def test_simultaneous_average_converges_last_iterate_does_not():
    """Spec [TOY]: averaged gap 0.034 < 0.05 after 2000 steps at eta 0.1; the last iterate spirals
    outward (gap far from 0 and larger than at the start)."""
    result = play_matrix_game(PENNIES, GameSchedule(mode="simultaneous"), 2000, eta=0.1, p0=P0, q0=Q0)
    assert result.gap_avg < 0.05
    assert result.gap_avg == pytest.approx(0.034, abs=0.002)
    assert min(result.gap_last_curve[-200:]) > 1.0 > result.gap_last_curve[0]
    assert len(result.gap_avg_curve) == 2000 and result.gap_avg == result.gap_avg_curve[-1]
    assert float(result.avg_p.sum()) == pytest.approx(1.0) and float(result.last_q.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (5, 5)])
def test_alternating_average_gap_shrinks(k, m):
    result = play_matrix_game(PENNIES, GameSchedule(defender_steps=k, attacker_steps=m), 2000, p0=P0, q0=Q0)
    curve = result.gap_avg_curve
    assert curve[9] > curve[99] > curve[999] > curve[1999]
    assert result.gap_avg < 0.05


def test_frozen_player_does_not_move():
    """Attacker-only steps leave p untouched: (D, A) = (1, 100) for 50 steps updates p once."""
    result = play_matrix_game(PENNIES, GameSchedule(defender_steps=1, attacker_steps=100), 50, p0=P0, q0=Q0)
    first = play_matrix_game(PENNIES, GameSchedule(defender_steps=1, attacker_steps=100), 1, p0=P0, q0=Q0)
    assert result.last_p.tolist() == first.last_p.tolist()
    assert result.last_q.tolist() != first.last_q.tolist()


def test_entropy_regularised_last_iterate_converges():
    """With entropy eps = 0.5 the regularised game's equilibrium is uniform (by symmetry) and the
    last iterate converges to it, unlike plain multiplicative weights."""
    result = play_matrix_game(PENNIES, GameSchedule(mode="simultaneous"), 2000, entropy=0.5, p0=P0, q0=Q0)
    assert result.gap_last < 1e-6
