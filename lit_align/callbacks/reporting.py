"""What the evaluation callbacks share: where their files go, CSV tables, logger tables, eval mode."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lit_align.checkpoint import atomic_write_text
from lit_align.models.causal_lm import eval_mode

__all__ = ["HistoryReport", "eval_mode", "grouped_bar_plot", "json_safe", "publish", "report_dir", "results_table", "run_dir", "run_name", "write_csv",
           "write_jsonl"]


def report_dir(trainer: L.Trainer, dirpath: str | None) -> Path | None:
    """The directory a report is written to (``dirpath``, else ``trainer.log_dir``, else the root dir),
    created; ``None`` on ranks other than 0. Every rank must call it (``log_dir`` is a collective)."""
    log_dir = trainer.log_dir
    if trainer.global_rank != 0:
        return None
    directory = Path(dirpath or log_dir or trainer.default_root_dir)
    os.makedirs(directory, exist_ok=True)
    return directory


def _version_dir(version: int | str) -> str:
    """A logger version as Lightning names its folder: the W&B run id as it is, ``N`` as ``version_N``."""
    return version if isinstance(version, str) else f"version_{version}"


def run_name(trainer: L.Trainer) -> str | None:
    """``<logger name>/<version folder>`` of the first logger (the W&B project and run id, a CSV or
    TensorBoard ``version_N``), or ``None`` without a logger."""
    logger = trainer.logger
    if logger is None:
        return None
    version = _version_dir(logger.version)
    return f"{logger.name}/{version}" if logger.name else version


def run_dir(trainer: L.Trainer) -> Path:
    """The directory of this run's files (rank 0; no collective): the first logger's ``log_dir`` (CSV,
    TensorBoard), else the directory Lightning puts the run's checkpoints under, less ``checkpoints/``
    (``<save_dir>/<name>/<version>``: for W&B ``<save_dir>/<project>/<run id>``); ``default_root_dir``
    without a logger."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if getattr(logger, "log_dir", None):
        return Path(logger.log_dir)
    if isinstance(logger, WandbLogger):
        logger.experiment  # noqa: B018 -- starts the run: its id is the version
    save_dir, version = Path(logger.save_dir or trainer.default_root_dir), logger.version
    if version is None:
        return save_dir
    return save_dir / str(logger.name) / _version_dir(version)


def results_table(results: Mapping[str, Mapping[str, Any]], order: Sequence[str]
                  ) -> tuple[list[str], list[str], list[list[Any]]]:
    """``(rows, columns, table)`` of an evaluation callback's ``results`` (model -> column -> value): the models of
    ``order`` that ``results`` holds, every column in first-seen order, and ``[[model, *values]]`` (``None`` where
    a model lacks a column)."""
    rows = [r for r in order if r in results]
    columns = list(dict.fromkeys(k for row in results.values() for k in row))
    return rows, columns, [[r, *(results[r].get(c) for c in columns)] for r in rows]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], *,
              comments: Sequence[str] = ()) -> Path:
    """A CSV file with ``header`` and ``rows`` (``None`` cells are written empty), replaced atomically.

    ``comments``: lines written first, each as ``# <line>`` (read the file back with
    ``pandas.read_csv(path, comment="#")``, or skip the lines starting with ``#``).
    """
    buffer = io.StringIO(newline="")
    buffer.write("".join(f"# {line}\n" for line in comments))
    writer = csv.writer(buffer)
    writer.writerow(list(header))
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    atomic_write_text(path, buffer.getvalue())
    return path


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]], default: Any = None) -> Path:
    """One JSON object per line (``default``: :func:`json.dumps`' fallback for other values), replaced atomically:
    a killed run leaves the previous file or the new one, never one cut at a line boundary."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=default) + "\n" for row in rows))
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




def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinite float (in nested dicts, lists and tuples) replaced by ``None``, so
    ``json.dumps(..., allow_nan=False)`` writes strict JSON: a metric with no value is ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

def grouped_bar_plot(path: Path, rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str], *, title: str,
                     owner: str) -> Path | None:
    """A grouped bar chart at ``path``: one group per metric of ``metrics`` that some row has, one bar per row of
    ``rows`` (``{row: {metric: value}}``; missing values are gaps), values in [0, 1.05]. ``None`` when no metric is
    there, or (with a warning naming ``owner``'s ``plot`` option) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"{owner}.plot: matplotlib is not installed; no {path.name} written "
                      "(pip install matplotlib, or set plot: false)", stacklevel=3)
        return None
    shown = [m for m in metrics if any(isinstance(v.get(m), (int, float)) and math.isfinite(v[m])
                                       for v in rows.values())]
    if not shown or not rows:
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(shown) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, (name, values) in enumerate(rows.items()):
        heights = [values.get(m, float("nan")) for m in shown]
        ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(shown))], heights, width, label=name)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path

