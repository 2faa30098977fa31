"""The news-summarisation harness as an evaluation run: every model summarises every task's test articles
zero-shot and k-shot, scored by ROUGE / METEOR / BERTScore / an LLM judge, with failure modes counted."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_align.data.summarization import Article, SummarizationDataModule, SummarizationTask, length_stats
from lit_align.data.summarization_postprocess import Postprocessed, postprocess_summary, summary_content
from lit_align.data.summarization_prompts import (
    SummaryPrompt,
    SummaryPromptConfig,
    build_summary_prompts,
    truncation_rates,
)
from lit_align.engine.seeds import derive_seed
from lit_align.errors import ConfigError, check_int
from lit_align.metrics.judge import JudgeBackend, Rubric, RubricJudge
from lit_align.metrics.summarization import (
    LengthRatio,
    SummaryBERTScore,
    SummaryMETEOR,
    SummaryROUGE,
    bootstrap_ci,
    meteor_available,
    punkt_available,
    resolve_splitter,
)
from lit_align.models import ModelSpec
from lit_align.retrieval import GenerationCache, GenerationReport, StopView
from lit_align.retrieval.loaded import LoadedModel, loaded_model
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["SummaryMetricsConfig", "SummaryRow", "SummarizationEvaluationModule", "model_names"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: the failure modes counted per (model, task, shots): SummaryRow flags
FAILURE_MODES = ("empty", "early_termination", "hit_max_tokens", "copied", "echoed")


@dataclass
class SummaryMetricsConfig:
    """Which automatic metrics score the summaries (ROUGE-1/2/L/Lsum F1 with stemming always)."""

    use_stemmer: bool = True
    """Porter stemming in ROUGE (rouge-score), as published summarisation numbers use."""
    meteor: bool = True
    """nltk METEOR; skipped (reason printed and recorded) when nltk's WordNet data is not installed."""
    bertscore_model: str | None = None
    """BERTScore encoder (a local directory or hub id; bert-score's English default is ``roberta-large``);
    ``null``: no BERTScore."""
    bertscore_layer: int | None = None
    """The encoder layer whose token embeddings are matched (``roberta-large``: 17); required with a model."""
    bertscore_batch_size: int = 32
    """Texts per BERTScore forward."""
    bertscore_max_length: int = 512
    """Longer summaries / references are truncated to this many encoder tokens (at most its positions)."""
    sentence_splitter: Literal["auto", "punkt", "regex"] = "auto"
    """How ROUGE-Lsum and METEOR split a text without newlines into sentences: ``punkt`` (nltk's Punkt, as
    rouge-score's ``split_summaries``, torchmetrics and HF ``evaluate`` do; needs the ``punkt_tab`` data), ``regex``
    (:func:`lit_align.metrics.summarization.split_sentences`: no data, but "Mr." ends a sentence) or ``auto``
    (punkt when its data is installed, else regex). The report header says which one ran."""
    copy_threshold: float = 0.9
    """ROUGE-L precision against the article from which a summary is flagged ``copied``."""
    bootstrap_resamples: int = 1000
    """Resamples of the articles for the 95% intervals (:func:`lit_align.metrics.summarization.bootstrap_ci`)."""

    def __post_init__(self) -> None:
        if self.bertscore_model is not None:
            check_int("model.metrics.bertscore_layer", self.bertscore_layer)
        check_int("model.metrics.bertscore_batch_size", self.bertscore_batch_size)
        check_int("model.metrics.bertscore_max_length", self.bertscore_max_length)
        check_int("model.metrics.bootstrap_resamples", self.bootstrap_resamples)
        if self.sentence_splitter not in ("auto", "punkt", "regex"):
            raise ConfigError(f"model.metrics.sentence_splitter must be 'auto', 'punkt' or 'regex', got "
                              f"{self.sentence_splitter!r}")


