"""FIS: fair influential sampling (Pang et al., "Fair Classifiers Without Fair Training: An Influence-Guided Data
Sampling Approach", arXiv 2402.12789; NeurIPS 2024 "Fairness Without Harm")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.classifiers.backbones import Backbone
from lit_align.classifiers.sampling import Sampler, Selection, SelectionContext
from lit_align.data.classification import LabelOracle, TrainStreams
from lit_align.engine.seeds import generator
from lit_align.errors import ConfigError
from lit_align.methods.classifier_base import ClassifierBase
from lit_align.modes import eval_mode

__all__ = ["FISModule", "FISState", "mix_probabilities", "stream_rows"]

#: the three streams a step may train on (the code's ``np.random.choice(3, ...)``)
LABELLED, NEW, ORG = 0, 1, 2


def mix_probabilities(new_prob: float, org_ratio: float, new_batches: int, labelled_batches: int) -> list[float]:
    """The code's per-step choice among ``(labelled, new, org)``: ``[1 - p, p (1 - org_ratio), p org_ratio]`` with
    ``p = new_prob``, except while the new data fills fewer than 2 batches, when ``p = (new_batches + 1) /
    (new_batches + labelled_batches)`` (counted in batches). No new data: the labelled batch."""
    if new_batches == 0:
        return [1.0, 0.0, 0.0]
    p = new_prob if new_batches >= 2 else min(1.0, (new_batches + 1) / (new_batches + labelled_batches))
    return [1.0 - p, p * (1.0 - org_ratio), p * org_ratio]


def stream_rows(n: int, position: int, size: int, rank: int, world: int, perm: Tensor) -> Tensor:
    """This rank's positions into the new data for the batch starting at ``position`` of a pass: the pass's
    permutation ``perm`` (n,) padded by wrapping to a multiple of ``world`` and sharded ``rank::world`` (as
    ``DistributedSampler``), then ``size`` rows from ``position`` of the shard (fewer at the end of the pass)."""
    length = math.ceil(n / world)
    padded = perm[torch.arange(length * world) % n]
    shard = padded[rank::world]
    return shard[position:position + size]


@dataclass
class FISState:
    """Everything a selection run carries between steps; saved in checkpoints (``checkpoint["fis"]``)."""

    new_indices: list[int] = field(default_factory=list)
    """Dataset indices of the new-data stream, one entry per copy (JTT repeats up-weighted rows)."""
    new_labels: list[int] = field(default_factory=list)
    """Their labels: queried true labels, or pseudo-labels in the last epochs."""
    seen: list[int] = field(default_factory=list)
    """Pool rows already queried or added (never scanned again)."""
    queried: list[int] = field(default_factory=list)
    """The label oracle's revealed rows (the budget spent: one per queried row, kept or discarded)."""
    kept: int = 0
    """Queried rows that passed the recheck (joined the new data)."""
    discarded: int = 0
    """Queried rows the true-label recheck discarded (their labels were paid for all the same)."""
    pseudo_added: int = 0
    """Rows added with pseudo-labels (they cost no label budget)."""
    rounds: int = 0
    """Selection rounds run so far (seeds each round's generator)."""
    steps_since_warmup: int = 0
    """Training steps after warm-up (a round runs when it is a multiple of ``round_steps``)."""
    reference_acc: float | None = None
    """Validation accuracy at the first round (end of warm-up), measured on the round's validation batches: the
    last epochs' pseudo-labels need the round's validation accuracy ``>= it - tol``."""
    streams: dict[str, list[int]] = field(default_factory=lambda: {"new": [0, 0], "org": [0, 0]})
    """Per new-data stream (``new``, and ``org``: the code's second pass over the same rows) ``[pass, position]``
    in this rank's shard of the pass's permutation; reset when a round adds rows (the code rebuilds its loaders)."""
    round_log: list[dict[str, float]] = field(default_factory=list)
    """One entry per round: ``epoch``, ``step``, ``pseudo``, the sampler's counts (FIS: ``candidates``,
    ``pass_remove_pos``, ``negative``, ``selected``), ``queried``, ``kept``, ``pseudo_added``."""


