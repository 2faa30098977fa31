"""How many intra-op threads torch uses in a CPU run: one per process for small models, by default."""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["CPUThreads", "THREAD_ENV_VARS"]

#: Environment variables through which a user has already chosen a thread count; ``auto`` leaves them be.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class CPUThreads(L.Callback):
    """Set torch's intra-op thread count for runs on the CPU accelerator (GPU runs are left alone).

    Torch starts one thread per core. A tiny model gains nothing from them (its matrices are too small to
    split), and as soon as anything else runs on the machine (a second process of a multi-process CPU
    strategy, a test suite, a CI neighbour) the threads oversubscribe the cores and a run slows down
    several-fold: ``configs/watermark/tiny.yaml`` took 1080 s instead of 34 s beside a busy process.
    ``benchmarks/cpu_threads.py`` measures this.

    ``threads: auto`` (the default) uses one thread per process when

    * the run has several processes on the CPU (DDP or FSDP2 over gloo), each gets one; or
    * the LightningModule holds fewer than ``small_model_params`` parameters (every tiny config), decided
      once its models are built (``configure_model``), before the first step;

    and leaves torch's default otherwise (a large model on a many-core CPU runs faster with all cores).
    ``auto`` never overrides ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` when they are set. An integer sets
    that many threads per process; ``0`` keeps torch's default. ``lit-align --threads N`` sets it from
    the command line (the CLI adds this callback to every run).

    Args:
        threads: ``auto``, or threads per process (``0``: torch's default).
        small_model_params: below this many parameters, ``auto`` uses one thread per process.
    """

    def __init__(self, threads: int | Literal["auto"] = "auto", small_model_params: int = 100_000_000) -> None:
        if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be 'auto' or an integer >= 0 (0: torch's default), got {threads!r}")
        self.threads, self.small_model_params = threads, small_model_params
        self.chosen: int | None = None  # what was set, for logs and tests; None: torch's default kept

    def _on_cpu(self, trainer: L.Trainer) -> bool:
        return isinstance(trainer.accelerator, CPUAccelerator)

    def _set(self, threads: int, why: str) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            rank_zero_info(f"torch uses {threads} CPU thread(s) per process ({why}; change with --threads)")
        self.chosen = threads

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._on_cpu(trainer) or self.chosen is not None:
            return
        if self.threads != "auto":
            if self.threads > 0:
                self._set(self.threads, "threads setting")
            return
        if any(os.environ.get(var) for var in THREAD_ENV_VARS):
            return
        if trainer.world_size > 1:
            self._set(1, f"{trainer.world_size} CPU processes")

    def _size_rule(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``auto`` on one process: one thread when the built model is small."""
        if (self.threads != "auto" or self.chosen is not None or not self._on_cpu(trainer)
                or any(os.environ.get(var) for var in THREAD_ENV_VARS)):
            return
        params = sum(p.numel() for p in pl_module.parameters())
        if params < self.small_model_params:
            self._set(1, f"a small model: {params / 1e6:.1f}M parameters")
        else:
            self.chosen = 0

    # after configure_model has built the weights, before any heavy work (reference log-probs, WAGLE scores)
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size_rule(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size_rule(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size_rule(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._size_rule(trainer, pl_module)
