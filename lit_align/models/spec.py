"""Model specs: small dataclasses that YAML fills in and builders turn into modules.

A spec names either a hub id / local directory (``name_or_path``) or a tiny architecture
(``tiny``) built from scratch with a fixed seed, for CPU tests and the built-in demos::

    model:
      tiny: {family: qwen2, hidden_size: 64, num_layers: 2}
      lora: {r: 8, alpha: 16}

    model:
      name_or_path: Qwen/Qwen2.5-0.5B-Instruct
      dtype: bfloat16
      attn_implementation: sdpa
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lit_align.errors import ConfigError

__all__ = ["LoRASpec", "ModelSpec", "TinyArch"]


@dataclass
class TinyArch:
    """A tiny randomly initialised decoder (Llama or Qwen2 layout) for CPU runs."""

    family: Literal["llama", "qwen2"] = "qwen2"
    """Which HF architecture class to instantiate."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 128
    """MLP width."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is set up for."""
    vocab_size: int | None = None
    """Vocabulary size; ``None`` takes ``len(tokenizer)``."""
    tie_word_embeddings: bool = False
    """Share input embedding and LM head weights."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.tiny.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "model.tiny: hidden_size must be divisible by num_heads and num_heads by num_kv_heads "
                f"(got {self.hidden_size}, {self.num_heads}, {self.num_kv_heads})"
            )


@dataclass
class LoRASpec:
    """LoRA adapters (peft) applied on top of the built model."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or peft's ``"all-linear"`` (every linear layer except the LM head)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter (e.g. ``["score"]``)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"model.lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelSpec:
    """Which causal LM to build and how. Exactly one of ``name_or_path`` and ``tiny``."""

    name_or_path: str | None = None
    """Hub model id (``org/name``), a local directory written by ``save_pretrained``, or a lit_align run's
    single-file checkpoint (``.../checkpoints/last.ckpt``: the trained policy, LoRA merged; see
    :mod:`lit_align.models.from_checkpoint`)."""
    tiny: TinyArch | None = None
    """Build a tiny random model of this architecture instead of loading weights."""
    tokenizer: str | None = None
    """Tokenizer id or directory; default: ``name_or_path``, or the bundled tiny tokenizer for ``tiny``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype. For mixed precision keep float32 here and set ``trainer.precision``."""
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``...; ``None`` lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (non-reentrant)."""
    lora: LoRASpec | None = None
    """LoRA adapters; ``None`` trains all weights."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run. Off unless you trust the repository."""
    missing_pad_token: Literal["eos", "unk", "add", "error"] = "eos"
    """A tokenizer without pad token: reuse EOS as pad (masks never rely on pad ids here), reuse the unk
    token (``unk``, as the C-AdvUL release does; EOS when there is no unk token, e.g. Llama-3), add a
    ``<|pad|>`` token and resize the embeddings, or raise."""
    seed: int = 0
    """Seed of the random initialisation of ``tiny`` models and of LoRA adapters (identical on every rank)."""
    extra: dict = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained`` / the tiny config."""

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.tiny is None):
            raise ConfigError(
                "model: set exactly one of `name_or_path` (hub id or local directory) and `tiny` "
                f"(a tiny architecture); got name_or_path={self.name_or_path!r}, tiny={self.tiny!r}"
            )
        if isinstance(self.tiny, dict):
            self.tiny = TinyArch(**self.tiny)
        if isinstance(self.lora, dict):
            self.lora = LoRASpec(**self.lora)

    @property
    def source(self) -> str:
        """Human-readable name of what is built (used in logs and cache keys)."""
        return self.name_or_path if self.name_or_path is not None else f"tiny-{self.tiny.family}"


# Specs are saved with the hyperparameters in every checkpoint; allow them in weights-only loads
# (``Trainer.fit(ckpt_path=...)`` of a module built in Python).
torch.serialization.add_safe_globals([TinyArch, LoRASpec, ModelSpec])
