"""Reward-model training: a scalar scorer fitted to preference pairs by the Bradley-Terry loss."""

from __future__ import annotations

import types
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForSequenceClassification

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.errors import ConfigError
from lit_align.losses.reward import bradley_terry_loss
from lit_align.methods.base import PolicyModule, prompt_ids
from lit_align.models import RewardModelSpec, build_reward_model, build_tokenizer
from lit_align.models.causal_lm import is_peft_model
from lit_align.models.fsdp import bf16_policy, load_from_rank0, shard_scorer
from lit_align.models.reward import hidden_before_last_layer, last_layer_at, last_token_index
from lit_align.rollout.logps import causal_lm_parts, position_ids_from_mask
from lit_align.rollout.sampler import _cache_kwarg, _make_cache
from lit_align.watermark.players import freeze_lm_head, full_state

__all__ = ["RewardModelModule"]


class RewardModelModule(PolicyModule):
    """Train a reward model on preference pairs (Ouyang et al. 2022, arXiv 2203.02155, eq. 1).

    Model: a :class:`~lit_align.models.RewardModelSpec`: a causal-LM backbone (hub id, local directory or
    tiny architecture; LoRA or full) with a linear head read at each sequence's last real token
    (``scalar_head``; bias-free by default, as HF's decoder classifiers' ``score`` layer), or an HF
    sequence-classification model (``sequence_classification``). Loss: Bradley-Terry,
    ``-log sigmoid(r_chosen - r_rejected - m)``, with an optional margin ``m`` (``margin``: a constant, or
    each record's own ``margin`` field) and an optional centring penalty ``center_coef * mean((r_c +
    r_r)^2)`` (:func:`~lit_align.losses.bradley_terry_loss`; TRL's ``RewardTrainer`` loss, margin column
    included). Chosen and rejected share their prompt (``share_prompt``): a decoder reads it once, its keys
    and values serve both responses, and the responses run in one forward (one device or DDP; under FSDP2,
    and for encoders, chosen and rejected run whole in one forward). Batch: :class:`~lit_align.data.PreferenceBatch` from
    :class:`~lit_align.data.PreferenceDataModule`.

    Logged (``train/`` per step, ``val/`` and ``test/`` epoch means over all ranks): ``loss``, ``accuracy``
    (share of pairs scored in the right order; a tie is wrong), ``margin`` (mean ``r_c - r_r``),
    ``chosen`` and ``rejected`` (mean rewards).

    Export (:class:`~lit_align.callbacks.HFExport`): an HF ``AutoModelForSequenceClassification`` with one
    label (LoRA merged) and the tokenizer, which plain ``transformers`` loads and
    :func:`~lit_align.models.build_reward_model` reads as ``kind: sequence_classification``. Runs on one
    device, under DDP (``callbacks/ddp_cpu.yaml``) or FSDP2 (``callbacks/fsdp2_cpu.yaml``: each decoder layer
    one ``fully_shard`` unit, the scorer itself the root unit with the head, as the watermark's detector;
    a ``scalar_head`` model is built on the meta device and rank 0's weights broadcast; the export gathers
    the weights and rank 0 writes them).

    Run: ``lit-align fit --config configs/rm/tiny.yaml``.
    """

    def __init__(
        self,
        model: RewardModelSpec,
        center_coef: float | None = None,
        margin: Literal["none", "per_record"] | float = "none",
        share_prompt: bool = True,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            model: the reward model to build (``head_bias`` unset means no bias here; ``last_layer_at_score_only``
                unset means on: the last decoder layer runs at the scored tokens only, where that is exact).
            center_coef: weight of the centring penalty ``mean((r_c + r_r)^2)`` (TRL's
                ``center_rewards_coefficient``; Eisenstein et al. 2023 use 0.01); ``None``: off.
            margin: the margin ``m`` in ``-log sigmoid(r_c - r_r - m)``: ``none`` (0); ``per_record``: each
                pair's own, from the records' ``margin`` field (Llama 2's graded preference strength; TRL's
                ``margin`` column; every batch must carry one); or a constant number.
            share_prompt: run each pair's prompt once and both responses on its key/value cache (the same
                scores as a forward of each whole sequence, less work: the prompt tokens are not run twice); off,
                under FSDP2, or for encoder classifiers (no cache), chosen and rejected run whole in one forward.
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5), fused into
                one kernel unless sharded (FSDP2).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
        """
        if center_coef is not None and not center_coef >= 0:
            raise ConfigError(f"model.center_coef must be >= 0 or null, got {center_coef}")
        if isinstance(margin, str) and margin not in ("none", "per_record"):
            raise ConfigError(f"model.margin must be 'none', 'per_record' or a number, got {margin!r}")
        if model.kind == "scalar_head" and model.head_bias is None:
            model.head_bias = False
        if model.last_layer_at_score_only is None:
            model.last_layer_at_score_only = True
        super().__init__(model.model, optimizer=optimizer, scheduler=scheduler)
        self.reward_spec, self.center_coef, self.margin = model, center_coef, margin
        self.share_prompt = share_prompt
        self.reward_model = None
        self._warned_unused_margins = False

    def _build_tokenizer(self, spec):
        """A reward model scores whole sequences: its tokenizer needs no EOS token (encoders have none)."""
        return build_tokenizer(spec, key="model.model", needs_eos=False)

    # -- building ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.reward_model is not None:
            return
        if self.device_mesh is None:
            self.reward_model = self._build()
        else:
            self.reward_model = self._build_sharded()
        # a decoder, unsharded: the prompt-sharing entry point (FSDP2 runs whole sequences: a sharded layer
        # called twice before one backward, for the prompts and for the responses, is not supported)
        if self.device_mesh is None and _decoder_and_head(self.reward_model) is not None:
            self.reward_model.score_pairs = types.MethodType(score_pairs, self.reward_model)
        self.policy = self.reward_model  # what PolicyModule's optimiser reads
        self.reward_model.train()

    def _build(self, meta: bool = False) -> nn.Module:
        """The reward model; a ``scalar_head`` backbone's LM head is frozen (never read: no optimiser state,
        no DDP bucket, nothing reduced under FSDP2) unless tied to the input embeddings."""
        return freeze_lm_head(build_reward_model(self.reward_spec, self.tokenizer, key="model", meta=meta))

    def _build_sharded(self) -> nn.Module:
        """FSDP2 over the data-parallel mesh. A ``scalar_head`` model is built on the meta device on every rank
        and given rank 0's weights; a ``sequence_classification`` model is loaded by every rank (the same
        files) and sharded as loaded."""
        mesh, mp_policy = self.device_mesh["data_parallel"], bf16_policy(self.trainer.precision)
        if self.reward_spec.kind == "sequence_classification":
            return shard_scorer(self._build(), mesh, mp_policy)
        source = self._build() if self.global_rank == 0 else None
        model = shard_scorer(self._build(meta=True), mesh, mp_policy)
        load_from_rank0(model, source, self.trainer.strategy.root_device)
        return model

    def configure_optimizers(self):
        params = [p for p in self.reward_model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the reward model has no trainable parameters (check model.model.lora.target_modules)")
        if self.optimizer_factory is not None or self.device_mesh is not None:
            return super().configure_optimizers()
        # the default AdamW(lr=1e-5) as one fused kernel over all parameters (TRL's default optimiser is too);
        # sharded parameters (FSDP2) keep torch's default implementation
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # -- steps ---------------------------------------------------------------------------------
    def scores(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards of the chosen and of the rejected responses: the shared prompt run once and the two
        responses on its cache (``share_prompt``, decoders), else both whole sequences in one forward."""
        shared = self.share_prompt and hasattr(self.reward_model, "score_pairs")
        split = split_pairs(batch, self.tokenizer.pad_token_id) if shared else None
        if split is not None:
            rewards = self.reward_model.score_pairs(*split)  # (2B,) chosen then rejected
            return rewards[: len(batch)], rewards[len(batch) :]
        both = SequenceBatch.cat([batch.chosen, batch.rejected], self.tokenizer.pad_token_id)  # (2B, T)
        rewards = self.reward_model.score(both.input_ids, both.attention_mask)  # (2B,)
        return rewards[: len(batch)], rewards[len(batch) :]

    def pair_margins(self, batch: PreferenceBatch) -> torch.Tensor | None:
        """(B,) margins ``m`` of the batch's pairs under ``margin`` (None: no margin)."""
        if self.margin == "per_record":
            if batch.margin is None:
                raise ConfigError("model.margin is 'per_record' but these preference records carry no 'margin' "
                                  "field; add a numeric 'margin' to every record (map a column to it with "
                                  "data.train.fields: {margin: <column>}) or set model.margin: none")
            return batch.margin
        if batch.margin is not None and not self._warned_unused_margins:
            self._warned_unused_margins = True
            rank_zero_warn("the preference records carry a 'margin' field, which model.margin="
                           f"{self.margin!r} ignores; set model.margin: per_record to train with it")
        if self.margin == "none":
            return None
        return torch.full((len(batch),), float(self.margin), device=batch.index.device)

    def _step(self, batch: PreferenceBatch, stage: str) -> torch.Tensor:
        loss, metrics = bradley_terry_loss(*self.scores(batch), margin=self.pair_margins(batch),
                                           center_coef=self.center_coef)
        self.log_stage(stage, loss, metrics, len(batch), prog_bar="accuracy")
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
        :class:`~lit_align.callbacks.HFExport`. Under FSDP2 every rank calls it (the weights are gathered);
        rank 0 gets the classifier, the other ranks an empty module (HFExport writes on rank 0 only)."""
        model = self.reward_model
        if any(isinstance(p, DTensor) for p in model.parameters()):
            state = full_state(model)  # a collective: every rank takes part
            if self.global_rank != 0:
                return nn.Module()
            model = self._build()  # a host copy for rank 0 to write (the spec's files, then the trained weights)
            model.load_state_dict(state)
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


# -- prompt sharing --------------------------------------------------------------------------------
def split_pairs(batch: PreferenceBatch, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The batch as its prompts, left-padded, and its responses, right-padded: ``(prompt_ids, prompt_mask)``,
    (B, P), and ``(response_ids, response_mask)``, (2B, R), chosen rows first. ``None`` when a pair's
    prompts differ, or a prompt or response is empty (then the whole sequences are scored)."""
    parts = []
    for seq in (batch.chosen, batch.rejected):
        real, response = seq.attention_mask.bool(), seq.loss_mask.bool()  # (B, T)
        prompt_len, response_len = (real & ~response).sum(1), (real & response).sum(1)  # (B,)
        parts.append((seq.input_ids, prompt_len, response_len))
    (c_ids, c_plen, c_rlen), (r_ids, r_plen, r_rlen) = parts
    if not torch.equal(c_plen, r_plen) or bool((c_plen == 0).any()) or bool((c_rlen == 0).any() | (r_rlen == 0).any()):
        return None
    width = int(c_plen.max())
    offset = torch.arange(width, device=c_ids.device) - (width - c_plen)[:, None]  # (B, P): left-aligned source
    prompt_mask = offset >= 0
    source = offset.clamp(min=0)
    prompts = c_ids.gather(1, source)
    if not torch.equal(prompts[prompt_mask], r_ids.gather(1, source)[prompt_mask]):
        return None
    prompts = prompts.masked_fill(~prompt_mask, pad_token_id)
    resp_width = int(torch.maximum(c_rlen, r_rlen).max())
    steps = torch.arange(resp_width, device=c_ids.device)

    def responses(ids: Tensor, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        mask = steps[None, :] < length[:, None]  # (B, R)
        taken = ids.gather(1, (start[:, None] + steps).clamp(max=ids.shape[1] - 1))
        return taken.masked_fill(~mask, pad_token_id), mask

    (ci, cm), (ri, rm) = responses(c_ids, c_plen, c_rlen), responses(r_ids, r_plen, r_rlen)
    return prompts, prompt_mask.long(), torch.cat([ci, ri]), torch.cat([cm, rm]).long()


def _decoder_and_head(scorer: nn.Module):
    """``(decoder, head_fn)`` of a scorer whose backbone is a decoder (a KV cache), else None (encoders)."""
    if scorer.kind == "scalar_head":
        return causal_lm_parts(scorer.backbone)[0], lambda h: scorer.head(h).squeeze(-1)
    base = getattr(scorer.backbone, scorer.backbone.base_model_prefix, None)
    head = getattr(scorer.backbone, "score", None)
    if base is None or not isinstance(head, nn.Linear):  # encoders pool their first token (RewardModel.score)
        return None
    return base, lambda h: head(h)[:, 0]


def score_pairs(scorer: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                response_mask: Tensor) -> Tensor:
    """(2B,) scores of the prompts (B, P; left-padded) each continued by two responses (2B, R; right-padded;
    rows ``b`` and ``B + b`` continue prompt ``b``), read at each response's last real token: the prompts run
    once, their keys and values (repeated for the two responses, gradients flowing back through both) serve as
    the cache of one forward of the responses. Bound to an unsharded :class:`~lit_align.models.RewardModel` as
    ``score_pairs``."""
    decoder, head_fn = _decoder_and_head(scorer)
    cache = _make_cache(decoder)
    kwarg = {_cache_kwarg(decoder): cache, "use_cache": True}
    prompt_inputs = dict(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                         **kwarg)
    start = prompt_mask.sum(1).repeat(2)  # (2B,) each response's first position
    positions = start[:, None] + torch.arange(response_ids.shape[1], device=response_ids.device)  # (2B, R)
    mask = torch.cat([prompt_mask.repeat(2, 1), response_mask], dim=1)  # (2B, P + R)
    response_inputs = dict(input_ids=response_ids, attention_mask=mask, position_ids=positions, **kwarg)
    index = last_token_index(response_mask)  # (2B,)
    pairs = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat(2)  # (2B,) each row's prompt
    if scorer.separable_last_layer(decoder):
        # layers 0 .. L-2 as below (the cache holds their keys and values); the last layer at the scored tokens
        # only, its keys and values projected from the prompt's and the response's inputs to it
        prompt_hidden, (prompt_cos, prompt_sin) = hidden_before_last_layer(decoder, **prompt_inputs)
        cache.reorder_cache(pairs)
        hidden, (cos, sin) = hidden_before_last_layer(decoder, **response_inputs)
        hidden = torch.cat([prompt_hidden[pairs], hidden], dim=1)  # (2B, P + R, H)
        rotary = (torch.cat([prompt_cos[pairs], cos], dim=1), torch.cat([prompt_sin[pairs], sin], dim=1))
        return head_fn(last_layer_at(decoder, hidden, rotary, mask, prompt_ids.shape[1] + index)).float()
    decoder(**prompt_inputs)
    cache.reorder_cache(pairs)  # (2B, ...)
    hidden = decoder(**response_inputs).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (2B, H)
    return head_fn(last).float()
