"""PPO with per-token KL shaping and GAE, DeepSpeed-Chat / MOSS-RLHF style (sources below).

Pure functions on (B, T) tensors aligned with the sequences (like
:class:`lit_align.rollout.TokenLogps`: column ``t`` is the action "emit token ``t``"); a ``mask`` is
1 on the generated (response) tokens, the actions. Nothing here runs a model; the experience that
feeds these functions is built by :func:`lit_align.rollout.experience.make_experience`.

For a sampled response ``y_1..y_L`` with sequence score ``R``::

    r_l     = -kl_coef (log pi_old(y_l) - log pi_ref(y_l)) + 1[l = L] clip(R, -c, c)   kl_shaped_rewards
    delta_l = r_l + gamma V_{l+1} - V_l,   V_{L+1} = 0                                    gae
    A_l     = delta_l + gamma lam A_{l+1},  return_l = A_l + V_l
    policy  = mean_l max(-A_l rho_l, -A_l clip(rho_l, 1 - eps, 1 + eps)),  rho_l = pi/pi_old   ppo_policy_loss
    value   = mean_l 0.5 max((V_l - G_l)^2, (clip(V_l, V_old - eps, V_old + eps) - G_l)^2)    ppo_value_loss

Sources: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347;
Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
https://arxiv.org/abs/1506.02438; the RLHF recipes of DeepSpeed-Chat (``ppo_trainer.py``) and
MOSS-RLHF (Zheng et al. 2023, https://arxiv.org/abs/2307.04964), which the watermark (Xu et al. 2024,
https://arxiv.org/abs/2403.10553) and GPO code follow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["aggregate", "gae", "k3_kl", "kl_shaped_rewards", "ppo_policy_loss", "ppo_value_loss", "whiten"]


# -- checks -----------------------------------------------------------------------------------------
def _check_bt(mask: Tensor, **tensors: Tensor) -> None:
    """Every tensor has the (B, T) shape of ``mask``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the (B, T) shape of mask {tuple(mask.shape)}")


