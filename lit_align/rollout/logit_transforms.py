"""What a causal LM's own ``forward`` does to its LM head's logits.

:func:`~lit_align.rollout.logps.token_logps` pushes hidden states through the LM head itself, so
it must repeat the post-head transforms that some architectures apply inside ``forward``
(Gemma-2/3 soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...). The table
below was read from each ``...ForCausalLM.forward`` of transformers 5.23; an unknown model type
whose config sets one of these attributes raises instead of being guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LogitTransform", "logit_transform"]

LogitTransform = Callable[[Tensor], Tensor]


def _softcap(cap: float | None) -> LogitTransform | None:
    """``cap * tanh(logits / cap)`` (in that order, as HF's ``forward`` does); None when no cap is set."""
    if cap is None:
        return None
    return lambda logits: torch.tanh(logits / cap) * cap


def _mul(scale: float | None) -> LogitTransform | None:
    if scale is None or scale == 1:
        return None
    return lambda logits: logits * scale


def _div(scale: float | None) -> LogitTransform | None:
    if scale is None or scale == 1:
        return None
    return lambda logits: logits / scale


def _vocab_cut(size: int | None) -> LogitTransform | None:
    """Keep the first ``size`` logits (a vocabulary padded for the LM head's shape)."""
    if size is None:
        return None
    return lambda logits: logits[..., :size]


def _chain(*steps: LogitTransform | None) -> LogitTransform | None:
    steps = tuple(s for s in steps if s is not None)
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def apply(logits: Tensor) -> Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return apply


def _mask_tokens(token_ids: list[int]) -> LogitTransform | None:
    """Set the logits of ``token_ids`` to the smallest float (Chameleon's image tokens)."""
    if not token_ids:
        return None

    def apply(logits: Tensor) -> Tensor:
        index = torch.tensor(token_ids, device=logits.device)
        return logits.index_fill(-1, index, torch.finfo(logits.dtype).min)

    return apply


def _text(config: Any) -> Any:
    """The (decoder-side) text sub-config of a multimodal config; the config itself otherwise."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _chameleon_image_tokens(config: Any) -> list[int]:
    # as ChameleonImageVocabularyMapping.image_tokens
    vocab_map = getattr(config, "vocabulary_map", None) or {}
    return sorted(v for name, v in vocab_map.items() if name.startswith("IMGIMG"))


#: ``config.model_type`` -> the transform its ``...ForCausalLM`` / ``...ForConditionalGeneration.forward``
#: applies after the LM head (transformers 5.23). Where HF's ``forward`` scales the hidden states before
#: a bias-free LM head (MiniCPM3, Inkling), the same scale on the logits is equal up to rounding.
_TRANSFORMS: dict[str, Callable[[Any], LogitTransform | None]] = {
    **dict.fromkeys(
        ("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma", "nanochat", "beam"),
        lambda c: _softcap(c.final_logit_softcapping),
    ),
    **dict.fromkeys(
        ("gemma3n", "gemma4", "gemma4_unified", "paligemma", "mistral_large4"),
        lambda c: _softcap(getattr(_text(c), "final_logit_softcapping", None)),
    ),
    "recurrent_gemma": lambda c: _softcap(c.logits_soft_cap),
    "xlstm": lambda c: _softcap(c.output_logit_soft_cap),
    **dict.fromkeys(
        ("muse_glimmer", "muse_spark"),
        lambda c: _chain(_mul(c.text_config.output_multiplier), _softcap(c.text_config.final_logit_softcapping)),
    ),
    "inkling2_text": lambda c: _chain(_softcap(c.final_logit_softcapping), _vocab_cut(c.unpadded_vocab_size)),
    "inkling2": lambda c: _chain(
        _softcap(c.text_config.final_logit_softcapping), _vocab_cut(c.text_config.unpadded_vocab_size)
    ),
    "inkling_text": lambda c: _chain(_div(c.logits_mup_width_multiplier), _vocab_cut(c.unpadded_vocab_size)),
    "inkling_mm_model": lambda c: _chain(
        _div(c.text_config.logits_mup_width_multiplier), _vocab_cut(c.text_config.unpadded_vocab_size)
    ),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), lambda c: _mul(c.logit_scale)),
    "cohere_compass": lambda c: _mul(c.text_config.logit_scale),
    "falcon_h1": lambda c: _mul(c.lm_head_multiplier),
    "hyperclovax": lambda c: _mul(c.logits_scaling),
    "hyperclovax_vision_v2": lambda c: _mul(c.text_config.logits_scaling),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "minicpm3"),
        lambda c: _div(c.logits_scaling),
    ),
    **dict.fromkeys(("granite4_vision", "granite_docling"), lambda c: _div(c.text_config.logits_scaling)),
    "chameleon": lambda c: _mask_tokens(_chameleon_image_tokens(c)),
    # Their configs (or text sub-configs) carry one of the attributes below, which their forward does not apply.
    **dict.fromkeys(("gemma3", "aya_vision", "cohere2_vision", "granite_speech", "granite_speech_plus", "mpt"),
                    lambda c: None),
}

#: Config attributes that some architecture's ``forward`` turns into a logit transform; set on a model type
#: missing from ``_TRANSFORMS`` they mean we cannot tell what its ``forward`` does. Value: the setting that is
#: a no-op whichever way it were applied (a factor of 1 multiplies or divides alike), besides None.
_TRANSFORM_ATTRS: dict[str, float | None] = {
    "final_logit_softcapping": None,
    "logits_soft_cap": None,
    "output_logit_soft_cap": None,
    "unpadded_vocab_size": None,
    "logit_scale": 1,
    "logits_scaling": 1,
    "lm_head_multiplier": 1,
    "output_multiplier": 1,
    "logits_mup_width_multiplier": 1,
}


def logit_transform(base: nn.Module) -> LogitTransform | None:
    """What ``base.forward`` does to the LM head's logits, as a function of (n, V) logits; None for nothing.

    Read from ``base.config`` (see the module docstring for the architectures). Raises
    ``NotImplementedError`` for a ``model_type`` not in ``_TRANSFORMS`` whose config (or text
    sub-config) sets an attribute that other architectures apply to the logits.
    """
    config = getattr(base, "config", None)
    if config is None:
        return None
    model_type = getattr(config, "model_type", None)
    if model_type in _TRANSFORMS:
        return _TRANSFORMS[model_type](config)
    for cfg in (config, _text(config)):
        for attr, no_op in _TRANSFORM_ATTRS.items():
            value = getattr(cfg, attr, None)
            if value is not None and value != no_op:
                raise NotImplementedError(
                    f"{type(base).__name__} (model_type {model_type!r}) sets {attr}={value!r} in its config; "
                    "lit_align.rollout.logps does not know whether or how its forward applies it to the logits"
                )
    return None
