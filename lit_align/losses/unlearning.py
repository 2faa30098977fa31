"""Unlearning objectives: forget terms (gradient ascent, NPO, label-smoothed ascent, refusal) and
retain terms (NLL, KL to the reference), as pure functions and as YAML-selectable terms.

Every function takes per-token or per-sequence log-probs already computed by
:func:`lit_align.rollout.token_stats` / :func:`lit_align.rollout.token_kl` / ``sequence_logps``
and returns ``(loss, metrics)`` with detached metrics; nothing here runs a model. All losses are
minimised: a forget term is small when the model has forgotten.

Sources (the papers, and their released code where it settles what a paper leaves open):

* gradient ascent / GradDiff: ``-NLL(forget) [+ lambda NLL(retain)]``, one of the base losses of WAGLE
  (Jia et al. 2024, "WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in Large
  Language Models", https://arxiv.org/abs/2410.17509; released code github.com/OPTML-Group/WAGLE,
  ``src/unlearn/GA.py``);
* NPO, Zhang et al. 2024, "Negative Preference Optimization", https://arxiv.org/abs/2404.05868;
* LLMU, Yao, Xu, Liu 2023, "Large Language Model Unlearning", https://arxiv.org/abs/2310.10683
  (released code github.com/kevinyaobytedance/llm_unlearn, ``unlearn_harm.py``, ``utils.py``):
  ``eps1 GA(forget) + eps2 NLL(random mismatch answers) + eps3 KL(reference || policy) on normal data``;
* UGradSL, Di et al. 2024, "Label Smoothing Improves Machine Unlearning", https://arxiv.org/abs/2406.07698:
  gradient ascent on negatively label-smoothed targets (here ported token-wise to a causal LM);
* PO (a WAGLE base loss, ``src/unlearn/CL.py`` in its code): NLL of a refusal answer given the forget prompt.

The terms (:class:`UnlearningTerm` subclasses) tell the unlearning module which batch part each
reads (``target``) and what it must compute for them (``needs_*``); their metric keys are short
(``nll``, ``kl``, ``log_ratio``) and the module prefixes them with the part's name.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.containers import TokenKL, TokenStats
from lit_align.errors import ConfigError
from lit_align.losses.sft import nll_loss

__all__ = [
    "NPO",
    "GradientAscent",
    "LabelSmoothedAscent",
    "MismatchNLL",
    "Refusal",
    "RetainKL",
    "RetainNLL",
    "UnlearningTerm",
    "gls_cross_entropy",
    "gls_from_logps",
    "gradient_ascent_loss",
    "kl_loss",
    "label_smoothed_ascent_loss",
    "npo_loss",
]

TokenReduction = Literal["token", "sequence"]


# -- checks -----------------------------------------------------------------------------------------
def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_reduction(reduction: object, name: str = "reduction") -> None:
    if reduction not in ("token", "sequence"):
        raise ConfigError(f"{name} must be 'token' (mean over all scored tokens) or 'sequence' (mean of per-sequence "
                         f"token means), got {reduction!r}")


def _check_beta(beta: object) -> None:
    if not (_is_real(beta) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be a finite number > 0 (NPO's inverse temperature; the paper uses 0.1), got {beta!r}")


def _check_alpha(alpha: object) -> None:
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha <= 1):
        raise ConfigError(f"alpha must be a finite number <= 1 (the label-smoothing rate; < 0 is negative smoothing, "
                         f"e.g. -0.5), got {alpha!r}")


def _check_token_pair(token_logps: Tensor, mask: Tensor, name: str = "token_logps") -> None:
    if token_logps.shape != mask.shape or token_logps.ndim != 2:
        raise ValueError(f"{name} {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must have the same "
                         f"(B, T) shape")


def _masked_mean(values: Tensor, mask: Tensor, reduction: TokenReduction) -> tuple[Tensor, Tensor, Tensor]:
    """Masked mean of (B, T) ``values``: ``(loss, token_mean, tokens)`` with the reductions of
    :func:`~lit_align.losses.sft.nll_loss` (0, still attached, when nothing is scored)."""
    scored = mask.bool()  # (B, T)
    v = torch.where(scored, values, torch.zeros_like(values))  # (B, T); ignores non-finite unscored values
    per_seq_sum = v.sum(-1)  # (B,)
    per_seq_tokens = scored.sum(-1).to(v.dtype)  # (B,)
    tokens = per_seq_tokens.sum()
    token_mean = per_seq_sum.sum() / tokens.clamp(min=1)
    if reduction == "token":
        return token_mean, token_mean, tokens
    has_tokens = per_seq_tokens > 0
    per_seq_mean = per_seq_sum / per_seq_tokens.clamp(min=1)  # (B,)
    loss = (per_seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    return loss, token_mean, tokens


# -- pure functions -----------------------------------------------------------------------------------
def gradient_ascent_loss(
    token_logps: Tensor,
    mask: Tensor,
    *,
    reduction: TokenReduction = "token",
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gradient ascent on the forget answers: the loss is minus their NLL.

    ``loss = -nll_loss(token_logps, mask, reduction)``: minimising it *raises* the NLL of the
    forget tokens (LLMU's ``L_fgt``, the forget half of GradDiff). It is unbounded below, by design:
    stop on an NLL threshold (a positive number, the ``nll`` metric), not on this negative loss.

    ``reduction="sequence"`` is LLMU's reference code (per-sample mean over answer tokens, then the
    batch mean); ``"token"`` is the HF mean-token cross-entropy of the WAGLE code. They agree for
    a batch of one sequence.

    Hand check: ``token_logps = [[0, log 1/2, log 1/4]]``, ``mask = [[0, 1, 1]]``: the NLL is
    ``(log 2 + 2 log 2) / 2 = 1.5 log 2 ~ 1.0397`` and the loss ``-1.0397``.

    Args:
        token_logps: (B, T) per-token log-probs of the forget sequences; unmasked values are ignored.
        mask: (B, T) 1 on the answer tokens to push away from.
        reduction: ``"token"`` or ``"sequence"`` (see :func:`~lit_align.losses.sft.nll_loss`).
        num_tokens: with ``"token"``, the divisor to use instead of this batch's token count (DDP).

    Returns:
        ``(loss, metrics)``: ``nll`` (token-mean NLL, whatever the reduction) and ``tokens``.
    """
    _check_token_pair(token_logps, mask)
    _check_reduction(reduction)
    nll, metrics = nll_loss(token_logps, mask, reduction=reduction, num_tokens=num_tokens)
    return -nll, {"nll": metrics["nll"], "tokens": metrics["tokens"]}


