"""Export the trained policy in Hugging Face format at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["HFExport"]


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Gathered CPU state dict when parameters are sharded (FSDP2 DTensors), else None."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class HFExport(L.Callback):
    """``save_pretrained`` of the policy (its LoRA adapter when it has one) plus the tokenizer.

    The result loads with plain ``transformers.AutoModelForCausalLM`` (full fine-tuning) or
    ``peft.AutoPeftModelForCausalLM`` (LoRA). With ``merge_lora`` the adapter is merged into a
    copy of the base weights and a plain transformers model is written instead.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = False) -> None:
        self.dirpath, self.merge_lora = dirpath, merge_lora
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self.path = Path(self.dirpath or Path(trainer.default_root_dir) / "hf_export")
        policy = pl_module.policy
        state = _full_state_dict(policy)  # collective: every rank takes part
        if trainer.global_rank != 0:
            return
        if self.merge_lora and hasattr(policy, "merge_and_unload"):
            import copy

            policy = copy.deepcopy(policy).merge_and_unload()
            state = None
        policy.save_pretrained(self.path, state_dict=state, safe_serialization=True)
        pl_module.tokenizer.save_pretrained(self.path)
        rank_zero_info(f"exported the policy in HF format to {self.path}")
