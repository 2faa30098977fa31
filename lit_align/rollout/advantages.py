"""Advantage estimators, chosen in YAML by ``class_path``: how a batch's rewards become per-token advantages.

Every estimator reads the same inputs, built by :func:`~lit_align.rollout.experience.make_experience`: the
per-token KL-shaped rewards (``r_t = -kl_coef log(pi_old / pi_ref)`` on every action, plus the clipped score at
each row's last generated token), the critic's values (zeros without a critic), the mask of the generated
tokens (the steps) and the mask of the actions (the tokens the losses are taken on). It returns ``(advantages,
returns)``, both (B, T) and 0 off the actions; ``returns`` are the critic's targets (unused without one).

* :class:`GAE`: generalised advantage estimation with a critic (Schulman et al. 2016, arXiv 1506.02438), the
  PPO of RLHF (Ouyang et al. 2022; DeepSpeed-Chat, OpenRLHF, verl).
* :class:`RLOO`: REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740): k samples per prompt, each
  sample's baseline the mean return of the other k - 1; no critic.
* :class:`GRPO`: group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1.2):
  the group's mean subtracted and (optionally) its std divided out; no critic.

The group estimators need each prompt's k samples contiguous and on one rank: :class:`~lit_align.methods.PPOModule`
repeats every prompt of its rank's batch k times (rows ``g k .. g k + k - 1`` answer prompt ``g``), so a group
never straddles ranks. Their sequence return is the row's summed shaped reward, ``clip(score) - kl_coef sum_t
log(pi_old / pi_ref)`` (RLOO's "reward minus the KL penalty", as TRL's ``RLOOTrainer``); GRPO's paper puts the
KL in the loss instead (``model.ppo.kl_loss_coef``, with ``model.kl_coef: 0``), both work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_align.errors import ConfigError, require
from lit_align.losses.group import grpo_advantages, rloo_advantages
from lit_align.losses.ppo import gae, whiten

__all__ = ["GAE", "GRPO", "RLOO", "AdvantageEstimator"]

Reduce = Callable[[Tensor], Tensor]


class AdvantageEstimator:
    """Base: ``needs_critic`` (GAE builds a critic, the group estimators none) and ``group_size`` (samples per
    prompt, 1 for GAE)."""

    needs_critic: bool = False
    group_size: int = 1

    def __call__(self, rewards: Tensor, values: Tensor, steps: Tensor, actions: Tensor,
                 reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
        """(advantages, returns) from (B, T) ``rewards``, ``values``, ``steps`` and ``actions`` masks;
        ``reduce`` sums over data-parallel ranks (global whitening)."""
        raise NotImplementedError


@dataclass
class GAE(AdvantageEstimator):
    """GAE over the KL-shaped rewards with the critic's values (PPO with a critic)."""

    gamma: float = 1.0
    """Discount (1: none, as RLHF codebases run)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten: bool = True
    """Whiten the advantages over every rank's action tokens (after the returns are taken), as TRL's PPO,
    OpenRLHF and DeepSpeed-Chat do by default."""

    needs_critic = True

    def __post_init__(self) -> None:
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"model.estimator.init_args.{name} must be in [0, 1], got {value}")

    def __call__(self, rewards, values, steps, actions, reduce=None):
        advantages, returns = gae(rewards, values, steps, gamma=self.gamma, lam=self.lam)
        if self.whiten:
            advantages = whiten(advantages, actions, reduce=reduce)
        return advantages * actions, returns * actions


def _sequence_returns(rewards: Tensor) -> Tensor:
    """(B,) each row's summed shaped reward (its clipped score minus the KL penalty)."""
    return rewards.sum(-1)


def _broadcast(advantages: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
    out = advantages[:, None].to(actions.dtype) * actions  # (B, T): the sequence's advantage on every action
    return out, out


@dataclass
class RLOO(AdvantageEstimator):
    """REINFORCE leave-one-out: ``A_i = R_i - mean_{j != i} R_j`` over the k samples of one prompt
    (:func:`~lit_align.losses.rloo_advantages`), the same on every action of the sample."""

    group_size: int = 4
    """k, samples per prompt (>= 2; the paper: 2 or 4)."""
    whiten: bool = False
    """Whiten the advantages over every rank's action tokens (TRL's ``normalize_advantages``, off by default)."""

    def __post_init__(self) -> None:
        _check_group(self.group_size)

    def __call__(self, rewards, values, steps, actions, reduce=None):
        advantages, returns = _broadcast(rloo_advantages(_sequence_returns(rewards), self.group_size),
                                         actions)
        if self.whiten:
            advantages = whiten(advantages, actions, reduce=reduce) * actions
        return advantages, returns


@dataclass
class GRPO(AdvantageEstimator):
    """Group-relative advantages: ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)`` over the k samples of one
    prompt (:func:`~lit_align.losses.grpo_advantages`), the same on every action of the sample.

    The paper's GRPO also averages each sample's token losses before averaging the samples
    (``model.ppo.aggregation: sequence_mean``) and puts the KL in the loss (``model.ppo.kl_loss_coef: 0.04``
    with ``model.kl_coef: 0``). Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) drops the std and the length
    normalisation: ``scale_by_std: false`` with ``model.ppo.aggregation: constant``.
    """

    group_size: int = 4
    """k, samples per prompt (>= 2; the paper: 64)."""
    scale_by_std: bool = True
    """Divide by the group's sample std plus ``eps`` (GRPO); False: the mean baseline alone (Dr. GRPO)."""
    eps: float = 1e-4
    """Added to the std (TRL's value)."""

    def __post_init__(self) -> None:
        _check_group(self.group_size)
        if not self.eps > 0:
            raise ConfigError(f"model.estimator.init_args.eps must be positive, got {self.eps}")

    def __call__(self, rewards, values, steps, actions, reduce=None):
        returns = _sequence_returns(rewards)
        return _broadcast(grpo_advantages(returns, self.group_size, scale_by_std=self.scale_by_std, eps=self.eps),
                          actions)


def _check_group(group_size: int) -> None:
    require(isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 2,
            "model.estimator.init_args.group_size",
            "an int >= 2 (a group baseline compares each sample with the other samples of its prompt; for one "
            "sample per prompt use lit_align.engine.GAE, which learns a critic)", group_size)


# estimators are saved with the method's hyperparameters in every checkpoint; allow them in weights-only loads
torch.serialization.add_safe_globals([GAE, GRPO, RLOO])
