"""Summarisation metrics (others.md §10(b), §10(d).5): ROUGE, METEOR, BERTScore, length ratios, bootstrap CIs.

Each metric is a torchmetrics ``Metric`` with ``update(preds, refs)`` / ``compute()``. Per-article scores are kept
in ``"cat"`` states (or, for BERTScore, the token ids torchmetrics keeps), so ``compute()`` on several processes
that each saw a shard equals one process that saw everything, and ``per_item()`` gives the article-level values
that :func:`bootstrap_ci` resamples.

* :func:`rouge_scores` / :class:`SummaryROUGE` -- ROUGE-1/2/L/Lsum F1 from the ``rouge-score`` package (Porter
  stemmer on by default, as the published summarisation numbers use). ROUGE-Lsum is computed over sentences
  separated by newlines: texts that already contain newlines (CNN/DailyMail highlights) keep their lines; others
  are split by :func:`split_sentences`.
* :class:`SummaryMETEOR` -- nltk's ``meteor_score`` (exact, stem and WordNet-synonym matches). WordNet data is
  not installed by any Python package this project can depend on, so :func:`meteor_available` says whether it is
  there and how to supply it.
* :class:`SummaryBERTScore` -- the ``bert-score`` package's ``BERTScorer`` with a fixed model and layer.
* :class:`LengthRatio` -- summary words over reference words and over article words.
* :func:`bootstrap_ci` -- a seeded ``scipy.stats.bootstrap`` interval for the mean over articles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_align.data.rouge import rouge_scorer
from lit_align.errors import ConfigError

__all__ = [
    "LengthRatio",
    "ROUGE_KEYS",
    "SummaryBERTScore",
    "SummaryMETEOR",
    "SummaryROUGE",
    "bootstrap_ci",
    "encoder_positions",
    "meteor_available",
    "meteor_tokens",
    "punkt_available",
    "resolve_splitter",
    "rouge_scores",
    "split_sentences",
]

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
"""The ROUGE variants reported (F1 each)."""

# A sentence ends at a run of ., ! or ? (or the CJK full stops), optionally followed by closing quotes or
# brackets, and then whitespace. Nothing else splits: abbreviations such as "Mr. Smith" are split too.
_SENTENCE_END = re.compile(r"([.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*)\s+")


# -- ROUGE -------------------------------------------------------------------------------------
def split_sentences(text: str, splitter: Literal["regex", "punkt"] = "regex") -> list[str]:
    """Sentences of ``text`` for ROUGE-Lsum, without empty ones.

    A text that contains a newline is split on newlines only (its sentences are already marked, as in
    CNN/DailyMail highlights). Otherwise:

    * ``"regex"`` (default; needs no data, identical on every machine): a sentence ends after a run of
      ``.``, ``!``, ``?`` (or ``。！？``), with any closing quotes or brackets, followed by whitespace.
      Abbreviations are not recognised (``"Mr. Smith"`` gives two sentences).
    * ``"punkt"``: nltk's ``sent_tokenize`` (English Punkt), which is what torchmetrics' ROUGE-Lsum and
      HF ``evaluate`` use. It needs the ``punkt_tab`` data (``python -m nltk.downloader punkt_tab``, or a copy
      under a directory listed in ``NLTK_DATA``); nothing is downloaded here.
    """
    if "\n" in text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if splitter == "punkt":
        import nltk

        try:
            nltk.data.find("tokenizers/punkt_tab")
        except LookupError as err:
            raise LookupError("sentence_splitter='punkt' needs nltk's punkt_tab data: run `python -m "
                              "nltk.downloader punkt_tab` (or put it under NLTK_DATA), or use "
                              "sentence_splitter='regex'") from err
        return [s.strip() for s in nltk.sent_tokenize(text) if s.strip()]
    if splitter != "regex":
        raise ValueError(f"sentence_splitter must be 'regex' or 'punkt', got {splitter!r}")
    return [s.strip() for s in _SENTENCE_END.sub("\\1\n", text.strip()).split("\n") if s.strip()]


def punkt_available() -> bool:
    """Whether nltk's ``punkt_tab`` data (English Punkt) can be loaded; nothing is downloaded."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def resolve_splitter(splitter: Literal["auto", "regex", "punkt"]) -> Literal["regex", "punkt"]:
    """The sentence splitter that runs: ``"auto"`` is ``"punkt"`` (what rouge-score's ``split_summaries``,
    torchmetrics and the HF summarisation scripts use) when its data is installed, else ``"regex"``."""
    if splitter not in ("auto", "regex", "punkt"):
        raise ValueError(f"sentence_splitter must be 'auto', 'punkt' or 'regex', got {splitter!r}")
    if splitter == "auto":
        return "punkt" if punkt_available() else "regex"
    return splitter


