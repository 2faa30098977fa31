"""Classifier unlearning: UGradSL, UGradSL+ and their baselines (GA, fine-tuning, random labels; SalUn by a mask)."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lit_align.checkpoint import atomic_write_text
from lit_align.classifiers.backbones import Backbone, final_linear
from lit_align.classifiers.references import ReferenceTraining, cache_file, obtain_reference
from lit_align.data.classification import TrainStreams
from lit_align.errors import ConfigError
from lit_align.losses.ugradsl import (
    AlphaBy,
    AlphaSign,
    Normalize,
    adaptive_alpha,
    check_adaptive,
    check_alpha,
    check_normalize,
    check_retain_weight,
    ugradsl_objective,
)
from lit_align.methods.classifier_base import ClassifierBase
from lit_align.metrics.classification import MIAFeature, avg_gap, prediction_summary, unlearning_scores
from lit_align.modes import eval_mode

__all__ = ["ClassifierUnlearningModule", "FineTune", "GradientAscent", "RandomLabels", "UGradSL", "UGradSLPlus",
           "UnlearningRule"]

_RULE_KEY = "model.init_args.rule.init_args"


@dataclass
class Part:
    """One training stream's rows in a step."""

    logits: Tensor
    """(B, K) the network's logits."""
    labels: Tensor
    """(B,) class labels."""
    index: Tensor
    """(B,) stable dataset indices."""
    features: Tensor | None = None
    """(B, D) penultimate features (the final layer's input), when the rule asks for them."""


# -- rules ----------------------------------------------------------------------------------------------------
class UnlearningRule:
    """What a classifier unlearning method trains on and its per-step loss (pick a subclass by ``class_path``).

    ``streams()`` names the DataModule subsets a training step receives (``TrainStreams``); ``objective(parts)``
    maps each stream's :class:`Part` to ``(loss, metrics)``; ``prepare(datamodule, seed)`` runs at fit start.
    """

    needs_features = False
    """Whether :class:`Part.features` must be computed."""
    smooths = False
    """Whether the rule smooths labels itself (then PyTorch's ``label_smoothing`` is refused)."""
    uses_label_smoothing = False
    """Whether the rule applies the module's ``label_smoothing`` (refused > 0 otherwise, never silently ignored)."""

    def streams(self) -> TrainStreams:
        raise NotImplementedError

    def prepare(self, datamodule: Any, seed: int) -> None:
        """Fit-start set-up from the DataModule (after ``setup``); nothing by default."""

    def objective(self, parts: dict[str, Part], label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not k.startswith('_'))})"