@dataclass
class SummaryRow:
    """One summary: a model's output for one test article of one task in one shot setting."""

    model: str
    """The evaluated model's name (a key of ``model.models``)."""
    task: str
    """The task's name."""
    shots: int
    """Demonstrations in the prompt setting (k; the prompt may hold fewer when truncation dropped some)."""
    article_id: str
    """The test article's id."""
    prompt_id: str
    """sha256 (first 16 hex digits) of the prompt as the model read it."""
    demo_ids: list[str]
    """The demonstrations' ids, in prompt order."""
    article_truncated: bool
    """The article's tail was cut to fit ``prompts.max_prompt_tokens``."""
    demos_dropped: int
    """Demonstrations dropped to fit ``prompts.max_prompt_tokens``."""
    output: str
    """The raw continuation (special tokens skipped, before post-processing)."""
    post: Postprocessed
    """The post-processed summary that is scored and its failure-mode flags (``empty``, ``early_termination``,
    ``hit_max_tokens``: the sampler ended the row at ``max_new_tokens``, not at EOS or a stop string, ``copied``,
    ``echoed``); also readable as attributes of the row (``row.summary``, ``row.empty``...)."""
    cached: bool
    """Read from the generation cache (not generated by this run)."""
    finish: str | None = None
    """Why generation ended, from the sampler (``"eos"``, ``"stop"``, ``"length"``; None for a cache entry written
    before it was recorded); ``hit_max_tokens`` is ``finish == "length"``."""
    scores: dict[str, float] = field(default_factory=dict)
    """Per-article metric values (``rouge1``..., ``meteor``, ``bertscore_f1``, length ratios)."""
    judge: dict[str, int] | None = None
    """The judge's 1-5 scores per criterion; ``None`` without a judge or when its reply never parsed."""
    judge_attempts: int = 0
    """Judge calls for this summary (retries included)."""

    def __getattr__(self, name: str) -> Any:
        """The post-processing result's fields (``summary``, ``empty``, ``copied``...) as the row's own."""
        if name != "post" and name in Postprocessed.__dataclass_fields__:
            return getattr(self.post, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def record(self) -> dict[str, Any]:
        """The row as one flat JSON-able dict (the post-processing fields next to the others)."""
        out = dataclasses.asdict(self)
        return {**{k: v for k, v in out.items() if k != "post"}, **out["post"]}


def nltk_version() -> str:
    """The installed nltk's version."""
    import nltk

    return nltk.__version__


def article_index(article_id: str) -> int:
    """A stable non-negative int for an article id (the first 15 hex digits, 60 bits, of its sha256), so an
    article's sampling seed (and its cache entry) does not depend on its row or on how many articles are
    evaluated."""
    return int(hashlib.sha256(article_id.encode()).hexdigest()[:15], 16)


def summary_stop_view(prompt_texts: Sequence[str], articles: Sequence[str]) -> StopView:
    """The generation-time stop rule of the harness: prompt ``i``'s stop strings are looked for in
    :func:`~lit_align.data.summarization_postprocess.summary_content` of its text (after an echo and a
    ``Summary:`` label, not while it still repeats the prompt or article), the same steps post-processing takes."""
    return StopView("summary_content/v1",
                    lambda i, text: summary_content(text, prompt_text=prompt_texts[i], article=articles[i]))


def ran_out_of_tokens(output: str, stop: Sequence[str], tokenizer: Any, max_new_tokens: int) -> bool:
    """The fallback for a cache entry without a recorded finish reason (an estimate: re-tokenizing decoded text
    need not give back the generated tokens). Whether a generation (as generated, not cut) ran into ``max_new_tokens``: it holds no stop string after its
    leading whitespace (generation stops at one, so a text that has one ended there) and re-tokenizes to at least
    ``max_new_tokens`` tokens."""
    if any(s and s in output.lstrip() for s in stop):
        return False
    return len(tokenizer(output, add_special_tokens=False)["input_ids"]) >= max_new_tokens


def check_context(lm: LoadedModel, max_prompt_tokens: int | None, task: SummarizationTask) -> None:
    """A prompt of ``max_prompt_tokens`` plus the task's ``max_new_tokens`` must fit the model's context
    (``max_position_embeddings``), else an error naming ``model.prompts.max_prompt_tokens``."""
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if max_prompt_tokens is None or not isinstance(context, int):
        return
    if max_prompt_tokens + task.max_new_tokens > context:
        raise ConfigError(f"model.prompts.max_prompt_tokens={max_prompt_tokens} plus task {task.name!r}'s "
                          f"max_new_tokens={task.max_new_tokens} exceed the context of {lm.name} ({context} "
                          f"positions); set max_prompt_tokens to at most {context - task.max_new_tokens}")


def _source_name(source: str) -> str:
    """A short name for a spec's source: the last part of a hub id or path; a checkpoint
    ``<run>/<version>/checkpoints/last.ckpt`` as ``<run>-<version>-last`` (two runs' ``version_0`` stay apart)."""
    path = Path(source.removeprefix("builtin:"))
    if path.suffix == ".ckpt":
        if path.parent.name != "checkpoints":
            return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem
        version = path.parent.parent
        return "-".join(p for p in (version.parent.name, version.name, path.stem) if p)
    return path.name


def model_names(models: dict[str, ModelSpec] | Sequence[ModelSpec]) -> dict[str, ModelSpec]:
    """``model.models`` as ``name -> spec``: a dict as given (names checked), a list named after each spec's
    source (``builtin:tiny-tofu-full`` -> ``tiny-tofu-full``, ``outputs/sft/version_0/checkpoints/last.ckpt`` ->
    ``sft-version_0-last``; ``-2``, ``-3``... for repeats)."""
    if isinstance(models, dict):
        named = dict(models)
    else:
        named = {}
        for spec in models:
            base = re.sub(r"[^A-Za-z0-9_.-]+", "-", _source_name(spec.source)).strip("-.") or "model"
            name, n = base, 2
            while name in named:
                name, n = f"{base}-{n}", n + 1
            named[name] = spec
    if not named:
        raise ConfigError("model.models must name at least one model to evaluate")
    for name in named:
        if not _NAME.match(name):
            raise ConfigError(f"model.models: model name {name!r} must be letters, digits, '_', '.' or '-'")
    return named


class SummarizationEvaluationModule(L.LightningModule):
    """The news-summarisation study's harness (Odabaşı & Biricik 2025, arXiv:2501.18128; others.md §10) as a
    ``lit-align test`` run over :class:`~lit_align.data.summarization.SummarizationDataModule` tasks.

    Before the first batch (``on_test_start``) every prompt is built and checked (k-shot with fewer train
    articles than k fails here, naming the task, before any model is loaded); then each model of ``models`` in turn
    is loaded (any model spec: hub id, local directory, ``builtin:``, a lit_align ``.ckpt`` or HF export) and
    writes one summary per (task, shot setting, test article): prompts by
    :func:`~lit_align.data.summarization_prompts.build_summary_prompts` (``prompts``, with ``shots`` replaced by
    each entry of ``shots``; chat template or raw completion; truncation policy), generated in batches by
    :func:`~lit_align.retrieval.generate_texts` with ``sampling`` (greedy by default) and the task's
    ``max_new_tokens``, through one :class:`~lit_align.retrieval.GenerationCache` keyed by the model's weights,
    its tokenizer, the prompt, the generation settings and the seed (a rerun generates nothing). Each output is
    post-processed (:func:`~lit_align.data.summarization_postprocess.postprocess_summary`: echo and
    ``Summary:`` stripped, cut at the task's stop strings, flags ``empty``, ``early_termination``, ``copied``,
    ``echoed``; ``hit_max_tokens`` when the sampler's finish reason, stored with the cached text, is
    ``max_new_tokens``, not EOS or a stop string found after the echo and label, :func:`summary_stop_view`; a cache
    entry written before finish reasons were recorded falls back to :func:`ran_out_of_tokens`).

    Each test step scores its articles for every (model, shot setting): ROUGE-1/2/L/Lsum F1, METEOR and length
    ratios, and the judge (``judge``: a :class:`~lit_align.metrics.judge.JudgeBackend` such as ``HFJudge``, with
    ``rubric`` and ``judge_retries``; replies that never parse are counted, never fatal). BERTScore runs at the
    end of the epoch (one encoder for every group). A metric that cannot run (METEOR without WordNet data, a
    BERTScore encoder that does not load) is skipped: its reason is warned and kept in :attr:`skipped`.

    Results per (model, task, k): means with bootstrap 95% intervals over articles, truncation rates and the
    failure-mode counts, logged as ``test/summ/<model>/<task>/<k>shot/<metric>`` and kept in :attr:`table`
    (rows), :attr:`rows` (one :class:`SummaryRow` per summary) and :attr:`fewshot_effect` (per model and task,
    the paired k-shot minus 0-shot ROUGE-L difference with its interval: the study's "few-shot does not help"
    finding, reported, not asserted). :class:`~lit_align.callbacks.SummarizationReport` (added by ``lit-align
    test``) writes them.

    One device (every summary is generated before scoring). Run: ``lit-align test -c
    configs/eval/summarization/tiny.yaml``.
    """

    def __init__(
        self,
        models: dict[str, ModelSpec] | list[ModelSpec],
        shots: list[int] | None = None,
        prompts: SummaryPromptConfig | None = None,
        sampling: SamplingConfig | None = None,
        batch_size: int = 16,
        metrics: SummaryMetricsConfig | None = None,
        judge: JudgeBackend | None = None,
        rubric: Rubric | None = None,
        judge_retries: int = 2,
        human_export: bool = False,
        cache: str | None = "auto",
        seed: int = 0,
    ) -> None:
        """
        Args:
            models: name -> model spec, or a list of specs (named after their source).
            shots: the shot settings (k demonstrations from each task's train split; default ``[0, 3]``).
            prompts: the prompt layout, demonstration seed, chat template and truncation policy (its ``shots`` is
                replaced by each entry of ``shots``).
            sampling: generation settings (default greedy); ``max_new_tokens`` is each task's.
            batch_size: prompts per generation batch.
            metrics: which metrics (ROUGE always; METEOR; BERTScore with a model and layer).
            judge: an LLM judge backend (``lit_align.metrics.judge.HFJudge`` for a local model,
                ``OpenAICompatibleJudge`` for an endpoint); ``null``: no judge.
            rubric: the judge's criteria and prompt (default :class:`~lit_align.metrics.judge.Rubric`).
            judge_retries: further judge calls for a reply that does not parse.
            human_export: write a blinded human-evaluation CSV (systems in random order) and its key.
            cache: the generation cache: ``auto`` (``<trainer.default_root_dir>/summarization_generations.jsonl``,
                shared by reruns), a .jsonl path, or ``null`` (in memory only).
            seed: seed of every generation (sampled generation only) and of the bootstrap and the export order.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["judge"])
        self.models = model_names(models)
        self.shots = [0, 3] if shots is None else list(shots)
        if not self.shots:
            raise ConfigError("model.shots must list at least one shot setting, e.g. [0, 3]")
        for k in self.shots:
            check_int("model.shots[]", k, 0)
        if len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"model.shots lists a setting twice: {self.shots}")
        self.prompts = prompts or SummaryPromptConfig()
        self.sampling = sampling or SamplingConfig(do_sample=False)
        check_int("model.batch_size", batch_size)
        check_int("model.judge_retries", judge_retries, 0)
        check_int("model.seed", seed, 0)
        self.batch_size, self.metrics_config = batch_size, metrics or SummaryMetricsConfig()
        self.judge = RubricJudge(judge, rubric or Rubric(), retries=judge_retries) if judge is not None else None
        self.human_export, self.cache_option, self.seed = human_export, cache, seed
        self.cache: GenerationCache | None = None
        self.generated = 0
        self.tasks: dict[str, SummarizationTask] = {}
        self.articles: dict[str, dict[str, Article]] = {}  # task -> id -> test article
        self.outputs: dict[tuple[str, str, int], dict[str, SummaryRow]] = {}  # (model, task, k) -> id -> row
        self.truncation: dict[tuple[str, str, int], dict[str, float]] = {}
        self.rows: list[SummaryRow] = []  # scored rows, in scoring order
        self.skipped: dict[str, str] = {}  # metric -> why it did not run
        self.splitter = "regex"  # the sentence splitter that runs (resolved from metrics.sentence_splitter in setup)
        self.table: list[dict[str, Any]] = []
        self.fewshot_effect: list[dict[str, Any]] = []
        self._scorers: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._bertscore: SummaryBERTScore | None = None

    def configure_optimizers(self) -> None:
        """Evaluation only: no optimiser."""
        return None

    # -- before the first batch: prompts checked, every summary generated --------------------------------
    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("SummarizationEvaluationModule runs on one device (set trainer.devices: 1)")
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, SummarizationDataModule):
            raise ConfigError(f"SummarizationEvaluationModule reads a lit_align.data.SummarizationDataModule, got "
                              f"{type(datamodule).__name__} (data.class_path)")
        self.tasks = {t.name: t for t in datamodule.tasks}
        self.articles = {name: {a.id: a for a in datamodule.test_articles(name)} for name in self.tasks}
        train = {name: datamodule.train_articles(name) if max(self.shots) else [] for name in self.tasks}
        for name, task in self.tasks.items():  # demonstrations checked before any model is loaded
            for k in self.shots:
                try:
                    build_summary_prompts(task, list(self.articles[name].values()), train[name],
                                          dataclasses.replace(self.prompts, shots=k, chat_template=False,
                                                              max_prompt_tokens=None))
                except ValueError as err:
                    raise ConfigError(f"model.shots ({k}-shot, task {name!r}): {err}") from err
        self._set_up_metrics()
        if self.judge is not None and getattr(self.judge.backend, "device", "") is None:
            self.judge.backend.device = str(self.device)  # a local judge runs where the evaluated models run
        self.cache = GenerationCache(self._cache_path())
        self.generated, self.outputs, self.rows, self._scorers = 0, {}, [], {}
        for name, spec in self.models.items():
            with loaded_model(spec, key=f"model.models.{name}", device=self.device,
                              chat_template=self.prompts.chat_template,
                              chat_key="model.prompts.chat_template") as lm:
                for task_name, task in self.tasks.items():
                    for k in self.shots:
                        self._summarise(lm, name, task, train[task_name], k)

    def _cache_path(self) -> str | None:
        if self.cache_option == "auto":
            return str(Path(self.trainer.default_root_dir) / "summarization_generations.jsonl")
        return self.cache_option

    def _set_up_metrics(self) -> None:
        """METEOR and BERTScore if they can run, else their reason in :attr:`skipped` (warned)."""
        config, self.skipped = self.metrics_config, {}
        if config.sentence_splitter == "punkt" and not punkt_available():
            raise ConfigError("model.metrics.sentence_splitter is 'punkt' but nltk's punkt_tab data is not installed: "
                              "run `python -m nltk.downloader punkt_tab` (or put it under NLTK_DATA), or set it to "
                              "'auto' or 'regex'")
        self.splitter = resolve_splitter(config.sentence_splitter)
        if config.meteor:
            ok, reason = meteor_available()
            if not ok:
                self.skipped["meteor"] = reason
        if config.bertscore_model is not None:
            try:
                self._bertscore = SummaryBERTScore(config.bertscore_model, config.bertscore_layer,
                                                   max_length=config.bertscore_max_length,
                                                   batch_size=config.bertscore_batch_size, device=self.device,
                                                   max_length_key="model.metrics.bertscore_max_length")
            except ConfigError:  # a setting to fix (bertscore_max_length beyond the encoder), not a metric to skip
                raise
            except (OSError, ValueError, ImportError) as err:  # a missing directory, a hub id offline, a bad layer,
                # or bert-score not installed (pip install bert-score)
                self.skipped["bertscore"] = f"{config.bertscore_model} (layer {config.bertscore_layer}): {err}"
        for metric, reason in self.skipped.items():
            rank_zero_warn(f"summarisation: {metric} is skipped: {reason}")

    def _summarise(self, lm: LoadedModel, name: str, task: SummarizationTask, train: list[Article],
                   k: int) -> None:
        """Prompt, generate (through the cache) and post-process every test article of ``task`` with ``k``
        demonstrations; the rows go to :attr:`outputs`."""
        articles = list(self.articles[task.name].values())
        check_context(lm, self.prompts.max_prompt_tokens, task)
        config = dataclasses.replace(self.prompts, shots=k)
        prompts: list[SummaryPrompt] = build_summary_prompts(task, articles, train, config, lm.tokenizer,
                                                             render=lm.render)
        texts = [lm.render(p.text) for p in prompts]
        sampling = dataclasses.replace(self.sampling, max_new_tokens=task.max_new_tokens)
        purpose = f"summarization/{task.name}/{k}shot"
        seeds = [derive_seed(self.seed, 0, purpose, article_index(a.id)) for a in articles]
        report = GenerationReport()
        outputs = lm.generate(texts, sampling, seeds=seeds, cache=self.cache, batch_size=self.batch_size,
                              stop=task.stop, stop_generation=True, cut=False,
                              stop_view=summary_stop_view(texts, [a.article for a in articles]), report=report)
        cached = report.cached
        self.generated += report.generated
        rows = {}
        for article, prompt, text, output, hit, finish in zip(articles, prompts, texts, outputs, cached,
                                                              report.finish):
            hit_max = (finish == "length" if finish is not None
                       else ran_out_of_tokens(output, task.stop, lm.tokenizer, sampling.max_new_tokens))
            post = postprocess_summary(output, prompt_text=text, article=article.article, stop=task.stop,
                                       hit_max_tokens=hit_max, copy_threshold=self.metrics_config.copy_threshold)
            rows[article.id] = SummaryRow(
                name, task.name, k, article.id, hashlib.sha256(text.encode()).hexdigest()[:16], list(prompt.demo_ids),
                prompt.article_truncated, prompt.demos_dropped, output, post, hit, finish)
        self.outputs[(name, task.name, k)] = rows
        self.truncation[(name, task.name, k)] = truncation_rates(prompts)

    # -- scoring: one batch of articles ------------------------------------------------------------------
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        by_task: dict[str, list[Article]] = {}
        for item in batch:
            by_task.setdefault(item["task"], []).append(item["article"])
        for task, articles in by_task.items():
            for name in self.models:
                for k in self.shots:
                    self._score((name, task, k), [self.outputs[(name, task, k)][a.id] for a in articles], articles)

    def _score(self, key: tuple[str, str, int], rows: list[SummaryRow], articles: list[Article]) -> None:
        """Update ``key``'s metrics with ``rows`` and judge them."""
        scorers = self._scorers.setdefault(key, self._new_scorers())
        preds, refs = [r.summary for r in rows], [a.reference for a in articles]
        scorers["rouge"].update(preds, refs)
        scorers["length"].update(preds, refs, [a.article for a in articles])
        if "meteor" in scorers:
            scorers["meteor"].update(preds, refs)
        if self.judge is not None:
            judged = self.judge.score([a.article for a in articles], preds)
            for row, scores, attempts in zip(rows, judged.scores, judged.attempts):
                row.judge, row.judge_attempts = scores, attempts
        scorers["rows"] += rows
        self.rows += rows

    def _new_scorers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rouge": SummaryROUGE(use_stemmer=self.metrics_config.use_stemmer,
                                                     sentence_splitter=self.splitter),
                               "length": LengthRatio(), "rows": []}
        if self.metrics_config.meteor and "meteor" not in self.skipped:
            out["meteor"] = SummaryMETEOR(sentence_splitter=self.splitter)
        return out

    # -- results ---------------------------------------------------------------------------------------
    def on_test_epoch_end(self) -> None:
        if self.judge is not None and hasattr(self.judge.backend, "close"):
            self.judge.backend.close()  # every summary is judged: free a local judge model
        self.table = []
        for key, scorers in self._scorers.items():
            rows = scorers["rows"]
            per_item = self._per_item(scorers, rows)
            for i, row in enumerate(rows):
                row.scores = {metric: float(values[i]) for metric, values in per_item.items()}
            entry = self._summary(key, rows, per_item)
            self.table.append(entry)
            model, task, k = key
            for metric, value in entry.items():  # means, judge means, rates and counts (intervals: the report)
                if isinstance(value, (int, float)) and metric not in ("shots", "articles") \
                        and not metric.endswith(("_low", "_high")):
                    self.log(f"test/summ/{model}/{task}/{k}shot/{metric}", float(value))
        self.log("test/generated", float(self.generated))
        self.fewshot_effect = self._fewshot_effect()

    def _per_item(self, scorers: dict[str, Any], rows: list[SummaryRow]) -> dict[str, torch.Tensor]:
        """Every metric's per-article values, in ``rows`` order."""
        out = dict(scorers["rouge"].per_item())
        length = scorers["length"].per_item()
        out["length_ratio"], out["length_to_article"] = length["summary_to_reference"], length["summary_to_article"]
        if "meteor" in scorers:
            out["meteor"] = scorers["meteor"].per_item()
        if self._bertscore is not None:
            refs = [self.articles[r.task][r.article_id].reference for r in rows]
            self._bertscore.reset()
            self._bertscore.update([r.summary for r in rows], refs)
            out["bertscore_f1"] = self._bertscore.per_item()["bertscore_f1"]
        return out

    def _summary(self, key: tuple[str, str, int], rows: list[SummaryRow], per_item: dict[str, torch.Tensor]
                 ) -> dict[str, Any]:
        """One table row: means and 95% intervals, judge means, truncation rates, failure counts."""
        model, task, k = key
        entry: dict[str, Any] = {"model": model, "task": task, "shots": k, "articles": len(rows)}
        for metric, values in per_item.items():
            mean, low, high = bootstrap_ci(values, n_resamples=self.metrics_config.bootstrap_resamples,
                                           seed=self.seed)
            entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = mean, low, high
        if self.judge is not None:
            judged = [r.judge for r in rows if r.judge is not None]
            for criterion in self.judge.rubric.criteria:
                mean, low, high = bootstrap_ci([j[criterion] for j in judged], seed=self.seed,
                                               n_resamples=self.metrics_config.bootstrap_resamples)
                entry[f"judge_{criterion}"], entry[f"judge_{criterion}_low"], entry[f"judge_{criterion}_high"] = \
                    mean, low, high
            entry["judge_failures"] = sum(r.judge is None for r in rows)  # summaries never scored
            entry["judge_parse_failures"] = sum(r.judge_attempts - (r.judge is not None) for r in rows)  # replies
            entry["judge_attempts"] = sum(r.judge_attempts for r in rows)
        entry.update(self.truncation.get(key, {}))
        for mode in FAILURE_MODES:
            entry[mode] = sum(getattr(r, mode) for r in rows)
        return entry

    def _fewshot_effect(self) -> list[dict[str, Any]]:
        """Per model and task and k > 0: the mean paired difference of ROUGE-L (k-shot minus 0-shot) over the
        same articles, with its bootstrap 95% interval (the study: demonstrations did not help)."""
        if 0 not in self.shots:
            return []
        out = []
        for (model, task, k), scorers in self._scorers.items():
            zero = self._scorers.get((model, task, 0))
            if k == 0 or zero is None:
                continue
            base = {r.article_id: r.scores.get("rougeL") for r in zero["rows"]}
            diffs = [r.scores["rougeL"] - base[r.article_id] for r in scorers["rows"] if r.article_id in base]
            mean, low, high = bootstrap_ci(diffs, n_resamples=self.metrics_config.bootstrap_resamples,
                                           seed=self.seed)
            out.append({"model": model, "task": task, "shots": k, "rougeL_minus_0shot": mean, "low": low,
                        "high": high, "articles": len(diffs)})
        return out

    def _splitter_note(self) -> str:
        """Which sentence splitter ran, and why when ``auto`` fell back to the regex."""
        if self.splitter == "punkt":
            return "punkt (nltk sent_tokenize, as rouge-score split_summaries)"
        if self.metrics_config.sentence_splitter == "auto":
            return "regex (fallback: nltk's punkt_tab data is not installed; 'Mr.' and 'U.S.' end a sentence)"
        return "regex ('Mr.' and 'U.S.' end a sentence)"

    def report_header(self) -> dict[str, Any]:
        """What the numbers rest on, for the report's JSON: models, tasks, generation, metrics and skips, judge."""
        judge = None
        if self.judge is not None:
            judge = {"model_id": self.judge.backend.model_id, "criteria": list(self.judge.rubric.criteria),
                     "retries": self.judge.retries}
        config = self.metrics_config
        return {"models": {n: s.source for n, s in self.models.items()},
                "tasks": {n: {"source": t.source, "articles": len(self.articles.get(n, {})),
                              "max_new_tokens": t.max_new_tokens, "stop": list(t.stop),
                              "lengths": length_stats(list(self.articles.get(n, {}).values()))}
                          for n, t in self.tasks.items()},
                "shots": self.shots, "sampling": dataclasses.asdict(self.sampling),
                "chat_template": self.prompts.chat_template, "truncation": self.prompts.truncation,
                "max_prompt_tokens": self.prompts.max_prompt_tokens,
                "metrics": {"rouge": f"rouge-score F1, stemming {'on' if config.use_stemmer else 'off'}",
                            "sentence_splitter": self._splitter_note(),
                            "meteor": None if not config.meteor else
                            f"nltk {nltk_version()} meteor_score, alpha 0.9, beta 3, gamma 0.5, WordNet synonyms; "
                            f"NLTKWordTokenizer per sentence ({self.splitter})",
                            "bertscore": None if config.bertscore_model is None else
                            f"{config.bertscore_model} layer {config.bertscore_layer}, no baseline rescaling",
                            "intervals": f"bootstrap 95% percentile, {config.bootstrap_resamples} resamples over "
                                         "articles"},
                "skipped": dict(self.skipped), "judge": judge, "generated": self.generated}
