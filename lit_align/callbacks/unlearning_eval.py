"""TOFU-style unlearning evaluation: before / during / after unlearning, against a retain-only model.

:class:`UnlearningEvaluation` scores models on the evaluation splits of the DataModule
(``trainer.datamodule.eval_records()``: ``forget``, ``retain``, ``holdout``) and reports one row
per model:

* ``retain_only`` -- the reference model trained without the forget set (``retain_model``), the
  target of forget quality;
* ``start`` -- the policy before the first training step (``at_fit_start``);
* ``unlearned`` -- the policy at the end of training;
* ``relearned`` -- a copy of the unlearned policy fine-tuned for ``relearn_steps`` steps on a few
  forget examples (a relearning attack; the trained policy is never modified).

Columns (``<split>`` among forget / retain / holdout; a column is left out when the records
lack the fields it needs):

* ``<split>_nll``, ``<split>_accuracy``: token-mean NLL and argmax accuracy of the answer tokens;
* ``<split>_prob``: mean over questions of ``P(a|q) = exp(-mean token NLL)``;
* ``<split>_rouge``: ROUGE-L recall (rouge-score, Porter stemmer unless ``rouge_stemmer: false``) of the
  greedy answer against the reference answer;
* ``<split>_truth_ratio``: mean truth ratio (needs ``perturbed_responses``; the paraphrased answer
  when present, after the original question as TOFU scores it, or the paraphrased one with
  ``truth_ratio_question: paraphrased``), ``<split>_truth_ratio_score``: TOFU's summary
  (forget: mean min(TR, 1/TR); other splits: mean max(0, 1 - TR));
* ``<split>_mc_accuracy``: multiple-choice accuracy (needs ``choices`` and ``label``; a choice's
  score is its summed log-likelihood as a response to the prompt, EOS included);
* ``forget_quality``: KS-test p-value between the forget truth ratios of the model and of the
  retain-only model (needs ``retain_model``);
* ``model_utility``: harmonic mean of ``retain_prob``, ``retain_rouge`` and, when available,
  ``retain_truth_ratio_score`` (TOFU's utility restricted to the retain split);
* ``mia_auc``: ROC-AUC of the Min-K% Prob score (``mia_k``) over the whole prompt + answer text,
  forget = positive, **holdout** = negative when a holdout split exists, else **retain** = negative.
  ~0.5: the model treats forget and non-member texts alike; 1.0: every forget text is less likely
  than every non-member text; 0.0: every forget text is more likely (still memorised). With
  ``mia_convention: open_unlearning`` the value is 1 minus that (open-unlearning's convention);
* relearned row only: ``relearn_delta_forget_<metric>`` = relearned minus unlearned value
  (positive ROUGE / accuracy / prob deltas = knowledge that came back).

On validation the current policy's numbers are logged as ``val/unlearn/<column>`` (every
``every_n_validations`` validations). At the end of training the table goes to
``unlearning_eval.csv`` under ``dirpath`` (default ``trainer.log_dir``; its first lines are ``# ``
comments naming the truth-ratio mean, MIA convention and ROUGE stemming, from
:func:`lit_align.metrics.metric_conventions`), to a W&B table
``unlearning_eval`` when a ``WandbLogger`` is attached, to a bar chart ``unlearning_eval.png``
(if matplotlib is installed), and to :attr:`UnlearningEvaluation.results`.

Distributed: the records of each split are sharded across ranks and the metric states are
reduced (torchmetrics), so every rank ends with the same numbers. Every rank runs the same
number of forward passes (short shards repeat a batch whose results are dropped), which FSDP2
needs. The relearning attack deep-copies the policy and so refuses FSDP2-sharded weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lit_align.callbacks.reporting import eval_mode, grouped_bar_plot, publish, report_dir, results_table, write_csv
from lit_align.metrics.unlearning import forget_quality, harmonic_mean, metric_conventions
from lit_align.models import ModelSpec, build_causal_lm
from lit_align.models.fsdp import full_params
from lit_align.unlearning.scoring import (
    EncodedRecord,
    ModelScorer,
    ScoreSettings,
    encode_record,
    relearn_copy,
    score_splits,
)

__all__ = ["UnlearningEvaluation"]

#: The splits :meth:`eval_records` may return.
SPLITS = ("forget", "retain", "holdout")
#: Rows of the table, in display order.
ROWS = ("retain_only", "start", "unlearned", "relearned")
#: Columns drawn in the bar chart (all in [0, 1]), when present.
PLOT_COLUMNS = ("forget_quality", "model_utility", "mia_auc", "forget_rouge", "retain_rouge", "forget_accuracy",
                "retain_accuracy", "forget_prob", "retain_prob", "forget_truth_ratio_score", "forget_mc_accuracy")
#: Forget-split columns whose relearning delta is reported.
RELEARN_DELTAS = ("rouge", "accuracy", "prob", "nll", "truth_ratio_score", "mc_accuracy")
_NO_SHARDED_RELEARN = (
    "UnlearningEvaluation.relearn_steps: the relearning attack deep-copies the policy, which is not supported for "
    "FSDP2-sharded weights; set relearn_steps: null, or run the attack on the exported model with one process."
)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class UnlearningEvaluation(L.Callback):
    """Forget / retain / holdout metrics of the starting, unlearned, retain-only and relearned models.

    See the module docstring for the metrics and outputs. Example::

        trainer:
          callbacks:
            - class_path: lit_align.callbacks.UnlearningEvaluation
              init_args:
                retain_model: {name_or_path: builtin:tiny-tofu-retain90}
                max_new_tokens: 32
                relearn_steps: 10
    """

    def __init__(
        self,
        retain_model: ModelSpec | None = None,
        required_splits: tuple[str, ...] = ("forget", "retain"),
        batch_size: int = 8,
        max_new_tokens: int = 64,
        max_records: int | None = None,
        mia_k: float = 0.5,
        truth_ratio_mean: Literal["arithmetic", "geometric"] = "arithmetic",
        mia_convention: Literal["forget_positive", "open_unlearning"] = "forget_positive",
        rouge_stemmer: bool = True,
        truth_ratio_question: Literal["original", "paraphrased"] = "original",
        every_n_validations: int = 1,
        at_fit_start: bool = True,
        relearn_steps: int | None = None,
        relearn_fraction: float = 0.1,
        relearn_lr: float = 1e-5,
        relearn_seed: int = 0,
        plot: bool = True,
        dirpath: str | None = None,
        chunk_tokens: int | None = None,
        verbose: bool = True,
    ) -> None:
        """
        Args:
            retain_model: the retain-only reference model (trained without the forget set), built with
                the policy's tokenizer and evaluated once at the start of fit; it gives the
                ``retain_only`` row and the target of ``forget_quality``. ``None``: neither.
            required_splits: splits ``eval_records()`` must return (non-empty), else fit stops with an
                error; ``forget`` is always required.
            batch_size: sequences (or prompts, for greedy decoding) per forward pass.
            max_new_tokens: greedy answer length limit for ROUGE-L (TOFU allows 200 tokens in total).
            max_records: evaluate only the first this-many records of each split (``None``: all).
            mia_k: the K of Min-K% Prob (share of lowest-probability tokens averaged), in (0, 1].
            truth_ratio_mean: how the K perturbed answers' probabilities are averaged
                (see :func:`lit_align.metrics.truth_ratio`): ``arithmetic`` as WAGLE's code,
                ``geometric`` as TOFU and open-unlearning.
            mia_convention: ``forget_positive`` (forget texts are the positives of ``mia_auc``) or
                ``open_unlearning`` (non-members are, so the value is 1 minus it; see
                :class:`lit_align.metrics.MinKProbMIA`).
            rouge_stemmer: ROUGE-L with rouge-score's Porter stemmer, as TOFU and WAGLE score
                (see :func:`lit_align.metrics.rouge_l_recall`).
            truth_ratio_question: the question the truth ratio conditions a' and the perturbed answers on:
                ``original`` (TOFU, open-unlearning) or ``paraphrased`` (q', core.md §4.8's formula).
            every_n_validations: evaluate the policy (and log ``val/unlearn/*``) at every n-th
                validation; 0 never on validation.
            at_fit_start: evaluate the policy before training (the ``start`` row).
            relearn_steps: AdamW steps of the relearning attack at the end of training (the
                ``relearned`` row); 0 re-evaluates an untouched copy (deltas must be 0); ``None`` skips it.
            relearn_fraction: share of the forget records (seeded choice, at least one) the attack trains on.
            relearn_lr: learning rate of the attack (no weight decay; all weights trained). The attack's
                size, rate and steps are not from a paper (the checklist names the attack, not a recipe):
                choose them for your model and report them with the result.
            relearn_seed: seed of the record choice and order of the attack.
            plot: write a bar chart ``unlearning_eval.png`` (skipped with a warning without matplotlib).
            dirpath: where the CSV and the chart go; default ``trainer.log_dir`` (or ``default_root_dir``).
            chunk_tokens: rows per LM-head chunk when scoring (memory only; default: the policy
                module's ``chunk_tokens``, else automatic).
            verbose: print the table and where the files went at the end of training (rank 0).
        """
        if batch_size <= 0:
            raise ValueError(f"UnlearningEvaluation.batch_size must be positive, got {batch_size}")
        if max_new_tokens <= 0:
            raise ValueError(f"UnlearningEvaluation.max_new_tokens must be positive, got {max_new_tokens}")
        if max_records is not None and max_records <= 0:
            raise ValueError(f"UnlearningEvaluation.max_records must be positive or null, got {max_records}")
        if not 0.0 < mia_k <= 1.0:
            raise ValueError(f"UnlearningEvaluation.mia_k must be in (0, 1], got {mia_k}")
        if every_n_validations < 0:
            raise ValueError(f"UnlearningEvaluation.every_n_validations must be >= 0, got {every_n_validations}")
        if relearn_steps is not None and relearn_steps < 0:
            raise ValueError(f"UnlearningEvaluation.relearn_steps must be >= 0 or null, got {relearn_steps}")
        if not 0.0 < relearn_fraction <= 1.0:
            raise ValueError(f"UnlearningEvaluation.relearn_fraction must be in (0, 1], got {relearn_fraction}")
        unknown = sorted(set(required_splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"UnlearningEvaluation.required_splits: unknown split(s) {unknown}; choose from {SPLITS}")
        self.retain_model = retain_model
        self.required_splits = tuple(dict.fromkeys(("forget", *required_splits)))
        self.batch_size, self.max_new_tokens, self.max_records = batch_size, max_new_tokens, max_records
        self.mia_k, self.truth_ratio_mean = mia_k, truth_ratio_mean
        self.mia_convention, self.rouge_stemmer = mia_convention, rouge_stemmer
        self.truth_ratio_question = truth_ratio_question
        self.conventions = metric_conventions(truth_ratio_mean=truth_ratio_mean, mia_convention=mia_convention,
                                              rouge_stemmer=rouge_stemmer, truth_ratio_question=truth_ratio_question)
        """The report header's lines (:func:`lit_align.metrics.metric_conventions`); validates the options."""
        self.every_n_validations, self.at_fit_start = every_n_validations, at_fit_start
        self.relearn_steps, self.relearn_fraction = relearn_steps, relearn_fraction
        self.relearn_lr, self.relearn_seed = relearn_lr, relearn_seed
        self.plot, self.dirpath, self.chunk_tokens, self.verbose = plot, dirpath, chunk_tokens, verbose
        self.results: dict[str, dict[str, float]] = {}
        """``{row: {column: value}}`` for the rows evaluated so far (see the module docstring)."""
        self.files: dict[str, Path] = {}
        """Paths written at the end of training (``csv``, ``png``), on rank 0."""
        self._retain_ratios: Tensor | None = None  # forget-set truth ratios of the retain-only model
        self._items: dict[str, list[EncodedRecord]] | None = None
        self._validations = 0

    # -- checkpointing: rows evaluated before a resume survive it -------------------------------
    def state_dict(self) -> dict:
        ratios = None if self._retain_ratios is None else self._retain_ratios.tolist()
        return {"results": self.results, "retain_ratios": ratios, "validations": self._validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = {k: dict(v) for k, v in state_dict.get("results", {}).items()}
        ratios = state_dict.get("retain_ratios")
        self._retain_ratios = None if ratios is None else torch.tensor(ratios, dtype=torch.float64)
        self._validations = state_dict.get("validations", 0)

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.relearn_steps is not None and _is_sharded(pl_module.policy):
            raise NotImplementedError(_NO_SHARDED_RELEARN)  # now, not after training

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # here, not in on_fit_start: FSDP2 (ModelParallelStrategy) restores a resumed run's checkpoint,
        # and with it the rows already evaluated, only after on_fit_start
        self._prepare(trainer, pl_module)
        if self.retain_model is not None and "retain_only" not in self.results:
            reference = build_causal_lm(self.retain_model, pl_module.tokenizer).to(pl_module.device)
            reference.requires_grad_(False)
            row, self._retain_ratios = self._evaluate(trainer, pl_module, reference)
            if self._retain_ratios is not None:
                row["forget_quality"] = forget_quality(self._retain_ratios, self._retain_ratios)  # = 1
            self.results["retain_only"] = row
            del reference
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.at_fit_start and "start" not in self.results:
            self.results["start"], _ = self._evaluate_policy(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.every_n_validations == 0:
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        self._prepare(trainer, pl_module)
        values, _ = self._evaluate_policy(trainer, pl_module)
        for key, value in values.items():
            if math.isfinite(value):  # identical on every rank: the metric states were reduced
                pl_module.log(f"val/unlearn/{key}", value, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: the model is still on its device and the process group alive
        self._prepare(trainer, pl_module)
        self.results["unlearned"], _ = self._evaluate_policy(trainer, pl_module)
        if self.relearn_steps is not None:
            self.results["relearned"] = self._relearn(trainer, pl_module)
        self._write(trainer)

    # -- data -----------------------------------------------------------------------------------
    def _prepare(self, trainer: L.Trainer, pl_module) -> None:
        """Read and tokenize the evaluation records once; fail loudly on a missing split or field."""
        if self._items is not None:
            return
        dm = trainer.datamodule
        for name in ("eval_records", "encode_prompt", "encode_response"):
            if not callable(getattr(dm, name, None)):
                raise TypeError(
                    f"UnlearningEvaluation needs a DataModule with eval_records(), encode_prompt() and "
                    f"encode_response() (e.g. lit_align.data.ForgetRetainDataModule); {type(dm).__name__} has no {name}()"
                )
        records = dm.eval_records()
        unknown = sorted(set(records) - set(SPLITS))
        if unknown:
            raise ValueError(f"eval_records() returned unknown split(s) {unknown}; expected some of {SPLITS}")
        missing = [s for s in self.required_splits if not records.get(s)]
        if missing:
            raise ValueError(
                f"UnlearningEvaluation: required evaluation split(s) {missing} missing or empty (eval_records() "
                f"gave {sorted(k for k, v in records.items() if v)}). Give the DataModule an eval set for each "
                f"(e.g. data.eval_{missing[0]} or a {missing[0]} source), or drop it from the callback's required_splits."
            )
        self._items = {}
        for split in SPLITS:
            recs = list(records.get(split) or [])[: self.max_records]
            if recs:
                self._items[split] = [encode_record(r, dm.encode_prompt, dm.encode_response, f"eval_records()['{split}'][{i}]")
                                      for i, r in enumerate(recs)]

    # -- evaluation -----------------------------------------------------------------------------
    def _evaluate_policy(self, trainer: L.Trainer, pl_module, splits: Sequence[str] | None = None):
        with full_params(trainer):
            return self._evaluate(trainer, pl_module, pl_module.policy, splits)

    def _chunk(self, pl_module) -> int | None:
        return self.chunk_tokens or getattr(pl_module, "chunk_tokens", None)

    def _settings(self, pl_module) -> ScoreSettings:
        return ScoreSettings(batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, mia_k=self.mia_k,
                             truth_ratio_mean=self.truth_ratio_mean, chunk_tokens=self._chunk(pl_module),
                             rouge_stemmer=self.rouge_stemmer, mia_convention=self.mia_convention,
                             truth_ratio_question=self.truth_ratio_question)

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module, model: nn.Module,
                  splits: Sequence[str] | None = None) -> tuple[dict[str, float], Tensor | None]:
        """All metrics of ``model`` on ``splits`` (default all). Returns ``(values, forget truth ratios)``."""
        assert self._items is not None
        scorer = ModelScorer(model, pl_module.tokenizer, pl_module.device, self._settings(pl_module),
                             trainer.global_rank, trainer.world_size)
        splits = [s for s in (splits or SPLITS) if s in self._items]
        negative = "holdout" if "holdout" in self._items else ("retain" if "retain" in self._items else None)
        with eval_mode(model):
            values, ratios = score_splits(scorer, {s: self._items[s] for s in splits}, forget_splits=("forget",),
                                          mia_positive="forget", mia_negative=negative)
        forget_ratios = ratios.get("forget")
        if forget_ratios is not None and self._retain_ratios is not None:
            values["forget_quality"] = forget_quality(forget_ratios, self._retain_ratios)
        if "retain" in splits:
            parts = [values["retain_prob"], values["retain_rouge"]]
            if "retain_truth_ratio_score" in values:
                parts.append(values["retain_truth_ratio_score"])
            values["model_utility"] = harmonic_mean([max(0.0, p) for p in parts]) if all(map(math.isfinite, parts)) else float("nan")
        return values, forget_ratios

    # -- relearning attack ----------------------------------------------------------------------
    def _relearn(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        """Fine-tune a copy of the policy on a few forget records; its forget metrics and the deltas."""
        policy = pl_module.policy
        if _is_sharded(policy):
            raise NotImplementedError(_NO_SHARDED_RELEARN)
        assert self._items is not None
        with full_params(trainer):
            model = relearn_copy(policy, self._items["forget"], steps=self.relearn_steps, fraction=self.relearn_fraction,
                                 lr=self.relearn_lr, seed=self.relearn_seed, batch_size=self.batch_size,
                                 pad_id=pl_module.tokenizer.pad_token_id, device=pl_module.device,
                                 chunk_tokens=self._chunk(pl_module))
            values, _ = self._evaluate(trainer, pl_module, model, splits=["forget"])
        del model
        base = self.results.get("unlearned", {})
        for metric in RELEARN_DELTAS:
            key = f"forget_{metric}"
            if key in values and key in base:
                values[f"relearn_delta_{key}"] = values[key] - base[key]
        return values

    # -- reporting ------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        """Every column of :attr:`results`, in first-seen order."""
        return results_table(self.results, ROWS)[1]

    def format_table(self, columns: Sequence[str] | None = None) -> str:
        """The results as a fixed-width text table (rows = models)."""
        columns = list(columns or self.columns())
        rows = [r for r in ROWS if r in self.results] + [r for r in self.results if r not in ROWS]
        width = max([len("model"), *map(len, rows)])
        head = "model".ljust(width) + "".join(f"  {c:>{max(9, len(c))}}" for c in columns)
        lines = [head, "-" * len(head)]
        for r in rows:
            cells = []
            for c in columns:
                v = self.results[r].get(c)
                cells.append(f"  {'' if v is None else f'{v:.4g}':>{max(9, len(c))}}")
            lines.append(r.ljust(width) + "".join(cells))
        return "\n".join(lines)

    def _write(self, trainer: L.Trainer) -> None:
        directory = report_dir(trainer, self.dirpath)  # every rank calls it (a collective)
        if directory is None:
            return
        rows, columns, table = results_table(self.results, ROWS)
        path = write_csv(directory / "unlearning_eval.csv", ["model", *columns], table, comments=self.conventions)
        self.files["csv"] = path
        if self.plot:
            png = self._plot(directory / "unlearning_eval.png", rows)
            if png is not None:
                self.files["png"] = png
        flat = {f"unlearn/{r}/{c}": v for r in rows for c, v in self.results[r].items()}
        publish(trainer, "unlearning_eval", ["model", *columns], table, metrics=flat, image=self.files.get("png"))
        if self.verbose:
            shown = [c for c in PLOT_COLUMNS if c in columns]
            header = "".join(f"# {line}\n" for line in self.conventions)
            print(f"\nUnlearning evaluation (rows = models):\n{header}{self.format_table(shown)}")
            print(f"Full table: {path}" + (f"\nPlot: {self.files['png']}" if "png" in self.files else ""))

    def _plot(self, path: Path, rows: list[str]) -> Path | None:
        return grouped_bar_plot(path, {r: self.results[r] for r in rows}, PLOT_COLUMNS, title="Unlearning evaluation",
                                owner="UnlearningEvaluation")