def _check_number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (0, still attached to the graph, when nothing is masked in)."""
    m = mask.bool()
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


# -- functions ----------------------------------------------------------------------------------------
def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, *, eps: float = 1e-8,
           reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the positions where ``mask`` is 1.

    ``mean`` and ``var`` are taken over every masked element of the batch (the unbiased variance,
    ``n - 1`` in the denominator, as TRL's ``masked_whiten``; the biased one when ``n = 1``). With
    ``shift_mean=False`` the mean is added back (only the scale changes). Unmasked positions are 0.

    Hand check: ``x = [[1, 2, 3, 99]]``, ``mask = [[1, 1, 1, 0]]``: mean 2, unbiased var 1, so the
    result is ``[[-1, 0, 1, 0]]`` (``[[1, 2, 3, 0]]`` with ``shift_mean=False``).

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 1 on the positions that count.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.
        reduce: sums a tensor over the data-parallel ranks (:func:`lit_align.engine.distributed.sum_over_ranks`):
            the mean and variance are then those of every rank's masked elements, so N ranks whiten as one
            process does over the global batch. ``None``: this batch alone.

    Returns:
        (B, T) whitened ``x``, 0 where ``mask`` is 0.
    """
    _check_bt(mask, x=x)
    m = mask.bool()
    total = reduce or (lambda t: t)
    # count, sum and sum of squares in float64, in one collective under DDP: the variance in one pass,
    # sum(x^2) - n mean^2, loses nothing a float32 result could show unless |mean| / std exceeds ~1e4
    masked = torch.where(m, x, torch.zeros_like(x)).double()
    n, x_sum, sq_sum = total(torch.stack([m.sum().double(), masked.sum(), (masked**2).sum()]))
    mean = x_sum / n.clamp(min=1)
    var = ((sq_sum - x_sum * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    mean = mean.to(x.dtype)
    centred = torch.where(m, x - mean, torch.zeros_like(x))
    out = centred * torch.rsqrt(var + eps).to(x.dtype)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def kl_shaped_rewards(
    logps: Tensor,
    ref_logps: Tensor,
    scores: Tensor,
    mask: Tensor,
    *,
    kl_coef: float = 0.1,
    reward_clip: float | None = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token rewards: a KL penalty on every response token plus the clipped score at the last one.

    DeepSpeed-Chat's ``compute_rewards``::

        r[b, t] = -kl_coef (logps[b, t] - ref_logps[b, t])            on response tokens
        r[b, L_b] += clip(scores[b], -reward_clip, reward_clip)       L_b = last response token of row b

    ``logps - ref_logps`` is the single-sample (k1) estimate of the per-token KL; at initialisation
    (policy == reference) every reward is 0 but the terminal one. A row without response tokens gets
    no reward at all (its score is dropped; :func:`~lit_align.rollout.experience.make_experience`
    drops such rows before this).

    Hand check: ``logps = [[0, -1, -2]]``, ``ref_logps = [[0, -1.5, -1]]``, ``mask = [[0, 1, 1]]``,
    ``scores = [7]``, ``kl_coef = 0.1``, ``reward_clip = 5``: the KL terms are ``-0.1 * 0.5 = -0.05``
    and ``-0.1 * -1 = 0.1``, so ``r = [[0, -0.05, 5.1]]``.

    Args:
        logps: (B, T) token log-probs under the policy that sampled (the "old" policy); no gradient.
        ref_logps: (B, T) the same under the frozen reference.
        scores: (B,) sequence scores (reward model, detector, rule, or a mix), unclipped.
        mask: (B, T) 1 on the response tokens (one contiguous block per row).
        kl_coef: ``beta_KL`` >= 0 (0.1 in the watermark and GPO code).
        reward_clip: ``c`` > 0; the score is clamped to ``[-c, c]``; None disables clipping.

    Returns:
        ``(rewards, metrics)``: (B, T) float32 rewards, 0 outside ``mask``; detached metrics ``kl``
        (mean over rows of the summed per-token log-ratio, the sequence KL estimate), ``kl_token``
        (mean per-token log-ratio), ``score`` (mean raw score), ``score_clipped`` and ``reward``
        (mean over rows of the summed reward).
    """
    _check_bt(mask, logps=logps, ref_logps=ref_logps)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B = {mask.shape[0]} (one score per row)")
    _check_number("kl_coef", kl_coef, low=0.0)
    if reward_clip is not None:
        _check_number("reward_clip", reward_clip, low=0.0, low_open=True)
    m = mask.bool()  # (B, T)
    log_ratio = torch.where(m, logps.float() - ref_logps.float(), 0.0)  # (B, T)
    rewards = -kl_coef * log_ratio  # (B, T)
    clipped = scores.float() if reward_clip is None else scores.float().clamp(-reward_clip, reward_clip)  # (B,)
    has_tokens = m.any(-1)  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    last = (m.long() * positions).argmax(-1)  # (B,) last response token (0 for an empty row)
    terminal = torch.zeros_like(rewards).scatter(1, last[:, None], (clipped * has_tokens)[:, None])  # (B, T)
    rewards = rewards + terminal
    metrics = {
        "kl": log_ratio.sum(-1).mean().detach(),
        "kl_token": _masked_mean(log_ratio, m).detach(),
        "score": scores.float().mean().detach(),
        "score_clipped": clipped.mean().detach(),
        "reward": rewards.sum(-1).mean().detach(),
    }
    return rewards, metrics


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens, backwards from the last one.

    Schulman et al. 2016 (https://arxiv.org/abs/1506.02438)::

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        G_t     = A_t + V_t          (the value target, "returns")

    where ``V_{t+1}`` and ``A_{t+1}`` are 0 when ``t + 1`` is not a response token: the value after
    a row's last response token is 0 (the episode ends there), and padding on either side, or rows
    of different lengths, never leak into a row's estimates. ``mask`` must be one contiguous block
    per row (prompt | response | padding), as the sampler makes it.

    Hand check: ``rewards = [0, 0, 1]``, ``values = [0.1, 0.2, 0.3]``, gamma 1,
    lam 0.95: ``delta = [0.1, 0.1, 0.7]``, ``A_3 = 0.7``, ``A_2 = 0.1 + 0.95 * 0.7 = 0.765``,
    ``A_1 = 0.1 + 0.95 * 0.765 = 0.82675``; returns ``[0.92675, 0.965, 1.0]``.

    Args:
        rewards: (B, T) per-token rewards (:func:`kl_shaped_rewards`), 0 outside ``mask``.
        values: (B, T) value estimates ``V_t`` of the state before token ``t`` (no gradient needed).
        mask: (B, T) 1 on the response tokens.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both (B, T) float32, detached, 0 outside ``mask``.
    """
    _check_bt(mask, rewards=rewards, values=values)
    _check_number("gamma", gamma, low=0.0, high=1.0)
    _check_number("lam", lam, low=0.0, high=1.0)
    m = mask.bool()
    r = torch.where(m, rewards.detach().float(), 0.0)  # (B, T)
    v = torch.where(m, values.detach().float(), 0.0)  # (B, T); 0 off the response, so V_{L+1} = 0
    advantages = torch.zeros_like(r)  # (B, T)
    cols = m.any(0).nonzero()
    if cols.numel():
        first, last = int(cols[0]), int(cols[-1])
        next_value = torch.zeros_like(r[:, 0])  # (B,) V_{t+1}
        next_adv = torch.zeros_like(r[:, 0])  # (B,) A_{t+1}
        for t in range(last, first - 1, -1):
            delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
            adv = (delta + gamma * lam * next_adv) * m[:, t]  # (B,) 0 off the response resets the recursion
            advantages[:, t] = adv
            next_value, next_adv = v[:, t], adv
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


def aggregate(x: Tensor, mask: Tensor, aggregation: str = "token_mean", max_tokens: int | None = None) -> Tensor:
    """Reduce per-token losses ``x`` (B, T) over ``mask`` to one number.

    * ``token_mean``: the mean over every masked token of the batch (PPO in TRL, OpenRLHF; DAPO's "token-level");
    * ``sequence_mean``: each row's token mean, then the mean over the rows with a masked token (GRPO as
      published, Shao et al. 2024, eq. 3: ``1/G sum_i 1/|o_i| sum_t``);
    * ``constant``: each row's token sum divided by ``max_tokens``, then the mean over those rows (Dr. GRPO,
      Liu et al. 2025, arXiv 2503.20783: no length normalisation).

    Hand check, ``x = [[1, 3, 0], [5, 0, 0]]``, ``mask = [[1, 1, 0], [1, 0, 0]]``: token_mean ``9 / 3 = 3``,
    sequence_mean ``(2 + 5) / 2 = 3.5``, constant with ``max_tokens = 4``: ``(4 / 4 + 5 / 4) / 2 = 1.125``.
    """
    m = mask.bool()
    if aggregation == "token_mean":
        return _masked_mean(x, m)
    sums = torch.where(m, x, torch.zeros_like(x)).sum(-1)  # (B,)
    rows = m.any(-1)  # (B,)
    if aggregation == "sequence_mean":
        per_row = sums / m.sum(-1).clamp(min=1)
    elif aggregation == "constant":
        if not max_tokens or max_tokens < 1:
            raise ValueError(f"aggregation 'constant' needs max_tokens >= 1, got {max_tokens!r}")
        per_row = sums / max_tokens
    else:
        raise ConfigError(f"model.ppo.aggregation must be 'token_mean', 'sequence_mean' or 'constant', got "
                          f"{aggregation!r}")
    return torch.where(rows, per_row, torch.zeros_like(per_row)).sum() / rows.sum().clamp(min=1)


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip: float | None = 0.2,
    aggregation: str = "token_mean", max_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective, averaged over the response tokens of the batch.

    Schulman et al. 2017 (https://arxiv.org/abs/1707.06347), Eq. 7, with
    ``rho_t = exp(logps_t - old_logps_t)``::

        loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - clip, 1 + clip))

    The max of the negated terms is the min of the objective: a positive advantage stops pulling
    once ``rho > 1 + clip``, a negative one once ``rho < 1 - clip``.

    Hand check (``clip = 0.2``, one row, three tokens, all masked in): ratios ``[1.5, 0.5, 1.1]``
    with advantages ``[1, 1, -2]`` give the terms ``max(-1.5, -1.2) = -1.2`` (clipped),
    ``max(-0.5, -0.8) = -0.5`` (below ``1 - clip`` but with ``A > 0``: not clipped) and ``max(2.2, 2.2) = 2.2``: loss ``0.5 / 3``, clip fraction ``1/3``.

    Args:
        logps: (B, T) token log-probs under the current policy (with gradient).
        old_logps: (B, T) the same under the policy that sampled the batch (no gradient).
        advantages: (B, T) advantages (:func:`gae`, optionally :func:`whiten`-ed); no gradient.
        mask: (B, T) 1 on the response tokens.
        clip: ``eps`` in (0, 1), or None for the unclipped surrogate ``mean_t -A_t rho_t`` (the
            objective the GPO launch script actually ran: its clipping flag is never passed).
        aggregation, max_tokens: how the token terms are averaged (:func:`aggregate`); the metrics are
            token means either way.

    Returns:
        ``(loss, metrics)``; detached token means over ``mask``: ``clip_frac`` (fraction of tokens
        where the clipped term is the active one, i.e. carries no gradient), ``approx_kl``
        (``(rho - 1) - log rho``, Schulman's unbiased, non-negative "k3" estimator of
        ``KL(pi_old || pi)`` from samples of ``pi_old``), ``ratio`` (mean ``rho``) and ``advantage``.
    """
    _check_bt(mask, logps=logps, old_logps=old_logps, advantages=advantages)
    if clip is not None:
        _check_number("clip", clip, low=0.0, high=1.0, low_open=True)
    m = mask.bool()
    log_ratio = torch.where(m, logps - old_logps.detach(), 0.0)  # (B, T); 0 off-mask keeps rho finite
    ratio = log_ratio.exp()  # (B, T)
    adv = advantages.detach()
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip) if clip is not None else unclipped  # (B, T)
    loss = aggregate(torch.maximum(unclipped, clipped), m, aggregation, max_tokens)
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean((clipped > unclipped).float(), m),
            "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, m),
            "ratio": _masked_mean(ratio, m),
            "advantage": _masked_mean(adv.float(), m),
        }
    return loss, metrics


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """(B, T) Schulman's "k3" estimate of ``KL(pi || pi_ref)`` per token from samples of ``pi``:
    ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased), GRPO's KL term (Shao et al. 2024, eq. 4).

    Hand check: ``logp = log 0.5``, ``ref = log 0.25``: ``0.5 - log 0.5 - 1 = 0.5 + 0.693 - 1 = 0.193``."""
    delta = ref_logps.detach() - logps
    return delta.exp() - delta - 1.0


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, DeepSpeed-Chat's ``critic_loss_fn``, averaged over the response tokens.

    With ``V_clip = clamp(V, V_old - clip, V_old + clip)`` and the returns ``G`` (:func:`gae`)::

        loss = mean_t 0.5 max((V_t - G_t)^2, (V_clip_t - G_t)^2)

    (the pessimistic max, as in DeepSpeed-Chat, MOSS-RLHF and OpenAI's baselines; the 0.5 makes
    the gradient ``V - G``). ``clip=None`` gives the plain ``0.5 (V - G)^2``.

    Hand check (``clip = 0.2``): ``V = [1.0, 0.0]``, ``V_old = [0.5, 0.0]``, ``G = [2.0, 1.0]``:
    ``V_clip = [0.7, 0.0]``; token 1: ``max(1.0, 1.69) = 1.69`` (clipped is active), token 2:
    ``max(1, 1) = 1``; loss ``0.5 * (1.69 + 1) / 2 = 0.6725``, clip fraction ``1/2``.

    Args:
        values: (B, T) current value estimates (with gradient).
        old_values: (B, T) the estimates stored in the experience (no gradient).
        returns: (B, T) value targets (:func:`gae`); no gradient.
        mask: (B, T) 1 on the response tokens.
        clip: value clip range > 0, or None.

    Returns:
        ``(loss, metrics)``; detached token means over ``mask``: ``value_clip_frac`` (fraction where
        the clipped error is the larger, i.e. the active, term), ``value`` (mean ``V``), ``returns``
        and ``explained_variance`` ``1 - Var(G - V) / Var(G)`` (1 is a perfect critic, <= 0 no
        better than a constant; 0 when ``Var(G) = 0``).
    """
    _check_bt(mask, values=values, old_values=old_values, returns=returns)
    if clip is not None:
        _check_number("clip", clip, low=0.0, low_open=True)
    m = mask.bool()
    g = returns.detach()
    err = (values - g) ** 2  # (B, T)
    if clip is None:
        worst = err
        clip_frac = torch.zeros((), device=values.device)
    else:
        old = old_values.detach()
        err_clipped = (torch.clamp(values, old - clip, old + clip) - g) ** 2  # (B, T)
        worst = torch.maximum(err, err_clipped)
        clip_frac = _masked_mean((err_clipped > err).float(), m).detach()
    loss = 0.5 * _masked_mean(worst, m)
    with torch.no_grad():
        v, gf = values.detach().float(), g.float()
        var_g = _masked_mean((gf - _masked_mean(gf, m)) ** 2, m)
        resid = gf - v
        var_resid = _masked_mean((resid - _masked_mean(resid, m)) ** 2, m)
        explained = torch.where(var_g > 0, 1.0 - var_resid / var_g.clamp(min=1e-12), torch.zeros_like(var_g))
        metrics = {
            "value_clip_frac": clip_frac,
            "value": _masked_mean(v, m),
            "returns": _masked_mean(gf, m),
            "explained_variance": explained,
        }
    return loss, metrics
