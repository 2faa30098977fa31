"""The Bradley-Terry reward-model loss (Ouyang et al. 2022, "Training language models to follow instructions
with human feedback", arXiv 2203.02155, eq. 1), with the two options reward-model trainers carry.

``loss = -mean_b log sigmoid(r_c - r_r - m_b) + c * mean_b (r_c + r_r)^2``

* ``m_b``: an optional per-pair margin (Llama 2, Touvron et al. 2023, arXiv 2307.09288, sec. 3.2.2: a larger
  margin for pairs rated far apart);
* ``c``: an optional centring coefficient that keeps the rewards near zero mean (Eisenstein et al. 2023,
  arXiv 2312.09244, the "auxiliary loss" TRL calls ``center_rewards_coefficient``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | None = None,
                       center_coef: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss on (B,) rewards of the chosen and rejected responses.

    Hand check: ``chosen = [2]``, ``rejected = [0]``: ``-log sigmoid(2) = log(1 + e^-2) = 0.1269``; with
    ``margin = [2]`` it is ``log 2 = 0.6931``; ``center_coef = 0.1`` adds ``0.1 * (2 + 0)^2 = 0.4``.

    Returns:
        ``(loss, metrics)``: detached ``accuracy`` (share of pairs with ``r_c > r_r``), ``margin`` (mean
        ``r_c - r_r``), ``chosen`` and ``rejected`` (mean rewards).
    """
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.shape[0] == 0:
        raise ValueError(f"chosen and rejected rewards must be the same non-empty (B,) shape, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if margin is not None and margin.shape != chosen.shape:
        raise ValueError(f"margin must have the rewards' (B,) shape {tuple(chosen.shape)}, got {tuple(margin.shape)}")
    if center_coef is not None and not center_coef >= 0:
        raise ConfigError(f"center_coef must be >= 0 or null, got {center_coef}")
    diff = chosen.float() - rejected.float()
    loss = -F.logsigmoid(diff - (margin.float() if margin is not None else 0.0)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    metrics = {"accuracy": (diff > 0).float().mean().detach(), "margin": diff.mean().detach(),
               "chosen": chosen.float().mean().detach(), "rejected": rejected.float().mean().detach()}
    return loss, metrics