class FISModule(ClassifierBase):
    """FIS: train by ERM, never reading training rows' sensitive attributes, and grow the training set with pool
    rows whose influence on a relaxed validation fairness loss is most negative, among those that do not hurt
    validation accuracy (the paper's algorithm).

    Schedule:

    1. warm-up: ERM on the labelled set (``data.split: ActiveLearningSplit``, subset ``labelled``) for
       ``warm_epochs`` epochs;
    2. then every ``round_steps`` training steps, a round: ``scan_factor * budget`` pool candidates (a random
       order seeded by ``(seed, round)``, rows never scanned before) go to the ``sampler``
       (:mod:`lit_align.classifiers.sampling`; FIS = ``FairInfluenceSampler``); the rows it selects are queried
       through the data's ``LabelOracle`` (the label budget: every queried row counts, kept or discarded by the
       true-label recheck) and the kept ones join the new-data stream. The first round runs at the first
       step after warm-up and then every ``round_steps`` steps counted across epochs (the code instead runs one at
       ``t % log_steps == 0`` within each epoch and one at every epoch end);
    3. mixing (``mix: code``, default, the released code's rule): each step trains on ONE batch, drawn from the
       labelled set, the new data or the "org" stream with probabilities ``[1 - p, p (1 - org_ratio),
       p org_ratio]`` (:func:`mix_probabilities`; ``p = new_prob``, or ``(n_new + 1) / (n_new + n_labelled)`` in
       batches while the new data fills fewer than 2 batches). For tabular data the code's org stream is a second
       loader over the same new rows, and so it is here (CelebA's code fills it by a second FIS selection from
       the original data, ``force_org``: not implemented). New-data batches come without replacement from a
       seeded per-pass permutation, sharded over DDP ranks (:func:`stream_rows`). ``mix: weighted`` (an earlier
       reading, opt-in): with probability ``new_prob`` the loss is ``(1 - org_ratio) CE(new batch) + org_ratio
       CE(labelled batch)``;
    4. the last ``pseudo_label_epochs`` epochs: if the round's validation accuracy (measured on the validation
       batches the round builds) has not dropped below the first round's by more than ``tol``, rounds add the
       sampler's picks with their pseudo-labels and no query (no budget; FIS: ``c_hat``, random: random labels,
       entropy: the predicted label, as the code does for its baselines; JTT has none and queries); otherwise the
       round is an ordinary queried round (the code's ``else: sample_by_infl``).

    ``sampler: null`` is the ERM baseline on the labelled set. Validation (``val/acc``, fairness gaps) runs every
    epoch as in the base class. Training batches are read for ``x`` and ``y`` only: a ``group`` key there is never
    touched (the data's training subsets carry none). Influences need the validation groups: the only reader is
    the round, through ``datamodule.groups(val indices)``.

    Logged: ``train/loss``, ``fis/new_batch`` (1 when the step trained on new data), and at every round, straight
    to the loggers (so a round never falls between ``log_every_n_steps``) and again at each epoch end: the running
    totals ``fis/spent`` (labels revealed: the budget), ``fis/kept``, ``fis/discarded`` (queried, paid for, and
    dropped by the recheck), ``fis/pseudo_added`` (no cost), ``fis/new_rows`` (new-data entries, with JTT's
    repeats), ``fis/rounds``, and the round's counts ``fis/round_<name>`` (FIS: ``candidates``,
    ``pass_remove_pos``, ``negative``, ``selected``). Every round's counts are also kept in ``state.round_log``.

    DDP: the candidates and the stream choice are the same on every rank; the FIS sampler scores each rank's shard
    of the candidates and all-gathers the scores, so every rank selects the same rows as one process; each rank
    trains on its own shard of the new data. ``trainer.accumulate_grad_batches > 1`` is refused (the per-step
    choice and the round period count optimiser steps).

    Config: ``configs/fis/adult.yaml`` (``lit-align fit -c configs/fis/adult.yaml``).
    """

    def __init__(
        self,
        backbone: Backbone,
        sampler: Sampler | None = None,
        budget: int = 128,
        round_steps: int = 200,
        warm_epochs: int = 1,
        new_prob: float = 0.9,
        org_ratio: float = 0.5,
        mix: Literal["code", "weighted"] = "code",
        pseudo_label_epochs: int = 0,
        tol: float = 0.0,
        scan_factor: int = 100,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            backbone: the classifier network builder (its ``head_parameters`` is the default influence subset).
            sampler: the selection strategy (``FairInfluenceSampler`` = FIS, ``RandomSampler``, ``EntropySampler``,
                ``JTTSampler``); ``null``: ERM on the labelled set.
            budget: rows selected (and queried) per round (the scripts' ``label_budget``).
            round_steps: training steps between rounds after warm-up (the scripts' ``log_steps``).
            warm_epochs: epochs of ERM on the labelled set before the first round.
            new_prob: probability that a step trains on new data (the new or org stream; once new data exists).
            org_ratio: ``mix: code``: the share of new-data steps that draw from the org stream (``ratio_org =
                0.5``); ``mix: weighted``: the labelled batch's weight in a new-data step's loss.
            mix: ``code`` (default): one batch per step, chosen among labelled / new / org as the released code
                does; ``weighted``: ``(1 - org_ratio) CE(new) + org_ratio CE(labelled)`` on new-data steps.
            pseudo_label_epochs: the last epochs (of ``trainer.max_epochs``, which must then be set) whose rounds
                add pseudo-labelled rows without querying (2 in the paper's code; 0 turns it off).
            tol: the largest drop of the round's validation accuracy below the first round's that still allows
                pseudo-labels.
            scan_factor: at most ``scan_factor * budget`` candidates are scored per round (100 in the code).
            optimizer: the optimiser (base-class default when ``None``).
            scheduler: an optional LR scheduler (stepped every optimiser step).
            seed: the network's initialisation and every sampling generator.
        """
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler, seed=seed)
        _check(budget >= 1, "model.init_args.budget", f"must be >= 1, got {budget}")
        _check(round_steps >= 1, "model.init_args.round_steps", f"must be >= 1, got {round_steps}")
        _check(warm_epochs >= 0, "model.init_args.warm_epochs", f"must be >= 0, got {warm_epochs}")
        _check(0.0 <= new_prob <= 1.0, "model.init_args.new_prob", f"must be in [0, 1], got {new_prob}")
        _check(0.0 <= org_ratio <= 1.0, "model.init_args.org_ratio", f"must be in [0, 1], got {org_ratio}")
        _check(mix in ("code", "weighted"), "model.init_args.mix", f"must be 'code' or 'weighted', got {mix!r}")
        _check(pseudo_label_epochs >= 0, "model.init_args.pseudo_label_epochs", f"must be >= 0, got {pseudo_label_epochs}")
        _check(tol >= 0.0, "model.init_args.tol", f"must be >= 0, got {tol}")
        _check(scan_factor >= 1, "model.init_args.scan_factor", f"must be >= 1, got {scan_factor}")
        self.sampler = sampler
        self.budget, self.round_steps, self.warm_epochs = budget, round_steps, warm_epochs
        self.org_ratio, self.mix = org_ratio, mix
        self.new_prob, self.pseudo_label_epochs, self.tol, self.scan_factor = new_prob, pseudo_label_epochs, tol, scan_factor
        self.state = FISState()
        self.oracle: LabelOracle | None = None

    # -- data ------------------------------------------------------------------------------------------
    def train_streams(self) -> TrainStreams:
        return TrainStreams(("labelled",), "sequential")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm, trainer = self.trainer.datamodule, self.trainer
        if self.sampler is not None:
            pool = len(dm.indices("pool"))
            if self.budget > pool:
                raise ConfigError(f"model.init_args.budget={self.budget} is larger than the unlabelled pool "
                                  f"({pool} rows): lower the budget or data.split.label_ratio")
            if self.pseudo_label_epochs > 0 and (trainer.max_epochs is None or trainer.max_epochs < 0):
                raise ConfigError(f"model.init_args.pseudo_label_epochs={self.pseudo_label_epochs} counts the last "
                                  "epochs of trainer.max_epochs, which is not set (a run bounded by max_steps only "
                                  "would pseudo-label every round): set trainer.max_epochs or "
                                  "model.init_args.pseudo_label_epochs: 0")
        if trainer.accumulate_grad_batches > 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: FISModule draws "
                              "its training stream and counts its rounds per optimiser step; set it to 1 (use a "
                              "larger data.init_args.batch_size instead)")
        self.oracle = LabelOracle(dm)
        self.oracle.load_state_dict({"queried": self.state.queried})

    def _features(self, indices: Tensor) -> Any:
        return move_data_to_device(self.trainer.datamodule.features(indices.cpu().numpy()), self.device)

    def _validation(self) -> list[tuple[Any, Tensor, Tensor]]:
        """The validation set in batches ``(x, y, group)``: the only read of sensitive attributes in training."""
        dm = self.trainer.datamodule
        idx = dm.indices("val")
        if len(idx) == 0:
            raise ConfigError("FIS needs validation rows with groups, but the 'val' subset is empty: raise "
                              "data.init_args.split.init_args.val_ratio")
        size = dm.eval_batch_size or len(idx)
        out = []
        for start in range(0, len(idx), size):
            part = idx[start:start + size]
            out.append((self._features(torch.as_tensor(part)), dm.labels(part).to(self.device),
                        dm.groups(part).to(self.device)))
        return out

    # -- rounds ----------------------------------------------------------------------------------------
    def _pseudo_epoch(self) -> bool:
        return self.pseudo_label_epochs > 0 and self.current_epoch >= self.trainer.max_epochs - self.pseudo_label_epochs

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.sampler is None or self.current_epoch < self.warm_epochs:
            return
        if self.state.steps_since_warmup % self.round_steps == 0:
            self._round()
        self.state.steps_since_warmup += 1

    def _candidates(self, gen: torch.Generator) -> Tensor:
        pool = torch.as_tensor(self.trainer.datamodule.indices("pool"), dtype=torch.long)
        fresh = pool[~torch.isin(pool, torch.as_tensor(self.state.seen, dtype=torch.long))]
        order = torch.randperm(len(fresh), generator=gen)[: self.scan_factor * self.budget]
        return fresh[order]

    def _context(self, validation: list[tuple[Any, Tensor, Tensor]]) -> SelectionContext:
        gen = generator(self.seed, self.state.rounds, "fis/round")
        return SelectionContext(
            net=self.net, head=self.head_parameters(), candidates=self._candidates(gen),
            features=self._features, validation=validation,
            num_classes=self.num_classes, num_groups=self.num_groups,
            budget=self.budget, generator=gen, rank=self.global_rank, world=self.trainer.world_size,
            gather=lambda t: self.all_gather(t))

    def _validation_accuracy(self, validation: list[tuple[Any, Tensor, Tensor]]) -> float:
        with torch.no_grad(), eval_mode(self.net):
            correct = sum(int((self.net(x).argmax(-1) == y).sum()) for x, y, _ in validation)
        return correct / sum(len(y) for _, y, _ in validation)

    def _use_pseudo_labels(self, accuracy: float) -> bool:
        if not (self._pseudo_epoch() and self.sampler.pseudo_labels):
            return False
        return accuracy >= self.state.reference_acc - self.tol

    def _round(self) -> None:
        validation = self._validation()
        accuracy = self._validation_accuracy(validation)
        if self.state.reference_acc is None:
            self.state.reference_acc = accuracy
        pseudo = self._use_pseudo_labels(accuracy)
        ctx = self._context(validation)
        if len(ctx.candidates) == 0:
            return
        selection: Selection = self.sampler.select(ctx)
        chosen = selection.indices.cpu()
        self.state.seen.extend(chosen.tolist())
        if pseudo:
            labels, repeats = selection.pseudo_labels.cpu(), torch.ones(len(chosen), dtype=torch.long)
            self.state.pseudo_added += len(chosen)
        else:
            labels = self.oracle.query(chosen)  # the label budget: every queried row counts
            self.state.queried = sorted(self.oracle.state_dict()["queried"])
            repeats = self.sampler.accept(ctx, selection, labels).cpu()
        kept = repeats > 0
        if not pseudo:
            self.state.kept += int(kept.sum())
            self.state.discarded += int((~kept).sum())
        self.state.new_indices.extend(chosen.repeat_interleave(repeats).tolist())
        self.state.new_labels.extend(labels.repeat_interleave(repeats).tolist())
        self.state.rounds += 1
        if len(chosen):
            self.state.streams = {"new": [0, 0], "org": [0, 0]}  # the code rebuilds its loaders
        entry = {"epoch": float(self.current_epoch), "step": float(self.global_step), "pseudo": float(pseudo),
                 "val_acc": accuracy, **{k: float(v) for k, v in selection.counts.items()},
                 "queried": 0.0 if pseudo else float(len(chosen)), "kept": float(int(kept.sum())),
                 "pseudo_added": float(len(chosen)) if pseudo else 0.0}
        self.state.round_log.append(entry)
        metrics = {**self._totals(), **{f"fis/round_{k}": v for k, v in entry.items() if k not in ("epoch", "step")}}
        for logger in self.loggers:  # every round reaches the logs, whatever log_every_n_steps is
            logger.log_metrics(metrics, step=self.global_step)

    def _totals(self) -> dict[str, float]:
        return {"fis/spent": float(self.oracle.spent), "fis/kept": float(self.state.kept),
                "fis/discarded": float(self.state.discarded), "fis/pseudo_added": float(self.state.pseudo_added),
                "fis/new_rows": float(len(self.state.new_indices)), "fis/rounds": float(self.state.rounds)}

    def on_train_epoch_end(self) -> None:
        if self.sampler is not None and self.oracle is not None:
            self.log_dict(self._totals())

    # -- training --------------------------------------------------------------------------------------
    def _batch_size(self) -> int:
        return self.trainer.datamodule.batch_size

    def _stream(self) -> int:
        """This step's stream (``LABELLED``, ``NEW`` or ``ORG``), the same on every rank."""
        n_new = len(self.state.new_indices)
        if n_new == 0:
            return LABELLED
        gen = generator(self.seed, self.global_step, "fis/mix")
        u = float(torch.rand((), generator=gen))
        if self.mix == "weighted":
            return NEW if u < self.new_prob else LABELLED
        labelled_batches = math.ceil(len(self.trainer.datamodule.indices("labelled")) / self._batch_size())
        probs = mix_probabilities(self.new_prob, self.org_ratio, math.ceil(n_new / self._batch_size()),
                                  labelled_batches)
        return LABELLED if u < probs[0] else NEW if u < probs[0] + probs[1] else ORG

    def _stream_batch(self, name: str) -> tuple[Any, Tensor]:
        """The next batch of the new-data stream ``name`` (this rank's shard of a seeded permutation per pass)."""
        n, size = len(self.state.new_indices), self._batch_size()
        world, rank = self.trainer.world_size, self.global_rank
        for _ in range(2):
            passes, position = self.state.streams[name]
            perm = torch.randperm(n, generator=generator(self.seed, passes, f"fis/stream/{name}", index=n))
            rows = stream_rows(n, position, size, rank, world, perm)
            if len(rows):
                break
            self.state.streams[name] = [passes + 1, 0]  # the pass is over: a new permutation
        self.state.streams[name][1] += size
        indices = torch.as_tensor(self.state.new_indices)[rows]
        labels = torch.as_tensor(self.state.new_labels)[rows].to(self.device)
        return self._features(indices), labels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]  # never batch["group"]
        stream = self._stream()
        new = None if stream == LABELLED else self._stream_batch("org" if stream == ORG else "new")
        with self.step_rng(batch_idx):  # dropout draws repeat after a resume
            if new is None:
                loss = F.cross_entropy(self(x), y)
            elif self.mix == "code":  # one batch per step
                loss = F.cross_entropy(self(new[0]), new[1])
            else:  # weighted: (1 - org_ratio) CE(new rows) + org_ratio CE(labelled batch)
                loss = (1 - self.org_ratio) * F.cross_entropy(self(new[0]), new[1])
                if self.org_ratio > 0:
                    loss = loss + self.org_ratio * F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("fis/new_batch", float(new is not None), batch_size=len(y))
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fis"] = dict(vars(self.state))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "fis" in checkpoint:
            self.state = FISState(**checkpoint["fis"])


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")

