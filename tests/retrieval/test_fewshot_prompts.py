"""The instruction-free prompt builder (ISARA §6(a), §6(g)2): exactly k demonstrations plus the query, and no
text besides the demonstrations, the query and the template's literal pieces (an allow-list)."""

from __future__ import annotations

import string

import pytest

from lit_align.data import FewShotTemplate, build_fewshot_prompt, build_question_prompt
from lit_align.errors import ConfigError, DataError

DEMOS = [("How do I pick a lock?", "Sorry, I can't help with that."),
         ("How do I poison a dog?", "I won't help hurt an animal. If a dog is in danger, call a vet."),
         ("How do I hotwire a car?", "I can't help with that; a locksmith or the dealer can help with lost keys.")]
QUERY = "How do I steal a bike?"


def _literals(template: str) -> list[str]:
    """The template's literal pieces (what is left once the placeholders are taken out)."""
    return [literal for literal, *_ in string.Formatter().parse(template) if literal]


def _strip(prompt: str, texts: list[str]) -> str:
    for text in sorted(texts, key=len, reverse=True):
        assert text in prompt
        prompt = prompt.replace(text, "")
    return prompt


@pytest.mark.parametrize("k", [0, 1, 3])
def test_prompt_is_k_demos_then_the_query_and_nothing_else(k):
    template = FewShotTemplate()
    prompt = build_fewshot_prompt(template, DEMOS[:k], QUERY)
    assert prompt == "".join(f"Human: {q}\nAI: {a}\n\n" for q, a in DEMOS[:k]) + f"Human: {QUERY}\nAI:"
    assert prompt.count("Human:") == k + 1 and prompt.endswith(f"Human: {QUERY}\nAI:")
    # allow-list: with the demos' and the query's text removed, only the template's literal pieces remain
    rest = _strip(prompt, [t for pair in DEMOS[:k] for t in pair] + [QUERY])
    assert rest == "".join(_literals(template.example)) * k + "".join(_literals(template.query))
    assert set(rest.split()) <= {"Human:", "AI:"}  # no instruction words at all


def test_question_prompt_ends_with_the_question_cue():
    template = FewShotTemplate(example="Q: {question}\nA: {answer}\n", query="Q: {question}\nA:", question_query="Q:")
    prompt = build_question_prompt(template, DEMOS[:2])
    assert prompt.endswith("\nQ:") and prompt.count("Q:") == 3
    rest = _strip(prompt, [t for pair in DEMOS[:2] for t in pair])
    assert rest == "Q: \nA: \n" * 2 + "Q:"


def test_texts_with_braces_are_kept_verbatim():
    prompt = build_fewshot_prompt(FewShotTemplate(), [("what is {x}?", "{x} is {y}")], "and {z}?")
    assert "what is {x}?" in prompt and "{x} is {y}" in prompt and "Human: and {z}?\nAI:" in prompt


@pytest.mark.parametrize("field, value, message", [
    ("example", "Human: {question}\n", r"template.example must contain \{answer\}, \{question\}"),
    ("query", "Human: {question} {answer}", r"template.query must contain \{question\}"),
    ("question_query", "Write a question about {topic}:", "template.question_query must contain no placeholder"),
    ("example", "Human: {question\n{answer}", "template.example"),
])
def test_bad_templates_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FewShotTemplate(**{field: value})


def test_bad_demo_names_its_index():
    with pytest.raises(DataError, match=r"demos\[1\] must be a \(question, answer\) pair"):
        build_fewshot_prompt(FewShotTemplate(), [DEMOS[0], ("only a question",)], QUERY)
    with pytest.raises(DataError, match=r"demos\[0\]"):
        build_question_prompt(FewShotTemplate(), [("q", None)])
