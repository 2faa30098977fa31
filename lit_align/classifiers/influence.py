"""First-order influences of FIS (Pang et al., arXiv 2402.12789, and its released code).

With ``g_acc`` and ``g_fair`` the gradients of the validation accuracy and fairness losses
(:mod:`lit_align.losses.fairness`) over a parameter subset, and ``g_z(c)`` the gradient of ``CE(f(x_z), c)`` over
the same subset, the influence of adding candidate ``z`` with label ``c`` is (identity Hessian)

    I_acc(z, c) = -<g_z(c), g_acc>          I_fair(z, c) = -<g_z(c), g_fair>

the code's sign: one SGD step ``theta - eta g_z(c)`` changes the validation loss by about ``eta * I``, so
**negative is good**. FIS's pseudo-label is ``c_hat = argmin_c |I_acc(z, c)|`` and its score
``s(z) = I_fair(z, c_hat)``, set to 0 where ``I_acc(z, c_hat) > 0`` (``remove_pos``: the candidate would hurt
validation accuracy). The ``budget`` most negative scores are selected (``s < 0`` only); after the labels are
queried, items whose true-label ``I_acc`` or ``I_fair`` is positive are discarded.

Two classes (every data set of the paper): the cross-entropy gradient over the logits is ``p - e_c``, so
``g_z(0) = p_1 v`` and ``g_z(1) = -p_0 v`` for one vector ``v``, i.e. ``g_z(0) = -(p_1 / p_0) g_z(1)`` over ANY
parameter subset. The two influences then have opposite signs and ``|I(z, 0)| / |I(z, 1)| = p_1 / p_0``: the
pseudo-label ``argmin_c |I_acc(z, c)|`` is always the model's prediction, and among selected rows (``I_acc(z,
c_hat) <= 0``, ``s < 0``) the true-label recheck drops exactly the misclassified ones (their true label's
``I_acc`` is positive). ``remove_pos`` thus keeps the candidates whose prediction's step would lower the
validation loss, and the score ranks them by how much that step lowers the fairness loss.

Parameter subset (the paper's code takes the first 4 leaves of the Flax tree, ``sel_layers = 4``, which is
not the head in general): ``"head"`` (default) is the backbone's ``head_parameters(module)`` (the final classifier
layer), ``"all"`` every trainable parameter, or a list of ``named_parameters`` names. Per-sample gradients over all
parameters of a large model are memory-heavy (N x K x P floats per chunk).

Per-candidate, per-class gradients use ``torch.func``: ``vmap`` over samples of ``vmap`` over classes of
``grad`` of the single-row cross-entropy, through ``functional_call`` with the subset as the only replaced
parameters. Scoring runs the network in eval mode (no dropout noise; batch-norm uses its running statistics).

DDP: every rank computes the (small) validation gradients on the whole validation set, scores its shard
``positions[rank::world]`` of the candidates and all-gathers the scores (:func:`shard_positions`,
:func:`unshard`), so the selection is identical on every rank and equal to one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from lit_align.errors import ConfigError
from lit_align.losses.fairness import FairnessKind, accuracy_loss, fairness_loss
from lit_align.modes import eval_mode

__all__ = [
    "ValidationBatch",
    "fis_scores",
    "influences",
    "parameter_names",
    "per_class_gradients",
    "pseudo_labels",
    "score_candidates",
    "select_most_negative",
    "shard_positions",
    "true_label_keep",
    "unshard",
    "validation_gradients",
    "validation_losses",
]

#: one validation batch: ``(x, y (B,), group (B,))``; ``x`` a tensor or a dict of tensors (text)
ValidationBatch = tuple[Any, Tensor, Tensor]


def parameter_names(net: nn.Module, which: str | Sequence[str], head: Sequence[nn.Parameter]) -> list[str]:
    """Names (``net.named_parameters`` order) of the parameter subset: ``"head"`` (the ``head`` parameters, e.g. a
    backbone's ``head_parameters(net)``), ``"all"`` (every parameter that requires grad) or explicit names.
    An unknown name raises a ConfigError naming ``sampler.init_args.parameters`` and listing the valid names."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if which == "all":
        names = [n for n, _ in named]
    elif which == "head":
        ids = {id(p) for p in head}
        names = [n for n, p in named if id(p) in ids]
    elif isinstance(which, str):
        raise ConfigError(f"sampler.init_args.parameters must be 'head', 'all' or a list of parameter names, got "
                          f"{which!r}")
    else:
        valid = [n for n, _ in named]
        unknown = [n for n in which if n not in valid]
        if unknown:
            raise ConfigError(f"sampler.init_args.parameters: unknown parameter(s) {unknown}; the model's trainable "
                              f"parameters are {valid}")
        names = [n for n in valid if n in set(which)]
    if not names:
        raise ConfigError(f"sampler.init_args.parameters={which!r} selects no trainable parameter")
    return names


def _subset(net: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = dict(net.named_parameters())
    return [params[n] for n in names]


def validation_losses(net: nn.Module, batches: Iterable[ValidationBatch], *, fairness: FairnessKind, mu: float = 1.0,
                      num_groups: int = 2, positive_class: int = 1) -> tuple[Tensor, Tensor]:
    """``(L_acc, L_fair)`` on the validation batches, each the batch-size-weighted mean of the per-batch losses
    (the code averages per-batch gradients the same way, so :func:`validation_gradients` is exactly their
    gradient; with one batch, the plain losses)."""
    total, acc, fair = 0, 0.0, 0.0
    for x, y, group in batches:
        logits = net(x)  # (B, K)
        n = y.shape[0]
        acc = acc + n * accuracy_loss(logits, y)
        fair = fair + n * fairness_loss(logits.softmax(-1), y, group, fairness, mu=mu, num_groups=num_groups,
                                        positive_class=positive_class)[0]
        total += n
    if total == 0:
        raise ConfigError("FIS's influences need validation rows, but the validation set is empty: raise "
                          "data.init_args.split.init_args.val_ratio")
    return acc / total, fair / total


def validation_gradients(net: nn.Module, names: Sequence[str], batches: Iterable[ValidationBatch], *,
                         fairness: FairnessKind, mu: float = 1.0, num_groups: int = 2,
                         positive_class: int = 1) -> tuple[Tensor, Tensor]:
    """``(g_acc, g_fair)``, flat (P,) gradients of :func:`validation_losses` over the parameters ``names`` (in eval
    mode), detached."""
    batches = list(batches)
    _check_groups(batches, num_groups)
    params = _subset(net, names)
    with eval_mode(net), torch.enable_grad():
        l_acc, l_fair = validation_losses(net, batches, fairness=fairness, mu=mu, num_groups=num_groups,
                                          positive_class=positive_class)
        g_acc = torch.autograd.grad(l_acc, params, retain_graph=True, allow_unused=True)
        g_fair = torch.autograd.grad(l_fair, params, allow_unused=True)
    return _flatten(g_acc, params), _flatten(g_fair, params)


def _check_groups(batches: Sequence[ValidationBatch], num_groups: int) -> None:
    """A ConfigError when the validation set lacks a group: its fairness gap would be empty, ``g_fair = 0`` and
    nothing would ever be selected."""
    if not batches:
        return
    present = torch.unique(torch.cat([group.reshape(-1).long().cpu() for _, _, group in batches])).tolist()
    missing = [g for g in range(num_groups) if g not in present]
    if missing:
        raise ConfigError(f"FIS's validation set has no row of group(s) {missing} (groups present: {present}): the "
                          "fairness loss would be constant and nothing selected; check data.init_args.group (and "
                          "group_threshold / group_positive) or raise data.init_args.split.init_args.val_ratio")


def _flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).detach()


def per_class_gradients(net: nn.Module, names: Sequence[str], x: Any, num_classes: int) -> Tensor:
    """(N, K, P): the gradient of ``CE(f(x_n), c)`` over the parameters ``names`` for every row ``n`` of ``x``
    (a (N, ...) tensor or a dict of them) and every class ``c`` (``vmap`` over rows of ``vmap`` over classes of
    ``grad``). Call it under :func:`lit_align.modes.eval_mode`."""
    params = {n: p.detach() for n, p in net.named_parameters() if n in set(names)}

    def row_loss(p: dict[str, Tensor], row: Any, label: Tensor) -> Tensor:
        logits = functional_call(net, p, (tree_map(lambda t: t.unsqueeze(0), row),))  # (1, K)
        return F.cross_entropy(logits, label.unsqueeze(0))

    classes = torch.arange(num_classes, device=next(iter(params.values())).device)
    per_class = vmap(grad(row_loss), in_dims=(None, None, 0))
    grads = vmap(per_class, in_dims=(None, 0, None))(params, x, classes)  # name -> (N, K, *shape)
    first = grads[names[0]]
    return torch.cat([grads[name].reshape(first.shape[0], num_classes, -1) for name in names], dim=2)


def influences(grads: Tensor, g_val: Tensor) -> Tensor:
    """(N, K) ``I = -<g_z(c), g_val>`` from (N, K, P) per-class gradients and a (P,) validation gradient."""
    return -(grads @ g_val)


def score_candidates(net: nn.Module, names: Sequence[str], x: Any, num_classes: int, g_acc: Tensor, g_fair: Tensor,
                     *, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(I_acc, I_fair)``, each (N, K), for the rows of ``x`` in chunks of ``chunk_size`` (memory: chunk x K x P)."""
    n = _rows(x)
    acc, fair = [], []
    with eval_mode(net), torch.no_grad():
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = tree_map(lambda t, rows=rows: t[rows], x)
            grads = per_class_gradients(net, names, chunk, num_classes)  # (n_c, K, P)
            acc.append(influences(grads, g_acc.to(grads.dtype)))
            fair.append(influences(grads, g_fair.to(grads.dtype)))
    if not acc:
        empty = g_acc.new_zeros(0, num_classes)
        return empty, empty.clone()
    return torch.cat(acc), torch.cat(fair)


def _rows(x: Any) -> int:
    return x.shape[0] if isinstance(x, Tensor) else next(iter(x.values())).shape[0]


def pseudo_labels(i_acc: Tensor) -> Tensor:
    """(N,) ``argmin_c |I_acc(z, c)|``: the label whose accuracy influence is closest to zero."""
    return i_acc.abs().argmin(dim=1)


def fis_scores(i_acc: Tensor, i_fair: Tensor, *, remove_pos: bool = True) -> tuple[Tensor, Tensor]:
    """``(s (N,), c_hat (N,))``: ``s = I_fair(z, c_hat)``, zeroed where ``I_acc(z, c_hat) > 0`` when ``remove_pos``."""
    c_hat = pseudo_labels(i_acc)
    rows = torch.arange(i_acc.shape[0], device=i_acc.device)
    scores = i_fair[rows, c_hat]
    if remove_pos:
        scores = torch.where(i_acc[rows, c_hat] > 0, torch.zeros_like(scores), scores)
    return scores, c_hat


def select_most_negative(scores: Tensor, budget: int) -> Tensor:
    """Positions of the (at most) ``budget`` most negative ``scores``, strictly negative ones only, most negative
    first (a stable sort: ties keep candidate order, so every rank selects the same)."""
    order = torch.argsort(scores, stable=True)
    order = order[scores[order] < 0]
    return order[:budget]


def true_label_keep(i_acc: Tensor, i_fair: Tensor, labels: Tensor) -> Tensor:
    """(N,) bool: keep a queried item unless its true-label ``I_acc`` or ``I_fair`` is positive (the code's
    ``infl_true > 0`` / ``infl_fair_true > 0`` zeroing)."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    return (i_acc[rows, labels] <= 0) & (i_fair[rows, labels] <= 0)


def shard_positions(n: int, rank: int, world: int) -> Tensor:
    """This rank's candidate positions ``rank, rank + world, ...`` of ``n``."""
    return torch.arange(rank, n, world)


def unshard(local: Tensor, n: int, world: int, gather: Callable[[Tensor], Tensor]) -> Tensor:
    """All ``n`` rows in candidate order from each rank's rows for :func:`shard_positions`: pads ``local`` to
    ``ceil(n / world)`` rows, ``gather`` returns them stacked (world, L, ...) (``LightningModule.all_gather`` or
    ``torch.distributed.all_gather``), and position ``i * world + r`` is row ``i`` of rank ``r``."""
    if world == 1:
        return local[:n]
    length = math.ceil(n / world)
    pad = local.new_zeros((length - local.shape[0], *local.shape[1:]))
    stacked = gather(torch.cat([local, pad]))  # (W, L, ...)
    return stacked.transpose(0, 1).reshape(length * world, *local.shape[1:])[:n]
