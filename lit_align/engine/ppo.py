"""The PPO update every online-RL method runs: epochs x minibatches over one batch of experience.

Schulman et al. 2017 (arXiv 1707.06347): each minibatch takes a clipped-surrogate step of the policy, then a
clipped value-loss step of its critic (``lit_align.losses.ppo``: the pure losses; ``lit_align.rollout.experience``:
rewards, advantages, whitening and minibatches). Optionally the epochs stop early once a minibatch's approximate
KL to the policy that made the experience exceeds ``target_kl`` (as OpenAI baselines and TRL do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_align.engine.distributed import global_share, is_distributed, mean_over_ranks, rank_and_world, sums_over_ranks
from lit_align.engine.step import settle_steps
from lit_align.errors import ConfigError, check_choice
from lit_align.losses.ppo import aggregate, k3_kl, ppo_policy_loss, ppo_value_loss
from lit_align.rollout.experience import Experience, minibatches
from lit_align.rollout.logps import token_logps

__all__ = ["AGGREGATIONS", "PPOConfig", "ppo_update"]

#: The ways of averaging token losses (:func:`lit_align.losses.ppo.aggregate`).
AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


@dataclass
class PPOConfig:
    """How one batch of experience updates a policy and its critic."""

    epochs: int = 1
    """Passes over each batch of experience (``ppo_epochs``); minibatches are reshuffled every pass when > 1."""
    minibatch_size: int | None = None
    """Rows per minibatch on each rank (as every batch size); ``None``: the whole batch in one minibatch."""
    clip: float = 0.2
    """Clip range ε of the policy ratio."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the old values; ``None``: unclipped squared error."""
    target_kl: float | None = None
    """Stop the remaining epochs once a minibatch's approximate KL exceeds this; ``None``: never stop early."""
    kl_loss_coef: float = 0.0
    """Weight of a KL-to-reference term in the policy loss (the k3 estimator,
    :func:`~lit_align.losses.ppo.k3_kl`): GRPO's ``beta`` (0.04 in the paper). 0: off, the KL then lives in the
    rewards only (``kl_coef`` of the method), as PPO-RLHF has it."""
    aggregation: str = "token_mean"
    """How token losses are averaged (:func:`~lit_align.losses.ppo.aggregate`): ``token_mean`` (PPO),
    ``sequence_mean`` (GRPO as published) or ``constant`` (Dr. GRPO; divides by the sampling budget
    ``max_new_tokens``)."""

    def __post_init__(self) -> None:
        _check_ppo(vars(self))


def _check_ppo(values: dict) -> None:
    """Validate PPO settings; an error names ``model.ppo.<field>``, where the methods' ``ppo`` block lives."""
    key = {f: f"model.ppo.{f}" for f in ("epochs", "minibatch_size", "clip", "value_clip", "target_kl",
                                          "kl_loss_coef", "aggregation")}
    epochs, size = values.get("epochs", 1), values.get("minibatch_size")
    clip, value_clip, target_kl = values.get("clip", 0.2), values.get("value_clip"), values.get("target_kl")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"{key['epochs']} must be an int >= 1, got {epochs!r}")
    if size is not None and (isinstance(size, bool) or size < 1):
        raise ConfigError(f"{key['minibatch_size']} must be >= 1 or null (the whole batch), got {size!r}")
    if not clip > 0:
        raise ConfigError(f"{key['clip']} must be positive, got {clip}")
    if value_clip is not None and not value_clip > 0:
        raise ConfigError(f"{key['value_clip']} must be positive or null, got {value_clip}")
    if target_kl is not None and not target_kl > 0:
        raise ConfigError(f"{key['target_kl']} must be positive or null, got {target_kl}")
    if not values.get("kl_loss_coef", 0.0) >= 0:
        raise ConfigError(f"{key['kl_loss_coef']} must be >= 0 (0: off), got {values.get('kl_loss_coef')}")
    check_choice(key["aggregation"], values.get("aggregation", "token_mean"), AGGREGATIONS)