class HistoryReport(L.Callback):
    """Base of the reports of methods that keep a validation history (``val_history``: one dict per
    validation, with ``step``) and a sample table (a list of dicts in the attribute ``samples_attr``).

    After every validation and at the end of training it writes ``<name>_history.csv``,
    ``<name>_<samples_key>.csv`` and, with ``plot``, the subclass's figure (:meth:`draw`), under
    ``dirpath`` (default ``trainer.log_dir``); at the end it sends the sample table and the figure to
    the loggers (:func:`publish`) and, with ``verbose``, prints :meth:`summary` and the file paths.
    """

    name: ClassVar[str]
    samples_attr: ClassVar[str]
    samples_key: ClassVar[str]
    png_name: ClassVar[str]
    lead_columns: ClassVar[tuple[str, ...]] = ("step",)
    module_kind: ClassVar[str]

    def __init__(self, dirpath: str | None = None, plot: bool = True, verbose: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            plot: write the figure (needs matplotlib).
            verbose: print a summary and where the files are at the end of training.
        """
        self.dirpath, self.plot, self.verbose = dirpath, plot, verbose
        self.files: dict[str, Path] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, final=True)

    def sample_columns(self, samples: list[dict]) -> list[str]:
        """The sample table's columns (default: every key, in first-seen order)."""
        return list(dict.fromkeys(k for row in samples for k in row))

    def draw(self, fig, history: list[dict], pl_module) -> None:
        """Subclass hook: draw the report's figure."""
        raise NotImplementedError

    def summary(self, history: list[dict]) -> str:
        """Subclass hook: the line printed at the end of training."""
        raise NotImplementedError

    def _write(self, trainer: L.Trainer, pl_module, final: bool) -> None:
        history = getattr(pl_module, "val_history", None)
        if history is None or not hasattr(pl_module, self.samples_attr):
            raise TypeError(f"{type(self).__name__} needs a {self.module_kind} (a module with val_history / "
                            f"{self.samples_attr})")
        directory = report_dir(trainer, self.dirpath)
        if directory is None or not history:
            return
        lead = list(self.lead_columns)
        columns = [*lead, *sorted({k for row in history for k in row} - set(lead))]
        self.files["history"] = write_csv(directory / f"{self.name}_history.csv", columns,
                                          [[row.get(c) for c in columns] for row in history])
        samples = getattr(pl_module, self.samples_attr)
        sample_columns = self.sample_columns(samples)
        data = [[row.get(c) for c in sample_columns] for row in samples]
        self.files[self.samples_key] = write_csv(directory / f"{self.name}_{self.samples_key}.csv", sample_columns,
                                                 data)
        if self.plot:
            png = self._plot(directory / self.png_name, history, pl_module)
            if png is not None:
                self.files["png"] = png
        if final:
            publish(trainer, f"{self.name}_{self.samples_key}", sample_columns, data, image=self.files.get("png"))
            if self.verbose:
                print(f"\n{self.summary(history)}\nHistory: {self.files['history']}  "
                      f"{self.samples_key.title()}: {self.files[self.samples_key]}"
                      + (f"  Plot: {self.files['png']}" if "png" in self.files else ""))

    def _plot(self, path: Path, history: list[dict], pl_module) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn(f"{type(self).__name__}.plot: matplotlib is not installed; no {self.png_name} written",
                          stacklevel=2)
            return None
        fig = Figure()
        FigureCanvasAgg(fig)
        self.draw(fig, history, pl_module)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path