def npo_loss(policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative Preference Optimization on the forget sequences.

    Zhang, Lin, Bai, Mei 2024, https://arxiv.org/abs/2404.05868 (Eq. 3), with the log-ratio
    ``r_b = policy_logps_b - ref_logps_b``::

        loss = mean_b -(2 / beta) log sigmoid(-beta r_b)

    DPO with the forget answer as the rejected response and no chosen one. Its gradient is
    ``mean_b 2 sigmoid(beta r_b) grad(r_b)``: gradient ascent's direction, weighted by
    ``w_b = 2 sigmoid(beta r_b)``, which starts at 1 and falls to 0 as the answer's
    likelihood drops below the reference's, so the loss stays bounded (``-> 0``).

    The inputs may be summed sequence log-probs (the paper) or per-sequence mean-token log-probs
    (the WAGLE / open-unlearning code, whose batches hold one sequence); see :class:`NPO`.

    Hand check: at ``policy == reference`` every ``r_b = 0`` and
    ``loss = -(2 / beta) log(1/2) = (2 / beta) log 2``; for ``beta = 0.1`` that is ``13.8629``.

    Args:
        policy_logps: (B,) log-probs of the forget answers under the policy.
        ref_logps: (B,) the same under the frozen reference (no gradient expected).
        beta: inverse temperature; > 0.

    Returns:
        ``(loss, metrics)`` with detached batch means: ``log_ratio`` (``r``), ``logps`` (policy),
        ``ref_logps`` and ``weight`` (``2 sigmoid(beta r)``, the step size relative to GA).
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.ndim != 1:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} must "
                         f"have the same (B,) shape")
    if policy_logps.shape[0] == 0:
        raise ValueError("npo_loss got an empty batch (B = 0): the batch mean is undefined")
    _check_beta(beta)
    log_ratio = policy_logps - ref_logps  # (B,)
    per_seq = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)  # (B,)
    r = log_ratio.detach()
    metrics = {
        "log_ratio": r.mean(),
        "logps": policy_logps.detach().mean(),
        "ref_logps": ref_logps.detach().mean(),
        "weight": (2.0 * torch.sigmoid(beta * r)).mean(),
    }
    return per_seq.mean(), metrics


