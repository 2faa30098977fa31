"""Train/eval mode of modules for the length of a block (a leaf module: every layer may import it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for the block; every submodule's own mode is restored afterwards, also when the
    block raises (a frozen submodule of a training model stays in eval mode)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
