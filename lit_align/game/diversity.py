"""Diversity terms of the GPO attacker and set-diversity metrics (Zheng et al. 2024, arXiv 2406.10977; the
released code, github.com/ruizheng20/gpo: ``gpo/self_bleu.py``, ``gpo/sentence_embed.py``).

The attacker's reward penalises prompts that resemble the history ``X`` of attack prompts
generated so far::

    R_att(x) = p_unsafe(x, y) - w_bleu SelfBLEU(x) - w_emb CosSim(x)        (w_bleu = 5, w_emb = 1 in the launch script)

    SelfBLEU(x) = mean_{n in 2..5} mean_{x' in X} BLEU_n(x | x')            one reference at a time
    CosSim(x)   = mean_{x' in X} cos(e(x), e(x'))                          e: mean-pooled, L2-normalised encoder output

BLEU is implemented here in pure Python (no ``nltk`` / ``fast_bleu``): cumulative BLEU-N with
uniform weights ``1/N`` over the clipped n-gram precisions of orders ``1..N`` and the brevity
penalty ``BP = min(1, exp(1 - r / c))`` (``c`` the hypothesis length, ``r`` the reference length)::

    BLEU_N = BP * exp( sum_n (1/N) log p_n ),   p_n = matched_n / total_n

Conventions (the released code calls ``fast_bleu``; its smoothing defaults have **not** been
verified, so these follow NLTK's ``sentence_bleu`` with ``SmoothingFunction().method1``):

* a zero ``matched_n`` is replaced by ``smoothing / total_n`` (method1, ``epsilon = smoothing``, 0.1 by default);
* no matched unigram at all gives BLEU 0 (as NLTK), so disjoint vocabularies score exactly 0;
* orders with no hypothesis n-gram (hypothesis shorter than ``n``) are **left out** of the geometric
  mean and the weights are renormalised over the remaining orders. NLTK would instead smooth those
  orders to a tiny precision; leaving them out keeps ``BLEU(x | x) = 1`` for a short prompt ``x``;
* an empty hypothesis scores 0.

The sentence encoder (``e`` above) and the embedding diversity live in :mod:`lit_align.retrieval`
(:class:`~lit_align.retrieval.MeanPoolEncoder`, :func:`~lit_align.retrieval.embedding_diversity`); ``lit_align.game``
re-exports them as ``SentenceEncoder``, ``build_sentence_encoder`` and ``embedding_diversity``.

Sources: Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation";
Chen & Cherry 2014, "A Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU"
(method1); Zhu et al. 2018, "Texygen" (Self-BLEU); Zheng et al., "Toward Optimal LLM Alignments
Using Two-Player Games", https://arxiv.org/abs/2406.10977 (the attacker's diversity reward).
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_ORDERS",
    "DiversityHistory",
    "bleu_diversity",
    "self_bleu",
    "sentence_bleu",
    "set_self_bleu",
    "word_tokens",
]

#: The n-gram orders whose cumulative BLEU scores are averaged in SelfBLEU (the reference code's 2..5).
DEFAULT_ORDERS: tuple[int, ...] = (2, 3, 4, 5)

# words (with the NLTK-style split of "don't" -> "do", "n't" and "it's" -> "it", "'s"), ellipses, punctuation
_TOKEN_RE = re.compile(r"\w+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+|\.\.\.|[^\w\s]", re.IGNORECASE)


def word_tokens(text: str) -> list[str]:
    """Split ``text`` into words and punctuation marks, like NLTK's ``word_tokenize`` (case kept).

    ``"Don't do it, Bob..."`` -> ``["Do", "n't", "do", "it", ",", "Bob", "..."]``.
    """
    return _TOKEN_RE.findall(text)


# -- BLEU -----------------------------------------------------------------------------------------
class _NGrams:
    """A token sequence's length and its n-gram Counters for orders ``1..max_order`` (built once)."""

    __slots__ = ("counts", "length")

    def __init__(self, tokens: Sequence[str], max_order: int) -> None:
        tokens = tuple(tokens)
        self.length = len(tokens)
        self.counts = [Counter(tokens[i:i + n] for i in range(len(tokens) - n + 1)) for n in range(1, max_order + 1)]

    @property
    def max_order(self) -> int:
        return len(self.counts)


