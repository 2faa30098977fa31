"""Train/eval mode of modules for the length of a block (a leaf module: every layer may import it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn

__all__ = ["eval_mode", "train_mode"]


@contextmanager
def _mode(models: tuple[nn.Module, ...], training: bool) -> Iterator[None]:
    modes = [(m, m.training) for model in models for m in model.modules()]
    if all(was == training for _, was in modes):  # already so (e.g. a nested block): nothing to set or restore
        yield
        return
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for module, was in modes:
            module.training = was


def eval_mode(*models: nn.Module) -> AbstractContextManager[None]:
    """Eval mode (dropout off) for the block; every submodule's own mode is restored afterwards, also when the
    block raises (a frozen submodule of a training model stays in eval mode)."""
    return _mode(models, False)


def train_mode(*models: nn.Module) -> AbstractContextManager[None]:
    """Train mode (dropout on, e.g. Monte-Carlo dropout passes) for the block; every submodule's own mode is
    restored afterwards, also when the block raises."""
    return _mode(models, True)
