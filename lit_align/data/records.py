"""One record-loading layer for every DataModule.

A :class:`DataSource` names where records come from:

* a built-in tiny dataset: ``builtin:instructions``, ``builtin:preferences``, ``builtin:ranked_preferences``,
  the adversarial-training sets ``builtin:adv_behaviours``, ``builtin:adv_benign``, ``builtin:adv_utility``
  (each with a held-out ``/val`` split, the file ``<name>_val.json``), the tiny ISARA domain ``builtin:isara_seeds``,
  ``builtin:isara_eval``, ``builtin:isara_benign``, ``builtin:fictitious_facts``,
  and the person splits of the last one, ``builtin:fictitious_facts/forget01|forget05|forget10`` and
  ``builtin:fictitious_facts/retain99|retain95|retain90`` (retain ``NN`` = every person not in forget ``100-NN``);
* a local file: ``.json`` (a list of records, or ``{"data": [...]}``), ``.jsonl``, ``.parquet``, ``.csv``;
* anything else (an HF ``datasets`` id, or a local directory of data files) is loaded by
  ``datasets.load_dataset`` with ``split`` and ``subset``.

``fields`` maps the names a DataModule needs to the column names of the source, e.g.
``{prompt: question, response: answer}``. Records are validated as they are loaded: a
missing or wrongly typed field raises an error naming the source, the record and the fix.
"""

from __future__ import annotations

import csv
import functools
import glob
import gzip
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lit_align.errors import DataError, MissingPathError
from lit_align.paths import hub_offline, looks_local

__all__ = ["BUILTIN_DIR", "DataSource", "Record", "describe_record", "load_records", "read_jsonl", "read_rows"]

Record = dict[str, Any]

#: Package directory holding the built-in datasets (made by ``scripts/build_builtin_data.py``).
BUILTIN_DIR = resources.files("lit_align") / "data" / "builtin"


@dataclass
class DataSource:
    """Where records come from and how their columns are named."""

    path: str
    """``builtin:<name>``, a local .json/.jsonl/.parquet/.csv file, or an HF dataset id (or a local
    directory of data files, which ``datasets.load_dataset`` reads)."""
    split: str = "train"
    """Split of an HF dataset (ignored for local files and built-ins)."""
    subset: str | None = None
    """Configuration name of an HF dataset."""
    fields: dict[str, str] = field(default_factory=dict)
    """Needed field -> source column, for sources whose columns are named differently."""
    templates: dict[str, str] = field(default_factory=dict)
    """Needed field -> ``str.format`` template over the source's columns, for a field made of several
    columns, e.g. ``{prompt: "{instruction}\n\n{input}"}`` (the result is stripped, so an empty
    ``input`` leaves no trailing blank lines)."""
    limit: int | None = None
    """Keep only the first ``limit`` records (before splitting). An HF dataset is then streamed: only those
    records are downloaded, not the whole split."""
    revision: str | None = None
    """Git revision (tag, branch or commit) of an HF dataset, to pin a hub dataset whose layout changes."""


