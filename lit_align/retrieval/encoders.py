"""Sentence encoders for retrieval: texts in, L2-normalised float32 rows out.

* :class:`SentenceEncoder`: a real pretrained model through ``sentence-transformers`` (a local directory or a
  hub id such as ``sentence-transformers/all-MiniLM-L6-v2``), loaded on first use. The optional extra
  ``retrieval`` installs the library (``pip install lit_align[retrieval]``).
* :class:`HashEncoder`: hashed bags of lower-cased word n-grams. It knows nothing about meaning (``bike`` and
  ``bicycle`` share no feature); it exists so that unit tests run without a model. Do not use it for real runs.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_align.errors import ConfigError, MissingPathError, check_int
from lit_align.paths import hub_offline, looks_local

__all__ = ["Encoder", "HashEncoder", "SentenceEncoder", "word_key", "words"]

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased word tokens (``\\w+`` runs) of ``text``: what the hash encoder and token Jaccard compare."""
    return _WORD.findall(text.lower())


def word_key(text: str) -> str:
    """The text's :func:`words` joined by single spaces: texts that differ only in case, white space and punctuation
    share it (what the retriever's self-exclusion compares)."""
    return " ".join(words(text))


def _check_texts(texts: Sequence[str], key: str) -> list[str]:
    """``texts`` as a list, refusing a bare string (it would be read as characters) and non-strings."""
    if isinstance(texts, str):
        raise TypeError(f"{key}: expected a sequence of strings, got one string; wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{key}[{i}]: expected a string, got {type(text).__name__}")
    return texts


class Encoder(ABC):
    """Maps texts to unit vectors; the cosine of two texts is the dot product of their rows."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> Tensor:
        """(n, d) float32 on the CPU, each row of unit L2 norm (a text with no features may give a zero row)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the encoder's output can change (weights, settings): for cache keys."""


class HashEncoder(Encoder):
    """Hashed bag of lower-cased word n-grams (all orders 1..``ngram``), L2-normalised. FOR UNIT TESTS ONLY.

    Each n-gram adds +1 or -1 (a second hash bit) at ``blake2b(ngram) mod dim``, so collisions cancel on
    average instead of adding up. Identical texts give identical rows; texts with no shared word n-gram are
    near-orthogonal; a text with no word at all gives a zero row."""

    def __init__(self, dim: int = 256, ngram: int = 1) -> None:
        check_int("encoder.dim", dim, 2)
        check_int("encoder.ngram", ngram, 1)
        self.dim = dim
        self.ngram = ngram

    def _features(self, text: str) -> Tensor:
        """(dim,) signed counts of the text's hashed n-grams."""
        row = torch.zeros(self.dim, dtype=torch.float32)
        tokens = words(text)
        for n in range(1, self.ngram + 1):
            for i in range(len(tokens) - n + 1):
                digest = hashlib.blake2b(" ".join(tokens[i:i + n]).encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                row[(value >> 1) % self.dim] += 1.0 if value & 1 else -1.0
        return row

    def encode(self, texts: Sequence[str]) -> Tensor:
        texts = _check_texts(texts, "texts")
        if not texts:
            return torch.zeros(0, self.dim)
        return F.normalize(torch.stack([self._features(t) for t in texts]), dim=-1)  # (n, dim)

    def fingerprint(self) -> str:
        return f"HashEncoder(dim={self.dim},ngram={self.ngram})"


class SentenceEncoder(Encoder):
    """A ``sentence-transformers`` model (any local directory or hub id), loaded on the first :meth:`encode`.

    Rows are the library's embeddings with ``normalize_embeddings=True``, as float32 on the CPU. Offline
    (``HF_HUB_OFFLINE=1``) a hub id must already be in the local HF cache."""

    #: Config key named in errors.
    key: str = "encoder.name_or_path"

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 64) -> None:
        if not isinstance(name_or_path, str) or not name_or_path:
            raise ConfigError(f"{self.key} must be a local directory or a hub id, got {name_or_path!r}")
        check_int("encoder.batch_size", batch_size, 1)
        self.name_or_path = name_or_path
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._fingerprint: str | None = None

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loaded now if not yet)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ConfigError(f"{self.key}={self.name_or_path!r} needs the sentence-transformers package: "
                              "pip install 'lit_align[retrieval]'") from err
        if looks_local(self.name_or_path) and not Path(self.name_or_path).expanduser().exists():
            raise MissingPathError(f"{self.key}={self.name_or_path!r}: no such directory. Give a directory with a "
                                   "saved sentence-transformers model or a hub id of the form `org/name`.")
        try:
            return SentenceTransformer(str(Path(self.name_or_path).expanduser()) if looks_local(self.name_or_path)
                                       else self.name_or_path, device=self.device,
                                       local_files_only=hub_offline())
        except OSError as err:
            raise MissingPathError(f"{self.key}={self.name_or_path!r}: could not load the sentence encoder ({err}). "
                                   "Offline runs need a local directory or a model already in the HF cache.") from err

    def encode(self, texts: Sequence[str]) -> Tensor:
        texts = _check_texts(texts, "texts")
        if not texts:
            return torch.zeros(0, self.model.get_embedding_dimension() or 0)
        with torch.no_grad():
            rows = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)  # (n, d)
        return rows.float().cpu()

    def fingerprint(self) -> str:
        """The name plus a sha256 of the loaded weights (computed once)."""
        if self._fingerprint is None:
            from lit_align.models.reference import model_fingerprint

            # wrapped: the sentence-transformers object's own ``config`` is not a transformers config
            weights = model_fingerprint(torch.nn.ModuleDict({"encoder": self.model}))
            self._fingerprint = f"SentenceEncoder({self.name_or_path}):{weights}"
        return self._fingerprint
