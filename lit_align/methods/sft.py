"""Supervised fine-tuning."""

from __future__ import annotations

from torch import Tensor

from lit_align.data.batches import SequenceBatch
from lit_align.losses import nll_loss
from lit_align.methods.base import PolicyModule

__all__ = ["SFTModule", "sft_step"]


def sft_step(module: PolicyModule, batch: SequenceBatch, stage: str) -> Tensor:
    """The SFT loss of ``batch`` under ``module.policy`` (response tokens only), logged as ``<stage>/loss``,
    ``nll``, ``ppl``, ``tokens``: with several ranks each rank divides by the global token count in training, so
    the result equals one process with the whole batch. Shared by the methods that fine-tune on (prompt, response)
    rows (SFT, ISARA's rounds)."""
    out = module.policy_logps(batch)
    num_tokens = None
    if stage == "train" and module.trainer.world_size > 1:  # token mean of the global batch (see nll_loss)
        num_tokens = module.trainer.strategy.reduce(out.mask.sum().detach(), reduce_op="sum") / module.trainer.world_size
    loss, metrics = nll_loss(out.logps, out.mask, num_tokens=num_tokens)
    module.log_stage(stage, loss, metrics, len(batch), prog_bar="ppl")
    return loss


class SFTModule(PolicyModule):
    """Supervised fine-tuning: maximise the likelihood of the responses given the prompts.

    Objective: mean negative log-likelihood over the response tokens of the global batch (prompt
    and padding masked; with several ranks each rank divides by the global token count, so the
    result equals one process with the whole batch; under gradient accumulation each micro-batch
    is its own token mean, as in most trainers).
    Model: one causal LM (full weights or LoRA). Optimiser: the injected one, automatic
    optimisation. Batch: :class:`~lit_align.data.SequenceBatch` from
    :class:`~lit_align.data.SFTDataModule`. Logged (``train/``, ``val/``, ``test/``): ``loss``,
    ``nll``, ``ppl``, ``tokens``, and ``train/tokens_per_sec``.

    Run: ``lit-align fit --config configs/sft/tiny.yaml``.
    """

    def _step(self, batch: SequenceBatch, stage: str):
        return sft_step(self, batch, stage)

    def training_step(self, batch: SequenceBatch, batch_idx: int):
        loss = self._step(batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")
