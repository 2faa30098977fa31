"""SIM(a, b) in [0, 1] between a premise and a hypothesis, one value per pair (FEWL's similarity, §5(a)).

Every similarity is called as ``sim(premises, hypotheses)`` with two equally long lists and returns (n,)
float32 on the CPU. The argument order is fixed: the first text is the premise (the reference), the second
the hypothesis (the claim judged against it). It matters for the asymmetric cross-encoders (HHEM, NLI); the
symmetric ones ignore it. A value outside [0, 1] or not finite is refused by :class:`Similarity` itself,
naming the class and the config key (``Similarity.key``), whatever the implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_align.data.self_alignment import normalise_text
from lit_align.errors import ConfigError, MissingPathError, check_choice, check_int
from lit_align.paths import hub_offline, looks_local
from lit_align.retrieval.encoders import Encoder, _check_texts, words

__all__ = ["CallableSimilarity", "CrossEncoderSimilarity", "EmbeddingCosine", "ExactMatch", "Similarity",
           "TokenJaccard"]


class Similarity(ABC):
    """SIM(premise, hypothesis) in [0, 1]; subclasses implement :meth:`_scores`."""

    #: Config key named in errors (set it on an instance to name where it was configured).
    key: str = "similarity"

    def __call__(self, premises: Sequence[str], hypotheses: Sequence[str]) -> Tensor:
        """(n,) float32 CPU similarities of the pairs ``(premises[i], hypotheses[i])``."""
        premises = _check_texts(premises, "premises")
        hypotheses = _check_texts(hypotheses, "hypotheses")
        if len(premises) != len(hypotheses):
            raise ValueError(f"{type(self).__name__}: {len(premises)} premises but {len(hypotheses)} hypotheses")
        if not premises:
            return torch.zeros(0)
        values = torch.as_tensor(self._scores(premises, hypotheses), dtype=torch.float32).reshape(-1).cpu()
        return self._checked(values, len(premises))

    def _checked(self, values: Tensor, n: int) -> Tensor:
        if values.numel() != n:
            raise ValueError(f"{type(self).__name__} (config key {self.key!r}) returned {values.numel()} values "
                             f"for {n} pairs; it must return one per pair")
        bad = ~torch.isfinite(values) | (values < 0) | (values > 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{type(self).__name__} (config key {self.key!r}) returned {values[i].item():.6g} for pair "
                             f"{i}; a similarity must be a finite number in [0, 1]. Fix or rescale the similarity "
                             "(e.g. a probability, or (1 + cosine) / 2)")
        return values

    @abstractmethod
    def _scores(self, premises: list[str], hypotheses: list[str]) -> Tensor | Sequence[float]:
        """One raw value per pair (checked by :meth:`__call__`)."""

    def fingerprint(self) -> str:
        """Identifies the similarity (and its weights, where it has any) for caches and logs."""
        return type(self).__name__


class TokenJaccard(Similarity):
    """|A ∩ B| / |A ∪ B| of the lower-cased word sets (``\\w+`` runs); two texts without words -> 1.0."""

    def _scores(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        return [_jaccard(set(words(a)), set(words(b))) for a, b in zip(premises, hypotheses)]


def _jaccard(a: set[str], b: set[str]) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


class ExactMatch(Similarity):
    """1.0 if the texts are equal after strip, lower-casing and collapsing white space, else 0.0."""

    def _scores(self, premises: list[str], hypotheses: list[str]) -> list[float]:
        return [float(normalise_text(a) == normalise_text(b)) for a, b in zip(premises, hypotheses)]


class EmbeddingCosine(Similarity):
    """Cosine c of the encoder's embeddings, mapped to [0, 1]: ``"clamp"`` max(0, c) (default) or
    ``"affine"`` (1 + c) / 2. Rounding above 1 is clipped."""

    def __init__(self, encoder: Encoder, mapping: str = "clamp") -> None:
        if not isinstance(encoder, Encoder):
            raise ConfigError(f"{self.key}.encoder must be an Encoder, got {type(encoder).__name__}")
        check_choice(f"{self.key}.mapping", mapping, ("clamp", "affine"))
        self.encoder = encoder
        self.mapping = mapping

    def _scores(self, premises: list[str], hypotheses: list[str]) -> Tensor:
        rows = self.encoder.encode(premises + hypotheses)  # (2n, d)
        cos = (rows[: len(premises)] * rows[len(premises):]).sum(-1)  # (n,)
        mapped = cos.clamp(min=0.0) if self.mapping == "clamp" else (1.0 + cos) / 2.0
        return mapped.clamp(max=1.0)

    def fingerprint(self) -> str:
        return f"EmbeddingCosine({self.mapping}):{self.encoder.fingerprint()}"


class CallableSimilarity(Similarity):
    """Wraps ``fn(premises, hypotheses) -> sequence of floats`` (custom or test similarities); its values are
    checked like any other's."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], name: str | None = None,
                 key: str = "similarity") -> None:
        if not callable(fn):
            raise ConfigError(f"{key} must be callable as fn(premises, hypotheses), got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.key = key

    def _scores(self, premises: list[str], hypotheses: list[str]) -> Sequence[float]:
        return self.fn(premises, hypotheses)

    def fingerprint(self) -> str:
        return f"CallableSimilarity({self.name})"


class CrossEncoderSimilarity(Similarity):
    """A cross-encoder reading the pair as ``(premise, hypothesis)``, in that fixed order (§5(h)4).

    * One logit (HHEM-1.0-style consistency models): ``sigmoid(logit)``.
    * Several labels (NLI models such as ``cross-encoder/nli-deberta-v3-small``): the softmax probability of
      label ``label`` (the entailment label; read it from the model's ``config.id2label``).
    * A model loaded with ``trust_remote_code`` that has its own ``predict(pairs)`` method (Vectara's
      HHEM-2.1-open, which builds its own prompt and tokenizer): its returned probabilities.

    The model and tokenizer load with ``transformers`` on first use (offline: a local directory or the HF cache)."""

    def __init__(self, name_or_path: str, device: str = "cpu", batch_size: int = 32, trust_remote_code: bool = False,
                 label: int | None = None) -> None:
        if not isinstance(name_or_path, str) or not name_or_path:
            raise ConfigError(f"{self.key}.name_or_path must be a local directory or a hub id, got {name_or_path!r}")
        check_int(f"{self.key}.batch_size", batch_size, 1)
        check_int(f"{self.key}.label", label, 0, optional=True)
        self.name_or_path = name_or_path
        self.device = device
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.label = label
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        name = str(Path(self.name_or_path).expanduser()) if looks_local(self.name_or_path) else self.name_or_path
        if looks_local(self.name_or_path) and not Path(name).exists():
            raise MissingPathError(f"{self.key}.name_or_path={self.name_or_path!r}: no such directory. Give a "
                                   "directory written by `save_pretrained` or a hub id of the form `org/name`.")
        kwargs = {"trust_remote_code": self.trust_remote_code, "local_files_only": hub_offline()}
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs).to(self.device).eval()
            tokenizer = None if hasattr(model, "predict") else AutoTokenizer.from_pretrained(name, **kwargs)
        except OSError as err:
            raise MissingPathError(f"{self.key}.name_or_path={self.name_or_path!r}: could not load the cross-encoder "
                                   f"({err}). Offline runs need a local directory or a model in the HF cache.") from err
        self._check_labels(model)
        self._model, self._tokenizer = model, tokenizer

    def _check_labels(self, model) -> None:
        n = int(getattr(model.config, "num_labels", 1))
        if hasattr(model, "predict") or n == 1:
            return
        if self.label is None or self.label >= n:
            names = getattr(model.config, "id2label", {})
            raise ConfigError(f"{self.key}.label must name the entailment label of this {n}-label model "
                              f"(id2label: {names}), got {self.label!r}")

    @property
    def model(self):
        """The loaded sequence classifier (loaded now if not yet)."""
        if self._model is None:
            self._load()
        return self._model

    @torch.no_grad()
    def _batch_scores(self, premises: list[str], hypotheses: list[str]) -> Tensor:
        model = self.model
        if self._tokenizer is None:  # remote-code model with its own predict (HHEM-2.1)
            return torch.as_tensor(model.predict(list(zip(premises, hypotheses)))).float().reshape(-1).cpu()
        enc = self._tokenizer(premises, hypotheses, padding=True, truncation=True, return_tensors="pt")
        logits = model(**enc.to(self.device)).logits.float()  # (b, labels)
        if logits.shape[-1] == 1:
            return logits[:, 0].sigmoid().cpu()
        return logits.softmax(-1)[:, self.label].cpu()

    def _scores(self, premises: list[str], hypotheses: list[str]) -> Tensor:
        chunks = [self._batch_scores(premises[i:i + self.batch_size], hypotheses[i:i + self.batch_size])
                  for i in range(0, len(premises), self.batch_size)]
        return torch.cat(chunks)

    def fingerprint(self) -> str:
        """The name, the label and a sha256 of the weights (computed once)."""
        if self._fingerprint is None:
            from lit_align.models.reference import model_fingerprint

            self._fingerprint = (f"CrossEncoderSimilarity({self.name_or_path},label={self.label}):"
                                 f"{model_fingerprint(self.model)}")
        return self._fingerprint