def rouge_scores(prediction: str, reference: str, *, use_stemmer: bool = True,
                 sentence_splitter: Literal["regex", "punkt"] = "regex") -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F1 of ``prediction`` against ``reference`` (keys :data:`ROUGE_KEYS`).

    Exactly ``rouge_score.rouge_scorer.RougeScorer(ROUGE_KEYS, use_stemmer=...)`` run on the two texts with
    their sentences on separate lines (:func:`split_sentences`; only ROUGE-Lsum reads the lines). Tokens are
    rouge-score's: lower-cased runs of ``a-z0-9``, so letters outside ASCII are dropped (a text written only
    in another script has no tokens and scores 0), and the Porter stemmer applies to words longer than 3
    letters. Two texts with no tokens score 0.
    """
    return _rouge_with(rouge_scorer(ROUGE_KEYS, use_stemmer), prediction, reference, sentence_splitter)


def _rouge_with(scorer, prediction: str, reference: str, splitter: str) -> dict[str, float]:
    target = "\n".join(split_sentences(reference, splitter))
    pred = "\n".join(split_sentences(prediction, splitter))
    scores = scorer.score(target, pred)  # rouge-score's order: (target, prediction)
    return {key: float(scores[key].fmeasure) for key in ROUGE_KEYS}


def _check_pairs(preds: Sequence[str], refs: Sequence[str], what: str = "references") -> tuple[list, list]:
    """Both sides as lists of strings of one length (a single string is one item)."""
    preds = [preds] if isinstance(preds, str) else list(preds)
    refs = [refs] if isinstance(refs, str) else list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"update() got {len(preds)} summaries and {len(refs)} {what}; give one per summary")
    for name, texts in (("summaries", preds), (what, refs)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"update(): {name}[{bad}] is {type(texts[bad]).__name__}, not str")
    return preds, refs


class SummaryROUGE(Metric):
    """Mean ROUGE-1/2/L/Lsum F1 over summaries (:func:`rouge_scores`), per-item values kept for bootstrap.

    ``update(preds, refs)`` takes lists of strings; ``compute()`` returns ``{"rouge1", "rouge2", "rougeL",
    "rougeLsum"}`` means (NaN before any update); ``per_item()`` the per-summary F1 tensors with the same keys.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, use_stemmer: bool = True, sentence_splitter: Literal["regex", "punkt"] = "regex",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if sentence_splitter not in ("regex", "punkt"):
            raise ValueError(f"SummaryROUGE.sentence_splitter must be 'regex' or 'punkt', got {sentence_splitter!r}")
        self.use_stemmer, self.sentence_splitter = use_stemmer, sentence_splitter
        self._rouge = rouge_scorer(ROUGE_KEYS, use_stemmer)
        for key in ROUGE_KEYS:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], refs: Sequence[str]) -> None:
        preds, refs = _check_pairs(preds, refs)
        rows = [_rouge_with(self._rouge, p, r, self.sentence_splitter) for p, r in zip(preds, refs)]
        for key in ROUGE_KEYS:
            getattr(self, key).append(torch.tensor([row[key] for row in rows], dtype=torch.float64))

    def per_item(self) -> dict[str, Tensor]:
        """Per-summary F1, shape ``(N,)`` per key, in update order (rank order after a DDP gather)."""
        return {key: _cat(getattr(self, key)) for key in ROUGE_KEYS}

    def compute(self) -> dict[str, Tensor]:
        return {key: _mean(values) for key, values in self.per_item().items()}


