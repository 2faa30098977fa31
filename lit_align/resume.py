"""What ``--ckpt_path`` means to ``lit-align``: which file, which run, which hyperparameters.

LightningCLI on its own resolves ``--ckpt_path last`` inside the *new* run's checkpoint folder (every W&B
run gets a new id, so it finds nothing and restarts from step 0), and lets the checkpoint's
hyperparameters override the config and the command line. ``lit-align`` instead applies these rules,
before any class is instantiated (:func:`prepare_resume`):

1. ``last`` is the newest ``*.ckpt`` file (by modification time: ``last.ckpt``, ``last-batch.ckpt``
   of :class:`~lit_align.callbacks.BatchCheckpoint`, step and best checkpoints) under
   ``trainer.default_root_dir`` and the ``dirpath`` of any configured callback. None found: a warning,
   and the run starts fresh (so ``--ckpt_path last`` can always be given).
2. ``fit`` from a checkpoint at ``<save_dir>/<name>/<version>/checkpoints/<file>`` where ``<save_dir>``
   is the logger's directory of this config resumes *that run*: the logger gets its ``version`` (the W&B
   run id for W&B loggers, with ``resume="allow"``) and name (the W&B project), so metrics, the W&B run,
   and ``ModelCheckpoint``'s best-checkpoint tracking continue in the same folder. A checkpoint from
   anywhere else starts a new run in this config's root, from that checkpoint's state.
3. A checkpoint of another method (``model.class_path`` differs) or of another model (a model spec
   differs: ``name_or_path``, ``tiny``, ``lora``, ``dtype``, ... of the policy or of any other model spec;
   ``gradient_checkpointing`` and ``attn_implementation`` may change) is refused, naming both.
4. Any other hyperparameter that differs takes the config / command-line value, and each changed key
   is announced as ``key: old -> new``.
5. An unreadable checkpoint raises one :class:`~lit_align.checkpoint.CheckpointReadError` naming the file
   and the other checkpoints beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_align.checkpoint import load_checkpoint
from lit_align.cli_parser import import_class_path
from lit_align.errors import ConfigError, MissingPathError

__all__ = [
    "HparamChange",
    "ResumeError",
    "RUNTIME_SPEC_FIELDS",
    "changed_hparams",
    "find_latest_checkpoint",
    "prepare_resume",
    "run_of_checkpoint",
]

#: Model-spec fields that change how a model runs, not which model it is: they may differ on resume.
RUNTIME_SPEC_FIELDS = frozenset({"gradient_checkpointing", "attn_implementation"})
_ABSENT = "<absent>"


class ResumeError(ConfigError):
    """A checkpoint that does not belong to this config (another method or another model)."""


@dataclass(frozen=True)
class HparamChange:
    """One hyperparameter that differs between the checkpoint and the config."""

    key: str
    """Dotted config key, e.g. ``model.init_args.loss.init_args.beta``."""
    old: Any
    """The checkpoint's value."""
    new: Any
    """The config / command-line value, which the run uses."""

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def find_latest_checkpoint(roots: Iterable[str | os.PathLike]) -> Path | None:
    """The newest ``*.ckpt`` file (by mtime) under any of ``roots``; hidden files (temporaries) are skipped."""
    found: dict[Path, float] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in root.rglob("*.ckpt"):
            if path.name.startswith(".") or not path.is_file():
                continue
            found[path.resolve() if not path.is_symlink() else path.absolute()] = path.stat().st_mtime
    return max(found, key=found.get) if found else None


def run_of_checkpoint(ckpt: str | os.PathLike, save_dir: str | os.PathLike) -> tuple[str | None, str] | None:
    """``(name, version)`` when ``ckpt`` is ``<save_dir>/<name>/<version>/checkpoints/<file>`` (``name`` is
    None for ``<save_dir>/<version>/checkpoints/<file>``, a logger with ``name: null``), else None."""
    ckpt = Path(ckpt).absolute()
    if ckpt.parent.name != "checkpoints" or len(ckpt.parents) < 4:
        return None
    save_dir = Path(save_dir).resolve()
    if ckpt.parents[3].resolve() == save_dir:
        return ckpt.parents[2].name, ckpt.parents[1].name
    if ckpt.parents[2].resolve() == save_dir:
        return None, ckpt.parents[1].name
    return None


