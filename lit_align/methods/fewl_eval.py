"""FEWL as an evaluation run: answer a question pool with every model, score the answers without gold labels."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_align.data.fewl import FEWLBatch, FEWLDataModule, FEWLQuestion
from lit_align.data.fewshot import FewShotTemplate, build_fewshot_prompt
from lit_align.data.records import DataSource, load_records
from lit_align.engine.seeds import derive_seed
from lit_align.errors import ConfigError, DataError, check_choice, check_int, check_number
from lit_align.metrics.fewl import (
    FEWL,
    FEWLItem,
    FEWLScorer,
    FEWLTerms,
    fewl_expertise,
    fewl_terms,
    select_by_fewl,
    select_demonstrations,
)
from lit_align.models import ModelSpec
from lit_align.retrieval import GenerationCache, GenerationReport, Retriever, Similarity
from lit_align.retrieval.generation import cut_at_stop
from lit_align.retrieval.loaded import LoadedModel, loaded_model
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["FEWLEvaluationModule", "FEWLOptions", "PromptConfig", "SyntheticConfig", "answer_text",
           "load_demonstrations"]

#: The default IW prompt (written in the spirit of the paper's appendix, not copied from it: the paper's exact
#: wording is not available here). ``{question}`` is replaced.
WRONG_PROMPT = ("Question: {question}\nWrite a short answer to this question that is intentionally wrong: it must "
                "state a false fact in one sentence.\nWrong answer:")
#: The default CO prompt: the corrected version of one IW answer, its negation. ``{question}``, ``{wrong}``.
CORRECTED_PROMPT = ("Question: {question}\nWrong answer: {wrong}\nCorrect the wrong answer by negating it: write one "
                    "sentence saying that it is not true.\nCorrected answer:")
#: ``synthetic.source: dataset``: CO answer = this template over each IW answer of the record.
NEGATION = "It is not true that {wrong}"

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DATA = "data"  # the evaluated "model" of the answers given with the data
#: warn when more than this fraction of one purpose's generations is empty (after the stop strings)
EMPTY_WARN_FRACTION = 0.05


@dataclass
class PromptConfig:
    """How a question (or an IW / CO request) is put to a model."""

    template: str = "{question}"
    """The text a model answers; ``{question}`` is replaced by the question."""
    chat_template: bool | None = None
    """Render the text as a user turn with the model's chat template; ``None``: when its tokenizer has one."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """An answer is cut at the first of these strings (short-form QA: one line)."""
    batch_size: int = 32
    """Prompts per generation batch."""
    demonstrations: str | None = None
    """In-context learning: a JSONL file of ``{"question", "answer"}`` demonstrations (e.g. the
    ``demonstrations.jsonl`` an earlier FEWL run selected) put before the question in every evaluated model's
    answer prompt, laid out by ``fewshot`` with no instruction; a demonstration of the question itself is left out
    of that question's prompt. References, IW/CO and candidate prompts stay zero-shot. ``null``: zero-shot."""
    fewshot: FewShotTemplate = field(default_factory=FewShotTemplate)
    """The layout of ``demonstrations`` (``example`` per demonstration, then ``query``); the demonstrations'
    questions and the evaluated question both go through ``template`` first."""

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ConfigError(f"model.prompt.template must contain {{question}}, got {self.template!r}")
        check_int("model.prompt.batch_size", self.batch_size)
        if self.demonstrations is not None and not Path(self.demonstrations).is_file():
            raise ConfigError(f"model.prompt.demonstrations: no file {self.demonstrations!r} (a JSONL of "
                              "{\"question\", \"answer\"} rows, e.g. an earlier FEWL run's demonstrations.jsonl)")

    def question_text(self, question: str, demos: list[tuple[str, str]]) -> str:
        """``question`` through ``template``; with ``demos``, after them in the ``fewshot`` layout, leaving out a
        demonstration whose question is ``question`` itself."""
        text = self.template.format(question=question)
        if self.demonstrations is None:
            return text
        shots = [(self.template.format(question=q), a) for q, a in demos if q.strip() != question.strip()]
        return build_fewshot_prompt(self.fewshot, shots, text)


