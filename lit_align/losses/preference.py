"""Pairwise preference losses on sequence log-probs: DPO (sigmoid / conservative), IPO and SELM.

Every loss is a pure function: four (B,) tensors of sequence log-probs in (policy and
reference, chosen and rejected), ``(loss, metrics)`` out. Nothing here runs a model; the caller
scores the responses with :func:`lit_align.rollout.sequence_logps`, using the reduction that the
loss asks for (``"sum"`` for DPO, ``"mean"`` for IPO, see :attr:`PreferenceLoss.reduction`).

Notation shared by the docstrings, per pair ``b`` of the batch:

* ``pi_c, pi_r``: policy log-probs ``log pi_theta(y_c | x)``, ``log pi_theta(y_r | x)``;
* ``ref_c, ref_r``: the same under the frozen reference;
* ``h = (pi_c - ref_c) - (pi_r - ref_r)``: the difference of the two log-ratios.

The metrics (all detached batch means) follow TRL's names so runs compare directly:
``rewards/chosen = beta (pi_c - ref_c)``, ``rewards/rejected = beta (pi_r - ref_r)``,
``rewards/margins`` (their difference), ``rewards/accuracies`` (fraction with chosen reward
strictly above rejected), ``logps/chosen = pi_c`` and ``logps/rejected = pi_r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["DPOLoss", "IPOLoss", "PreferenceLoss", "SELMLoss", "dpo_loss", "ipo_loss", "selm_loss"]


def _check_logps(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> None:
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if len(set(shapes.values())) != 1 or policy_chosen_logps.ndim != 1:
        raise ValueError(f"preference log-probs must all have the same (B,) shape, got {shapes}")
    if policy_chosen_logps.shape[0] == 0:
        raise ValueError("preference log-probs are empty (B = 0): the batch mean is undefined")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_beta(beta: float) -> None:
    if not (_is_real(beta) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be a finite number > 0, got {beta!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not (_is_real(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")


def _check_alpha(alpha: float, key: str) -> None:
    """SELM's optimism weight: an error naming the config ``key`` unless it is a finite number >= 0."""
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0 (0 is plain online DPO), got {alpha!r}")


def _preference_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sigmoid DPO loss, optionally with conservative label smoothing.

    Direct Preference Optimization, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (Eq. 7)::

        loss_b = -(1 - eps) * log sigmoid(beta * h_b) - eps * log sigmoid(-beta * h_b)
        loss   = mean_b loss_b

    with ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (module docstring). ``eps = label_smoothing``
    is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the
    label is assumed flipped with probability ``eps``; ``eps = 0`` is plain DPO.

    Hand check: at ``policy == reference`` every ``h_b = 0`` and, for any ``eps``,
    ``loss = -(1 - eps) log(1/2) - eps log(1/2) = log 2 ~ 0.6931``. Since
    ``log sigmoid(z) - log sigmoid(-z) = z``, the smoothed loss equals
    ``-log sigmoid(beta h) + eps * beta h``.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) same for the rejected responses.
        ref_chosen_logps: (B,) chosen under the reference (no gradient expected).
        ref_rejected_logps: (B,) rejected under the reference.
        beta: inverse temperature of the implicit reward ``beta * log(pi / ref)``; > 0.
        label_smoothing: ``eps`` in [0, 0.5).

    Returns:
        ``(loss, metrics)``: scalar batch-mean loss, and the detached batch-mean metrics listed
        in the module docstring.
    """
    _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)  # (B,)
    metrics = _preference_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return per_pair.mean(), metrics


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO loss: squared regression of the log-ratio difference onto ``1 / (2 beta)``.

    Identity Preference Optimisation, Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", https://arxiv.org/abs/2310.12036 (Eq. 17,
    where ``beta`` is the paper's regulariser ``tau``)::

        loss = mean_b (h_b - 1 / (2 beta))^2

    The caller passes **length-averaged** log-probs (``sequence_logps(..., reduction="mean")``),
    as the IPO authors did and TRL does; with summed log-probs the target margin would not
    depend on response length and ``beta`` would not transfer between datasets.

    Hand check: at ``policy == reference`` every ``h_b = 0``, so ``loss = (1 / (2 beta))^2 =
    1 / (4 beta^2)``; for the default ``beta = 0.1`` that is 25.

    Args:
        policy_chosen_logps: (B,) mean per-token log-probs of the chosen responses (policy).
        policy_rejected_logps: (B,) same for the rejected responses.
        ref_chosen_logps: (B,) chosen under the reference.
        ref_rejected_logps: (B,) rejected under the reference.
        beta: regularisation strength ``tau``; > 0. Smaller beta asks for a larger margin.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss` (rewards are ``beta`` times the given, averaged,
        log-ratios).
    """
    _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_beta(beta)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2  # (B,)
    metrics = _preference_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return per_pair.mean(), metrics


