"""Checkpoint files written atomically and read with one clear error.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec transaction that
stages the file in ``$TMPDIR``; when the checkpoint directory is on another filesystem the commit falls
back to copying over the target, so a kill mid-copy leaves a truncated ``last.ckpt`` and no previous
one. Here every file is written as a temporary file in the target's own directory, flushed and
``fsync``-ed, then renamed over the target with ``os.replace`` (atomic within one filesystem): a reader
sees the previous checkpoint or the new one, never a torn file.

* :func:`atomic_save` -- ``torch.save`` of any object (checkpoints, reference caches, masks, averaged
  policies, detector heads); :func:`atomic_write` / :func:`atomic_write_text` -- any bytes or text (reports);
* :class:`AtomicCheckpointIO` -- the Lightning ``CheckpointIO`` built on it; ``lit-align`` installs it
  on every strategy that uses a plain ``TorchCheckpointIO`` (:func:`install_atomic_checkpoint_io`).
  Strategies that write sharded directories (FSDP2 / ``ModelParallelStrategy`` and FSDP's sharded
  state dicts, via torch.distributed.checkpoint) do not go through it and are left as they are;
* :func:`load_checkpoint` -- ``torch.load(weights_only=True)`` that turns an empty, truncated or
  foreign file into one :class:`CheckpointReadError` naming the file and the other checkpoints next to it.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lit_align.errors import ConfigError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointReadError",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "checkpoints_beside",
    "install_atomic_checkpoint_io",
    "load_checkpoint",
]


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write`` on a binary file open in ``path``'s directory, ``fsync``, then ``os.replace`` it onto ``path``.

    The temporary file is ``.<name>.<random>`` (hidden, so checkpoint searches skip it) and is removed if
    the write fails; a killed process may leave one behind, never a torn ``path``. Parent directories are
    created; the file gets the usual umask permissions (``mkstemp``'s 0600 would hide a shared cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`: a reader sees the previous file or the new one, never a torn one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) written to ``path`` through :func:`atomic_write` (reports, JSONL selections)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (best effort: some filesystems refuse ``fsync`` on a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointReadError(ConfigError):
    """A checkpoint file that exists but cannot be read (empty, truncated, not a torch checkpoint)."""


def checkpoints_beside(path: str | Path) -> list[Path]:
    """The other ``*.ckpt`` files in ``path``'s directory, newest first (hidden temporary files skipped)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.name != path.name]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _read_error(path: Path, error: BaseException) -> CheckpointReadError:
    """The one error for an unreadable checkpoint: what is wrong with ``path`` and which file to try instead."""
    size = path.stat().st_size
    if size == 0:
        what = "is empty (0 bytes)"
    elif zipfile.is_zipfile(path) and "unsupported global" in str(error).lower():
        # torch words it "Unsupported global: ..." (an unlisted class) or "Trying to load unsupported
        # GLOBAL os.system whose module os is blocked" (a blocked callable)
        global_line = next((line.strip() for line in str(error).splitlines() if "unsupported global" in line.lower()),
                           "")
        what = (f"holds an object that safe loading (torch.load weights_only=True, which lit_align always uses) "
                f"refuses: {global_line}. If you trust the file, register the class with "
                f"torch.serialization.add_safe_globals before loading")
        return CheckpointReadError(f"checkpoint {path} {what}")
    elif zipfile.is_zipfile(path):
        what = f"is damaged ({size} bytes; {type(error).__name__}: {str(error).splitlines()[0][:160]})"
    else:
        what = (f"is truncated or not a torch checkpoint ({size} bytes, no complete checkpoint archive), "
                f"e.g. a write that was killed or a partial copy")
    others = checkpoints_beside(path)
    if others:
        hint = ("resume from a previous checkpoint instead, e.g. --ckpt_path " + str(others[0])
                + "; others in that directory, newest first: " + ", ".join(p.name for p in others))
    else:
        hint = "no other checkpoint is in that directory; resume from an earlier copy or start the run afresh"
    return CheckpointReadError(f"checkpoint {path} {what}: {hint}")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; an unreadable file raises :class:`CheckpointReadError`.

    ``mmap=True`` maps the tensors instead of reading them (reading a large checkpoint's hyperparameters)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (OSError, MemoryError) as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise _read_error(path, error) from None
    except Exception as error:  # torch raises EOFError, RuntimeError, UnpicklingError, KeyError, ...
        raise _read_error(path, error) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes with :func:`atomic_save` (temporary file in the target directory,
    ``fsync``, ``os.replace``) and reads with :func:`load_checkpoint` (``weights_only=True`` unless the
    caller asks otherwise; an unreadable file gives one :class:`CheckpointReadError`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:  # an explicit request of the caller: Lightning's own loading
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(path, map_location=map_location)


def install_atomic_checkpoint_io(trainer: Any) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` when it uses a plain ``TorchCheckpointIO``.

    Returns whether it was installed. Custom IO plugins (async, XLA, remote) and strategies without a
    ``checkpoint_io`` are left alone; sharded strategies keep their IO object too (their distributed
    checkpoints are directories written by torch.distributed.checkpoint, not through it)."""
    strategy = getattr(trainer, "strategy", None)
    try:
        io = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return False
    if type(io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
