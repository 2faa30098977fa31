"""Post-processing of generated summaries and failure-mode flags (others.md §10(d)4, §10(c) "early termination").

:func:`postprocess_summary` cleans one generation, in this order:

1. **echo**: an output that starts with the whole prompt loses it. An output that starts by repeating the test
   article (its first sentence, or after an ``Article:`` label at least its first three words) and later has a
   summary label (``Summary:``, ``TL;DR:``) loses everything up to that label; with the ``Article:`` label but no
   summary label it loses the label and the words that repeat the article. Each sets ``echoed``. (An ``Article:``
   label followed by some other text is the model starting a new article: the stop string ``Article:`` cuts it.) An output that
   merely begins with the article's first sentence, with no label anywhere, is kept: that is a lead-based
   (extractive) summary, and ``copied`` reports how much of it is copied.
2. **prefixes**: leading ``Summary:``, ``TL;DR:``, ``In summary,``, ``Here is a summary:``-style labels (any case,
   optional Markdown bold) are removed.
3. **stop markers**: the text is cut at the first stop string (:func:`lit_align.data.stop_strings.cut_at_stop`, the
   function :mod:`lit_align.retrieval.generation` uses)
   after leading whitespace is removed, then stripped.

Flags of the cleaned summary:

* ``empty``: no word characters left;
* ``hit_max_tokens``: given by the caller (generation ran into ``max_new_tokens``);
* ``early_termination``: not empty, did not hit ``max_new_tokens``, and either has fewer than ``min_words`` words
  or its last line lacks final punctuation (``.``, ``!``, ``?``, optionally followed by a closing quote or bracket)
  while it is the only line or an earlier line has it: the model stopped (end of sequence or a stop marker) in the
  middle of its summary. Several lines none of which is punctuated are a list of highlights, not a cut;
* ``copied``: rouge-score's ROUGE-L **precision** of the summary against the article (stemming on), i.e. the share
  of the summary's words that form a common subsequence with the article, is ``>= copy_threshold`` (default 0.9):
  the summary is (almost) a verbatim extract. A copied lead sentence counts; set ``copy_threshold`` above 1 to turn
  the flag off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lit_align.data.rouge import rouge_scorer
from lit_align.data.stop_strings import cut_at_stop

__all__ = ["DEFAULT_COPY_THRESHOLD", "Postprocessed", "first_sentence", "postprocess_summary", "strip_echo",
           "strip_prefixes", "summary_content"]

#: ROUGE-L precision against the article at or above which a summary is flagged ``copied``.
DEFAULT_COPY_THRESHOLD = 0.9

_LABEL = r"(?:\*\*)?(?:summary|tl;\s?dr|tldr)(?:\*\*)?\s*[:\-–]\s*(?:\*\*)?"
_PREFIX = re.compile(
    r"^\s*(?:" + _LABEL + r"|(?:in\s+summary|in\s+short)\s*[:,]\s*"
    r"|here(?:'s|\s+is)\s+(?:a|the|my)\s+(?:short\s+|brief\s+|one-sentence\s+)?summary(?:\s+of\s+the\s+article)?"
    r"\s*[:.]\s*)", re.IGNORECASE)
_SUMMARY_LABEL = re.compile(r"^[ \t]*" + _LABEL, re.IGNORECASE | re.MULTILINE)  # a label starts a line
_ARTICLE_LABEL = re.compile(r"^\s*(?:\*\*)?article(?:\*\*)?\s*:\s*", re.IGNORECASE)
_FINAL = re.compile(r"[.!?][\"'”’)\]]*$")


@dataclass(frozen=True)
class Postprocessed:
    """A cleaned summary and its failure-mode flags (see the module docstring for each rule)."""

    summary: str
    """The cleaned summary ("" when nothing is left)."""
    empty: bool
    """No word characters left after cleaning."""
    early_termination: bool
    """Stopped mid-summary: too short, or the last sentence has no final punctuation (not when ``hit_max_tokens``)."""
    hit_max_tokens: bool
    """Generation ran into ``max_new_tokens`` (given by the caller)."""
    copied: bool
    """ROUGE-L precision of the summary against the article >= the copy threshold."""
    echoed: bool
    """An echo of the prompt or of the test article was stripped from the start of the output."""
    copy_precision: float = 0.0
    """The ROUGE-L precision behind ``copied`` (0 for an empty summary)."""


def first_sentence(text: str) -> str:
    """The first sentence of ``text``: up to the first ``.``, ``!`` or ``?`` followed by whitespace (or the end), or
    the first line, whichever is shorter."""
    line = text.strip().split("\n", 1)[0]
    match = re.search(r"[.!?][\"'”’)\]]*(?=\s|$)", line)
    return line[: match.end()] if match else line


def _normal(text: str) -> str:
    return " ".join(text.split())


def _article_prefix_words(text: str, article: str) -> int:
    """How many leading words of ``text`` repeat the start of ``article`` word for word."""
    words, source = text.split(), article.split()
    n = 0
    while n < min(len(words), len(source)) and words[n] == source[n]:
        n += 1
    return n


def _drop_words(text: str, n: int) -> str:
    """``text`` after its first ``n`` (whitespace-separated) words."""
    if n == 0:
        return text
    return text[[m.end() for m in re.finditer(r"\S+", text)][n - 1]:]


def strip_echo(text: str, prompt_text: str, article: str) -> tuple[str, bool]:
    """``text`` without an echoed prompt or test article at its start, and whether one was removed (rule 1 of the
    module docstring)."""
    body = text.lstrip()
    prompt = prompt_text.strip()
    if prompt and _normal(body).startswith(_normal(prompt)):
        # drop as many words as the prompt has (whitespace inside the echo may differ from the prompt's)
        return _drop_words(body, len(prompt.split())), True
    labelled = _ARTICLE_LABEL.match(body)
    rest = body[labelled.end():] if labelled else body
    lead = _normal(first_sentence(article))
    repeated = _article_prefix_words(rest, article)
    # an echo repeats the article's first sentence, or (after an "Article:" label) at least its first 3 words
    if not ((lead and _normal(rest).startswith(lead)) or (labelled and repeated >= min(3, len(article.split())))):
        return text, False
    labels = list(_SUMMARY_LABEL.finditer(rest))
    if labels:
        return rest[labels[0].end():], True
    if labelled:
        return _drop_words(rest, repeated), True
    return text, False  # the article's lead with no label: a lead-based summary, kept (``copied`` reports it)


def strip_prefixes(text: str) -> str:
    """``text`` without its leading ``Summary:``-style labels (rule 2 of the module docstring)."""
    while (match := _PREFIX.match(text)) and match.end() > 0:
        text = text[match.end():]
    return text


def summary_content(text: str, *, prompt_text: str, article: str) -> str | None:
    """The part of a (partial) generation that stop strings are looked for in: ``text`` after rules 1 and 2
    (:func:`strip_echo`, :func:`strip_prefixes`), less leading whitespace; None while ``text`` is still a prefix
    of the prompt or of the article (an echo in progress, which a stop string inside it must not end). The
    generation-time stop test (:class:`lit_align.retrieval.StopView`) and :func:`postprocess_summary` both use it,
    so stopping during generation never cuts before what post-processing would keep."""
    normal = _normal(text)
    if normal and (_normal(prompt_text).startswith(normal) or _normal(article).startswith(normal)):
        return None
    return strip_prefixes(strip_echo(text, prompt_text, article)[0]).lstrip()


def _unfinished(summary: str) -> bool:
    """The last line lacks final punctuation, and it is the only line or some other line has it (a list of
    unpunctuated highlight lines is a style, not a cut)."""
    lines = [line.strip() for line in summary.splitlines() if line.strip()]
    finished = [_FINAL.search(line) is not None for line in lines]
    return not finished[-1] and (len(lines) == 1 or any(finished[:-1]))


def copy_precision(summary: str, article: str) -> float:
    """rouge-score's ROUGE-L precision of ``summary`` against ``article`` (stemming on): the share of the summary's
    tokens in a longest common subsequence with the article."""
    if not summary.strip() or not article.strip():
        return 0.0
    return float(rouge_scorer(("rougeL",), True).score(article, summary)["rougeL"].precision)


def postprocess_summary(output: str, *, prompt_text: str, article: str, stop: Sequence[str],
                        hit_max_tokens: bool = False, copy_threshold: float = DEFAULT_COPY_THRESHOLD,
                        min_words: int = 3) -> Postprocessed:
    """Clean one generated summary and flag its failure modes (rules in the module docstring).

    Args:
        output: the generated continuation (not including the prompt, unless the model echoed it).
        prompt_text: the rendered prompt the model got (:func:`~lit_align.data.summarization_prompts.render_prompt`).
        article: the test article (possibly truncated as in the prompt).
        stop: stop strings; the summary ends before the first one.
        hit_max_tokens: whether generation ran into ``max_new_tokens``.
        copy_threshold: ROUGE-L precision against the article from which the summary counts as ``copied``.
        min_words: a non-empty summary with fewer words (that did not hit ``max_new_tokens``) is an early termination.
    """
    text, echoed = strip_echo(output, prompt_text, article)
    summary = cut_at_stop(strip_prefixes(text).lstrip(), stop).strip()
    empty = re.search(r"\w", summary) is None
    if empty:
        summary = ""
    precision = copy_precision(summary, article)
    early = not empty and not hit_max_tokens and (len(summary.split()) < min_words or _unfinished(summary))
    return Postprocessed(summary, empty, early, bool(hit_max_tokens), not empty and precision >= copy_threshold,
                         echoed, precision)
