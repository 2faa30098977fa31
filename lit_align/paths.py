"""Telling a local path from a Hugging Face Hub id, so a missing local file fails at once.

A model, tokenizer or data source is given as one string: a hub id (``name`` or ``org/name``) or a local
path. Loading a missing local path as a hub id costs a minute of network retries before the error; these
helpers decide "meant as local" up front, and say when the Hub is off (``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "hub_offline", "looks_local"]

_DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml"}


def hub_offline() -> bool:
    """Whether the Hub is switched off (``HF_HUB_OFFLINE`` set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def looks_local(path: str) -> bool:
    """Whether ``path`` can only mean a local file or directory: it exists, starts with ``/ ./ ../ ~ .``, has
    a backslash or more than one ``/`` (hub ids are ``name`` or ``org/name``), ends in a file suffix such as
    ``.jsonl``, or its first component exists here (``data/train`` with a local ``data/``)."""
    if path.startswith(("/", "./", "../", "~", ".", "\\")) or "\\" in path or path.count("/") > 1:
        return True
    local = Path(path).expanduser()
    if local.exists() or local.suffix.lower() in _DATA_SUFFIXES:
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def cache_root() -> Path:
    """``$LIT_ALIGN_CACHE`` or ``~/.cache/lit_align``: the per-user directory of lit_align's caches (precomputed
    reference log-probs, contrastive reward tables, built-in encoders extracted from their packages)."""
    return Path(os.environ.get("LIT_ALIGN_CACHE") or Path.home() / ".cache" / "lit_align").expanduser()
