"""Builders: :class:`~lit_align.models.spec.ModelSpec` -> tokenizer, causal LM, LoRA, frozen copies."""

from __future__ import annotations

import copy
import dataclasses
import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from lit_align.errors import ConfigError, MissingPathError
from lit_align.models.from_checkpoint import base_spec, is_checkpoint, policy_state_dict, trained_spec
from lit_align.models.spec import LoRASpec, ModelSpec
from lit_align.modes import eval_mode
from lit_align.paths import hub_offline, looks_local

__all__ = [
    "BUILTIN_MODELS",
    "TINY_TOKENIZER",
    "add_lora_adapter",
    "apply_lora",
    "build_causal_lm",
    "build_tokenizer",
    "eval_mode",
    "freeze",
    "frozen_copy",
    "is_peft_model",
    "lora_config",
    "resolve_path",
]

log = logging.getLogger(__name__)

#: Directory of the bundled byte-level BPE tokenizer (built by ``scripts/build_tokenizer.py``).
TINY_TOKENIZER = str(resources.files("lit_align") / "models" / "assets" / "tiny_tokenizer")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: Directory of the models shipped as package data (``builtin:<name>``; see ``scripts/build_tiny_tofu.py``).
BUILTIN_MODELS = resources.files("lit_align") / "models" / "assets"


