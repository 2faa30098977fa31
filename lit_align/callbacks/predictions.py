"""What ``lit-align predict`` writes: one JSON line per predicted example, and a W&B table.

Every method's ``predict_step`` returns one dict per example of its batch (``{prompt, completion}``,
plus whatever the method adds). :class:`PredictionWriter` keys each row by the example's index in the
predict dataset (Lightning tracks the indices of every predict batch), and at the end of the predict
epoch writes ``predictions.jsonl`` under the run directory
(:func:`~lit_align.callbacks.reporting.run_dir`), prints its path, and
sends the same rows to a W&B logger as the table ``predictions``.

Several processes: each rank predicts its shard and keeps its rows; at the end the rows are gathered
(``all_gather_object``) and rank 0 drops the duplicates a padded sampler adds (an index seen twice is
one example), orders the rows by index and writes the one file. A predict loader that is not a
``DataLoader`` has no tracked indices: its rows get ``index: null`` and keep the order they came in.

``lit-align predict`` adds this callback by itself when the config's callbacks hold no prediction writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger

from lit_align.callbacks.reporting import run_dir, write_jsonl

__all__ = ["PredictionWriter"]


def _example_index(key: Any) -> int | None:
    """The dataset index of a sampler key: the key itself, or the last element of a composite key
    (:class:`~lit_align.data.unlearning.StreamSampler` yields ``(stream_position, forget_index)``)."""
    if isinstance(key, Sequence) and not isinstance(key, str) and key:
        key = key[-1]
    return None if key is None else int(key)


def _rows_of(prediction: Any, indices: Sequence[int] | None, batch_idx: int) -> list[dict[str, Any]]:
    """The rows of one predict batch: each example's dict with its dataset ``index`` first."""
    if not isinstance(prediction, Sequence) or not all(isinstance(p, Mapping) for p in prediction):
        raise TypeError(f"PredictionWriter: predict_step must return one dict per example (a list of dicts); "
                        f"batch {batch_idx} returned {type(prediction).__name__}")
    indices = indices or None  # [] when the loader is not a DataLoader (Lightning tracks no indices then)
    if indices is not None and len(indices) != len(prediction):
        raise ValueError(f"PredictionWriter: predict_step returned {len(prediction)} rows for the "
                         f"{len(indices)} examples of batch {batch_idx}; return one dict per example")
    keys = indices if indices is not None else [None] * len(prediction)
    return [{"index": _example_index(k), **row} for k, row in zip(keys, prediction)]


def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows (in rank order) when several processes run; ``rows`` otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part or []]


def _unique_in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataloader, index), ordered by them (rows without an index keep their order, last)."""
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    unindexed = []
    for row in rows:
        if row["index"] is None:
            unindexed.append(row)
        else:
            seen.setdefault((row.get("dataloader_idx", 0), row["index"]), row)
    return [seen[k] for k in sorted(seen)] + unindexed


class PredictionWriter(BasePredictionWriter):
    """Write every prediction of ``lit-align predict`` to ``predictions.jsonl`` (and a W&B table).

    One JSON object per line and per predicted example: ``{"index": <position in the predict dataset>,
    "prompt": ..., "completion": ..., ...}`` (the keys of the method's ``predict_step`` rows, plus
    ``dataloader_idx`` when there are several predict dataloaders), in dataset order. The file goes
    to ``dirpath`` or the run directory (:func:`~lit_align.callbacks.reporting.run_dir`); its path is printed
    and kept in :attr:`path`.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.jsonl",
                 wandb_table: str | None = "predictions") -> None:
        """
        Args:
            dirpath: output directory; default: the run directory (``<save_dir>/<name>/<version>`` of the
                first logger, the one its checkpoints would go under), else ``trainer.default_root_dir``.
            filename: the JSONL file's name (an existing file of that name is replaced).
            wandb_table: key of the table sent to a W&B logger; ``null`` sends none.
        """
        super().__init__(write_interval="batch")
        if not filename.endswith(".jsonl"):
            raise ValueError(f"PredictionWriter.filename must end with .jsonl, got {filename!r}")
        self.dirpath, self.filename, self.wandb_table = dirpath, filename, wandb_table
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.path = [], None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        rows = _rows_of(prediction, batch_indices, batch_idx)
        if len(trainer.num_predict_batches) > 1:
            rows = [{**row, "dataloader_idx": dataloader_idx} for row in rows]
        self.rows.extend(rows)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = _unique_in_order(_gather(self.rows))  # a collective: every rank gathers
        if trainer.global_rank != 0:
            return
        directory = Path(self.dirpath) if self.dirpath else run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        self.path = directory / self.filename
        write_jsonl(self.path, rows, default=_jsonable)
        print(f"Predictions ({len(rows)} rows): {self.path}")
        if self.wandb_table:
            self._log_table(trainer, rows)

    def _log_table(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(self.wandb_table, columns=columns, data=data)


def _cell(value: Any) -> Any:
    """A W&B table cell: scalars as they are, anything else as its JSON text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """JSON for what a custom ``predict_step`` may put in its rows: tensors and arrays as lists, else text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)