def _cat(state) -> Tensor:
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if len(state) else torch.zeros(0, dtype=torch.float64)


def _mean(values: Tensor) -> Tensor:
    return values.nanmean() if values.numel() else torch.tensor(float("nan"), dtype=torch.float64)


# -- METEOR ------------------------------------------------------------------------------------
_WORDNET_HELP = ("METEOR needs nltk's WordNet data, which no package installs: run `python -m nltk.downloader "
                 "wordnet` (once, with network), or copy nltk_data/corpora/wordnet from a machine that has it "
                 "and point the NLTK_DATA environment variable at that nltk_data directory")


def meteor_available() -> tuple[bool, str]:
    """``(True, "")`` when nltk can load WordNet, else ``(False, reason)``; the reason says how to supply it.

    Nothing is downloaded. (Checked for this project: no package on the registry ships WordNet in the layout
    nltk's reader opens, so the data has to come from nltk's downloader or a copied ``nltk_data`` directory.)
    """
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError) as err:
        first = str(err).strip().splitlines()
        return False, f"{_WORDNET_HELP} (nltk: {next((x for x in first if x.strip('* ')), 'not found').strip()})"
    return True, ""


def meteor_tokens(text: str, splitter: Literal["regex", "punkt"] = "regex") -> list[str]:
    """Words and punctuation of ``text`` as nltk's ``word_tokenize`` splits it: the text is split into sentences
    first (:func:`split_sentences` with ``splitter``; ``"punkt"`` is what ``word_tokenize`` itself uses), then each
    sentence by ``NLTKWordTokenizer`` (the Treebank rules), so every sentence's final period is its own token:
    ``"The mayor left. Prices rose."`` -> ``['The', 'mayor', 'left', '.', 'Prices', 'rose', '.']``."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in split_sentences(text, splitter) for token in tokenizer.tokenize(sentence)]


class SummaryMETEOR(Metric):
    """Mean METEOR (nltk ``meteor_score``: alpha 0.9, beta 3, gamma 0.5, Porter stems, WordNet synonyms).

    Texts are tokenised by :func:`meteor_tokens` (sentence by sentence, ``sentence_splitter``) and lower-cased by
    nltk; one reference per summary.
    ``wordnet`` is any object with nltk's ``synsets(word)`` interface (default: ``nltk.corpus.wordnet``);
    without WordNet data the constructor raises ``LookupError`` saying how to supply it -- call
    :func:`meteor_available` first to skip the metric instead. ``compute()`` returns the mean; ``per_item()``
    the per-summary scores.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, wordnet=None, sentence_splitter: Literal["regex", "punkt"] = "regex", **kwargs) -> None:
        super().__init__(**kwargs)
        if sentence_splitter not in ("regex", "punkt"):
            raise ValueError(f"SummaryMETEOR.sentence_splitter must be 'regex' or 'punkt', got {sentence_splitter!r}")
        self.sentence_splitter = sentence_splitter
        if wordnet is None:
            ok, reason = meteor_available()
            if not ok:
                raise LookupError(reason)
            from nltk.corpus import wordnet
        self._wordnet = wordnet
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def score(self, prediction: str, reference: str) -> float:
        """METEOR of one summary against one reference."""
        from nltk.translate.meteor_score import meteor_score

        split = self.sentence_splitter
        return float(meteor_score([meteor_tokens(reference, split)], meteor_tokens(prediction, split),
                                  wordnet=self._wordnet))

    def update(self, preds: Sequence[str], refs: Sequence[str]) -> None:
        preds, refs = _check_pairs(preds, refs)
        self.scores.append(torch.tensor([self.score(p, r) for p, r in zip(preds, refs)], dtype=torch.float64))

    def per_item(self) -> Tensor:
        """Per-summary METEOR, shape ``(N,)``."""
        return _cat(self.scores)

    def compute(self) -> Tensor:
        return _mean(self.per_item())


