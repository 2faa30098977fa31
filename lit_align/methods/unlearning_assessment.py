"""The unlearning assessment (Liu et al., arXiv 2402.08787, and WAGLE's own evaluation, arXiv 2410.17509) as a
``lit-align test``.

:class:`UnlearningAssessmentModule` scores an ``original`` model, one or several ``unlearned`` models (seeds) and
optionally a ``retrain`` model (trained without the forget data) on the splits of
:class:`UnlearningAssessmentDataModule` (``in_scope``, ``hard_in_scope``, ``out_of_scope``, ``hard_out_of_scope``
and the utility sets ``real_authors``, ``world_facts``), with the scorer the unlearning callback uses
(:mod:`lit_align.unlearning.scoring`). :class:`~lit_align.callbacks.UnlearningAssessmentReport` writes the report.

Run: ``lit-align test -c configs/eval/unlearning_assessment/tiny.yaml``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_align.attacks.gcg import GCG, split_template
from lit_align.callbacks.run_cost import load_run_cost, peak_memory
from lit_align.data.tokenize import encode_prompt, encode_response
from lit_align.data.unlearning_assessment import (
    ASSESSMENT_SPLITS,
    EXTRA_SPLITS,
    UTILITY_SPLITS,
    check_records,
    check_splits,
    in_context_prompt,
    jailbreak_records,
    load_assessment_splits,
)
from lit_align.errors import ConfigError, check_choice, check_int, check_number
from lit_align.metrics.unlearning import embedding_accuracy, forget_quality, metric_conventions, seed_interval
from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer
from lit_align.retrieval import Encoder
from lit_align.unlearning.hygiene import named_weights, parameter_changes
from lit_align.unlearning.scoring import (
    EncodedRecord,
    ModelScorer,
    ScoreSettings,
    encode_record,
    relearn_copy,
    score_splits,
)

__all__ = ["AssessmentAttacks", "UnlearningAssessmentDataModule", "UnlearningAssessmentModule"]

#: Splits the efficacy side treats as "to forget" (truth-ratio score min(TR, 1/TR)).
FORGET_SPLITS = ("in_scope", "hard_in_scope")
#: Metrics whose relearning delta is reported (in_scope).
RELEARN_METRICS = ("rouge", "accuracy", "prob", "nll", "truth_ratio_score", "mc_accuracy")


def cut_per_kind(records: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records of each ``kind`` (records without one share a kind), in their order."""
    if limit is None:
        return list(records)
    seen: dict[Any, int] = {}
    out = []
    for rec in records:
        kind = rec.get("kind")
        if seen.get(kind, 0) < limit:
            seen[kind] = seen.get(kind, 0) + 1
            out.append(rec)
    return out


class UnlearningAssessmentDataModule(L.LightningDataModule):
    """The assessment's evaluation splits (:func:`lit_align.data.unlearning_assessment.load_assessment_splits`),
    checked in :meth:`setup` (before any model is loaded): a required split that is missing or empty, or a
    malformed record (``perturbed_responses`` / ``choices`` not a list of non-empty strings, ``label`` out of
    range), stops the run with an error naming the split, record and field. ``test_dataloader`` yields one batch:
    the assessment runs whole in one ``test_step``.

    Example::

        data:
          class_path: lit_align.methods.UnlearningAssessmentDataModule
          init_args: {source: "builtin:fictitious_facts", forget: forget10, max_records: 8}
    """

    def __init__(self, source: str = "builtin:fictitious_facts", forget: str = "forget10",
                 files: dict[str, str] | None = None, required_splits: list[str] | None = None,
                 max_records: int | None = None) -> None:
        """
        Args:
            source: ``builtin:fictitious_facts`` (every split), ``tofu`` (what TOFU has), see
                :func:`~lit_align.data.unlearning_assessment.load_assessment_splits`.
            forget: the forget split (in_scope = its records).
            files: ``{split: local file}`` giving or replacing a split.
            required_splits: splits that must be present and non-empty (default: the four assessment splits).
            max_records: keep only the first this-many records of each ``kind`` in each split (``None``: all),
                so a cut ``hard_in_scope`` still has paraphrased, indirect and multi-hop questions.
        """
        super().__init__()
        check_int("data.max_records", max_records, optional=True)
        self.source, self.forget, self.files = source, forget, dict(files or {})
        self.required_splits = list(ASSESSMENT_SPLITS if required_splits is None else required_splits)
        unknown = sorted(set(self.required_splits) - set(ASSESSMENT_SPLITS) - set(UTILITY_SPLITS) - set(EXTRA_SPLITS))
        if unknown:
            raise ConfigError(f"data.required_splits: unknown split(s) {unknown}; choose from "
                              f"{[*ASSESSMENT_SPLITS, *UTILITY_SPLITS, *EXTRA_SPLITS]}")
        self.max_records = max_records
        self.splits: dict[str, list[dict]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = load_assessment_splits(self.source, forget=self.forget, files=self.files or None)
        check_splits(splits, tuple(self.required_splits))
        for name, records in splits.items():
            check_records(records, f"data split {name!r}")
        self.splits = {k: cut_per_kind(v, self.max_records) for k, v in splits.items() if v}

    def test_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)


