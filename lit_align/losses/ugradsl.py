"""UGradSL's objective for classifiers: descent on the retain set, ascent on label-smoothed forget targets.

Di et al., "Label Smoothing Improves Machine Unlearning", https://arxiv.org/abs/2406.07698 (ICLR 2026 poster).
The generalised-label-smoothing (GLS) loss itself is
:func:`lit_align.losses.unlearning.gls_cross_entropy` (one implementation, shared with the token-wise LLM port);
this module adds what the classifier method needs around it:

* :func:`ugradsl_objective`: ``L = p * R(CE_retain) - (1 - p) * R(GLS_forget)`` with an explicit reduction ``R``;
* :func:`feature_distances` and :func:`adaptive_alpha`: the per-sample rate used when no fixed alpha is given.

Pure functions: tensors in, ``(loss, metrics)`` or tensors out; nothing here runs a model.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError
from lit_align.losses.unlearning import gls_cross_entropy

__all__ = ["AlphaBy", "AlphaSign", "Normalize", "adaptive_alpha", "check_adaptive", "check_alpha", "check_normalize",
           "check_retain_weight", "feature_distances", "ugradsl_objective"]

Normalize = Literal["mean", "sum"]
AlphaSign = Literal["negative", "positive"]
AlphaBy = Literal["forget", "retain"]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_alpha(alpha: object, key: str = "alpha") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``alpha`` is ``None`` (adaptive) or a finite number <= 1."""
    if alpha is not None and not (_number(alpha) and alpha <= 1):
        raise ConfigError(f"{key} must be a finite number <= 1 (the GLS rate; < 0 is negative smoothing, e.g. -0.5) "
                          f"or null (adaptive alpha), got {alpha!r}")


