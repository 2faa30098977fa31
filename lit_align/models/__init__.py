"""Builders: YAML specs -> tokenizers, causal LMs, LoRA, references, reward heads, FSDP2 plans."""

from lit_align.models.causal_lm import (
    TINY_TOKENIZER,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    freeze,
    frozen_copy,
    is_peft_model,
)
from lit_align.models.spec import LoRASpec, ModelSpec, TinyArch

__all__ = [
    "TINY_TOKENIZER",
    "LoRASpec",
    "ModelSpec",
    "TinyArch",
    "apply_lora",
    "build_causal_lm",
    "build_tokenizer",
    "freeze",
    "frozen_copy",
    "is_peft_model",
]
