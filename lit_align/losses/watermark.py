"""The watermark detector's objective (Xu, Yao, Liu 2024, "Learning to Watermark LLM-generated Text via RL",
arXiv 2403.10553, and its released code ``main.py``).

* :func:`detector_loss`: one pairwise term (watermarked vs negative scores of the same prompts) with the
  squared-score penalty;
* :func:`detector_objective`: the main pair plus weighted extra pairs (the robustness terms: paraphrased
  or substituted watermarked text, another LLM's text as negatives), with the penalty on the main pair
  only (the reference code) or on every pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["DetectorPair", "detector_loss", "detector_objective"]


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


class DetectorPair(NamedTuple):
    """One extra pairwise term of :func:`detector_objective`."""

    name: str
    """Its name in the metrics (``paraphrase``, ``substitution``, ``other_llm``)."""
    watermarked: Tensor
    """(B,) scores of the text labelled watermarked (e.g. paraphrases of the LLM's continuations)."""
    negatives: Tensor
    """(B,) scores of the text labelled not watermarked (e.g. the human continuations)."""
    weight: float = 1.0
    """Weight of the term in the sum (1.0 for every term in the reference code)."""


def detector_objective(
    watermarked: Tensor,
    human: Tensor,
    extra: Sequence[DetectorPair] = (),
    *,
    reg: float = 1e-4,
    reg_extra: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The detector's loss in one co-training step: the main pair plus weighted extra pairs::

        loss = detector_loss(s_w, s_h; reg) + sum_k weight_k * detector_loss(w_k, n_k; reg if reg_extra else 0)

    ``reg_extra=False`` is the reference rule: the released code (``main.py``) adds the
    ``1e-4 (s_w^2 + s_h^2)`` penalty to the main pair's loss only, and its paraphrase, substitution and
    other-LLM terms are the bare pairwise loss at weight 1.0; the paper does not say. ``True`` puts the
    penalty on every pair (lit_align's earlier rule).

    Hand check (``reg = 0.01``): main scores ``s_w = [1]``, ``s_h = [0]`` and one extra pair ``[2]`` vs
    ``[0]`` at weight 0.5: ``log(1 + e^-1) + 0.01 * 1 + 0.5 * log(1 + e^-2) = 0.3133 + 0.01 + 0.0635``;
    with ``reg_extra`` the extra term gains ``0.5 * 0.01 * 4 = 0.02``.

    Args:
        watermarked, human: (B,) scores of the main pair: the LLM's continuations and the human ones
            (or whatever stands for them) of the same prompts.
        extra: the extra pairs, in order.
        reg: weight of the squared-score penalty (1e-4 in the reference code).
        reg_extra: also penalise the extra pairs' scores.

    Returns:
        ``(loss, metrics)``: the main pair's metrics (:func:`detector_loss`) plus ``<name>/loss`` (the
        extra term before its weight) and ``<name>/accuracy`` per extra pair; detached.
    """
    loss, metrics = detector_loss(watermarked, human, reg=reg)
    for pair in extra:
        term, m = detector_loss(pair.watermarked, pair.negatives, reg=reg if reg_extra else 0.0)
        loss = loss + pair.weight * term
        metrics[f"{pair.name}/loss"] = term.detach()
        metrics[f"{pair.name}/accuracy"] = m["accuracy"]
    return loss, metrics
