"""Which pool rows an active-sampling round queries (FIS and its baselines; Pang et al., arXiv 2402.12789).

Chosen in YAML by ``class_path`` under ``model.init_args.sampler`` (the paper's code numbers them ``strategy``):

* :class:`FairInfluenceSampler` (strategy 2, FIS): the ``budget`` most negative fairness influences at the
  pseudo-label among candidates that do not hurt validation accuracy; after the query, the true-label recheck
  discards items whose true-label accuracy or fairness influence is positive (:mod:`lit_align.classifiers.influence`).
* :class:`RandomSampler` (strategy 1): ``budget`` candidates uniformly at random (pseudo-labels in the last epochs:
  random labels, as the code's baseline).
* :class:`EntropySampler` (strategy 6, "BALD"): the ``budget`` candidates of highest predictive entropy. With
  ``mc_samples = 0`` (default) this is the entropy of the deterministic (eval-mode) prediction; with
  ``mc_samples > 0`` the network's dropout stays on for that many stochastic passes and the score is BALD's mutual
  information ``H[mean_t p_t] - mean_t H[p_t]`` (needs a backbone with dropout > 0, else it is 0 everywhere).
  Pseudo-labels in the last epochs: the predicted label (as the code).
* :class:`JTTSampler` (strategy 7, JTT "just train twice", Liu et al. 2021): JTT up-weights the training rows an
  ERM model misclassifies. In this active setting it queries ``budget`` random candidates (the label budget pays for
  all of them), then adds every queried row once and the rows the current model misclassifies ``upweight`` times in
  total (the up-weighting is repetition in the new-data stream). This is an adaptation, not the code's strategy 7:
  the code takes the misclassified rows of the LABELLED set (about half the budget per class, no queries) and adds
  them to the new-data stream each round. No pseudo-labels (its last-epoch rounds query).
* ISAL (strategy 8, Hessian-approximated influence) is out of scope here.

``model.init_args.sampler: null`` is the ERM baseline on the initial labelled set (no rounds).

Selection rule (FIS): we follow the paper's algorithm: pick the ``budget`` most negative pre-query scores, query
exactly those (the budget), then drop the ones the true-label recheck rejects. The released code's
``sample_by_infl`` differs: it applies the true-label check to all scanned candidates before taking the top ones,
keeps up to ``budget`` rows per round, and charges a label for every candidate whose pre-check score beats the last
selected one (``sel_true_false_with_labels``); that rule is not implemented here.

Every strategy returns pool indices to query; :class:`lit_align.methods.fis.FISModule` spends the label budget
through the data's ``LabelOracle`` on every queried index, even those the recheck later discards, and
logs the running totals ``fis/spent``, ``fis/kept``, ``fis/discarded`` and ``fis/pseudo_added`` (pseudo-labelled rows
cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_align.classifiers.influence import (
    ValidationBatch,
    fis_scores,
    parameter_names,
    score_candidates,
    select_most_negative,
    shard_positions,
    true_label_keep,
    unshard,
    validation_gradients,
)
from lit_align.engine.seeds import seeded_rng
from lit_align.errors import ConfigError
from lit_align.losses.fairness import FAIRNESS_KINDS, FairnessKind
from lit_align.modes import eval_mode, train_mode

__all__ = [
    "EntropySampler",
    "FairInfluenceSampler",
    "JTTSampler",
    "RandomSampler",
    "Sampler",
    "Selection",
    "SelectionContext",
]


@dataclass
class SelectionContext:
    """What a selection round sees. Identical on every rank (the candidates are drawn from a generator seeded by
    ``(seed, round)``); only the sharded scoring differs per rank, and ``gather`` makes it whole again."""

    net: nn.Module
    """The classifier (its ``forward(x)`` returns (B, K) logits)."""
    head: Sequence[nn.Parameter]
    """The backbone's ``head_parameters(net)``: the "head" parameter subset."""
    candidates: Tensor
    """(N,) dataset indices of the pool rows scanned this round (at most ``scan_factor * budget``)."""
    features: Callable[[Tensor], Any]
    """Dataset indices -> the rows' ``x`` (a tensor or a dict of tensors), on the network's device."""
    validation: Sequence[ValidationBatch]
    """Validation batches ``(x, y, group)``: the only place group labels are read."""
    num_classes: int
    """Number of classes K."""
    num_groups: int
    """Number of sensitive groups M."""
    budget: int
    """Items to select this round."""
    generator: torch.Generator
    """Seeded from ``(seed, round)``: random choices are the same on every rank and after a resume."""
    rank: int = 0
    """This process's rank."""
    world: int = 1
    """Number of processes."""
    gather: Callable[[Tensor], Tensor] = field(default=lambda t: t.unsqueeze(0))
    """Stack one tensor from every rank: (L, ...) -> (world, L, ...)."""


