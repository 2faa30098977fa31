"""Curry-DPO: DPO over several ranked pairs per prompt, in stages from easy to hard."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.errors import ConfigError
from lit_align.losses import DPOLoss, PreferenceLoss
from lit_align.methods.dpo import log_training_kl, log_validation_kl, preference_step
from lit_align.methods.staged import RefreshMode, StagedPolicyModule
from lit_align.models import ModelSpec
from lit_align.models.reference import ReferenceMode

__all__ = ["CurryDPOModule"]

log = logging.getLogger(__name__)


class CurryDPOModule(StagedPolicyModule):
    """Curry-DPO (Pattnaik et al. 2024, "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked
    Preferences", arXiv 2403.07230; others.md §9): a DPO stage per difficulty level of the ranked pairs.

    Objective: the injected pairwise loss (default sigmoid DPO, ``DPOLoss(beta=0.1)``) in every stage, with the
    stage's reference. Curriculum (the DataModule's ``curriculum``, normally
    :class:`~lit_align.data.RankedPreferenceDataModule`): ``iterative``: stage k (epoch k) trains on the level-k
    pairs (easiest first), its policy starting from and its frozen reference being the policy at the end of stage
    k - 1 (stage 1's is the SFT model; ``refresh: previous_stage``, the paper's method); ``non_iterative``: one
    stage over every pair in curriculum order against the SFT reference. Each stage starts with fresh AdamW state
    (``reset_optimizer``) and, with ``stage_lrs``, its own warm-up and cosine decay.
    Models: the policy; the reference as ``precomputed`` (each stage's rows scored at its start by the policy,
    which *is* the stage's reference then) or ``copy`` (refreshed by loading the policy's weights, LoRA merged).
    With ``order: ref_logprob_margin`` the module scores every training pair with the starting model before the
    first stage and hands the margins to the DataModule (:meth:`~lit_align.data.RankedPreferenceDataModule.
    set_reference_margins`; they are kept in checkpoints with the DataModule's state).
    Steps: DPO's, by calling :mod:`lit_align.methods.dpo`'s functions (:func:`~lit_align.methods.dpo.preference_step`,
    ``train/kl`` and ``val/kl`` as in :class:`~lit_align.methods.DPOModule`). Logged besides DPO's: ``train/stage``,
    ``train/stage_prompts`` and ``train/stage_pairs`` (a prompt has a pair in several stages: prompts and pairs are
    counted apart).

    Run: ``lit-align fit --config configs/curry_dpo/tiny.yaml``.
    """

    _stage_counts: dict[str, int] | None = None

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference: ReferenceMode = "precomputed",
        reference_cache_dir: str | None = None,
        kl_every_n_steps: int = 25,
        kl_max_new_tokens: int = 32,
        refresh: RefreshMode = "previous_stage",
        reset_optimizer: bool = True,
        stage_lrs: list[float] | None = None,
        warmup_ratio: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy to build (hub id, local directory or tiny architecture; LoRA; dtype).
            loss: the pairwise loss of every stage; default ``DPOLoss(beta=0.1)``.
            reference: ``precomputed`` (each stage's rows scored at its start), ``copy`` (refreshed each stage),
                or ``adapter`` (LoRA off: only with ``refresh: never``).
            reference_cache_dir: where precomputed reference log-probs are cached
                (default ``$LIT_ALIGN_CACHE`` or ``~/.cache/lit_align``).
            kl_every_n_steps: estimate ``train/kl`` by sampling every N steps (0: never); ``val/kl``
                is estimated on the first validation batch of each validation run.
            kl_max_new_tokens: length of the responses sampled for the KL estimate.
            refresh: ``previous_stage`` (iterative Curry-DPO: each stage's reference is the policy at the end of
                the previous stage) or ``never`` (the starting reference throughout).
            reset_optimizer: clear the optimiser state at each stage start.
            stage_lrs: peak learning rate of each stage (one per stage); linear warm-up over ``warmup_ratio`` of
                the stage's steps, then cosine decay to 0. ``None``: the optimiser's rate throughout.
            warmup_ratio: share of a stage's optimiser steps spent warming up (with ``stage_lrs``).
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (without ``stage_lrs``); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only; default auto).
        """
        super().__init__(model, reference=reference, reference_cache_dir=reference_cache_dir, optimizer=optimizer,
                         scheduler=scheduler, chunk_tokens=chunk_tokens, refresh=refresh,
                         reset_optimizer=reset_optimizer, stage_lrs=stage_lrs, warmup_ratio=warmup_ratio)
        self.loss_fn = loss or DPOLoss()
        self.kl_every_n_steps, self.kl_max_new_tokens = kl_every_n_steps, kl_max_new_tokens
        self.last_kl_step = -1  # the optimiser step of the last train/kl estimate

    def _reference_sequences(self, batch: PreferenceBatch) -> list[SequenceBatch]:
        return [batch.chosen, batch.rejected]

    # -- reference margins (order: ref_logprob_margin) -------------------------------------------------
    def _fill_reference_margins(self) -> None:
        """Score every training pair with the starting model (the policy before any step: every reference mode
        equals it then) and give the margins to the DataModule, when its order needs them and has none."""
        dm = self.trainer.datamodule
        if not getattr(dm, "needs_reference_margins", False):
            return
        if self.global_step > 0 or self.stage > 0:
            raise ConfigError("data.order is 'ref_logprob_margin' but the checkpoint being resumed holds no reference "
                              "margins (they are saved with the DataModule's state); resume with the same data "
                              "settings, or start a new run")
        # the same scoring as a precomputed reference table: sharded over ranks, summed, under the run's precision
        scores = self.reference.score(self, {"pairs": dm.pair_loader(shard=True)}, self._reference_sequences)
        sums, counts = scores["pairs"]  # (N, 2) each: chosen, rejected
        logps = sums if self.loss_fn.reduction == "sum" else sums / counts.clamp(min=1)
        dm.set_reference_margins(logps[:, 0] - logps[:, 1])
        log.info("Curry-DPO: reference margins of %d training pairs scored with the starting model", len(logps))

    def _precompute_reference(self) -> None:  # validate / test / the sanity check may come before training
        self._fill_reference_margins()
        super()._precompute_reference()

    def on_train_start(self) -> None:
        self._fill_reference_margins()
        super().on_train_start()

    # -- stages ----------------------------------------------------------------------------------------
    def on_stage_start(self, stage: int) -> None:
        dm = self.trainer.datamodule
        self._stage_counts = dm.stage_counts(stage) if hasattr(dm, "stage_counts") else None
        if self._stage_counts is not None:
            log.info("Curry-DPO stage %d of %d: %d prompts, %d pairs (reference: the policy at the start of stage "
                     "%d)", stage + 1, self.num_stages, self._stage_counts["prompts"], self._stage_counts["pairs"],
                     self.reference_stage + 1)

    # -- steps (DPO's) ---------------------------------------------------------------------------------
    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        loss = preference_step(self, batch, "train")
        log_training_kl(self, batch)
        self._log_throughput(batch.num_tokens)
        self.log("train/stage", float(self.stage), on_step=True, on_epoch=False)
        for key, value in (self._stage_counts or {}).items():
            self.log(f"train/stage_{key}", float(value), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        preference_step(self, batch, "val")
        if batch_idx == 0:
            log_validation_kl(self, batch)

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        preference_step(self, batch, "test")
