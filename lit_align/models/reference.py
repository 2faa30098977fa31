"""The reference policy in three modes, so a method never holds two copies when one will do.

* ``precomputed``: per-example reference log-probs computed once before the first step, kept
  in memory (and in checkpoints, so a resumed run never recomputes them from trained weights),
  and cached on disk under a key made of the model's weight fingerprint, the tokenized
  dataset's fingerprint and the lit_align version: a changed model or dataset misses the cache.
* ``adapter``: the policy with its LoRA adapters disabled (needs ``model.lora``).
* ``copy``: a frozen deep copy of the starting weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lit_align.data.batches import SequenceBatch
from lit_align.models.causal_lm import frozen_copy, is_peft_model
from lit_align.rollout.logps import TokenLogps, token_logps

__all__ = ["ReferenceMode", "ReferencePolicy", "atomic_save", "model_fingerprint"]

ReferenceMode = Literal["precomputed", "adapter", "copy"]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and raw bytes.

    Any change of weights changes it (one element by one ulp, or two elements swapped, which
    sums and sums of squares would miss); it is one pass with one parameter on the CPU at a time,
    and identical on every rank and device when computed before sharding."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ReferencePolicy(nn.Module):
    """Reference log-probs for a policy, in one of three modes (see module docstring).

    A method registers it as a submodule (so a ``copy`` moves with the module) and calls
    :meth:`attach` in ``configure_model`` with the base model, before LoRA is applied.
    """

    def __init__(self, mode: ReferenceMode) -> None:
        super().__init__()
        if mode not in ("precomputed", "adapter", "copy"):
            raise ValueError(f"reference must be 'precomputed', 'adapter' or 'copy', got {mode!r}")
        self.mode = mode
        self.copy: nn.Module | None = None
        #: split -> (N, K) summed reference log-probs and (N, K) scored-token counts, K sequences per example
        self.tables: dict[str, tuple[Tensor, Tensor]] = {}

    def attach(self, base_model: nn.Module, lora_enabled: bool) -> None:
        """Set up from the starting weights (called once, before adapters are added)."""
        if self.mode == "adapter" and not lora_enabled:
            raise ValueError("reference: 'adapter' needs LoRA adapters to disable; set model.lora or use "
                             "reference: precomputed / copy")
        if self.mode == "copy" and self.copy is None:
            self.copy = frozen_copy(base_model)

    @torch.no_grad()
    def token_logps(self, policy: nn.Module, batch: SequenceBatch) -> TokenLogps:
        """Reference per-token log-probs of ``batch`` (``adapter`` and ``copy`` modes)."""
        if self.mode == "copy":
            model, ctx = self.copy, nullcontext()
        elif self.mode == "adapter":
            if not is_peft_model(policy):
                raise ValueError("reference: 'adapter' needs a peft policy")
            model, ctx = policy, policy.disable_adapter()
        else:
            raise RuntimeError("precomputed references are looked up with `lookup`, not recomputed")
        with ctx:
            return token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)

    # -- precomputed ---------------------------------------------------------------------------
    def lookup(self, split: str, index: Tensor, column: int, reduction: Literal["sum", "mean"]) -> Tensor:
        """(B,) cached reference log-probs of sequence ``column`` for the examples ``index``."""
        if split not in self.tables:
            raise RuntimeError(f"no precomputed reference log-probs for split {split!r}; was precompute run?")
        sums, counts = self.tables[split]
        s, c = sums[index.to(sums.device), column], counts[index.to(sums.device), column]
        return s if reduction == "sum" else s / c.clamp(min=1)

    @staticmethod
    def cache_key(model_fp: str, data_fp: str) -> str:
        from lit_align import __version__

        return hashlib.sha256(f"{model_fp}|{data_fp}|lit_align={__version__}".encode()).hexdigest()[:32]

    def load_cache(self, path: Path) -> bool:
        if not path.is_file():
            return False
        self.tables = torch.load(path, map_location="cpu", weights_only=True)
        return True

    def save_cache(self, path: Path) -> None:
        atomic_save(self.tables, path)

    def state(self) -> dict:
        """What a checkpoint keeps (the tables are tiny: two numbers per sequence)."""
        return {"mode": self.mode, "tables": {k: (s.cpu(), c.cpu()) for k, (s, c) in self.tables.items()}}

    def load_state(self, state: dict) -> None:
        self.tables = {k: (s, c) for k, (s, c) in state["tables"].items()}
