"""lit_align.modes: a block's train/eval mode, every submodule's own mode restored afterwards."""

from __future__ import annotations

import pytest
from torch import nn

from lit_align.modes import eval_mode, train_mode


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1))
    net.train()
    net[2].eval()  # a frozen submodule of a training model
    return net


def test_eval_mode_turns_every_module_off_and_restores_each_own_mode_after_an_error():
    net = _net()
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("inside the block")
    assert [m.training for m in net.modules()] == [True, True, True, False]


def test_train_mode_turns_dropout_on_and_restores_eval():
    a, b = _net().eval(), _net()
    with train_mode(a, b):
        assert all(m.training for m in (*a.modules(), *b.modules()))
    assert not any(m.training for m in a.modules())
    assert [m.training for m in b.modules()] == [True, True, True, False]
