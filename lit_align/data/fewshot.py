"""Instruction-free few-shot prompts: demonstrations, then the item to complete, and nothing else (ISARA §6(a)).

A prompt is the demonstrations rendered one after another with :attr:`FewShotTemplate.example`, followed by
:attr:`FewShotTemplate.query` (answer a question) or :attr:`FewShotTemplate.question_query` (write a new
question). No natural-language instruction is added anywhere; the only fixed text is the template's literal
pieces (``"Human: "``, ``"\\nAI: "``...). Use the same template for generation, SFT and evaluation (§6(h)4).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from lit_align.errors import ConfigError, DataError

__all__ = ["FewShotTemplate", "build_fewshot_prompt", "build_question_prompt"]


def _fields(template: str) -> list[str]:
    """The ``str.format`` placeholder names of ``template``, in order (refuses a malformed template)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"not a valid format template ({err}): {template!r}; write a literal brace as {{{{ or }}}}") \
            from err


@dataclass
class FewShotTemplate:
    """How demonstrations and the query are laid out (``str.format`` templates; ``{{``/``}}`` for literal braces)."""

    example: str = "Human: {question}\nAI: {answer}\n\n"
    """One demonstration; must contain ``{question}`` and ``{answer}`` once each and no other placeholder."""

    query: str = "Human: {question}\nAI:"
    """The item to complete after the demonstrations; must contain ``{question}`` once and nothing else."""

    question_query: str = "Human:"
    """What follows the demonstrations when asking the model for a NEW question; no placeholder."""

    def __post_init__(self) -> None:
        for name, wanted in (("example", ["answer", "question"]), ("query", ["question"]), ("question_query", [])):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"template.{name} must be a string, got {value!r}")
            try:
                found = sorted(_fields(value))
            except ConfigError as err:
                raise ConfigError(f"template.{name}: {err}") from err
            if found != wanted:
                need = ", ".join("{" + w + "}" for w in wanted) or "no placeholder"
                raise ConfigError(f"template.{name} must contain {need} exactly once each (and no other "
                                  f"placeholder), got {value!r}")


def _render_demos(template: FewShotTemplate, demos: Sequence[tuple[str, str]]) -> str:
    parts = []
    for i, demo in enumerate(demos):
        if not (isinstance(demo, (tuple, list)) and len(demo) == 2 and all(isinstance(x, str) for x in demo)):
            raise DataError(f"demos[{i}] must be a (question, answer) pair of strings, got {demo!r}")
        parts.append(template.example.format(question=demo[0], answer=demo[1]))
    return "".join(parts)


def build_fewshot_prompt(template: FewShotTemplate, demos: Sequence[tuple[str, str]], query: str) -> str:
    """The demonstrations (question, answer) rendered with ``template.example``, then ``query`` rendered with
    ``template.query``: the prompt for answering ``query`` in the demonstrations' style."""
    if not isinstance(query, str):
        raise DataError(f"query must be a string, got {query!r}")
    return _render_demos(template, demos) + template.query.format(question=query)


def build_question_prompt(template: FewShotTemplate, demos: Sequence[tuple[str, str]]) -> str:
    """The demonstrations rendered with ``template.example``, then ``template.question_query``: the prompt for
    writing a new question in the demonstrations' style."""
    return _render_demos(template, demos) + template.question_query
