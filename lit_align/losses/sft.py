"""Supervised fine-tuning loss: negative log-likelihood of the target tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["nll_loss"]


def nll_loss(
    token_logps: Tensor,
    mask: Tensor,
    *,
    reduction: Literal["token", "sequence"] = "token",
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the masked tokens.

    With ``l_bt = -token_logps[b, t]`` and ``m_bt = mask[b, t]`` (non-zero = scored)::

        reduction="token":     loss = sum_bt m_bt l_bt / sum_bt m_bt
        reduction="sequence":  loss = mean_{b : n_b > 0} (sum_t m_bt l_bt / n_b),   n_b = sum_t m_bt

    ``"token"`` weighs every token equally, so long sequences dominate (the usual LM loss);
    ``"sequence"`` weighs every sequence equally. Rows without scored tokens are left out of
    the ``"sequence"`` mean; a batch without any scored token gives a loss of 0 (still attached
    to the graph) instead of NaN.

    Hand check: ``token_logps = [[log 1/2, log 1/4, 0], [log 1/8, 0, 0]]`` with masks
    ``[[1, 1, 0], [1, 0, 0]]``: the token mean is ``(log 2 + 2 log 2 + 3 log 2) / 3 = 2 log 2``
    and the sequence mean is ``(1.5 log 2 + 3 log 2) / 2 = 2.25 log 2``.

    Args:
        token_logps: (B, T) per-token log-probs, e.g. ``lit_align.rollout.token_logps(...).logps``.
            Values at unmasked positions are ignored (even if not finite).
        mask: (B, T) 1 (or True) on the tokens to score.
        reduction: ``"token"`` or ``"sequence"`` as above.
        num_tokens: with ``"token"``, divide the summed NLL by this instead of this batch's token
            count. Data-parallel training passes the global count divided by the number of ranks,
            so that averaging gradients over ranks gives the token mean of the global batch
            (each rank's own token mean would weigh a rank's tokens by its batch's length).

    Returns:
        ``(loss, metrics)`` with detached metrics ``nll`` (token-mean NLL, whatever the
        reduction), ``ppl = exp(nll)`` and ``tokens`` (number of scored tokens, float).
    """
    if token_logps.shape != mask.shape or token_logps.ndim != 2:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must have the same (B, T) shape"
        )
    if reduction not in ("token", "sequence"):
        raise ConfigError(f"reduction must be 'token' or 'sequence', got {reduction!r}")
    scored = mask.bool()  # (B, T)
    nll = torch.where(scored, -token_logps, torch.zeros_like(token_logps))  # (B, T)
    per_seq_sum = nll.sum(-1)  # (B,)
    per_seq_tokens = scored.sum(-1).to(nll.dtype)  # (B,)
    tokens = per_seq_tokens.sum()  # ()
    token_mean = per_seq_sum.sum() / tokens.clamp(min=1)  # () 0 when nothing is scored

    if reduction == "token":
        loss = token_mean if num_tokens is None else per_seq_sum.sum() / num_tokens
    else:
        has_tokens = per_seq_tokens > 0  # (B,)
        per_seq_mean = per_seq_sum / per_seq_tokens.clamp(min=1)  # (B,)
        loss = (per_seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1)

    nll_detached = token_mean.detach()
    metrics = {"nll": nll_detached, "ppl": nll_detached.exp(), "tokens": tokens.detach()}
    return loss, metrics