@dataclass
class Selection:
    """One round's choice: pool indices to query (or, in pseudo-label rounds, to add with ``pseudo_labels``)."""

    indices: Tensor
    """(n,) dataset indices, best first."""
    scores: Tensor
    """(n,) the strategy's scores of the selected items (FIS: ``s(z)``, negative)."""
    pseudo_labels: Tensor | None = None
    """(n,) FIS's ``c_hat`` (only FIS has pseudo-labels)."""
    influence: tuple[Tensor, Tensor] | None = None
    """FIS: the selected items' ``(I_acc, I_fair)`` (n, K) for the true-label recheck."""
    counts: dict[str, int] = field(default_factory=dict)
    """The round's counts, logged as ``fis/round_<name>`` (FIS: ``candidates``, ``pass_remove_pos``, ``negative``,
    ``selected``; others: ``candidates``, ``selected``)."""


class Sampler:
    """Base: ``select(ctx) -> Selection`` and ``accept(ctx, selection, labels) -> (n,) repeats`` (0 discards a
    queried item; more than 1 up-weights it)."""

    #: whether ``select`` gives pseudo-labels, so the last epochs can add rows without querying
    pseudo_labels = False

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def accept(self, ctx: SelectionContext, selection: Selection, labels: Tensor) -> Tensor:
        return torch.ones_like(labels)


def _top(scores: Tensor, budget: int, candidates: Tensor) -> Selection:
    """The ``budget`` highest ``scores`` (stable: ties keep candidate order)."""
    order = torch.argsort(-scores, stable=True)[:budget]
    return Selection(indices=candidates[order], scores=scores[order],
                     counts={"candidates": len(candidates), "selected": len(order)})


def _probabilities(ctx: SelectionContext, *, train: bool = False) -> Tensor:
    """(N, K) softmax of the candidates (eval mode unless ``train``, which keeps dropout on)."""
    x = ctx.features(ctx.candidates)
    with torch.no_grad():
        with (train_mode if train else eval_mode)(ctx.net):
            return ctx.net(x).softmax(-1)


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@dataclass
class RandomSampler(Sampler):
    """Strategy 1: ``budget`` candidates uniformly at random (from the round's generator); pseudo-labels (last
    epochs) uniformly random classes."""

    pseudo_labels = True

    def select(self, ctx: SelectionContext) -> Selection:
        order = torch.randperm(len(ctx.candidates), generator=ctx.generator)[:ctx.budget]
        labels = torch.randint(ctx.num_classes, (len(order),), generator=ctx.generator)
        return Selection(indices=ctx.candidates[order], scores=torch.zeros(len(order)), pseudo_labels=labels,
                         counts={"candidates": len(ctx.candidates), "selected": len(order)})


@dataclass
class EntropySampler(Sampler):
    """Strategy 6 ("BALD"): highest predictive entropy, or BALD's mutual information under MC dropout."""

    mc_samples: int = 0
    """0: entropy of the eval-mode prediction (no MC dropout); > 0: that many dropout passes and BALD's mutual
    information ``H[mean p] - mean H[p]``."""

    pseudo_labels = True

    def __post_init__(self) -> None:
        if self.mc_samples < 0:
            raise ConfigError(f"sampler.init_args.mc_samples must be >= 0, got {self.mc_samples}")

    def select(self, ctx: SelectionContext) -> Selection:
        probs = _probabilities(ctx)
        if self.mc_samples == 0:
            return _with_predictions(_top(_entropy(probs), ctx.budget, ctx.candidates), probs, ctx.candidates)
        seed = int(torch.randint(2**31, (1,), generator=ctx.generator))
        with seeded_rng(seed, next(ctx.net.parameters()).device):  # the same dropout masks on every rank
            passes = torch.stack([_probabilities(ctx, train=True) for _ in range(self.mc_samples)])  # (T, N, K)
        mutual = _entropy(passes.mean(0)) - _entropy(passes).mean(0)
        return _with_predictions(_top(mutual, ctx.budget, ctx.candidates), probs, ctx.candidates)


def _with_predictions(selection: Selection, probs: Tensor, candidates: Tensor) -> Selection:
    """``selection`` with the eval-mode predicted labels of its rows as pseudo-labels."""
    position = {int(c): i for i, c in enumerate(candidates.tolist())}
    rows = torch.as_tensor([position[int(i)] for i in selection.indices.tolist()], dtype=torch.long)
    selection.pseudo_labels = probs.argmax(-1).cpu()[rows]
    return selection


