"""Learning-rate schedules that YAML can name by ``class_path`` (all stepped once per optimiser step)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR", "WarmupInverseSqrtLR", "WarmupLinearLR", "warmup_cosine_factor"]


class WarmupLinearLR(LambdaLR):
    """Linear warm-up from 0 to the base rate over ``warmup_steps``, then linear decay to 0 at
    ``total_steps`` (the HF Trainer's ``linear`` schedule; WAGLE and LLMU train with it).

    The factor at step ``s`` is ``s / warmup_steps`` while ``s < warmup_steps``, then
    ``(total_steps - s) / (total_steps - warmup_steps)``, never below 0. E.g. warm-up 2, total 6:
    factors 0, 0.5, 1, 0.75, 0.5, 0.25, 0.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        """
        Args:
            optimizer: the wrapped optimiser.
            total_steps: optimiser steps of the whole run (usually ``trainer.max_steps``).
            warmup_steps: steps of linear warm-up (WAGLE's configs: ``max(1, total_steps // 10)``).
        """
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"scheduler: need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / (self.total_steps - self.warmup_steps))


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The :class:`WarmupCosineLR` factor at optimiser step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 over ``warmup_steps``, then a cosine decay to ``min_ratio`` times the base
    rate at ``total_steps`` (the HF Trainer's ``cosine`` schedule; the watermark paper's actor and critic).

    The factor at step ``s >= warmup_steps`` is ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``
    with ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` capped at 1. E.g. warm-up 1, total 5:
    factors 0, 1, 0.854, 0.5, 0.146, 0.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0,
                 last_epoch: int = -1) -> None:
        """
        Args:
            optimizer: the wrapped optimiser.
            total_steps: optimiser steps of the whole run.
            warmup_steps: steps of linear warm-up (the watermark paper: ``min(100, total_steps // 10)``).
            min_ratio: the final rate as a fraction of the base rate.
        """
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"scheduler: need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"scheduler: min_ratio must be in [0, 1], got {min_ratio}")
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        return warmup_cosine_factor(step, self.total_steps, self.warmup_steps, self.min_ratio)


class WarmupInverseSqrtLR(LambdaLR):
    """Linear warm-up from ``floor`` times the base rate to the base rate over ``warmup_steps``, then
    inverse-square-root decay (the GPO reference code's schedule: warm-up 100 steps, floor 0.1).

    The factor at step ``s`` is ``floor + (1 - floor) * s / warmup_steps`` while ``s < warmup_steps``,
    then ``sqrt(warmup_steps / s)`` (1 at the end of the warm-up). E.g. warm-up 4, floor 0.1: factors
    0.1, 0.325, 0.55, 0.775, 1, 0.894, 0.816. ``warmup_steps=0`` gives ``1 / sqrt(max(s, 1))``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, floor: float = 0.1, last_epoch: int = -1) -> None:
        """
        Args:
            optimizer: the wrapped optimiser.
            warmup_steps: steps of linear warm-up (GPO: 100).
            floor: the warm-up's starting factor (GPO: 0.1).
        """
        if warmup_steps < 0:
            raise ValueError(f"scheduler: warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"scheduler: floor must be in [0, 1], got {floor}")
        self.warmup_steps, self.floor = warmup_steps, floor
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.floor + (1.0 - self.floor) * step / self.warmup_steps
        return math.sqrt(max(self.warmup_steps, 1) / max(step, 1))
