"""What the evaluation callbacks share: where their files go, CSV tables, logger tables, eval mode."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lit_align.models.causal_lm import eval_mode

__all__ = ["eval_mode", "publish", "report_dir", "write_csv"]


def report_dir(trainer: L.Trainer, dirpath: str | None) -> Path | None:
    """The directory a report is written to (``dirpath``, else ``trainer.log_dir``, else the root dir),
    created; ``None`` on ranks other than 0. Every rank must call it (``log_dir`` is a collective)."""
    log_dir = trainer.log_dir
    if trainer.global_rank != 0:
        return None
    directory = Path(dirpath or log_dir or trainer.default_root_dir)
    os.makedirs(directory, exist_ok=True)
    return directory


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file with ``header`` and ``rows`` (``None`` cells are written empty)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


def publish(trainer: L.Trainer, key: str, columns: Sequence[str], data: Sequence[Sequence[Any]], *,
            metrics: Mapping[str, float] | None = None, image: Path | None = None,
            image_key: str | None = None) -> None:
    """Send a table to every logger: its finite numbers as metrics (``metrics``), and to a W&B logger
    the table itself (``key``) and, if given, ``image`` (as ``image_key``, default ``<key>_plot``)."""
    step = trainer.global_step
    flat = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    for logger in trainer.loggers:
        if flat:
            logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(key, columns=list(columns), data=[list(r) for r in data], step=step)
            if image is not None:
                logger.log_image(image_key or f"{key}_plot", images=[str(image)], step=step)
