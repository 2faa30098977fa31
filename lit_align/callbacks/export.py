"""Export the trained policy in Hugging Face format at the end of fit."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers.utils import logging as hf_logging

from lit_align.callbacks.reporting import run_name

__all__ = ["HFExport", "RUN_MARKER"]


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Gathered CPU state dict when parameters are sharded (FSDP2 DTensors), else None."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "tie_word_embeddings", False):  # gathered tied weights come back as two copies
        prefix = "base_model.model." if base is not model else ""
        for tied in getattr(base, "_tied_weights_keys", None) or ():
            state.pop(prefix + tied, None)
    return state


def _fsdp1_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict on rank 0 under Lightning's FSDPStrategy (FSDP1), else None.
    Not exercised by the test suite (FSDPStrategy needs GPUs)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model  # the FSDP-wrapped LightningModule
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        full = root.state_dict()
    return {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}


def _base_state_dict(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights out of a peft model's state dict (adapters dropped, names unwrapped)."""
    out = {}
    for name, value in peft_state.items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        out[name] = value
    return out


@contextmanager
def _inference_config(model: torch.nn.Module) -> Iterator[None]:
    """Save with ``use_cache=True``: training turns the KV cache off (``build_causal_lm``), but a
    reloaded model should generate with it by default. The training value is restored afterwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        yield
        return
    previous = config.use_cache
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = previous


#: File in an export naming the run that wrote it.
RUN_MARKER = "lit_align_run.json"


def _move_aside_other_run(path: Path, run: str | None) -> None:
    """Rename an export at ``path`` that another run (or an unknown one) wrote to ``<path>.<its run>``."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    marker = path / RUN_MARKER
    try:
        owner = json.loads(marker.read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner is not None and owner == run:
        rank_zero_info(f"replacing this run's earlier export in {path}")
        return
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", owner) if owner else "previous"
    aside, n = path.with_name(f"{path.name}.{label}"), 2
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.{label}-{n}"), n + 1
    os.replace(path, aside)
    rank_zero_warn(f"{path} held the export of {'run ' + owner if owner else 'another run'}; it is kept as "
                   f"{aside} and this run ({run}) exports to {path}")


class HFExport(L.Callback):
    """``save_pretrained`` of the policy (its LoRA adapter when it has one) plus the tokenizer.

    The result loads with plain ``transformers.AutoModelForCausalLM`` (full fine-tuning) or
    ``peft.AutoPeftModelForCausalLM`` (LoRA). A LoRA policy on a base built from scratch (``tiny``)
    has no hub id or directory to point the adapter at, so its base weights are written to
    ``<dirpath>/base_model`` and the adapter config names that directory. With ``merge_lora`` the
    adapter is merged into a copy of the base weights and a plain transformers model is written instead.
    Exported configs have ``use_cache: true`` (training runs without a KV cache; inference wants one).

    The export goes to ``dirpath`` (default ``<default_root_dir>/hf_export``), with a
    ``lit_align_run.json`` naming the run that wrote it (the logger's name and version, i.e. the W&B run
    id). Several runs share a ``default_root_dir``, so an export of *another* run found there (or an export
    of unknown origin) is never overwritten: it is renamed to ``hf_export.<its run>`` (a warning says
    where) and this run's export takes the path. A resumed run (same logger version / W&B id, see
    ``--ckpt_path last``) replaces its own earlier export.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = False) -> None:
        self.dirpath, self.merge_lora = dirpath, merge_lora
        self.path: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: by then Lightning's teardown has moved the model to the CPU, and
        # sharded (FSDP) weights could no longer be gathered over the GPU process group
        self.path = Path(self.dirpath or Path(trainer.default_root_dir) / "hf_export")
        # a multi-policy method says which model is its product (the game: the defender)
        policy = pl_module.export_policy() if hasattr(pl_module, "export_policy") else pl_module.policy
        state = _fsdp1_state_dict(trainer) or _full_state_dict(policy)  # collectives: every rank takes part
        if trainer.global_rank != 0:
            return
        if self.merge_lora and state is not None:
            raise ValueError("HFExport.merge_lora does not support sharded (FSDP) policies: export the adapter "
                             "(merge_lora: false) and merge it afterwards with peft's merge_and_unload")
        if self.merge_lora and hasattr(policy, "merge_and_unload"):
            import copy

            policy = copy.deepcopy(policy).merge_and_unload()
            state = None
        run = run_name(trainer)
        _move_aside_other_run(self.path, run)
        with _inference_config(policy):
            self._save(policy, state, pl_module.tokenizer)
        pl_module.tokenizer.save_pretrained(self.path)
        (self.path / RUN_MARKER).write_text(json.dumps({"run": run, "global_step": trainer.global_step}) + "\n")
        rank_zero_info(f"exported the policy in HF format to {self.path}")

    def _save(self, policy: torch.nn.Module, state: dict[str, torch.Tensor] | None, tokenizer) -> None:
        """Write the policy (and, for a LoRA adapter on a from-scratch base, that base) to ``self.path``."""
        config = getattr(policy, "peft_config", {}).get(getattr(policy, "active_adapter", "default"))
        if config is not None and not config.base_model_name_or_path:
            # a base built from scratch (tiny) exists nowhere else: write it next to the adapter
            base_dir = (self.path / "base_model").resolve()
            base_state = _base_state_dict(state if state is not None else policy.state_dict())
            policy.get_base_model().save_pretrained(base_dir, state_dict=base_state, safe_serialization=True)
            tokenizer.save_pretrained(base_dir)
            config.base_model_name_or_path = str(base_dir)
        progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its stderr writes break rich/Jupyter progress redirection
        try:
            policy.save_pretrained(self.path, state_dict=state, safe_serialization=True)
        finally:
            if progress:
                hf_logging.enable_progress_bar()