def selm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    policy_reference_logps: Tensor,
    ref_reference_logps: Tensor,
    *,
    beta: float = 0.01,
    alpha: float = 0.001,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SELM: sigmoid DPO plus an optimism term on the reference model's own response.

    Self-Exploring Language Models, Zhang et al. 2024, https://arxiv.org/abs/2405.19332 (the released
    trainer's ``optimistic_dpo_loss``)::

        rho_b  = pi_ref_b - ref_ref_b        # log pi_theta(y_ref | x) - log pi_ref(y_ref | x)
        loss_b = -log sigmoid(beta * h_b) + alpha * beta * rho_b
        loss   = mean_b loss_b

    with ``h`` as in the module docstring and ``y_ref`` the greedy response of the start-of-iteration
    model (the frozen reference). The ``+ alpha beta rho`` term is minimised: it lowers the policy's
    likelihood ratio on what the reference would say itself, the paper's push toward unexplored responses;
    flipping its sign exploits the reference's outputs instead. All log-probs are **summed** over response
    tokens, for both terms. ``alpha = 0`` is exactly sigmoid :func:`dpo_loss` (no label smoothing).

    Hand checks: at ``policy == reference`` every ``h_b = rho_b = 0``, so ``loss = log 2``; the gradient
    with respect to each ``pi_ref_b`` is ``alpha * beta / B``.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (B,) same for the rejected responses.
        ref_chosen_logps: (B,) chosen under the frozen reference.
        ref_rejected_logps: (B,) rejected under the frozen reference.
        policy_reference_logps: (B,) the reference's greedy response ``y_ref`` under the policy.
        ref_reference_logps: (B,) ``y_ref`` under the frozen reference.
        beta: inverse temperature of the implicit reward; > 0 (the paper: 0.01).
        alpha: weight of the optimism term; >= 0 (the paper: 1e-3 for Zephyr, 1e-4 for Llama-3).

    Returns:
        ``(loss, metrics)``: the :func:`dpo_loss` metrics plus ``logps/pi_response`` (mean ``pi_ref``),
        ``logps/ref_response`` (mean ``ref_ref``) and ``optimism`` (mean ``rho``, detached).
    """
    _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if policy_reference_logps.shape != policy_chosen_logps.shape or ref_reference_logps.shape != policy_chosen_logps.shape:
        raise ValueError(f"reference-response log-probs must have the pairs' (B,) shape {tuple(policy_chosen_logps.shape)}, "
                         f"got {tuple(policy_reference_logps.shape)} and {tuple(ref_reference_logps.shape)}")
    _check_beta(beta)
    _check_alpha(alpha, "alpha")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    rho = policy_reference_logps - ref_reference_logps  # (B,)
    per_pair = -F.logsigmoid(beta * h) + alpha * beta * rho  # (B,)
    metrics = _preference_metrics(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    metrics["logps/pi_response"] = policy_reference_logps.detach().mean()
    metrics["logps/ref_response"] = ref_reference_logps.detach().mean()
    metrics["optimism"] = rho.detach().mean()
    return per_pair.mean(), metrics


class PreferenceLoss:
    """A configured pairwise preference loss, selectable from YAML by ``class_path``.

    Subclasses name the pure function above they configure (``fn``) and store its keyword
    hyper-parameters as attributes (listed in ``hparams``). A method scores responses with
    ``sequence_logps(..., reduction=loss.reduction)`` and then calls
    ``loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``.

    Example YAML::

        loss:
          class_path: lit_align.losses.DPOLoss
          init_args: {beta: 0.1, label_smoothing: 0.0}
    """

    #: Which ``sequence_logps`` reduction the loss expects its (B,) inputs to use.
    reduction: ClassVar[Literal["sum", "mean"]] = "sum"
    #: The pure loss function and the names of its keyword hyper-parameters held by the instance.
    fn: ClassVar[Callable[..., tuple[Tensor, dict[str, Tensor]]]]
    hparams: ClassVar[tuple[str, ...]] = ()
    #: Whether the loss also reads the reference model's own response (two more (B,) tensors: SELM).
    needs_reference_response: ClassVar[bool] = False

    def __new__(cls, *args, **kwargs):
        if not hasattr(cls, "fn"):
            raise TypeError(f"{cls.__name__} is abstract: a subclass sets `fn` to the loss function it configures")
        return super().__new__(cls)

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, metrics)`` for (B,) policy / reference chosen / rejected log-probs."""
        kwargs = {name: getattr(self, name) for name in self.hparams}
        return type(self).fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)}' for n in self.hparams)})"


