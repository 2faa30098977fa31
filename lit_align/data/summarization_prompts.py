"""Summarisation prompts (others.md §10(d)2): zero-shot and k-shot, raw completion or chat, with a truncation policy.

A prompt is the task's instruction, then ``shots`` demonstrations (train articles with their reference summaries)
and the test article, laid out by a :class:`~lit_align.data.FewShotTemplate` whose ``{question}`` is an article and
``{answer}`` its summary::

    Summarize the article in one sentence.

    Article: <demo article>
    Summary: <demo reference>

    Article: <test article>
    Summary:

With ``chat_template: true`` the same pieces become chat turns: the instruction and each article (rendered with
``template.query``) a user turn, each demonstration's summary an assistant turn.

Demonstrations come from the train split, drawn per test article with ``random.Random(f"{seed}:{task}:{id}")`` (so
one article's demonstrations do not depend on which other articles are evaluated), never the test article itself
(same id, or the same text after stripping whitespace).

Truncation (§10(f)2: a confound to log) when the tokenized prompt is longer than ``max_prompt_tokens``:

* ``article_tail``: keep every demonstration and cut the test article's tail at a word boundary, keeping the most
  words that fit (only if the demonstrations alone leave no room for a single word of the article are they
  dropped, the last first, and counted in ``demos_dropped``);
* ``drop_demonstrations``: drop demonstrations from the last one until the prompt fits; if it still does not fit with
  none left, cut the article's tail as above.

Each :class:`SummaryPrompt` records what happened (``article_truncated``, ``demos_dropped``);
:func:`truncation_rates` summarises a list of them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lit_align.data.fewshot import FewShotTemplate, build_fewshot_prompt
from lit_align.errors import ConfigError, check_choice, check_int

if TYPE_CHECKING:
    from lit_align.data.summarization import Article, SummarizationTask

__all__ = ["SummaryPrompt", "SummaryPromptConfig", "build_summary_prompts", "count_prompt_tokens", "draw_demos",
           "render_prompt", "truncation_rates"]

TRUNCATION_POLICIES = ("article_tail", "drop_demonstrations")


def _default_template() -> FewShotTemplate:
    return FewShotTemplate(example="Article: {question}\nSummary: {answer}\n\n", query="Article: {question}\nSummary:")


@dataclass
class SummaryPromptConfig:
    """How the summarisation prompts are built (one config for every task of a run)."""

    shots: int = 0
    """k: demonstrations per prompt, drawn from the task's train split (0: zero-shot; the study uses 3)."""
    seed: int = 0
    """Seed of the demonstration draw (with the task name and the article id)."""
    template: FewShotTemplate = field(default_factory=_default_template)
    """Layout of a demonstration (``example``: ``{question}`` is the article, ``{answer}`` its reference) and of the
    test article (``query``: ``{question}`` only). ``question_query`` is unused."""
    instruction_separator: str = "\n\n"
    """Text between the task's instruction and the first article (raw completion); an empty instruction is left out
    with its separator."""
    chat_template: bool = False
    """Render the prompt as chat messages (the tokenizer's chat template, with the generation prompt) instead of raw
    completion text. The tokenizer must have a chat template."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (as the generator tokenizes it); ``null``: never truncate. Leave room for the
    task's ``max_new_tokens`` within the model's context."""
    truncation: Literal["article_tail", "drop_demonstrations"] = "article_tail"
    """What gives way when a prompt is longer than ``max_prompt_tokens``: ``article_tail`` cuts the test article's
    tail and keeps the demonstrations (unless they alone leave no room for one word of the article: then they are
    dropped too, and counted); ``drop_demonstrations`` drops demonstrations first (the last first), then cuts the
    article's tail if it still does not fit."""

    def __post_init__(self) -> None:
        check_int("prompts.shots", self.shots, 0)
        check_int("prompts.seed", self.seed, 0)
        check_int("prompts.max_prompt_tokens", self.max_prompt_tokens, 1, optional=True)
        check_choice("prompts.truncation", self.truncation, TRUNCATION_POLICIES)
        if not isinstance(self.template, FewShotTemplate):
            raise ConfigError(f"prompts.template must be a FewShotTemplate, got {self.template!r}")


