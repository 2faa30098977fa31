"""One model loaded for cached generation: built from a spec, rendered prompts, fingerprints, freed after use.

The evaluation runs (FEWL, the summarisation harness) load each model of their config in turn, generate
everything they need from it through one :class:`~lit_align.retrieval.GenerationCache`, and free it before the
next: :func:`loaded_model` is that step, :class:`LoadedModel` what it yields.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lit_align.errors import ConfigError
from lit_align.retrieval.generation import (
    GenerationCache,
    GenerationReport,
    StopView,
    fingerprint_tokenizer,
    generate_texts,
)
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["LoadedModel", "loaded_model"]


@dataclass
class LoadedModel:
    """A causal LM ready to generate (eval mode, on the run's device) with what its cache keys need."""

    model: torch.nn.Module
    """The model (built by :func:`lit_align.models.build_causal_lm`)."""
    tokenizer: Any
    """Its tokenizer."""
    fingerprint: str
    """:func:`lit_align.models.model_fingerprint` of its weights (computed once)."""
    tokenizer_fingerprint: str
    """:func:`~lit_align.retrieval.fingerprint_tokenizer` of its tokenizer."""
    chat: bool
    """Whether prompts go through the tokenizer's chat template (:meth:`render`)."""
    name: str
    """``<config key>: <spec source>``, for logs and reports."""

    def render(self, prompt: str | Sequence[dict[str, str]]) -> str:
        """A prompt as the model reads it. With :attr:`chat`: a text becomes one user turn and a message list is
        rendered as is, with the generation prompt, less a leading BOS that the tokenizer adds again when it
        tokenizes the prompt; without: the text as is (a message list is an error)."""
        if not self.chat:
            if not isinstance(prompt, str):
                raise ConfigError(f"{self.name}: chat messages given but the chat template is off for this model")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        if bos and out.startswith(bos) and self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            out = out[len(bos):]
        return out

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seeds: Sequence[int] | None,
                 cache: GenerationCache | None, batch_size: int, stop: Sequence[str] = (),
                 stop_generation: bool = False, cut: bool = True, stop_view: StopView | None = None,
                 report: GenerationReport | None = None) -> list[str]:
        """:func:`~lit_align.retrieval.generate_texts` of rendered ``prompts`` with this model's fingerprints
        (``stop_generation``: rows stop at ``stop``, looked for where ``stop_view`` says; ``cut=False``: the text as
        generated; ``report``: each prompt's cache key and hit)."""
        return generate_texts(self.model, self.tokenizer, prompts, sampling, seeds=seeds, cache=cache,
                              model_fingerprint=self.fingerprint, tokenizer_fingerprint=self.tokenizer_fingerprint,
                              stop=stop, stop_generation=stop_generation, cut=cut, stop_view=stop_view,
                              batch_size=batch_size, report=report)


@contextmanager
def loaded_model(spec: Any, *, key: str, device: torch.device | str, chat_template: bool | None = None,
                 chat_key: str = "chat_template") -> Iterator[LoadedModel]:
    """The model of ``spec`` (a :class:`~lit_align.models.ModelSpec`; ``key`` its config key, named in errors) on
    ``device`` in eval mode, freed on exit. ``chat_template``: render prompts with the tokenizer's chat template
    (``None``: when it has one); true for a tokenizer without one is an error naming ``chat_key``."""
    from lit_align.models import build_causal_lm, build_tokenizer, model_fingerprint

    tokenizer = build_tokenizer(spec, key=key)
    chat = bool(tokenizer.chat_template) if chat_template is None else chat_template
    if chat and not tokenizer.chat_template:
        raise ConfigError(f"{chat_key} is true but the tokenizer of {key} ({spec.source}) has no chat template; "
                          "set it to false (raw completion prompts) or null (the template where there is one)")
    model = build_causal_lm(spec, tokenizer, key=key).to(device).eval()
    try:
        yield LoadedModel(model, tokenizer, model_fingerprint(model), fingerprint_tokenizer(tokenizer), chat,
                          f"{key}: {spec.source}")
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
