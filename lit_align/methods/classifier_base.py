"""The small base class of classifier methods (ERM, UGradSL, FIS): build, optimise, evaluate, resume."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lit_align.classifiers import Backbone
from lit_align.data.classification import TrainStreams
from lit_align.engine.seeds import derive_seed, seeded_rng
from lit_align.errors import ConfigError
from lit_align.metrics.classification import prediction_summary
from lit_align.metrics.fairness import GroupFairness
from lit_align.modes import eval_mode

__all__ = ["ClassifierBase"]

#: Hyperparameters a checkpoint keeps only as config data (from YAML); a Python callable is left out, so the file
#: loads with ``torch.load(weights_only=True)`` (loading it back rebuilds the default optimiser/scheduler).
_FACTORY_KEYS = ("optimizer", "scheduler")


class ClassifierBase(L.LightningModule):
    """Shared plumbing of classifier methods (not a method itself; methods subclass it, one level deep).

    * the network is ``backbone.build(input_shape, num_classes)`` of the DataModule's (a
      :class:`~lit_align.data.ClassificationDataModule`) in :meth:`configure_model`, seeded by ``seed`` (the same
      weights on every rank and on every run with that seed; idempotent);
    * the optimiser and scheduler are injected (``optimizer:`` / ``scheduler:`` in YAML, as in every lit_align
      method; the scheduler is stepped every optimiser step);
    * a method says which subsets it trains on with :meth:`train_streams`;
    * validation and test update torchmetrics and log ``val/loss``, ``val/acc`` (micro accuracy), and, when the
      batches carry ``"group"`` (sources with a sensitive attribute), ``val/f1``, ``val/dp_gap``, ``val/eop_gap``,
      ``val/eod_gap`` (:class:`~lit_align.metrics.GroupFairness`); likewise ``test/...``; all computed over every
      rank's rows (each val/test row is on exactly one rank; the loss is the mean over rows);
    * :meth:`evaluate_subset` scores a whole subset in memory (UA/RA/TA/MIA of the unlearning methods);
    * exact resume: weights, optimiser and loader positions come back through Lightning's checkpoint; a
      training step's random draws come from :meth:`step_rng` (seeded by step, not by history); the checkpoint
      records the data shape the network was built for, and a mismatch on load is a ConfigError;
      ``Method.load_from_checkpoint(path)`` (no trainer, no DataModule) builds the network for that shape.
    """

    def __init__(self, backbone: Backbone, optimizer: OptimizerCallable | None = None,
                 scheduler: LRSchedulerCallable | None = None, seed: int = 0) -> None:
        """
        Args:
            backbone: the network builder (``lit_align.classifiers.MLPBackbone``, ``ResNetBackbone``, ...).
            optimizer: optimiser factory over the network's parameters; default ``Adam(lr=1e-3)``.
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            seed: seed of the network's initial weights (and of the training steps' dropout draws).
        """
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(backbone, Backbone):
            raise ConfigError(f"model.init_args.backbone must be a lit_align.classifiers backbone (class_path: "
                              f"lit_align.classifiers.MLPBackbone, ...), got {type(backbone).__name__}")
        self.backbone = backbone
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seed = seed
        self.net: nn.Module | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes = 0
        self.num_groups = 0

    # -- building ----------------------------------------------------------------------------
    def _datamodule(self, datamodule: Any = None) -> Any:
        dm = datamodule if datamodule is not None else getattr(self._trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "num_classes") or not hasattr(dm, "input_shape"):
            raise ConfigError(f"{type(self).__name__} needs a classification DataModule (data: class_path: "
                              "lit_align.data.TabularDataModule, ImageClassificationDataModule or "
                              f"TextClassificationDataModule), got {type(dm).__name__}")
        return dm

    def configure_model(self) -> None:
        if self.net is not None or self._trainer is None:
            return  # no trainer: ``load_from_checkpoint`` builds from the checkpoint (on_load_checkpoint)
        dm = self._datamodule()
        self.build(dm.input_shape, dm.num_classes, dm.num_groups)

    def build(self, input_shape: tuple[int, ...], num_classes: int, num_groups: int = 0) -> None:
        """Make the network (on the CPU, seeded by ``seed``, the global generators left as they were) and the
        evaluation metrics for ``num_classes`` classes and ``num_groups`` sensitive groups (fairness metrics when
        >= 2)."""
        if num_classes < 2:
            raise ConfigError(f"the data has {num_classes} class(es); a classifier needs at least 2 (check data.target "
                              "and data.split)")
        # on the CPU whatever the default device (configure_model runs in the strategy's device context): the same
        # seed gives the same weights on every accelerator, no CUDA generator is touched; Lightning moves the net
        with torch.device("cpu"), seeded_rng(self.seed):
            self.net = self.backbone.build(tuple(input_shape), num_classes)
        self.input_shape, self.num_classes, self.num_groups = tuple(input_shape), num_classes, num_groups
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()  # mean over rows (per-row CE), synced by sums
        self.val_fairness = GroupFairness(num_groups) if num_groups >= 2 else None
        self.test_fairness = GroupFairness(num_groups) if num_groups >= 2 else None

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=1e-3)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def head_parameters(self) -> list[nn.Parameter]:
        """The final classification layer's parameters (:meth:`Backbone.head_parameters`)."""
        return self.backbone.head_parameters(self.net)

    # -- computing ---------------------------------------------------------------------------
    def forward(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        return self.net(x)  # (B, K)

    def logits(self, batch: dict[str, Any]) -> Tensor:
        """Logits ``(B, K)`` of a batch's ``"x"``."""
        return self(batch["x"])

    def train_streams(self) -> TrainStreams:
        """The subsets the DataModule's ``train_dataloader`` combines for this method (subclasses say)."""
        raise NotImplementedError

    def step_rng(self, batch_idx: int) -> AbstractContextManager[None]:
        """The global generator seeded for the block (dropout in a training step) and restored afterwards
        (:func:`~lit_align.engine.seeds.seeded_rng`): the draws depend on ``(seed, global_step, rank,
        batch_idx)`` only, so resuming repeats them."""
        seed = derive_seed(self.seed, self.global_step, f"classifier/step/rank{self.global_rank}", batch_idx)
        return seeded_rng(seed, self.device)

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        logits, y = self.logits(batch), batch["y"]  # (B, K), (B,)
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits, y, reduction="none"))
        getattr(self, f"{stage}_acc").update(logits, y)
        fairness = getattr(self, f"{stage}_fairness")
        if fairness is not None and "group" in batch:
            fairness.update(logits, y, batch["group"])

    def _log_eval(self, stage: str) -> None:
        """Log the stage's metrics, computed once over all ranks' rows (every rank calls this, batches or not:
        the evaluation loaders give each row to one rank, so shares differ by a row or a batch)."""
        values = {"loss": getattr(self, f"{stage}_loss"), "acc": getattr(self, f"{stage}_acc")}
        values = {k: metric.compute() for k, metric in values.items()}
        fairness = getattr(self, f"{stage}_fairness")
        if fairness is not None:  # val/test batches carry groups whenever the source has >= 2
            values.update((k, v) for k, v in fairness.compute().items() if k != "accuracy")
        for metric in (getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc"), fairness):
            if metric is not None:
                metric.reset()
        accuracy = values.pop("acc")
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val")  # already global: no further sync
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    @torch.no_grad()
    def evaluate_subset(self, name: str, datamodule: Any = None, batch_size: int | None = None) -> dict[str, Any]:
        """Score every row of subset ``name`` (all of it on every rank: no collective, the same result everywhere)
        with the network in eval mode: :func:`~lit_align.metrics.prediction_summary`'s dict (``accuracy``, mean
        ``loss``; per row ``confidence``, ``entropy``, ``row_loss``, ``correct``, ``logits``, ``labels``,
        ``index``, on the CPU, in index order). ``datamodule`` defaults to the trainer's."""
        dm = self._datamodule(datamodule)
        loader = dm.loader(name, batch_size=batch_size, num_replicas=1, rank=0)
        logits, labels, index = [], [], []
        with eval_mode(self.net):
            for batch in loader:
                batch = move_data_to_device(batch, self.device)
                logits.append(self.logits(batch).float().cpu())
                labels.append(batch["y"].cpu())
                index.append(batch["index"].cpu())
        if not logits:
            return prediction_summary(torch.zeros(0, self.num_classes), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, dtype=torch.long))
        return prediction_summary(torch.cat(logits), torch.cat(labels), torch.cat(index))

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None:  # Python-built factories (functools.partial...) would refuse weights_only loading
            for key in _FACTORY_KEYS:
                if callable(hparams.get(key)):
                    del hparams[key]
        checkpoint["classifier"] = {"input_shape": list(self.input_shape or ()), "num_classes": self.num_classes,
                                    "num_groups": self.num_groups}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("classifier")
        if saved is None:
            return
        if self.net is None:  # load_from_checkpoint: no DataModule, build for the data the checkpoint was made on
            self.build(tuple(saved["input_shape"]), saved["num_classes"], saved.get("num_groups", 0))
            return
        built = {"input_shape": list(self.input_shape or ()), "num_classes": self.num_classes}
        if {k: list(v) if k == "input_shape" else v for k, v in saved.items() if k in built} != built:
            raise ConfigError(f"the checkpoint's network was built for data with input_shape "
                              f"{tuple(saved['input_shape'])} and {saved['num_classes']} classes; this data.* gives "
                              f"{tuple(built['input_shape'])} and {built['num_classes']}: resume with the data "
                              "config of the checkpoint's run")