def read_jsonl(path: Path) -> list[Any]:
    """The JSON values of a JSON-lines file, blank lines skipped (``.gz``: gzip-compressed); a line that is not
    JSON is a :class:`~lit_align.errors.DataError` naming the file and line."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = []
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        return rows


def _read_local(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records or {{'data': [...]}}")
        return data
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .csv")


#: ``builtin:fictitious_facts/<split>`` names: split -> (forget split of fictitious_facts_splits.json, keep it?)
FICTITIOUS_SPLITS = {
    "forget01": ("forget01", True), "forget05": ("forget05", True), "forget10": ("forget10", True),
    "retain99": ("forget01", False), "retain95": ("forget05", False), "retain90": ("forget10", False),
}


def _read_fictitious_split(split: str, path: str) -> list[Record]:
    """Records of ``builtin:fictitious_facts/<split>``, selected by ``person_id`` (file order kept)."""
    if split not in FICTITIOUS_SPLITS:
        raise DataError(f"data source {path!r}: no split {split!r} of the built-in fictitious_facts; "
                         f"splits are {sorted(FICTITIOUS_SPLITS)}")
    forget_split, keep = FICTITIOUS_SPLITS[split]
    people = set(json.loads((BUILTIN_DIR / "fictitious_facts_splits.json").read_text(encoding="utf-8"))[forget_split])
    rows = _read_local(Path(str(BUILTIN_DIR / "fictitious_facts.jsonl")))
    return [r for r in rows if (r["person_id"] in people) == keep]


#: File types of record built-ins: ``.jsonl`` or ``.json`` (scripts/build_tokenizer.py trains the tiny tokenizer on
#: a fixed list of ``.jsonl`` files only, so a new built-in of either type leaves it unchanged).
BUILTIN_SUFFIXES = (".jsonl", ".json")


def _builtin_file(name: str) -> Path | None:
    """The file of record built-in ``name`` (``<name>.jsonl`` or ``<name>.json``; a split ``<set>/<split>`` is the
    file ``<set>_<split>.json[l]``), or None."""
    stem = name.replace("/", "_")
    for suffix in BUILTIN_SUFFIXES:
        file = Path(str(BUILTIN_DIR / f"{stem}{suffix}"))
        if file.is_file():
            return file
    return None


def _read(source: DataSource) -> list[Record]:
    if source.path.startswith("builtin:"):
        name = source.path.removeprefix("builtin:")
        if name.startswith("fictitious_facts/"):
            return _read_fictitious_split(name.removeprefix("fictitious_facts/"), source.path)
        file = _builtin_file(name)
        if file is None:
            known = sorted(p.name.rsplit(".", 1)[0].replace("_val", "/val") for p in BUILTIN_DIR.iterdir()
                           if p.name.endswith(BUILTIN_SUFFIXES) and p.name != "fictitious_facts_splits.json")
            known += [f"fictitious_facts/{split}" for split in FICTITIOUS_SPLITS]
            raise DataError(f"data source {source.path!r}: no built-in dataset {name!r}; built-ins are {known}")
        return _read_local(file)
    local = Path(source.path).expanduser()
    if local.is_file():
        return _read_local(local)
    near = sorted(str(p) for p in local.parent.glob(glob.escape(local.name) + ".*")) if not local.exists() else []
    if not local.exists() and (near or looks_local(source.path)):
        hint = f"; did you mean {near[0]!r}?" if near else " (a hub dataset id is `name` or `org/name`)"
        raise MissingPathError(f"data source {source.path!r}: no such file or directory{hint}")
    # an HF dataset id, or a local dataset directory (data files that `datasets.load_dataset` reads)
    import datasets

    try:
        if source.limit is not None:
            # stream the first `limit` rows instead of downloading and converting the whole split (C4's
            # train split is hundreds of GB for the few thousand prompts a run reads)
            ds = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision,
                                       streaming=True)
            return list(itertools.islice(ds, source.limit))
        ds = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as err:  # datasets raises many types; all mean "cannot load this id"
        if hub_offline() and not local.exists():
            raise MissingPathError(
                f"data source {source.path!r}: no such local file or directory, and HF_HUB_OFFLINE is set, so it "
                "was looked up in the local HF cache only (not there). Give a local file, or unset "
                "HF_HUB_OFFLINE to download it."
            ) from err
        raise DataError(
            f"data source {source.path!r} (split={source.split!r}, subset={source.subset!r}) could not be "
            f"loaded as a local file or an HF dataset: {err}"
        ) from err
    return ds.to_list()


def _local_file(path: str) -> Path | None:
    """The file a source path reads record by record (a local or built-in file), or None."""
    if path.startswith("builtin:"):
        return _builtin_file(path.removeprefix("builtin:"))
    file = Path(path).expanduser()
    return file if file.is_file() else None


@functools.lru_cache(maxsize=16)
def _record_lines(file: str, stamp: tuple[int, int]) -> tuple[int, ...]:
    """The 1-based line on which each record of a .jsonl or .csv file starts (``stamp``: mtime and size,
    so an edited file is read again)."""
    suffix = Path(file).suffix.lower()
    with open(file, encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            return tuple(lineno for lineno, line in enumerate(f, 1) if line.strip())
        if suffix == ".csv":
            reader = csv.reader(f)
            starts, start = [], 1
            for _ in reader:
                starts.append(start)
                start = reader.line_num + 1
            return tuple(starts[1:])  # the first row is the header
    return ()


def _line_of(file: Path, index: int) -> int | None:
    """The 1-based line on which record ``index`` (0-based) of a .jsonl or .csv file starts."""
    stat = file.stat()
    lines = _record_lines(str(file), (stat.st_mtime_ns, stat.st_size))
    return lines[index] if 0 <= index < len(lines) else None


def describe_record(path: str, index: int) -> str:
    """``data source 'PATH', record N (line L)``: where an error is, for a person. ``index`` is the 0-based
    position (``_source_index``); records are counted from 1, and the line is given for .jsonl and .csv files."""
    file = _local_file(path)
    line = _line_of(file, index) if file is not None else None
    return f"data source {path!r}, record {index + 1}" + (f" (line {line})" if line is not None else "")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value) and bool(value)


def read_rows(source: DataSource) -> list[Record]:
    """The raw rows of a source (``limit`` applied), unrenamed and unvalidated, for loaders that
    derive records from several columns (e.g. one record per unsafe response of a row)."""
    rows = _read(source)
    return rows[: source.limit] if source.limit is not None else rows


def load_records(source: DataSource, required: Sequence[str], optional: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> list[Record]:
    """Load, rename and validate records.

    Each returned record holds the ``required`` fields (and ``optional`` ones when present)
    under their canonical names, plus ``"_source"`` (the path) and ``"_source_index"`` (the record's position).
    A text field holds a string, or a list of chat messages (``{"role", "content"}`` dicts)
    for conversational datasets. ``extra`` fields are copied as they are (any JSON value, e.g. a list
    of perturbed answers or an integer label) when present and not null, renamed by ``fields`` too.
    """
    rows = _read(source)
    if source.limit is not None:
        rows = rows[: source.limit]
    if not rows:
        raise DataError(f"data source {source.path!r} (split={source.split!r}) has no records")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{describe_record(source.path, i)}: expected an object, got {type(row).__name__}")
        rec: Record = {"_source": source.path, "_source_index": i}
        for name, template in source.templates.items():
            try:
                row = {**row, name: template.format_map(row).strip()}
            except KeyError as err:
                raise DataError(
                    f"{describe_record(source.path, i)}: template for {name!r} names column {err.args[0]!r}, "
                    f"which the record lacks; it has {sorted(row)}"
                ) from None
        for name in [*required, *optional]:
            column = name if name in source.templates else source.fields.get(name, name)
            if column not in row:
                if name in optional:
                    continue
                hint = f" (mapped from {column!r} by `fields`)" if column != name else ""
                raise DataError(
                    f"{describe_record(source.path, i)}: missing field {column!r}{hint}; it has "
                    f"{sorted(row)}. Map your column names with `fields: {{{name}: <column>}}`."
                )
            value = row[column]
            if value is None and name in optional:  # e.g. a null cell in a parquet/HF column
                continue
            if not (isinstance(value, str) or _is_messages(value)):
                raise DataError(
                    f"{describe_record(source.path, i)}: field {column!r} must be a string or a list of "
                    f"chat messages, got {type(value).__name__}"
                )
            if isinstance(value, str) and not value.strip() and name in required:
                raise DataError(f"{describe_record(source.path, i)}: field {column!r} is empty")
            rec[name] = value
        for name in extra:
            column = source.fields.get(name, name)
            if row.get(column) is not None:
                rec[name] = row[column]
        out.append(rec)
    return out


# Specs are saved with the hyperparameters in every checkpoint; allow them in weights-only loads
# (``Trainer.fit(ckpt_path=...)`` of a module built in Python).
torch.serialization.add_safe_globals([DataSource])