def ppo_update(
    policy: nn.Module,
    critic: nn.Module | None,
    exp: Experience,
    config: PPOConfig,
    *,
    step_policy: Callable[[Tensor], None],
    step_critic: Callable[[Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    chunk_tokens: int | None = None,
    max_tokens: int | None = None,
    old_from_current: bool = False,
) -> dict[str, Tensor]:
    """Run ``config.epochs`` passes of minibatch PPO over ``exp``.

    Args:
        policy: the acting policy (its LoRA adapter active when players share a base).
        critic: a :class:`~lit_align.models.ValueModel` (``action_values``), or ``None`` for critic-free methods.
        exp: the batch's experience (old log-probs, values, advantages, returns, action mask).
        config: epochs, minibatch size, clip ranges, early stop.
        step_policy / step_critic: take one optimiser step on a loss (backward, clip, step, scheduler):
            the player's ``step``.
        generator: CPU generator of the minibatch permutation (seeded by the caller: resumable).
        chunk_tokens: rows per LM-head chunk in the log-prob computation (memory only).
        max_tokens: the sampling budget, the divisor of ``aggregation: constant``.
        old_from_current: take the old log-probs as the current ones, detached (the experience was made with
            ``score_old=False``); only for one epoch over one minibatch, where the two are equal (TRL's GRPO
            shortcut): the ratio is 1 and the gradient that of the plain policy gradient.

    Data parallel (DDP, FSDP2): each rank updates on its own experience, which must hold as many rows as
    every other rank's (``make_experience(keep_shape=True)``), so all run the same minibatches (checked in the
    first minibatch's collective: every rank raises otherwise). Each loss, a
    mean over its minibatch's action tokens, is scaled by its share of the tokens of all ranks
    (:func:`~lit_align.engine.distributed.global_share`): averaged over the ranks, the gradients are those
    of the mean over every rank's tokens, as one process on the global batch computes (with a per-row
    ``aggregation``, the share is of the rows that hold an action). The early stop is
    decided on the token-weighted mean approximate KL of all ranks, identically on each. Called inside
    :func:`~lit_align.engine.overlapped_steps`, the policy's gradient collective runs during the critic's
    backward and the critic's after the update returns; each minibatch first ends the steps before it.

    Returns:
        The last minibatch's detached metrics: ``loss`` and the policy-loss metrics (``clip_frac``,
        ``approx_kl``, ...), ``critic/loss`` and ``critic/<metric>`` when there is a critic, and ``epochs`` (the
        passes run: fewer than ``config.epochs`` after an early stop).
    """
    metrics: dict[str, Tensor] = {}
    epochs = 0
    size = config.minibatch_size or max(len(exp), 1)
    if old_from_current and (config.epochs != 1 or size < len(exp)):
        raise ValueError("ppo_update(old_from_current=True) needs one epoch over one minibatch (model.ppo.epochs 1, "
                         "minibatch_size null): after a first update the current log-probs are no longer the old ones")
    check_rows = is_distributed()
    if check_rows and len(exp) == 0:
        _rows_over_ranks(exp, torch.zeros(()))  # raises: another rank has rows (or none has and nothing runs)
        check_rows = False
    for _ in range(config.epochs):
        epochs += 1
        stop = False
        for mb in minibatches(exp, size, shuffle=config.epochs > 1, generator=generator):
            settle_steps()  # the last minibatch's steps end before this one's forwards (overlapped_steps)
            tokens = mb.action_mask.sum()
            units = tokens if config.aggregation == "token_mean" else mb.action_mask.bool().any(-1).sum()
            total = _rows_over_ranks(exp, units) if check_rows else None  # the first share's collective checks rows
            check_rows = False
            share = global_share(units, total).to(tokens.device)  # 1 in one process
            scored = mb.action_mask if tokens > 0 else _one_position(mb.attention_mask)
            logps = token_logps(policy, mb.sequences, mb.attention_mask, scored, chunk_tokens=chunk_tokens).logps
            old = logps.detach() if old_from_current else mb.old_logps
            loss, pm = ppo_policy_loss(logps, old, mb.advantages, mb.action_mask, clip=config.clip,
                                       aggregation=config.aggregation, max_tokens=max_tokens)
            if config.kl_loss_coef > 0:
                kl = aggregate(k3_kl(logps, mb.ref_logps), mb.action_mask, config.aggregation, max_tokens)
                loss, pm = loss + config.kl_loss_coef * kl, {**pm, "kl_loss": kl.detach()}
            step_policy(loss * share)
            metrics = {"loss": loss.detach(), **pm}
            if critic is not None:
                values = critic.action_values(mb.sequences, mb.attention_mask)
                value_loss, vm = ppo_value_loss(values, mb.values, mb.returns, mb.action_mask, clip=config.value_clip)
                (step_critic or step_policy)(value_loss * share)
                metrics.update({"critic/loss": value_loss.detach(), **{f"critic/{k}": v for k, v in vm.items()}})
            if config.target_kl is not None and float(mean_over_ranks(pm["approx_kl"], tokens)) > config.target_kl:
                stop = True
                break
        if stop:
            break
    metrics["epochs"] = torch.tensor(float(epochs))
    return metrics


def _rows_over_ranks(exp: Experience, units: Tensor) -> Tensor:
    """``units`` summed over the ranks, in the collective that also checks that every rank holds as many experience
    rows as this one (each rank adds its row count at its own position of a vector: the sum lists them all)."""
    rank, world = rank_and_world()
    rows = torch.zeros(world, dtype=torch.float64)
    rows[rank] = len(exp)
    total, rows = sums_over_ranks(torch.as_tensor(units, dtype=torch.float64), rows)
    if bool((rows != len(exp)).any()):
        raise RuntimeError(f"ppo_update: the ranks hold {[int(r) for r in rows]} experience rows, not the same "
                           "number: make the experience with make_experience(keep_shape=True) so every rank runs "
                           "the same minibatches")
    return total


def _one_position(attention_mask: Tensor) -> Tensor:
    """A mask scoring one token (the first row's last): a minibatch without actions (every row too short,
    kept by ``keep_shape``) still runs the whole policy, so its zero loss reaches every parameter and the
    backward's collectives (FSDP2's reduce-scatters) match the other ranks'."""
    mask = torch.zeros_like(attention_mask, dtype=torch.float32)
    mask[0, int(attention_mask[0].nonzero().max())] = 1.0
    return mask


# saved with a method's hyperparameters in every checkpoint; allow it in weights-only loads
torch.serialization.add_safe_globals([PPOConfig])
