"""Empirical risk minimisation of a classifier (the classifier track's plain training method)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.classifiers import Backbone
from lit_align.data.classification import TrainStreams
from lit_align.errors import ConfigError, check_choice, check_number
from lit_align.methods.classifier_base import ClassifierBase

__all__ = ["ClassifierModule"]


class ClassifierModule(ClassifierBase):
    """ERM: minimise the mean cross-entropy of one subset's labels, optionally with PyTorch's label smoothing.

    Objective: ``F.cross_entropy(logits, y, label_smoothing=label_smoothing)`` over each batch (with several ranks
    every rank's loss is its batch mean and DDP averages the gradients: equal batch sizes make this the global
    mean). ``train_on`` picks the subset: ``train`` (the original model), ``retain`` (the Retrain reference of
    unlearning, trained without the forget rows), ``labelled`` (FIS's ERM baseline on the initial labelled set).
    Model: any :mod:`lit_align.classifiers` backbone. Optimiser: the injected one, automatic optimisation.
    Batch: the classification dict of :class:`~lit_align.data.ClassificationDataModule` (``"x"``, ``"y"``,
    ``"index"``; training batches carry no ``"group"``). Logged: ``train/loss``, ``train/acc`` per step; ``val/``
    and ``test/`` ``loss``, ``acc`` and, with a sensitive attribute, ``f1``, ``dp_gap``, ``eop_gap``,
    ``eod_gap`` (:class:`ClassifierBase`).

    ``label_smoothing`` is PyTorch's built-in smoothing, documented for [0, 1] only (torch 2.13 silently computes
    plain cross-entropy for a negative value): negative label smoothing (UGradSL's alpha < 0) is the generalised
    label-smoothing loss of the unlearning module, and a negative value here is a ConfigError.

    Run: ``lit-align fit --config configs/classifier/digits.yaml`` (``adult_erm.yaml``: Adult with fairness gaps).
    """

    def __init__(self, backbone: Backbone, train_on: Literal["train", "retain", "labelled"] = "train",
                 label_smoothing: float = 0.0, optimizer: OptimizerCallable | None = None,
                 scheduler: LRSchedulerCallable | None = None, seed: int = 0) -> None:
        """
        Args:
            backbone: the network builder (``lit_align.classifiers.MLPBackbone``, ``ResNetBackbone``, ...).
            train_on: the subset trained on: ``train``, ``retain`` (Retrain reference) or ``labelled`` (FIS's ERM).
            label_smoothing: PyTorch's label smoothing, in [0, 1]; 0 is plain cross-entropy.
            optimizer: optimiser factory over the network's parameters; default ``Adam(lr=1e-3)``.
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            seed: seed of the network's initial weights (and of the training steps' dropout draws).
        """
        super().__init__(backbone, optimizer=optimizer, scheduler=scheduler, seed=seed)
        check_choice("model.init_args.train_on", train_on, ("train", "retain", "labelled"))
        check_number("model.init_args.label_smoothing", label_smoothing)
        if label_smoothing < 0:
            raise ConfigError(
                f"model.init_args.label_smoothing={label_smoothing!r}: PyTorch's built-in label smoothing takes values "
                "in [0, 1] (torch.nn.functional.cross_entropy refuses negative ones, or in torch 2.13 silently treats "
                "them as 0). Negative label smoothing "
                "(UGradSL's alpha < 0) needs the generalised label-smoothing loss: train with "
                "lit_align.methods.ClassifierUnlearningModule and its UGradSL rule's alpha instead")
        if label_smoothing > 1:
            raise ConfigError(f"model.init_args.label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.train_on, self.label_smoothing = train_on, float(label_smoothing)

    def train_streams(self) -> TrainStreams:
        return TrainStreams((self.train_on,), "sequential")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with self.step_rng(batch_idx):  # dropout draws repeat after a resume
            logits = self.logits(batch)  # (B, K)
        y = batch["y"]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))
        return loss
