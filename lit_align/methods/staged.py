"""The stage driver: training in stages (Curry-DPO's curriculum stages, online DPO / SELM iterations).

A stage is one Lightning epoch: stage ``k`` is ``trainer.current_epoch == k``. The DataModule says how many
there are (``num_stages``) and serves stage ``k``'s rows from ``train_dataloader()`` (reloaded every epoch).
At the start of each stage ``k >= 1`` the reference becomes the policy as it is then (the end of stage
``k - 1``; ``refresh: previous_stage``), the optimiser state is reset (each stage is a fresh run of the
paper's recipe) and the learning rate restarts its per-stage schedule. Checkpoints keep the stage, the
refreshed reference (the copy's weights, or the precomputed tables of the stage) and its fingerprint, so a
run resumed mid-stage continues exactly and does not refresh again; so does one resumed from a checkpoint
written at a stage's last batch (``every_n_train_steps``), whatever the next stage's size, and again later,
and one written as a fit stopped mid-stage (``max_steps``) ends (at its epoch end or train end) finishes that stage. A refreshed ``copy`` is saved in every
checkpoint of the run (stage 0's too: about twice the size of a full fine-tune's policy-only checkpoint; with LoRA the whole base is added to the adapters), since FSDP2 loads
the module state before the checkpoint says which stage it was written in.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.loops.loop import _Loop
from torch import nn

from lit_align.errors import ConfigError
from lit_align.methods.base import ReferencedPolicyModule
from lit_align.models.causal_lm import is_peft_model
from lit_align.models.reference import model_fingerprint
from lit_align.schedulers import warmup_cosine_factor

__all__ = ["RefreshMode", "StagedPolicyModule", "load_policy_weights", "stage_lr"]

RefreshMode = Literal["previous_stage", "never"]


def stage_lr(peak: float, step: int, total_steps: int, warmup_ratio: float) -> float:
    """The learning rate at optimiser step ``step`` (0-based) of a stage of ``total_steps``: linear warm-up
    from 0 over ``ceil(warmup_ratio * total_steps)`` steps, then a cosine decay towards 0 (HF's schedule)."""
    warmup = min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))
    return peak * warmup_cosine_factor(step, total_steps, warmup)


def _source_tensor(base: nn.Module, name: str) -> torch.Tensor:
    """The effective weight ``name`` of ``base`` (a model, or a peft model's base with LoRA layers in it): a
    LoRA layer's base weight plus its active adapters' deltas, computed without merging them in."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    module_name, _, attr = name.rpartition(".")
    module = base.get_submodule(module_name) if module_name else base
    if isinstance(module, ModulesToSaveWrapper):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        module = module.modules_to_save[active[0]] if active and not module.disable_adapters else module.original_module
    if not isinstance(module, LoraLayer):
        return getattr(module, attr)
    value = getattr(module.base_layer, attr)
    if attr != "weight" or module.merged or module.disable_adapters:
        return value
    for adapter in module.active_adapters:
        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
            value = value + module.get_delta_weight(adapter).to(value.dtype)
    return value


@torch.no_grad()
def load_policy_weights(target: nn.Module, policy: nn.Module) -> None:
    """Copy the policy's effective weights into ``target`` (a frozen model of the base architecture): a LoRA
    policy's base with its adapters' deltas added, leaving the policy untouched. FSDP2-sharded models copy
    DTensor to DTensor, each rank its own shard."""
    from torch.distributed.tensor import DTensor

    base = policy.get_base_model() if is_peft_model(policy) else policy
    for name, param in target.named_parameters():
        value = _source_tensor(base, name)
        if isinstance(param, DTensor) and isinstance(value, DTensor) and value.placements != param.placements:
            value = value.redistribute(param.device_mesh, param.placements)
        param.copy_(value)


def _start_next_stage_fresh(trainer: Any) -> bool:
    """When a run resumes from a checkpoint written at ``on_train_batch_end`` of a stage's last batch (a
    ``ModelCheckpoint(every_n_train_steps)`` landing there), make Lightning start the next epoch (stage) as a
    fresh one; returns whether it did. Called from ``on_train_start``, after the fit loop's restart bookkeeping
    and before the epoch loop's.

    Lightning 2.6 counts that epoch finished (``_FitLoop.reset``) but then: (1) the epoch loop keeps the finished
    epoch's batch progress unless its count reaches the *next* loader's length, so a next stage with more
    batches than the finished one trains only the difference; (2) the next epoch starts as a "restarted"
    one, without ``on_train_epoch_start`` and without counting it ready / started, so a checkpoint written
    later in that stage reads as one after the epoch's end and a second resume from it trains the whole
    stage again. Here the batch progress is closed as Lightning closes a finished epoch's and both loops stop
    restarting: the next epoch runs like an uninterrupted run's (hooks, counters and all its batches)."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    progress = epoch_loop.batch_progress
    if not (fit_loop.restarted_mid_epoch and epoch_loop.restarted_on_train_batch_end and progress.is_last_batch):
        return False
    progress.increment_completed()  # the checkpoint was written before this batch counted completed
    progress.reset_on_run()
    epoch_loop.scheduler_progress.reset_on_run()
    epoch_loop.automatic_optimization.optim_progress.reset_on_run()
    epoch_loop.val_loop.batch_progress.total.reset()
    epoch_loop._batches_that_stepped += 1  # the step's logger count, also written before the checkpoint
    fit_loop.reset_restart_stage()
    epoch_loop.reset_restart_stage()
    _Loop.restarting.fset(fit_loop, False)  # the fit loop's own setter keeps max_steps runs restarting
    return True