def _check_alpha_rows(alpha: Tensor, n: int) -> None:
    if alpha.shape != (n,):
        raise ValueError(f"a per-row alpha must have shape (N,) = ({n},), got {tuple(alpha.shape)}")
    if not bool(torch.isfinite(alpha).all()) or bool((alpha > 1).any()):
        raise ConfigError(f"every per-row alpha must be finite and <= 1 (the label-smoothing rate), got values in "
                          f"[{alpha.min().item():g}, {alpha.max().item():g}]")


def gls_from_logps(target_logps: Tensor, mean_logps: Tensor, alpha: float | Tensor) -> Tensor:
    """The generalised-label-smoothing loss from log-probabilities: the one place its formula is written.

    ``l = -(1 - alpha) log p(y) - alpha mean_k log p(k)`` element-wise, i.e. the cross-entropy to the
    smoothed target ``(1 - alpha) onehot(y) + (alpha / K) 1``. :func:`gls_cross_entropy` (classifiers) and
    :func:`label_smoothed_ascent_loss` (the token-wise LLM port) both call it.

    Args:
        target_logps: ``log p(y)`` of each prediction, any shape S.
        mean_logps: ``mean_k log p(k)`` at the same predictions, shape S.
        alpha: the rate, a number or a tensor broadcastable to S (a per-row alpha).
    """
    return -(1.0 - alpha) * target_logps - alpha * mean_logps


