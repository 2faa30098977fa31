"""The one small base class of single-policy methods: build, shard, optimise, generate, measure."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_align.data.batches import SequenceBatch
from lit_align.data.prompts import PromptBatch
from lit_align.data.tokenize import encode_prompt
from lit_align.errors import ConfigError
from lit_align.models import ModelSpec, apply_lora, build_causal_lm, build_tokenizer, frozen_copy
from lit_align.models.fsdp import fsdp2_parallelize, load_from_rank0
from lit_align.models.reference import ReferenceMode, ReferencePolicy, model_fingerprint
from lit_align.modes import eval_mode
from lit_align.paths import cache_root
from lit_align.rollout.logps import TokenLogps, token_logps
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = ["PolicyModule", "ReferencedPolicyModule", "RebuiltWeights", "default_cache_dir", "prompt_ids",
           "prompt_predictions"]


def prompt_ids(batch: SequenceBatch) -> list[list[int]]:
    """The prompt tokens of each row (real tokens before the response)."""
    rows = batch.attention_mask.bool() & ~batch.loss_mask.bool()  # (B, T)
    return [ids[m].tolist() for ids, m in zip(batch.input_ids, rows)]


@torch.no_grad()
def prompt_predictions(module: PolicyModule, batch: PromptBatch, config: SamplingConfig) -> list[dict[str, str]]:
    """The ``predict_step`` rows of a method trained on prompts (``lit-align predict``): ``[{prompt, completion}]``,
    the batch's prompt text and ``module.policy``'s greedy response (``config`` with ``do_sample`` off: its
    length and stop settings), decoded without special tokens; the policy runs in eval mode (no dropout)."""
    greedy = dataclasses.replace(config, do_sample=False)
    tokenizer = module.tokenizer
    with eval_mode(module.policy):
        out = sample(module.policy, batch.input_ids, batch.attention_mask, greedy,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return [{"prompt": p, "completion": tokenizer.decode(r[m.bool()], skip_special_tokens=True)}
            for p, r, m in zip(batch.prompts, out.response_ids, out.response_mask)]  # response_ids: (B, T_r)


class RebuiltWeights:
    """Mixin for a LightningModule whose checkpoints leave out frozen weights that are rebuilt from the
    model specs (reference copies, the base under LoRA adapters, judges): :meth:`_rebuilt_keys` names them,
    ``state_dict`` drops them, ``load_state_dict`` takes them from the module as built."""

    def _rebuilt_keys(self, keys) -> set[str]:
        """The state-dict keys among ``keys`` that checkpoints leave out."""
        raise NotImplementedError

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        for key in self._rebuilt_keys(list(state)):
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        own = super().state_dict()
        rebuilt = {k: own[k] for k in self._rebuilt_keys(list(own))}
        return super().load_state_dict({**rebuilt, **state_dict}, strict=strict, assign=assign)


class PolicyModule(L.LightningModule):
    """Shared plumbing for methods that train one causal-LM policy.

    * the tokenizer is built at construction (cheap; DataModules read ``module.tokenizer``);
    * weights are built in :meth:`configure_model`, so FSDP2 shards them as they are made;
      subclasses hook :meth:`_attach_base` to take what they need of the starting weights
      (e.g. a frozen reference copy) before LoRA is applied;
    * the optimiser and scheduler are injected (``optimizer:`` / ``scheduler:`` in YAML);
    * :meth:`generate` decodes prompts with the KV-cache sampler (sample tables, demos).
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the policy to build (hub id, local directory or tiny architecture; LoRA; dtype).
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only; default auto).
        """
        super().__init__()
        self.save_hyperparameters()
        self.spec = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.chunk_tokens = chunk_tokens
        self.tokenizer = self._build_tokenizer(model)
        self.policy: torch.nn.Module | None = None
        self._last_batch_end: float | None = None

    # -- building ----------------------------------------------------------------------------
    def _build_tokenizer(self, spec: ModelSpec):
        """The module's tokenizer (subclass hook: a policy needs an EOS token to stop generating)."""
        return build_tokenizer(spec)

    def _attach_base(self, base: torch.nn.Module, weights: torch.nn.Module | None) -> None:
        """Subclass hook, called with the freshly built base model before LoRA is applied.

        ``weights`` is a model holding the starting weights (``base`` itself, except under FSDP2,
        where ``base`` lives on the meta device and only rank 0 gets a loaded copy; ``None`` elsewhere).
        """

    def _sharded_extras(self) -> list[tuple[torch.nn.Module, torch.nn.Module | None]]:
        """Subclass hook: further (frozen) models to shard under FSDP2, each with its rank-0 weights."""
        return []

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.device_mesh is None:
            base = build_causal_lm(self.spec, self.tokenizer)
            self._attach_base(base, base)
            self.policy = apply_lora(base, self.spec.lora, seed=self.spec.seed).train()  # from_pretrained gives eval()
            return
        # ModelParallelStrategy: FSDP2 over the data-parallel mesh. Every rank builds the model on the
        # meta device and allocates only its shards; rank 0 alone loads the weights and broadcasts them.
        source = build_causal_lm(self.spec, self.tokenizer) if self.global_rank == 0 else None
        base = build_causal_lm(self.spec, self.tokenizer, meta=True)
        self._attach_base(base, source)
        self.policy = apply_lora(base, self.spec.lora, seed=self.spec.seed).train()
        source_policy = apply_lora(source, self.spec.lora, seed=self.spec.seed) if source is not None else None
        mesh = self.device_mesh["data_parallel"]
        mp_policy = None
        if str(self.trainer.precision).startswith("bf16"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        device = self.trainer.strategy.root_device
        for model, src, trainable in [(self.policy, source_policy, True),
                                      *((m, s, False) for m, s in self._sharded_extras())]:
            fsdp2_parallelize(model, mesh, mp_policy=mp_policy, trainable=trainable)
            load_from_rank0(model, src, device)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (check model.lora.target_modules)")
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.AdamW(params, lr=1e-5)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # -- computing ---------------------------------------------------------------------------
    def policy_logps(self, batch: SequenceBatch) -> TokenLogps:
        """Per-token log-probs of ``batch`` under the policy (response tokens only)."""
        return token_logps(self.policy, batch.input_ids, batch.attention_mask, batch.loss_mask,
                           chunk_tokens=self.chunk_tokens)

    def log_stage(self, stage: str, loss: torch.Tensor, metrics: dict[str, torch.Tensor], batch_size: int,
                   prog_bar: str | None = None, weights: dict[str, int] | None = None) -> None:
        """``<stage>/loss`` and ``<stage>/<metric>``: per step in training, epoch means (all ranks) otherwise.

        An epoch mean weights each step's value by its ``batch_size`` (Lightning sums ``value * weight`` and
        ``weight`` over steps and ranks); ``weights`` gives a metric its own weight instead, e.g. the rows of the
        batch part it measures, so that a part absent from a step (weight 0, any finite placeholder value) leaves
        that metric's epoch mean alone. Under ``sync_dist`` every rank must log the same keys in the same order
        at every step (each key is one collective at epoch end). These weights go to Lightning as floats: its
        epoch-end mean divides the summed weights by the world size in place, which truncates an integer (1 + 0
        over 2 ranks would become 0).
        """
        on_step = stage == "train"
        weights = weights or {}
        for key, value in {"loss": loss, **metrics}.items():
            weight = float(weights[key]) if key in weights else batch_size
            self.log(f"{stage}/{key}", value, prog_bar=key in ("loss", prog_bar), on_step=on_step,
                     on_epoch=not on_step, batch_size=weight, sync_dist=not on_step)

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, str]]:
        """Greedy completions of the batch's prompts (``lit-align predict``): ``[{prompt, completion}]``."""
        rows = prompt_ids(batch.chosen if hasattr(batch, "chosen") else batch)
        completions = self.generate_from_ids(rows)
        return [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "completion": c}
                for p, c in zip(rows, completions)]

    def _log_throughput(self, num_tokens: int) -> None:
        """``train/tokens_per_sec``: real tokens of all ranks over the wall time since the last batch."""
        now = time.perf_counter()
        if self._last_batch_end is not None:
            rate = num_tokens * self.trainer.world_size / max(now - self._last_batch_end, 1e-9)
            self.log("train/tokens_per_sec", rate, on_step=True, on_epoch=False)
        self._last_batch_end = now

    def generate(self, prompts: list[str], config: SamplingConfig | None = None,
                 chat_template: bool | None = None) -> list[str]:
        """Decode a completion for each prompt (chat-formatted when the tokenizer has a template)."""
        chat = bool(self.tokenizer.chat_template) if chat_template is None else chat_template
        return self.generate_from_ids([encode_prompt(self.tokenizer, p, chat) for p in prompts], config)

    @torch.no_grad()
    def generate_from_ids(self, prompts: list[list[int]], config: SamplingConfig | None = None) -> list[str]:
        """Decode a completion for each already-tokenized prompt (greedy, 32 tokens by default)."""
        config = config or SamplingConfig(max_new_tokens=32, do_sample=False)
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        out = sample(self.policy, ids.to(self.device), mask.to(self.device), config,
                     eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                for r, m in zip(out.response_ids, out.response_mask)]


