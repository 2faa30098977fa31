"""DebateAccuracy against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from lit_align.metrics import DebateAccuracy

#: Five debates of three rounds; row = debate, column = round, 1 = the actor's answer was right.
CORRECT = torch.tensor([
    [1, 1, 1],  # d0: right throughout
    [1, 0, 0],  # d1: right at round 0, wrong at the end
    [0, 1, 1],  # d2: wrong at round 0, right at the end
    [0, 0, 1],  # d3: wrong at round 0, right at the end
    [0, 0, 0],  # d4: wrong throughout
], dtype=torch.bool)


def _values(metric: DebateAccuracy) -> dict[str, float]:
    return {k: v.item() for k, v in metric.compute().items()}


def test_accuracy_per_round_and_answer_changes_by_hand():
    """Five debates, given in two batches (3 + 2):

    * right answers per round: round 0 {d0, d1} = 2, round 1 {d0, d2} = 2, round 2 {d0, d2, d3} = 3,
      so round_0 = 2/5 = 0.4, round_1 = 0.4, round_2 = 3/5 = 0.6;
    * gain = round_2 - round_0 = 0.6 - 0.4 = 0.2; improvement = gain / round_0 = 0.2 / 0.4 = 0.5;
    * right at round 0, wrong at the last round: {d1}, 1/5 = 0.2; the reverse: {d2, d3}, 2/5 = 0.4
      (and gain = 0.4 - 0.2, the two shares' difference, as it must be).
    """
    metric = DebateAccuracy(rounds=3)
    metric.update(CORRECT[:3])
    metric.update(CORRECT[3:])
    expected = {"round_0": 0.4, "round_1": 0.4, "round_2": 0.6, "gain": 0.2, "improvement": 0.5,
                "right_to_wrong": 0.2, "wrong_to_right": 0.4}
    assert _values(metric) == pytest.approx(expected, abs=1e-6)


def test_split_over_two_processes_sums_to_the_same():
    """DDP sums the states: d0-d1 on one rank and d2-d4 on another give the five-debate values above."""
    a, b = DebateAccuracy(rounds=3), DebateAccuracy(rounds=3)
    a.update(CORRECT[:2])
    b.update(CORRECT[2:])
    a.merge_state(b)
    whole = DebateAccuracy(rounds=3)
    whole.update(CORRECT)
    assert _values(a) == pytest.approx(_values(whole), abs=1e-6)


def test_zero_first_round_accuracy_and_one_round():
    """Two debates of two rounds, [0, 1] and [0, 0]: round_0 = 0, round_1 = 1/2, gain = 0.5, and the
    relative improvement is defined as 0 when round_0 is 0 (not a division by zero); wrong to right:
    1/2, right to wrong: 0. With one round the first is the last: no gain and no change, whatever
    the answers ([1], [0], [1]: round_0 = 2/3)."""
    metric = DebateAccuracy(rounds=2)
    metric.update(torch.tensor([[0, 1], [0, 0]], dtype=torch.bool))
    assert _values(metric) == pytest.approx({"round_0": 0.0, "round_1": 0.5, "gain": 0.5, "improvement": 0.0,
                                             "right_to_wrong": 0.0, "wrong_to_right": 0.5}, abs=1e-6)
    single = DebateAccuracy(rounds=1)
    single.update(torch.tensor([[1], [0], [1]], dtype=torch.bool))
    assert _values(single) == pytest.approx({"round_0": 2 / 3, "gain": 0.0, "improvement": 0.0,
                                             "right_to_wrong": 0.0, "wrong_to_right": 0.0}, abs=1e-6)


def test_bad_shapes_and_rounds_are_refused():
    with pytest.raises(ValueError, match=r"\(B, 3\) tensor, got \(5, 2\)"):
        DebateAccuracy(rounds=3).update(CORRECT[:, :2])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        DebateAccuracy(rounds=0)
