"""The filters of ISARA's rounds (Guo et al. 2024, arXiv:2401.06785; others.md §6(c) step 3 and §6(h)1): pure
functions over generated (question, answer) pairs and their L2-normalised question embeddings, and the prompt that
answers a new question with retrieved pool pairs. :class:`lit_align.methods.SelfAlignmentModule` runs them each round.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_align.data.fewshot import FewShotTemplate, build_fewshot_prompt
from lit_align.data.self_alignment import normalise_text

__all__ = ["DROP_REASONS", "answer_prompt", "count_drops", "leaked", "screen_pairs", "screen_questions",
           "template_markers"]

#: why a generated pair is dropped, in the order the filters run (a pair counts under its first reason). The
#: within-round duplicate test runs last, over the pairs that passed every other filter: a question whose answer is
#: dropped does not block a near-duplicate whose answer is usable
DROP_REASONS = ("question_empty", "question_truncated", "question_malformed", "leaked", "duplicate_pool",
                "answer_empty", "answer_truncated", "answer_malformed", "unsafe", "duplicate_batch")


def template_markers(template: FewShotTemplate) -> list[str]:
    """The template's literal words around its placeholders (``Human:``, ``AI:``): a generated question or answer
    holding one ran into the next turn and is malformed."""
    pieces = []
    for text in (template.example, template.query, template.question_query):
        pieces += [literal.strip() for literal, _, _, _ in string.Formatter().parse(text)]
    return sorted({p for p in pieces if p})


def count_drops(reasons: dict[int, str]) -> dict[str, int]:
    """Drops per reason (every reason of :data:`DROP_REASONS`, 0 when none) of ``position -> reason``."""
    drops = dict.fromkeys(DROP_REASONS, 0)
    for reason in reasons.values():
        drops[reason] += 1
    return drops


def _max_cosine(queries: Tensor, keys: Tensor) -> Tensor:
    """(q,) the largest cosine of each L2-normalised query row to any key row (-1 without keys)."""
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return torch.full((queries.shape[0],), -1.0)
    return (queries @ keys.T).max(dim=1).values  # (q, n) -> (q,)


def leaked(questions: Sequence[str], embeddings: Tensor, eval_questions: Sequence[str], eval_embeddings: Tensor,
           threshold: float) -> list[bool]:
    """Whether each question is an evaluation prompt (§6(h)1): equal after :func:`normalise_text`, or with cosine
    >= ``threshold`` (``embeddings`` (q, d) and ``eval_embeddings`` (e, d) L2-normalised)."""
    known = {normalise_text(q) for q in eval_questions}
    near = _max_cosine(embeddings, eval_embeddings) >= threshold  # (q,)
    return [normalise_text(q) in known or bool(n) for q, n in zip(questions, near)]


def screen_questions(questions: Sequence[str], embeddings: Tensor, pool_questions: Sequence[str],
                     pool_embeddings: Tensor, leaks: Sequence[bool], markers: Sequence[str], threshold: float,
                     drop_leaked: bool = True, truncated: Sequence[bool] | None = None
                     ) -> tuple[list[int], dict[int, str]]:
    """The positions of the new questions that pass the question filters, in order, and ``position -> reason`` of
    the others: empty, truncated (``truncated[i]``: cut off by the token limit), malformed (holding a template
    marker), leaked (with ``drop_leaked``), a duplicate of the pool (equal after :func:`normalise_text`, or cosine
    >= ``threshold``). Duplicates within the batch are left to :func:`screen_pairs`, after the answers."""
    near_pool = _max_cosine(embeddings, pool_embeddings) >= threshold  # (q,)
    in_pool = {normalise_text(q) for q in pool_questions}
    kept: list[int] = []
    reasons: dict[int, str] = {}
    for i, q in enumerate(questions):
        norm = normalise_text(q)
        if not q.strip():
            reason = "question_empty"
        elif truncated is not None and truncated[i]:
            reason = "question_truncated"
        elif any(m in q for m in markers):
            reason = "question_malformed"
        elif leaks[i] and drop_leaked:
            reason = "leaked"
        elif norm in in_pool or bool(near_pool[i]):
            reason = "duplicate_pool"
        else:
            kept.append(i)
            continue
        reasons[i] = reason
    return kept, reasons


def screen_pairs(questions: Sequence[str], embeddings: Tensor, answers: Sequence[str], markers: Sequence[str],
                 threshold: float, truncated: Sequence[bool] | None = None, unsafe: Sequence[bool] | None = None
                 ) -> tuple[list[int], dict[int, str]]:
    """The positions of the answered pairs that pass the answer filters and the within-round duplicate test, in
    order, and ``position -> reason`` of the others: an empty, truncated (``truncated[i]``), malformed (holding a
    template marker) or ``unsafe[i]`` answer; then a question that duplicates an earlier *kept* question
    (``embeddings`` (q, d) L2-normalised: equal after :func:`normalise_text`, or cosine >= ``threshold``), so a
    question whose answer was dropped blocks none of its near-duplicates."""
    kept: list[int] = []
    reasons: dict[int, str] = {}
    seen: set[str] = set()
    for i, (q, a) in enumerate(zip(questions, answers)):
        norm = normalise_text(q)
        if not a:
            reasons[i] = "answer_empty"
        elif truncated is not None and truncated[i]:
            reasons[i] = "answer_truncated"
        elif any(m in a for m in markers):
            reasons[i] = "answer_malformed"
        elif unsafe is not None and unsafe[i]:
            reasons[i] = "unsafe"
        elif norm in seen or (kept and float(_max_cosine(embeddings[i:i + 1], embeddings[kept])[0]) >= threshold):
            reasons[i] = "duplicate_batch"
        else:
            kept.append(i)
            seen.add(norm)
    return kept, reasons


def answer_prompt(template: FewShotTemplate, pool: Sequence[tuple[str, str]], retrieved: Sequence[int],
                  question: str) -> str:
    """The prompt that answers ``question``: the retrieved pool pairs (best first in ``retrieved``) as
    demonstrations, the most similar last (next to the query), then the template's query. No instruction."""
    return build_fewshot_prompt(template, [pool[j] for j in reversed(retrieved)], question)