def online_reference(model: ModelSpec, reference: str, what: str) -> str:
    """The reference mode of an online method (new text every step: nothing can be precomputed): ``auto`` is the
    adapter switched off with LoRA, else a frozen copy; an error names ``model.reference``."""
    reference = ("adapter" if model.lora is not None else "copy") if reference == "auto" else reference
    if reference not in ("adapter", "copy"):
        raise ConfigError(f"model.reference must be 'adapter', 'copy' or 'auto' for {what} (new text is scored every "
                          f"step: nothing can be precomputed), got {reference!r}")
    return reference


def default_cache_dir() -> str:
    """``$LIT_ALIGN_CACHE`` or ``~/.cache/lit_align``: where precomputed reference log-probs are kept."""
    return str(cache_root())


class ReferencedPolicyModule(RebuiltWeights, PolicyModule):
    """A :class:`PolicyModule` with a frozen reference policy (see :mod:`lit_align.models.reference`).

    It owns the plumbing every reference-regularised method shares: attaching the reference to the
    starting weights before LoRA, sharding a ``copy`` under FSDP2 (loaded from rank 0 only), filling
    ``precomputed`` tables before training / validation / test (subclasses say which sequences of a batch
    are scored, :meth:`_reference_sequences`), keeping those tables in checkpoints, and leaving the
    frozen copy out of checkpoints (it is rebuilt from the model spec and would double their size).
    """

    def __init__(
        self,
        model: ModelSpec,
        reference: ReferenceMode = "precomputed",
        reference_cache_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        super().__init__(model, optimizer=optimizer, scheduler=scheduler, chunk_tokens=chunk_tokens)
        self.reference = ReferencePolicy(reference)
        self.reference_cache_dir = reference_cache_dir or default_cache_dir()
        self._model_fingerprint: str | None = None
        self._reference_source: list[torch.nn.Module] = []  # rank 0's weights for a sharded copy (not a submodule)

    def _reference_args(self) -> tuple[torch.nn.Module, Any]:
        """``(model, context)`` that scores the reference: the frozen copy, or the policy under a context that
        switches its LoRA adapter off (for ``make_experience``'s ``reference`` and ``reference_context``)."""
        if self.reference.copy is not None:
            return self.reference.copy, None
        return self.policy, lambda: self.policy.disable_adapter()

    def _reference_sequences(self, batch) -> list[SequenceBatch]:
        """The sequences of a batch whose reference log-probs are precomputed (one table column each)."""
        raise NotImplementedError(f"{type(self).__name__} does not support reference: precomputed")

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

    # -- precomputed tables ------------------------------------------------------------------
    def _precompute_reference(self) -> None:
        if self.reference.mode == "precomputed":
            self.reference.precompute(self, self._reference_sequences, model_fp=self._model_fingerprint,
                                      cache_dir=self.reference_cache_dir)

    def on_train_start(self) -> None:  # after any checkpoint restore (FSDP2 restores after on_fit_start)
        self._precompute_reference()

    def on_validation_start(self) -> None:  # `validate` runs without `fit`
        self._precompute_reference()

    def on_test_start(self) -> None:
        self._precompute_reference()

    def reference_split(self, stage: str) -> str:
        """The reference table a stage reads (``test`` shares ``val``'s when there is no test set)."""
        return self.trainer.datamodule.split_of(stage) if self.reference.mode == "precomputed" else stage

    # -- checkpoints -------------------------------------------------------------------------
    _COPY_PREFIX = "reference.copy."

    def _rebuilt_keys(self, keys) -> set[str]:
        """The frozen reference copy: rebuilt from the model spec, it would double every checkpoint. (FSDP2
        checkpoints are written by torch.distributed.checkpoint, sharded.)"""
        return {k for k in keys if k.startswith(self._COPY_PREFIX)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reference"] = self.reference.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "reference" in checkpoint:
            self.reference.load_state(checkpoint["reference"])
