"""The watermark detector's objective (Xu, Yao, Liu 2024, "Learning to Watermark LLM-generated Text via RL")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["detector_loss"]


def detector_loss(watermarked: Tensor, human: Tensor, *, reg: float = 1e-4) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise (Bradley-Terry) detector loss with the score-size penalty::

        loss = mean_b [ -log sigmoid(s_w,b - s_h,b) ] + reg * mean_b [ s_w,b^2 + s_h,b^2 ]

    ``s_w`` scores the LLM's (watermarked) continuation of prompt b, ``s_h`` the human one of the
    same prompt. Hand check: equal scores give ``log 2 + reg * 2 s^2`` (0.6931 at s = 0); the
    penalty keeps scores from drifting, which also keeps the PPO reward scale stable.

    Args:
        watermarked: (B,) detector scores of the LLM continuations.
        human: (B,) detector scores of the human continuations of the same prompts.
        reg: weight of the squared-score penalty (the reference code: 1e-4).

    Returns:
        ``(loss, metrics)``: ``accuracy`` (share of pairs ranked right), ``chosen`` / ``rejected``
        (mean scores), ``margin``; detached.
    """
    if watermarked.shape != human.shape or watermarked.ndim != 1:
        raise ValueError(f"watermarked {tuple(watermarked.shape)} and human {tuple(human.shape)} must both be (B,)")
    if reg < 0:
        raise ConfigError(f"reg (the score penalty weight) must be >= 0, got {reg}")
    margin = watermarked.float() - human.float()
    loss = -F.logsigmoid(margin).mean() + reg * (watermarked.float() ** 2 + human.float() ** 2).mean()
    metrics = {"accuracy": (margin > 0).float().mean().detach(), "chosen": watermarked.float().mean().detach(),
               "rejected": human.float().mean().detach(), "margin": margin.mean().detach()}
    return loss, metrics
