"""What a fit cost: wall time and peak memory, written as ``run_cost.json`` for the unlearning assessment."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_align.checkpoint import atomic_write_text

__all__ = ["RunCost", "peak_memory"]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, how)``: on a CUDA device ``torch.cuda.max_memory_allocated`` (tensors the caching allocator
    handed out since the last reset; not the process's whole GPU footprint), else the process's peak resident
    set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS; since the
    process started, so it includes whatever ran before the fit in the same process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "resource.getrusage(RUSAGE_SELF).ru_maxrss"


class RunCost(L.Callback):
    """Write ``run_cost.json`` at the end of fit (rank 0): ``fit_wall_seconds`` (``on_fit_start`` to
    ``on_fit_end``, setup and checkpoint saving included), ``peak_memory_bytes`` and ``peak_memory_source``
    (see :func:`peak_memory`; on CUDA the peak statistics are reset at fit start), ``device``, ``global_step``,
    ``world_size``. :class:`~lit_align.methods.UnlearningAssessmentModule` reads it (``unlearned_run_cost``) for
    the efficiency part of its report.

    The file goes to ``dirpath`` (default ``trainer.default_root_dir``, next to ``hf_export``). Callbacks run in
    list order: put this one first so that the fit-start work of the others (e.g. ``WeightMask``'s attribution)
    is in the wall time.

    Example::

        trainer:
          callbacks:
            - class_path: lit_align.callbacks.RunCost
            - class_path: lit_align.callbacks.HFExport
    """

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: where ``run_cost.json`` goes (default ``trainer.default_root_dir``).
        """
        self.dirpath = dirpath
        self.path: Path | None = None
        """The file written (rank 0), after fit."""
        self.cost: dict[str, Any] = {}
        """What the file holds."""
        self._start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        peak, source = peak_memory(pl_module.device)
        self.cost = {"fit_wall_seconds": time.perf_counter() - self._start, "peak_memory_bytes": peak,
                     "peak_memory_source": source, "device": str(pl_module.device),
                     "global_step": trainer.global_step, "world_size": trainer.world_size}
        if trainer.global_rank != 0:
            return
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "run_cost.json"
        atomic_write_text(self.path, json.dumps(self.cost, indent=1))