@dataclass
class JTTSampler(Sampler):
    """Strategy 7 (JTT): query ``budget`` random candidates, add the ones the current model misclassifies
    ``upweight`` times (the others once)."""

    upweight: int = 5
    """Total copies of a misclassified queried row in the new-data stream (JTT's lambda_up)."""

    def __post_init__(self) -> None:
        if self.upweight < 1:
            raise ConfigError(f"sampler.init_args.upweight must be >= 1, got {self.upweight}")

    def select(self, ctx: SelectionContext) -> Selection:
        selection = RandomSampler().select(ctx)
        selection.pseudo_labels = None
        return selection

    def accept(self, ctx: SelectionContext, selection: Selection, labels: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(ctx.net):
            predicted = ctx.net(ctx.features(selection.indices)).argmax(-1).cpu()
        return torch.where(predicted != labels.cpu(), self.upweight, 1)


@dataclass
class FairInfluenceSampler(Sampler):
    """Strategy 2, FIS: score every candidate by ``s(z) = I_fair(z, c_hat)``, zeroed where
    ``I_acc(z, c_hat) > 0``, select the ``budget`` most negative, recheck with the true labels."""

    fairness: FairnessKind = "dp"
    """The relaxed fairness loss on the validation set: ``dp``, ``eop`` or ``eod``."""
    mu: float = 1.0
    """Weight of the fairness loss (``mu / 2 ||Delta||^2``; 1 in the paper's scripts)."""
    parameters: str | list[str] = "head"
    """Parameter subset of the influences: ``head`` (the backbone's classifier layer; default), ``all``, or a list
    of ``named_parameters`` names."""
    remove_pos: bool = True
    """Reject candidates whose accuracy influence at the pseudo-label is positive (the scripts' setting)."""
    recheck: bool = True
    """Discard queried items whose true-label accuracy or fairness influence is positive."""
    positive_class: int = 1
    """The positive class of EOp / EOd."""
    chunk_size: int = 256
    """Candidates per ``vmap`` call (memory: chunk x K x P floats)."""

    pseudo_labels = True

    def __post_init__(self) -> None:
        if self.fairness not in FAIRNESS_KINDS:
            raise ConfigError(f"sampler.init_args.fairness must be one of {FAIRNESS_KINDS}, got {self.fairness!r}")

    def _names(self, ctx: SelectionContext) -> list[str]:
        return parameter_names(ctx.net, self.parameters, ctx.head)

    def _gradients(self, ctx: SelectionContext, names: list[str]) -> tuple[Tensor, Tensor]:
        return validation_gradients(ctx.net, names, ctx.validation, fairness=self.fairness, mu=self.mu,
                                    num_groups=max(ctx.num_groups, 2), positive_class=self.positive_class)

    def influences(self, ctx: SelectionContext, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(I_acc, I_fair)`` (n, K) of the pool rows ``indices``, scored on this rank's shard and gathered."""
        names = self._names(ctx)
        g_acc, g_fair = self._gradients(ctx, names)
        mine = shard_positions(len(indices), ctx.rank, ctx.world)
        i_acc, i_fair = score_candidates(ctx.net, names, ctx.features(indices[mine]), ctx.num_classes, g_acc, g_fair,
                                         chunk_size=self.chunk_size)
        both = unshard(torch.cat([i_acc, i_fair], dim=1), len(indices), ctx.world, ctx.gather)  # (n, 2K)
        return both[:, :ctx.num_classes].cpu(), both[:, ctx.num_classes:].cpu()

    def select(self, ctx: SelectionContext) -> Selection:
        i_acc, i_fair = self.influences(ctx, ctx.candidates)
        scores, c_hat = fis_scores(i_acc, i_fair, remove_pos=self.remove_pos)
        chosen = select_most_negative(scores, ctx.budget)
        rows = torch.arange(len(c_hat))
        counts = {"candidates": len(ctx.candidates), "pass_remove_pos": int((i_acc[rows, c_hat] <= 0).sum()),
                  "negative": int((scores < 0).sum()), "selected": len(chosen)}
        return Selection(indices=ctx.candidates[chosen], scores=scores[chosen], pseudo_labels=c_hat[chosen],
                         influence=(i_acc[chosen], i_fair[chosen]), counts=counts)

    def accept(self, ctx: SelectionContext, selection: Selection, labels: Tensor) -> Tensor:
        if not self.recheck or selection.influence is None:
            return torch.ones_like(labels)
        return true_label_keep(*selection.influence, labels.cpu()).long()


# a module built in Python (not by the CLI) keeps the sampler object in its hyperparameters: checkpoints stay
# loadable with torch.load(weights_only=True)
torch.serialization.add_safe_globals([RandomSampler, EntropySampler, JTTSampler, FairInfluenceSampler])