def _flat_model_hparams(model: dict[str, Any]) -> dict[str, Any]:
    """A dumped ``model`` config (``class_path`` / ``init_args`` / ``dict_kwargs``) in the layout Lightning
    stores in checkpoints: ``{"_class_path": ..., **init_args}``."""
    if "class_path" not in model:
        return dict(model)
    return {"_class_path": model["class_path"], **(model.get("init_args") or {}), **(model.get("dict_kwargs") or {})}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _model_specs(hparams: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """Every model spec in ``hparams`` (a dict with ``name_or_path`` and ``tiny``), by dotted key."""
    specs: dict[str, dict[str, Any]] = {}
    for key, value in hparams.items():
        if not isinstance(value, dict):
            continue
        if "name_or_path" in value and "tiny" in value:
            specs[f"{prefix}.{key}"] = value
        else:
            specs.update(_model_specs(value, f"{prefix}.{key}"))
    return specs


def changed_hparams(saved: dict[str, Any], model: dict[str, Any], ckpt: str | os.PathLike) -> list[HparamChange]:
    """The hyperparameters of ``model`` (the dumped config's ``model`` entry) that differ from ``saved``
    (a checkpoint's ``hyper_parameters``). Raises :class:`ResumeError` for another method or model."""
    saved = {k: v for k, v in saved.items() if k != "_instantiator"}
    current = _flat_model_hparams(model)
    old_class, new_class = saved.get("_class_path"), current.get("_class_path")
    if old_class and new_class and old_class != new_class:
        raise ResumeError(
            f"checkpoint {ckpt} was written by {old_class}, but model.class_path is {new_class}: resume it with "
            f"the config of {old_class.rsplit('.', 1)[-1]}, or give a checkpoint of {new_class.rsplit('.', 1)[-1]}. "
            f"To start {new_class.rsplit('.', 1)[-1]} from the other method's weights, export them (HFExport) and "
            f"set model.init_args.model.name_or_path to the export instead of --ckpt_path")
    prefix = "model.init_args"
    old_specs, new_specs = _model_specs(saved, prefix), _model_specs(current, prefix)
    for key in sorted(set(old_specs) | set(new_specs)):
        old = {k: v for k, v in (old_specs.get(key) or {}).items() if k not in RUNTIME_SPEC_FIELDS}
        new = {k: v for k, v in (new_specs.get(key) or {}).items() if k not in RUNTIME_SPEC_FIELDS}
        diffs = _diff(_flatten(old, key), _flatten(new, key))
        if diffs:
            raise ResumeError(
                f"checkpoint {ckpt} holds another model than the config: {'; '.join(map(str, diffs))} "
                f"(checkpoint -> config). Resume with the model the checkpoint was trained with, or start a new "
                f"run (without --ckpt_path) to train this model")
    # what differs inside a model spec now can only be a runtime field: it is applied like the rest
    changes = _diff(_flatten(saved, prefix), _flatten(current, prefix))
    return [c for c in changes if c.key != f"{prefix}._class_path"]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[HparamChange]:
    changes = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if _normalise(a) != _normalise(b):
            changes.append(HparamChange(key, a, b))
    return changes


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (YAML dumps and checkpoints disagree on which one they hold)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _is_wandb(class_path: str) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    cls = import_class_path(class_path)
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def _is_csv(class_path: str) -> bool:
    from lightning.pytorch.loggers import CSVLogger

    cls = import_class_path(class_path)
    return isinstance(cls, type) and issubclass(cls, CSVLogger)


def _keep_csv_metrics(run_dir: Path, step: int) -> None:
    """Lightning's CSVLogger deletes an existing ``metrics.csv`` when it opens a run folder again; the rows
    written before the resume are kept as ``metrics-before-step-<step of the checkpoint>.csv`` instead."""
    metrics = run_dir / "metrics.csv"
    kept, n = run_dir / f"metrics-before-step-{step}.csv", 2
    while kept.exists():
        kept, n = run_dir / f"metrics-before-step-{step}-{n}.csv", n + 1
    try:
        os.replace(metrics, kept)
    except FileNotFoundError:  # no metrics yet, or another rank moved them first
        return
    rank_zero_info(f"kept the metrics logged before this resume in {kept}")


def _logger_save_dir(logger: Any, wandb: bool, default_root_dir: str) -> Path:
    """Where the logger's ``<name>/<version>/`` folders go (as :class:`~lit_align.cli.LitAlignCLI` sets it)."""
    init = logger.get("init_args") or {}
    if wandb:
        where = init.get("save_dir") or init.get("dir") or os.environ.get("WANDB_DIR") or default_root_dir
    else:
        where = init.get("save_dir") or default_root_dir
    return Path(where or ".")


def _search_roots(config: Any) -> list[Path]:
    roots = [Path(config.trainer.default_root_dir or ".")]
    callbacks = config.trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        dirpath = (getattr(callback, "init_args", None) or {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath:
            roots.append(Path(dirpath))
    return roots


def _resume_run(config: Any, ckpt: Path, step: int) -> None:
    """Point the (single) logger at the checkpoint's run folder when the checkpoint lies in this root."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if len(logger) == 1 else None
    if logger is None or not hasattr(logger, "get") or not logger.get("class_path"):
        return
    wandb = _is_wandb(logger.class_path)
    save_dir = _logger_save_dir(logger, wandb, config.trainer.default_root_dir)
    run = run_of_checkpoint(ckpt, save_dir)
    if run is None:
        rank_zero_info(f"resuming from {ckpt}, which lies outside this config's run folders ({save_dir}): "
                       f"a new run starts from its state")
        return
    name, version = run
    init = logger.init_args
    if wandb:
        init.project, init.id = name or init.get("project"), version
        if init.get("version"):
            init.version = version
    else:
        init.name, init.version = name, version
    if _is_csv(logger.class_path):
        _keep_csv_metrics(ckpt.parents[1], step)
    kind = "W&B run" if wandb else "run version"
    rank_zero_info(f"resuming {kind} {version} in {ckpt.parents[1]} from {ckpt.name}")


def prepare_resume(config: Any, subcommand: str, dump_model: Any) -> dict[str, Any] | None:
    """Apply the module docstring's rules to ``config`` (the subcommand's namespace, edited in place).

    Args:
        config: the parsed config of the subcommand (``ckpt_path``, ``trainer``, ``model``).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        dump_model: a callable returning the config's ``model`` entry as plain data (the YAML dump).

    Returns the checkpoint's hyperparameters (None when there is no checkpoint to read)."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        roots = _search_roots(config)
        latest = find_latest_checkpoint(roots)
        if latest is None:
            rank_zero_warn(f"--ckpt_path last: no checkpoint (*.ckpt) under {', '.join(map(str, roots))}; "
                           f"starting a fresh run")
            config.ckpt_path = None
            return None
        rank_zero_info(f"--ckpt_path last: the newest checkpoint under {roots[0]} is {latest}")
        config.ckpt_path = ckpt_path = str(latest)
    path = Path(ckpt_path)
    if not path.exists():
        if str(ckpt_path) in ("best", "hpc") or "://" in str(ckpt_path):
            return None  # Lightning's own special values and remote paths
        raise MissingPathError(f"--ckpt_path {ckpt_path}: no such file; give a checkpoint file or 'last'")
    if not path.is_file():
        return None  # a sharded (distributed checkpoint) directory: the strategy reads it
    checkpoint = load_checkpoint(path, mmap=True)  # the weights are not read here, only mapped
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams:
        for change in changed_hparams(hparams, dump_model(), path):
            rank_zero_warn(f"hyperparameter changed since checkpoint {path.name} (the config / command-line value is "
                           f"used): {change}")
    if subcommand == "fit":
        _resume_run(config, path, int(checkpoint.get("global_step", 0)))
    return hparams
