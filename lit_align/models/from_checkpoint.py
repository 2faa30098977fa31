"""Model specs that name a lit_align training checkpoint: ``name_or_path: <run>/checkpoints/last.ckpt``.

A single-file Lightning checkpoint of an unsharded run keeps the method's hyper-parameters (its ``model`` spec,
as the run was configured) and the policy's weights (``state_dict`` entries ``policy.*``, LoRA adapters
included). :func:`trained_spec` reads that spec back; :func:`policy_state_dict` the weights; the builders of
:mod:`lit_align.models.causal_lm` turn them into the trained policy, LoRA merged, so evaluation code (FEWL, the
summarisation harness, the unlearning assessment) takes a checkpoint wherever it takes a hub id or a directory::

    evaluated:
      sft: {name_or_path: outputs/sft-tiny/version_0/checkpoints/last.ckpt}

Fields of the spec that names the checkpoint: ``dtype``, ``attn_implementation`` and ``gradient_checkpointing``
apply to the rebuilt model; ``tokenizer`` replaces the trained tokenizer when set; ``lora`` and ``seed`` give new
adapters on top of the merged policy (training from the checkpoint); ``revision``, ``trust_remote_code``,
``missing_pad_token`` and ``extra`` are the trained spec's. A run's base model that is a hub id is loaded again
(from the HF cache) before the checkpoint's weights replace it.

Sharded checkpoints (FSDP2 / ``ModelParallelStrategy``: a torch.distributed.checkpoint *directory*) are refused
with the fix: export the policy in HF format (:class:`lit_align.callbacks.HFExport`) and give that directory.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from lit_align.checkpoint import load_checkpoint
from lit_align.errors import ConfigError, MissingPathError
from lit_align.models.spec import LoRASpec, ModelSpec, TinyArch

__all__ = ["POLICY_PREFIX", "base_spec", "is_checkpoint", "policy_state_dict", "trained_spec"]

#: The state-dict prefix of a single-policy method's policy (``PolicyModule.policy``).
POLICY_PREFIX = "policy."
_SUFFIX = ".ckpt"


def is_checkpoint(name: str | None) -> bool:
    """Whether a spec's ``name_or_path`` names a lit_align / Lightning checkpoint: a path ending in ``.ckpt``, or
    a directory written by torch.distributed.checkpoint (it holds a ``.metadata`` file)."""
    if not name or name.startswith("builtin:"):
        return False
    path = Path(name).expanduser()
    return name.rstrip("/").endswith(_SUFFIX) or (path.is_dir() and (path / ".metadata").is_file())


def _checked_path(name: str, key: str) -> Path:
    """The checkpoint file, or an error naming ``key``: missing path, or a sharded (DCP) directory."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise ConfigError(
            f"{key}={name!r} is a sharded checkpoint directory (torch.distributed.checkpoint, written by FSDP2 / "
            "ModelParallelStrategy runs); a model spec reads single-file checkpoints only. Export the policy in HF "
            "format first: add lit_align.callbacks.HFExport to the run's trainer.callbacks (it writes "
            "<default_root_dir>/hf_export at the end of fit) and give that directory as name_or_path")
    if not path.is_file():
        raise MissingPathError(f"{key}={name!r}: no such checkpoint file; give the .ckpt file of a lit_align run "
                               "(e.g. <default_root_dir>/<name>/<version>/checkpoints/last.ckpt)")
    return path


