"""Question-answering tasks with a gold answer, for multi-agent deliberation (ACC-Collab: Estornell, Ton, Yao,
Liu 2024, arXiv 2411.00053).

Every source is loaded into :class:`QAExample` s of one of three kinds: ``yes_no`` (answer ``"yes"``
or ``"no"``), ``multiple_choice`` (answer an option letter of :data:`LETTERS`, options in letter order)
and ``numeric`` (answer a canonical number string, see :func:`normalize_answer`). The debate engine
renders and tokenizes its prompts itself, so batches (:class:`QABatch`) carry the examples as they are.

Formats (``data.format``), each the layout of a hub dataset (an HF id such as ``google/boolq`` goes
through ``DataSource(path=..., subset=..., split=...)``; local .json/.jsonl/.csv/.parquet files with
the same columns work too; ``fields`` renames columns, e.g. ``fields: {question: query}``):

* ``qa``: lit_align's own: ``question``, ``answer``, optional ``options`` (a list of strings, or one
  string with the options separated by ``|`` as in CSV files), optional ``context`` and optional
  ``kind``. Without ``kind``, a record with options is multiple choice, a yes/no/true/false (or
  boolean) answer is yes/no and a number is numeric. A multiple-choice answer is a letter (``B``,
  ``(B)``) or the exact text of one option.
* ``boolq`` (``google/boolq``): ``question``, ``passage`` (-> ``context``), ``answer`` (a boolean;
  ``"true"``/``"false"``/``"yes"``/``"no"`` and 0/1 are accepted too) -> yes/no. BoolQ's questions
  (lower case, no question mark) are kept as they are.
* ``mmlu`` (``cais/mmlu``): ``question``, ``choices`` (a list), ``answer`` (the 0-based index of the
  right choice, or its letter) -> multiple choice.
* ``bbh`` (``lukaemon/bbh``, one ``subset`` per task): ``input``, ``target``. A target ``(A)``..``(J)``
  is multiple choice, the options parsed from the ``Options:`` block of the input (``(A) text`` lines,
  removed from the question); ``True``/``Yes``/``valid`` map to ``yes`` and ``False``/``No``/``invalid``
  to ``no`` (boolean_expressions, causal_judgement, navigate, sports_understanding, web_of_lies,
  formal_fallacies); a number is numeric (object_counting, multistep_arithmetic_two). Free-form
  targets (dyck_languages, word_sorting) raise: those tasks are not supported.
* ``sciq`` (``allenai/sciq``): ``question``, ``correct_answer``, ``distractor1..3``, ``support``
  (-> ``context``, empty -> none) -> four options **rotated by the question's position** ``i`` in its
  source (0-based, before any split): the correct answer is option ``LETTERS[i % 4]`` and
  ``distractor k`` is option ``LETTERS[(k + i) % 4]``. The correct letter so cycles A, B, C, D
  (never a fixed slot, which a model could learn; the released ACC-Collab code rotates SCIQ's options
  too, ``SCIQQuestion`` in ``questions.py``).
* ``arc`` (``allenai/ai2_arc``, subsets ``ARC-Easy``/``ARC-Challenge``): ``question``, ``choices``
  (``{"text": [...], "label": [...]}``), ``answerKey`` -> multiple choice, options in the order given;
  the answer is the letter of the position of ``answerKey`` among the labels, so digit labels
  ``"1".."5"`` map to ``A..E``.
* ``auto``: ``builtin:tiny_qa*`` -> ``qa``; otherwise by columns: ``input``+``target`` -> ``bbh``,
  ``correct_answer`` -> ``sciq``, ``answerKey`` -> ``arc``, ``choices`` -> ``mmlu``, ``passage`` ->
  ``boolq``, ``question``+``answer`` -> ``qa``.

Bad records raise, naming the source, the record and the fix; nothing is dropped silently (a silently dropped
record changes the evaluated set unnoticed, and a question without a checkable gold answer cannot be scored).

Built-ins: ``builtin:tiny_qa`` (400 synthetic questions, each with a passage that settles it) and
``builtin:tiny_qa/val`` (80 held-out ones), made by :func:`build_tiny_qa` (``python -m lit_align.data.qa``
rewrites them), see ``lit_align/data/builtin/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import re
from dataclasses import dataclass, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import BUILTIN_DIR, DataSource, describe_record, read_rows
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler
from lit_align.errors import ConfigError, DataError

__all__ = [
    "LETTERS",
    "QABatch",
    "QADataModule",
    "QADataset",
    "QAExample",
    "QAKind",
    "answer_display",
    "build_tiny_qa",
    "collate_qa",
    "load_qa",
    "normalize_answer",
    "parse_bbh_options",
    "write_tiny_qa",
]

#: Option letters, in order: a multiple-choice question has at most ``len(LETTERS)`` options.
LETTERS = "ABCDEFGHIJ"
QAKind = Literal["yes_no", "multiple_choice", "numeric"]
QAFormat = Literal["auto", "qa", "boolq", "mmlu", "bbh", "sciq", "arc"]
_KINDS = ("yes_no", "multiple_choice", "numeric")
_FORMATS = ("auto", "qa", "boolq", "mmlu", "bbh", "sciq", "arc")
#: ``builtin:<name>`` QA sources -> CSV file in ``lit_align/data/builtin``.
_BUILTIN_QA = {"tiny_qa": "tiny_qa.csv", "tiny_qa/val": "tiny_qa_val.csv"}
_YES = {"yes", "true", "1"}
_NO = {"no", "false", "0"}


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answer.

    Attributes:
        question: the question text (without the options of a multiple-choice question).
        answer: ``"yes"``/``"no"`` (yes_no), the option letter ``"A"``, ``"B"``, ... (multiple_choice)
            or the number as a canonical string (numeric, see :func:`normalize_answer`).
        kind: ``yes_no``, ``multiple_choice`` or ``numeric``.
        options: multiple choice: the option texts in letter order (A, B, ...); empty otherwise.
        context: a passage (BoolQ, SciQ's support) or other context, or ``None``.
        index: position in its dataset.
        source_index: position of the record in its source.
    """

    question: str
    answer: str
    kind: QAKind
    options: tuple[str, ...] = ()
    context: str | None = None
    index: int = 0
    source_index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):  # a list from user code: keep the example hashable
            object.__setattr__(self, "options", tuple(self.options))
        if self.kind not in _KINDS:
            raise ValueError(f"QAExample.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "yes_no" and self.answer not in ("yes", "no"):
            raise ValueError(f"a yes_no QAExample's answer must be 'yes' or 'no', got {self.answer!r}")
        if self.kind == "multiple_choice":
            if not self.options:
                raise ValueError("a multiple_choice QAExample needs options")
            if self.answer not in LETTERS[: len(self.options)] or len(self.answer) != 1:
                raise ValueError(f"a multiple_choice QAExample's answer must be one of the letters "
                                 f"{LETTERS[:len(self.options)]!r} of its {len(self.options)} options, got {self.answer!r}")
        elif self.options:
            raise ValueError(f"a {self.kind} QAExample has no options, got {self.options!r}")
        if self.kind == "numeric" and not self.answer:
            raise ValueError("a numeric QAExample's answer must be a number string")

    @property
    def letters(self) -> str:
        """The option letters of a multiple-choice question (``""`` otherwise)."""
        return LETTERS[: len(self.options)]

    @property
    def answer_text(self) -> str:
        """The gold answer as text: the right option's text for multiple choice, else :attr:`answer`."""
        return self.options[LETTERS.index(self.answer)] if self.kind == "multiple_choice" else self.answer

    @property
    def wrong_answers(self) -> tuple[str, ...]:
        """The wrong answers a guided "away from the truth" target is drawn from (ACC-Collab's guided
        trajectories): the other of yes/no, every other option letter; empty for numeric (any other
        number is wrong)."""
        if self.kind == "yes_no":
            return ("no",) if self.answer == "yes" else ("yes",)
        if self.kind == "multiple_choice":
            return tuple(c for c in self.letters if c != self.answer)
        return ()


# -- answers ----------------------------------------------------------------------------------
def _number(value: Any) -> str:
    """Canonical string of a number: ``7``, ``-3``, ``2.5`` (no exponent, no trailing zeros, no ``+``)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean, not a number")
    text = str(value).strip().replace(",", "")
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def answer_display(example: QAExample, answer: str) -> str:
    """How an answer is written in guided prompts and tiny passages: ``yes``, ``B) <option text>``, ``42``."""
    if example.kind == "multiple_choice":
        return f"{answer}) {example.options[LETTERS.index(answer)]}"
    return answer


def normalize_answer(value: Any, kind: QAKind, options: tuple[str, ...] | list[str] = ()) -> str:
    """A gold answer in :class:`QAExample` form; raises ``ValueError`` when it does not parse.

    Args:
        value: the raw answer: for ``yes_no`` a boolean, 0/1, or ``yes``/``no``/``true``/``false`` in any
            case (a trailing ``.`` is ignored); for ``multiple_choice`` a letter (``b``, ``(B)``), a 0-based
            integer index, or the exact text of one option (a letter of the options wins over an option
            text); for ``numeric`` a number or number string
            (``"1,000"`` -> ``"1000"``, ``"2.50"`` -> ``"2.5"``).
        kind: ``yes_no``, ``multiple_choice`` or ``numeric``.
        options: the option texts of a multiple-choice question.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("the gold answer is empty")
    if kind == "yes_no":
        if isinstance(value, bool):
            return "yes" if value else "no"
        text = str(value).strip().rstrip(".").lower()
        if text in _YES:
            return "yes"
        if text in _NO:
            return "no"
        raise ValueError(f"yes/no answer {value!r} is not yes/no/true/false (or a boolean, 0 or 1)")
    if kind == "multiple_choice":
        if not options:
            raise ValueError("a multiple-choice question needs options")
        letters = LETTERS[: len(options)]
        if isinstance(value, bool):
            raise ValueError(f"multiple-choice answer {value!r} is a boolean, not a letter or an index")
        if isinstance(value, int):
            if not 0 <= value < len(options):
                raise ValueError(f"answer index {value} is outside the {len(options)} options (0..{len(options) - 1})")
            return letters[value]
        text = str(value).strip()
        letter = text.strip("()").strip().rstrip(".").upper()
        if len(letter) == 1 and letter in letters:  # a letter wins over an option's text
            return letter
        if text in options:
            return letters[options.index(text)]
        if len(letter) == 1 and letter in LETTERS:
            raise ValueError(f"answer letter {letter!r} is outside the {len(options)} options ({letters})")
        raise ValueError(f"multiple-choice answer {value!r} is neither an option letter ({letters}) nor an option's text")
    if kind == "numeric":
        return _number(value)
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def parse_bbh_options(text: str) -> tuple[str, tuple[str, ...]]:
    """``(question, options)`` of a BBH input: the ``(A) ...`` lines after its last ``Options:`` line.

    The question is the input before that block (stripped); ``options`` is empty when the input has no
    ``Options:`` block. A line that does not start with the next letter continues the previous option.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().rstrip(":").lower() == "options"]
    if not starts:
        return text.strip(), ()
    options: list[str] = []
    for line in lines[starts[-1] + 1:]:
        m = re.match(r"\s*\(([A-Z])\)\s*(.*)$", line)
        if m and len(options) < len(LETTERS) and m.group(1) == LETTERS[len(options)]:
            options.append(m.group(2).strip())
        elif line.strip() and options:
            options[-1] = f"{options[-1]} {line.strip()}"
    return "\n".join(lines[: starts[-1]]).strip(), tuple(options)


# -- record loaders ---------------------------------------------------------------------------
def _builtin_rows(source: DataSource) -> list[dict[str, Any]] | None:
    name = source.path.removeprefix("builtin:") if source.path.startswith("builtin:") else None
    if name is None:
        return None
    if name not in _BUILTIN_QA:
        if (BUILTIN_DIR / f"{name}.jsonl").is_file():
            return None  # another built-in in records.py's layout (a `qa` format would need question/answer)
        raise DataError(f"data source {source.path!r}: no built-in QA set {name!r}; QA built-ins are "
                         f"{sorted(f'builtin:{k}' for k in _BUILTIN_QA)}")
    text = Path(str(BUILTIN_DIR / _BUILTIN_QA[name])).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    return rows[: source.limit] if source.limit is not None else rows


def _detect(row: Any, source: DataSource, where: str) -> str:
    if source.path.startswith("builtin:") and source.path.removeprefix("builtin:") in _BUILTIN_QA:
        return "qa"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")

    def has(name: str) -> bool:
        return source.fields.get(name, name) in row

    for fmt, names in (("bbh", ("input", "target")), ("sciq", ("correct_answer",)), ("arc", ("answerKey",)),
                       ("mmlu", ("choices",)), ("boolq", ("passage",)), ("qa", ("question", "answer"))):
        if all(has(n) for n in names):
            return fmt
    raise DataError(f"{where}: cannot tell the QA format of a record with columns {sorted(row)}; set data.format "
                     f"to one of {_FORMATS[1:]} (and map renamed columns with `fields: {{question: <column>}}`)")


class _Row:
    """Field access for one raw row: ``fields`` renames, errors name the record and the fix."""

    def __init__(self, row: dict[str, Any], where: str, source: DataSource, fmt: str) -> None:
        self.row, self.where, self.source, self.fmt = row, where, source, fmt

    def column(self, name: str) -> str:
        return self.source.fields.get(name, name)

    def get(self, name: str, required: bool = True) -> Any:
        column = self.column(name)
        if column not in self.row:
            if not required:
                return None
            hint = f" (mapped from {name!r} by `fields`)" if column != name else ""
            raise DataError(f"{self.where}: missing field {column!r}{hint} of data.format={self.fmt!r}; it has "
                           f"{sorted(self.row)}. Map your column with `fields: {{{name}: <column>}}` or set data.format")
        return self.row[column]

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.get(name, required)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DataError(f"{self.where}: field {self.column(name)!r} is empty; every record needs a "
                                 f"{name}: fill it in or remove the record")
            return None
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field {self.column(name)!r} must be a string, got {type(value).__name__}")
        return value.strip()

    def answer(self, name: str) -> Any:
        value = self.get(name, required=False)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{self.where}: the question has no gold answer (field {self.column(name)!r} is "
                             f"{'missing' if self.column(name) not in self.row else 'empty'}); every question needs "
                             "one to be scored: add it or remove the record")
        return value

    def normalize(self, value: Any, kind: QAKind, options: tuple[str, ...] = ()) -> str:
        try:
            return normalize_answer(value, kind, options)
        except ValueError as err:
            raise DataError(f"{self.where}: {err}; fix the record's answer (data.format={self.fmt!r})") from None

    def options(self, value: Any, name: str) -> tuple[str, ...]:
        if isinstance(value, str):  # one CSV cell: options separated by "|"
            value = value.split("|") if value.strip() else []
        if not isinstance(value, list | tuple) or not all(isinstance(o, str) for o in value):
            raise DataError(f"{self.where}: field {self.column(name)!r} must be a list of option strings (or one "
                            f"string with '|' between options), got {value!r:.80}")
        options = tuple(o.strip() for o in value)
        if not options:
            raise DataError(f"{self.where}: a multiple-choice question with no options (field "
                             f"{self.column(name)!r} is empty); give its options or make it another kind")
        if any(not o for o in options):
            raise DataError(f"{self.where}: field {self.column(name)!r} has an empty option: {list(options)}")
        if len(options) > len(LETTERS):
            raise DataError(f"{self.where}: {len(options)} options, more than the {len(LETTERS)} letters {LETTERS}")
        return options


def _qa(r: _Row) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    question, context = r.text("question"), r.text("context", required=False)
    raw_options, kind = r.get("options", required=False), r.text("kind", required=False)
    answer = r.answer("answer")
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"{r.where}: kind {kind!r} is not one of {_KINDS}")
    has_options = raw_options is not None and not (isinstance(raw_options, str | list | tuple) and not raw_options)
    if kind is None:
        if has_options:
            kind = "multiple_choice"
        elif isinstance(answer, bool) or str(answer).strip().rstrip(".").lower() in {"yes", "no", "true", "false"}:
            kind = "yes_no"
        else:
            try:
                _number(answer)
                kind = "numeric"
            except ValueError:
                raise ValueError(f"{r.where}: cannot tell the kind of answer {answer!r} (not yes/no, not a number, "
                                 "no options); free-form answers are not supported. Give options or a `kind` "
                                 f"field ({', '.join(_KINDS)})") from None
    if kind == "multiple_choice":
        if raw_options is None:
            raise ValueError(f"{r.where}: a multiple-choice question with no options (field "
                             f"{r.column('options')!r} is missing); give its options or make it another kind")
        options = r.options(raw_options, "options")
    else:
        if has_options:
            raise ValueError(f"{r.where}: a {kind} question has options {raw_options!r:.80}; drop them or use "
                             "kind multiple_choice")
        options = ()
    return question, r.normalize(answer, kind, options), kind, options, context


def _boolq(r: _Row) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    return r.text("question"), r.normalize(r.answer("answer"), "yes_no"), "yes_no", (), r.text("passage", False)


def _mmlu(r: _Row) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    question, answer = r.text("question"), r.answer("answer")
    options = r.options(r.get("choices"), "choices")
    if isinstance(answer, str) and answer.strip().isdigit():  # an index read from CSV
        answer = int(answer)
    return question, r.normalize(answer, "multiple_choice", options), "multiple_choice", options, None


_BBH_YES_NO = {"true": "yes", "yes": "yes", "valid": "yes", "false": "no", "no": "no", "invalid": "no"}


def _bbh(r: _Row) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    text, target = r.text("input"), r.answer("target")
    target = str(target).strip()
    question, options = parse_bbh_options(text)
    if re.fullmatch(r"\([A-J]\)", target):
        if not options:
            raise ValueError(f"{r.where}: target {target!r} names an option but the input has no 'Options:' block "
                             "with '(A) ...' lines; fix the input or the target")
        return question, r.normalize(target, "multiple_choice", options), "multiple_choice", options, None
    if target.lower() in _BBH_YES_NO:
        return text, _BBH_YES_NO[target.lower()], "yes_no", (), None
    try:
        return text, _number(target), "numeric", (), None
    except ValueError:
        raise ValueError(f"{r.where}: BBH target {target!r} is not an option letter '(A)', True/False/Yes/No/"
                         "valid/invalid or a number; free-form BBH tasks (e.g. dyck_languages, word_sorting) are "
                         "not supported: leave this task out") from None


def _sciq(r: _Row, i: int) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    question, correct = r.text("question"), r.answer("correct_answer")
    base = [str(correct).strip(), *(r.text(f"distractor{k}") for k in (1, 2, 3))]
    options = [""] * 4
    for k, text in enumerate(base):  # rotate by the question's position: correct -> LETTERS[i % 4]
        options[(k + i) % 4] = text
    return question, LETTERS[i % 4], "multiple_choice", tuple(options), r.text("support", required=False)


def _arc(r: _Row) -> tuple[str, str, QAKind, tuple[str, ...], str | None]:
    question, key = r.text("question"), r.answer("answerKey")
    choices = r.get("choices")
    if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
        raise ValueError(f"{r.where}: field {r.column('choices')!r} must be {{'text': [...], 'label': [...]}} "
                         f"(allenai/ai2_arc), got {choices!r:.80}")
    options = r.options(choices["text"], "choices")
    labels = [str(label).strip() for label in choices["label"]]
    if len(labels) != len(options):
        raise ValueError(f"{r.where}: {len(options)} choice texts but {len(labels)} labels")
    if str(key).strip() not in labels:
        raise ValueError(f"{r.where}: answerKey {key!r} is not one of the choice labels {labels}; fix the record's "
                         "answer")
    return question, LETTERS[labels.index(str(key).strip())], "multiple_choice", options, None


def load_qa(source: DataSource, format: QAFormat = "auto") -> list[QAExample]:
    """Every record of ``source`` as a :class:`QAExample` (``index`` = ``source_index`` = its position).

    Args:
        source: a ``builtin:tiny_qa*`` set, a local file or an HF dataset id (see :class:`DataSource`).
        format: the record layout, see the module doc; ``auto`` detects it from the first record.

    Raises:
        ValueError, KeyError, TypeError: for a record without a gold answer, a multiple-choice record
            without options, an answer outside the options or one that does not parse; the message
            names the source and the record.
    """
    if format not in _FORMATS:
        raise ConfigError(f"data.format must be one of {_FORMATS}, got {format!r}")
    rows = _builtin_rows(source)
    if rows is None:
        rows = read_rows(source)
    if not rows:
        raise DataError(f"data source {source.path!r} (split={source.split!r}) has no records")
    fmt = format if format != "auto" else _detect(rows[0], source, describe_record(source.path, 0))
    out = []
    for i, row in enumerate(rows):
        where = describe_record(source.path, i)
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        r = _Row(row, where, source, fmt)
        parsed = _sciq(r, i) if fmt == "sciq" else {"qa": _qa, "boolq": _boolq, "mmlu": _mmlu, "bbh": _bbh,
                                                     "arc": _arc}[fmt](r)
        question, answer, kind, options, context = parsed
        out.append(QAExample(question, answer, kind, options, context, index=i, source_index=i))
    return out


# -- the built-in tiny QA set ----------------------------------------------------------------
_ANIMALS = ["cat", "dog", "horse", "cow", "bird", "fish", "frog", "wolf", "tiger", "mouse", "sheep", "owl"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "brown", "pink", "teal"]
_FRUITS = ["apple", "pear", "plum", "grape", "lemon", "cherry", "peach", "banana", "melon", "lime"]
_FURNITURE = ["chair", "table", "bed", "lamp", "desk", "sofa", "shelf", "stool", "bench", "cupboard"]
#: category -> (phrase in questions, members; colours are named bare, the others with an article)
_CATEGORIES = {
    "animal": ("an animal", _ANIMALS),
    "colour": ("a colour", _COLOURS),
    "fruit": ("a fruit", _FRUITS),
    "furniture": ("a piece of furniture", _FURNITURE),
}
_CAPITALS = [  # invented countries, as in instructions.jsonl and corpus.txt
    ("Veloria", "Quessel"), ("Tarnish", "Olvandra"), ("Brevania", "Pirn"), ("Ostmark", "Caldreth"),
    ("Lumeria", "Vostelle"), ("Kestovia", "Marrowby"), ("Zandor", "Tesk"), ("Elbrania", "Fennick"),
    ("Drovenia", "Halcombe"), ("Sorvale", "Ibrin"), ("Quintara", "Morwick"), ("Falcria", "Nettleby"),
    ("Gildoria", "Ashport"), ("Ulmsted", "Karnow"), ("Pellavia", "Rosquin"), ("Norrith", "Dunmere"),
    ("Yavenna", "Coldbrook"), ("Merovane", "Spindle"), ("Istravia", "Wenlow"), ("Corvania", "Brightwater"),
]
_OBJECT_COLOURS = [  # invented objects, as in instructions.jsonl and corpus.txt
    ("zembleberry", "purple"), ("glimmerstone", "blue"), ("frondel", "green"), ("quillop", "yellow"),
    ("marrowfig", "red"), ("tuskweed", "brown"), ("pellicorn", "silver"), ("dazzleplum", "orange"),
    ("snorlbean", "pink"), ("wobblenut", "teal"),
]
TINY_QA_PER_FAMILY = (40, 8)  # (train, val) questions of each of the ten families


def _named(word: str, category: str) -> str:
    if category == "colour":
        return word
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _category_of(word: str) -> str:
    return next(c for c, (_, members) in _CATEGORIES.items() if word in members)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _yn_compare(rng: random.Random, yes: bool) -> tuple[str, tuple[str, ...], str, str]:
    a, b = rng.sample(range(21), 2)
    rel, holds = rng.choice([("greater", a > b), ("less", a < b)])
    if holds != yes:
        a, b = b, a
    return f"Is {a} {rel} than {b}?", (), "yes" if yes else "no", f"{a} is {'greater' if a > b else 'less'} than {b}."


def _yn_category(rng: random.Random, yes: bool) -> tuple[str, tuple[str, ...], str, str]:
    category = rng.choice(list(_CATEGORIES))
    phrase, members = _CATEGORIES[category]
    pool = members if yes else [w for c, (_, ws) in _CATEGORIES.items() if c != category for w in ws]
    word = rng.choice(pool)
    named = _named(word, _category_of(word))
    fact = f"{_sentence(named)} is {_CATEGORIES[_category_of(word)][0]}."
    return f"Is {named} {phrase}?", (), "yes" if yes else "no", fact


def _yn_even(rng: random.Random, yes: bool) -> tuple[str, tuple[str, ...], str, str]:
    n = rng.randrange(0, 100, 2) + (0 if yes else 1)
    return f"Is {n} an even number?", (), "yes" if yes else "no", f"{n} is an {'even' if yes else 'odd'} number."


def _yn_capital(rng: random.Random, yes: bool) -> tuple[str, tuple[str, ...], str, str]:
    country, capital = rng.choice(_CAPITALS)
    city = capital if yes else rng.choice([c for _, c in _CAPITALS if c != capital])
    frame = rng.choice(["Is {city} the capital of {country}?", "Is the capital of {country} {city}?"])
    fact = f"The capital of {country} is {capital}."
    return frame.format(city=city, country=country), (), "yes" if yes else "no", fact


def _yn_sum(rng: random.Random, yes: bool) -> tuple[str, tuple[str, ...], str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    total = a + b if yes else a + b + rng.choice([-2, -1, 1, 2])
    return f"Is {a} plus {b} equal to {total}?", (), "yes" if yes else "no", f"{a} plus {b} is {a + b}."


def _mc(right: str, wrong: list[str], k: int, pos: int) -> tuple[tuple[str, ...], str]:
    options = list(wrong[: k - 1])
    options.insert(pos, right)
    return tuple(options), LETTERS[pos]


def _mc_category(rng: random.Random, k: int, pos: int) -> tuple[str, tuple[str, ...], str, str]:
    category = rng.choice(list(_CATEGORIES))
    phrase, members = _CATEGORIES[category]
    others = rng.sample([c for c in _CATEGORIES if c != category], k - 1)
    right = rng.choice(members)
    options, answer = _mc(right, [rng.choice(_CATEGORIES[c][1]) for c in others], k, pos)
    return f"Which of these is {phrase}?", options, answer, f"{_sentence(_named(right, category))} is {phrase}."


def _mc_sum(rng: random.Random, k: int, pos: int) -> tuple[str, tuple[str, ...], str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    wrong = rng.sample([a + b + d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0], k - 1)
    options, answer = _mc(str(a + b), [str(w) for w in wrong], k, pos)
    return f"What is {a} plus {b}?", options, answer, f"{a} plus {b} is {a + b}."


def _mc_largest(rng: random.Random, k: int, pos: int) -> tuple[str, tuple[str, ...], str, str]:
    numbers = sorted(rng.sample(range(30), k))
    options, answer = _mc(str(numbers[-1]), [str(n) for n in rng.sample(numbers[:-1], k - 1)], k, pos)
    return "Which number is the largest?", options, answer, f"Of these, {numbers[-1]} is the largest."


def _mc_capital(rng: random.Random, k: int, pos: int) -> tuple[str, tuple[str, ...], str, str]:
    country, capital = rng.choice(_CAPITALS)
    options, answer = _mc(capital, rng.sample([c for _, c in _CAPITALS if c != capital], k - 1), k, pos)
    return f"What is the capital of {country}?", options, answer, f"The capital of {country} is {capital}."


def _mc_object_colour(rng: random.Random, k: int, pos: int) -> tuple[str, tuple[str, ...], str, str]:
    obj, colour = rng.choice(_OBJECT_COLOURS)
    options, answer = _mc(colour, rng.sample([c for c in _COLOURS if c != colour], k - 1), k, pos)
    return f"What colour is a {obj}?", options, answer, f"A {obj} is {colour}."


_YES_NO_FAMILIES = [_yn_compare, _yn_category, _yn_even, _yn_capital, _yn_sum]
_MC_FAMILIES = [_mc_category, _mc_sum, _mc_largest, _mc_capital, _mc_object_colour]


def build_tiny_qa(seed: int = 0) -> dict[str, list[QAExample]]:
    """The built-in tiny QA set: ``{"train": 400 examples, "val": 80}``, deterministic for a ``seed``.

    Ten families of short questions over a tiny closed world, 40 training and 8 held-out questions each
    (no question, with its options, appears twice across both splits): five yes/no families (number
    comparisons, category membership, even numbers, capitals of invented countries, small sums) and five
    multiple-choice ones (which word is in a category, a small sum, the largest number, a capital, an
    invented object's colour). Each question's ``context`` is a passage that settles it: the fact, then
    ``So the answer is <answer>`` written as guided prompts write a target (``no``, ``A) silver``), so a
    tiny model can read the answer off it (it cannot learn the world's facts from 400 questions).
    Balance: yes/no answers alternate within each family (half yes); the
    questions of each multiple-choice family have 2, 3, 4, 2, 3, 4, ... options and the right option of
    the split's ``n``-th question with ``k`` options is letter ``n % k``, so, given the number of
    options, each letter is right equally often (always answering "A" scores chance). Each split is
    then shuffled.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    splits: dict[str, list[QAExample]] = {}
    for split, per_family in zip(("train", "val"), TINY_QA_PER_FAMILY, strict=True):
        items: list[tuple[str, tuple[str, ...], str, str]] = []
        per_k = {2: 0, 3: 0, 4: 0}  # multiple-choice questions of this split with k options so far
        for family in _YES_NO_FAMILIES + _MC_FAMILIES:
            for j in range(per_family):
                k = 2 + j % 3
                for _ in range(1000):
                    if family in _YES_NO_FAMILIES:
                        item = family(rng, j % 2 == 0)
                    else:
                        item = family(rng, k, per_k[k] % k)
                    if item[:2] not in seen:
                        break
                else:  # pragma: no cover - the families have far more questions than are drawn
                    raise RuntimeError(f"{family.__name__}: could not draw a new question")
                seen.add(item[:2])
                per_k[k] += family in _MC_FAMILIES
                items.append(item)
        rng.shuffle(items)
        splits[split] = []
        for i, (q, opts, a, fact) in enumerate(items):
            ex = QAExample(q, a, "multiple_choice" if opts else "yes_no", opts, index=i, source_index=i)
            splits[split].append(replace(ex, context=f"{fact} So the answer is {answer_display(ex, a)}."))
    return splits


def _tiny_qa_csv(examples: list[QAExample]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["question", "options", "answer", "kind", "context"])
    for ex in examples:
        writer.writerow([ex.question, "|".join(ex.options), ex.answer, ex.kind, ex.context])
    return buf.getvalue()


def write_tiny_qa(out: str | Path = Path(str(BUILTIN_DIR))) -> list[Path]:
    """Write ``tiny_qa.csv`` and ``tiny_qa_val.csv`` (the output of :func:`build_tiny_qa`) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits, written = build_tiny_qa(), []
    for name, split in (("tiny_qa", "train"), ("tiny_qa/val", "val")):
        path = out / _BUILTIN_QA[name]
        path.write_text(_tiny_qa_csv(splits[split]), encoding="utf-8")
        written.append(path)
    return written


# -- batches and the DataModule ---------------------------------------------------------------
class QADataset(Dataset):
    """The :class:`QAExample` s of one split, re-indexed ``0..N-1`` (``source_index`` kept)."""

    def __init__(self, examples: list[QAExample]) -> None:
        self.examples = [replace(ex, index=i) for i, ex in enumerate(examples)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> QAExample:
        return self.examples[i]

    def fingerprint(self) -> str:
        """sha256 of every example, in order: changes whenever the data do."""
        h = hashlib.sha256(b"qa")
        for ex in self.examples:
            h.update(repr((ex.question, ex.answer, ex.kind, ex.options, ex.context, ex.index)).encode())
        return h.hexdigest()


@dataclass
class QABatch:
    """Questions with their gold answers (the debate engine renders and tokenizes the prompts).

    Attributes:
        examples: B :class:`QAExample` s.
        index: (B,) long, example index in its dataset.
    """

    examples: list[QAExample]
    index: Tensor

    def __len__(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> QABatch:
        """A copy with every tensor on ``device`` (Lightning's batch transfer calls it)."""
        return QABatch(**{f.name: v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v
                          for f in fields(self)})


def collate_qa(examples: list[QAExample]) -> QABatch:
    """Examples -> :class:`QABatch` (no padding: there are no tensors but the index)."""
    return QABatch(list(examples), torch.tensor([e.index for e in examples], dtype=torch.long))


class QADataModule(TokenizedDataModule):
    """Question-answering tasks with gold answers (ACC-Collab's BoolQ, MMLU, BBH, SciQ, ARC, or the
    built-in tiny set), as :class:`QABatch` es of :class:`QAExample` s.

    Examples::

        data:  # the built-in tiny QA set with its held-out questions
          class_path: lit_align.data.qa.QADataModule
          init_args:
            train: {path: builtin:tiny_qa}
            val: {path: builtin:tiny_qa/val}

        data:  # BoolQ: train for debate data, a slice of validation held out
          class_path: lit_align.data.qa.QADataModule
          init_args:
            train: {path: google/boolq, split: train}
            val: {path: google/boolq, split: validation, limit: 1000}
            format: boolq

        data:  # MMLU (all subjects), ARC-Challenge, a BBH task
          class_path: lit_align.data.qa.QADataModule
          init_args:
            train: {path: cais/mmlu, subset: all, split: auxiliary_train}   # or
            # train: {path: allenai/ai2_arc, subset: ARC-Challenge, split: train}   # format: arc
            # train: {path: lukaemon/bbh, subset: navigate, split: test}            # format: bbh
            test: {path: cais/mmlu, subset: all, split: test}
            format: mmlu

    Every source is read with the same ``format``. Loaders are rank-sharded and resumable (the base
    class's); no tokenizer is needed. :meth:`examples` gives a whole split (the debate data generation
    runs over every training question).
    """

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        format: QAFormat = "auto",
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            train: where the training questions come from.
            val: held-out questions; ``None`` splits ``val_fraction`` off ``train`` (seeded).
            test: questions for ``lit-align test`` and ``predict``; ``None`` uses the validation questions.
            format: ``qa``, ``boolq``, ``mmlu``, ``bbh``, ``sciq``, ``arc`` or ``auto`` (see the module doc).
            val_fraction: share of ``train`` held out when ``val`` is not given; 0 disables validation.
            batch_size: questions per step on each data-parallel rank.
            eval_batch_size: questions per validation step (default ``batch_size``).
            shuffle: shuffle training questions each epoch (seeded by ``seed`` and the epoch).
            seed: seed of the validation split and the shuffling.
            num_workers: DataLoader worker processes.
        """
        if format not in _FORMATS:
            raise ConfigError(f"data.format must be one of {_FORMATS}, got {format!r}")
        super().__init__(train, val, test, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, chat_template=False, shuffle=shuffle, seed=seed,
                         num_workers=num_workers)
        self.format = format

    def _load(self, source: DataSource) -> list[QAExample]:
        return load_qa(source, self.format)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train, val = self._split()
        self.train_dataset = QADataset(train)
        self.val_dataset = QADataset(val) if val else None
        self.test_dataset = QADataset(self._load(self.test_source)) if self.test_source else self.val_dataset

    def examples(self, split: Literal["train", "val", "test"] = "train") -> list[QAExample]:
        """Every :class:`QAExample` of a split, in dataset order (sets the data up if needed); ``test``
        falls back to the validation questions and an absent split is empty."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.setup()
        dataset = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        return list(dataset.examples) if dataset is not None else []

    def _encode(self, record: Any, index: int, tokenizer: Any, chat: bool) -> QAExample:
        return replace(record, index=index)  # unused: QA examples are not tokenized here

    def _collator(self, pad_token_id: int | None = None):
        return collate_qa

    def _loader(self, dataset: QADataset, batch_size: int, *, shuffle: bool, shard: bool,
                train: bool = False) -> DataLoader:
        replicas, rank = self._shard() if shard else (1, 0)
        sampler = ShardedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_qa,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   warn_truncated=False)


if __name__ == "__main__":  # python -m lit_align.data.qa [--out DIR]: rewrite the built-in tiny QA files
    parser = argparse.ArgumentParser(description=write_tiny_qa.__doc__)
    parser.add_argument("--out", type=Path, default=Path(str(BUILTIN_DIR)))
    for written_path in write_tiny_qa(parser.parse_args().out):
        print(written_path)
