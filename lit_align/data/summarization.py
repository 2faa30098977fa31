"""News-summarisation data for the evaluation harness (others.md §10(d)1): dataset adapters, seeded subsampling
stratified by article length, length statistics, and the test DataModule.

A :class:`SummarizationTask` names one dataset of the harness by its ``source``:

* ``builtin:tiny_news``: the built-in toy news set (24 train and 24 test articles about invented towns; made by
  ``scripts/build_tiny_news.py``; the files ``tiny_news_<split>.json`` of ``lit_align/data/builtin``);
* ``cnn_dailymail`` (or ``abisee/cnn_dailymail``): CNN/DailyMail 3.0.0 from the HF hub, columns ``article``,
  ``highlights`` (the reference: newline-separated sentences), ``id``; pinned to :data:`CNN_DAILYMAIL_REVISION`;
* ``xsum`` (or ``EdinburghNLP/xsum``): XSum from the HF hub, columns ``document``, ``summary`` (one sentence),
  ``id``; pinned to :data:`XSUM_REVISION`;
* ``newsroom:<dir>``: Newsroom from a local directory (it has to be downloaded by hand): ``<dir>/<split>.jsonl``
  or ``<dir>/<split>.jsonl.gz`` as released (``train``, ``dev``, ``test``; the split ``validation`` reads ``dev``),
  one JSON object per line with ``text`` (the article), ``summary`` and ``url`` (the id);
* a local ``.jsonl``, ``.json`` or ``.csv`` file, columns ``article``, ``reference``, ``id`` unless
  ``article_key``/``reference_key``/``id_key`` say otherwise. ``{split}`` in the path is replaced by the split
  (``news_{split}.jsonl``); a path without it is the same file for every split (k-shot demonstrations then come
  from that file too, never the test article itself);
* any other HF dataset id, with ``subset``, ``revision`` and the three keys.

Every record becomes an :class:`Article`. A record without an article or a reference (missing, not a string, or
blank) is a :class:`ValueError` (:class:`~lit_align.errors.DataError`) naming the source, the record and the
key to set, raised when the data are set up, before anything is generated.

Prompts are built by :mod:`lit_align.data.summarization_prompts` and outputs cleaned by
:mod:`lit_align.data.summarization_postprocess`; both are re-exported here.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lit_align.data.records import DataSource, describe_record, read_jsonl, read_rows
from lit_align.data.summarization_postprocess import DEFAULT_COPY_THRESHOLD, Postprocessed, postprocess_summary
from lit_align.data.summarization_prompts import (
    SummaryPrompt,
    SummaryPromptConfig,
    build_summary_prompts,
    render_prompt,
    truncation_rates,
)
from lit_align.errors import ConfigError, DataError, MissingPathError, check_int

__all__ = [
    "Article", "ArticleBatch", "CNN_DAILYMAIL_REVISION", "DEFAULT_COPY_THRESHOLD", "Postprocessed",
    "SummarizationDataModule", "SummarizationTask", "SummaryPrompt", "SummaryPromptConfig", "XSUM_REVISION",
    "articles_from_rows", "build_summary_prompts", "hf_source", "length_stats", "load_articles",
    "postprocess_summary", "render_prompt", "source_kind", "subsample", "truncation_rates",
]

#: Commit of ``abisee/cnn_dailymail`` on the HF hub (parquet files of configs 1.0.0, 2.0.0, 3.0.0; last changed
#: 2024-01-18), the default ``revision`` of a ``cnn_dailymail`` task.
CNN_DAILYMAIL_REVISION = "96df5e686bee6baa90b8bee7c28b81fa3fa6223d"
#: Commit of ``EdinburghNLP/xsum`` on the HF hub (parquet ``data/{train,validation,test}-*.parquet``), the default
#: ``revision`` of an ``xsum`` task.
XSUM_REVISION = "7d4d486c2f8ef850b1a11aead99b894ff3dd7da9"


@dataclass(frozen=True)
class Article:
    """One news item of a summarisation dataset."""

    id: str
    """Id, unique within its split (the dataset's own id, Newsroom's url, or ``<split>-<index>`` when absent)."""
    article: str
    """The article text."""
    reference: str
    """The reference summary (CNN/DailyMail: newline-separated highlight sentences)."""


@dataclass(frozen=True)
class _Preset:
    """Defaults of one kind of source."""

    article_key: str = "article"
    reference_key: str = "reference"
    id_key: str = "id"
    hf_id: str | None = None
    subset: str | None = None
    revision: str | None = None
    instruction: str = "Summarize the news article in a few sentences."
    max_new_tokens: int = 96


#: kind of source -> its defaults. The instructions follow the datasets' summary styles (§10(a)).
PRESETS: dict[str, _Preset] = {
    "tiny_news": _Preset(instruction="Summarize the news article in one to three short sentences, one per line.",
                         max_new_tokens=64),
    "cnn_dailymail": _Preset("article", "highlights", "id", "abisee/cnn_dailymail", "3.0.0", CNN_DAILYMAIL_REVISION,
                             "Summarize the news article in three or four short highlight sentences, one per line.",
                             128),
    "xsum": _Preset("document", "summary", "id", "EdinburghNLP/xsum", None, XSUM_REVISION,
                    "Summarize the news article in one sentence.", 48),
    "newsroom": _Preset("text", "summary", "url", instruction="Summarize the news article in one to three sentences."),
    "local": _Preset(),
    "hf": _Preset(),
}
_HF_ALIASES = {"cnn_dailymail": "cnn_dailymail", "abisee/cnn_dailymail": "cnn_dailymail", "xsum": "xsum",
               "edinburghnlp/xsum": "xsum"}
_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")


def source_kind(source: str) -> str:
    """``tiny_news``/``builtin``, ``cnn_dailymail``, ``xsum``, ``newsroom``, ``local`` or ``hf`` for a task source."""
    if source == "builtin:tiny_news":
        return "tiny_news"
    if source.startswith("builtin:"):
        return "builtin"
    if source.lower() in _HF_ALIASES:
        return _HF_ALIASES[source.lower()]
    if source.startswith("newsroom:"):
        return "newsroom"
    if source.lower().endswith(_LOCAL_SUFFIXES):
        return "local"
    return "hf"


def _default_stop() -> list[str]:
    return ["\n\n", "Article:"]


@dataclass
class SummarizationTask:
    """One dataset of the summarisation harness (an entry of ``data.tasks``). Fields left ``null`` take the
    defaults of the source's kind (see the module docstring)."""

    name: str
    """Name in reports and batches, unique within a run (``tiny_news``, ``cnn_dailymail``, ``xsum``...)."""
    source: str
    """``builtin:tiny_news``, ``cnn_dailymail``, ``xsum``, ``newsroom:<dir>``, a local .jsonl/.json/.csv file
    (``{split}`` in the path is replaced by the split), or another HF dataset id."""
    test_split: str = "test"
    """Split whose articles are summarised."""
    train_split: str = "train"
    """Split the k-shot demonstrations come from (read only when demonstrations are asked for)."""
    n: int | None = None
    """Test articles to evaluate: a seeded subsample stratified by article length; ``null``: all of them."""
    seed: int = 0
    """Seed of the test subsample."""
    instruction: str | None = None
    """Instruction at the top of every prompt; ``null``: the dataset's (XSum: one sentence; CNN/DailyMail: a few
    highlight sentences, one per line); ``""``: none."""
    max_new_tokens: int | None = None
    """Generation budget per summary; ``null``: the dataset's (XSum 48, CNN/DailyMail 128, tiny_news 64, else 96)."""
    stop: list[str] = field(default_factory=_default_stop)
    """Stop strings: a summary ends before the first one (so the model does not start the next article)."""
    article_key: str | None = None
    """Column holding the article; ``null``: the dataset's (``article``, XSum ``document``, Newsroom ``text``)."""
    reference_key: str | None = None
    """Column holding the reference summary; ``null``: the dataset's (``reference``, CNN/DailyMail ``highlights``,
    XSum and Newsroom ``summary``)."""
    id_key: str | None = None
    """Column holding the id; ``null``: the dataset's (``id``, Newsroom ``url``); records without it are numbered."""
    subset: str | None = None
    """HF dataset configuration; ``null``: the dataset's (CNN/DailyMail ``3.0.0``)."""
    revision: str | None = None
    """HF dataset revision; ``null``: the pinned commit for CNN/DailyMail and XSum (:data:`CNN_DAILYMAIL_REVISION`,
    :data:`XSUM_REVISION`), the hub's default branch for other ids."""
    train_limit: int | None = None
    """Read only the first ``train_limit`` train records as the demonstration pool (streamed for HF ids, so the
    287k-article CNN/DailyMail train split is not downloaded whole); ``null``: all. These are the file's *first*
    rows, not a random sample: for a source ordered by outlet or date (CNN/DailyMail puts CNN first), the pool
    comes from that part only; demonstrations are then drawn from it with ``prompts.seed``."""

    def __post_init__(self) -> None:
        for key in ("name", "source", "test_split", "train_split"):
            value = getattr(self, key)
            if not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"task {self.name!r}: {key} must be a non-empty string, got {value!r}")
        where = f"task {self.name!r}"
        check_int(f"{where}: n", self.n, 1, optional=True)
        check_int(f"{where}: seed", self.seed, 0)
        check_int(f"{where}: max_new_tokens", self.max_new_tokens, 1, optional=True)
        check_int(f"{where}: train_limit", self.train_limit, 1, optional=True)
        if not (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop)):
            raise ConfigError(f"{where}: stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise ConfigError(f"{where}: instruction must be a string or null, got {self.instruction!r}")
        preset = PRESETS.get(self.kind, _Preset())
        for key in ("article_key", "reference_key", "id_key", "subset", "revision", "instruction", "max_new_tokens"):
            if getattr(self, key) is None:
                setattr(self, key, getattr(preset, key))
        for key in ("article_key", "reference_key", "id_key"):
            if not (isinstance(getattr(self, key), str) and getattr(self, key)):
                raise ConfigError(f"{where}: {key} must be a non-empty column name, got {getattr(self, key)!r}")

    @property
    def kind(self) -> str:
        """The kind of source (:func:`source_kind`)."""
        return source_kind(self.source)


def hf_source(task: SummarizationTask, split: str) -> DataSource:
    """The :class:`~lit_align.data.DataSource` a hub task reads (hub id, subset, pinned revision)."""
    preset = PRESETS.get(task.kind)
    path = preset.hf_id if preset is not None and preset.hf_id else task.source
    limit = task.train_limit if split == task.train_split else None
    return DataSource(path=path, split=split, subset=task.subset, revision=task.revision, limit=limit)


def _newsroom_file(directory: str, split: str, task: SummarizationTask) -> Path:
    root = Path(directory).expanduser()
    names = [split, "dev"] if split == "validation" else [split]
    for name in names:
        for suffix in (".jsonl", ".jsonl.gz"):
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    raise MissingPathError(
        f"task {task.name!r}: Newsroom source {task.source!r} has no {names[0]}.jsonl or {names[0]}.jsonl.gz; "
        "download Newsroom (https://lil.nlp.cornell.edu/newsroom/) and give the directory holding train.jsonl[.gz], "
        "dev.jsonl[.gz] and test.jsonl[.gz] as newsroom:<dir>")


def _rows(task: SummarizationTask, split: str) -> tuple[list[Any], str]:
    """The raw records of ``split`` and the path errors name."""
    limit = task.train_limit if split == task.train_split else None
    kind = task.kind
    if kind in ("tiny_news", "builtin"):
        path = f"{task.source}/{split}"
    elif kind == "newsroom":
        file = _newsroom_file(task.source.removeprefix("newsroom:"), split, task)
        if file.suffix == ".gz":
            rows = read_jsonl(file)
            return (rows[:limit] if limit is not None else rows), str(file)
        path = str(file)
    elif kind == "local":
        path = task.source.replace("{split}", split)
    else:
        source = hf_source(task, split)
        return read_rows(source), source.path
    return read_rows(DataSource(path=path, limit=limit)), path


def _text(row: Mapping[str, Any], key: str, what: str, task: SummarizationTask, where: str) -> str:
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value.strip()
    problem = "is missing" if key not in row else ("is blank" if isinstance(value, str) else
                                                   f"is not a string ({type(value).__name__})")
    raise DataError(f"{where}: no {what}: column {key!r} {problem}; the record has columns {sorted(row)}. Set "
                    f"{what}_key of task {task.name!r} to the column that holds the {what}, or fix the record.")


def articles_from_rows(rows: Iterable[Any], task: SummarizationTask, split: str, path: str | None = None
                       ) -> list[Article]:
    """Map raw records (dicts, e.g. the rows of an HF dataset) to :class:`Article` s with the task's keys.

    A record that is not an object, or lacks a non-blank string article or reference, is a
    :class:`~lit_align.errors.DataError` naming ``path`` (default: the task's source), the record and the key;
    duplicate ids are one too.
    """
    path = path or task.source
    articles = []
    for i, row in enumerate(rows):
        where = describe_record(path, i) + f" (task {task.name!r}, split {split!r})"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with the article and reference, got {type(row).__name__}")
        raw_id = row.get(task.id_key)
        article_id = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"{split}-{i}"
        articles.append(Article(article_id, _text(row, task.article_key, "article", task, where),
                                _text(row, task.reference_key, "reference", task, where)))
    seen: dict[str, int] = {}
    for i, a in enumerate(articles):
        if a.id in seen:
            raise DataError(f"data source {path!r} (task {task.name!r}, split {split!r}): records {seen[a.id] + 1} "
                            f"and {i + 1} share the id {a.id!r}; ids must be unique (set id_key to a unique column)")
        seen[a.id] = i
    return articles


def load_articles(task: SummarizationTask, split: str) -> list[Article]:
    """Every article of ``split`` of ``task``'s source, validated (errors name the record and the key)."""
    rows, path = _rows(task, split)
    articles = articles_from_rows(rows, task, split, path)
    if not articles:
        raise DataError(f"data source {path!r} (task {task.name!r}, split {split!r}) has no records")
    return articles


def _words(text: str) -> int:
    return len(text.split())


def subsample(articles: Sequence[Article], n: int | None, seed: int, bins: int = 4) -> list[Article]:
    """``n`` articles drawn with ``seed``, stratified by article length, in their original order.

    The articles are ranked by word count (ties by id) and cut into ``min(bins, n)`` equal-count quantile bins; each
    bin gets its proportional share of ``n`` (largest remainders first), drawn with ``random.Random(f"subsample:
    {seed}")``. ``n`` of ``None`` or at least ``len(articles)`` returns all of them.
    """
    if n is None or n >= len(articles):
        return list(articles)
    check_int("n", n, 1)
    total = len(articles)
    order = sorted(range(total), key=lambda i: (_words(articles[i].article), articles[i].id))
    n_bins = max(1, min(bins, n))
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for rank, i in enumerate(order):
        members[rank * n_bins // total].append(i)
    shares = [len(m) * n / total for m in members]
    quota = [int(s) for s in shares]
    for b in sorted(range(n_bins), key=lambda b: (-(shares[b] - quota[b]), b))[: n - sum(quota)]:
        quota[b] += 1
    rng = random.Random(f"subsample:{seed}")
    picked = [i for b in range(n_bins) for i in rng.sample(sorted(members[b]), quota[b])]
    return [articles[i] for i in sorted(picked)]


def length_stats(articles: Sequence[Article]) -> dict[str, float]:
    """Word counts (whitespace-separated) of the articles and references: ``articles`` (how many),
    ``article_words_mean``/``_median``, ``reference_words_mean``/``_median``, ``reference_sentences_mean``
    (non-empty lines) and ``compression_ratio`` (mean over articles of article words / reference words)."""
    if not articles:
        return {"articles": 0.0, "article_words_mean": 0.0, "article_words_median": 0.0, "reference_words_mean": 0.0,
                "reference_words_median": 0.0, "reference_sentences_mean": 0.0, "compression_ratio": 0.0}
    art = [_words(a.article) for a in articles]
    ref = [_words(a.reference) for a in articles]
    lines = [sum(1 for line in a.reference.splitlines() if line.strip()) for a in articles]
    return {"articles": float(len(articles)),
            "article_words_mean": statistics.fmean(art), "article_words_median": float(statistics.median(art)),
            "reference_words_mean": statistics.fmean(ref), "reference_words_median": float(statistics.median(ref)),
            "reference_sentences_mean": statistics.fmean(lines),
            "compression_ratio": statistics.fmean(a / max(r, 1) for a, r in zip(art, ref))}


class ArticleBatch(list):
    """A test batch: a list of ``{"task": name, "article": Article}`` dicts. Its ``to(device)`` returns it unchanged,
    so Lightning's batch transfer leaves the Python objects alone (it refuses frozen dataclasses otherwise)."""

    def to(self, device: Any) -> ArticleBatch:
        return self


def _collate(items: list[dict[str, Any]]) -> ArticleBatch:
    return ArticleBatch(items)


class SummarizationDataModule(L.LightningDataModule):
    """The articles of a summarisation evaluation (``lit-align test``): for each task, a seeded test subsample
    (stratified by article length) served as :class:`ArticleBatch` es, and the train split as the demonstration pool.

    Example::

        data:
          class_path: lit_align.data.summarization.SummarizationDataModule
          init_args:
            batch_size: 8
            tasks:
              - {name: tiny_news, source: "builtin:tiny_news"}
              - {name: xsum, source: xsum, n: 200}
              - {name: cnndm, source: cnn_dailymail, n: 200, train_limit: 2000}
              - {name: mine, source: my_news_{split}.jsonl, article_key: body, reference_key: abstract}
    """

    def __init__(self, tasks: list[SummarizationTask], batch_size: int = 8, num_workers: int = 0) -> None:
        """
        Args:
            tasks: the datasets to evaluate, in report order (names unique).
            batch_size: articles per test step.
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if not tasks:
            raise ConfigError("data.tasks must list at least one summarisation task")
        for i, task in enumerate(tasks):
            if not isinstance(task, SummarizationTask):
                raise ConfigError(f"data.tasks[{i}] must be a SummarizationTask, got {task!r}")
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"data.tasks: task names must be unique, {duplicates} occur more than once")
        check_int("data.batch_size", batch_size, 1)
        check_int("data.num_workers", num_workers, 0)
        self.tasks = list(tasks)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._test: dict[str, list[Article]] = {}
        self._train: dict[str, list[Article]] = {}

    def task(self, name: str) -> SummarizationTask:
        """The task called ``name``."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no summarisation task {name!r}; tasks are {[t.name for t in self.tasks]}")

    def setup(self, stage: str | None = None) -> None:
        for task in self.tasks:
            if task.name not in self._test:
                self._test[task.name] = subsample(load_articles(task, task.test_split), task.n, task.seed)

    def test_articles(self, name: str) -> list[Article]:
        """The (subsampled) test articles of task ``name``, in order."""
        task = self.task(name)
        if name not in self._test:
            self._test[name] = subsample(load_articles(task, task.test_split), task.n, task.seed)
        return list(self._test[name])

    def train_articles(self, name: str) -> list[Article]:
        """The demonstration pool of task ``name`` (its train split, read on first use)."""
        task = self.task(name)
        if name not in self._train:
            self._train[name] = load_articles(task, task.train_split)
        return list(self._train[name])

    def stats(self, name: str) -> dict[str, float]:
        """:func:`length_stats` of the test articles of task ``name``."""
        return length_stats(self.test_articles(name))

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        items = [{"task": t.name, "article": a} for t in self.tasks for a in self._test[t.name]]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False, collate_fn=_collate,
                          num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
