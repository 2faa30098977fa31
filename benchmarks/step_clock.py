"""A Lightning callback that writes the wall-clock time of every training batch, per rank, for the benchmarks.

``multiplayer_scaling.py`` and ``step_time.py`` add it to a real ``lit-align fit`` run (``--trainer.callbacks
step_clock.StepClock``, with this file's folder on ``PYTHONPATH``); it depends on Lightning only, so the same
file also times the code of an older commit. Each rank appends one JSON line per batch to
``<out_dir>/rank<global_rank>.jsonl``::

    {"batch": 0, "start": 12.3, "end": 14.1, "samples": 16, "stage": "generate"}

``start`` / ``end`` are ``time.perf_counter()`` at ``on_train_batch_start`` / ``on_train_batch_end`` of that
rank (comparable within one file only), ``samples`` the rank's batch length, ``stage`` the module's
``phase_state.stage`` when the batch started (the debate's ``generate`` / ``train``; ``null`` for methods
without one). With ``stop_after`` the run stops after that many batches; with ``stage`` it also stops after
the first batch of another stage once a batch of ``stage`` was seen (the debate's generate stage ends). At the
start of training each rank also writes ``meta_rank<r>.json``: ``{"module_file": ...}``, the source file of the
LightningModule's class, which tells the harness which source tree ran.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import lightning as L

__all__ = ["StepClock", "batch_length"]


def batch_length(batch) -> int | None:
    """Examples in a training batch: ``len`` of a sized batch, the first dimension of its first tensor for a
    mapping, ``None`` when neither applies."""
    if isinstance(batch, dict):
        for value in batch.values():
            if hasattr(value, "shape") and len(value.shape) > 0:
                return int(value.shape[0])
            if isinstance(value, (list, tuple)):
                return len(value)
        return None
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if len(batch.shape) > 0 else None
    try:
        return len(batch)
    except TypeError:
        return None


class StepClock(L.Callback):
    """Write each training batch's start and end time, batch length and stage to ``out_dir/rank<r>.jsonl``."""

    def __init__(self, out_dir: str, stop_after: int = 0, stage: str | None = None) -> None:
        """
        Args:
            out_dir: folder for the per-rank ``rank<r>.jsonl`` files (created).
            stop_after: stop the run after this many training batches (0: never).
            stage: stop after the first batch of another stage once a batch of this stage ran.
        """
        self.out_dir, self.stop_after, self.stage = Path(out_dir), stop_after, stage
        self._count, self._seen_stage = 0, False
        self._start, self._stage = 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"module_file": inspect.getfile(type(pl_module)), "world_size": trainer.world_size}
        (self.out_dir / f"meta_rank{trainer.global_rank}.json").write_text(json.dumps(meta))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = getattr(pl_module, "phase_state", None)
        self._stage = getattr(state, "stage", None)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        row = {"batch": self._count, "start": self._start, "end": end, "samples": batch_length(batch),
               "stage": self._stage}
        with (self.out_dir / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._count += 1
        if self.stage is not None:
            if self._stage == self.stage:
                self._seen_stage = True
            elif self._seen_stage:
                trainer.should_stop = True
        if self.stop_after and self._count >= self.stop_after:
            trainer.should_stop = True
