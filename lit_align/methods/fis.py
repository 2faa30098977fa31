"""FIS: fair influential sampling (Pang et al., "Fair Classifiers Without Fair Training: An Influence-Guided Data
Sampling Approach", arXiv 2402.12789; NeurIPS 2024 "Fairness Without Harm"; /work/shared/methods/others.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.classifiers.backbones import Backbone
from lit_align.classifiers.sampling import Sampler, Selection, SelectionContext
from lit_align.data.classification import LabelOracle, TrainStreams
from lit_align.errors import ConfigError
from lit_align.methods.classifier_base import ClassifierBase

__all__ = ["FISModule", "FISState"]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


#: tags that keep the generators of different uses apart
_MIX, _DRAW, _ROUND = 1, 2, 3


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
    """Validation accuracy at the end of warm-up: the last epochs' pseudo-labels need ``val/acc >= it - tol``."""


class FISModule(ClassifierBase):
    """FIS: train by ERM, never reading training rows' sensitive attributes, and grow the training set with pool
    rows whose influence on a relaxed validation fairness loss is most negative, among those that do not hurt
    validation accuracy (others.md §4(c)).

    Schedule:

    1. warm-up: ERM on the labelled set (``data.split: ActiveLearningSplit``, subset ``labelled``) for
       ``warm_epochs`` epochs;
    2. then every ``round_steps`` training steps, a round: ``scan_factor * budget`` pool candidates (a random
       order seeded by ``(seed, round)``, rows never scanned before) go to the ``sampler``
       (:mod:`lit_align.classifiers.sampling`; FIS = ``FairInfluenceSampler``); the rows it selects are queried
       through the data's ``LabelOracle`` (the label budget: every queried row counts, kept or discarded by the
       true-label recheck, §4(h)6) and the kept ones join the new-data stream;
    3. each training step takes, with probability ``new_prob`` (a coin seeded by ``(seed, step)``, the same on
       every rank), a batch of the same size drawn with replacement from the new data; its loss is
       ``(1 - org_ratio) CE(new batch) + org_ratio CE(labelled batch)``, our reading of the code's parallel stream
       from the original data (``train_with_org = True``, ``ratio_org = 0.5``; others.md names it without its exact
       form; ``org_ratio: 0`` trains on the new batch alone);
    4. the last ``pseudo_label_epochs`` epochs: if ``val/acc`` has not dropped below its end-of-warm-up value by
       more than ``tol``, rounds add the sampler's picks with their pseudo-labels and no query (FIS only; they cost
       no budget); otherwise those rounds are skipped.

    ``sampler: null`` is the ERM baseline on the labelled set. Validation (``val/acc``, fairness gaps) runs every
    epoch as in the base class. Training batches are read for ``x`` and ``y`` only: a ``group`` key there is never
    touched (the data's training subsets carry none). Influences need the validation groups: the only reader is
    the round, through ``datamodule.groups(val indices)``.

    Logged: ``train/loss``, ``fis/new_batch`` (1 when the step used new data), and after each round the running
    totals ``fis/spent`` (labels revealed: the budget), ``fis/kept``, ``fis/discarded`` (queried, paid for, and
    dropped by the recheck), ``fis/pseudo_added`` (no cost), ``fis/new_rows`` (new-data entries, with JTT's
    repeats), ``fis/rounds``.

    DDP: the candidates and the coin are the same on every rank; the FIS sampler scores each rank's shard of the
    candidates and all-gathers the scores, so every rank selects the same rows as one process.

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
            new_prob: probability that a step trains on a new-data batch (once new data exists).
            org_ratio: weight of the labelled batch in a new-data step's loss, ``(1 - org_ratio) CE(new) +
                org_ratio CE(labelled)`` (the code's parallel original stream, ``train_with_org`` / ``ratio_org =
                0.5``; 0: new data only).
            pseudo_label_epochs: the last epochs (of ``trainer.max_epochs``) whose rounds add pseudo-labelled rows
                without querying (2 in the paper's code; 0 turns it off).
            tol: the largest drop of ``val/acc`` below its end-of-warm-up value that still allows pseudo-labels.
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
        _check(pseudo_label_epochs >= 0, "model.init_args.pseudo_label_epochs", f"must be >= 0, got {pseudo_label_epochs}")
        _check(tol >= 0.0, "model.init_args.tol", f"must be >= 0, got {tol}")
        _check(scan_factor >= 1, "model.init_args.scan_factor", f"must be >= 1, got {scan_factor}")
        self.sampler = sampler
        self.budget, self.round_steps, self.warm_epochs = budget, round_steps, warm_epochs
        self.org_ratio = org_ratio
        self.new_prob, self.pseudo_label_epochs, self.tol, self.scan_factor = new_prob, pseudo_label_epochs, tol, scan_factor
        self.state = FISState()
        self.oracle: LabelOracle | None = None
        self._round_metrics: dict[str, float] = {}

    # -- data ------------------------------------------------------------------------------------------
    def train_streams(self) -> TrainStreams:
        return TrainStreams(("labelled",), "sequential")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        if self.sampler is not None:
            pool = len(dm.indices("pool"))
            if self.budget > pool:
                raise ConfigError(f"model.init_args.budget={self.budget} is larger than the unlabelled pool "
                                  f"({pool} rows): lower the budget or data.split.label_ratio")
        self.oracle = LabelOracle(dm)
        self.oracle.load_state_dict({"queried": self.state.queried})

    def _features(self, indices: Tensor) -> Any:
        return move_data_to_device(self.trainer.datamodule.features(indices.cpu().numpy()), self.device)

    def _validation(self) -> list[tuple[Any, Tensor, Tensor]]:
        """The validation set in batches ``(x, y, group)``: the only read of sensitive attributes in training."""
        dm = self.trainer.datamodule
        idx = dm.indices("val")
        size = dm.eval_batch_size or len(idx)
        out = []
        for start in range(0, len(idx), size):
            part = idx[start:start + size]
            out.append((self._features(torch.as_tensor(part)), dm.labels(part).to(self.device),
                        dm.groups(part).to(self.device)))
        return out

    # -- rounds ----------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.warm_epochs and self.state.reference_acc is None:
            self.state.reference_acc = self._val_acc()

    def _val_acc(self) -> float | None:
        value = self.trainer.callback_metrics.get("val/acc")
        return None if value is None else float(value)

    def _pseudo_epoch(self) -> bool:
        max_epochs = self.trainer.max_epochs or 0
        return self.pseudo_label_epochs > 0 and self.current_epoch >= max_epochs - self.pseudo_label_epochs

    def _accuracy_kept(self) -> bool:
        ref, now = self.state.reference_acc, self._val_acc()
        return ref is None or now is None or now >= ref - self.tol

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.sampler is None or self.current_epoch < self.warm_epochs:
            return
        if self.state.steps_since_warmup % self.round_steps == 0:
            if not self._pseudo_epoch():
                self._round(pseudo=False)
            elif self.sampler.pseudo_labels and self._accuracy_kept():
                self._round(pseudo=True)
        self.state.steps_since_warmup += 1

    def _candidates(self, generator: torch.Generator) -> Tensor:
        pool = torch.as_tensor(self.trainer.datamodule.indices("pool"), dtype=torch.long)
        fresh = pool[~torch.isin(pool, torch.as_tensor(self.state.seen, dtype=torch.long))]
        order = torch.randperm(len(fresh), generator=generator)[: self.scan_factor * self.budget]
        return fresh[order]

    def _context(self) -> SelectionContext:
        generator = torch.Generator().manual_seed(_seed(self.seed, _ROUND, self.state.rounds))
        world = self.trainer.world_size
        return SelectionContext(
            net=self.net, head=self.head_parameters(), candidates=self._candidates(generator),
            features=self._features, validation=self._validation(),
            num_classes=self.num_classes, num_groups=self.num_groups,
            budget=self.budget, generator=generator, rank=self.global_rank, world=world,
            gather=lambda t: self.all_gather(t))

    def _round(self, *, pseudo: bool) -> None:
        ctx = self._context()
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
        self._round_metrics = {  # running totals, logged by this step's training_step
            "fis/spent": float(self.oracle.spent), "fis/kept": float(self.state.kept),
            "fis/discarded": float(self.state.discarded), "fis/pseudo_added": float(self.state.pseudo_added),
            "fis/new_rows": float(len(self.state.new_indices)), "fis/rounds": float(self.state.rounds),
        }

    # -- training --------------------------------------------------------------------------------------
    def _new_batch(self, size: int) -> tuple[Any, Tensor] | None:
        """With probability ``new_prob`` (the same coin on every rank), ``size`` new-data rows drawn with
        replacement (per-rank draws); ``None``: train on the labelled batch."""
        if not self.state.new_indices:
            return None
        coin = torch.Generator().manual_seed(_seed(self.seed, _MIX, self.global_step))
        if torch.rand((), generator=coin).item() >= self.new_prob:
            return None
        draw = torch.Generator().manual_seed(_seed(self.seed, _DRAW, self.global_step, self.global_rank))
        rows = torch.randint(len(self.state.new_indices), (size,), generator=draw)
        indices = torch.as_tensor(self.state.new_indices)[rows]
        labels = torch.as_tensor(self.state.new_labels)[rows].to(self.device)
        return self._features(indices), labels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]  # never batch["group"]
        new = self._new_batch(len(y))
        with self.step_rng(batch_idx):  # dropout draws repeat after a resume
            if new is None:
                loss = F.cross_entropy(self(x), y)
            else:  # (1 - org_ratio) CE(new rows) + org_ratio CE(labelled batch)
                loss = (1 - self.org_ratio) * F.cross_entropy(self(new[0]), new[1])
                if self.org_ratio > 0:
                    loss = loss + self.org_ratio * F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("fis/new_batch", float(new is not None), batch_size=len(y))
        if self._round_metrics:
            self.log_dict(self._round_metrics, batch_size=len(y))
            self._round_metrics = {}
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