def _matches(hyp: _NGrams, ref: _NGrams, max_order: int) -> list[int]:
    """Clipped n-gram matches of ``hyp`` against ``ref`` for orders ``1..max_order``. The shared n-grams are
    found by a set intersection; an order with none ends the search, as no longer n-gram can match then (its
    prefix would)."""
    out = []
    for n in range(max_order):
        hyp_counts, ref_counts = hyp.counts[n], ref.counts[n]
        shared = hyp_counts.keys() & ref_counts.keys()
        if not shared:
            return out + [0] * (max_order - n)
        out.append(sum(min(hyp_counts[g], ref_counts[g]) for g in shared))
    return out


def _bleu_orders(matched: Sequence[int], hyp_len: int, ref_len: int, orders: Sequence[int],
                 smoothing: float) -> list[float]:
    """Cumulative BLEU-``n`` for each ``n`` of ``orders`` from the clipped matches of orders ``1..max(orders)``
    (see the module docstring), the log precisions summed once for all of them."""
    if hyp_len == 0 or matched[0] == 0:
        return [0.0] * len(orders)
    top = min(max(orders), hyp_len)  # orders above the hypothesis length are left out
    log_sums = [0.0]  # log_sums[k]: log p_1 + ... + log p_k
    for n in range(1, top + 1):
        log_sums.append(log_sums[-1] + math.log((matched[n - 1] or smoothing) / (hyp_len - n + 1)))
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return [bp * math.exp(log_sums[min(n, top)] / min(n, top)) for n in orders]


def _check_orders(orders: Sequence[int], smoothing: float) -> tuple[int, ...]:
    orders = tuple(orders)
    if not orders or any(not isinstance(n, int) or n < 1 for n in orders):
        raise ValueError(f"orders must be a non-empty sequence of positive integers, got {orders!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (NLTK method1's epsilon), got {smoothing!r}")
    return orders


def sentence_bleu(hypothesis: Sequence[str], reference: Sequence[str], max_order: int, smoothing: float = 0.1) -> float:
    """Cumulative BLEU-``max_order`` of ``hypothesis`` against one ``reference`` (token lists).

    Hand check: hypothesis ``a b c d``, reference ``a b c e``, ``max_order=2``: unigrams 3/4 match,
    bigrams 2/3 (``a b``, ``b c``), equal lengths so BP = 1, BLEU = sqrt(3/4 * 2/3) = sqrt(1/2) = 0.7071.

    Args:
        hypothesis: the scored tokens.
        reference: the single reference's tokens.
        max_order: the largest n-gram order N (weights ``1/N`` over orders ``1..N``).
        smoothing: NLTK method1's epsilon: a zero match count at order ``n`` counts as ``smoothing``.

    Returns:
        BLEU in ``[0, 1]``.
    """
    _check_orders((max_order,), smoothing)
    hyp, ref = _NGrams(hypothesis, max_order), _NGrams(reference, max_order)
    return _bleu_orders(_matches(hyp, ref, max_order), hyp.length, ref.length, (max_order,), smoothing)[0]


def _self_bleu_stats(hyp: _NGrams, refs: Sequence[_NGrams], orders: tuple[int, ...], smoothing: float) -> float:
    if not refs:
        return 0.0
    top = max(orders)
    per_order = [0.0] * len(orders)
    for ref in refs:
        matched = _matches(hyp, ref, top)
        if matched[0]:  # no shared word: BLEU 0 at every order
            for k, bleu in enumerate(_bleu_orders(matched, hyp.length, ref.length, orders, smoothing)):
                per_order[k] += bleu
    return sum(per_order) / (len(refs) * len(orders))


def self_bleu(
    hypothesis: Sequence[str],
    references: Sequence[Sequence[str]],
    orders: Sequence[int] = DEFAULT_ORDERS,
    smoothing: float = 0.1,
) -> float:
    """SelfBLEU of ``hypothesis`` against ``references``, one reference at a time (as ``gpo/self_bleu.py``).

    For each order ``n``: the mean over references of ``sentence_bleu(hypothesis, ref, n)``; then
    the mean over ``orders``. 0 with no references.
    """
    orders = _check_orders(orders, smoothing)
    top = max(orders)
    return _self_bleu_stats(_NGrams(hypothesis, top), [_NGrams(r, top) for r in references], orders, smoothing)


