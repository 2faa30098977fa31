"""Learning-rate schedules that YAML can name by ``class_path`` (all stepped once per optimiser step)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupLinearLR"]


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
