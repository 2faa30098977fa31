"""What an unlearning assessment (``lit-align test`` with :class:`~lit_align.methods.UnlearningAssessmentModule`)
writes: the report of the evaluation checklist of Liu et al., "Rethinking Machine Unlearning for
Large Language Models" (arXiv 2402.08787)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from lit_align.callbacks.reporting import grouped_bar_plot, json_safe, publish, report_dir, write_csv
from lit_align.checkpoint import atomic_write_text

__all__ = ["UnlearningAssessmentReport"]

#: Metrics of the printed summary (the files hold every metric), when present.
SUMMARY = ("in_scope_rouge", "in_scope_prob", "in_scope_truth_ratio", "hard_in_scope_rouge", "out_of_scope_rouge",
           "hard_out_of_scope_rouge", "real_authors_rouge", "world_facts_rouge", "mia_auc", "forget_quality",
           "jailbreak.rephrase.in_scope_rouge", "jailbreak.role_play.in_scope_rouge", "gcg.in_scope_rouge",
           "icl_relearn.in_scope_rouge", "relearned.in_scope_rouge", "relearn_delta_in_scope_rouge", "wagle_fa",
           "wagle_ue", "wagle_ut", "changed_share")


#: Metrics of the bar chart (values in [0, 1]), when present.
PLOT_METRICS = ("in_scope_rouge", "hard_in_scope_rouge", "out_of_scope_rouge", "hard_out_of_scope_rouge",
                "real_authors_rouge", "world_facts_rouge", "in_scope_truth_ratio_score", "mia_auc", "forget_quality",
                "wagle_fa", "wagle_ue", "wagle_ut")


def plot_assessment(path: Path, rows: dict[str, dict[str, float]]) -> Path | None:
    """A grouped bar chart of :data:`PLOT_METRICS` per model row (``{row: {metric: value}}``) at ``path``;
    ``None`` (with a warning) without matplotlib, or when no metric is there."""
    return grouped_bar_plot(path, rows, PLOT_METRICS, title="Unlearning assessment", owner="UnlearningAssessmentReport")


class UnlearningAssessmentReport(L.Callback):
    """At the end of ``lit-align test`` write, under ``dirpath`` (default the run directory, ``trainer.log_dir``):

    * ``unlearning_assessment.csv``: the module's long table (one row per metric: original, unlearned mean,
      interval over seeds, delta, retrain, gap to retrain, per seed; see
      :meth:`~lit_align.methods.UnlearningAssessmentModule.table`), after ``#`` comment lines naming the metric
      conventions (truth-ratio mean, MIA AUC direction, ROUGE stemming, UE/UT terms);
    * ``unlearning_assessment.json``: ``conventions``, the per-model ``results``, ``table``, ``splits`` (record
      counts), ``hygiene`` (changed parameters with module names, LoRA-only), ``efficiency`` (the unlearning
      runs' ``run_cost.json`` or "not recorded", the retraining run's next to them, this assessment's wall time
      and peak memory, access), ``wagle_terms`` (the UE / UT terms of each row),
      ``retain_data``, ``attacks`` (their settings);
    * ``unlearning_assessment.png`` (``plot``, with matplotlib): a bar chart of the main metrics per model;
    * a W&B table ``unlearning_assessment`` (and the chart as ``unlearning_assessment_plot``) when a
      ``WandbLogger`` is attached;
    * a printed summary (``verbose``).

    ``lit-align test`` adds this callback to an assessment whose trainer has none.
    """

    def __init__(self, dirpath: str | None = None, verbose: bool = True, plot: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            verbose: print the summary and the file paths.
            plot: write ``unlearning_assessment.png`` (skipped with a warning without matplotlib).
        """
        self.dirpath, self.verbose, self.plot = dirpath, verbose, plot
        self.files: dict[str, Path] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "table") or not hasattr(pl_module, "conventions"):
            raise TypeError(f"UnlearningAssessmentReport needs an UnlearningAssessmentModule, got {type(pl_module).__name__}")
        directory = report_dir(trainer, self.dirpath)  # every rank calls it (a collective)
        if directory is None or not pl_module.results:
            return
        header, rows = pl_module.table()
        conventions = pl_module.conventions()
        cleaned = [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in rows]
        self.files["csv"] = write_csv(directory / "unlearning_assessment.csv", header, cleaned, comments=conventions)
        report = {
            "conventions": conventions, "models": {"original": pl_module.original.source,
                                                   "unlearned": [s.source for s in pl_module.unlearned],
                                                   "seeds": pl_module.seeds,
                                                   "retrain": None if pl_module.retrain is None else pl_module.retrain.source},
            "splits": pl_module.split_sizes, "results": pl_module.results,
            "table": {"columns": header, "rows": cleaned},
            "hygiene": pl_module.hygiene, "retain_data": pl_module.retain_data,
            "efficiency": {"unlearning_runs": pl_module.run_costs, "retrain_run": pl_module.retrain_cost,
                           "assessment": pl_module.cost, "access": pl_module.access},
            "wagle_terms": {row: {"ue": pl_module.ue_terms.get(row, []), "ut": pl_module.ut_terms.get(row, [])}
                            for row in pl_module.model_rows},
            "attacks": {k: (repr(v) if k == "gcg" and v is not None else v)
                        for k, v in vars(pl_module.attacks).items()},
        }
        self.files["json"] = directory / "unlearning_assessment.json"
        atomic_write_text(self.files["json"], json.dumps(json_safe(report), indent=1, default=str, allow_nan=False))
        image = None
        if self.plot:
            image = plot_assessment(directory / "unlearning_assessment.png",
                                    {row: pl_module.results[row] for row in pl_module.model_rows
                                     if row in pl_module.results})
            if image is not None:
                self.files["png"] = image
        publish(trainer, "unlearning_assessment", header, cleaned, image=image)
        if self.verbose:
            print(self.summary(header, rows, conventions, pl_module))

    def summary(self, header: list[str], rows: list[list[Any]], conventions: list[str], module: Any) -> str:
        """The printed summary: the conventions, the main metrics, hygiene and cost."""
        shown = [c for c in header if c in ("original", "unlearned", "unlearned_ci_low", "unlearned_ci_high", "delta",
                                            "retrain", "gap_to_retrain")]
        index = {c: header.index(c) for c in shown}
        width = max(len(m) for m in SUMMARY)
        lines = ["", "Unlearning assessment", *(f"  {c}" for c in conventions),
                 "metric".ljust(width) + "".join(f"  {c:>12}" for c in shown)]
        for row in rows:
            if row[0] in SUMMARY:
                cells = [row[index[c]] for c in shown]
                lines.append(row[0].ljust(width) + "".join(
                    f"  {'' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4g}':>12}" for v in cells))
        for row, changes in module.hygiene.items():
            lines.append(f"{row}: {changes['changed_tensors']} tensors / {changes['changed_parameters']} weights changed "
                         f"({changes['changed_share']:.2%}), LoRA only: {changes['lora_only']}")
        def cost_text(cost: dict[str, Any] | str) -> str:
            if isinstance(cost, str):
                return cost
            gpu = f", {cost['gpu_hours']:.3g} GPU-hours" if "gpu_hours" in cost else ""
            return (f"{cost.get('fit_wall_seconds', float('nan')):.1f} s{gpu}, peak "
                    f"{cost.get('peak_memory_bytes', 0) / 2**20:.0f} MiB ({cost.get('peak_memory_source')})")

        for row, cost in module.run_costs.items():
            lines.append(f"{row} unlearning run cost: {cost_text(cost)}")
        lines.append(f"retraining run cost: {cost_text(module.retrain_cost)}")
        lines.append(f"assessment: {module.cost.get('wall_seconds', float('nan')):.1f} s; access: {module.access}; "
                     f"retain data: {module.retain_data}")
        lines.append("  ".join(f"{k}: {v}" for k, v in self.files.items()))
        return "\n".join(lines)
