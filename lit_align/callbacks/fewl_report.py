"""What a FEWL evaluation (``lit-align test`` with :class:`~lit_align.methods.FEWLEvaluationModule`) writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lit_align.callbacks.reporting import publish, report_dir, results_table, write_csv, write_jsonl
from lit_align.checkpoint import atomic_write_text

__all__ = ["FEWLReport"]


class FEWLReport(L.Callback):
    """Write a FEWL evaluation's tables at the end of ``lit-align test``, under ``dirpath`` (default: the run
    directory, ``trainer.log_dir``):

    * ``fewl_scores.csv`` and ``fewl_scores.json``: per evaluated model and question, the answer, FEWL, the
      truthfulness term T, the laziness penalty P and the expertise weight lambda of each reference answer
      (``lambda/r<j>s<s>``: reference j, sample s); the JSON also names each reference's model and holds the results
      and, per question, the reference answers, the IW / CO answers and the candidates;
    * ``fewl_ranking.csv``: the models by mean FEWL (rank 1 = least hallucinating by FEWL), also sent to the
      loggers (a W&B table ``fewl_ranking``);
    * ``selected.jsonl`` (when the module scored candidates): one ``{"prompt", "response", "fewl", "index"}`` per
      question, the highest-FEWL candidate, which ``SFTDataModule`` trains on (``configs/fewl/sft_tiny.yaml``);
    * ``demonstrations.jsonl`` (with ``model.demonstrations: k``): the k highest-FEWL ``{"question", "answer"}``
      pairs, which a later run puts before every evaluated model's question with ``model.prompt.demonstrations``;
    * ``selection.json``: how those two were made (hash of the evaluation's config, of the question pool,
      ``candidate_model``, questions scored, ``limited``: true when ``limit_test_batches`` / ``fast_dev_run`` scored
      part of the pool, the prompt template and whether the chat template was used); a run that selects nothing
      deletes an earlier ``selected.jsonl`` / ``demonstrations.jsonl`` in the directory, so none is stale;
    * ``fewl_generations_log.jsonl``: every generation the scores rest on (reference, IW, CO, evaluated and candidate
      answers), one line each: ``model``, ``purpose``, ``row``, ``seed``, ``prompt`` (as the model read it),
      ``text``, ``cached`` (read from the generation cache) and the cache ``key``.

    Every file is replaced atomically (a killed run leaves the previous file or the new one). ``lit-align test``
    adds this callback (default arguments) to a FEWL evaluation whose trainer has none.

    Example::

        trainer:
          callbacks:
            - class_path: lit_align.callbacks.FEWLReport
              init_args: {dirpath: outputs/fewl-tiny/fewl}
    """

    def __init__(self, dirpath: str | None = None, verbose: bool = True) -> None:
        """
        Args:
            dirpath: output directory (default ``trainer.log_dir``, else ``default_root_dir``).
            verbose: print the ranking and the file paths.
        """
        self.dirpath, self.verbose = dirpath, verbose
        self.files: dict[str, Path] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "score_rows"):
            raise TypeError(f"FEWLReport needs a FEWLEvaluationModule, got {type(pl_module).__name__}")
        directory = report_dir(trainer, self.dirpath)  # every rank calls it (a collective)
        if directory is None or not pl_module.results:
            return
        self._scores(directory, pl_module)
        rows, columns, table = results_table(pl_module.results, pl_module.ranking())
        header, data = ["rank", "model", *columns], [[rank, *row] for rank, row in enumerate(table, 1)]
        self.files["ranking"] = write_csv(directory / "fewl_ranking.csv", header, data)
        publish(trainer, "fewl_ranking", header, data)
        self.files["generations"] = write_jsonl(directory / "fewl_generations_log.jsonl", pl_module.generation_log)
        for key, rows in (("selected", pl_module.sft_rows()), ("demonstrations", pl_module.demonstration_rows)):
            path = directory / f"{key}.jsonl"
            if rows:
                self.files[key] = write_jsonl(path, rows)
            else:
                path.unlink(missing_ok=True)  # an earlier run's file would pass for this run's selection
        manifest = directory / "selection.json"
        atomic_write_text(manifest, json.dumps(pl_module.selection_manifest(), indent=1))
        self.files["manifest"] = manifest
        if self.verbose:
            ranking = ", ".join(f"{r[1]} {r[2]:.4f}" for r in data)
            print(f"\nFEWL ranking (mean FEWL): {ranking}\n" + "  ".join(f"{k}: {v}" for k, v in self.files.items()))

    def _scores(self, directory: Path, module: Any) -> None:
        rows, names = module.score_rows(), module.reference_names
        header = ["model", "index", "question", "answer", "fewl", "truthfulness", "laziness"]
        self.files["scores_csv"] = write_csv(directory / "fewl_scores.csv", [*header, *(f"lambda/{n}" for n in names)],
                                             [[row[c] for c in header] + row["lambda"] for row in rows])
        references = [{"name": names[j * module.samples_per_reference + s], "model": spec.source, "sample": s}
                      for j, spec in enumerate(module.references) for s in range(module.samples_per_reference)]
        path = directory / "fewl_scores.json"
        pool = module.pool
        questions = [{"index": i, "question": pool.questions[i].question, "references": pool.references[i],
                      "wrong": pool.wrong[i], "corrected": pool.corrected[i], "candidates": pool.candidates[i]}
                     for i in pool.scored]
        atomic_write_text(path, json.dumps({"references": references, "results": module.results,
                                            "ranking": module.ranking(), "pool_sha256": module.pool_fingerprint,
                                            "rows": rows, "questions": questions}, indent=1))
        self.files["scores_json"] = path