def load_demonstrations(path: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a demonstrations JSONL file (``model.prompt.demonstrations``)."""
    try:
        records = load_records(DataSource(path), required=("question", "answer"))
    except DataError as err:
        raise DataError(f"model.prompt.demonstrations: {err}") from err
    return [(r["question"].strip(), r["answer"].strip()) for r in records]


@dataclass
class SyntheticConfig:
    """Where the R pairs of intentionally wrong (IW) and corrected (CO) answers per question come from."""

    source: Literal["dataset", "model"] = "dataset"
    """``dataset``: IW = the first ``num_pairs`` wrong answers of each record (``wrong``, TruthfulQA's
    ``incorrect_answers``, the fictitious facts' ``perturbed_answers``), CO = ``negation`` over each;
    ``model``: both generated by ``synthesizer`` from ``wrong_prompt`` and ``corrected_prompt``."""
    num_pairs: int = 25
    """R, the IW/CO pairs per question (the paper: 25)."""
    synthesizer: ModelSpec | None = None
    """The model that writes IW and CO answers (``source: model``)."""
    wrong_prompt: str = WRONG_PROMPT
    """The IW request (``{question}``); each of the R IW answers is sampled with its own seed."""
    corrected_prompt: str = CORRECTED_PROMPT
    """The CO request (``{question}``, ``{wrong}``), one per IW answer."""
    negation: str = NEGATION
    """``source: dataset``: the CO answer of an IW answer (``{wrong}``)."""
    sampling: SamplingConfig | None = None
    """How the synthesizer samples (default: temperature 1, 48 new tokens)."""

    def __post_init__(self) -> None:
        check_choice("model.synthetic.source", self.source, ("dataset", "model"))
        check_int("model.synthetic.num_pairs", self.num_pairs)
        if self.source == "model" and self.synthesizer is None:
            raise ConfigError("model.synthetic.synthesizer must be a model spec when model.synthetic.source is "
                              "'model' (or use source: dataset, IW answers from the records)")
        for key, text, names in (("wrong_prompt", self.wrong_prompt, ("{question}",)),
                                 ("corrected_prompt", self.corrected_prompt, ("{wrong}",)),
                                 ("negation", self.negation, ("{wrong}",))):
            if not all(n in text for n in names):
                raise ConfigError(f"model.synthetic.{key} must contain {', '.join(names)}, got {text!r}")
        self.sampling = self.sampling or SamplingConfig(max_new_tokens=48, do_sample=True)
        if self.source == "model" and self.num_pairs > 1 and not self.sampling.do_sample:
            raise ConfigError(f"model.synthetic.sampling.do_sample is false: greedy decoding writes one IW answer "
                              f"{self.num_pairs} times (and one CO answer), so the R-pair average collapses to one "
                              "pair; sample (do_sample: true) or set num_pairs: 1")


@dataclass
class FEWLOptions:
    """How FEWL turns similarities into a score (Wei et al. 2024, §5(b); the algebra is reconstructed)."""

    form: Literal["contrast", "disagreement"] = "contrast"
    """Expertise: mean SIM to CO minus mean SIM to IW (``contrast``), or 1 - mean SIM to IW (the paper's v1)."""
    temperature: float = 1.0
    """Softmax temperature of the expertise weights (not given by the sources: 1)."""
    weights: Literal["fewl", "uniform"] = "fewl"
    """``fewl``: per-question expertise weights; ``uniform``: 1/N (the ablation)."""
    laziness: bool = True
    """Subtract the laziness penalty over the K neighbour questions."""
    divergence: Literal["tv", "kl", "js"] = "tv"
    """The f-divergence of the variational form: ``tv`` (the paper's main text, FEWL = T - P), or the reconstructed
    ``kl`` / ``js`` forms of its appendix (see :mod:`lit_align.metrics.fewl`)."""

    def __post_init__(self) -> None:
        check_choice("model.fewl.form", self.form, ("contrast", "disagreement"))
        check_choice("model.fewl.weights", self.weights, ("fewl", "uniform"))
        check_choice("model.fewl.divergence", self.divergence, ("tv", "kl", "js"))
        check_number("model.fewl.temperature", self.temperature, positive=True)


@dataclass
class _Pool:
    """Every text the scores need (Q questions, N reference answers, R pairs), generated only where needed: the
    references of the scored questions and of their neighbours, everything else for the scored questions ([] /
    ``None`` elsewhere)."""

    questions: list[FEWLQuestion]
    scored: list[int]  # the pool positions the test batches score (all of them unless the run is limited)
    references: list[list[str]]  # Q x N
    wrong: list[list[str]]  # Q x R
    corrected: list[list[str]]  # Q x R
    answers: dict[str, list[str | None]]  # model name -> Q answers
    candidates: list[list[str]]  # Q x C_q


class FEWLEvaluationModule(L.LightningModule):
    """FEWL (Wei et al. 2024, arXiv:2402.10412): a hallucination score for answers with no gold answer, as a
    ``lit-align test`` run over a question pool (:class:`~lit_align.data.FEWLDataModule`).

    Before the first batch (``on_test_start``), for the questions the test batches will score (the whole pool,
    or the first batches under ``trainer.limit_test_batches`` / ``fast_dev_run``):

    1. the neighbours of every question: the ``k`` nearest other questions by ``retriever`` (the question itself
       and near-duplicates above ``retriever.near_duplicate`` excluded, §5(h)2);
    2. reference answers: each of ``references`` answers every scored question and every neighbour of one
       ``samples_per_reference`` times, sampled
       with ``reference_sampling`` (the paper's "several diversified answers from one reference LLM"): N =
       len(references) x samples_per_reference reference answers per question; the neighbours' reference answers
       are these same answers;
    3. R IW and CO answers per question (``synthetic``);
    4. the evaluated answers: each model of ``evaluated`` answers greedily (``answer_sampling``; with
       ``prompt.demonstrations``, after those in-context demonstrations); with no model,
       the records' ``answer`` field is scored as model ``data``; with ``candidates: n``, ``candidate_model``
       also samples n candidate answers per question (added to the records' own ``candidates``).

    Every generation goes through one :class:`~lit_align.retrieval.GenerationCache` (``cache``), keyed by the
    model's weights, its tokenizer, the prompt, the sampling settings and the seed (``(seed, purpose, pool row)`` through
    :func:`~lit_align.engine.seeds.derive_seed`), so a rerun generates nothing; :attr:`generation_log` keeps each
    one with its model, purpose, prompt (as the model read it) and seed (§5(h)1: results depend on these prompts). Each test step then
    scores its questions: SIM(premise, hypothesis) in one fixed order (§5(h)4): premise = reference answer,
    hypothesis = evaluated answer (truthfulness, laziness); premise = IW / CO answer, hypothesis = reference
    answer (expertise); expertise weights are per question (§5(h)5).

    A text is the continuation with leading whitespace removed, cut at the first ``prompt.stop`` string. Empty texts
    are counted (``test/empty/<model>``; a warning when over 5% of one purpose), never selected as a candidate.

    Logged: ``test/fewl/<model>`` (mean FEWL over questions), ``test/truthfulness/<model>``,
    ``test/laziness/<model>``, ``test/empty/<model>`` (empty answers), ``test/generated`` (prompts generated, 0 when
    everything was cached). Kept for the report (:class:`~lit_align.callbacks.FEWLReport`, which ``lit-align test``
    adds when the trainer has none, writes them: per-question scores, the model ranking, ``selected.jsonl``, ``demonstrations.jsonl``,
    ``selection.json``): :attr:`results`, :meth:`score_rows` (per model and question:
    answer, FEWL, T, P, lambda per reference answer), :meth:`ranking`, :meth:`sft_rows` (label-free SFT: per
    question the highest-FEWL candidate as ``{"prompt", "response"}``; ties: the first candidate, the records'
    own before sampled ones; the sources do not give the rule, top-1 per question is this module's choice) and
    :attr:`demonstration_rows` (ICL: the ``demonstrations`` highest-FEWL selected pairs, one per question, ties
    by pool order; without candidates, among ``candidate_model``'s answers); :meth:`selection_manifest` says how
    they were made. Train on the selection with ``lit-align fit -c configs/fewl/sft_tiny.yaml``; compare vanilla
    with FEWL-selected ICL by a second run with ``prompt.demonstrations`` set to the first run's
    ``demonstrations.jsonl``.

    One device (the pool is generated whole before scoring). Consensus is not truth: FEWL rewards a misconception
    every reference shares (§5(h)3).

    Run: ``lit-align test -c configs/fewl/tiny.yaml``.
    """

    def __init__(
        self,
        references: list[ModelSpec],
        similarity: Similarity,
        retriever: Retriever,
        evaluated: dict[str, ModelSpec] | None = None,
        samples_per_reference: int = 1,
        k: int = 25,
        synthetic: SyntheticConfig | None = None,
        fewl: FEWLOptions | None = None,
        prompt: PromptConfig | None = None,
        reference_sampling: SamplingConfig | None = None,
        answer_sampling: SamplingConfig | None = None,
        candidates: int = 0,
        candidate_model: str | None = None,
        candidate_sampling: SamplingConfig | None = None,
        demonstrations: int = 0,
        cache: str | None = "auto",
        seed: int = 0,
    ) -> None:
        """
        Args:
            references: the reference LLMs (at least one).
            similarity: SIM(premise, hypothesis) in [0, 1] (``lit_align.retrieval.CrossEncoderSimilarity`` for HHEM,
                ``EmbeddingCosine``, ``TokenJaccard``...).
            retriever: finds the neighbour questions (``lit_align.retrieval.Retriever`` with an encoder and a
                ``near_duplicate`` threshold).
            evaluated: name -> model under test (names: letters, digits, ``_.-``); ``null``: the records' answers.
            samples_per_reference: diversified answers sampled from each reference per question.
            k: neighbour questions per question (the paper: 25).
            synthetic: the IW/CO source (default: from the records, R = 25).
            fewl: the score's options (expertise form, temperature, weights, laziness, divergence).
            prompt: how questions are put to models (template, chat template, stop strings, batch size).
            reference_sampling: how references answer (default: sampled, temperature 1, 48 new tokens).
            answer_sampling: how evaluated models answer (default: greedy, 48 new tokens).
            candidates: candidate answers sampled per question from ``candidate_model`` for label-free SFT (0: none).
            candidate_model: the evaluated model whose candidates / demonstrations are chosen (default: the first).
            candidate_sampling: how candidates are sampled (default: temperature 1, 48 new tokens).
            demonstrations: ICL demonstrations written to ``demonstrations.jsonl`` (0: none); a later run reads
                them with ``prompt.demonstrations``.
            cache: the generation cache: ``auto`` (``<trainer.default_root_dir>/fewl_generations.jsonl``, shared by
                reruns), a .jsonl path, or ``null`` (in memory only).
            seed: the seed every sampled generation is derived from.
        """
        super().__init__()
        if not references:
            raise ConfigError("model.references must list at least one reference model (FEWL weighs reference "
                              "answers; with one reference, sample several answers: samples_per_reference)")
        check_int("model.samples_per_reference", samples_per_reference)
        check_int("model.k", k)
        check_int("model.candidates", candidates, 0)
        check_int("model.demonstrations", demonstrations, 0)
        check_int("model.seed", seed, 0)
        for name in evaluated or {}:
            if not _NAME.match(name) or name == _DATA:
                raise ConfigError(f"model.evaluated: model name {name!r} must be letters, digits, '_', '.' or '-' "
                                  f"(and not {_DATA!r}, the name of the records' answers)")
        names = list(evaluated or {}) or [_DATA]
        if candidate_model is not None and candidate_model not in names:
            raise ConfigError(f"model.candidate_model {candidate_model!r} is not one of model.evaluated: {names}")
        if candidates and not evaluated:
            raise ConfigError("model.candidates samples answers from an evaluated model, but model.evaluated is "
                              "empty; give candidate answers in the data (field `candidates`) and set candidates: 0")
        self.save_hyperparameters(ignore=["similarity", "retriever"])
        self.references, self.evaluated = list(references), dict(evaluated or {})
        self.similarity, self.retriever = similarity, retriever
        self.similarity.key = "model.similarity"  # named in its out-of-range errors
        self.samples_per_reference, self.k = samples_per_reference, k
        self.synthetic = synthetic or SyntheticConfig()
        self.options = fewl or FEWLOptions()
        self.prompt = prompt or PromptConfig()
        self.reference_sampling = reference_sampling or SamplingConfig(max_new_tokens=48, do_sample=True)
        self.answer_sampling = answer_sampling or SamplingConfig(max_new_tokens=48, do_sample=False)
        self.candidate_sampling = candidate_sampling or SamplingConfig(max_new_tokens=48, do_sample=True)
        for key, sampling, count in (("reference_sampling", self.reference_sampling, samples_per_reference),
                                     ("candidate_sampling", self.candidate_sampling, candidates)):
            if count > 1 and not sampling.do_sample:
                raise ConfigError(f"model.{key}.do_sample is false: greedy decoding repeats one answer {count} "
                                  "times; sample (do_sample: true) or ask for one answer")
        self.num_candidates, self.demonstrations = candidates, demonstrations
        self.candidate_model = candidate_model or names[0]
        self.cache_option, self.seed = cache, seed
        self.model_names = names
        self.metrics = torch.nn.ModuleDict({n: self._metric() for n in names})
        try:
            self.scorer = FEWLScorer(similarity, retriever, k)
        except ConfigError as err:  # its keys live under model.
            raise ConfigError(f"model.{err}") from err
        self.pool: _Pool | None = None
        self.pool_items: list[FEWLItem] = []
        self.cache: GenerationCache | None = None
        self.generated = 0
        self.generation_log: list[dict[str, Any]] = []  # every generation: model, purpose, row, seed, prompt, text
        self.empty: dict[str, int] = {}  # purpose -> empty texts
        self.chat_used: dict[str, bool] = {}  # model key -> whether its prompts went through its chat template
        self.demos: list[tuple[str, str]] = []  # prompt.demonstrations, read at test start
        self.rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        self.candidate_rows: list[dict[str, Any]] = []
        self.skipped_empty: list[int] = []  # questions whose every candidate was empty (nothing selected)
        self.results: dict[str, dict[str, Any]] = {}
        self.selected: list[dict[str, Any]] = []
        self.demonstration_rows: list[dict[str, Any]] = []
        self.pool_fingerprint: str | None = None

    def _metric(self) -> FEWL:
        o = self.options
        return FEWL(form=o.form, temperature=o.temperature, weights=o.weights, laziness=o.laziness,
                    divergence=o.divergence)

    @property
    def reference_names(self) -> list[str]:
        """One name per reference answer: ``r<j>s<s>`` (reference j of ``references``, sample s)."""
        return [f"r{j}s{s}" for j in range(len(self.references)) for s in range(self.samples_per_reference)]

    # -- generation: what the scored questions need, before any batch ---------------------------------------
    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("FEWLEvaluationModule runs on one device (set trainer.devices: 1): it answers the "
                              "whole question pool before scoring it")
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, FEWLDataModule):
            raise ConfigError(f"FEWLEvaluationModule reads a lit_align.data.FEWLDataModule, got "
                              f"{type(datamodule).__name__} (data.class_path)")
        if not any(type(c).__name__ == "FEWLReport" for c in self.trainer.callbacks):
            rank_zero_warn("FEWLEvaluationModule: the trainer has no lit_align.callbacks.FEWLReport, so only the mean "
                           "scores are logged (lit-align test adds one; add it to trainer.callbacks)")
        questions = datamodule.questions()
        self.pool_fingerprint = datamodule.fingerprint()
        scored = self._scored_indices(len(questions))
        needed = self._check_neighbours(questions, scored)
        self._check_answers(questions, scored)
        wrong = self._check_synthetic(questions)
        self.demos = load_demonstrations(self.prompt.demonstrations) if self.prompt.demonstrations else []
        self.cache = GenerationCache(self._cache_path())
        self.generated, self.generation_log, self.empty = 0, [], {}
        references = self._reference_answers(questions, needed)
        wrong, corrected = self._synthetic_answers(questions, wrong, scored)
        answers, candidates = self._evaluated_answers(questions, scored)
        self.pool = _Pool(questions, scored, references, wrong, corrected, answers, candidates)
        self.pool_items = [self._item(i, "") for i in needed]  # the neighbours' reference answers
        self.rows = {n: [] for n in self.model_names}
        self.candidate_rows, self.skipped_empty = [], []
        for name in self.model_names:
            self.metrics[name].reset()

    def _scored_indices(self, size: int) -> list[int]:
        """The pool positions the test batches will score: the test loader's first ``trainer.num_test_batches``
        batches (every question unless ``limit_test_batches`` / ``fast_dev_run`` limits the run)."""
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        limit = self.trainer.num_test_batches[0] if self.trainer.num_test_batches else math.inf
        batches = itertools.islice(iter(loader.batch_sampler), None if math.isinf(limit) else int(limit))
        return sorted({i for batch in batches for i in batch if i < size})

    def _cache_path(self) -> str | None:
        if self.cache_option == "auto":
            return str(Path(self.trainer.default_root_dir) / "fewl_generations.jsonl")
        return self.cache_option

    def _check_neighbours(self, questions: list[FEWLQuestion], scored: list[int]) -> list[int]:
        """Fail before any generation when a scored question has fewer than ``k`` eligible neighbours; else the
        pool positions whose reference answers the scores need (the scored questions and their neighbours)."""
        texts = [q.question for q in questions]
        distinct = list(dict.fromkeys(texts))
        first = {t: i for i, t in reversed(list(enumerate(texts)))}  # text -> its first pool position
        try:
            near = self.scorer.neighbours([texts[i] for i in scored], distinct)
        except ConfigError as err:
            raise ConfigError(f"model.k: {err} (model.retriever.near_duplicate sets the threshold)") from err
        return sorted(set(scored) | {first[distinct[j]] for row in near for j in row})

    def _check_answers(self, questions: list[FEWLQuestion], scored: list[int]) -> None:
        """Without evaluated models every record must carry the answer to score; demonstrations must fit the
        scored questions."""
        if self.demonstrations > len(scored):
            limited = " (this run is limited: trainer.limit_test_batches / fast_dev_run)" \
                if len(scored) < len(questions) else ""
            raise ConfigError(f"model.demonstrations ({self.demonstrations}) is more than the {len(scored)} "
                              f"questions this run scores{limited}; lower it")
        missing = [questions[i] for i in scored if questions[i].answer is None]
        if not self.evaluated and missing:
            q = missing[0]
            raise DataError(f"question {q.index} ({q.question!r}, source record {q.source_index + 1}) has no `answer` "
                            "and model.evaluated is empty: give every record an answer, or models to evaluate")

    def _check_synthetic(self, questions: list[FEWLQuestion]) -> list[list[str]]:
        """``source: dataset``: each record's first R wrong answers (a record with fewer is an error)."""
        if self.synthetic.source != "dataset":
            return [[] for _ in questions]
        r = self.synthetic.num_pairs
        for q in questions:
            if len(q.wrong) < r:
                raise DataError(f"question {q.index} ({q.question!r}, source record {q.source_index + 1}) has "
                                f"{len(q.wrong)} wrong answers; model.synthetic.num_pairs is {r} (lower it, add "
                                "wrong answers to the record, or use model.synthetic.source: model)")
        return [list(q.wrong[:r]) for q in questions]

    @contextmanager
    def _loaded(self, spec: ModelSpec, key: str) -> Iterator[_Generator]:
        """A model built from ``spec`` on this module's device, in eval mode, freed on exit."""
        with loaded_model(spec, key=key, device=self.device, chat_template=self.prompt.chat_template,
                          chat_key="model.prompt.chat_template") as lm:
            self.chat_used[key] = lm.chat
            yield _Generator(self, lm)

    def _reference_answers(self, questions: list[FEWLQuestion], needed: list[int]) -> list[list[str]]:
        """Q x N reference answers (reference j's sample s at column j * S + s) for the ``needed`` questions."""
        s = self.samples_per_reference
        rows = [i * s + t for i in needed for t in range(s)]  # seed rows by pool position: a limited run's
        texts = [self.prompt.template.format(question=questions[i].question) for i in needed for _ in range(s)]
        out: list[list[str]] = [[] for _ in questions]  # samples are those of the full run (and its cache)
        for j, spec in enumerate(self.references):
            with self._loaded(spec, f"model.references[{j}]") as gen:
                texts_j = gen.generate(texts, self.reference_sampling, f"fewl/reference/{j}", rows)
            for n, i in enumerate(needed):
                out[i] += texts_j[n * s:(n + 1) * s]
        return out

    def _synthetic_answers(self, questions: list[FEWLQuestion], wrong: list[list[str]], scored: list[int]
                           ) -> tuple[list[list[str]], list[list[str]]]:
        """Q x R IW answers and their Q x R CO answers (see :class:`SyntheticConfig`)."""
        syn, r = self.synthetic, self.synthetic.num_pairs
        if syn.source == "dataset":
            return wrong, [[syn.negation.format(wrong=w) for w in row] for row in wrong]
        rows = [i * r + t for i in scored for t in range(r)]
        asked = [questions[i] for i in scored for _ in range(r)]
        with self._loaded(syn.synthesizer, "model.synthetic.synthesizer") as gen:
            iw = gen.generate([syn.wrong_prompt.format(question=q.question) for q in asked], syn.sampling,
                              "fewl/wrong", rows)
            co = gen.generate([syn.corrected_prompt.format(question=q.question, wrong=w) for q, w in zip(asked, iw)],
                              syn.sampling, "fewl/corrected", rows)
        wrong, corrected = [[] for _ in questions], [[] for _ in questions]
        for n, i in enumerate(scored):
            wrong[i], corrected[i] = iw[n * r:(n + 1) * r], co[n * r:(n + 1) * r]
        return wrong, corrected

    def _evaluated_answers(self, questions: list[FEWLQuestion], scored: list[int]
                           ) -> tuple[dict[str, list[str | None]], list[list[str]]]:
        """Each evaluated model's answers to the scored questions (or the records' as ``data``) and their
        candidates."""
        chosen = set(scored)
        candidates = [list(q.candidates) if i in chosen else [] for i, q in enumerate(questions)]
        if not self.evaluated:
            return {_DATA: [q.answer for q in questions]}, candidates
        answers: dict[str, list[str | None]] = {}
        prompts = [self.prompt.question_text(questions[i].question, self.demos) for i in scored]
        plain = [self.prompt.template.format(question=questions[i].question) for i in scored]
        n = self.num_candidates
        for name, spec in self.evaluated.items():
            answers[name] = [None] * len(questions)
            with self._loaded(spec, f"model.evaluated.{name}") as gen:
                for i, a in zip(scored, gen.generate(prompts, self.answer_sampling, f"fewl/answer/{name}", scored)):
                    answers[name][i] = a
                if n and name == self.candidate_model:
                    sampled = gen.generate([t for t in plain for _ in range(n)], self.candidate_sampling,
                                           f"fewl/candidates/{name}", [i * n + t for i in scored for t in range(n)])
                    for m, i in enumerate(scored):
                        candidates[i] += sampled[m * n:(m + 1) * n]
        return answers, candidates

    # -- scoring: one batch of questions ----------------------------------------------------------------
    def test_step(self, batch: FEWLBatch, batch_idx: int) -> None:
        idx = batch.index.tolist()
        o = self.options
        for name in self.model_names:
            items = [self._item(i, self.pool.answers[name][i]) for i in idx]
            sims = self.scorer.similarities(items, self.pool_items)
            self.metrics[name].update(sims.truth, sims.lazy, sims.co, sims.iw)  # FEWL, T and P, kept per question
            lam = fewl_expertise(sims.co, sims.iw, form=o.form, temperature=o.temperature, weights=o.weights)
            self.rows[name] += [{"index": i, "question": it.question, "answer": it.answer,
                                 "lambda": [float(v) for v in lam[b]]} for b, (i, it) in enumerate(zip(idx, items))]
        self.candidate_rows += self._best_candidates([i for i in idx if self.pool.candidates[i]])

    def _item(self, i: int, answer: str) -> FEWLItem:
        """Pool question ``i`` with ``answer`` to score and its reference, IW and CO answers (a neighbour-only
        question has no IW / CO answers: blank ones fill the scorer's shape check; only its references are read)."""
        pool, blank = self.pool, [""] * self.synthetic.num_pairs
        return FEWLItem(pool.questions[i].question, answer, pool.references[i], pool.wrong[i] or blank,
                        pool.corrected[i] or blank)

    def _terms(self, sims) -> FEWLTerms:
        o = self.options
        return fewl_terms(sims.truth, sims.lazy, sims.co, sims.iw, form=o.form, temperature=o.temperature,
                          weights=o.weights, laziness=o.laziness, divergence=o.divergence)

    def _best_candidates(self, idx: list[int]) -> list[dict[str, Any]]:
        """For each question of ``idx``, its highest-FEWL non-empty candidate (top-1; ties: the first), every
        candidate scored (an empty one as -inf); a question whose candidates are all empty is skipped."""
        if not idx:
            return []
        items = [self._item(i, c) for i in idx for c in self.pool.candidates[i]]
        scores = self._terms(self.scorer.similarities(items, self.pool_items)).score.tolist()
        rows, start = [], 0
        for i in idx:
            cands = self.pool.candidates[i]
            mine = [v if c else -math.inf for c, v in zip(cands, scores[start:start + len(cands)])]
            start += len(cands)
            if not any(cands):
                self.skipped_empty.append(i)
                continue
            best = select_by_fewl([mine])[0]
            rows.append({"index": i, "question": self.pool.questions[i].question, "answer": cands[best],
                         "fewl": mine[best], "candidate": best, "candidate_scores": mine})
        return rows

    # -- results --------------------------------------------------------------------------------------
    def on_test_epoch_end(self) -> None:
        results = {}
        for name in self.model_names:
            parts = self.metrics[name].per_question()  # update order = the order of self.rows[name]
            for row, *terms in zip(self.rows[name], *(parts[k].tolist() for k in ("score", "truthfulness",
                                                                                 "laziness")), strict=True):
                row.update(zip(("fewl", "truthfulness", "laziness"), terms))
            mean = self.metrics[name].compute()
            empty = sum(not r["answer"] for r in self.rows[name])
            results[name] = {"fewl": float(mean), "truthfulness": float(parts["truthfulness"].mean()),
                             "laziness": float(parts["laziness"].mean()), "questions": len(self.rows[name]),
                             "empty": empty}
            self.log(f"test/fewl/{name}", mean)
            self.log(f"test/truthfulness/{name}", results[name]["truthfulness"])
            self.log(f"test/laziness/{name}", results[name]["laziness"])
            self.log(f"test/empty/{name}", float(empty))
            self.metrics[name].reset()
        self.log("test/generated", float(self.generated))
        self._warn_empty()
        self.results = results
        self.selected = sorted(self.candidate_rows, key=lambda r: r["index"])
        self.demonstration_rows = self._demonstrations()

    def _warn_empty(self) -> None:
        """One warning per purpose with too many empty texts, and one for the questions left unselected."""
        counts: dict[str, int] = {}
        for g in self.generation_log:
            counts[g["purpose"]] = counts.get(g["purpose"], 0) + 1
        for purpose, empty in self.empty.items():
            if empty > EMPTY_WARN_FRACTION * counts.get(purpose, 0):
                rank_zero_warn(f"FEWL: {empty} of {counts[purpose]} {purpose} generations are empty after "
                               f"model.prompt.stop {self.prompt.stop!r}; they are scored as empty answers. Check "
                               "the stop strings, the prompt template and max_new_tokens")
        if self.skipped_empty:
            rank_zero_warn(f"FEWL: every candidate of question(s) {self.skipped_empty[:10]} is empty; nothing is "
                           "selected for them (selected.jsonl skips them)")

    def ranking(self) -> list[str]:
        """The evaluated models, best mean FEWL first (ties by name)."""
        return sorted(self.results, key=lambda n: (-self.results[n]["fewl"], n))

    def score_rows(self) -> list[dict[str, Any]]:
        """Per model and question (pool order): ``model, index, question, answer, fewl, truthfulness, laziness,
        lambda`` (one weight per reference answer, :attr:`reference_names` order)."""
        keys = ("index", "question", "answer", "fewl", "truthfulness", "laziness", "lambda")
        return [{"model": n, **{k: r[k] for k in keys}} for n in self.model_names
                for r in sorted(self.rows[n], key=lambda r: r["index"])]

    def sft_rows(self) -> list[dict[str, Any]]:
        """Label-free SFT rows: ``{"prompt", "response", "fewl", "index"}``, the highest-FEWL candidate per question
        (the prompt as the models saw it, before any chat template)."""
        return [{"prompt": self.prompt.template.format(question=r["question"]), "response": r["answer"],
                 "fewl": r["fewl"], "index": r["index"]} for r in self.selected]

    def _demonstrations(self) -> list[dict[str, Any]]:
        """The ``demonstrations`` highest-FEWL (question, answer) pairs: among the selected candidates, else among
        ``candidate_model``'s non-empty answers; one per question."""
        if not self.demonstrations:
            return []
        pairs = self.selected or sorted((r for r in self.rows[self.candidate_model] if r["answer"]),
                                        key=lambda r: r["index"])
        if self.demonstrations > len(pairs):
            raise ConfigError(f"model.demonstrations ({self.demonstrations}) is more than the {len(pairs)} scored "
                              "questions with a non-empty answer; lower it")
        top = select_demonstrations(pairs, [r["fewl"] for r in pairs], self.demonstrations)
        return [{"question": r["question"], "answer": r["answer"], "fewl": r["fewl"], "index": r["index"]}
                for r in top]

    def selection_manifest(self) -> dict[str, Any]:
        """How ``selected.jsonl`` / ``demonstrations.jsonl`` were made (written as ``selection.json``): check it before
        training on a selection (a limited run scores only part of the pool)."""
        config = json.dumps(dict(self.hparams), sort_keys=True, default=repr)
        questions = len(self.pool.questions) if self.pool else 0
        scored = len(self.pool.scored) if self.pool else 0
        key = f"model.evaluated.{self.candidate_model}"
        return {"config_sha256": hashlib.sha256(config.encode()).hexdigest(), "pool_sha256": self.pool_fingerprint,
                "candidate_model": self.candidate_model, "candidates_per_question": self.num_candidates,
                "questions": questions, "questions_scored": scored, "limited": scored < questions,
                "selected": len(self.selected), "skipped_empty": list(self.skipped_empty),
                "demonstrations": len(self.demonstration_rows), "prompt_template": self.prompt.template,
                "chat_template": self.chat_used.get(key), "prompt_demonstrations": self.prompt.demonstrations,
                "seed": self.seed}


class _Generator:
    """One loaded model's generations for the module: rendered prompts, derived seeds, the shared cache."""

    def __init__(self, module: FEWLEvaluationModule, lm: LoadedModel) -> None:
        self.module, self.lm, self.name = module, lm, lm.name

    def generate(self, texts: list[str], sampling: SamplingConfig, purpose: str, rows: list[int]) -> list[str]:
        """Continuations of ``texts`` (``texts[n]`` seeded from ``(seed, purpose, rows[n])``), through the cache,
        without leading whitespace, cut at the first ``prompt.stop`` string, stripped."""
        m = self.module
        prompts = [self.lm.render(t) for t in texts]
        seeds = [derive_seed(m.seed, 0, purpose, i) for i in rows]
        report = GenerationReport()
        out = self.lm.generate(prompts, sampling, seeds=seeds, cache=m.cache, batch_size=m.prompt.batch_size,
                               report=report)
        keys, cached = report.keys, report.cached
        m.generated += report.generated
        out = [answer_text(o, m.prompt.stop) for o in out]
        m.empty[purpose] = m.empty.get(purpose, 0) + sum(not o for o in out)
        m.generation_log += [{"model": self.name, "purpose": purpose, "row": i, "seed": seed, "prompt": p, "text": o,
                              "cached": hit, "key": key}
                             for i, seed, p, o, hit, key in zip(rows, seeds, prompts, out, cached, keys)]
        return out


def answer_text(continuation: str, stop: list[str]) -> str:
    """A generated continuation as an answer: leading whitespace removed first (a continuation that opens with a
    blank line is not cut to nothing), then cut before the earliest stop string, then stripped."""
    return cut_at_stop(continuation.lstrip(), stop).strip()
