"""A checkpoint every ``n`` training batches, whether or not the batch stepped an optimiser."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from lit_align.checkpoint import AtomicCheckpointIO, install_atomic_checkpoint_io

__all__ = ["BatchCheckpoint"]


class BatchCheckpoint(L.Callback):
    """Write ``<dirpath>/<filename>`` every ``every_n_batches`` training batches, atomically.

    Lightning's ``ModelCheckpoint`` counts optimiser steps (``trainer.global_step``) and never saves twice
    at one step. Manual-optimisation methods with batches that step nothing, such as the generate stages of
    :class:`~lit_align.methods.DebateModule` (minutes of debates and rollouts per batch at 7B scale), would
    then lose every generated batch on a crash. This callback counts batches instead. The file is written
    under a temporary name in its own directory, ``fsync``-ed and renamed (:class:`~lit_align.checkpoint.
    AtomicCheckpointIO`, which this callback installs on a strategy that uses Lightning's plain
    ``TorchCheckpointIO``), so a crash mid-write leaves the previous checkpoint intact, on any filesystem;
    resume with ``--ckpt_path last`` (the newest checkpoint of the root directory) or
    ``ckpt_path=<dirpath>/<filename>``.

    Args:
        every_n_batches: training batches between checkpoints (>= 1).
        dirpath: directory of the checkpoint (default: the ``ModelCheckpoint``'s directory when the trainer
            has one, else ``<default_root_dir>/checkpoints``).
        filename: the checkpoint's file name (one file, overwritten).
    """

    def __init__(self, every_n_batches: int = 1, dirpath: str | None = None, filename: str = "last-batch.ckpt") -> None:
        if isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int) or every_n_batches < 1:
            raise ValueError(f"BatchCheckpoint.every_n_batches must be an int >= 1, got {every_n_batches!r}")
        if not filename or "/" in filename or os.sep in filename:
            raise ValueError(f"BatchCheckpoint.filename must be a plain file name, got {filename!r}")
        self.every_n_batches, self.dirpath, self.filename = every_n_batches, dirpath, filename
        self._batches = 0

    def path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint goes."""
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        model_checkpoint = trainer.checkpoint_callback
        if model_checkpoint is not None and getattr(model_checkpoint, "dirpath", None):
            return Path(model_checkpoint.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_atomic_checkpoint_io(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._batches += 1
        if self._batches % self.every_n_batches or trainer.sanity_checking:
            return
        path = self.path(trainer)
        if isinstance(getattr(trainer.strategy, "checkpoint_io", None), AtomicCheckpointIO):
            # collective: every rank calls, the strategy writes atomically; a full checkpoint (optimisers, loops) to resume
            trainer.save_checkpoint(path, weights_only=False)
            return
        # another IO (sharded directories, a custom plugin): write beside the target, then rename
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("BatchCheckpoint")
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("BatchCheckpoint")
        if trainer.is_global_zero:
            os.replace(tmp, path)
