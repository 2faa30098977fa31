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

__all__ = ["RunCost", "load_run_cost", "peak_memory"]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, how)``: on a CUDA device ``torch.cuda.max_memory_allocated`` (tensors the caching allocator
    handed out since the last reset; not the process's whole GPU footprint), else the process's peak resident
    set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS; since the
    process started, so it includes whatever ran before the fit in the same process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "resource.getrusage(RUSAGE_SELF).ru_maxrss"



def load_run_cost(path: str | Path) -> dict[str, Any]:
    """A ``run_cost.json`` written by :class:`RunCost`, plus ``gpu_hours`` (wall seconds x world size / 3600)
    when the run was on a CUDA device."""
    cost = json.loads(Path(path).read_text(encoding="utf-8"))
    if str(cost.get("device", "")).startswith("cuda") and "fit_wall_seconds" in cost:
        cost["gpu_hours"] = cost["fit_wall_seconds"] * int(cost.get("world_size") or 1) / 3600
    return cost

class RunCost(L.Callback):
    """Write ``run_cost.json`` at the end of fit (rank 0): ``fit_wall_seconds`` (``on_fit_start`` to
    ``on_fit_end``, setup and checkpoint saving included), ``peak_memory_bytes`` and ``peak_memory_source``
    (see :func:`peak_memory`; on CUDA the peak statistics are reset at fit start), ``device``, ``global_step``,
    ``world_size``. :class:`~lit_align.methods.UnlearningAssessmentModule` reads it (``unlearned_run_cost``) for
    the efficiency part of its report.

    A resumed fit adds up: the elapsed seconds and the peak memory so far are saved in each checkpoint
    (:meth:`state_dict`) and restored on resume, so ``fit_wall_seconds`` is the sum over every segment of the
    run (the time between the last checkpoint and a crash is lost) and ``peak_memory_bytes`` the largest peak
    of any segment; ``segments`` counts the fits.

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
        self._device: torch.device | None = None
        self._prior_seconds = 0.0
        """Wall seconds of the earlier segments of a resumed run (from the checkpoint)."""
        self._prior_peak = 0
        """Largest peak memory of the earlier segments."""
        self._prior_segments = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._device = time.perf_counter(), pl_module.device
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _totals(self) -> tuple[float, int]:
        """(elapsed seconds over all segments, largest peak bytes) up to now."""
        now = time.perf_counter() - self._start if self._start is not None else 0.0
        peak = peak_memory(self._device)[0] if self._device is not None else 0
        return self._prior_seconds + now, max(self._prior_peak, peak)

    def state_dict(self) -> dict[str, Any]:
        seconds, peak = self._totals()
        return {"fit_wall_seconds": seconds, "peak_memory_bytes": peak,
                "segments": self._prior_segments + (self._start is not None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._prior_seconds = float(state_dict.get("fit_wall_seconds", 0.0))
        self._prior_peak = int(state_dict.get("peak_memory_bytes", 0))
        self._prior_segments = int(state_dict.get("segments", 0))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        self._device = pl_module.device
        seconds, peak = self._totals()
        self.cost = {"fit_wall_seconds": seconds, "peak_memory_bytes": peak,
                     "peak_memory_source": peak_memory(pl_module.device)[1], "device": str(pl_module.device),
                     "global_step": trainer.global_step, "world_size": trainer.world_size,
                     "segments": self._prior_segments + 1}
        if trainer.global_rank != 0:
            return
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "run_cost.json"
        atomic_write_text(self.path, json.dumps(self.cost, indent=1))
