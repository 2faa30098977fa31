"""Losses of continuous adversarial training: C-AdvUL's away / toward terms and C-AdvIPO's windowed log-probs.

Xhonneux, Sordoni, Günnemann, Gidel, Schwinn 2024, "Efficient Adversarial Training in LLMs with Continuous
Attacks", https://arxiv.org/abs/2405.15589 (released code: ``sophie-xhonneux/Continuous-AdvTrain``,
``AdversarialULTrainer.compute_loss`` and ``AdversarialDPOTrainer.get_batch_logps``).

Every function is pure: per-token log-probs of the scored (response) tokens in, ``(loss, metrics)`` out; the
caller runs the model (under the attack's perturbation). C-AdvIPO's preference term itself is
:func:`lit_align.losses.preference.ipo_loss` fed with :func:`windowed_mean_logps` (its formula is the paper's:
``(h - 1/(2 beta))^2`` on length-averaged log-probs), so it is not repeated here.

The soft floor shared by the away and toward terms (released rule)::

    floor(x, c) = x                  if x >= c
                  c + 0.001 * x      otherwise

exactly as released: the value jumps at ``x = c`` (from ``c`` to ``1.001 c``); what matters is that the gradient
shrinks 1000 times past the floor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lit_align.errors import ConfigError, check_number
from lit_align.losses.preference import ipo_loss
from lit_align.losses.sft import nll_loss

__all__ = ["AwayKind", "CAdvIPO", "CAdvUL", "FLOOR_SLOPE", "away_loss", "soft_floor", "toward_loss", "windowed_mean_logps"]

AwayKind = Literal["neg_ce", "log_1_minus_p"]

#: Slope of the soft floor past its cutoff (released code: 0.001).
FLOOR_SLOPE = 1e-3

#: log-probs above this are clamped in ``log(1 - p)`` so that a token with p -> 1 gives a finite loss
#: (``log(1 - (1 - 1e-6)) = log 1e-6 ~ -13.8``).
_MAX_LOGP = math.log1p(-1e-6)


def soft_floor(value: Tensor, cutoff: float) -> Tensor:
    """``value`` where ``value >= cutoff``, else ``cutoff + 0.001 * value`` (released rule, §8(b)).

    Args:
        value: a tensor of any shape (a scalar loss).
        cutoff: the floor ``c``.

    Returns:
        a tensor like ``value``; its gradient is 1 above the floor and ``0.001`` below it.
    """
    return torch.where(value < cutoff, cutoff + FLOOR_SLOPE * value, value)


def away_loss(
    token_logps: Tensor,
    mask: Tensor,
    *,
    cutoff: float = -5.0,
    kind: AwayKind = "neg_ce",
) -> tuple[Tensor, dict[str, Tensor]]:
    """C-AdvUL's away term: push the harmful target down under the attack (Xhonneux et al. 2024, arXiv:2405.15589).

    ``kind="neg_ce"`` (the paper's default): with ``CE`` the token-mean cross-entropy of the harmful target over
    every scored token of the batch (as HF ``labels`` compute it), ``loss = soft_floor(-CE, cutoff)``: once the
    harmful NLL exceeds ``-cutoff`` (5 nats for the default), the gradient is 1000 times smaller, which keeps the
    unbounded ascent from wrecking the model (§8(h)6).

    ``kind="log_1_minus_p"`` (the unlikelihood variant, ``away_loss_type`` in the released code): with ``p_t =
    exp(token_logps[t])`` the target token's probability and ``N`` the number of scored tokens::

        loss = -(1 / N) * sum_{t scored, log p_t >= cutoff} log(1 - p_t)

    i.e. minus the mean over ALL scored tokens of ``log(1 - p_t)``, where tokens already below the cutoff
    (``log p_t < cutoff``, unlikely enough) count as 0 (the same window as :func:`windowed_mean_logps`); ``log
    p_t`` is clamped to ``log(1 - 1e-6)`` first so a certain token gives a finite loss. It is >= 0 and falls as
    the harmful tokens become unlikely; no soft floor is applied (the window plays its role).

    Hand check: one scored token with log p = -6: ``neg_ce`` gives ``-5 + 0.001 * (-6) = -5.006``; with
    log p = -1: ``-1``.

    Args:
        token_logps: (B, T) per-token log-probs of the harmful targets under the perturbed policy.
        mask: (B, T) 1 on the scored (target) tokens.
        cutoff: ``c_away`` (released -5.0); for ``log_1_minus_p`` the log-prob window.
        kind: ``"neg_ce"`` or ``"log_1_minus_p"``.

    Returns:
        ``(loss, metrics)``; metrics ``ce`` (token-mean harmful CE, detached) and ``floored`` (1.0 when the
        floor / window is active for the batch's ``neg_ce``, the fraction of windowed-out tokens otherwise).
    """
    check_number("model.objective.init_args.away_cutoff", cutoff)
    ce, stats = nll_loss(token_logps, mask)
    scored = mask.bool()  # (B, T)
    if kind == "neg_ce":
        loss = soft_floor(-ce, cutoff)
        floored = (-ce.detach() < cutoff).float()
    elif kind == "log_1_minus_p":
        logp = token_logps.clamp(max=_MAX_LOGP)  # (B, T)
        keep = scored & (token_logps.detach() >= cutoff)  # (B, T) inside the window
        log_1mp = torch.where(keep, torch.log1p(-logp.exp()), torch.zeros_like(logp))  # (B, T)
        loss = -log_1mp.sum() / scored.sum().clamp(min=1)
        floored = (scored & ~keep).sum() / scored.sum().clamp(min=1)
    else:
        raise ConfigError(f"model.objective.init_args.away_kind must be 'neg_ce' or 'log_1_minus_p', got {kind!r}")
    return loss, {"ce": stats["nll"], "floored": floored.float()}


def toward_loss(token_logps: Tensor, mask: Tensor, *, cutoff: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """C-AdvUL's toward term: make the safe response likely under the attack (Xhonneux et al. 2024,
    arXiv:2405.15589): ``loss = soft_floor(CE, cutoff)`` with ``CE`` the token-mean cross-entropy of the safe
    response over every scored token of the batch; below ``cutoff`` (0.5 nats released) the gradient is 1000
    times smaller, so an already-learned refusal stops dominating.

    Hand check: CE = 0.2 -> ``0.5 + 0.001 * 0.2 = 0.5002``; CE = 2 -> 2.

    Args:
        token_logps: (B, T) per-token log-probs of the safe responses under the perturbed policy.
        mask: (B, T) 1 on the scored (response) tokens.
        cutoff: ``c_toward``.

    Returns:
        ``(loss, metrics)``; metrics ``ce`` (detached) and ``floored`` (1.0 when the floor is active).
    """
    check_number("model.objective.init_args.toward_cutoff", cutoff)
    ce, stats = nll_loss(token_logps, mask)
    return soft_floor(ce, cutoff), {"ce": stats["nll"], "floored": (ce.detach() < cutoff).float()}


def windowed_mean_logps(token_logps: Tensor, mask: Tensor, lower: float | None = None,
                        upper: float | None = None) -> Tensor:
    """Length-averaged response log-probs with a token window, C-AdvIPO's policy side (Xhonneux et al. 2024,
    arXiv:2405.15589; released ``AdversarialDPOTrainer.get_batch_logps(lower_cutoff, upper_cutoff)``)::

        mean_b = sum_{t scored, lower <= log p_bt <= upper} log p_bt / n_b,   n_b = scored tokens of row b

    Tokens outside the window count as 0 while the denominator still counts ALL scored tokens: on the harmful
    side ``lower = away_cutoff`` (-5 released: a token already that unlikely need not be pushed further down), on
    the safe side ``upper = -toward_cutoff`` (released 0: no log-prob exceeds 0, so no window; ``toward_cutoff =
    0.5`` would zero safe tokens with ``log p > -0.5``, already likely enough). ``None`` leaves that side open.

    Hand check: log-probs ``[-1, -6, -2]`` all scored: lower -5 gives ``(-1 + 0 - 2) / 3 = -1``; upper -1.5 gives
    ``(0 - 6 - 2) / 3``; neither gives ``-3``.

    Args:
        token_logps: (B, T) per-token log-probs.
        mask: (B, T) 1 on the scored tokens.
        lower: tokens with a log-prob below it count as 0.
        upper: tokens with a log-prob above it count as 0.

    Returns:
        (B,) windowed mean log-probs (0 for a row without scored tokens).
    """
    scored = mask.bool()  # (B, T)
    keep = scored
    if lower is not None:
        check_number("model.objective.init_args.away_cutoff", lower)
        keep = keep & (token_logps.detach() >= lower)
    if upper is not None:
        check_number("model.objective.init_args.toward_cutoff", upper)
        keep = keep & (token_logps.detach() <= upper)
    sums = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(-1)  # (B,)
    return sums / scored.sum(-1).clamp(min=1).to(sums.dtype)


class CAdvUL:
    """C-AdvUL's adversarial objective (Xhonneux et al. 2024, arXiv:2405.15589, §8(b))::

        away_weight * away_loss(harmful | x + delta) + toward_weight * toward_loss(safe | x + delta)

    Chosen in YAML as ``model.objective`` (``class_path: lit_align.losses.CAdvUL``); released values are the
    defaults. It needs no reference.
    """

    needs_reference = False
    #: the keys of the metrics :meth:`__call__` returns (known before any batch: validation logs them all)
    metric_keys = ("away_loss", "toward_loss", "away/ce", "toward/ce")

    def __init__(self, away_weight: float = 0.5, toward_weight: float = 0.5, away_cutoff: float = -5.0,
                 toward_cutoff: float = 0.5, away_kind: AwayKind = "neg_ce") -> None:
        """
        Args:
            away_weight: weight of the away term (released 0.5).
            toward_weight: weight of the toward term (released 0.5).
            away_cutoff: ``c_away``, the away term's soft floor on ``-CE`` (released -5.0).
            toward_cutoff: ``c_toward``, the toward term's soft floor on ``CE`` (released 0.5).
            away_kind: ``neg_ce`` (paper) or ``log_1_minus_p`` (unlikelihood, see :func:`away_loss`).
        """
        for key, value in (("away_weight", away_weight), ("toward_weight", toward_weight)):
            check_number(f"model.objective.init_args.{key}", value, minimum=0)
        check_number("model.objective.init_args.away_cutoff", away_cutoff)
        check_number("model.objective.init_args.toward_cutoff", toward_cutoff)
        if away_kind not in ("neg_ce", "log_1_minus_p"):
            raise ConfigError(f"model.objective.init_args.away_kind must be 'neg_ce' or 'log_1_minus_p', got {away_kind!r}")
        self.away_weight, self.toward_weight = away_weight, toward_weight
        self.away_cutoff, self.toward_cutoff, self.away_kind = away_cutoff, toward_cutoff, away_kind

    def __call__(self, away_logps: Tensor, away_mask: Tensor, toward_logps: Tensor, toward_mask: Tensor,
                 ref_away: Tensor | None = None, ref_toward: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` from (A, T) per-token log-probs of the perturbed away / toward rows and their
        masks (the reference arguments are ignored). Metrics: ``away_loss``, ``toward_loss``, ``away/ce``,
        ``toward/ce``."""
        away, away_m = away_loss(away_logps, away_mask, cutoff=self.away_cutoff, kind=self.away_kind)
        toward, toward_m = toward_loss(toward_logps, toward_mask, cutoff=self.toward_cutoff)
        metrics = {"away_loss": away.detach(), "toward_loss": toward.detach(),
                   "away/ce": away_m["ce"], "toward/ce": toward_m["ce"]}
        return self.away_weight * away + self.toward_weight * toward, metrics

    def __repr__(self) -> str:
        return (f"CAdvUL(away_weight={self.away_weight}, toward_weight={self.toward_weight}, away_cutoff="
                f"{self.away_cutoff}, toward_cutoff={self.toward_cutoff}, away_kind={self.away_kind!r})")


