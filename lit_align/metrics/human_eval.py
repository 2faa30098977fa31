"""Human-evaluation export (others.md §10(d).7): a blinded CSV of summaries in randomised system order.

:func:`export_blinded` writes two files:

* the blinded sheet ``<path>``: one row per article with ``article_id``, ``article``, ``reference`` (when the
  items carry one), then for each anonymous label ``A``, ``B``, ... the column ``summary_<label>`` and one empty
  column ``<label>_<criterion>`` per rating criterion for the rater to fill in. Which system stands behind a
  label is drawn again for every article (seeded), so position tells a rater nothing;
* the key ``<stem>.key.csv`` beside it: ``article_id`` and, per label, the system shown under it. Keep it away
  from the raters; :func:`read_key` turns it back into ``{article_id: {label: system}}``.
"""

from __future__ import annotations

import csv
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from lit_align.metrics.judge import DEFAULT_CRITERIA

__all__ = ["export_blinded", "key_path_for", "read_key"]



def key_path_for(path: str | Path) -> Path:
    """Where :func:`export_blinded` writes the key of the blinded sheet ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.key.csv")


def _labels(n: int) -> list[str]:
    letters = string.ascii_uppercase
    return [letters[i] if n <= 26 else f"S{i + 1:02d}" for i in range(n)]


def _check(items: Sequence[Mapping], outputs: Mapping[str, Sequence[str]]) -> None:
    if not outputs:
        raise ValueError("export_blinded: outputs is empty; give {system name: [summary per item]}")
    ids = []
    for i, item in enumerate(items):
        for key in ("article_id", "article"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ValueError(f"export_blinded: items[{i}] has no {key!r} string; each item needs article_id "
                                 "and article (reference optional)")
        ids.append(item["article_id"])
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise ValueError(f"export_blinded: article_id {dup!r} appears more than once; ids must be unique")
    for system, texts in outputs.items():
        if len(texts) != len(items):
            raise ValueError(f"export_blinded: system {system!r} has {len(texts)} summaries for {len(items)} "
                             "items; give one per item, in item order")


def export_blinded(path: str | Path, items: Sequence[Mapping], outputs: Mapping[str, Sequence[str]], *, seed: int,
                   criteria: Sequence[str] = DEFAULT_CRITERIA) -> tuple[Path, Path]:
    """Write the blinded sheet to ``path`` and its key beside it; return ``(sheet, key)``.

    ``items[i]`` is a mapping with ``article_id``, ``article`` and optionally ``reference``; ``outputs[system][i]``
    is that system's summary of ``items[i]``. For each article a ``random.Random(seed)`` stream shuffles the
    systems, so the same seed gives the same files. ``criteria`` names the empty rating columns (none if empty).
    """
    _check(items, outputs)
    systems = list(outputs)
    labels = _labels(len(systems))
    with_reference = any(item.get("reference") for item in items)
    rng = random.Random(seed)
    header = ["article_id", "article"] + (["reference"] if with_reference else [])
    header += [f"summary_{label}" for label in labels] + [f"{label}_{c}" for label in labels for c in criteria]
    rows, key_rows = [], []
    for i, item in enumerate(items):
        order = rng.sample(systems, len(systems))
        row = {"article_id": item["article_id"], "article": item["article"]}
        if with_reference:
            row["reference"] = item.get("reference") or ""
        row.update({f"summary_{label}": outputs[system][i] for label, system in zip(labels, order)})
        rows.append(row)
        key_rows.append({"article_id": item["article_id"], **dict(zip(labels, order))})
    sheet, key = Path(path), key_path_for(path)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    with sheet.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with key.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["article_id", *labels])
        writer.writeheader()
        writer.writerows(key_rows)
    return sheet, key


def read_key(path: str | Path) -> dict[str, dict[str, str]]:
    """``{article_id: {label: system}}`` from a key file written by :func:`export_blinded`."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return {row.pop("article_id"): row for row in csv.DictReader(f)}