@functools.lru_cache(maxsize=8)
def _saved(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], str | None]:
    """``(hyper_parameters, method class path)`` of a checkpoint file (tensors memory-mapped, not read); cached by
    path, modification time and size, so a tokenizer and a model built from one spec read the file once."""
    checkpoint = load_checkpoint(path, mmap=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    return hparams, hparams.get("_class_path")


def _spec_from(value: Any, path: Path, key: str, method: str | None) -> ModelSpec:
    """The checkpoint's ``model`` hyper-parameter as a :class:`ModelSpec` (a dumped dict or a spec object)."""
    if isinstance(value, ModelSpec):
        return value
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    if not isinstance(value, dict) or not ({"name_or_path", "tiny"} & set(value)) or set(value) - fields:
        what = f" of {method}" if method else ""
        raise ConfigError(
            f"{key}={str(path)!r}: the checkpoint{what} has no causal-LM `model` spec in its hyper-parameters "
            f"(found {type(value).__name__}: {str(value)[:120]}), so it is not a single-policy run whose policy a model "
            "spec can rebuild. Export the model in HF format (lit_align.callbacks.HFExport) and give that directory")
    value = dict(value)
    if isinstance(value.get("tiny"), dict):
        value["tiny"] = TinyArch(**value["tiny"])
    if isinstance(value.get("lora"), dict):
        value["lora"] = LoRASpec(**value["lora"])
    return ModelSpec(**value)


def _beside(name: str | None, checkpoint: Path) -> str | None:
    """A saved spec's relative checkpoint path ``name`` as a path beside ``checkpoint`` when a file is there (a
    run that started from a checkpoint saved the path relative to its own working directory, which is usually
    the same folder tree); anything else unchanged."""
    if not name or not is_checkpoint(name) or Path(name).expanduser().is_absolute():
        return name
    candidate = checkpoint.parent / name
    return str(candidate) if candidate.exists() else name


def trained_spec(spec: ModelSpec, key: str = "model") -> ModelSpec:
    """The spec a checkpoint-naming ``spec`` builds: the run's own ``model`` spec (its architecture or hub id,
    its tokenizer, its LoRA adapters, which :func:`lit_align.models.build_causal_lm` merges), with ``spec``'s
    ``dtype`` / ``attn_implementation`` / ``tokenizer`` where it sets them. ``key`` is named in errors.

    A run that itself started from another run's checkpoint saved a spec naming that checkpoint; it is returned
    as saved (its own ``lora`` and ``seed`` kept), so its ``name_or_path`` is again a checkpoint: the builders
    build that one's merged policy as the base, then apply this run's adapters (:func:`base_spec` gives the
    innermost spec). A saved relative checkpoint path is resolved against the checkpoint's folder (where it is
    found there), so a chain resolves from any working directory."""
    path = _checked_path(spec.name_or_path, f"{key}.name_or_path")
    stat = path.stat()
    hparams, method = _saved(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if "model" not in hparams:
        raise ConfigError(f"{key}.name_or_path={spec.name_or_path!r}: the checkpoint holds no `model` "
                          f"hyper-parameter (found: {sorted(hparams)[:10]}); give the checkpoint of a lit_align "
                          "single-policy run, or its HF export (lit_align.callbacks.HFExport)")
    saved = _spec_from(hparams["model"], path, f"{key}.name_or_path", method)
    saved = dataclasses.replace(saved, name_or_path=_beside(saved.name_or_path, path))
    return dataclasses.replace(saved, dtype=spec.dtype, tokenizer=spec.tokenizer or saved.tokenizer,
                               attn_implementation=spec.attn_implementation or saved.attn_implementation,
                               gradient_checkpointing=False)


def base_spec(spec: ModelSpec, key: str = "model") -> ModelSpec:
    """The innermost non-checkpoint spec of a chain of checkpoints (:func:`trained_spec` until ``name_or_path``
    is no checkpoint): the architecture / hub id and tokenizer every run of the chain started from. A chain that
    names a checkpoint twice (a saved spec naming its own file) is a ConfigError, not an endless loop."""
    seen: list[str] = []
    while spec.name_or_path is not None and is_checkpoint(spec.name_or_path):
        path = str(Path(spec.name_or_path).expanduser().resolve())
        if path in seen:
            raise ConfigError(f"{key}.name_or_path: the chain of checkpoints {' -> '.join(seen + [path])} repeats "
                              f"{path!r}; a checkpoint's saved `model` spec must name the run it started from, not "
                              "itself or a later one (export the model with lit_align.callbacks.HFExport instead)")
        seen.append(path)
        spec = trained_spec(spec, key)
    return spec


def policy_state_dict(name: str, key: str = "model") -> dict[str, torch.Tensor]:
    """The policy's weights in the checkpoint ``name`` (``state_dict`` entries ``policy.*``, prefix removed; LoRA
    adapters included); an error naming ``key`` when it has none. The file is memory-mapped: only the policy's
    tensors are read (not the optimizer state)."""
    path = _checked_path(name, f"{key}.name_or_path")
    state = load_checkpoint(path, mmap=True).get("state_dict") or {}
    policy = {k.removeprefix(POLICY_PREFIX): v for k, v in state.items() if k.startswith(POLICY_PREFIX)}
    if not policy:
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        raise ConfigError(f"{key}.name_or_path={name!r}: the checkpoint has no policy weights (state_dict keys "
                          f"`{POLICY_PREFIX}*`; found prefixes {prefixes}); export the model with "
                          "lit_align.callbacks.HFExport and give that directory")
    return policy