@dataclass(frozen=True)
class SummaryPrompt:
    """The prompt for one test article, and what truncation did to it."""

    article_id: str
    """Id of the test article."""
    text: str | list[dict[str, str]]
    """Raw completion text, or chat messages (``{"role", "content"}``) when ``chat_template`` is on; pass it to
    :func:`render_prompt` for the string the generator gets."""
    demo_ids: tuple[str, ...]
    """Ids of the demonstrations in the prompt, in order (after any were dropped)."""
    article_truncated: bool
    """Whether the test article's tail was cut to fit ``max_prompt_tokens``."""
    demos_dropped: int
    """How many drawn demonstrations were dropped to fit ``max_prompt_tokens``."""
    prompt_tokens: int | None = None
    """Length of the rendered prompt in tokens (``None`` without a tokenizer)."""
    article_words_kept: int | None = None
    """Words of the test article left in the prompt (``None``: the whole article)."""


def _check_chat(tokenizer) -> None:
    if tokenizer is None:
        raise ConfigError("prompts.chat_template is true but no tokenizer was given to build the chat prompts")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"prompts.chat_template is true but the tokenizer {name!r} has no chat template; set "
                          "prompts.chat_template: false (raw completion) or use a tokenizer that has one")


def render_prompt(prompt: SummaryPrompt | str | list[dict[str, str]], tokenizer=None) -> str:
    """The string a generator gets: raw text as it is; chat messages through the tokenizer's chat template (with the
    generation prompt)."""
    text = prompt.text if isinstance(prompt, SummaryPrompt) else prompt
    if isinstance(text, str):
        return text
    _check_chat(tokenizer)
    return tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=True)


def count_prompt_tokens(text: str | list[dict[str, str]], tokenizer,
                        render: Callable[[str | list[dict[str, str]]], str] | None = None) -> int:
    """Tokens of the rendered prompt, counted as :func:`lit_align.retrieval.generate_texts` tokenizes it.
    ``render`` is the renderer the generator's prompts go through (the harness passes
    :meth:`lit_align.retrieval.loaded.LoadedModel.render`, which also drops a doubled BOS); default
    :func:`render_prompt`."""
    return len(tokenizer(render(text) if render is not None else render_prompt(text, tokenizer))["input_ids"])


def _compose(task: SummarizationTask, config: SummaryPromptConfig, demos: Sequence[Article],
             article: str) -> str | list[dict[str, str]]:
    """The prompt's text (or chat messages) for ``article`` after ``demos``."""
    instruction = (task.instruction or "").strip()
    template = config.template
    if not config.chat_template:
        body = build_fewshot_prompt(template, [(d.article, d.reference) for d in demos], article)
        return f"{instruction}{config.instruction_separator}{body}" if instruction else body
    turns = [(d.article, d.reference) for d in demos] + [(article, None)]
    messages = []
    for i, (text, summary) in enumerate(turns):
        user = template.query.format(question=text)
        if i == 0 and instruction:
            user = f"{instruction}{config.instruction_separator}{user}"
        messages.append({"role": "user", "content": user})
        if summary is not None:
            messages.append({"role": "assistant", "content": summary})
    return messages


def _word_ends(text: str) -> list[int]:
    """The character offset just past each word (whitespace-separated) of ``text``."""
    return [m.end() for m in re.finditer(r"\S+", text)]


def _cut_article(fits, article: str) -> tuple[str, int] | None:
    """The longest word prefix of ``article`` for which ``fits(prefix)`` holds (binary search over word counts), with
    its word count; ``None`` when not even one word fits."""
    ends = _word_ends(article)
    low, high, best = 1, len(ends), None
    while low <= high:
        mid = (low + high) // 2
        if fits(article[: ends[mid - 1]]):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return (article[: ends[best - 1]], best) if best else None


