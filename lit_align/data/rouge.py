"""One cached ``rouge-score`` scorer per (ROUGE variants, stemming) setting, shared by every ROUGE user.

The summarisation post-processing (``copied``: ROUGE-L precision against the article), the summarisation metrics
(ROUGE-1/2/L/Lsum F1) and the unlearning metrics (ROUGE-L recall) all score through :func:`rouge_scorer`, so a
scorer and its Porter stemmer are built once per setting. It lives in the data layer, the lowest one that needs
it (``lit_align.metrics`` may import data, not the reverse).
"""

from __future__ import annotations

import functools

__all__ = ["rouge_scorer"]


@functools.cache
def rouge_scorer(keys: tuple[str, ...], use_stemmer: bool):
    """``rouge_score.rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)``, built once per argument pair
    (imported on first use: nltk loads slowly). ``keys`` is a tuple (hashable), e.g. ``("rougeL",)``."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(keys), use_stemmer=bool(use_stemmer))
