"""Questions for a FEWL evaluation (Wei et al. 2024, arXiv:2402.10412): a question pool with optional
per-question answers, candidate answers and intentionally wrong (IW) answers, served as records.

Columns (renamed with the source's ``fields`` like every :class:`~lit_align.data.DataSource`):

* ``question`` (required, a non-empty string);
* ``answer``: an answer given with the data, scored when the evaluation has no evaluated model; falls back
  to TruthfulQA's ``best_answer``;
* ``candidates``: candidate answers to choose from by FEWL (label-free SFT targets, ICL demonstrations);
* ``wrong``: intentionally wrong answers (the IW answers of ``synthetic.source: dataset``); falls back to
  TruthfulQA's ``incorrect_answers`` and to the built-in fictitious facts' ``perturbed_answers``.

A list column is a JSON list of strings, or (CSV cells) one string split on ``list_separator``: TruthfulQA's
own CSV writes ``Incorrect Answers`` as ``"a; b; c"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import DataSource, Record, describe_record, load_records
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler
from lit_align.errors import ConfigError, DataError

__all__ = ["FEWLBatch", "FEWLDataModule", "FEWLQuestion", "TRUTHFULQA", "load_fewl_questions"]

#: TruthfulQA's generation task (817 questions; the FEWL paper used 737 of them): ``question``, ``best_answer``,
#: ``incorrect_answers`` (a list), read through ``datasets`` (downloaded on first use).
TRUTHFULQA = DataSource(path="truthfulqa/truthful_qa", subset="generation", split="validation")

#: canonical field -> source columns tried in order when the canonical name is absent (and not mapped by ``fields``)
FALLBACK_COLUMNS: dict[str, tuple[str, ...]] = {
    "answer": ("best_answer",),
    "wrong": ("incorrect_answers", "perturbed_answers"),
    "candidates": (),
}


@dataclass(frozen=True)
class FEWLQuestion:
    """One question of the pool, with what the data give about it."""

    question: str
    """The question text (the prompt every model answers)."""
    answer: str | None = None
    """An answer given with the data (scored when no model is evaluated), or ``None``."""
    candidates: tuple[str, ...] = ()
    """Candidate answers given with the data (scored and ranked by FEWL)."""
    wrong: tuple[str, ...] = ()
    """Intentionally wrong (IW) answers given with the data."""
    index: int = 0
    """Position in the pool (0..Q-1): neighbours, seeds and cache keys are per index."""
    source_index: int = 0
    """Position of the record in its source (for error messages)."""


@dataclass
class FEWLBatch:
    """A batch of pool questions.

    Attributes:
        questions: B :class:`FEWLQuestion` s.
        index: (B,) long, their pool positions.
    """

    questions: list[FEWLQuestion]
    index: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> FEWLBatch:
        """A copy with the index on ``device`` (Lightning's batch transfer calls it)."""
        return FEWLBatch(self.questions, self.index.to(device))


def _collate(questions: list[FEWLQuestion]) -> FEWLBatch:
    return FEWLBatch(list(questions), torch.tensor([q.index for q in questions], dtype=torch.long))


def _text_list(value: Any, name: str, where: str, separator: str | None) -> tuple[str, ...]:
    """A list column as a tuple of non-empty stripped strings (a string is split on ``separator``)."""
    if isinstance(value, str):
        parts = value.split(separator) if separator else [value]
        value = [p for p in (p.strip() for p in parts) if p]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {name!r} must be a list of strings (or a {separator!r}-separated string), "
                        f"got {type(value).__name__}")
    out = tuple(v.strip() for v in value)
    if any(not v for v in out):
        raise DataError(f"{where}: field {name!r} holds an empty answer; remove it from the list")
    return out


def _column(record: Record, name: str, mapped: bool) -> Any:
    """The value of canonical field ``name``: its own (or mapped) column, else the first fallback column present."""
    if name in record:
        return record[name]
    if mapped:
        return None
    return next((record[c] for c in FALLBACK_COLUMNS[name] if c in record), None)


