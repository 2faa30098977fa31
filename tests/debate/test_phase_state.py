"""The debate's phase state: one dataclass, reset by construction, saved and restored whole."""

from __future__ import annotations

import torch

from lit_align.checkpoint import atomic_save, load_checkpoint
from lit_align.debate.pairs import PreferencePair
from lit_align.debate.phase import PhaseState


def _pair(i: int) -> PreferencePair:
    return PreferencePair(prompt=f"q{i}", chosen="yes", rejected="no", player="actor", round=0, question_index=i,
                          trial=0, reward_chosen=0.75, reward_rejected=0.25)


def test_phase_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """Every field survives ``state_dict`` -> a checkpoint file loaded with ``weights_only=True`` ->
    ``from_state_dict``; a fresh state is the start of a phase."""
    state = PhaseState(stage="train", questions_done=7, pairs=[_pair(0), _pair(1)], val_pairs=[_pair(2)],
                       ref_logps=torch.tensor([[-1.0, -2.0], [-0.5, -0.25]]), val_ref_logps=torch.zeros(1, 2),
                       order=[[1, 0], [0, 1]], position=1, best_val_loss=0.6, best_weights={"w": torch.ones(3)},
                       bad_evals=2)
    atomic_save({"state": state.state_dict()}, tmp_path / "s.pt")
    back = PhaseState.from_state_dict(load_checkpoint(tmp_path / "s.pt")["state"])
    assert back.pairs == state.pairs and back.val_pairs == state.val_pairs and back.order == state.order
    assert (back.stage, back.questions_done, back.position, back.best_val_loss, back.bad_evals) == ("train", 7, 1, 0.6, 2)
    assert torch.equal(back.ref_logps, state.ref_logps) and torch.equal(back.best_weights["w"], torch.ones(3))
    fresh = PhaseState()
    assert (fresh.stage, fresh.pairs, fresh.order, fresh.position, fresh.best_weights) == ("generate", [], [], 0, None)
