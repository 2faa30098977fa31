"""Direct preference optimisation (and the other offline pairwise losses)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.losses import DPOLoss, PreferenceLoss
from lit_align.methods.base import PolicyModule, prompt_ids
from lit_align.models import ModelSpec, frozen_copy
from lit_align.models.reference import ReferenceMode, ReferencePolicy, model_fingerprint
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = ["DPOModule"]

log = logging.getLogger(__name__)


def _default_cache_dir() -> str:
    return os.environ.get("LIT_ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lit_align"))


class DPOModule(PolicyModule):
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
        super().__init__(model, optimizer=optimizer, scheduler=scheduler, chunk_tokens=chunk_tokens)
        self.loss_fn = loss or DPOLoss()
        self.reference = ReferencePolicy(reference)
        self.reference_cache_dir = reference_cache_dir or _default_cache_dir()
        self.kl_every_n_steps, self.kl_max_new_tokens = kl_every_n_steps, kl_max_new_tokens
        self._model_fingerprint: str | None = None
        self._reference_source: list[torch.nn.Module] = []  # rank 0's weights for a sharded copy (not a submodule)
        self._last_kl_step = -1

    # -- building ----------------------------------------------------------------------------
    def _attach_base(self, base: torch.nn.Module, weights: torch.nn.Module | None) -> None:
        self.reference.attach(base, lora_enabled=self.spec.lora is not None)
        if self.reference.copy is not None and weights is not None and weights is not base:
            self._reference_source = [frozen_copy(weights)]
        if self.reference.mode == "precomputed":  # hashed where the weights are, shared with every rank
            fingerprint = model_fingerprint(weights) if weights is not None else None
            self._model_fingerprint = fingerprint if base is weights else self.trainer.strategy.broadcast(fingerprint)

    def _sharded_extras(self) -> list[tuple[torch.nn.Module, torch.nn.Module | None]]:
        if self.reference.copy is None:
            return []
        source = self._reference_source.pop() if self._reference_source else None  # loaded once, then freed
        return [(self.reference.copy, source)]

    # -- reference -----------------------------------------------------------------------------
    def _precompute_reference(self) -> None:
        if self.reference.mode == "precomputed":
            self.reference.precompute(self, lambda batch: [batch.chosen, batch.rejected],
                                      model_fp=self._model_fingerprint, cache_dir=self.reference_cache_dir)

    def on_fit_start(self) -> None:
        self._precompute_reference()

    def on_validation_start(self) -> None:  # `validate` runs without `fit`
        self._precompute_reference()

    def on_test_start(self) -> None:
        self._precompute_reference()

    _COPY_PREFIX = "reference.copy."

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Without the frozen reference copy: it is rebuilt from the model spec, and would double
        every checkpoint. (FSDP2 checkpoints are written by torch.distributed.checkpoint, sharded.)"""
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(self._COPY_PREFIX)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        own = {k: v for k, v in super().state_dict().items() if k.startswith(self._COPY_PREFIX)}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reference"] = self.reference.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "reference" in checkpoint:
            self.reference.load_state(checkpoint["reference"])

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
        split = self.trainer.datamodule.split_of(stage) if self.reference.mode == "precomputed" else stage
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
        was_training = self.policy.training
        self.policy.eval()  # adapter mode scores with the policy's own modules: no dropout
        ref = self.reference.token_logps(self.policy, seq).sum()  # (B,)
        self.policy.train(was_training)
        return (rollout.logps.sum(-1) - ref).mean()