def _question(record: Record, pool_index: int, source: DataSource, separator: str | None) -> FEWLQuestion:
    where = describe_record(source.path, record["_source_index"])
    if not isinstance(record["question"], str):
        raise DataError(f"{where}: field 'question' must be a plain string, not a list of chat messages")
    answer = _column(record, "answer", "answer" in source.fields)
    if answer is not None and not (isinstance(answer, str) and answer.strip()):
        raise DataError(f"{where}: field 'answer' must be a non-empty string, got {answer!r}")
    lists = {name: _column(record, name, name in source.fields) for name in ("candidates", "wrong")}
    lists = {name: _text_list(v, name, where, separator) if v is not None else () for name, v in lists.items()}
    return FEWLQuestion(record["question"].strip(), answer.strip() if answer is not None else None,
                        lists["candidates"], lists["wrong"], pool_index, record["_source_index"])


def load_fewl_questions(source: DataSource, list_separator: str | None = ";") -> list[FEWLQuestion]:
    """The pool of ``source`` as :class:`FEWLQuestion` s, validated: a record without a (non-empty) ``question``
    or with a malformed optional field is a :class:`~lit_align.errors.DataError` naming the record and field."""
    extra = [c for name, columns in FALLBACK_COLUMNS.items() for c in (name, *columns)]
    records = load_records(source, required=("question",), extra=extra)
    return [_question(r, i, source, list_separator) for i, r in enumerate(records)]


class _QuestionDataset(Dataset):
    def __init__(self, questions: list[FEWLQuestion]) -> None:
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> FEWLQuestion:
        return self.questions[i]


class FEWLDataModule(TokenizedDataModule):
    """The question pool of a FEWL evaluation (``lit-align test``), as :class:`FEWLBatch` es of
    :class:`FEWLQuestion` s; no tokenizer (every model of the evaluation prompts with its own).

    The whole pool is also the neighbour pool of the laziness penalty: :meth:`questions` gives it to the
    evaluation module, which answers every question with every reference before scoring any batch.

    Examples::

        data:  # the built-in fictitious facts: IW answers = perturbed_answers
          class_path: lit_align.data.FEWLDataModule
          init_args: {questions: {path: "builtin:fictitious_facts"}}

        data:  # TruthfulQA generation (answer <- best_answer, wrong <- incorrect_answers)
          class_path: lit_align.data.FEWLDataModule
          init_args: {questions: {path: truthfulqa/truthful_qa, subset: generation, split: validation}}

        data:  # your file: a question column named "prompt", candidate answers in "samples"
          class_path: lit_align.data.FEWLDataModule
          init_args: {questions: {path: my_questions.jsonl, fields: {question: prompt, candidates: samples}}}
    """

    def __init__(self, questions: DataSource, batch_size: int = 16, list_separator: str | None = ";",
                 num_workers: int = 0) -> None:
        """
        Args:
            questions: where the questions come from (``builtin:fictitious_facts``, a local .jsonl/.json/.csv/.parquet
                file, or an HF dataset such as ``truthfulqa/truthful_qa`` subset ``generation``, split ``validation``).
            batch_size: questions per test step.
            list_separator: how a list column held in one string (a CSV cell) is split; ``null``: not split.
            num_workers: DataLoader worker processes.
        """
        if list_separator == "":
            raise ConfigError("data.list_separator must be a non-empty string or null, got ''")
        super().__init__(questions, val_fraction=0.0, batch_size=batch_size, chat_template=False, shuffle=False,
                         num_workers=num_workers)
        self.list_separator = list_separator

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.train_dataset = _QuestionDataset(load_fewl_questions(self.train_source, self.list_separator))
        self.test_dataset = self.train_dataset

    def questions(self) -> list[FEWLQuestion]:
        """The whole pool, in order (sets the data up if needed)."""
        self.setup()
        return list(self.train_dataset.questions)

    def fingerprint(self) -> str:
        """sha256 of the pool (every field of every question, in order)."""
        h = hashlib.sha256(b"fewl-questions")
        for q in self.questions():
            h.update(repr(dataclasses.astuple(q)).encode())
        return h.hexdigest()

    def train_dataloader(self) -> DataLoader:
        raise ConfigError("FEWLDataModule serves an evaluation: run `lit-align test`, not `fit`")

    def val_dataloader(self) -> list:
        return []

    def _encode(self, record: Any, index: int, tokenizer: Any, chat: bool) -> FEWLQuestion:
        return record  # unused: questions are not tokenized here

    def _collator(self, pad_token_id: int | None = None):
        return _collate

    def _loader(self, dataset: _QuestionDataset, batch_size: int, *, shuffle: bool, shard: bool,
                train: bool = False) -> DataLoader:
        replicas, rank = self._shard() if shard else (1, 0)
        sampler = ShardedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=_collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   warn_truncated=False)