def check_adaptive(beta: object, sign: object, by: object = "forget", max_abs: object = None,
                   prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming ``{prefix}beta`` / ``adaptive_alpha_sign`` / ``adaptive_alpha_by`` /
    ``max_abs_alpha`` unless they are valid settings of :func:`adaptive_alpha`."""
    if not (_number(beta) and 0.0 <= beta <= 1.0):
        raise ConfigError(f"{prefix}beta (the adaptive-alpha distance threshold) must be in [0, 1], the range of the "
                          f"feature distance (1 - cos) / 2; got {beta!r}")
    if sign not in ("negative", "positive"):
        raise ConfigError(f"{prefix}adaptive_alpha_sign must be 'negative' or 'positive' (the paper's sign is not "
                          f"found; see adaptive_alpha), got {sign!r}")
    if by not in ("forget", "retain"):
        raise ConfigError(f"{prefix}adaptive_alpha_by must be 'forget' (c_j / |B_f|, the paper's) or 'retain' "
                          f"(c_j / |B_r|, bounded by 1), got {by!r}")
    if max_abs is not None and not (_number(max_abs) and max_abs > 0):
        raise ConfigError(f"{prefix}max_abs_alpha must be a number > 0 (a cap on |alpha_j|) or null (no cap), "
                          f"got {max_abs!r}")


def check_retain_weight(p: object, key: str = "p") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``p`` is a number in [0, 1]."""
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ConfigError(f"{key} is UGradSL's retain weight in L = p CE_retain - (1 - p) GLS_forget and must be in "
                          f"[0, 1] (0: forget term only, like gradient ascent; 1: retain fine-tuning only), got {p!r}")


def check_normalize(normalize: object, key: str = "normalize") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``normalize`` is ``mean`` or ``sum``."""
    if normalize not in ("mean", "sum"):
        raise ConfigError(f"{key} must be 'mean' (each term a batch mean: p weighs the two sets whatever their "
                          f"batch sizes) or 'sum' (the paper's per-batch sums), got {normalize!r}")


def ugradsl_objective(
    forget_logits: Tensor | None,
    forget_labels: Tensor | None,
    retain_logits: Tensor | None,
    retain_labels: Tensor | None,
    *,
    alpha: float | Tensor,
    p: float,
    normalize: Normalize = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """UGradSL's per-step objective (minimised), as in the paper::

        L = p * R_{B_r}( CE(x, y) ) - (1 - p) * R_{B_f}( l_GLS(x, y, alpha) )

    ``R`` is the batch **mean** (``normalize="mean"``, the default) or the batch **sum** (``"sum"``, the paper's
    formula). With sums, ``p`` no longer weighs the two sets as written once the batch sizes differ (a retain
    batch twice the forget batch counts twice as much), hence the mean by default.

    Sign: the forget term enters with a minus, i.e. *gradient ascent* on ``l_GLS``. With
    ``alpha = -a < 0`` the forget part is ``-(1 + a) CE(x, y) + (a / K) sum_k CE(x, k)``: ascent on the true label
    amplified by ``1 + a`` plus descent toward the uniform prediction. ``+l_GLS`` with ``alpha < 0`` would train
    *toward* the forget labels. ``p = 0, alpha = 0`` is plain gradient ascent; ``p = 1`` is fine-tuning on the
    retain set.

    A term whose weight is 0 (``p = 0`` or ``p = 1``) is left out of the graph (its inputs may be ``None``); its
    metrics are still reported when its inputs are given.

    Hand check (``normalize="mean"``): forget logits ``[[0, 0]]`` (``l_GLS = log 2`` for any alpha), retain logits
    ``[[0, 0]]`` (``CE = log 2``), ``p = 0.25``: ``L = 0.25 log 2 - 0.75 log 2 = -0.5 log 2``.

    Args:
        forget_logits: (B_f, K) logits of the forget batch (``None`` only when ``p = 1``).
        forget_labels: (B_f,) their true labels.
        retain_logits: (B_r, K) logits of the retain batch (``None`` only when ``p = 0``).
        retain_labels: (B_r,) their labels.
        alpha: the smoothing rate, a number <= 1 or a (B_f,) tensor (adaptive alpha, :func:`adaptive_alpha`).
        p: retain weight in [0, 1].
        normalize: ``"mean"`` or ``"sum"`` (see above).

    Returns:
        ``(loss, metrics)``, metrics detached: ``retain_term`` (``p R(CE_r)``) and ``forget_term``
        (``-(1 - p) R(l_GLS)``), whose sum is the loss; ``retain_ce`` (mean CE on the retain batch), ``forget_gls``
        (mean ``l_GLS``), ``forget_ce`` (mean CE of the true forget labels: rises as the model forgets),
        ``alpha`` (mean rate) and ``alpha_min`` (the most negative rate), for the parts given.
    """
    check_retain_weight(p)
    check_normalize(normalize)
    has_forget, has_retain = forget_logits is not None, retain_logits is not None
    if p < 1 and not has_forget:
        raise ValueError(f"p = {p} < 1 weighs the forget term, but no forget batch was given")
    if p > 0 and not has_retain:
        raise ValueError(f"p = {p} > 0 weighs the retain term, but no retain batch was given")
    metrics: dict[str, Tensor] = {}
    terms: list[Tensor] = []
    if has_retain:
        ce_r = F.cross_entropy(retain_logits.float(), retain_labels, reduction=normalize)
        retain_term = p * ce_r if p > 0 else None
        scale = retain_labels.numel() if normalize == "sum" else 1
        metrics["retain_ce"] = ce_r.detach() / max(scale, 1)
        metrics["retain_term"] = (p * ce_r).detach()
        if retain_term is not None:
            terms.append(retain_term)
    if has_forget:
        gls_f = gls_cross_entropy(forget_logits, forget_labels, alpha, reduction=normalize)
        forget_term = -(1.0 - p) * gls_f
        scale = forget_labels.numel() if normalize == "sum" else 1
        metrics["forget_gls"] = gls_f.detach() / max(scale, 1)
        metrics["forget_ce"] = F.cross_entropy(forget_logits.detach().float(), forget_labels)
        metrics["forget_term"] = forget_term.detach()
        rates = alpha.detach().float() if isinstance(alpha, Tensor) else torch.tensor(float(alpha))
        metrics["alpha"], metrics["alpha_min"] = rates.mean(), rates.min()
        if p < 1:
            terms.append(forget_term)
    loss = torch.stack(terms).sum() if len(terms) > 1 else terms[0]
    return loss, metrics


def feature_distances(forget_features: Tensor, retain_features: Tensor) -> Tensor:
    """Pairwise distances in [0, 1] between forget and retain samples in feature space.

    ``d(u, v) = (1 - cos(u, v)) / 2``: the cosine distance halved, so identical directions are 0, orthogonal ones
    0.5 and opposite ones 1. UGradSL's adaptive rate needs a distance in [0, 1] but its paper does not say which
    (its reviewers asked): this one is our choice, scale-free and bounded. The features are the
    classifier's penultimate activations (the input of its final layer; see
    :meth:`~lit_align.methods.classifier_unlearning.ClassifierUnlearningModule.features`).

    Hand check: ``u = [1, 0]``, ``v = [[1, 0], [0, 1], [-1, 0]]`` gives ``[[0, 0.5, 1]]``.

    Args:
        forget_features: (B_f, D).
        retain_features: (B_r, D).

    Returns:
        (B_f, B_r) distances (no gradient).
    """
    if forget_features.ndim != 2 or retain_features.ndim != 2 or forget_features.shape[1] != retain_features.shape[1]:
        raise ValueError(f"features must be (B_f, D) and (B_r, D), got {tuple(forget_features.shape)} and "
                         f"{tuple(retain_features.shape)}")
    u = F.normalize(forget_features.detach().float(), dim=-1)  # (B_f, D)
    v = F.normalize(retain_features.detach().float(), dim=-1)  # (B_r, D)
    return ((1.0 - u @ v.T) / 2).clamp(0.0, 1.0)  # (B_f, B_r)


def adaptive_alpha(
    forget_features: Tensor, retain_features: Tensor, *, beta: float, sign: AlphaSign = "negative",
    by: AlphaBy = "forget", max_abs: float | None = None,
) -> Tensor:
    """UGradSL's adaptive smoothing rate per forget sample (used when no fixed alpha is configured).

    Per the paper: for forget sample j, ``c_j`` = the number of retain samples of the batch within distance
    ``beta`` of it (:func:`feature_distances`), and ``alpha_j = c_j / |B_f|``. A forget sample close to many retain
    samples gets a larger ``|alpha_j|``: more of its target is spread over all classes, so less is pushed away
    from its true class alone.

    **The sign is NOT FOUND in the sources.** As written the rule gives ``alpha_j >= 0`` (positive smoothing), yet
    the method is named for negative smoothing, ``alpha < 0``. ``sign="negative"`` (default, our choice, consistent
    with the method's premise) returns ``-c_j / |B_f|``; ``sign="positive"`` returns the formula as written,
    capped at 1 (the GLS target's true-class weight ``1 - alpha`` must stay >= 0).

    **Scale.** ``c_j`` counts retain samples but is divided by the forget batch size (``by="forget"``, the paper's
    formula, default), so ``|alpha_j|`` reaches ``|B_r| / |B_f|``: a last forget batch of 1 row beside 64 retain
    rows gives ``alpha = -64``. ``by="retain"`` divides by ``|B_r|`` instead (``|alpha_j| <= 1``), and ``max_abs``
    caps ``|alpha_j|`` (``None``: no cap, the paper's). The module logs ``train/alpha_min``.

    Hand check: one forget sample ``[1, 0]``, retain ``[[1, 0], [1, 1], [-1, 0]]`` (distances ``0, 0.146, 1``),
    ``beta = 0.2``: ``c = 2`` and ``alpha = -2`` (``"negative"``), ``1`` (``"positive"``, capped from 2);
    ``by="retain"``: ``-2/3``; ``max_abs=1.5``: ``-1.5``.

    Args:
        forget_features: (B_f, D) features of the forget batch.
        retain_features: (B_r, D) features of the retain batch.
        beta: distance threshold in [0, 1].
        sign: ``"negative"`` or ``"positive"`` (see above).
        by: ``"forget"`` (divide by ``|B_f|``) or ``"retain"`` (by ``|B_r|``).
        max_abs: cap on ``|alpha_j|``, > 0, or ``None``.

    Returns:
        (B_f,) float rates, no gradient.
    """
    check_adaptive(beta, sign, by, max_abs)
    counts = (feature_distances(forget_features, retain_features) <= beta).sum(-1).float()  # (B_f,)
    rate = counts / (forget_features.shape[0] if by == "forget" else retain_features.shape[0])
    if max_abs is not None:
        rate = rate.clamp(max=float(max_abs))
    return -rate if sign == "negative" else rate.clamp(max=1.0)
