"""FEWL, a hallucination score without gold answers: Wei, Yao, Ton, Guo, Estornell, Liu (2024), "Measuring and
Reducing LLM Hallucination without Gold-Standard Answers", arXiv 2402.10412.

Answers of ``N`` reference LLMs stand in for the missing gold answer. Each reference is weighted per question by an
*expertise* ``lambda_i(x)`` (how well its answer agrees with corrected answers and disagrees with intentionally wrong
ones), and an evaluated answer is rewarded for agreeing with the references on its own question (*truthfulness*) and
penalised for agreeing with their answers to ``K`` neighbour questions (*laziness*: a generic answer fits every
question). No official code was found; the paper's algebra is not in the sources this project could read, so the
formulas below are a **reconstruction** from the abstract and third-party reviews (``shared/methods/others.md`` §5(b)):

* expertise ``e_i = mean_r SIM(CO_r, f_i) - mean_r SIM(IW_r, f_i)`` (``form="contrast"``) or the v1 wording
  ``e_i = 1 - mean_r SIM(IW_r, f_i)`` (``form="disagreement"``); ``lambda = softmax_i(e / temperature)``. The
  temperature is **not found** in the sources (a reviewer says the paper does not discuss it): a setting, default 1;
* truthfulness ``T = sum_i lambda_i SIM(f_i(x), h(x))``; laziness ``P = sum_i lambda_i mean_k SIM(f_i(x'_k), h(x))``;
* ``FEWL = T - P`` (the total-variation form of the paper's main text; higher = less hallucination). The model-level
  score is the mean over questions.

The pure tensor functions (:func:`fewl_expertise`, :func:`fewl_scores`, :func:`fewl_terms`) take similarity tensors;
:class:`FEWL` accumulates per-question scores (DDP-safe ``cat`` state); :class:`FEWLScorer` turns text records
(:class:`FEWLItem`) into the four similarity tensors with one :class:`~lit_align.retrieval.Similarity` and finds
the neighbour questions with a :class:`~lit_align.retrieval.Retriever`; :func:`select_by_fewl` and
:func:`select_demonstrations` use the score to pick label-free SFT targets and in-context demonstrations.

SIM argument order (HHEM-style similarities are asymmetric, §5(h)4), fixed everywhere: the *premise* is the answer
taken as evidence (a reference answer, an IW / CO answer), the *hypothesis* the answer being checked against it (the
evaluated answer for T and P, the reference answer for the expertise). This deliberately **reverses** the positional
order of §5(b)'s notation (``SIM(f_i, CO_r)``, ``SIM(h, f_i)``): a (premise, hypothesis) cross-encoder such as HHEM
asks whether the evidence supports the checked answer, so the evidence goes first. Do not "fix" it back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_align.errors import ConfigError, DataError, check_choice, check_int, check_number

if TYPE_CHECKING:
    from lit_align.retrieval import Retriever, Similarity

__all__ = [
    "FEWL",
    "FEWLItem",
    "FEWLScorer",
    "FEWLSimilarities",
    "FEWLTerms",
    "fewl_expertise",
    "fewl_scores",
    "fewl_terms",
    "select_by_fewl",
    "select_demonstrations",
]

FORMS = ("contrast", "disagreement")
WEIGHTS = ("fewl", "uniform")
DIVERGENCES = ("tv", "kl", "js")


# -- pure tensor functions -----------------------------------------------------------------------------------------
def _check_sim(x: Tensor, name: str, dims: int) -> Tensor:
    """``x`` as float64, refusing a wrong rank, non-finite values or values outside [0, 1] (naming ``name``)."""
    x = torch.as_tensor(x)
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    x = x.detach().double()
    if not torch.isfinite(x).all() or (x < 0).any() or (x > 1).any():
        raise ValueError(f"{name} must hold similarities in [0, 1], got values in "
                         f"[{x.nan_to_num().min().item():g}, {x.nan_to_num().max().item():g}] (or non-finite)")
    return x


def _same(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def fewl_expertise(co_sim: Tensor, iw_sim: Tensor, *, form: str = "contrast", temperature: float = 1.0,
                   weights: str = "fewl") -> Tensor:
    """Per-question expertise weights ``lambda`` (B, N), each row summing to 1 (reconstructed, see the module doc).

    Args:
        co_sim: (B, N, R) ``SIM(CO_r(x), f_i(x))``: reference i's answer against the r-th corrected answer.
        iw_sim: (B, N, R) ``SIM(IW_r(x), f_i(x))``: against the r-th intentionally wrong answer.
        form: ``"contrast"``: ``e = mean_r CO - mean_r IW``; ``"disagreement"`` (v1 wording): ``e = 1 - mean_r IW``.
        temperature: softmax temperature over the references, ``lambda = softmax(e / temperature)`` (not given by
            the sources: 1 by default).
        weights: ``"fewl"`` (the above) or ``"uniform"`` (``1 / N``, the uniform-weights ablation).
    """
    check_choice("form", form, FORMS)
    check_choice("weights", weights, WEIGHTS)
    check_number("temperature", temperature, positive=True)
    co, iw = _check_sim(co_sim, "co_sim", 3), _check_sim(iw_sim, "iw_sim", 3)
    _same(co, iw, "co_sim and iw_sim")
    if co.shape[1] == 0 or co.shape[2] == 0:
        raise ValueError(f"co_sim / iw_sim need at least one reference and one IW/CO pair, got {tuple(co.shape)}")
    if weights == "uniform":
        return torch.full(co.shape[:2], 1.0 / co.shape[1], dtype=torch.float64, device=co.device)
    e = co.mean(-1) - iw.mean(-1) if form == "contrast" else 1.0 - iw.mean(-1)  # (B, N)
    return torch.softmax(e / temperature, dim=-1)


def _critic_terms(truth: Tensor, lazy: Tensor, divergence: str) -> tuple[Tensor, Tensor]:
    """The variational bound's two per-reference terms: ``t(joint)`` (B, N) and ``f*(t(product))`` (B, N, K).

    ``D_f(P || Q) >= E_P[t] - E_Q[f*(t)]`` for any critic ``t`` in the domain of the convex conjugate ``f*``; the
    joint ``P`` pairs an answer with a reference answer to its own question, the product ``Q`` with one to a
    neighbour question. Critics built from the similarity ``s`` (reconstructed; the conjugates and the JS output
    activation are those of f-GAN, Nowozin et al. 2016, Table 2):

    * ``tv``: ``f(u) = |u - 1| / 2``, ``f*(t) = t`` on ``|t| <= 1/2``; critic ``t = s - 1/2``: the bound is ``T - P``;
    * ``kl``: ``f(u) = u log u``, ``f*(t) = exp(t - 1)``; critic ``t = s``;
    * ``js``: ``f(u) = u log u - (u + 1) log((u + 1) / 2)``, ``f*(t) = -log(2 - e^t)`` on ``t < log 2``; critic
      ``t = log 2 - softplus(-s)``, so ``f*(t) = softplus(s) - log 2``.
    """
    if divergence == "tv":
        return truth, lazy  # the constant -1/2 cancels between the two expectations
    if divergence == "kl":
        return truth, torch.exp(lazy - 1.0)
    log2 = math.log(2.0)
    return log2 - torch.nn.functional.softplus(-truth), torch.nn.functional.softplus(lazy) - log2


@dataclass
class FEWLTerms:
    """FEWL and its parts for B questions."""

    score: Tensor
    """(B,) FEWL: ``truthfulness - laziness`` (higher = less hallucination)."""
    truthfulness: Tensor
    """(B,) ``T = sum_i lambda_i t(SIM(f_i(x), h(x)))`` (``t`` = identity for the TV form)."""
    laziness: Tensor
    """(B,) ``P = sum_i lambda_i mean_k f*(t(SIM(f_i(x'_k), h(x))))``; zeros when the penalty is off."""
    lam: Tensor
    """(B, N) the expertise weights used."""


def _terms(truth_sim: Tensor, lazy_sim: Tensor, lam: Tensor, laziness: bool, divergence: str) -> FEWLTerms:
    check_choice("divergence", divergence, DIVERGENCES)
    truth, lazy = _check_sim(truth_sim, "truth_sim", 2), _check_sim(lazy_sim, "lazy_sim", 3)
    lam = torch.as_tensor(lam).detach().double()
    _same(truth, lam, "truth_sim and lam")
    if lazy.shape[:2] != truth.shape or (laziness and lazy.shape[2] == 0):
        raise ValueError(f"lazy_sim must be (B, N, K) with K >= 1 for truth_sim {tuple(truth.shape)}, "
                         f"got {tuple(lazy.shape)}")
    joint, product = _critic_terms(truth, lazy, divergence)
    t = (lam * joint).sum(-1)  # (B,)
    p = (lam * product.mean(-1)).sum(-1) if laziness else torch.zeros_like(t)  # (B,)
    return FEWLTerms(score=t - p, truthfulness=t, laziness=p, lam=lam)


def fewl_scores(truth_sim: Tensor, lazy_sim: Tensor, lam: Tensor, *, laziness: bool = True,
                divergence: str = "tv") -> Tensor:
    """FEWL per question (B,), given the expertise ``lam`` (B, N) (from :func:`fewl_expertise`, or any weights such
    as an "ideal" one-hot on the true expert).

    Args:
        truth_sim: (B, N) ``SIM(f_i(x), h(x))``: the evaluated answer against reference i's answer.
        lazy_sim: (B, N, K) ``SIM(f_i(x'_k), h(x))``: against reference i's answer to the k-th neighbour question.
        lam: (B, N) expertise weights.
        laziness: subtract the laziness penalty (``False``: ``FEWL = T``, the no-penalty ablation).
        divergence: ``"tv"`` (the paper's main text: ``T - P``), or the reconstructed ``"kl"`` / ``"js"`` variational
            forms (see :func:`_critic_terms`).
    """
    return _terms(truth_sim, lazy_sim, lam, laziness, divergence).score


def fewl_terms(truth_sim: Tensor, lazy_sim: Tensor, co_sim: Tensor, iw_sim: Tensor, *, form: str = "contrast",
               temperature: float = 1.0, weights: str = "fewl", laziness: bool = True,
               divergence: str = "tv") -> FEWLTerms:
    """Expertise then score: :func:`fewl_expertise` followed by :func:`fewl_scores`, with every part returned."""
    lam = fewl_expertise(co_sim, iw_sim, form=form, temperature=temperature, weights=weights)
    return _terms(truth_sim, lazy_sim, lam, laziness, divergence)


# -- the accumulating metric ---------------------------------------------------------------------------------------
class FEWL(Metric):
    """Model-level FEWL: the mean over questions of :func:`fewl_terms` (DDP-safe ``cat`` states).

    ``update(truth_sim (B, N), lazy_sim (B, N, K), co_sim (B, N, R), iw_sim (B, N, R))`` scores B questions;
    ``compute()`` is the mean FEWL (float64; the scores are sorted before summing, so the mean does not depend on the
    order of the questions or batches); :meth:`per_question` returns every question's score and parts.

    Example::

        metric = FEWL()
        metric.update(truth_sim, lazy_sim, co_sim, iw_sim)
        metric.compute()  # tensor(0.31...)

    Args are those of :func:`fewl_terms` (``form``, ``temperature``, ``weights``, ``laziness``, ``divergence``).
    """

    full_state_update = False

    def __init__(self, form: str = "contrast", temperature: float = 1.0, weights: str = "fewl",
                 laziness: bool = True, divergence: str = "tv", **kwargs) -> None:
        super().__init__(**kwargs)
        check_choice("form", form, FORMS)
        check_choice("weights", weights, WEIGHTS)
        check_choice("divergence", divergence, DIVERGENCES)
        check_number("temperature", temperature, positive=True)
        self.options = dict(form=form, temperature=temperature, weights=weights, laziness=laziness,
                            divergence=divergence)
        for name in ("scores", "truthfulness", "laziness_penalty"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        # the states are float64: a rank with no update syncs an empty tensor of the metric's dtype, which must match
        # the other ranks' or the all-gather breaks (gloo aborts, NCCL hangs)
        self.set_dtype(torch.float64)

    def update(self, truth_sim: Tensor, lazy_sim: Tensor, co_sim: Tensor, iw_sim: Tensor) -> None:
        terms = fewl_terms(truth_sim, lazy_sim, co_sim, iw_sim, **self.options)
        self.scores.append(terms.score.to(self.device))
        self.truthfulness.append(terms.truthfulness.to(self.device))
        self.laziness_penalty.append(terms.laziness.to(self.device))

    def compute(self) -> Tensor:
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("FEWL.compute() before any update(): no question was scored")
        scores = dim_zero_cat(self.scores)
        if scores.numel() == 0:
            raise ValueError("FEWL.compute() before any update(): no question was scored")
        return torch.sort(scores).values.sum() / scores.numel()

    def per_question(self) -> dict[str, Tensor]:
        """Every question's ``score``, ``truthfulness`` and ``laziness`` (each (n,), update order; gathered from
        every process under DDP)."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            return {"score": dim_zero_cat(self.scores).clone(),
                    "truthfulness": dim_zero_cat(self.truthfulness).clone(),
                    "laziness": dim_zero_cat(self.laziness_penalty).clone()}


# -- from text -----------------------------------------------------------------------------------------------------
@dataclass
class FEWLItem:
    """One question with the answer to score and everything FEWL compares it with (all plain text)."""

    question: str
    """The question x (also what the retriever embeds to find neighbour questions)."""
    answer: str
    """The evaluated answer h(x)."""
    references: list[str]
    """The N reference answers f_i(x), one per reference (LLM, or diversified sample of one LLM), always in the
    same reference order: reference i's answers to the neighbour questions are their items' ``references[i]``."""
    wrong: list[str]
    """R intentionally wrong answers IW_r(x)."""
    corrected: list[str]
    """R corrected answers CO_r(x), ``corrected[r]`` the correction of ``wrong[r]``."""


@dataclass
class FEWLSimilarities:
    """The four similarity tensors of B items (inputs of :func:`fewl_terms` and :meth:`FEWL.update`)."""

    truth: Tensor
    """(B, N) ``SIM(premise=f_i(x), hypothesis=h(x))``."""
    lazy: Tensor
    """(B, N, K) ``SIM(premise=f_i(x'_k), hypothesis=h(x))`` over the K neighbour questions x'_k."""
    co: Tensor
    """(B, N, R) ``SIM(premise=CO_r(x), hypothesis=f_i(x))``."""
    iw: Tensor
    """(B, N, R) ``SIM(premise=IW_r(x), hypothesis=f_i(x))``."""
    neighbours: list[list[int]]
    """Per item, its K neighbour questions' positions in the pool, nearest first."""


def _check_items(items: Sequence[FEWLItem], what: str) -> tuple[int, int]:
    """(N, R) shared by every item, refusing empty or mismatched lists (naming the record and field)."""
    if len(items) == 0:
        raise DataError(f"{what}: no item to score")
    n, r = len(items[0].references), len(items[0].wrong)
    for j, item in enumerate(items):
        where = f"{what} record {j} ({item.question[:60]!r})"
        if len(item.references) == 0:
            raise DataError(f"{where}: `references` is empty; give at least one reference answer")
        if len(item.wrong) == 0 or len(item.wrong) != len(item.corrected):
            raise DataError(f"{where}: `wrong` ({len(item.wrong)}) and `corrected` ({len(item.corrected)}) must be "
                            "non-empty and of the same length (corrected[r] corrects wrong[r])")
        if len(item.references) != n or len(item.wrong) != r:
            raise DataError(f"{where}: {len(item.references)} references and R = {len(item.wrong)} differ from "
                            f"record 0's {n} references and R = {r}; every record needs the same N and R")
    return n, r


class FEWLScorer:
    """Text to FEWL: the similarity tensors of :class:`FEWLItem` records, then their scores.

    Neighbours: the pool (by default the scored items; its questions de-duplicated by exact string) is indexed by
    ``retriever``; each item's K neighbours are the nearest pool questions other than its own question (compared by
    their words: case, white space and punctuation ignored) and than the retriever's near-duplicates of it
    (``Retriever(near_duplicate=...)``, required: a retriever without a threshold is refused, §5(h)2). Their reference answers
    ``references[i]`` give the laziness term. Every SIM call goes through ``similarity`` in batches of
    ``batch_size`` distinct (premise, hypothesis) pairs, with the argument order of the module docstring.

    Args:
        similarity: SIM(premise, hypothesis) in [0, 1] (a :class:`~lit_align.retrieval.Similarity`).
        retriever: finds neighbour questions (a :class:`~lit_align.retrieval.Retriever` with a ``near_duplicate``
            threshold; it is re-indexed on the pool at each call).
        k: neighbour questions per item (the paper's default is 25).
        batch_size: pairs per SIM call.
        remember: keep every computed SIM value (keyed by the (premise, hypothesis) pair) for later calls, so
            scoring several answers to the same questions computes the expertise pairs once (``similarity`` must
            then be deterministic).
    """

    def __init__(self, similarity: Similarity, retriever: Retriever, k: int = 25, batch_size: int = 256,
                 remember: bool = True) -> None:
        check_int("k", k)
        check_int("batch_size", batch_size)
        if getattr(retriever, "near_duplicate", None) is None:
            raise ConfigError("retriever.near_duplicate is null: FEWL needs near-duplicate questions kept out of the "
                              "neighbours (§5(h)2: a near-copy's references cancel truthfulness against laziness, "
                              "FEWL = 0); set a cosine threshold such as 0.95")
        self.similarity, self.retriever, self.k, self.batch_size = similarity, retriever, k, batch_size
        self.remember = remember
        self._known: dict[tuple[str, str], float] = {}  # SIM values already computed (when remember)
        self._indexed: list[str] | None = None  # the pool questions the retriever holds

    def neighbours(self, questions: Sequence[str], pool: Sequence[str]) -> list[list[int]]:
        """For each question, its ``k`` nearest questions in ``pool`` (positions), never itself (nor a question with
        the same words, :func:`~lit_align.retrieval.encoders.word_key`) nor a near-duplicate."""
        from lit_align.retrieval.encoders import word_key  # here: importing lit_align.metrics stays light

        stored = [word_key(p) for p in dict.fromkeys(pool)]
        eligible = min(sum(key != word_key(q) for key in stored) for q in questions)
        if self.k > eligible:
            raise ConfigError(f"k = {self.k} neighbour questions asked but the pool has only {eligible} other "
                              f"distinct questions; lower `k` or add questions")
        held = getattr(self.retriever, "texts", self._indexed)  # re-index if someone else re-indexed it
        if self._indexed != list(pool) or held != list(pool):  # else encode the pool once for repeated calls
            self.retriever.index(list(pool))
            self._indexed = list(pool)
        try:
            return self.retriever.search(list(questions), self.k, exclude_self=True)
        except ValueError as error:  # near-duplicates left fewer than k eligible questions
            raise ConfigError(f"k = {self.k}: too few neighbour questions once the question itself and its "
                              f"near-duplicates are excluded ({error}); lower `k` or the retriever's "
                              "near_duplicate threshold") from error

    def _sim(self, pairs: list[tuple[str, str]]) -> Tensor:
        """SIM of each (premise, hypothesis) pair (n,), each distinct pair computed once, checked in [0, 1]."""
        known = self._known if self.remember else {}
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in known]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            values = torch.as_tensor(self.similarity([p for p, _ in chunk], [h for _, h in chunk])).double()
            key = getattr(self.similarity, "key", "similarity")
            if values.shape != (len(chunk),) or not torch.isfinite(values).all() or (values < 0).any() \
                    or (values > 1).any():
                raise ConfigError(f"{key}: {type(self.similarity).__name__} must return {len(chunk)} finite values "
                                  f"in [0, 1], got shape {tuple(values.shape)} with values "
                                  f"{values.flatten()[:4].tolist()}...; rescale it (e.g. a sigmoid) or choose "
                                  "another similarity")
            known.update(zip(chunk, values.tolist(), strict=True))
        return torch.tensor([known[pair] for pair in pairs], dtype=torch.float64)

    def similarities(self, items: Sequence[FEWLItem], pool: Sequence[FEWLItem] | None = None) -> FEWLSimilarities:
        """The four similarity tensors of ``items`` (neighbours from ``pool``, default ``items``)."""
        n, r = _check_items(items, "FEWLScorer items")
        unique: dict[str, FEWLItem] = {}
        for p in pool if pool is not None else items:
            unique.setdefault(p.question, p)  # one entry per distinct question, first occurrence kept
        pool = list(unique.values())
        pool_n, _ = _check_items(pool, "FEWLScorer pool")
        if pool_n != n:
            raise DataError(f"FEWLScorer pool records have {pool_n} references but the items {n}; use the same "
                            "references for both")
        nbrs = self.neighbours([it.question for it in items], [p.question for p in pool])
        truth, lazy, expert_pairs = [], [], []
        for item, near in zip(items, nbrs, strict=True):
            truth += [(ref, item.answer) for ref in item.references]
            lazy += [(pool[j].references[i], item.answer) for i in range(n) for j in near]
            expert_pairs += [(syn, ref) for ref in item.references for syn in item.corrected + item.wrong]
        b, k = len(items), self.k
        expert = self._sim(expert_pairs).view(b, n, 2 * r)  # (B, N, 2R): CO then IW
        return FEWLSimilarities(truth=self._sim(truth).view(b, n), lazy=self._sim(lazy).view(b, n, k),
                                co=expert[..., :r], iw=expert[..., r:], neighbours=nbrs)

    def score(self, items: Sequence[FEWLItem], pool: Sequence[FEWLItem] | None = None, **options) -> FEWLTerms:
        """FEWL of each item (``options``: those of :func:`fewl_terms`)."""
        s = self.similarities(items, pool)
        return fewl_terms(s.truth, s.lazy, s.co, s.iw, **options)


# -- selection -----------------------------------------------------------------------------------------------------
def select_by_fewl(scores: Sequence[Sequence[float]] | Tensor) -> list[int]:
    """For each question, the index of its highest-FEWL candidate answer (ties: the first), e.g. the label-free SFT
    target. ``scores``: per question, the FEWL of each candidate (lists may differ in length; a (Q, C) tensor works).

    The selection rule (top-1 per question) is this project's choice: the sources do not give it (§5(c)4).
    """
    picks = []
    for q, row in enumerate(scores):
        row = torch.as_tensor(row, dtype=torch.float64).flatten()
        if row.numel() == 0 or torch.isnan(row).any():
            raise ValueError(f"select_by_fewl: question {q} has no candidate scores or a NaN score")
        picks.append(int(torch.argmax(row)))  # torch.argmax returns the first maximal index
    return picks


def select_demonstrations(items: Sequence, scores: Sequence[float] | Tensor, k: int) -> list:
    """The ``k`` items with the highest FEWL, best first (ties: the earlier item first): in-context demonstrations."""
    check_int("k", k)
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if values.numel() != len(items):
        raise ValueError(f"select_demonstrations: {len(items)} items but {values.numel()} scores")
    if k > len(items):
        raise ConfigError(f"k = {k} demonstrations asked from only {len(items)} scored items; lower `k`")
    if torch.isnan(values).any():
        raise ValueError("select_demonstrations: a score is NaN")
    order = sorted(range(len(items)), key=lambda j: (-values[j].item(), j))
    return [items[j] for j in order[:k]]