class _GLSRule(UnlearningRule):
    """UGradSL's objective (:func:`~lit_align.losses.ugradsl.ugradsl_objective`) on a forget and a retain stream."""

    smooths = True

    def __init__(self, alpha: float | None = -0.5, p: float = 0.5, normalize: Normalize = "mean", beta: float = 0.5,
                 adaptive_alpha_sign: AlphaSign = "negative", adaptive_alpha_by: AlphaBy = "forget",
                 max_abs_alpha: float | None = None) -> None:
        """
        Args:
            alpha: the GLS rate of the forget targets, <= 1 (< 0: negative smoothing); ``None``: adaptive per forget
                sample (:func:`~lit_align.losses.ugradsl.adaptive_alpha`). NOT FOUND in the paper: -0.5 is ours,
                from the negative part of the GLS grid {-0.2, -0.4, -0.6, -0.8, -1, -2, -4, -6, -8}.
            p: retain weight in [0, 1] of ``L = p CE_r - (1 - p) GLS_f``. NOT FOUND in the paper (0.5 is ours).
            normalize: ``mean`` (each term a batch mean, default) or ``sum`` (the paper's sums).
            beta: distance threshold in [0, 1] of the adaptive alpha (used when ``alpha`` is None). NOT FOUND.
            adaptive_alpha_sign: ``negative`` (ours) or ``positive`` (the formula as written); NOT FOUND.
            adaptive_alpha_by: the adaptive count's divisor: ``forget`` (``|B_f|``, the paper's; ``|alpha|`` can
                reach ``|B_r| / |B_f|``, e.g. 64 for a last forget batch of one row) or ``retain`` (``|B_r|``).
            max_abs_alpha: a cap on the adaptive ``|alpha_j|`` (``None``: none, the paper's).
        """
        check_alpha(alpha, f"{_RULE_KEY}.alpha")
        check_retain_weight(p, f"{_RULE_KEY}.p")
        check_normalize(normalize, f"{_RULE_KEY}.normalize")
        check_adaptive(beta, adaptive_alpha_sign, adaptive_alpha_by, max_abs_alpha, prefix=f"{_RULE_KEY}.")
        self.alpha, self.p, self.normalize = alpha, float(p), normalize
        self.beta, self.adaptive_alpha_sign = float(beta), adaptive_alpha_sign
        self.adaptive_alpha_by, self.max_abs_alpha = adaptive_alpha_by, max_abs_alpha

    @property
    def needs_features(self) -> bool:  # type: ignore[override]
        return self.alpha is None

    def objective(self, parts: dict[str, Part], label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        forget, retain = parts["forget"], parts["retain"]
        alpha: float | Tensor = self.alpha
        if alpha is None:
            alpha = adaptive_alpha(forget.features, retain.features, beta=self.beta, sign=self.adaptive_alpha_sign,
                                   by=self.adaptive_alpha_by, max_abs=self.max_abs_alpha)
        return ugradsl_objective(forget.logits, forget.labels, retain.logits, retain.labels, alpha=alpha, p=self.p,
                                 normalize=self.normalize)


class UGradSL(_GLSRule):
    """UGradSL (GA backbone): epochs over the forget set; each forget batch is paired with a retain
    batch drawn as needed (``TrainStreams(("forget", "retain"), "min_size")``: an epoch ends with the forget set)."""

    def streams(self) -> TrainStreams:
        return TrainStreams(("forget", "retain"), "min_size")


class UGradSLPlus(_GLSRule):
    """UGradSL+ (fine-tuning backbone): epochs over the retain set, cycling the forget set as often as needed
    (``TrainStreams(("retain", "forget"), "max_size_cycle")``). Better quality, more steps."""

    def streams(self) -> TrainStreams:
        return TrainStreams(("retain", "forget"), "max_size_cycle")


class GradientAscent(UnlearningRule):
    """GA: ascent on the forget set's cross-entropy, nothing else (UGradSL with ``p = 0, alpha = 0``)."""

    def streams(self) -> TrainStreams:
        return TrainStreams(("forget",))

    def objective(self, parts: dict[str, Part], label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        f = parts["forget"]
        return ugradsl_objective(f.logits, f.labels, None, None, alpha=0.0, p=0.0)


class FineTune(UnlearningRule):
    """FT: fine-tuning on the retain set only (catastrophic forgetting of D_f; UGradSL with ``p = 1``)."""

    uses_label_smoothing = True

    def streams(self) -> TrainStreams:
        return TrainStreams(("retain",))

    def objective(self, parts: dict[str, Part], label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        r = parts["retain"]
        if label_smoothing:
            loss = F.cross_entropy(r.logits.float(), r.labels, label_smoothing=label_smoothing)
            return loss, {"retain_ce": F.cross_entropy(r.logits.detach().float(), r.labels)}
        return ugradsl_objective(None, None, r.logits, r.labels, alpha=0.0, p=1.0)


class RandomLabels(UnlearningRule):
    """RL (Golatkar et al. 2020; the baseline of SalUn and UGradSL): training on the whole training set with each
    forget row relabelled to a random *wrong* class, fixed per row for the run (drawn from ``seed``): SalUn's
    code trains on the concatenation of the relabelled forget set and the retain set, which is the ``train``
    stream here (``TrainStreams(("train",))``). Loss: mean cross-entropy over the batch."""

    uses_label_smoothing = True

    def __init__(self) -> None:
        self._wrong: Tensor | None = None  # (max index + 1,) the wrong label of each forget row, -1 elsewhere

    def streams(self) -> TrainStreams:
        return TrainStreams(("train",))

    def prepare(self, datamodule: Any, seed: int) -> None:
        forget = torch.as_tensor(datamodule.indices("forget"), dtype=torch.long)
        labels = datamodule.labels(forget)
        k = datamodule.num_classes
        offset = torch.randint(1, k, (len(forget),), generator=torch.Generator().manual_seed(seed))
        size = int(max(datamodule.indices("train").max(), forget.max())) + 1
        self._wrong = torch.full((size,), -1, dtype=torch.long)
        self._wrong[forget] = (labels + offset) % k

    def relabel(self, labels: Tensor, index: Tensor) -> Tensor:
        """``labels`` with the forget rows' replaced by their wrong labels."""
        if self._wrong is None:
            raise RuntimeError("RandomLabels.prepare was not called")
        wrong = self._wrong.to(index.device)[index]
        return torch.where(wrong >= 0, wrong, labels)

    def objective(self, parts: dict[str, Part], label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        t = parts["train"]
        targets = self.relabel(t.labels, t.index)
        loss = F.cross_entropy(t.logits.float(), targets, label_smoothing=label_smoothing)
        return loss, {"relabelled": (targets != t.labels).float().mean(), "ce": loss.detach()}


# -- the module -----------------------------------------------------------------------------------------------
class _capture_input:
    """Context manager: the input of ``layer`` in the forwards it sees (the penultimate features)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.value = layer, None

    def __enter__(self) -> _capture_input:
        self._hook = self.layer.register_forward_hook(lambda _m, args, _out: setattr(self, "value", args[0]))
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()


class ClassifierUnlearningModule(ClassifierBase):
    """Unlearning a trained classifier: UGradSL / UGradSL+ (Di et al., "Label Smoothing Improves Machine
    Unlearning", https://arxiv.org/abs/2406.07698) and the baselines of its tables, one ``rule``
    chosen by ``class_path``:

    ===============  ====================================  ===================================================
    rule             streams (``train_streams()``)          loss (minimised)
    ===============  ====================================  ===================================================
    ``UGradSL``      forget + retain, ``min_size``         ``p CE(retain) - (1 - p) GLS_alpha(forget)``
    ``UGradSLPlus``  retain + forget, ``max_size_cycle``   the same
    ``GradientAscent``  forget                             ``-CE(forget)``
    ``FineTune``     retain                                ``CE(retain)``
    ``RandomLabels`` train (forget rows relabelled)        ``CE`` with random wrong labels on the forget rows
    ===============  ====================================  ===================================================

    SalUn (Fan et al., ICLR 2024) is ``RandomLabels`` under a saliency mask: the
    :class:`~lit_align.callbacks.WeightMask` callback with ``method: gradient, ratio: 0.5`` (this module provides
    its hooks ``weight_mask_model`` and ``attribution_gradients``).

    Models: ``net`` starts from the **original** model (trained on all of D_tr) and the **Retrain** model (trained
    on D_r only) is the gold reference, both from :mod:`lit_align.classifiers.references` (a file given in
    ``original`` / ``retrain``, else trained with ``reference_training`` and cached). The original's weights are
    loaded in ``configure_model`` (a resumed run's checkpoint then overwrites them).

    Batch: ``{"x", "y", "index"}`` per stream (``{stream: batch}`` for two streams) from a
    :class:`~lit_align.data.classification.ClassificationDataModule` with a ``ForgetSplit``.

    Reported (the goal is closeness to Retrain, not the largest UA): at the end of fit and in ``test``,
    UA, RA, TA, MIA-efficacy (:func:`~lit_align.metrics.classification.unlearning_scores`; TA on ``test_retain``
    for class-wise forgetting), the unlearning run time (``seconds``: wall time of the training batches only,
    validation and checkpoint writes left out, summed over resumed segments) and ``avg_gap`` to Retrain, for the
    unlearned model and for the original and Retrain models (their ``seconds`` is the training time of the plain
    loop of :func:`~lit_align.classifiers.references.train_reference`, no Lightning: not directly comparable with
    the unlearning time); logged under ``unlearn/...`` and written to ``<log_dir>/classifier_unlearning.json`` and
    ``.csv`` (rank 0). ``self.report`` holds the same dict.
    Logged each step: ``train/loss`` and the rule's metrics (``train/retain_term``, ``train/forget_term``, ...).

    Run: ``lit-align fit --config configs/ugradsl_cls/class_wise_digits.yaml``.
    """

    def __init__(
        self,
        backbone: Backbone,
        rule: UnlearningRule,
        original: str | None = None,
        retrain: str | None = None,
        reference_training: ReferenceTraining | None = None,
        label_smoothing: float = 0.0,
        mia_feature: MIAFeature = "confidence",
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            backbone: the classifier network builder (the original and Retrain models use the same).
            rule: ``UGradSL``, ``UGradSLPlus``, ``GradientAscent``, ``FineTune`` or ``RandomLabels``.
            original: weights of the original model (``.safetensors`` or ``.ckpt``); ``None``: train it on ``train``.
            retrain: weights of the Retrain model; ``None``: train it on ``retain``.
            reference_training: how missing references are trained (default :class:`ReferenceTraining`).
            label_smoothing: PyTorch's built-in smoothing of the plain cross-entropy of ``FineTune`` and
                ``RandomLabels``, in [0, 1). Refused with the UGradSL rules, whose smoothing is their ``alpha``.
            mia_feature: the membership attack's per-row score: ``confidence`` (default), ``entropy`` or ``loss``.
            optimizer, scheduler, seed: as :class:`~lit_align.methods.ClassifierBase`.
        """
        super().__init__(backbone=backbone, optimizer=optimizer, scheduler=scheduler, seed=seed)
        if not isinstance(rule, UnlearningRule):
            raise ConfigError(f"model.init_args.rule must be an UnlearningRule (UGradSL, UGradSLPlus, GradientAscent, "
                              f"FineTune, RandomLabels), got {type(rule).__name__}")
        if not (isinstance(label_smoothing, (int, float)) and math.isfinite(label_smoothing)
                and 0.0 <= label_smoothing < 1.0):
            raise ConfigError(f"model.init_args.label_smoothing is PyTorch's built-in smoothing, in [0, 1) (it silently "
                              f"ignores negative rates); got {label_smoothing!r}. For negative smoothing use a UGradSL "
                              f"rule's alpha")
        if label_smoothing and rule.smooths:
            raise ConfigError(f"model.init_args.label_smoothing={label_smoothing} and {type(rule).__name__}'s alpha both "
                              f"smooth labels; UGradSL's smoothing is the rule's alpha "
                              f"({_RULE_KEY}.alpha): set model.init_args.label_smoothing to 0")
        if label_smoothing and not rule.smooths and not rule.uses_label_smoothing:
            raise ConfigError(f"model.init_args.label_smoothing={label_smoothing} is not used by "
                              f"{type(rule).__name__} (only FineTune and RandomLabels apply it): set it to 0")
        self.rule, self.original, self.retrain = rule, original, retrain
        self.reference_training = reference_training or ReferenceTraining()
        self.label_smoothing, self.mia_feature = float(label_smoothing), mia_feature
        self.report: dict[str, dict[str, float]] = {}
        self._original_loaded = False
        self._retrain_report: dict[str, float] | None = None
        self._original_report: dict[str, float] | None = None
        self._seconds_before = 0.0  # training seconds of earlier (resumed) segments
        self._train_start: float | None = None  # where the running batch's clock started
        self._save_began: float | None = None  # when a checkpoint save began during the running batch
        self._in_batch = False  # between a training batch's start and the module's batch-end hook

    # -- streams, models --------------------------------------------------------------------------------------
    def train_streams(self) -> TrainStreams:
        return self.rule.streams()

    def configure_model(self) -> None:
        super().configure_model()
        if self._original_loaded:
            return
        self.net.load_state_dict(self._reference("original").net.state_dict())
        self._original_loaded = True

    def _reference(self, kind: str):
        """The ``kind`` reference on the accelerator. ``configure_model`` runs under Lightning's default-device
        context (tensors made on the accelerator); the reference code places its tensors itself, so it runs under a
        CPU default (CPU generators, loaders).

        With several processes a missing reference is an error rather than trained on rank 0 while the others
        wait at a barrier (a long training would pass the process group's timeout): train the references first
        (one process, or ClassifierModule with ``train_on: train`` / ``retain``) and give them in ``original`` /
        ``retrain``, or fill the cache with a single-process run of the same config."""
        dm, path, device = self.trainer.datamodule, getattr(self, kind), self.trainer.strategy.root_device
        training = self.reference_training
        if path is None and self.trainer.world_size > 1:
            seed = training.seed if training.seed is not None else self.seed
            file = cache_file(kind, self.backbone, dm, training, seed)
            if not (file.is_file() and file.with_suffix(".json").is_file()):
                raise ConfigError(
                    f"model.init_args.{kind} is null and the {kind} reference is not in the cache ({file}); with "
                    f"{self.trainer.world_size} processes it is not trained here (rank 0 alone would train it while "
                    f"the others wait past the process group's timeout). Train it first: run the same config in one "
                    f"process (devices: 1) to fill the cache, or train a ClassifierModule with train_on: "
                    f"{'train' if kind == 'original' else 'retain'} and give its checkpoint in model.init_args.{kind}")
        with torch.device("cpu"):
            return obtain_reference(kind, path, self.backbone, dm, training, self.seed, device)

    def weight_mask_model(self) -> nn.Module:
        """:class:`~lit_align.callbacks.WeightMask`'s hook: the network whose weights are masked."""
        return self.net

    def attribution_gradients(self, part: str) -> dict[str, Tensor]:
        """:class:`~lit_align.callbacks.WeightMask`'s hook: the gradient of the summed cross-entropy of subset
        ``part`` (``forget`` / ``retain``) at the current weights, in eval mode; every rank scores every row (the
        same result on each, no collective). SalUn's saliency is its magnitude on ``forget``."""
        dm = self.trainer.datamodule
        params = {n: p for n, p in self.net.named_parameters() if p.requires_grad}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        with eval_mode(self.net):
            for batch in dm.loader(part, num_replicas=1, rank=0):
                batch = move_data_to_device(batch, self.device)
                loss = F.cross_entropy(self.net(batch["x"]).float(), batch["y"], reduction="sum")
                for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None:
                        grads[n] += g
        return grads

    # -- training ---------------------------------------------------------------------------------------------
    def _part(self, batch: dict[str, Any]) -> Part:
        if self.rule.needs_features:
            with _capture_input(final_linear(self.net)) as cap:
                logits = self.net(batch["x"])
            return Part(logits, batch["y"], batch["index"], cap.value.flatten(1))
        return Part(self.net(batch["x"]), batch["y"], batch["index"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        names = self.rule.streams().names
        batches = {names[0]: batch} if len(names) == 1 else batch
        with self.step_rng(batch_idx):  # dropout draws depend on the step only: exact resume
            parts = {name: self._part(b) for name, b in batches.items() if b is not None}
        loss, metrics = self.rule.objective(parts, self.label_smoothing)
        size = sum(p.labels.numel() for p in parts.values())
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        for k, v in metrics.items():
            self.log(f"train/{k}", v, batch_size=size)
        return loss

    def on_fit_start(self) -> None:
        self.rule.prepare(self.trainer.datamodule, self.seed)
        self._reference_reports()

    # run time: the training batches only (data fetch, forward, backward, optimiser step, the callbacks' batch
    # hooks), from the end of the batch before (or the epoch's start) to the batch's end; validation, checkpoint
    # writes and the fit-start / fit-end scoring stay out (the mark is reset at each epoch start and after each
    # validation run; a checkpoint saved at a batch's end stops that batch's clock where its saving began)
    def on_train_epoch_start(self) -> None:
        self._train_start, self._save_began, self._in_batch = time.perf_counter(), None, False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._in_batch = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._train_start is not None:
            self._seconds_before += (self._save_began or now) - self._train_start
        self._train_start, self._save_began, self._in_batch = now, None, False

    def on_validation_end(self) -> None:
        if self._train_start is not None:
            self._train_start = time.perf_counter()

    def _seconds(self) -> float:
        """Training seconds so far (summed over resumed segments; see the hooks above)."""
        return self._seconds_before

    def on_train_end(self) -> None:
        self._train_start = None
        self._finish(stage="fit")

    def on_test_start(self) -> None:
        self._reference_reports()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._finish(stage="test")

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _summaries(self, net: nn.Module) -> dict[str, dict[str, Any]]:
        """``prediction_summary`` of ``net`` on forget, retain and the test rows TA and the attack use
        (``test_retain`` when the split has it: class-wise forgetting). Every rank scores every row (no collective),
        as :meth:`~lit_align.methods.ClassifierBase.evaluate_subset` does for ``self.net``."""
        dm = self.trainer.datamodule
        test = "test_retain" if "test_retain" in dm.subset_names else "test"
        out = {}
        with eval_mode(net):
            for part, name in (("forget", "forget"), ("retain", "retain"), ("test", test)):
                logits, labels = [], []
                for batch in dm.loader(name, num_replicas=1, rank=0):
                    batch = move_data_to_device(batch, self.device)
                    logits.append(net(batch["x"]).float().cpu())
                    labels.append(batch["y"].cpu())
                out[part] = prediction_summary(torch.cat(logits), torch.cat(labels))
        return out

    def _scores(self, net: nn.Module) -> dict[str, float]:
        return unlearning_scores(**self._summaries(net), feature=self.mia_feature, seed=self.seed)

    def _reference_reports(self) -> None:
        if self._retrain_report is not None:
            return
        retrain = self._reference("retrain")
        original = self._reference("original")
        self._retrain_report = {**self._scores(retrain.net), "seconds": float(retrain.seconds or float("nan"))}
        self._original_report = {**self._scores(original.net), "seconds": float(original.seconds or float("nan"))}

    def current_scores(self) -> dict[str, float]:
        """The unlearned network's scores now (UA, RA, TA, MIA, training ``seconds`` so far, ``avg_gap`` to Retrain);
        callable from fit start on (e.g. at epoch ends, to score several epoch counts in one run)."""
        self._reference_reports()
        scores = {**self._scores(self.net), "seconds": self._seconds()}
        return {**scores, "avg_gap": avg_gap(scores, self._retrain_report)}

    def _finish(self, stage: str) -> None:
        scores = {**self._scores(self.net), "seconds": self._seconds()}
        report = {"unlearned": scores, "original": dict(self._original_report), "retrain": dict(self._retrain_report)}
        for row in report.values():
            row["avg_gap"] = avg_gap(row, self._retrain_report)
        self.report = report
        flat = {f"unlearn/{k}": v for k, v in scores.items()}
        flat.update({f"unlearn/retrain_{k}": v for k, v in report["retrain"].items() if k != "avg_gap"})
        flat["unlearn/original_avg_gap"] = report["original"]["avg_gap"]
        if stage == "test":
            for k, v in flat.items():
                self.log(k.replace("unlearn/", "test/unlearn_"), float(v), sync_dist=False, rank_zero_only=True)
        else:
            for logger in self.loggers:
                logger.log_metrics(flat, step=self.global_step)
        self._write(report)

    def _write(self, report: dict[str, dict[str, float]]) -> None:
        """``classifier_unlearning.json`` and ``.csv`` in the log dir (rank 0)."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: every rank calls it
        if not self.trainer.is_global_zero or log_dir is None:
            return
        meta = {"rule": repr(self.rule), "backbone": repr(self.backbone), "global_step": self.global_step}
        atomic_write_text(Path(log_dir) / "classifier_unlearning.json",
                          json.dumps({**report, "meta": meta}, indent=1, allow_nan=True))
        keys = ["UA", "RA", "TA", "MIA", "avg_gap", "seconds"]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["model", *keys])
        for model, row in report.items():
            writer.writerow([model, *(f"{row[k]:.4f}" for k in keys)])
        atomic_write_text(Path(log_dir) / "classifier_unlearning.csv", buf.getvalue())

    # -- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        running = 0.0
        if self._in_batch and self._train_start is not None:  # saved at a batch's end: that batch counts
            if self._save_began is None:
                self._save_began = time.perf_counter()
            running = self._save_began - self._train_start
        checkpoint["classifier_unlearning"] = {"seconds": self._seconds() + running}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._seconds_before = float(checkpoint.get("classifier_unlearning", {}).get("seconds", 0.0))


# the rules and the reference settings sit in the module's hyperparameters: checkpoints stay loadable with
# torch.load(weights_only=True) when the module was built in Python rather than by the CLI
torch.serialization.add_safe_globals([UGradSL, UGradSLPlus, GradientAscent, FineTune, RandomLabels, ReferenceTraining])