# -- BERTScore ---------------------------------------------------------------------------------
def encoder_positions(model: str) -> int:
    """How many token positions the encoder ``model`` (a directory or hub id, read offline from its config) can
    take: ``max_position_embeddings``, less RoBERTa-style models' offset of ``pad_token_id + 1``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    offset = config.pad_token_id + 1 if "roberta" in config.model_type and config.pad_token_id is not None else 0
    return int(config.max_position_embeddings) - offset


class SummaryBERTScore(Metric):
    """BERTScore (Zhang et al., 2020) from the authors' ``bert-score`` package (``bert_score.BERTScorer``).

    torchmetrics' ``BERTScore`` is not used: it sorts summaries and references by length separately and
    then re-indexes the embeddings with the sort order instead of its inverse, so in a batch whose two sort
    orders differ, summaries are scored against other articles' references (torchmetrics issue #2728).
    ``BERTScorer`` keeps the pairs and tokenises RoBERTa/GPT-2 vocabularies with the leading space the
    published scores use.

    Args:
        model: a local directory written by ``save_pretrained`` or a hub id (the paper's default is
            ``roberta-large`` with ``num_layers=17``).
        num_layers: which hidden layer's token embeddings are matched (fixed, so scores are comparable).
        idf: weight tokens by inverse document frequency, computed over the references of each ``update()``
            call (off, as in most reports).
        rescale_with_baseline: rescale with the bert-score baseline for this model and layer. Off by default;
            when on, ``baseline_path`` (a local copy of the bert-score baseline file) is required.
        max_length: longer texts are truncated to this many tokens; more than the encoder's positions is a
            ConfigError naming ``max_length_key`` at construction (not a crash after every summary was generated).
        batch_size: texts per encoder forward.
        device: where the encoder runs (default: CUDA when available, else CPU).
        max_length_key: the config key of ``max_length``, named in that error.

    A pair whose summary or reference is empty (whitespace only) scores 0.

    ``update(preds, refs)`` scores the pairs at once and keeps per-item values in ``"cat"`` states (so a DDP
    gather concatenates them); ``compute()`` returns the means ``{"bertscore_precision", "bertscore_recall",
    "bertscore_f1"}`` and ``per_item()`` the per-summary values under the same keys.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model: str, num_layers: int, *, idf: bool = False, rescale_with_baseline: bool = False,
                 baseline_path: str | None = None, max_length: int = 512, batch_size: int = 32,
                 device: str | torch.device | None = None, max_length_key: str = "SummaryBERTScore.max_length",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if rescale_with_baseline and baseline_path is None:
            raise ValueError("SummaryBERTScore.rescale_with_baseline needs baseline_path (a local bert-score "
                             "baseline file for this model and layer); nothing is downloaded. Set "
                             "rescale_with_baseline: false or give baseline_path")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"SummaryBERTScore.num_layers must be a positive int, got {num_layers!r}")
        if (model.startswith((".", "/", "~")) or model.count("/") > 1) and not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"SummaryBERTScore.model={model!r}: no such directory; give a directory "
                                    "written by save_pretrained or a hub id")
        from bert_score import BERTScorer

        model = str(Path(model).expanduser()) if model.startswith("~") else model
        self._scorer = BERTScorer(model_type=model, num_layers=num_layers, batch_size=batch_size, idf=idf,
                                  device=None if device is None else str(device), lang="en",
                                  rescale_with_baseline=rescale_with_baseline, baseline_path=baseline_path)
        positions = encoder_positions(model)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= positions:
            raise ConfigError(f"{max_length_key}: {max_length!r} tokens, but the encoder {model!r} has "
                              f"{positions} positions; give an int in [1, {positions}]")
        # bert-score has no public length argument: it truncates at its tokenizer's model_max_length
        self._scorer._tokenizer.model_max_length = max_length
        for key in _BERTSCORE_KEYS:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], refs: Sequence[str]) -> None:
        preds, refs = _check_pairs(preds, refs)
        if not preds:
            return
        # an empty text has no tokens to match: it scores 0 (bert-score cannot encode "" with transformers 5)
        kept = [i for i, (p, r) in enumerate(zip(preds, refs)) if p.strip() and r.strip()]
        scores = torch.zeros(3, len(preds), dtype=torch.float64)
        if kept:
            if self._scorer.idf:
                self._scorer.compute_idf([refs[i] for i in kept])
            found = self._scorer.score([preds[i] for i in kept], [refs[i] for i in kept],
                                       batch_size=self._scorer.batch_size)
            scores[:, kept] = torch.stack([v.detach().to("cpu", torch.float64).reshape(-1) for v in found])
        for key, values in zip(_BERTSCORE_KEYS, scores):
            getattr(self, key).append(values)

    def per_item(self) -> dict[str, Tensor]:
        """Per-summary precision, recall and F1, shape ``(N,)`` each, in update order."""
        return {key: _cat(getattr(self, key)) for key in _BERTSCORE_KEYS}

    def compute(self) -> dict[str, Tensor]:
        return {key: _mean(values) for key, values in self.per_item().items()}


