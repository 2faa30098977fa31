"""Reward-model training: a scalar scorer fitted to preference pairs by the Bradley-Terry loss."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import AutoModelForSequenceClassification

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.errors import ConfigError
from lit_align.losses.reward import bradley_terry_loss
from lit_align.methods.base import PolicyModule, prompt_ids
from lit_align.models import RewardModelSpec, build_reward_model, build_tokenizer
from lit_align.models.causal_lm import is_peft_model

__all__ = ["RewardModelModule"]


class RewardModelModule(PolicyModule):
    """Train a reward model on preference pairs (Ouyang et al. 2022, arXiv 2203.02155, eq. 1).

    Model: a :class:`~lit_align.models.RewardModelSpec`: a causal-LM backbone (hub id, local directory or
    tiny architecture; LoRA or full) with a linear head read at each sequence's last real token
    (``scalar_head``; bias-free by default, as HF's decoder classifiers' ``score`` layer), or an HF
    sequence-classification model (``sequence_classification``). Loss: Bradley-Terry,
    ``-log sigmoid(r_chosen - r_rejected)``, with an optional centring penalty ``center_coef * mean((r_c +
    r_r)^2)`` (:func:`~lit_align.losses.bradley_terry_loss`; TRL's ``RewardTrainer`` loss). Chosen and
    rejected run in one forward. Batch: :class:`~lit_align.data.PreferenceBatch` from
    :class:`~lit_align.data.PreferenceDataModule`.

    Logged (``train/`` per step, ``val/`` and ``test/`` epoch means over all ranks): ``loss``, ``accuracy``
    (share of pairs scored in the right order; a tie is wrong), ``margin`` (mean ``r_c - r_r``),
    ``chosen`` and ``rejected`` (mean rewards).

    Export (:class:`~lit_align.callbacks.HFExport`): an HF ``AutoModelForSequenceClassification`` with one
    label (LoRA merged) and the tokenizer, which plain ``transformers`` loads and
    :func:`~lit_align.models.build_reward_model` reads as ``kind: sequence_classification``. Runs on one
    device or under DDP (``callbacks/ddp_cpu.yaml``); FSDP2 is refused (the head lives outside the
    sharded decoder).

    Run: ``lit-align fit --config configs/rm/tiny.yaml``.
    """

    def __init__(
        self,
        model: RewardModelSpec,
        center_coef: float | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            model: the reward model to build (``head_bias`` unset means no bias here).
            center_coef: weight of the centring penalty ``mean((r_c + r_r)^2)`` (TRL's
                ``center_rewards_coefficient``; Eisenstein et al. 2023 use 0.01); ``None``: off.
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
        """
        if center_coef is not None and not center_coef >= 0:
            raise ConfigError(f"model.center_coef must be >= 0 or null, got {center_coef}")
        if model.kind == "scalar_head" and model.head_bias is None:
            model.head_bias = False
        super().__init__(model.model, optimizer=optimizer, scheduler=scheduler)
        self.reward_spec, self.center_coef = model, center_coef
        self.reward_model = None

    def _build_tokenizer(self, spec):
        """A reward model scores whole sequences: its tokenizer needs no EOS token (encoders have none)."""
        return build_tokenizer(spec, key="model.model", needs_eos=False)

    # -- building ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.reward_model is not None:
            return
        if self.device_mesh is not None:
            raise ConfigError("trainer.strategy: RewardModelModule does not run under FSDP2 (ModelParallelStrategy) "
                              "yet; use DDP (callbacks/ddp_cpu.yaml, or trainer.strategy: ddp on GPUs)")
        self.reward_model = build_reward_model(self.reward_spec, self.tokenizer, key="model")
        if self.reward_model.kind == "scalar_head":  # the LM head is never read: no optimiser state, no DDP bucket
            lm_head = self.reward_model.backbone.get_output_embeddings()
            embeddings = self.reward_model.backbone.get_input_embeddings()
            if lm_head is not None and lm_head.weight is not embeddings.weight:
                lm_head.requires_grad_(False)
        self.policy = self.reward_model  # what PolicyModule's optimiser reads
        self.reward_model.train()

    def configure_optimizers(self):
        params = [p for p in self.reward_model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the reward model has no trainable parameters (check model.model.lora.target_modules)")
        return super().configure_optimizers()

    # -- steps ---------------------------------------------------------------------------------
    def scores(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards of the chosen and of the rejected responses, in one forward."""
        both = SequenceBatch.cat([batch.chosen, batch.rejected], self.tokenizer.pad_token_id)  # (2B, T)
        rewards = self.reward_model.score(both.input_ids, both.attention_mask)  # (2B,)
        return rewards[: len(batch)], rewards[len(batch) :]

    def _step(self, batch: PreferenceBatch, stage: str) -> torch.Tensor:
        loss, metrics = bradley_terry_loss(*self.scores(batch), center_coef=self.center_coef)
        self._log_stage(stage, loss, metrics, len(batch), prog_bar="accuracy")
        return loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: PreferenceBatch, batch_idx: int) -> list[dict[str, str | float]]:
        """The rewards of each pair (``lit-align predict``): ``[{prompt, chosen, rejected}]``."""
        chosen, rejected = self.scores(batch)
        prompts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids(batch.chosen)]
        return [{"prompt": p, "chosen": float(c), "rejected": float(r)} for p, c, r in zip(prompts, chosen, rejected)]

    # -- export --------------------------------------------------------------------------------
    @torch.no_grad()
    def export_policy(self) -> nn.Module:
        """The reward model as an HF sequence classifier with one label (LoRA merged), for
        :class:`~lit_align.callbacks.HFExport`."""
        model = self.reward_model
        if model.kind == "sequence_classification":
            backbone = model.backbone
            return backbone.merge_and_unload() if is_peft_model(backbone) else backbone
        backbone = model.backbone.merge_and_unload() if is_peft_model(model.backbone) else model.backbone
        if model.head.bias is not None and bool(model.head.bias.ne(0).any()):
            raise ConfigError("model.head_bias: the head learned a bias, which HF's sequence-classification "
                              "heads have no place for; train with head_bias: false (the default) to export")
        config = backbone.config
        config.num_labels, config.pad_token_id = 1, self.tokenizer.pad_token_id
        classifier = AutoModelForSequenceClassification.from_config(config).to(model.head.weight.dtype)
        prefix = classifier.base_model_prefix
        getattr(classifier, prefix).load_state_dict(getattr(backbone, prefix).state_dict())
        classifier.score.weight.copy_(model.head.weight)
        return classifier.eval()
