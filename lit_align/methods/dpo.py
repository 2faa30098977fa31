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

__all__ = ["DPOModule", "log_training_kl", "log_validation_kl", "pair_logps", "preference_step", "sampled_kl"]

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
        self.last_kl_step = -1  # the optimiser step of the last train/kl estimate

    def _reference_sequences(self, batch: PreferenceBatch) -> list[SequenceBatch]:
        return [batch.chosen, batch.rejected]

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        loss = preference_step(self, batch, "train")
        log_training_kl(self, batch)
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        preference_step(self, batch, "val")
        if batch_idx == 0:
            log_validation_kl(self, batch)

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        preference_step(self, batch, "test")


# -- the pieces every offline pairwise method calls (DPOModule, CurryDPOModule) --------------------------
# ``module`` is a ReferencedPolicyModule with ``loss_fn`` (a PreferenceLoss), ``kl_every_n_steps``,
# ``kl_max_new_tokens`` and ``last_kl_step``.

def pair_logps(module, batch: PreferenceBatch, split: str) -> tuple[torch.Tensor, ...]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` sequence log-probs, (B,) each: summed over
    response tokens, or length-averaged when ``module.loss_fn.reduction`` is ``mean`` (IPO). The policy scores
    chosen and rejected in one forward; the reference comes from the ``split`` table (``precomputed``) or from a
    second forward (``adapter``, ``copy``)."""
    reduction = module.loss_fn.reduction
    both = SequenceBatch.cat([batch.chosen, batch.rejected], module.tokenizer.pad_token_id)  # (2B, T)
    policy = module.policy_logps(both)
    pol = policy.sum() if reduction == "sum" else policy.mean()  # (2B,)
    b = len(batch)
    if module.reference.mode == "precomputed":
        ref_c = module.reference.lookup(split, batch.index, 0, reduction).to(pol)  # (B,)
        ref_r = module.reference.lookup(split, batch.index, 1, reduction).to(pol)  # (B,)
    else:
        ref = module.reference.token_logps(module.policy, both)
        ref_all = ref.sum() if reduction == "sum" else ref.mean()  # (2B,)
        ref_c, ref_r = ref_all[:b], ref_all[b:]
    return pol[:b], pol[b:], ref_c, ref_r


def preference_step(module, batch: PreferenceBatch, stage: str) -> torch.Tensor:
    """The injected pairwise loss of ``batch`` (reference table of the ``stage``'s split), logged as
    ``<stage>/loss`` and ``<stage>/<metric>``; returns the loss."""
    loss, metrics = module.loss_fn(*pair_logps(module, batch, module.reference_split(stage)))
    module.log_stage(stage, loss, metrics, len(batch), prog_bar="rewards/accuracies")
    return loss


@torch.no_grad()
def sampled_kl(module, batch: PreferenceBatch, max_new_tokens: int) -> torch.Tensor:
    """KL(policy || reference) per response, Monte-Carlo: sample y ~ policy for the batch's prompts (at most
    ``max_new_tokens``) and average ``sum_t log pi(y_t) - log ref(y_t)`` (unbiased for the KL of responses
    truncated at that length). The policy's log-probs come with the samples."""
    tokenizer = module.tokenizer
    ids, mask = left_pad(prompt_ids(batch.chosen), tokenizer.pad_token_id)
    config = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0)
    rollout = sample(module.policy, ids.to(module.device), mask.to(module.device), config,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seq = SequenceBatch(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        loss_mask=torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1),
        index=batch.index,
    )
    with eval_mode(module.policy):  # adapter mode scores with the policy's own modules: no dropout
        ref = module.reference.token_logps(module.policy, seq).sum()  # (B,)
    return (rollout.logps.sum(-1) - ref).mean()


def log_training_kl(module, batch: PreferenceBatch) -> None:
    """``train/kl`` (:func:`sampled_kl`) every ``module.kl_every_n_steps`` optimiser steps (0: never), once per
    optimiser step (not per accumulated micro-batch), when the reference can score new sequences."""
    step = module.global_step
    if (module.kl_every_n_steps and step % module.kl_every_n_steps == 0 and step != module.last_kl_step
            and module.reference.can_score(module.policy)):
        module.last_kl_step = step
        module.log("train/kl", sampled_kl(module, batch, module.kl_max_new_tokens), on_step=True,
                   batch_size=len(batch))


def log_validation_kl(module, batch: PreferenceBatch) -> None:
    """``val/kl`` (:func:`sampled_kl`, mean over ranks) on ``batch``, when the reference can score new sequences."""
    if module.reference.can_score(module.policy):
        module.log("val/kl", sampled_kl(module, batch, module.kl_max_new_tokens), on_epoch=True,
                   batch_size=len(batch), sync_dist=True)
