"""What a summarisation evaluation (``lit-align test`` with
:class:`~lit_align.methods.SummarizationEvaluationModule`) writes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from lit_align.callbacks.reporting import json_safe, publish, report_dir, write_csv, write_jsonl
from lit_align.checkpoint import atomic_write_text

__all__ = ["SummarizationReport", "summary_table_text"]

#: the printed table's columns (metric, header)
_PRINTED = (("rouge1", "R-1"), ("rouge2", "R-2"), ("rougeL", "R-L"), ("rougeLsum", "R-Lsum"), ("meteor", "METEOR"),
            ("bertscore_f1", "BERTScore"), ("length_ratio", "len/ref"))


def _cell(entry: dict[str, Any], metric: str) -> str:
    value = entry.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    low, high = entry.get(f"{metric}_low"), entry.get(f"{metric}_high")
    if low is None or high is None or math.isnan(low):
        return f"{value:.3f}"
    return f"{value:.3f} ±{(high - low) / 2:.3f}"


def summary_table_text(table: list[dict[str, Any]], fewshot_effect: list[dict[str, Any]]) -> str:
    """The table as printed text: model x task x shots with the main metrics (mean ± half the 95% interval), judge
    means, failure counts, then the few-shot effect rows."""
    metrics = [(m, h) for m, h in _PRINTED if any(m in e for e in table)]
    judge = sorted({k for e in table for k in e if k.startswith("judge_")
                    and k not in ("judge_failures", "judge_parse_failures", "judge_attempts")
                    and not k.endswith(("_low", "_high"))})
    header = ["model", "task", "k", *(h for _, h in metrics), *judge, "empty/early/max/copied/echoed"]
    lines = [header]
    for e in table:
        fails = "/".join(str(e[m]) for m in ("empty", "early_termination", "hit_max_tokens", "copied", "echoed"))
        lines.append([e["model"], e["task"], str(e["shots"]), *(_cell(e, m) for m, _ in metrics),
                      *(f"{e[j]:.2f}" for j in judge), fails])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    for f in fewshot_effect:
        text.append(f"few-shot effect {f['model']}/{f['task']}: ROUGE-L {f['shots']}-shot minus 0-shot "
                    f"{f['rougeL_minus_0shot']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}] over {f['articles']} articles")
    return "\n".join(text)


class SummarizationReport(L.Callback):
    """Write a summarisation evaluation's results at the end of ``lit-align test``, under ``dirpath`` (default:
    the run directory, ``trainer.log_dir``):

    * ``summarization_table.csv``: one row per (model, task, shots): ``articles``; per metric (ROUGE-1/2/L/Lsum
      F1, METEOR, BERTScore F1, length ratios) its mean and ``<metric>_low`` / ``<metric>_high``, the bootstrap 95%
      interval over articles; judge means per criterion (with intervals), ``judge_failures`` (summaries never
      scored), ``judge_parse_failures`` (replies that did not parse) and ``judge_attempts``; the truncation rates
      (``article_truncated_rate``, ``demos_dropped_rate``, ``mean_demos``) and the failure-mode counts
      (``empty``, ``early_termination``, ``hit_max_tokens``, ``copied``, ``echoed``);
    * ``summarization_table.json``: the same rows, ``fewshot_effect`` (per model and task, the paired k-shot minus
      0-shot ROUGE-L difference and its interval) and ``header``: the models' sources, the tasks, the generation
      settings, how each metric is computed, the metrics skipped and why, the judge's model id (strict JSON: a
      metric with no value, e.g. judge means when every reply failed to parse, is ``null``);
    * ``summarization_articles.jsonl``: one line per summary (:class:`~lit_align.methods.summarization_eval.SummaryRow`:
      prompt id, demonstrations used, raw output, summary, flags, per-article scores, judge scores);
    * ``summarization_rougeL.png`` (with ``plot``, needs matplotlib): ROUGE-L per model and task, 0- vs k-shot bars
      with their intervals;
    * with the module's ``human_export``: ``human_eval_blinded.csv`` and its key
      (:func:`lit_align.metrics.human_eval.export_blinded`, systems ``<model>/<k>shot`` in a seeded random order).

    The table goes to every logger (:func:`~lit_align.callbacks.reporting.publish`: a W&B table
    ``summarization_table`` and the plot when a ``WandbLogger`` is attached), and is printed with ``verbose``.
    Files are replaced atomically. ``lit-align test`` adds this callback (default arguments) to a summarisation
    evaluation whose trainer has none.
    """

    def __init__(self, dirpath: str | None = None, plot: bool = True, verbose: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            plot: draw the ROUGE-L bar plot (needs matplotlib).
            verbose: print the table and the file paths.
        """
        self.dirpath, self.plot, self.verbose = dirpath, plot, verbose
        self.files: dict[str, Path] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "fewshot_effect"):
            raise TypeError(f"SummarizationReport needs a SummarizationEvaluationModule, got {type(pl_module).__name__}")
        directory = report_dir(trainer, self.dirpath)
        if directory is None or not pl_module.table:
            return
        table = pl_module.table
        columns = list(dict.fromkeys(k for row in table for k in row))
        data = [[row.get(c) for c in columns] for row in table]
        self.files["csv"] = write_csv(directory / "summarization_table.csv", columns, data)
        path = directory / "summarization_table.json"
        report = {"header": pl_module.report_header(), "table": table, "fewshot_effect": pl_module.fewshot_effect}
        atomic_write_text(path, json.dumps(json_safe(report), indent=1, default=_json, allow_nan=False))
        self.files["json"] = path
        self.files["articles"] = write_jsonl(directory / "summarization_articles.jsonl",
                                             [json_safe(r.record()) for r in pl_module.rows], default=_json)
        if self.plot:
            png = self._plot(directory / "summarization_rougeL.png", table)
            if png is not None:
                self.files["png"] = png
        if pl_module.human_export:
            self._human_export(directory, pl_module)
        publish(trainer, "summarization_table", columns, data, image=self.files.get("png"))
        if self.verbose:
            print("\nSummarisation results (mean ±half 95% interval; failures empty/early/max/copied/echoed)\n"
                  + summary_table_text(table, pl_module.fewshot_effect)
                  + "".join(f"\nskipped {m}: {why}" for m, why in pl_module.skipped.items())
                  + "\n" + "  ".join(f"{k}: {v}" for k, v in self.files.items()))

    def _human_export(self, directory: Path, module: Any) -> None:
        """The blinded human-evaluation CSV: per task, every scored article with each ``<model>/<k>shot``
        system's summary."""
        from lit_align.metrics.human_eval import export_blinded

        for task, articles in module.articles.items():
            scored = list(dict.fromkeys(r.article_id for r in module.rows if r.task == task))
            if not scored:
                continue
            items = [{"article_id": i, "article": articles[i].article, "reference": articles[i].reference}
                     for i in scored]
            outputs = {f"{m}/{k}shot": [module.outputs[(m, task, k)][i].summary for i in scored]
                       for m in module.models for k in module.shots}
            name = "human_eval_blinded.csv" if len(module.articles) == 1 else f"human_eval_blinded_{task}.csv"
            blinded, key = export_blinded(directory / name, items, outputs, seed=module.seed)
            self.files[f"human_{task}"], self.files[f"human_key_{task}"] = Path(blinded), Path(key)

    def _plot(self, path: Path, table: list[dict[str, Any]]) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("SummarizationReport.plot: matplotlib is not installed; no plot written", stacklevel=2)
            return None
        groups = list(dict.fromkeys((e["model"], e["task"]) for e in table))
        shots = sorted({e["shots"] for e in table})
        fig = Figure(figsize=(max(4.0, 1.2 * len(groups) + 2), 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(shots)
        for j, k in enumerate(shots):
            entries = {(e["model"], e["task"]): e for e in table if e["shots"] == k}
            xs = [i + j * width for i, g in enumerate(groups) if g in entries]
            es = [entries[g] for g in groups if g in entries]
            means = [e["rougeL"] for e in es]
            errs = [[e["rougeL"] - e["rougeL_low"] for e in es], [e["rougeL_high"] - e["rougeL"] for e in es]]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=f"{k}-shot")
        ax.set_xticks([i + width * (len(shots) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{m}\n{t}" for m, t in groups], fontsize=8)
        ax.set_ylabel("ROUGE-L F1 (95% interval)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


def _json(value: Any) -> Any:
    """JSON fallback: NaN-safe floats stay floats; anything else as its repr."""
    return repr(value)