class DPOLoss(PreferenceLoss):
    """Sigmoid DPO (:func:`dpo_loss`) on summed response log-probs."""

    reduction: ClassVar[Literal["sum", "mean"]] = "sum"
    fn = staticmethod(dpo_loss)
    hparams = ("beta", "label_smoothing")

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        """
        Args:
            beta: inverse temperature of the implicit reward ``beta * log(pi / ref)``; > 0.
            label_smoothing: conservative-DPO probability that a preference label is flipped; in [0, 0.5).
        """
        _check_beta(beta)
        _check_label_smoothing(label_smoothing)
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)


class IPOLoss(PreferenceLoss):
    """IPO (:func:`ipo_loss`) on length-averaged response log-probs."""

    reduction: ClassVar[Literal["sum", "mean"]] = "mean"
    fn = staticmethod(ipo_loss)
    hparams = ("beta",)

    def __init__(self, beta: float = 0.1) -> None:
        """
        Args:
            beta: regularisation strength ``tau``; the loss pulls the log-ratio margin to ``1 / (2 beta)``; > 0.
        """
        _check_beta(beta)
        self.beta = float(beta)


class SELMLoss(PreferenceLoss):
    """SELM (:func:`selm_loss`) on summed log-probs: sigmoid DPO plus ``alpha * beta`` times the policy's
    log-ratio on the reference's greedy response. Called with the two reference-response log-prob tensors
    after the four of :class:`PreferenceLoss`; only the sigmoid form exists (the paper's trainer asserts it),
    so there is no ``loss_type`` and no IPO variant.

    Example YAML::

        loss:
          class_path: lit_align.losses.SELMLoss
          init_args: {beta: 0.01, alpha: 0.001}
    """

    reduction: ClassVar[Literal["sum", "mean"]] = "sum"
    fn = staticmethod(selm_loss)
    hparams = ("beta", "alpha")
    #: whether the method must score the reference model's greedy response (two extra log-prob tensors).
    needs_reference_response: ClassVar[bool] = True

    def __init__(self, beta: float = 0.01, alpha: float = 0.001, loss_type: str = "sigmoid") -> None:
        """
        Args:
            beta: inverse temperature of the implicit reward ``beta * log(pi / ref)``; > 0. The paper's 0.01 is
                small on purpose (summed log-probs); do not "fix" it to DPO's usual 0.1.
            alpha: weight of the optimism term on the reference's greedy response; >= 0 (0 is online DPO).
            loss_type: the preference term; only ``sigmoid`` (the optimism term is derived for the DPO
                reparameterisation, and the paper's trainer asserts it).
        """
        if loss_type != "sigmoid":
            raise ConfigError(f"model.loss.init_args.loss_type: SELM's optimism term (alpha) is defined for the "
                              f"sigmoid DPO loss only, got {loss_type!r}. Use loss_type: sigmoid (alpha: 0 for plain online DPO)")
        _check_beta(beta)
        _check_alpha(alpha, "model.loss.init_args.alpha")
        self.beta = float(beta)
        self.alpha = float(alpha)

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        policy_reference_logps: Tensor | None = None,
        ref_reference_logps: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, metrics)``; the reference-response log-probs are required."""
        if policy_reference_logps is None or ref_reference_logps is None:
            raise ValueError("SELMLoss needs the reference response's log-probs under the policy and the reference "
                             "(policy_reference_logps, ref_reference_logps); use it with OnlineDPOModule")
        return selm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         policy_reference_logps, ref_reference_logps, beta=self.beta, alpha=self.alpha)