def _keep_cut_stage_unfinished(trainer: Any, checkpoint: dict[str, Any]) -> bool:
    """In a checkpoint written at the epoch end of a stage cut short (a fit stopped by ``trainer.max_steps`` or
    ``should_stop`` mid-stage, saved by ``ModelCheckpoint`` in ``on_train_epoch_end`` or ``on_train_end``), mark the
    epoch unfinished; returns whether it did. Lightning counts an epoch processed before its epoch-end hooks even
    when it stopped early, and a resume from that state starts the next epoch: the stage's remaining batches
    were skipped. Marked unfinished, the resume continues the stage where it stopped, from the loader's position
    (as from a checkpoint written at ``on_train_batch_end``)."""
    fit_loop = trainer.fit_loop
    epoch, batches = fit_loop.epoch_progress.current, fit_loop.epoch_loop.batch_progress
    in_epoch_end = epoch.processed == epoch.started > 0  # the epoch-end hooks, or after them (on_train_end)
    cut = not batches.is_last_batch and 0 < batches.current.ready < trainer.num_training_batches
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    if not (in_epoch_end and cut and "epoch_progress" in loops):
        return False
    for counters in loops["epoch_progress"].values():
        counters["processed"] -= 1
        counters["completed"] = min(counters["completed"], counters["processed"])
    return True