def resolve_path(name: str) -> str:
    """``builtin:<name>`` -> the bundled directory; anything else (hub id or directory) unchanged."""
    if not name.startswith("builtin:"):
        return name
    path = BUILTIN_MODELS / name.removeprefix("builtin:")
    if not (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
        known = sorted(f"builtin:{p.name}" for p in BUILTIN_MODELS.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{name!r} is not a built-in model or tokenizer; known: {', '.join(known)}")
    return str(path)


def _check_source(path: str, key: str) -> None:
    """Fail at once, naming the config key, for a local path that does not exist (instead of a minute of hub
    retries for what cannot be a hub id)."""
    if Path(path).expanduser().exists():
        return
    if looks_local(path):
        raise MissingPathError(
            f"{key}={path!r}: no such directory. Give a local directory written by `save_pretrained` "
            "or a hub id of the form `org/name`."
        )


def _load_error(key: str, name: str, what: str, err: Exception) -> Exception:
    """The error for a hub id or directory that could not be loaded (offline: the cache had no copy)."""
    if hub_offline():
        return MissingPathError(
            f"{key}={name!r}: no such local directory, and HF_HUB_OFFLINE is set, so it was looked up in the "
            "local HF cache only (not there). Give a local directory written by `save_pretrained`, or unset "
            "HF_HUB_OFFLINE to download it."
        )
    return MissingPathError(f"{key}={name!r}: could not load {what} ({err}). Offline runs need a local directory "
                            "or a model already in the HF cache.")


def build_tokenizer(spec: ModelSpec, *, key: str = "model", needs_eos: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer named by the spec, with a pad token handled per ``missing_pad_token``.

    ``key`` is the spec's config key, named in errors (``model.alignment_reward.model``). A policy
    ``needs_eos`` (generation stops at it, responses end with it); a classifier or reward model read
    as a whole sequence does not (BERT-family tokenizers have none), so its builders pass ``False``.
    A spec naming a lit_align checkpoint (``.ckpt``) gives the trained run's tokenizer
    (:mod:`lit_align.models.from_checkpoint`).
    """
    if is_checkpoint(spec.name_or_path):
        spec = base_spec(spec, key)
    name = resolve_path(spec.tokenizer or spec.name_or_path or TINY_TOKENIZER)
    key = f"{key}.tokenizer" if spec.tokenizer else f"{key}.name_or_path"
    _check_source(name, key)
    # model.revision pins the model's repo: it applies to a tokenizer read from that same repo only
    revision = spec.revision if (spec.tokenizer or spec.name_or_path) == spec.name_or_path else None
    try:
        # HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import): the cache only, no retries
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=spec.trust_remote_code,
                                            local_files_only=hub_offline())
    except OSError as err:
        raise _load_error(key, name, "a tokenizer", err) from err
    if tok.eos_token_id is None and needs_eos:
        raise ConfigError(f"{key}={name!r}: tokenizer has no eos_token; a policy needs one to end its responses. "
                         "Give a tokenizer with an EOS token (or set it in the tokenizer's config)")
    if tok.pad_token_id is None:
        no_fallback = tok.eos_token_id is None and (spec.missing_pad_token == "eos" or tok.unk_token_id is None)
        if spec.missing_pad_token == "error" or (spec.missing_pad_token in ("eos", "unk") and no_fallback):
            fix = "'add'" if tok.eos_token_id is None else "'eos' or 'add'"
            raise ValueError(f"{key}={name!r}: tokenizer has no pad token; set {key.rsplit('.', 1)[0]}"
                             f".missing_pad_token to {fix}")
        if spec.missing_pad_token == "unk" and tok.unk_token is not None:
            log.warning("tokenizer %s has no pad token: using unk %r as pad (masks come from lengths)", name,
                        tok.unk_token)
            tok.pad_token = tok.unk_token
        elif spec.missing_pad_token in ("eos", "unk"):  # unk: no unk token either (Llama-3), so EOS
            log.warning("tokenizer %s has no pad token: using eos %r as pad (masks come from lengths)", name,
                        tok.eos_token)
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            log.warning("tokenizer %s has no pad token: added <|pad|> (the embeddings are resized)", name)
    return tok


def _tiny_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase):
    arch = spec.tiny
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch.family]
    return cls(
        vocab_size=arch.vocab_size or len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **spec.extra,
    )


def build_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, *, meta: bool = False,
                    key: str = "model") -> nn.Module:
    """Build the base causal LM (no LoRA): tiny random with ``spec.seed``, or ``from_pretrained``.

    With ``meta`` the architecture is built on the meta device without reading any weights (every
    rank but one, when sharded weights are later broadcast from rank 0: see
    :func:`lit_align.models.fsdp.load_from_rank0`).

    A spec naming a lit_align checkpoint (``name_or_path: <run>.ckpt``) builds the trained policy: the run's own
    spec, its policy weights loaded (``torch.load(weights_only=True)``) and its LoRA adapters merged
    (:mod:`lit_align.models.from_checkpoint`); ``key`` is the spec's config key, named in its errors."""
    if is_checkpoint(spec.name_or_path):
        return _from_checkpoint(spec, tokenizer, meta=meta, key=key)
    dtype = _DTYPES[spec.dtype]
    path = resolve_path(spec.name_or_path) if spec.name_or_path is not None else None
    if spec.tiny is not None:
        config = _tiny_config(spec, tokenizer)
        if spec.attn_implementation:
            config._attn_implementation = spec.attn_implementation
        with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif meta:
        _check_source(path, "model.name_or_path")
        config = AutoConfig.from_pretrained(path, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code, **spec.extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation,
                                                     trust_remote_code=spec.trust_remote_code)
    else:
        _check_source(path, "model.name_or_path")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=spec.revision,
                dtype=dtype,
                attn_implementation=spec.attn_implementation,
                trust_remote_code=spec.trust_remote_code,
                **spec.extra,
            )
        except OSError as err:
            raise _load_error("model.name_or_path", spec.name_or_path, "weights", err) from err
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training default; the sampler passes its own cache
    if spec.gradient_checkpointing:
        _checkpoint_activations(model)
    return model


def _checkpoint_activations(model: nn.Module) -> None:
    """Recompute decoder activations in backward (non-reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _from_checkpoint(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, *, meta: bool, key: str) -> nn.Module:
    """The policy of the lit_align checkpoint ``spec.name_or_path``: the run's base built in float32 (when the run
    itself started from a checkpoint, that checkpoint's merged policy, recursively), the run's own LoRA adapters
    applied as in training, its policy weights loaded strictly, the adapters merged, then ``spec.dtype``. With
    ``meta``, the architecture only. ``key`` is the spec's config key, named in errors."""
    trained = trained_spec(spec, key)
    if meta:
        return build_causal_lm(dataclasses.replace(trained, lora=None), tokenizer, meta=True, key=key)
    base = build_causal_lm(dataclasses.replace(trained, dtype="float32", lora=None), tokenizer, key=key)
    policy = apply_lora(base, trained.lora, seed=trained.seed)
    try:
        policy.load_state_dict(policy_state_dict(spec.name_or_path, key), strict=True)
    except RuntimeError as err:
        lora = "no LoRA" if trained.lora is None else f"LoRA r={trained.lora.r}"
        raise ConfigError(f"{key}.name_or_path={spec.name_or_path!r}: the checkpoint's policy weights do not fit "
                          f"the model its hyper-parameters describe ({trained.source}, {lora}: "
                          f"{str(err).splitlines()[0][:200]}); was the checkpoint written by another lit_align "
                          "version? Export it with lit_align.callbacks.HFExport") from err
    model = policy.merge_and_unload() if trained.lora is not None else policy
    model = model.to(_DTYPES[spec.dtype])
    if spec.gradient_checkpointing:
        _checkpoint_activations(model)
    return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft wrapper (has adapters that can be disabled)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def lora_config(lora: LoRASpec):
    """The peft ``LoraConfig`` of a :class:`LoRASpec` (causal-LM task)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
    )


def apply_lora(model: nn.Module, lora: LoRASpec | None, seed: int = 0, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` with LoRA adapters (only adapter weights stay trainable); identity for ``None``.

    The adapters' random initialisation is seeded by ``seed`` (independently of the global RNG), so
    every rank and every resumed run starts from the same adapters. ``adapter_name`` names the adapter
    (several adapters can then share one base: :func:`add_lora_adapter`)."""
    if lora is None:
        return model
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(lora), adapter_name=adapter_name)


def add_lora_adapter(model: nn.Module, name: str, lora: LoRASpec, seed: int = 0) -> None:
    """Add a second, independently initialised (seeded) adapter ``name`` to a peft model: two
    policies on one copy of the base weights (switch with ``model.set_adapter(name)``)."""
    if not is_peft_model(model):
        raise ValueError("add_lora_adapter needs a peft model (apply_lora first)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(name, lora_config(lora))


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with no trainable parameters (references, judges, detectors)."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (the ``copy`` reference mode: costs a second set of weights)."""
    return freeze(copy.deepcopy(model))
