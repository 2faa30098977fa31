"""Direct preference optimisation (and the other offline pairwise losses)."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.losses import DPOLoss, PreferenceLoss
from lit_align.methods.base import ReferencedPolicyModule, prompt_ids
from lit_align.models import ModelSpec
from lit_align.models.reference import ReferenceMode
from lit_align.modes import eval_mode
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = ["DPOModule"]

log = logging.getLogger(__name__)


class DPOModule(ReferencedPolicyModule):
    """Offline preference optimisation: DPO (Rafailov et al., 2023, arXiv 2305.18290), cDPO, IPO.

    Objective: the injected :class:`~lit_align.losses.PreferenceLoss` (default
    ``DPOLoss(beta=0.1)``) over sequence log-probs of chosen and rejected responses under the
    policy and the reference (summed over response tokens, or length-averaged for IPO).
    Models: the policy; the reference as ``precomputed`` (default: log-probs cached before the
    first step, no second model), ``adapter`` (LoRA disabled) or ``copy`` (frozen copy).
    Optimiser: the injected one, automatic optimisation; chosen and rejected run in one
    forward. Batch: :class:`~lit_align.data.PreferenceBatch` from
    :class:`~lit_align.data.PreferenceDataModule`.
    Logged (``train/`` and ``val/``): ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
    ``logps/{chosen,rejected}``, ``kl`` (Monte-Carlo KL to the reference on sampled responses,
    when a reference model exists: adapter, copy, or precomputed with LoRA), ``tokens_per_sec``.

    Run: ``lit-align fit --config configs/dpo/tiny.yaml``.
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: PreferenceLoss | None = None,
        reference: ReferenceMode = "precomputed",
        reference_cache_dir: str | None = None,
        kl_every_n_steps: int = 25,
        kl_max_new_tokens: int = 32,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy to build (hub id, local directory or tiny architecture; LoRA; dtype).
            loss: the pairwise loss; default ``DPOLoss(beta=0.1)``.
            reference: ``precomputed``, ``adapter`` or ``copy`` (see :mod:`lit_align.models.reference`).
            reference_cache_dir: where precomputed reference log-probs are cached
                (default ``$LIT_ALIGN_CACHE`` or ``~/.cache/lit_align``).
            kl_every_n_steps: estimate ``train/kl`` by sampling every N steps (0: never); ``val/kl``
                is estimated on the first validation batch of each validation run.
            kl_max_new_tokens: length of the responses sampled for the KL estimate.
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only; default auto).
        """
        super().__init__(model, reference=reference, reference_cache_dir=reference_cache_dir, optimizer=optimizer,
                         scheduler=scheduler, chunk_tokens=chunk_tokens)
        self.loss_fn = loss or DPOLoss()
        self.kl_every_n_steps, self.kl_max_new_tokens = kl_every_n_steps, kl_max_new_tokens
        self._last_kl_step = -1

    def _reference_sequences(self, batch: PreferenceBatch) -> list[SequenceBatch]:
        return [batch.chosen, batch.rejected]

    # -- steps ---------------------------------------------------------------------------------
    def _pair_logps(self, batch: PreferenceBatch, split: str) -> tuple[torch.Tensor, ...]:
        reduction = self.loss_fn.reduction
        both = SequenceBatch.cat([batch.chosen, batch.rejected], self.tokenizer.pad_token_id)  # (2B, T)
        policy = self.policy_logps(both)
        pol = policy.sum() if reduction == "sum" else policy.mean()  # (2B,)
        b = len(batch)
        if self.reference.mode == "precomputed":
            ref_c = self.reference.lookup(split, batch.index, 0, reduction).to(pol)
            ref_r = self.reference.lookup(split, batch.index, 1, reduction).to(pol)
        else:
            ref = self.reference.token_logps(self.policy, both)
            ref_all = ref.sum() if reduction == "sum" else ref.mean()
            ref_c, ref_r = ref_all[:b], ref_all[b:]
        return pol[:b], pol[b:], ref_c, ref_r

    def _step(self, batch: PreferenceBatch, stage: str) -> torch.Tensor:
        split = self.reference_split(stage)
        loss, metrics = self.loss_fn(*self._pair_logps(batch, split))
        self._log_stage(stage, loss, metrics, len(batch), prog_bar="rewards/accuracies")
        return loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        step = self.global_step
        if (self.kl_every_n_steps and step % self.kl_every_n_steps == 0 and step != self._last_kl_step
                and self.reference.can_score(self.policy)):
            self._last_kl_step = step  # once per optimiser step, not per accumulated micro-batch
            self.log("train/kl", self._kl_estimate(batch), on_step=True, batch_size=len(batch))
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")
        if batch_idx == 0 and self.reference.can_score(self.policy):
            self.log("val/kl", self._kl_estimate(batch), on_epoch=True, batch_size=len(batch), sync_dist=True)

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    @torch.no_grad()
    def _kl_estimate(self, batch: PreferenceBatch) -> torch.Tensor:
        """KL(policy || reference) per response, Monte-Carlo: sample y ~ policy for the batch's
        prompts and average ``sum_t log pi(y_t) - log ref(y_t)`` (unbiased for the KL of responses
        truncated at ``kl_max_new_tokens``). The policy's log-probs come with the samples."""
        chosen = batch.chosen
        ids, mask = left_pad(prompt_ids(chosen), self.tokenizer.pad_token_id)
        config = SamplingConfig(max_new_tokens=self.kl_max_new_tokens, do_sample=True, temperature=1.0)
        rollout = sample(self.policy, ids.to(self.device), mask.to(self.device), config,
                         eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        seq = SequenceBatch(
            input_ids=rollout.sequences,
            attention_mask=rollout.attention_mask,
            loss_mask=torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1),
            index=batch.index,
        )
        with eval_mode(self.policy):  # adapter mode scores with the policy's own modules: no dropout
            ref = self.reference.token_logps(self.policy, seq).sum()  # (B,)
        return (rollout.logps.sum(-1) - ref).mean()