class StagedPolicyModule(ReferencedPolicyModule):
    """Base of methods that train in stages, one epoch each: a method subclasses it directly and its steps call
    the functions it shares with the unstaged method (``CurryDPOModule`` calls :mod:`lit_align.methods.dpo`'s).

    Per stage ``k`` (``trainer.current_epoch``): the DataModule's ``train_dataloader()`` gives stage ``k``'s
    rows (``trainer.reload_dataloaders_every_n_epochs`` is forced to 1) and its ``num_stages`` fixes
    ``trainer.max_epochs``. At the start of a stage ``k >= 1``:

    * ``refresh: previous_stage`` makes the reference the policy as it is then: ``copy`` loads the policy's
      weights (LoRA merged, FSDP2 shard by shard) into the frozen copy; ``precomputed`` scores the stage's
      data with the policy (it *is* the reference then) into tables ``<split>@stage<k>``; ``adapter`` cannot
      (its reference is the base under the adapters). ``never`` keeps the starting reference.
    * ``reset_optimizer`` clears the optimiser state (fresh AdamW moments);
    * ``stage_lrs`` restarts the learning-rate schedule at the stage's peak rate.

    Then :meth:`on_stage_start` runs (after the refresh). ``stage`` is the stage under way,
    ``reference_stage`` the stage whose starting policy the reference is, ``stage_resumed`` whether the
    stage was restored from a mid-stage checkpoint.
    """

    def __init__(self, *args: Any, refresh: RefreshMode = "previous_stage", reset_optimizer: bool = True,
                 stage_lrs: list[float] | None = None, warmup_ratio: float = 0.1, **kwargs: Any) -> None:
        """
        Args:
            refresh: ``previous_stage`` (each stage's reference is the policy at the end of the previous
                stage: iterative Curry-DPO, online DPO, SELM) or ``never`` (the starting reference throughout).
            reset_optimizer: clear the optimiser state at each stage start.
            stage_lrs: peak learning rate of each stage (one per stage); each stage warms up linearly over
                ``warmup_ratio`` of its steps, then decays with a cosine to 0. ``None``: the optimiser's rate
                (and ``scheduler``, if any) throughout.
            warmup_ratio: share of a stage's optimiser steps spent warming up (with ``stage_lrs``).
        """
        super().__init__(*args, **kwargs)
        if refresh not in ("previous_stage", "never"):
            raise ConfigError(f"model.refresh must be 'previous_stage' or 'never', got {refresh!r}")
        if refresh == "previous_stage" and self.reference.mode == "adapter":
            raise ConfigError("model.reference: 'adapter' cannot be refreshed each stage (its reference is the base "
                              "under the LoRA adapters, fixed); use reference: copy or precomputed, or refresh: never")
        if stage_lrs is not None:
            if not stage_lrs or any(not isinstance(lr, (int, float)) or not lr > 0 for lr in stage_lrs):
                raise ConfigError(f"model.stage_lrs must be a non-empty list of positive learning rates, got {stage_lrs!r}")
            if self.scheduler_factory is not None:
                raise ConfigError("model.stage_lrs sets the learning rate of every step itself; remove model.scheduler "
                                  "or model.stage_lrs")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.refresh, self.reset_optimizer = refresh, reset_optimizer
        self.stage_lrs = [float(lr) for lr in stage_lrs] if stage_lrs is not None else None
        self.warmup_ratio = warmup_ratio
        self.num_stages: int | None = None
        self.stage = -1  # the stage under way (-1: none started); checkpointed with what follows
        self.stage_start_step = 0  # global step at which it started
        self.stage_steps = 0  # optimiser steps it has (its learning-rate schedule's length)
        self.reference_stage = 0  # the stage whose starting policy is the reference (0: the starting model)
        self.reference_fingerprint: str | None = None  # model_fingerprint of that policy (precomputed tables' key)
        self.stage_resumed = False

    # -- subclass hook ---------------------------------------------------------------------------
    def on_stage_start(self, stage: int) -> None:
        """Called at the start of each stage, after the reference refresh and the optimiser reset, with the
        stage's train loader already built (from ``on_train_epoch_start``, also when a run resumes from a
        checkpoint written at a stage's last batch: :func:`_start_next_stage_fresh`); also once, from
        ``on_train_start``, when a run resumes mid-stage (``stage_resumed`` is then true: the reference is the
        checkpoint's, nothing refreshed)."""

    # -- set-up ------------------------------------------------------------------------------------
    @property
    def _stage_tables(self) -> bool:
        """Whether reference tables are precomputed per stage (``precomputed`` mode, refreshed)."""
        return self.reference.mode == "precomputed" and self.refresh == "previous_stage"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        trainer, dm = self.trainer, self.trainer.datamodule
        num_stages = getattr(dm, "num_stages", None)
        if num_stages is None:
            raise ConfigError(f"data: {type(self).__name__} trains in stages and needs a DataModule with "
                              f"`num_stages` (e.g. lit_align.data.RankedPreferenceDataModule), got {type(dm).__name__}")
        self.num_stages = int(num_stages)
        trainer.reload_dataloaders_every_n_epochs = 1  # train_dataloader() serves each stage's rows
        max_epochs = trainer.max_epochs
        # Lightning turns an unset max_epochs into 1000 when max_steps is unset too
        if max_epochs in (None, -1) or (max_epochs == 1000 and trainer.max_steps == -1):
            trainer.fit_loop.max_epochs = self.num_stages
        elif max_epochs != self.num_stages:
            raise ConfigError(f"trainer.max_epochs is {max_epochs} but the data has {self.num_stages} stages (one "
                              f"epoch each); set trainer.max_epochs: {self.num_stages} or leave it out")
        if self.stage_lrs is not None and len(self.stage_lrs) != self.num_stages:
            raise ConfigError(f"model.stage_lrs has {len(self.stage_lrs)} learning rates but the data has "
                              f"{self.num_stages} stages; give one per stage")
        if self.reference.mode == "precomputed" and self.refresh == "never" and self.num_stages > 1:
            raise ConfigError("model.reference: 'precomputed' with refresh: never cannot score later stages' data "
                              "with the starting model once training has moved the policy; use reference: copy "
                              "(or adapter with LoRA), or refresh: previous_stage")

    # -- reference tables --------------------------------------------------------------------------
    def _tag(self) -> str:
        return f"stage{self.reference_stage}"

    def reference_split(self, stage: str) -> str:
        split = super().reference_split(stage)
        return self.reference.table_name(split, self._tag()) if self._stage_tables else split

    def _precompute_stage_tables(self) -> None:
        self.reference.precompute(self, self._reference_sequences, model_fp=self.reference_fingerprint,
                                  cache_dir=self.reference_cache_dir, tag=self._tag())

    def _precompute_reference(self) -> None:
        if not self._stage_tables:
            super()._precompute_reference()
            return
        # Tables come from the checkpoint or from the stage start; before any training (a sanity check) the
        # policy still is the first stage's reference and can score them (recomputed at the stage start).
        if self._tag() not in self.reference.tag_keys and self.stage == -1 and self.global_step == 0:
            self.reference_fingerprint = self.reference_fingerprint or self._model_fingerprint
            self._precompute_stage_tables()

    # -- stages ------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        _start_next_stage_fresh(self.trainer)
        if not self._stage_tables:
            super().on_train_start()
        if self.stage == self.trainer.current_epoch:  # resumed mid-stage: the checkpoint holds its reference
            self.stage_resumed = True
            self.on_stage_start(self.stage)

    def on_train_epoch_start(self) -> None:
        if self.trainer.current_epoch != self.stage:
            self._start_stage(self.trainer.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # a safety net: should Lightning start an epoch without on_train_epoch_start (as it did on a resume from a
        # checkpoint written at an epoch's last batch, before _start_next_stage_fresh), the stage starts here
        if self.trainer.current_epoch != self.stage:
            self._start_stage(self.trainer.current_epoch)

    def _start_stage(self, stage: int) -> None:
        """Refresh the reference, reset the optimiser and the learning-rate schedule, then call the hook."""
        if stage > 0 and self.refresh == "previous_stage":
            self._refresh_reference(stage)
        if stage > 0 and self.reset_optimizer:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()  # AdamW re-creates its moments (and step count) on the next step
        if self._stage_tables:
            self.reference_fingerprint = self.reference_fingerprint or self._model_fingerprint
            self.reference.drop_tag(self._tag())  # any sanity-check tables: scored again on this stage's rows
            self._precompute_stage_tables()
        self.stage, self.stage_start_step, self.stage_resumed = stage, self.global_step, False
        self.stage_steps = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        self.on_stage_start(stage)

    def _refresh_reference(self, stage: int) -> None:
        """Make the reference the policy as it is now (the end of stage ``stage - 1``)."""
        if self.reference.mode == "copy":
            load_policy_weights(self.reference.copy, self.policy)
        elif self.reference.mode == "precomputed":
            self.reference.drop_tag(self._tag())  # the finished stage's tables
            self.reference_fingerprint = model_fingerprint(self.policy)  # a collective under FSDP2: all ranks
            self.reference.adapter_is_reference = False
        self.reference_stage = stage

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.stage_lrs is None:
            return
        lr = stage_lr(self.stage_lrs[self.stage], self.global_step - self.stage_start_step, self.stage_steps,
                      self.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.log("train/lr", lr, on_step=True, on_epoch=False)

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def _saves_reference_copy(self) -> bool:
        """Whether checkpoints keep the reference copy's weights: a copy refreshed each stage cannot be rebuilt
        from the model spec once a stage has refreshed it."""
        return self.reference.mode == "copy" and self.refresh == "previous_stage"

    def _rebuilt_keys(self, keys) -> set[str]:
        """As the base's, except the reference copy's weights whenever it is refreshed per stage.

        Decided from the config only, never from :attr:`reference_stage`: under FSDP2 (``ModelParallelStrategy``)
        Lightning loads the module state *before* ``on_load_checkpoint`` restores the stage, so a rule on the
        restored stage would drop the saved copy and resume stage ``k >= 1`` on the rebuilt starting weights.
        The cost: with ``reference: copy`` and ``refresh: previous_stage`` every checkpoint, stage 0's included,
        holds a second set of the (frozen, full) model weights, about doubling its size."""
        rebuilt = super()._rebuilt_keys(keys)
        if self._saves_reference_copy:
            rebuilt = {k for k in rebuilt if not k.startswith(self._COPY_PREFIX)}
        return rebuilt

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        _keep_cut_stage_unfinished(self.trainer, checkpoint)
        checkpoint["stages"] = {"stage": self.stage, "stage_start_step": self.stage_start_step,
                                "stage_steps": self.stage_steps, "reference_stage": self.reference_stage,
                                "reference_fingerprint": self.reference_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("stages")
        if state is None:
            return
        self.stage, self.stage_start_step = state["stage"], state["stage_start_step"]
        self.stage_steps, self.reference_stage = state["stage_steps"], state["reference_stage"]
        self.reference_fingerprint = state["reference_fingerprint"]
        if self.reference.mode == "precomputed" and self.reference_stage > 0:
            self.reference.adapter_is_reference = False