@dataclass
class AssessmentAttacks:
    """Robustness of the forgetting, each run on the original and every unlearned model (not on the
    retrain model) against the ``in_scope`` records; an attack's columns are ``<attack>.in_scope_<metric>``."""

    jailbreak_families: list[str] = field(default_factory=lambda: ["rephrase", "role_play"])
    """Jailbreak-style prompt families (:data:`~lit_align.data.unlearning_assessment.JAILBREAK_TEMPLATES`); each
    family's prompts are scored as ``jailbreak.<family>``; ``[]``: none."""
    icl_shots: int = 2
    """In-context relearning: this many other in-scope facts (question and answer, a seeded draw that never holds
    the queried fact) are put before each question (``icl_relearn``); 0: off."""
    relearn_steps: int | None = 3
    """Fine-tuning relearning: AdamW steps on a copy (``relearned``; the model itself is untouched); ``None``: off."""
    relearn_fraction: float = 0.25
    """Share of the in-scope records (seeded, at least one) the relearning copy trains on."""
    relearn_lr: float = 1e-3
    """Relearning learning rate (no weight decay). Size, rate and steps are not from a paper: report them."""
    gcg: GCG | None = None
    """A GCG suffix attack (``lit_align.attacks.GCG`` settings) per question of the first ``gcg_questions``
    in-scope records, target = the first ``gcg_target_tokens`` answer tokens (``gcg``); ``None``: off."""
    gcg_questions: int = 2
    """In-scope questions attacked with GCG."""
    gcg_target_tokens: int = 8
    """Answer tokens GCG tries to elicit."""
    seed: int = 0
    """Seed of the ICL fact choice and the relearning record choice."""

    def __post_init__(self) -> None:
        check_int("model.attacks.icl_shots", self.icl_shots, 0)
        check_int("model.attacks.relearn_steps", self.relearn_steps, 0, optional=True)
        check_number("model.attacks.relearn_fraction", self.relearn_fraction, positive=True)
        if self.relearn_fraction > 1:
            raise ConfigError(f"model.attacks.relearn_fraction: {self.relearn_fraction} is the share of in_scope "
                              "records the relearning attack trains on; give a value in (0, 1]")
        check_number("model.attacks.relearn_lr", self.relearn_lr, minimum=0.0)
        check_int("model.attacks.gcg_questions", self.gcg_questions)
        check_int("model.attacks.gcg_target_tokens", self.gcg_target_tokens)
        check_int("model.attacks.seed", self.seed, 0)


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class UnlearningAssessmentModule(L.LightningModule):
    """The unlearning assessment checklist (Liu et al., arXiv 2402.08787) on finished models; ``test_step`` only.

    Per model (``original``, each of ``unlearned``, ``retrain``) and per split (``in_scope``, ``hard_in_scope``,
    ``out_of_scope``, ``hard_out_of_scope``, ``real_authors``, ``world_facts``; and per ``kind`` inside
    ``hard_in_scope`` as ``hard_in_scope.<kind>``), the shared scorer's columns ``<split>_nll`` / ``_prob`` /
    ``_accuracy`` (answer tokens), ``<split>_rouge`` (ROUGE-L recall of the greedy answer, stemmed with
    ``rouge_stemmer``), ``<split>_truth_ratio`` and ``_truth_ratio_score`` (``truth_ratio_mean``), and
    ``<split>_mc_accuracy`` where records have choices; then:

    * ``mia_auc``: Min-K% Prob ROC-AUC, in_scope = members; non-members = the ``holdout`` split (never-trained
      texts, as open-unlearning) when the data has one, else out_of_scope (retained *training* data: then the
      open-unlearning column matches its direction, not its number; the header says which), in
      ``mia_convention`` (default ``forget_positive``: ~0.5 = forgotten-looking, 1.0 = every forget text less
      likely than every non-member text); ``mia_auc_open_unlearning`` (or ``mia_auc_forget_positive``) =
      1 - ``mia_auc``; ``mia_auc_hard``: the same with hard_in_scope = members, hard_out_of_scope = non-members
      (near the target, retained: ~0.5 = the two look alike); ``mia_auc_retain``: always in_scope = members,
      out_of_scope = non-members (WAGLE/TOFU's forget-vs-retain MIA), the MIA ``wagle_ue`` uses;
    * ``forget_quality``: KS-test p-value between the model's and the retrain model's in_scope truth ratios
      (with ``retrain``); ``forget_quality_hard``: the same on hard_in_scope; both left empty (None) for the
      ``retrain`` row itself (1 by construction), so they are not in its ``wagle_ue`` and have no gap to retrain;
    * attacks (``attacks``; original and unlearned models): ``jailbreak.<family>.in_scope_*``,
      ``gcg.in_scope_*`` and ``gcg_success``, ``icl_relearn.in_scope_*``, ``relearned.in_scope_*`` and
      ``relearn_delta_in_scope_<metric>`` (relearned minus the model's own value);
    * WAGLE (arXiv 2410.17509, with ``encoder``): ``wagle_fa`` = forget accuracy on the in_scope records' paraphrased
      questions (the greedy answer's embedding closer to the paraphrased answer than to every perturbed answer),
      ``<split>_embedding_accuracy`` for the utility splits (the same test on the greedy answer to the
      *original* question, the one ``<split>_rouge`` answers), and::

          wagle_ue = mean(1 - wagle_fa, 1 - in_scope_rouge, forget_quality, mia_auc_retain)
          wagle_ut = mean over s in utility_splits of (<s>_<utility_accuracy column>, <s>_rouge)

      over the terms that exist (``forget_quality`` needs ``retrain``; the report names the terms each row
      used). UT's "retain" set is ``out_of_scope`` by default (retained people sharing no entity with the forget
      set); ``hard_out_of_scope`` is retained data too, add it to ``utility_splits`` for the whole retain set.
      ``utility_accuracy: embedding`` needs ``encoder`` (else a ConfigError). WAGLE's
      code uses paraphrase-MiniLM-L6-v2; ``builtin:all-MiniLM-L6-v2`` is a different model, so FA is close to
      but not the paper's. TOFU's "accuracy" on the utility sets is not pinned down by the sources:
      ``utility_accuracy`` chooses ``embedding`` (FA's test, default), ``token`` (answer-token accuracy) or
      ``mc`` (multiple-choice accuracy, where records have choices);
    * efficiency and hygiene: ``changed_tensors`` / ``changed_parameters`` / ``changed_share`` of
      each unlearned model against the original (:func:`parameter_changes`; needs the original's weights kept on
      the CPU during the run: ``parameter_diff: false`` skips it), the unlearning run's cost from
      ``unlearned_run_cost`` (``run_cost.json`` of :class:`~lit_align.callbacks.RunCost`, else "not recorded")
      next to the retraining run's (``retrain_run_cost``), with GPU-hours = wall x world size on CUDA,
      this assessment's own wall time and peak memory, ``access`` and ``retain_data``.

    Several ``unlearned`` models are seeds of one method: the report gives their mean, a 95% Student-t
    interval and standard deviation over the seeds with a finite value (``unlearned_n_seeds`` counts them), and
    each seed's values; ``delta`` = unlearned mean - original,
    ``gap_to_retrain`` = unlearned mean - retrain.

    Models are loaded one at a time on this module's device, each with its own tokenizer; prompts are encoded
    as ``ForgetRetainDataModule`` does (``prompt_template``, ``chat_template``, ``response_template``), so set
    them as the models were trained (WAGLE's TOFU prompt format: ``prompt_template`` as
    ``TOFUDataModule(reference_format=true)`` sets it, ``chat_template: false``). One device.

    Run: ``lit-align test -c configs/eval/unlearning_assessment/tiny.yaml``. Example::

        model:
          class_path: lit_align.methods.UnlearningAssessmentModule
          init_args:
            original: {name_or_path: "builtin:tiny-tofu-full"}
            unlearned: [{name_or_path: run_seed0/hf_export}, {name_or_path: run_seed1/hf_export}]
            seeds: [0, 1]
            retrain: {name_or_path: "builtin:tiny-tofu-retain90"}
            unlearned_run_cost: [run_seed0/run_cost.json, run_seed1/run_cost.json]
            encoder: {class_path: lit_align.retrieval.SentenceEncoder,
                      init_args: {name_or_path: "builtin:all-MiniLM-L6-v2"}}
        data:
          class_path: lit_align.methods.UnlearningAssessmentDataModule
          init_args: {source: "builtin:fictitious_facts", forget: forget10}
    """

    def __init__(
        self,
        original: ModelSpec,
        unlearned: ModelSpec | list[ModelSpec],
        retrain: ModelSpec | None = None,
        seeds: list[int] | None = None,
        prompt_template: str | None = None,
        response_template: str | None = None,
        chat_template: bool | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        mia_k: float = 0.5,
        truth_ratio_mean: Literal["arithmetic", "geometric"] = "arithmetic",
        mia_convention: Literal["forget_positive", "open_unlearning"] = "forget_positive",
        rouge_stemmer: bool = True,
        truth_ratio_question: Literal["original", "paraphrased"] = "original",
        attacks: AssessmentAttacks | None = None,
        encoder: Encoder | None = None,
        utility_splits: list[str] | None = None,
        utility_accuracy: Literal["embedding", "token", "mc"] = "embedding",
        parameter_diff: bool = True,
        unlearned_run_cost: str | list[str] | None = None,
        retrain_run_cost: str | None = None,
        access: Literal["white_box", "black_box"] = "white_box",
        retain_data: str = "not recorded",
    ) -> None:
        """
        Args:
            original: the model before unlearning.
            unlearned: the unlearned model, or one per seed of the same method.
            retrain: the model trained without the forget data (forget quality, gap to retrain); ``None``: none.
            seeds: a label per unlearned model (default 0, 1, ...).
            prompt_template: ``str.format`` template with ``{prompt}`` applied to every question (as in training).
            response_template: template with ``{response}`` applied to every answer.
            chat_template: put questions through the tokenizer's chat template; ``None``: when it has one (as
                ``ForgetRetainDataModule`` and SFT do).
            batch_size: sequences per forward pass.
            max_new_tokens: greedy answer length in new tokens (ROUGE-L, FA); TOFU and WAGLE generate up to
                200 tokens in total, question included (the header states the length used).
            mia_k: K of Min-K% Prob (WAGLE: 0.5).
            truth_ratio_mean: ``arithmetic`` (WAGLE's code) or ``geometric`` (TOFU, open-unlearning).
            mia_convention: ``forget_positive`` (in_scope texts are the positives of ``mia_auc``; WAGLE's TOFU
                evaluation) or ``open_unlearning`` (its complement); the other one is reported too.
            rouge_stemmer: ROUGE-L with the Porter stemmer (TOFU and WAGLE score with it).
            truth_ratio_question: the truth ratio scores a' and the perturbed answers after the ``original``
                question (TOFU's and open-unlearning's code) or the ``paraphrased`` one (WAGLE's q').
            attacks: the robustness attacks (default :class:`AssessmentAttacks`; GCG off).
            encoder: sentence encoder for WAGLE's FA (``lit_align.retrieval.SentenceEncoder`` with
                ``builtin:all-MiniLM-L6-v2``, or ``HashEncoder`` in tests); ``None``: no FA, UE without it.
            utility_splits: the splits of WAGLE's UT (default: out_of_scope as the retain set, real_authors,
                world_facts).
            utility_accuracy: which accuracy enters UT (see the class doc).
            parameter_diff: count the weights each unlearned model changed (keeps the original's on the CPU).
            unlearned_run_cost: ``run_cost.json`` of the unlearning run (one, or one per seed).
            retrain_run_cost: ``run_cost.json`` of the retraining run (cost compared with retraining).
            access: the unlearning method needs weights and gradients (``white_box``) or only prompts
                (``black_box``); recorded in the report.
            retain_data: where the unlearning run's retain data came from and whether its format matched the
                forget data; recorded in the report.
        """
        super().__init__()
        self.unlearned = list(unlearned) if isinstance(unlearned, list) else [unlearned]
        if not self.unlearned:
            raise ConfigError("model.unlearned must name at least one unlearned model")
        self.seeds = list(range(len(self.unlearned))) if seeds is None else list(seeds)
        if len(self.seeds) != len(self.unlearned) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"model.seeds must give one distinct label per model.unlearned entry "
                              f"({len(self.unlearned)}), got {seeds}")
        costs = [] if unlearned_run_cost is None else (
            [unlearned_run_cost] if isinstance(unlearned_run_cost, str) else list(unlearned_run_cost))
        if costs and len(costs) != len(self.unlearned):
            raise ConfigError(f"model.unlearned_run_cost: give one run_cost.json per unlearned model "
                              f"({len(self.unlearned)}), got {len(costs)}")
        for key, path in [*((f"model.unlearned_run_cost[{i}]", c) for i, c in enumerate(costs)),
                          *([("model.retrain_run_cost", retrain_run_cost)] if retrain_run_cost else [])]:
            if not Path(path).is_file():  # now, not after every model was scored
                raise ConfigError(f"{key}: no file {path!r} (the run_cost.json that lit_align.callbacks.RunCost "
                                  "writes in the run's directory)")
        for key, tpl, name in (("prompt_template", prompt_template, "prompt"),
                               ("response_template", response_template, "response")):
            if tpl is not None and "{" + name + "}" not in tpl:
                raise ConfigError(f"model.{key} must contain {{{name}}}, got {tpl!r}")
        check_int("model.batch_size", batch_size)
        check_int("model.max_new_tokens", max_new_tokens)
        if not 0.0 < mia_k <= 1.0:
            raise ConfigError(f"model.mia_k must be in (0, 1], got {mia_k}")
        check_choice("model.truth_ratio_mean", truth_ratio_mean, ("arithmetic", "geometric"))
        check_choice("model.mia_convention", mia_convention, ("forget_positive", "open_unlearning"))
        check_choice("model.utility_accuracy", utility_accuracy, ("embedding", "token", "mc"))
        check_choice("model.access", access, ("white_box", "black_box"))
        check_choice("model.truth_ratio_question", truth_ratio_question, ("original", "paraphrased"))
        if utility_accuracy == "embedding" and encoder is None:
            raise ConfigError("model.utility_accuracy is 'embedding' (the default) but model.encoder is null: UT "
                              "would silently be ROUGE only. Set model.encoder (e.g. lit_align.retrieval."
                              "SentenceEncoder with builtin:all-MiniLM-L6-v2), or model.utility_accuracy: token / mc")
        self.utility_splits = list(utility_splits or ["out_of_scope", *UTILITY_SPLITS])
        unknown = sorted(set(self.utility_splits) - set(ASSESSMENT_SPLITS) - set(UTILITY_SPLITS))
        if unknown:
            raise ConfigError(f"model.utility_splits: unknown split(s) {unknown}")
        self.original, self.retrain = original, retrain
        self.prompt_template, self.response_template, self.chat_template = prompt_template, response_template, chat_template
        self.settings = ScoreSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, mia_k=mia_k,
                                      truth_ratio_mean=truth_ratio_mean, rouge_stemmer=rouge_stemmer,
                                      mia_convention=mia_convention, truth_ratio_question=truth_ratio_question)
        self.attacks = attacks or AssessmentAttacks()
        if self.attacks.gcg is not None:
            self.attacks.gcg.key = "model.attacks.gcg"
        self.encoder, self.utility_accuracy = encoder, utility_accuracy
        self.parameter_diff, self.run_cost_paths, self.access, self.retain_data = parameter_diff, costs, access, retain_data
        self.retrain_run_cost_path = retrain_run_cost
        self.results: dict[str, dict[str, float]] = {}
        """``{model row: {column: value}}``: ``original``, ``unlearned[<seed>]`` per seed, ``retrain``."""
        self.hygiene: dict[str, dict[str, Any]] = {}
        """Per unlearned row: :func:`parameter_changes` (names included)."""
        self.run_costs: dict[str, dict[str, Any] | str] = {}
        """Per unlearned row: the run_cost.json contents, or ``"not recorded"``."""
        self.cost: dict[str, Any] = {}
        """This assessment's own wall time and peak memory."""
        self.ue_terms: dict[str, list[str]] = {}
        """Per model row: the terms that entered its ``wagle_ue``."""
        self.ut_terms: dict[str, list[str]] = {}
        """Per model row: the columns that entered its ``wagle_ut``."""
        self.retrain_cost: dict[str, Any] | str = "not recorded"
        """The retraining run's run_cost.json contents (``retrain_run_cost``), or ``"not recorded"``."""
        self.mia_negative = "out_of_scope"
        """The split whose records were the MIA's non-members (``holdout`` when the data has one)."""
        self.split_sizes: dict[str, int] = {}

    # -- names ---------------------------------------------------------------------------------------------
    @property
    def unlearned_rows(self) -> list[str]:
        """Row names of the unlearned models: ``unlearned[<seed>]``."""
        return [f"unlearned[{s}]" for s in self.seeds]

    @property
    def model_rows(self) -> list[str]:
        """Every model row, in report order."""
        return ["original", *self.unlearned_rows, *(["retrain"] if self.retrain is not None else [])]

    def configure_optimizers(self) -> None:
        return None

    # -- the run -------------------------------------------------------------------------------------------
    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("UnlearningAssessmentModule runs on one device (set trainer.devices: 1)")
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, UnlearningAssessmentDataModule) or datamodule.splits is None:
            raise ConfigError("UnlearningAssessmentModule reads a lit_align.methods.UnlearningAssessmentDataModule "
                              f"(data.class_path), got {type(datamodule).__name__}")
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        splits = datamodule.splits
        self.split_sizes = {k: len(v) for k, v in splits.items()}
        ratios: dict[str, dict[str, Tensor]] = {}
        original_state: dict[str, Tensor] | None = None
        specs = [("original", "model.original", self.original, True),
                 *((row, f"model.unlearned[{i}]", spec, True) for i, (row, spec) in enumerate(zip(self.unlearned_rows,
                                                                                                  self.unlearned))),
                 *([("retrain", "model.retrain", self.retrain, False)] if self.retrain is not None else [])]
        for row, key, spec, attack in specs:
            tokenizer = build_tokenizer(spec, key=key)
            with torch.inference_mode(False):  # normal tensors: the relearning copy and GCG take gradients
                model = build_causal_lm(spec, tokenizer).to(self.device).eval()
                model.requires_grad_(False)
            try:
                self.results[row], ratios[row] = self._assess(model, tokenizer, splits, attack)
                if self.parameter_diff and row == "original":
                    original_state = {k: v.to("cpu", copy=True) for k, v in named_weights(model).items()}
                elif self.parameter_diff and row.startswith("unlearned") and original_state is not None:
                    self.hygiene[row] = parameter_changes(original_state, named_weights(model))
                    for k in ("changed_tensors", "changed_parameters", "changed_share"):
                        self.results[row][k] = float(self.hygiene[row][k])
            finally:
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        del original_state
        self._cross_model(ratios)
        for i, row in enumerate(self.unlearned_rows):
            self.run_costs[row] = self._read_cost(i)
        if self.retrain_run_cost_path:
            self.retrain_cost = load_run_cost(self.retrain_run_cost_path)
        peak, source = peak_memory(self.device)
        self.cost = {"wall_seconds": time.perf_counter() - start, "peak_memory_bytes": peak,
                     "peak_memory_source": source, "device": str(self.device)}
        for row in self.unlearned_rows:
            for key in ("wagle_ue", "wagle_ut", "in_scope_rouge", "mia_auc", "forget_quality"):
                value = self.results[row].get(key)
                if value is not None and math.isfinite(value):
                    self.log(f"test/{row}/{key}", value, batch_size=1)

    def _read_cost(self, i: int) -> dict[str, Any] | str:
        if not self.run_cost_paths:
            return "not recorded"
        return load_run_cost(self.run_cost_paths[i])

    def _chat(self, tokenizer) -> bool:
        chat = self.chat_template if self.chat_template is not None else bool(tokenizer.chat_template)
        if chat and not tokenizer.chat_template:
            raise ConfigError("model.chat_template is true but the tokenizer has no chat template")
        return chat

    def _encoders(self, tokenizer):
        chat = self._chat(tokenizer)

        def prompt(text: str) -> list[int]:
            if self.prompt_template is not None:
                text = self.prompt_template.format(prompt=text)
            return encode_prompt(tokenizer, text, chat)

        def response(text: str) -> list[int]:
            if self.response_template is not None:
                text = self.response_template.format(response=text)
            return encode_response(tokenizer, text)

        return prompt, response

    def _encode(self, records: Sequence[Mapping[str, Any]], split: str, tokenizer) -> list[EncodedRecord]:
        prompt, response = self._encoders(tokenizer)
        return [encode_record(r, prompt, response, f"data split {split!r}, record {i}") for i, r in enumerate(records)]

    @torch.no_grad()
    def _assess(self, model: nn.Module, tokenizer, splits: Mapping[str, list[dict]], attack: bool
                ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Every column of one model; its truth ratios on the forget-side splits."""
        scorer = ModelScorer(model, tokenizer, self.device, self.settings)
        names = [s for s in (*ASSESSMENT_SPLITS, *UTILITY_SPLITS) if splits.get(s)]
        items = {s: self._encode(splits[s], s, tokenizer) for s in names}
        self.mia_negative = "holdout" if splits.get("holdout") else "out_of_scope"
        if splits.get("holdout"):
            items["holdout"] = self._encode(splits["holdout"], "holdout", tokenizer)
        values, ratios = score_splits(scorer, items, forget_splits=FORGET_SPLITS, mia_positive="in_scope",
                                      mia_negative=self.mia_negative,
                                      mia_pairs={"mia_auc_retain": ("in_scope", "out_of_scope"),
                                                 "mia_auc_hard": ("hard_in_scope", "hard_out_of_scope")})
        if "mia_auc" in values:  # both conventions: the other one's column is the complement
            other = "open_unlearning" if self.settings.mia_convention == "forget_positive" else "forget_positive"
            values[f"mia_auc_{other}"] = 1.0 - values["mia_auc"]
        kinds: dict[str, list[EncodedRecord]] = {}
        for it in items.get("hard_in_scope", []):
            kinds.setdefault(str(it.record.get("kind") or "unlabelled"), []).append(it)
        for kind, group in kinds.items():
            values.update(scorer.score_split(f"hard_in_scope.{kind}", group, forget_side=True)[0])
        if self.encoder is not None:
            if any(it.perturbed for it in items.get("in_scope", [])):
                values["wagle_fa"] = self._embedding_accuracy(scorer, items["in_scope"], paraphrased=True)
            for s in self.utility_splits:
                if any(it.perturbed for it in items.get(s, [])):  # the test needs perturbed answers
                    values[f"{s}_embedding_accuracy"] = self._embedding_accuracy(scorer, items[s], paraphrased=False)
        if attack and "in_scope" in items:
            values.update(self._attacks(model, tokenizer, scorer, splits["in_scope"], items["in_scope"], values))
        return values, {s: ratios[s] for s in FORGET_SPLITS if s in ratios}

    def _embedding_accuracy(self, scorer: ModelScorer, items: list[EncodedRecord], *, paraphrased: bool) -> float:
        """FA's test over the records with perturbed answers: the greedy answer to the paraphrased question
        (``paraphrased``, WAGLE's FA) or to the original one (utility sets, the question ROUGE-L answers)."""
        usable = [it for it in items if it.perturbed]
        if not usable:
            return float("nan")
        prompts = [it.para_prompt if paraphrased else it.prompt for it in usable]
        answers = scorer.greedy_answers(prompts, prompts[0])
        truths = [it.record.get("paraphrased_response") or it.response_text for it in usable]
        return embedding_accuracy(self.encoder, answers, truths, [it.record["perturbed_responses"] for it in usable])

    # -- attacks ---------------------------------------------------------------------------------
    def _attacks(self, model: nn.Module, tokenizer, scorer: ModelScorer, records: list[dict],
                 items: list[EncodedRecord], own: Mapping[str, float]) -> dict[str, float]:
        a, values = self.attacks, {}
        if a.jailbreak_families:
            jail = jailbreak_records(records, families=tuple(a.jailbreak_families))
            by_family: dict[str, list[dict]] = {}
            for r in jail:
                by_family.setdefault(str(r.get("kind")), []).append(r)
            for family, recs in by_family.items():
                name = f"jailbreak.{family}"
                values.update(scorer.score_split(f"{name}.in_scope", self._encode(recs, name, tokenizer),
                                                 forget_side=True)[0])
        if a.icl_shots:
            values.update(scorer.score_split("icl_relearn.in_scope", self._encode(self._icl(records), "icl_relearn",
                                                                                   tokenizer), forget_side=True)[0])
        if a.gcg is not None:
            values.update(self._gcg(model, tokenizer, scorer, items[: a.gcg_questions]))
        if a.relearn_steps is not None:
            copied = relearn_copy(model, items, steps=a.relearn_steps, fraction=a.relearn_fraction,
                                  lr=a.relearn_lr, seed=a.seed, batch_size=self.settings.batch_size,
                                  pad_id=tokenizer.pad_token_id, device=self.device)
            copied.requires_grad_(False)
            relearned = ModelScorer(copied, tokenizer, self.device, self.settings).score_split(
                "relearned.in_scope", items, forget_side=True)[0]
            del copied
            values.update(relearned)
            for metric in RELEARN_METRICS:
                key = f"in_scope_{metric}"
                if f"relearned.{key}" in relearned and key in own:
                    values[f"relearn_delta_{key}"] = relearned[f"relearned.{key}"] - own[key]
        return values

    def _icl(self, records: list[dict]) -> list[dict]:
        """Each in-scope record after ``icl_shots`` other in-scope facts
        (:func:`~lit_align.data.unlearning_assessment.in_context_prompt`, seeded per record); the paraphrased
        question, which the truth ratio reads, gets the same facts."""
        out = []
        for i, r in enumerate(records):
            try:
                prompt = in_context_prompt(r, records, self.attacks.icl_shots, seed=self.attacks.seed + i)
            except ValueError as err:
                raise ConfigError(f"model.attacks.icl_shots: {err}") from err
            new = {**r, "prompt": prompt, "kind": "icl_relearn"}
            if isinstance(r.get("paraphrased_prompt"), str):
                new["paraphrased_prompt"] = prompt[: len(prompt) - len(r["prompt"])] + r["paraphrased_prompt"]
            out.append(new)
        return out

    def _gcg(self, model: nn.Module, tokenizer, scorer: ModelScorer, items: list[EncodedRecord]) -> dict[str, float]:
        """GCG suffixes eliciting each question's answer; the suffixed prompts scored as ``gcg.in_scope``."""
        attack, attacked, successes = self.attacks.gcg, [], 0
        chat = self._chat(tokenizer)
        if chat and self.prompt_template is not None:
            raise ConfigError("model.attacks.gcg with a chat template and model.prompt_template is not supported "
                              "(the suffix slot must sit in one template); set one of them, or gcg: null")
        template = None if chat else (self.prompt_template or "{prompt}")
        for it in items:
            before, after = split_template(tokenizer, it.record["prompt"], chat_template=chat, template=template)
            target = [t for t in it.response if t != tokenizer.eos_token_id][: self.attacks.gcg_target_tokens]
            with torch.inference_mode(False), torch.enable_grad():
                result = attack(model, tokenizer, before, after, target)
            successes += int(result.success)
            attacked.append(EncodedRecord(prompt=[*before, *result.suffix_ids, *after], response=it.response,
                                          response_text=it.response_text, record=it.record))
        values = scorer.score_split("gcg.in_scope", attacked, forget_side=True)[0]
        values["gcg_success"] = successes / len(items)
        return values

    # -- across models -------------------------------------------------------------------------------------
    def _cross_model(self, ratios: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Forget quality against the retrain model (in_scope, and hard_in_scope as ``forget_quality_hard``),
        then WAGLE's UE and UT per model, recording the terms each row used."""
        target = ratios.get("retrain") or {}
        for row in self.model_rows:
            mine = ratios.get(row) or {}
            for split, column in (("in_scope", "forget_quality"), ("hard_in_scope", "forget_quality_hard")):
                # KS(retrain, retrain) = 1 by construction: the retrain row's cell is left empty, not a result
                if row != "retrain" and split in target and split in mine:
                    self.results[row][column] = forget_quality(mine[split], target[split])
        acc = {"embedding": "embedding_accuracy", "token": "accuracy", "mc": "mc_accuracy"}[self.utility_accuracy]
        for row in self.model_rows:
            v = self.results[row]
            terms = {"1 - wagle_fa": 1.0 - v["wagle_fa"] if "wagle_fa" in v else None,
                     "1 - in_scope_rouge": 1.0 - v["in_scope_rouge"] if "in_scope_rouge" in v else None,
                     "forget_quality": v.get("forget_quality")}
            retain = v.get("mia_auc_retain")  # WAGLE's MIA: forget = 1 vs retain = 0, forget-positive
            if self.settings.mia_convention == "forget_positive":
                terms["mia_auc_retain"] = retain
            else:
                terms["1 - mia_auc_retain"] = None if retain is None else 1.0 - retain
            used = {k: t for k, t in terms.items() if t is not None and math.isfinite(t)}
            self.ue_terms[row] = list(used)
            if used:
                v["wagle_ue"] = _mean(list(used.values()))
            ut = {f"{s}_{m}": v[f"{s}_{m}"] for s in self.utility_splits for m in (acc, "rouge")
                  if v.get(f"{s}_{m}") is not None and math.isfinite(v[f"{s}_{m}"])}
            self.ut_terms[row] = list(ut)
            if ut:
                v["wagle_ut"] = _mean(list(ut.values()))

    # -- the report's table --------------------------------------------------------------------------------
    def conventions(self) -> list[str]:
        """Header lines naming every convention (truth-ratio mean and question, MIA AUC and its non-members,
        ROUGE stemming, generation length, the UE/UT terms of each row, the seeds behind each interval)."""
        s = self.settings
        lines = metric_conventions(truth_ratio_mean=s.truth_ratio_mean, mia_convention=s.mia_convention,
                                   rouge_stemmer=s.rouge_stemmer, truth_ratio_question=s.truth_ratio_question)
        other = "open_unlearning" if s.mia_convention == "forget_positive" else "forget_positive"
        if self.mia_negative == "holdout":
            members = "non-members = the holdout split (never trained on, as open-unlearning's holdout)"
        else:
            members = ("non-members = out_of_scope = retained training data, not open-unlearning's holdout (the "
                       "open-unlearning-convention column matches its direction only, not its value)")
        lines.append(f"mia_auc: in_scope = members, {members}; Min-K% K = {s.mia_k}; mia_auc_{other} = 1 - mia_auc; "
                     "mia_auc_retain: in_scope = members, out_of_scope = non-members (WAGLE's forget-vs-retain MIA, "
                     "the one wagle_ue uses, whatever mia_auc's non-members); "
                     "mia_auc_hard: hard_in_scope = members, hard_out_of_scope = non-members")
        if self.retrain is not None:
            lines.append("retrain row: forget_quality and forget_quality_hard left empty (KS of retrain against "
                         "itself is 1 by construction); they are not in its wagle_ue, and gap_to_retrain is empty")
        lines.append(f"generation: greedy, at most {s.max_new_tokens} new tokens after the question (ROUGE-L, FA); "
                     "TOFU and WAGLE allow 200 tokens in total, question included")
        acc = {"embedding": "embedding_accuracy", "token": "accuracy", "mc": "mc_accuracy"}[self.utility_accuracy]
        lines.append(f"wagle_ut = mean of <split>_{acc} and <split>_rouge over the utility splits "
                     f"{self.utility_splits} (out_of_scope = the retain set of UT: retained people sharing no entity "
                     "with the forget set; utility answers are to the original question)")
        for row in self.model_rows:
            if row in self.ue_terms or row in self.ut_terms:
                lines.append(f"{row}: wagle_ue = mean(" + ", ".join(self.ue_terms.get(row) or ["-"]) + "); "
                             "wagle_ut = mean(" + ", ".join(self.ut_terms.get(row) or ["-"]) + ")")
        if self.encoder is not None:
            lines.append(f"wagle_fa encoder: {self.encoder.fingerprint()} (WAGLE used paraphrase-MiniLM-L6-v2)")
        if len(self.seeds) > 1:
            lines.append(f"unlearned: mean over the seeds {self.seeds} with a finite value (unlearned_n_seeds "
                         f"counts them, of {len(self.seeds)}), 95% Student-t interval, sample std")
        return lines

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """The long table: one row per metric; columns ``metric``, ``original``, ``unlearned`` (mean over seeds),
        with several seeds ``unlearned_ci_low`` / ``unlearned_ci_high`` / ``unlearned_std`` /
        ``unlearned_n_seeds`` (the seeds with a finite value, which the interval covers), ``delta``
        (unlearned - original), ``retrain`` and ``gap_to_retrain`` with a retrain model, then ``unlearned[<seed>]``
        per seed with several seeds."""
        seeds = self.unlearned_rows
        many, retrain = len(seeds) > 1, self.retrain is not None
        header = ["metric", "original", "unlearned", *(["unlearned_ci_low", "unlearned_ci_high", "unlearned_std",
                                                        "unlearned_n_seeds"] if many else []),
                  "delta", *(["retrain", "gap_to_retrain"] if retrain else []), *(seeds if many else [])]
        metrics = list(dict.fromkeys(k for row in self.model_rows for k in self.results.get(row, {})))
        rows = []
        for m in metrics:
            per_seed = [self.results[r].get(m) for r in seeds]
            mean, low, high, std, n = seed_interval(per_seed)
            orig = self.results["original"].get(m)
            line = [m, orig, mean, *([low, high, std, n] if many else []),
                    None if orig is None or not math.isfinite(mean) else mean - orig]
            if retrain:
                ret = self.results["retrain"].get(m)
                line += [ret, None if ret is None or not math.isfinite(mean) else mean - ret]
            line += per_seed if many else []
            rows.append(line)
        return header, rows
