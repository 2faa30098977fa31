"""Continuous adversarial training (C-AdvUL, C-AdvIPO): train the policy under an embedding-space attack."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.attacks.embedding import (
    AttackResult,
    EmbeddingAttack,
    perturbation_mask,
    perturbed_embeddings,
    transplant,
)
from lit_align.containers import AdversarialBatch, SequenceBatch, TokenLogps
from lit_align.engine.seeds import derive_seed
from lit_align.engine.timer import PhaseTimer
from lit_align.errors import ConfigError, check_number
from lit_align.losses.adversarial import CAdvIPO, CAdvUL
from lit_align.losses.sft import nll_loss
from lit_align.methods.base import ReferencedPolicyModule
from lit_align.models import ModelSpec
from lit_align.models.reference import ReferenceMode

__all__ = ["ContinuousAdversarialModule"]

#: precomputed reference table columns (one per sequence of a pair)
_TOWARD, _AWAY = 0, 1

#: the attack's and the cost metrics of a step with adversarial rows (besides the objective's ``metric_keys``)
_ATTACK_KEYS = ("attack/ce_start", "attack/ce_end", "attack/radius", "cost/forward_passes", "cost/backward_passes")

#: batch parts, as :meth:`AdversarialBehaviourDataModule.evaluated_parts` names them
_PARTS = frozenset({"adversarial", "utility"})


class ContinuousAdversarialModule(ReferencedPolicyModule):
    """Adversarial training with continuous attacks: C-AdvUL and C-AdvIPO.

    Xhonneux, Sordoni, Günnemann, Gidel, Schwinn 2024, "Efficient Adversarial Training in LLMs with Continuous
    Attacks", https://arxiv.org/abs/2405.15589 (NeurIPS 2024).

    Per training step (§8(c)), on an :class:`~lit_align.containers.AdversarialBatch` from
    :class:`~lit_align.data.AdversarialBehaviourDataModule`:

    1. if the batch holds adversarial pairs: ``attack`` (an :class:`~lit_align.attacks.EmbeddingAttack`) perturbs
       the input embeddings of the away rows' prompt positions to make the harmful targets likely (gradient
       w.r.t. the perturbation only; parameters and their ``.grad`` untouched) and returns ``delta``, detached;
    2. the policy scores the harmful targets under ``delta`` and the safe responses under the SAME ``delta``
       transplanted onto the toward rows' prompt positions (by mask order);
    3. ``objective`` turns these into the adversarial loss: :class:`~lit_align.losses.CAdvUL` (away + toward
       terms with soft floors) or :class:`~lit_align.losses.CAdvIPO` (IPO on windowed length-averaged log-probs
       against a reference scored on CLEAN inputs, precomputed once before training with the adapter off);
    4. ``utility_weight`` x the token-mean NLL of the clean utility rows is added; one optimiser step (automatic
       optimisation: the attack never calls ``backward``).

    A step without adversarial rows (12.5% share, §8(h)7) trains on utility alone and logs no away / toward
    values at all (absent, not 0). Validation runs the same objective on the validation behaviours (the attack
    re-enables autograd inside). Dropout draws are seeded per (step, rank) (resumed runs are exact). Under FSDP2
    every rank runs the parts (pairs, utility rows) that any rank's batch holds, a missing one on a stand-in
    row with weight 0: sharded forwards are collectives (:meth:`_step_parts`).

    Models: one policy, LoRA by default in the configs (r 64, alpha 16, dropout 0.1, all-linear); the reference
    (C-AdvIPO only) is ``precomputed`` (default), ``adapter`` or ``copy``.

    Logged (``train/``, ``val/``): ``loss``; ``away_loss``, ``toward_loss`` (+ ``away/ce``, ``toward/ce``) or
    ``ipo_loss``, ``h``, ``rewards/*``, ``logps/*``; ``utility_loss``; ``attack/ce_start``, ``attack/ce_end``,
    ``attack/radius``; ``cost/forward_passes``, ``cost/backward_passes`` (per adversarial example: the attack's
    plus the two outer forwards and one backward); ``time/attack``, ``time/adversarial_loss``, ``time/utility``
    (training only).

    Validation / test metrics are epoch means over every rank's batches: ``loss`` weighted by the batch's rows
    (pairs + utility rows, as every method does), the adversarial metrics by the batch's pairs and
    ``utility_loss`` by its utility rows. Every rank logs the same keys at every step (the epoch-end sync is one
    collective per key, and validation batches are sharded over ranks, so one rank may hold only utility rows
    while another holds pairs): the keys of the parts that the epoch's batches of all ranks hold together
    (:meth:`~lit_align.data.AdversarialBehaviourDataModule.evaluated_parts`), a part absent from a batch logged
    as 0 with weight 0.

    Run: ``lit-align fit --config configs/adv_training/ul_tiny.yaml`` (or ``ipo_tiny.yaml``).
    """

    def __init__(
        self,
        model: ModelSpec,
        objective: CAdvUL | CAdvIPO | None = None,
        attack: EmbeddingAttack | None = None,
        utility_weight: float = 1.0,
        reference: ReferenceMode = "precomputed",
        reference_cache_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy (hub id, local directory or ``builtin:`` name; LoRA; dtype).
            objective: the adversarial loss, ``CAdvUL`` (default) or ``CAdvIPO`` (``class_path`` in YAML).
            attack: the inner embedding attack (``epsilon_rel``, ``iters``, ``step_size``); default released values.
            utility_weight: weight of the clean utility NLL (released 1.0; C-AdvIPO configs have no utility data).
            reference: C-AdvIPO's reference: ``precomputed`` (once, clean inputs, adapter off or the starting
                weights), ``adapter`` or ``copy`` (scored on the fly on clean inputs). Unused by C-AdvUL.
            reference_cache_dir: where precomputed reference log-probs are cached.
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only; default auto).
        """
        objective = objective if objective is not None else CAdvUL()
        if not isinstance(objective, (CAdvUL, CAdvIPO)):
            raise ConfigError(f"model.objective must be lit_align.losses.CAdvUL or CAdvIPO, got {objective!r}")
        check_number("model.utility_weight", utility_weight, minimum=0)
        if getattr(objective, "reference_cutoffs", False) and reference == "precomputed":
            raise ConfigError("model.objective.init_args.reference_cutoffs: true windows the reference's per-token "
                              "log-probs, which precomputed tables do not keep: set model.reference to adapter "
                              "(with model.lora) or copy, or reference_cutoffs to false")
        super().__init__(model, reference=reference, reference_cache_dir=reference_cache_dir, optimizer=optimizer,
                         scheduler=scheduler, chunk_tokens=chunk_tokens)
        self.objective = objective
        self.attack = attack if attack is not None else EmbeddingAttack()
        self.utility_weight = utility_weight
        self.timer = PhaseTimer()
        self._eval_parts = _PARTS  # the parts this validation / test epoch holds, on any rank

    # -- reference (C-AdvIPO) ----------------------------------------------------------------------
    def _attach_base(self, base: torch.nn.Module, weights: torch.nn.Module | None) -> None:
        if self.objective.needs_reference:  # C-AdvUL: no reference at all (nothing hashed or copied)
            super()._attach_base(base, weights)

    def _precompute_reference(self) -> None:
        if self.objective.needs_reference:
            super()._precompute_reference()

    def _reference_sequences(self, batch: AdversarialBatch) -> list[SequenceBatch]:
        """Columns of the precomputed table: the safe (toward) and harmful (away) sequences of each pair,
        CLEAN (no perturbation: the reference is scored once, before training, §8(h)5)."""
        if batch.away is None:
            raise ValueError("reference: precomputed scores adversarial pairs only, but a reference batch held none; "
                             "the DataModule's split_loaders must yield pairs (data.adversarial_probability 1.0)")
        return [batch.toward, batch.away]

    def _reference_means(self, batch: AdversarialBatch, stage: str) -> tuple[Tensor, Tensor]:
        """(A,) reference means of the away and toward rows on clean inputs: table lookups, or scored now."""
        if self.reference.mode == "precomputed" and not self.objective.reference_cutoffs:
            split = self.reference_split(stage)
            return (self.reference.lookup(split, batch.index, _AWAY, "mean"),
                    self.reference.lookup(split, batch.index, _TOWARD, "mean"))
        away = self.reference.token_logps(self.policy, batch.away)
        toward = self.reference.token_logps(self.policy, batch.toward)
        return self.objective.reference_means(away.logps, away.mask, toward.logps, toward.mask)

    # -- objective ---------------------------------------------------------------------------------
    def _perturbed_logps(self, part: SequenceBatch, delta: Tensor) -> TokenLogps:
        with perturbed_embeddings(self.policy, delta):
            return self.policy_logps(part)

    def _adversarial(self, batch: AdversarialBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The attack, then the objective on the away and toward rows under the same (detached) delta."""
        with self.timer("attack"):
            # the outer away forward scores the returned delta: no extra attack forward for attack/ce_end
            result: AttackResult = self.attack(self.policy, batch.away, score_last=False)  # (A, T_a, H), detached
        with self.timer("adversarial_loss"):
            toward_mask = perturbation_mask(batch.toward.attention_mask, batch.toward.loss_mask)  # (A, T_t)
            toward_delta = transplant(result.delta, result.mask, toward_mask)  # (A, T_t, H)
            away = self._perturbed_logps(batch.away, result.delta)
            toward = self._perturbed_logps(batch.toward, toward_delta)
            refs = self._reference_means(batch, stage) if self.objective.needs_reference else (None, None)
            loss, metrics = self.objective(away.logps, away.mask, toward.logps, toward.mask, *refs)
        ce_end = -(away.logps * away.mask).sum() / away.mask.sum().clamp(min=1)  # the away rows' CE under delta
        metrics.update(zip(_ATTACK_KEYS, (
            result.loss_start.float(), ce_end.detach().float(), torch.tensor(float(result.radius)),
            torch.tensor(float(result.forward_passes + 2)), torch.tensor(float(result.backward_passes + 1)))))
        return loss, metrics

    def _objective(self, batch: AdversarialBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss and metrics. A part that this rank lacks but :meth:`_step_parts` runs (FSDP2) is
        computed on a stand-in row and adds 0 times its loss (the same forwards and backward, no gradient); its
        metrics are dropped."""
        total = torch.zeros((), device=self.device)
        metrics: dict[str, Tensor] = {}
        parts = self._step_parts(batch)
        if "adversarial" in parts:
            real = batch.away is not None
            loss, adversarial = self._adversarial(batch if real else self._stand_in_pairs(), stage)
            total = total + (loss if real else 0.0 * loss)
            metrics = adversarial if real else metrics
        if "utility" in parts:
            real = batch.utility is not None
            with self.timer("utility"):
                scored = self.policy_logps(batch.utility if real else self._stand_in_row())
                utility, _ = nll_loss(scored.logps, scored.mask)
            if real:
                metrics["utility_loss"] = utility.detach()
            total = total + (self.utility_weight if real else 0.0) * utility
        return total, metrics

    def _step_parts(self, batch: AdversarialBatch) -> frozenset[str]:
        """The parts (``adversarial``, ``utility``) this step computes: the batch's own; under FSDP2, whose
        sharded forwards are collectives that every rank must run alike, those of ANY rank (one small
        all-reduce per step), since the mixer and the sharded validation rows give ranks different parts."""
        here = [batch.away is not None, batch.utility is not None]
        if self.device_mesh is not None and self.trainer.world_size > 1:
            flags = torch.tensor(here, dtype=torch.float32, device=self.device)
            here = (self.trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        return frozenset(part for part, present in zip(("adversarial", "utility"), here) if present)

    def _stand_in_row(self) -> SequenceBatch:
        """One two-token row (pad tokens: a prompt position, then a scored one) for a part this rank lacks."""
        ids = torch.full((1, 2), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        return SequenceBatch(ids, torch.ones_like(ids), torch.tensor([[0, 1]], device=self.device),
                             torch.zeros(1, dtype=torch.long, device=self.device))

    def _stand_in_pairs(self) -> AdversarialBatch:
        """One stand-in pair (pair index 0: some rank holds pairs, so the reference table has it)."""
        row = self._stand_in_row()
        return AdversarialBatch(away=row, toward=row, utility=None, index=row.index)

    def _step(self, batch: AdversarialBatch, stage: str) -> Tensor:
        self.timer.reset()
        loss, metrics = self._objective(batch, stage)
        if stage == "train":  # per step, not synced: a step without pairs leaves away / toward out (§8(h)7)
            metrics.update({k: torch.tensor(v) for k, v in self.timer.metrics().items()})
            self.log_stage(stage, loss, metrics, max(len(batch), 1))
        else:
            metrics, weights = self._eval_metrics(batch, metrics)
            self.log_stage(stage, loss, metrics, max(len(batch), 1), weights=weights)
        return loss

    def _eval_metrics(self, batch: AdversarialBatch, metrics: dict[str, Tensor]
                      ) -> tuple[dict[str, Tensor], dict[str, int]]:
        """``(metrics, weights)`` for :meth:`log_stage` in validation / test: every key of the epoch's
        parts in one fixed order, each weighted by the rows of its part in this batch (0 and weight 0 where the
        batch holds none), so that every rank logs the same keys at every step."""
        rows = {"adversarial": len(batch.index), "utility": len(batch.utility) if batch.utility is not None else 0}
        if unplanned := {part for part, n in rows.items() if n} - self._eval_parts:
            raise RuntimeError(f"a {self.trainer.state.stage} batch holds {sorted(unplanned)} rows, which the "
                               f"epoch's parts {sorted(self._eval_parts)} leave out")
        keys = {"adversarial": (*self.objective.metric_keys, *_ATTACK_KEYS), "utility": ("utility_loss",)}
        zero = torch.zeros((), device=self.device)
        out, weights = {}, {}
        for part in sorted(self._eval_parts):
            for key in keys[part]:
                out[key], weights[key] = metrics.get(key, zero), rows[part]
        return out, weights

    def _evaluated_parts(self, stage: str, batches: list[int | float]) -> frozenset[str]:
        """The parts the ``stage`` epoch's batches of all ranks hold (the DataModule's plan; every part for other
        loaders, whose absent parts then log NaN)."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "evaluated_parts"):
            return _PARTS
        return datamodule.evaluated_parts(stage, batches[0] if batches else 0)

    def on_validation_epoch_start(self) -> None:
        trainer = self.trainer
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._eval_parts = self._evaluated_parts("val", batches)

    def on_test_epoch_start(self) -> None:
        self._eval_parts = self._evaluated_parts("test", self.trainer.num_test_batches)

    def on_train_batch_start(self, batch: AdversarialBatch, batch_idx: int) -> None:
        # dropout (LoRA's 0.1) draws from the global RNG, which checkpoints do not restore: seed it per (step,
        # rank) so a resumed run draws what an uninterrupted one would
        torch.manual_seed(derive_seed(self.spec.seed, self.global_step, "dropout", self.global_rank))

    def training_step(self, batch: AdversarialBatch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: AdversarialBatch, batch_idx: int) -> None:
        # Lightning validates under inference mode; the attack needs autograd w.r.t. delta: leave it, and
        # clone the batch's inference tensors so they can take part in the graph
        with torch.inference_mode(False), torch.enable_grad():
            self._step(_clone(batch), "val")

    def test_step(self, batch: AdversarialBatch, batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            self._step(_clone(batch), "test")

    def predict_step(self, batch: AdversarialBatch, batch_idx: int) -> list[dict[str, str]]:
        return super().predict_step(batch.toward if batch.toward is not None else batch.utility, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.objective.needs_reference:
            super().on_save_checkpoint(checkpoint)


def _clone(batch: AdversarialBatch) -> AdversarialBatch:
    """A copy of ``batch`` whose tensors are normal (not inference-mode) tensors."""
    def part(p: SequenceBatch | None) -> SequenceBatch | None:
        return None if p is None else SequenceBatch(p.input_ids.clone(), p.attention_mask.clone(),
                                                    p.loss_mask.clone(), p.index.clone())
    return AdversarialBatch(part(batch.away), part(batch.toward), part(batch.utility), batch.index.clone())