# -- history ----------------------------------------------------------------------------------------
class DiversityHistory:
    """The attack-prompt history ``X`` scored by the attacker's SelfBLEU and CosSim terms.

    Score a batch first, then :meth:`append` it (the first batch scores 0: ``X`` is empty). Each
    prompt's n-gram Counters are built once, on append. The cosine term keeps a running sum of
    the history's embeddings, so a call costs O(B D) whatever ``len(X)``; with a ``window`` the
    last ``window`` embeddings are kept instead (and the sum is taken over them).

    Args:
        window: keep only the last ``window`` prompts (and embeddings); ``None`` keeps all, as the
            reference code does (whose penalty then averages over an ever-growing set).
        max_order: the largest n-gram order precomputed (the largest order ever scored).
    """

    def __init__(self, window: int | None = None, max_order: int = max(DEFAULT_ORDERS)) -> None:
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive integer or None, got {window!r}")
        self.window, self.max_order = window, max_order
        self._tokens: deque[list[str]] = deque(maxlen=window)
        self._ngrams: deque[_NGrams] = deque(maxlen=window)
        self._emb_sum: Tensor | None = None  # (D,) float64 sum of the kept embeddings
        self._emb_count = 0
        self._emb_rows: deque[Tensor] = deque(maxlen=window)  # (D,) rows, only with a window

    def __len__(self) -> int:
        """Number of prompts in the history (at most ``window``)."""
        return len(self._tokens)

    @property
    def num_embeddings(self) -> int:
        """Number of embeddings the cosine term averages over."""
        return self._emb_count

    def _ngram_batch(self, batch_tokens: Sequence[Sequence[str]], orders: tuple[int, ...]) -> list[_NGrams]:
        if max(orders) > self.max_order:
            raise ValueError(f"order {max(orders)} exceeds the history's max_order={self.max_order}")
        return [_NGrams(t, self.max_order) for t in batch_tokens]

    def self_bleu(
        self,
        batch_tokens: Sequence[Sequence[str]],
        include_batch: bool = False,
        orders: Sequence[int] = DEFAULT_ORDERS,
        smoothing: float = 0.1,
        rows: Sequence[int] | None = None,
    ) -> Tensor:
        """(B,) float32 SelfBLEU of each row against the history (and, with ``include_batch``, the
        other rows of the batch, never the row itself); 0 for a row without references. ``rows``: score
        only these rows of the batch, ``(len(rows),)`` (the others are still references): under data
        parallelism each rank scores its own rows of the gathered batch."""
        orders = _check_orders(orders, smoothing)
        batch = self._ngram_batch(batch_tokens, orders)
        history = list(self._ngrams)
        out = []
        for i in range(len(batch)) if rows is None else rows:
            refs = history + [r for j, r in enumerate(batch) if j != i] if include_batch else history
            out.append(_self_bleu_stats(batch[i], refs, orders, smoothing))
        return torch.tensor(out, dtype=torch.float32)

    def cosine(self, embeddings: Tensor, include_batch: bool = False) -> Tensor:
        """(B,) float32 mean cosine similarity of each row of ``embeddings`` (B, D), unit-norm, to the
        history's embeddings (and, with ``include_batch``, to the other rows); 0 without references."""
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
        emb = embeddings.detach()
        dtype = torch.float32 if emb.device.type == "mps" else torch.float64
        emb = emb.to(dtype)
        dots = torch.zeros(emb.shape[0], dtype=dtype, device=emb.device)  # (B,)
        count = self._emb_count
        if self._emb_sum is not None:
            if self._emb_sum.shape[0] != emb.shape[1]:
                raise ValueError(f"embedding width {emb.shape[1]} differs from the history's {self._emb_sum.shape[0]}")
            dots = dots + emb @ self._emb_sum.to(emb)
        if include_batch and emb.shape[0] > 1:
            gram = emb @ emb.T  # (B, B)
            dots = dots + gram.sum(1) - gram.diagonal()
            count += emb.shape[0] - 1
        return (dots / count if count else dots).float()

    def append(self, batch_tokens: Sequence[Sequence[str]], embeddings: Tensor | None = None) -> None:
        """Add a scored batch: its token lists and, for the cosine term, its (B, D) embeddings."""
        for tokens in batch_tokens:
            self._tokens.append(list(tokens))
            self._ngrams.append(_NGrams(tokens, self.max_order))
        if embeddings is None:
            return
        if embeddings.ndim != 2 or embeddings.shape[0] != len(batch_tokens):
            raise ValueError(
                f"embeddings must be (B, D) with B = {len(batch_tokens)} prompts, got shape {tuple(embeddings.shape)}"
            )
        emb = embeddings.detach().to("cpu", torch.float64)
        if self.window is None:
            self._emb_sum = emb.sum(0) if self._emb_sum is None else self._emb_sum + emb.sum(0)
            self._emb_count += emb.shape[0]
        else:
            self._emb_rows.extend(emb.unbind(0))
            self._emb_sum = torch.stack(list(self._emb_rows)).sum(0)
            self._emb_count = len(self._emb_rows)

    def state_dict(self) -> dict:
        """Plain lists and CPU tensors (for a Lightning checkpoint); :meth:`load_state_dict` resumes exactly."""
        return {
            "window": self.window,
            "max_order": self.max_order,
            "tokens": [list(t) for t in self._tokens],
            "emb_sum": None if self._emb_sum is None else self._emb_sum.clone(),
            "emb_count": self._emb_count,
            "emb_rows": torch.stack(list(self._emb_rows)) if self._emb_rows else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the window must match: a different one would not resume exactly)."""
        if state["window"] != self.window:
            raise ValueError(f"history saved with window={state['window']} cannot be loaded with window={self.window}")
        self.max_order = max(self.max_order, state["max_order"])
        self._tokens = deque((list(t) for t in state["tokens"]), maxlen=self.window)
        self._ngrams = deque((_NGrams(t, self.max_order) for t in self._tokens), maxlen=self.window)
        self._emb_sum = None if state["emb_sum"] is None else state["emb_sum"].to("cpu", torch.float64).clone()
        self._emb_count = int(state["emb_count"])
        rows = state["emb_rows"]
        self._emb_rows = deque(() if rows is None else rows.to("cpu", torch.float64).unbind(0), maxlen=self.window)


# -- set metrics (evaluation: the attacker diversity of Zheng et al. 2024, Table 2) ---------------------
def set_self_bleu(
    token_lists: Sequence[Sequence[str]],
    include_self: bool = False,
    orders: Sequence[int] = DEFAULT_ORDERS,
    smoothing: float = 0.1,
) -> float:
    """Mean over items of :func:`self_bleu` against the other items of the set.

    ``include_self=True`` reproduces the reference evaluation code, which also counts each item as
    its own reference (so the score never drops below ``1 / N``). A set of one item with
    ``include_self=False`` has no references and scores 0 (the "no reference" convention of
    :class:`DiversityHistory`). An empty set raises.
    """
    if not token_lists:
        raise ValueError("set_self_bleu needs at least one item")
    orders = _check_orders(orders, smoothing)
    top = max(orders)
    grams = [_NGrams(t, top) for t in token_lists]
    scores = [
        _self_bleu_stats(h, grams if include_self else grams[:i] + grams[i + 1:], orders, smoothing)
        for i, h in enumerate(grams)
    ]
    return sum(scores) / len(scores)


def bleu_diversity(
    token_lists: Sequence[Sequence[str]],
    include_self: bool = False,
    orders: Sequence[int] = DEFAULT_ORDERS,
    smoothing: float = 0.1,
) -> float:
    """``1 - set_self_bleu(...)``: the attacker's BLEU diversity (Table 2 of the paper)."""
    return 1.0 - set_self_bleu(token_lists, include_self=include_self, orders=orders, smoothing=smoothing)