def draw_demos(task: SummarizationTask, article: Article, train: Sequence[Article], config: SummaryPromptConfig
               ) -> list[Article]:
    """``config.shots`` train articles for ``article``: seeded by (seed, task, article id), never the article itself
    (same id or same stripped text). Too few candidates is a :class:`ValueError` naming ``shots`` and the task."""
    if config.shots == 0:
        return []
    text = article.article.strip()
    pool = [t for t in train if t.id != article.id and t.article.strip() != text]
    if len(pool) < config.shots:
        raise ConfigError(
            f"prompts.shots={config.shots} but task {task.name!r} has only {len(pool)} train articles "
            f"(split {task.train_split!r}) other than the test article {article.id!r}; lower shots or give the task "
            "a larger train split")
    return random.Random(f"{config.seed}:{task.name}:{article.id}").sample(pool, config.shots)


def _build_one(task: SummarizationTask, article: Article, train: Sequence[Article], config: SummaryPromptConfig,
               tokenizer, render) -> SummaryPrompt:
    demos = draw_demos(task, article, train, config)
    limit = config.max_prompt_tokens

    def size(demo_list: Sequence[Article], text: str) -> int:
        return count_prompt_tokens(_compose(task, config, demo_list, text), tokenizer, render)

    def done(demo_list: Sequence[Article], text: str, truncated: bool, kept: int | None) -> SummaryPrompt:
        composed = _compose(task, config, demo_list, text)
        tokens = count_prompt_tokens(composed, tokenizer, render) if tokenizer is not None else None
        return SummaryPrompt(article.id, composed, tuple(d.id for d in demo_list), truncated,
                             len(demos) - len(demo_list), tokens, kept)

    if limit is None or size(demos, article.article) <= limit:
        return done(demos, article.article, False, None)
    kept = list(demos)
    if config.truncation == "drop_demonstrations":
        while kept:
            kept.pop()
            if size(kept, article.article) <= limit:
                return done(kept, article.article, False, None)
    while (cut := _cut_article(lambda text: size(kept, text) <= limit, article.article)) is None and kept:
        kept.pop()  # article_tail: the demonstrations alone do not fit; drop them as a last resort (recorded)
    if cut is None:
        raise ConfigError(
            f"prompts.max_prompt_tokens={limit} is too small for task {task.name!r}, article {article.id!r}: even "
            f"with no demonstrations, the instruction and one word of the article take more than {limit} tokens; "
            "raise max_prompt_tokens")
    return done(kept, cut[0], True, cut[1])


def build_summary_prompts(task: SummarizationTask, articles: Sequence[Article], train: Sequence[Article],
                          config: SummaryPromptConfig, tokenizer=None,
                          render: Callable[[str | list[dict[str, str]]], str] | None = None) -> list[SummaryPrompt]:
    """One :class:`SummaryPrompt` per test article, in order.

    ``tokenizer`` is needed for ``chat_template`` and ``max_prompt_tokens`` (it counts the rendered prompt as the
    generator will tokenize it, through ``render`` when given: the generator's own renderer); without them it may
    be ``None``. Demonstrations come from ``train`` less every test article (same id or same text), so a task
    whose train and test rows share one file never shows another test article and its reference. ``shots``
    larger than that pool is a :class:`ValueError` naming ``shots`` and the task.
    """
    ids, texts = {a.id for a in articles}, {a.article.strip() for a in articles}
    train = [t for t in train if t.id not in ids and t.article.strip() not in texts]
    if config.shots > len(train):
        raise ConfigError(f"prompts.shots={config.shots} but task {task.name!r} has only {len(train)} train "
                          f"articles (split {task.train_split!r}) that are not test articles; lower shots or give the "
                          "task a larger train split")
    if config.chat_template:
        _check_chat(tokenizer)
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ConfigError("prompts.max_prompt_tokens is set but no tokenizer was given to count prompt tokens")
    return [_build_one(task, article, train, config, tokenizer, render) for article in articles]


def truncation_rates(prompts: Sequence[SummaryPrompt]) -> dict[str, float]:
    """Share of prompts whose article was cut, share with at least one demonstration dropped, and the mean number
    of demonstrations kept (0 for no prompts)."""
    n = len(prompts)
    if n == 0:
        return {"article_truncated_rate": 0.0, "demos_dropped_rate": 0.0, "mean_demos": 0.0}
    return {"article_truncated_rate": sum(p.article_truncated for p in prompts) / n,
            "demos_dropped_rate": sum(p.demos_dropped > 0 for p in prompts) / n,
            "mean_demos": sum(len(p.demo_ids) for p in prompts) / n}