_BERTSCORE_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


# -- length ------------------------------------------------------------------------------------
def _words(text: str) -> int:
    return len(text.split())


class LengthRatio(Metric):
    """Mean per-article length ratios in whitespace-separated words.

    ``update(summaries, references, articles=None)``; ``compute()`` returns ``{"summary_to_reference",
    "summary_to_article"}`` (the mean over articles of each ratio; the article ratio is NaN when no articles
    were given). A zero denominator (an empty reference or article) gives NaN for that item, left out of the
    mean. ``per_item()`` returns the ratios.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("to_reference", default=[], dist_reduce_fx="cat")
        self.add_state("to_article", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], refs: Sequence[str], articles: Sequence[str] | None = None) -> None:
        preds, refs = _check_pairs(preds, refs)
        arts = [""] * len(preds) if articles is None else _check_pairs(preds, articles, "articles")[1]
        self.to_reference.append(torch.tensor([_ratio(_words(p), _words(r)) for p, r in zip(preds, refs)],
                                              dtype=torch.float64))
        self.to_article.append(torch.tensor([_ratio(_words(p), _words(a)) for p, a in zip(preds, arts)],
                                            dtype=torch.float64))

    def per_item(self) -> dict[str, Tensor]:
        return {"summary_to_reference": _cat(self.to_reference), "summary_to_article": _cat(self.to_article)}

    def compute(self) -> dict[str, Tensor]:
        return {k: _mean(v) for k, v in self.per_item().items()}


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


# -- confidence intervals ----------------------------------------------------------------------
def bootstrap_ci(values, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                 method: Literal["percentile", "BCa"] = "percentile",
                 statistic: Callable = np.mean) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over articles and its bootstrap confidence interval.

    ``scipy.stats.bootstrap`` resamples the articles ``n_resamples`` times with a generator seeded by ``seed``
    (the same inputs give the same interval). ``method="percentile"`` (default; the interval rouge-score's
    ``BootstrapAggregator`` reports) takes the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of
    the resampled means; ``"BCa"`` corrects them for bias and skew. NaN values are dropped first. No values gives
    ``(nan, nan, nan)``; one value, or all equal, gives ``(v, v, v)`` (no spread to resample).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if method not in ("percentile", "BCa"):
        raise ValueError(f"bootstrap_ci: method must be 'percentile' or 'BCa', got {method!r}")
    x = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    centre = float(statistic(x))
    if x.size == 1 or np.all(x == x[0]):
        return centre, centre, centre
    from scipy.stats import bootstrap

    result = bootstrap((x,), statistic, n_resamples=n_resamples, confidence_level=confidence, method=method,
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return centre, float(low), float(high)
