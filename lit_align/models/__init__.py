"""Builders: YAML specs -> tokenizers, causal LMs, LoRA, references, reward heads, FSDP2 plans."""

from lit_align.models.causal_lm import (
    BUILTIN_MODELS,
    TINY_TOKENIZER,
    add_lora_adapter,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    freeze,
    frozen_copy,
    is_peft_model,
    resolve_path,
)
from lit_align.models.from_checkpoint import is_checkpoint, trained_spec
from lit_align.models.players import PlayerPolicies
from lit_align.models.reference import ReferenceMode, ReferencePolicy, model_fingerprint
from lit_align.models.reward import RewardModel, RewardModelSpec, build_reward_model, last_token_index
from lit_align.models.spec import LoRASpec, ModelSpec, TinyArch
from lit_align.models.value import CriticSpec, ValueModel, build_critic, build_value_model

__all__ = [
    "BUILTIN_MODELS",
    "CriticSpec",
    "LoRASpec",
    "ModelSpec",
    "PlayerPolicies",
    "ReferenceMode",
    "ReferencePolicy",
    "RewardModel",
    "RewardModelSpec",
    "TINY_TOKENIZER",
    "TinyArch",
    "ValueModel",
    "build_critic",
    "add_lora_adapter",
    "apply_lora",
    "build_causal_lm",
    "build_reward_model",
    "build_tokenizer",
    "build_value_model",
    "freeze",
    "frozen_copy",
    "is_checkpoint",
    "is_peft_model",
    "last_token_index",
    "model_fingerprint",
    "resolve_path",
    "trained_spec",
]