class CAdvIPO:
    """C-AdvIPO's adversarial objective (Xhonneux et al. 2024, arXiv:2405.15589, §8(b))::

        h = [mean_w(safe | x + delta) - ref(safe | x)] - [mean_w(harmful | x + delta) - ref(harmful | x)]
        loss = weight * (h - 1 / (2 beta))^2            (:func:`~lit_align.losses.preference.ipo_loss`)

    ``mean_w`` is :func:`windowed_mean_logps`: harmful tokens with log p below ``away_cutoff`` and safe tokens with
    log p above ``-toward_cutoff`` count as 0 (released: -5 and 0, i.e. no window on the safe side). ``ref`` is the reference's plain length-averaged log-prob on CLEAN inputs (the released code's
    asymmetry, §8(h)9); ``reference_cutoffs: true`` applies the same windows to the reference too (then the
    reference is scored on the fly: ``model.reference`` adapter or copy).
    """

    needs_reference = True
    #: the keys of the metrics :meth:`__call__` returns (known before any batch: validation logs them all)
    metric_keys = ("ipo_loss", "h", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                   "logps/chosen", "logps/rejected")

    def __init__(self, beta: float = 0.25, weight: float = 1.0, away_cutoff: float = -5.0,
                 toward_cutoff: float = 0.0, reference_cutoffs: bool = False) -> None:
        """
        Args:
            beta: IPO's ``beta`` (released 0.25: target margin ``1/(2 beta) = 2``).
            weight: weight of the IPO term (released ``dpo_weight`` 1.0).
            away_cutoff: harmful-side token window: log-probs below it count as 0 (released -5.0).
            toward_cutoff: safe-side window: safe tokens with log p above ``-toward_cutoff`` count as 0 (released
                0.0 = no window).
            reference_cutoffs: apply the windows to the reference log-probs too (removes §8(h)9's asymmetry).
        """
        check_number("model.objective.init_args.beta", beta, positive=True)
        check_number("model.objective.init_args.weight", weight, minimum=0)
        check_number("model.objective.init_args.away_cutoff", away_cutoff)
        check_number("model.objective.init_args.toward_cutoff", toward_cutoff)
        self.beta, self.weight = beta, weight
        self.away_cutoff, self.toward_cutoff, self.reference_cutoffs = away_cutoff, toward_cutoff, reference_cutoffs

    def reference_means(self, away_logps: Tensor, away_mask: Tensor, toward_logps: Tensor, toward_mask: Tensor
                        ) -> tuple[Tensor, Tensor]:
        """(A,) reference means of the away and toward rows from (A, T) per-token log-probs: windowed with
        ``reference_cutoffs``, plain otherwise."""
        if not self.reference_cutoffs:
            return windowed_mean_logps(away_logps, away_mask), windowed_mean_logps(toward_logps, toward_mask)
        return self._windowed(away_logps, away_mask, toward_logps, toward_mask)

    def _windowed(self, away_logps: Tensor, away_mask: Tensor, toward_logps: Tensor, toward_mask: Tensor
                  ) -> tuple[Tensor, Tensor]:
        """(A,) windowed means: harmful tokens below ``away_cutoff`` and safe tokens above ``-toward_cutoff``
        count as 0 (the released windows)."""
        return (windowed_mean_logps(away_logps, away_mask, lower=self.away_cutoff),
                windowed_mean_logps(toward_logps, toward_mask, upper=-self.toward_cutoff))

    def __call__(self, away_logps: Tensor, away_mask: Tensor, toward_logps: Tensor, toward_mask: Tensor,
                 ref_away: Tensor | None = None, ref_toward: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)`` from (A, T) per-token log-probs of the perturbed away / toward rows, their masks
        and the (A,) reference means. Metrics: ``ipo_loss``, ``h`` (batch mean) and ipo_loss's ``rewards/*``,
        ``logps/*`` (chosen = safe, rejected = harmful)."""
        if ref_away is None or ref_toward is None:
            raise ValueError("CAdvIPO needs the reference log-probs of the away and toward rows")
        policy_away, policy_toward = self._windowed(away_logps, away_mask, toward_logps, toward_mask)  # (A,) each
        loss, metrics = ipo_loss(policy_toward, policy_away, ref_toward.to(policy_toward.dtype),
                                 ref_away.to(policy_away.dtype), beta=self.beta)
        h = (policy_toward - ref_toward) - (policy_away - ref_away)  # (A,)
        return self.weight * loss, {"ipo_loss": loss.detach(), "h": h.detach().mean(), **metrics}

    def __repr__(self) -> str:
        return (f"CAdvIPO(beta={self.beta}, weight={self.weight}, away_cutoff={self.away_cutoff}, toward_cutoff="
                f"{self.toward_cutoff}, reference_cutoffs={self.reference_cutoffs})")
