"""Curry-DPO: DPO over several ranked pairs per prompt, in stages from easy to hard."""

from __future__ import annotations

import logging

from lit_align.errors import ConfigError
from lit_align.methods.dpo import DPOModule
from lit_align.methods.staged import StagedPolicyModule

__all__ = ["CurryDPOModule"]

log = logging.getLogger(__name__)


class CurryDPOModule(StagedPolicyModule, DPOModule):
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
    Logged besides DPO's: ``train/stage``, ``train/stage_prompts`` and ``train/stage_pairs`` (a prompt has a pair
    in several stages: prompts and pairs are counted apart).

    Run: ``lit-align fit --config configs/curry_dpo/tiny.yaml``.
    """

    _stage_counts: dict[str, int] | None = None

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
        scores = self.reference._score(self, {"pairs": dm.pair_loader(shard=True)}, self._reference_sequences)
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.log("train/stage", float(self.stage), on_step=True, on_epoch=False)
        if self._stage_counts is not None:
            for key, value in self._stage_counts.items():
                self.log(f"train/stage_{key}", float(value), on_step=True, on_epoch=False)