def gls_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    alpha: float | Tensor,
    *,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Generalised-label-smoothing cross-entropy for classification, any ``alpha <= 1`` (also < 0).

    Di et al., "Label Smoothing Improves Machine Unlearning", https://arxiv.org/abs/2406.07698 (UGradSL), after
    Wei et al., "To Smooth or Not? When Label Smoothing Meets Noisy Labels", ICML 2022 (negative smoothing).
    With K classes, the smoothed target ``y_alpha = (1 - alpha) onehot(y) + (alpha / K) 1`` and::

        l = -sum_k y_alpha[k] log p(k | x) = (1 - alpha) CE(x, y) + (alpha / K) sum_k CE(x, k)
          = -(1 - alpha) log p_y - alpha mean_k log p_k

    computed from ``log_softmax`` (never from probabilities), so large ``|alpha|`` cannot overflow.
    ``torch.nn.CrossEntropyLoss(label_smoothing=alpha)`` cannot do ``alpha < 0`` (torch 2.13 silently ignores a
    negative rate and returns plain cross-entropy); this can.

    Hand check: two classes, ``logits = [0, 0]``: ``log p = [-log 2, -log 2]`` and
    ``l = log 2`` for every ``alpha`` (a uniform prediction costs the same under any smoothing).

    Args:
        logits: (N, K) unnormalised scores.
        labels: (N,) class ids.
        alpha: smoothing rate; 0 is plain cross-entropy, < 0 negative label smoothing. A number, or an (N,)
            tensor of per-row rates (UGradSL's adaptive alpha; treated as constants, no gradient flows into them).
        reduction: ``"mean"`` or ``"sum"`` over N, or ``"none"`` for the (N,) losses.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be (N, K) and labels {tuple(labels.shape)} (N,)")
    if isinstance(alpha, Tensor):
        _check_alpha_rows(alpha, logits.shape[0])
        alpha = alpha.detach().float()
    else:
        _check_alpha(alpha)
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logp = logits.float().log_softmax(-1)  # (N, K)
    per_row = gls_from_logps(logp.gather(-1, labels[:, None]).squeeze(-1), logp.mean(-1), alpha)  # (N,)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def label_smoothed_ascent_loss(
    token_logps: Tensor,
    mean_logps: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    reduction: TokenReduction = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """UGradSL's forget term ported token-wise to a causal LM: gradient ascent on label-smoothed targets.

    Di et al., "Label Smoothing Improves Machine Unlearning", https://arxiv.org/abs/2406.07698.
    Each answer token is a V-class prediction with target ``y``; the generalised-label-smoothing
    (GLS) cross-entropy with rate ``alpha`` is::

        l_t = -(1 - alpha) log p(y_t) - alpha mean_v log p(v)
            = (1 - alpha) CE_y + (alpha / V) sum_v CE_v

    and the forget loss is ``-reduce(l)``: ascent on the smoothed targets (minimising ``-l_GLS`` is
    gradient ascent on ``l_GLS``; ``+l_GLS`` with ``alpha < 0`` would *train toward* the forget answers).
    With ``alpha = -a < 0`` (negative label smoothing), ``-l = -(1 + a) CE_y + a mean_v CE_v``:
    ascent on the true token, amplified by ``1 + a``, plus descent toward the uniform
    distribution. ``alpha = 0`` is plain gradient ascent. ``mean_v log p(v)`` comes from
    :func:`~lit_align.rollout.token_stats` (``mean_logps=True``), computed chunk by chunk
    without a (B, T, V) log-softmax.

    Caveats: the paper validates the method on classification only (K <= 1000), and its ``alpha``
    and retain weight ``p`` could not be found (a reviewer of its ICLR 2025 submission asked for
    them; the defaults of :class:`LabelSmoothedAscent` are ours). Each non-target token's share of
    the smoothed target is ``alpha / V``, so for a 32k-150k vocabulary the push on any single token is tiny unless
    ``|alpha|`` is huge; the port to LLMs is new research, not a reproduction.

    Hand check: two scored tokens with ``log p(y) = [log 1/2, log 1/4]`` and vocabulary means
    ``[-2, -3]``, ``alpha = -1``: ``l = [-2 log(1/2) + (-2), -2 log(1/4) + (-3)] =
    [2 log 2 - 2, 4 log 2 - 3] ~ [-0.6137, -0.2274]``, token mean ``-0.4205``, loss ``0.4205``.

    Args:
        token_logps: (B, T) ``log p(y_t)`` of the forget tokens.
        mean_logps: (B, T) ``mean_v log p(v)`` at the same positions.
        mask: (B, T) 1 on the forget answer tokens.
        alpha: smoothing rate, <= 1; < 0 is negative label smoothing (UGradSL).
        reduction: ``"token"`` or ``"sequence"`` mean of ``l`` (as :func:`gradient_ascent_loss`).

    Returns:
        ``(loss, metrics)``: ``nll`` (token-mean ``-log p(y)``), ``uniform_nll`` (token-mean
        ``-mean_v log p(v)``, the cross-entropy to the uniform distribution), ``gls`` (token-mean
        ``l``) and ``tokens``.
    """
    _check_token_pair(token_logps, mask)
    _check_token_pair(mean_logps, mask, "mean_logps")
    _check_reduction(reduction)
    _check_alpha(alpha)
    gls = gls_from_logps(token_logps, mean_logps, alpha)  # (B, T)
    loss, gls_mean, tokens = _masked_mean(gls, mask, reduction)
    _, nll, _ = _masked_mean(-token_logps.detach(), mask, "token")
    _, uniform_nll, _ = _masked_mean(-mean_logps.detach(), mask, "token")
    return -loss, {"nll": nll, "uniform_nll": uniform_nll, "gls": gls_mean.detach(), "tokens": tokens.detach()}


def kl_loss(values: Tensor, mask: Tensor, *, reduction: TokenReduction = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """Masked mean of per-token KL values (or of their cross-entropy form) to a reference.

    ``values`` is ``TokenKL.kl`` (``KL(p_ref || p_theta)`` per position) or
    ``TokenKL.cross_entropy`` (LLMU's code form ``-sum_v p_ref log p_theta``): both have the same
    gradient in the policy, but only the KL reaches 0 at the reference.

    Hand check: ``values = [[0, 0.2, 0.4], [0, 0.6, 9.9]]``, ``mask = [[0, 1, 1], [0, 1, 0]]``:
    ``"token"`` gives ``(0.2 + 0.4 + 0.6) / 3 = 0.4``, ``"sequence"`` gives ``(0.3 + 0.6) / 2 = 0.45``.

    Args:
        values: (B, T) per-token values; unmasked ones are ignored.
        mask: (B, T) 1 on the positions to average.
        reduction: ``"token"`` or ``"sequence"`` as :func:`~lit_align.losses.sft.nll_loss`.

    Returns:
        ``(loss, metrics)``: ``mean`` (the token mean of ``values``) and ``tokens``.
    """
    _check_token_pair(values, mask, "values")
    _check_reduction(reduction)
    loss, token_mean, tokens = _masked_mean(values, mask, reduction)
    return loss, {"mean": token_mean.detach(), "tokens": tokens.detach()}


# -- YAML terms -------------------------------------------------------------------------------------
class UnlearningTerm:
    """One term of an unlearning objective, selectable from YAML by ``class_path``.

    The class attributes tell the unlearning module what to compute for the term, the instance
    holds its hyper-parameters (listed in ``hparams``), and ``term(stats, ref_logps, kl)`` returns
    ``(loss, metrics)``. Example YAML::

        forget:
          class_path: lit_align.losses.NPO
          init_args: {beta: 0.1, reduction: sum_sequence}
        retain:
          class_path: lit_align.losses.RetainNLL
    """

    #: Which part of a ``ForgetRetainBatch`` the term reads: "forget", "refusal", "retain" or "mismatch".
    target: ClassVar[str] = "forget"
    #: The term needs (B,) reference sequence log-probs of the same rows, reduced as ``reduction``.
    needs_reference_logps: ClassVar[bool] = False
    #: The term needs ``TokenStats.mean_logps`` (``token_stats(..., mean_logps=True)``).
    needs_mean_logps: ClassVar[bool] = False
    #: The term needs a per-token :class:`~lit_align.rollout.TokenKL` to the reference (a reference model).
    needs_kl: ClassVar[bool] = False
    #: Which positions the module scores: "response" (the batch's ``loss_mask``) or "all" (every real
    #: token: pass ``attention_mask`` as the loss mask).
    positions: str = "response"
    #: With ``needs_reference_logps``, the ``sequence_logps`` reduction ("sum" | "mean") of the
    #: policy's and the reference's (B,) log-probs; otherwise the token reduction of the loss.
    reduction: str = "token"
    hparams: ClassVar[tuple[str, ...]] = ()

    def __call__(self, stats: TokenStats, ref_logps: Tensor | None = None,
                 kl: TokenKL | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, metrics)`` from the policy's token statistics of the ``target`` rows."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.hparams)})"


class _NLLTerm(UnlearningTerm):
    """NLL (descent) of the ``target`` rows' scored tokens."""

    hparams = ("reduction",)

    def __init__(self, reduction: TokenReduction = "token") -> None:
        _check_reduction(reduction)
        self.reduction = reduction

    def __call__(self, stats, ref_logps=None, kl=None):
        loss, metrics = nll_loss(stats.logps, stats.mask, reduction=self.reduction)
        return loss, {"nll": metrics["nll"], "tokens": metrics["tokens"]}


class GradientAscent(UnlearningTerm):
    """Forget term: gradient ascent (:func:`gradient_ascent_loss`) on the forget answers (GA, GradDiff, LLMU)."""

    hparams = ("reduction",)

    def __init__(self, reduction: TokenReduction = "token") -> None:
        """
        Args:
            reduction: "token" (HF mean-token NLL, the WAGLE code) or "sequence" (per-answer mean
                then batch mean, the LLMU code).
        """
        _check_reduction(reduction)
        self.reduction = reduction

    def __call__(self, stats, ref_logps=None, kl=None):
        return gradient_ascent_loss(stats.logps, stats.mask, reduction=self.reduction)


class NPO(UnlearningTerm):
    """Forget term: NPO (:func:`npo_loss`) against the frozen reference.

    ``reduction`` picks the sequence log-prob NPO compares (the NPO paper and WAGLE's released code,
    ``src/unlearn/GA.py``, differ here):

    * ``"sum_sequence"`` (default): summed answer log-likelihood, the paper's rule;
    * ``"mean_token"``: per-answer mean-token log-prob, the WAGLE / open-unlearning code (which
      takes the batch's mean-token NLL with batches of one sequence, where both agree).

    The instance's ``reduction`` attribute is the matching ``sequence_logps`` reduction
    ("sum" | "mean") the module uses for the policy and the reference; ``npo_reduction`` keeps the
    configured name.
    """

    needs_reference_logps = True
    hparams = ("beta", "npo_reduction")

    def __init__(self, beta: float = 0.1, reduction: Literal["sum_sequence", "mean_token"] = "sum_sequence") -> None:
        """
        Args:
            beta: inverse temperature, > 0 (0.1 in the paper and the WAGLE configs).
            reduction: "sum_sequence" (paper) or "mean_token" (reference code), see the class docstring.
        """
        _check_beta(beta)
        if reduction not in ("sum_sequence", "mean_token"):
            raise ConfigError(f"reduction must be 'sum_sequence' (summed answer log-likelihood, the NPO paper) or "
                             f"'mean_token' (per-token mean, the WAGLE code), got {reduction!r}")
        self.beta = float(beta)
        self.npo_reduction = reduction

    @property
    def reduction(self) -> str:  # type: ignore[override]
        return "sum" if self.npo_reduction == "sum_sequence" else "mean"

    def __call__(self, stats, ref_logps=None, kl=None):
        if ref_logps is None:
            raise ValueError("NPO needs the reference log-probs of the forget answers (ref_logps); the module "
                             "must compute them when term.needs_reference_logps is set")
        policy_logps = stats.sum() if self.reduction == "sum" else stats.mean()  # (B,)
        loss, metrics = npo_loss(policy_logps, ref_logps.to(policy_logps.dtype), beta=self.beta)
        _, nll = nll_loss(stats.logps, stats.mask)
        return loss, {**metrics, "nll": nll["nll"]}

    def __repr__(self) -> str:
        return f"NPO(beta={self.beta!r}, reduction={self.npo_reduction!r})"


class LabelSmoothedAscent(UnlearningTerm):
    """Forget term: UGradSL's gradient ascent on negatively label-smoothed targets (:func:`label_smoothed_ascent_loss`).

    The default ``alpha = -0.5`` is ours, taken from the negative part of the smoothing-rate sweep
    ``{-0.2, ..., -8}`` of the generalised label smoothing paper (Wei et al., ICML 2022; released code
    github.com/UCSC-REAL/negative-label-smoothing, ``README.md``); UGradSL's own ``alpha`` (and its
    retain weight ``p``, the module's weights here) could not be found in its paper. For LLM
    vocabularies each non-target token gets only ``alpha / V`` of the smoothed target; see the
    function's caveats.
    """

    needs_mean_logps = True
    hparams = ("alpha", "reduction")

    def __init__(self, alpha: float = -0.5, reduction: TokenReduction = "token") -> None:
        """
        Args:
            alpha: label-smoothing rate, <= 1; < 0 is negative label smoothing (UGradSL). Not from the paper.
            reduction: "token" or "sequence" mean of the per-token GLS loss.
        """
        _check_alpha(alpha)
        _check_reduction(reduction)
        self.alpha = float(alpha)
        self.reduction = reduction

    def __call__(self, stats, ref_logps=None, kl=None):
        if stats.mean_logps is None:
            raise ValueError("LabelSmoothedAscent needs TokenStats.mean_logps; compute the statistics with "
                             "token_stats(..., mean_logps=True) when term.needs_mean_logps is set")
        return label_smoothed_ascent_loss(stats.logps, stats.mean_logps, stats.mask, alpha=self.alpha,
                                          reduction=self.reduction)


class Refusal(_NLLTerm):
    """Forget term of PO: NLL of a refusal answer given the forget prompt (target "refusal")."""

    target = "refusal"

    def __init__(self, reduction: TokenReduction = "token") -> None:
        """
        Args:
            reduction: "token" or "sequence" mean of the refusal answers' NLL.
        """
        super().__init__(reduction)


class RetainNLL(_NLLTerm):
    """Retain term: NLL of the retain answers (GradDiff, NPO, PO; UGradSL's retain descent)."""

    target = "retain"

    def __init__(self, reduction: TokenReduction = "token") -> None:
        """
        Args:
            reduction: "token" or "sequence" mean of the retain answers' NLL.
        """
        super().__init__(reduction)


class MismatchNLL(_NLLTerm):
    """LLMU's random-mismatch term: NLL of random normal answers given the forget prompts (target "mismatch").

    With K answers per prompt and the ``"sequence"`` default this is the code's
    ``mean_x (1/K) sum_k CEans(x, y'_k)``; only answer tokens count. The code's bug is not
    reproduced: its ``get_rand_ans_loss`` takes the answer start as the length of the tokenizer's
    output dict (its number of keys), so it also trains on most of the question.
    """

    target = "mismatch"

    def __init__(self, reduction: TokenReduction = "sequence") -> None:
        """
        Args:
            reduction: "sequence" (per-answer mean, then mean over all B*K answers: the LLMU code) or "token".
        """
        super().__init__(reduction)


class RetainKL(UnlearningTerm):
    """Retain term: per-token forward KL ``KL(p_ref || p_theta)`` on retain data (LLMU's normal term, NPO+KL).

    Defaults follow the LLMU paper's rule (KL between the original and the unlearned model on the
    normal sequence): ``form="kl"`` over ``positions="all"`` real tokens, token mean. The reference
    code's form is ``form="cross_entropy"`` (same gradient, never reaches 0); the code also
    averages over padding, which we never do. ``positions="response"`` restricts the KL to answer
    tokens, as TOFU-style NPO+KL implementations do. Both ``kl`` and ``cross_entropy`` are logged.
    """

    target = "retain"
    needs_kl = True
    hparams = ("form", "positions", "reduction")

    def __init__(self, form: Literal["kl", "cross_entropy"] = "kl", positions: Literal["all", "response"] = "all",
                 reduction: TokenReduction = "token") -> None:
        """
        Args:
            form: "kl" (the true KL, 0 at the reference) or "cross_entropy" (the LLMU code's form).
            positions: "all" (every real token of the retain sequence, the paper) or "response" (answer tokens).
            reduction: "token" or "sequence" mean over the positions.
        """
        if form not in ("kl", "cross_entropy"):
            raise ConfigError(f"form must be 'kl' (true KL, the paper) or 'cross_entropy' (the LLMU code's form), "
                             f"got {form!r}")
        if positions not in ("all", "response"):
            raise ConfigError(f"positions must be 'all' (every real token) or 'response' (answer tokens), got {positions!r}")
        _check_reduction(reduction)
        self.form = form
        self.positions = positions
        self.reduction = reduction

    def __call__(self, stats, ref_logps=None, kl=None):
        if kl is None:
            raise ValueError("RetainKL needs a TokenKL to the reference (kl); the module must compute token_kl "
                             "when term.needs_kl is set")
        values = kl.kl if self.form == "kl" else kl.cross_entropy
        loss, metrics = kl_loss(values, kl.mask, reduction=self.reduction)
        _, kl_mean, _ = _masked_mean(kl.kl.detach(), kl.mask, "token")
        _, ce_mean, _ = _masked_mean(kl.cross_entropy.detach(), kl.mask, "token")
        out = {"kl": kl_mean, "cross_entropy": ce_mean, "tokens": metrics["tokens"]}
        if stats is not None:
            _, nll = nll_loss(stats.logps, stats.mask)
            out["nll"] = nll["nll"]
        return loss, out
