"""Summarisation metrics against the libraries they wrap (rouge-score, torchmetrics, nltk, scipy) and by hand."""

from __future__ import annotations

import math

import nltk
import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import bootstrap
from tiny_bert import save_tiny_bert
from torchmetrics.text.rouge import ROUGEScore

from lit_align.errors import ConfigError
from lit_align.metrics import (
    LengthRatio,
    SummaryBERTScore,
    SummaryMETEOR,
    SummaryROUGE,
    bootstrap_ci,
    meteor_available,
    rouge_scores,
    split_sentences,
)
from lit_align.metrics.summarization import ROUGE_KEYS, meteor_tokens

# (prediction, reference): stems, repeats (LCS ties), punctuation, short texts, newline-separated highlights,
# non-ASCII letters (rouge-score drops them) and a text with no ASCII word at all.
PAIRS = [
    ("The cats were running home quickly.", "A cat runs home."),
    ("police arrested the man on tuesday", "The man was arrested by police on Tuesday."),
    ("a a b b a", "b a b a a"),
    ("Yes.", "No."),
    ("Storm hits coast.\nThousands lose power.", "Thousands lost power\nas a storm hit the coast."),
    ("Le café était fermé à Zürich.", "Zürich: le café fermé."),
    ("北京下雨", "上海晴天"),
    ("", "An empty prediction."),
]


def _direct(prediction: str, reference: str, use_stemmer: bool) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=use_stemmer)
    return {k: v.fmeasure for k, v in scorer.score(reference, prediction).items()}


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score(use_stemmer):
    """ROUGE-1/2/L on any text, and ROUGE-Lsum on texts whose sentences are already on lines, are rouge-score's."""
    for pred, ref in PAIRS:
        ours, direct = rouge_scores(pred, ref, use_stemmer=use_stemmer), _direct(pred, ref, use_stemmer)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert ours[key] == pytest.approx(direct[key], abs=1e-12), (pred, ref, key)
        if "\n" in pred and "\n" in ref:
            assert ours["rougeLsum"] == pytest.approx(direct["rougeLsum"], abs=1e-12)


def test_stemming_option_changes_scores():
    assert rouge_scores("cats running", "cat runs")["rouge1"] == 1.0
    assert rouge_scores("cats running", "cat runs", use_stemmer=False)["rouge1"] == 0.0


def test_rouge_lsum_splits_sentences_without_newlines():
    """"b a. c d." vs "c d. b a.": one LCS over all words is 2 of 4 (ROUGE-L F1 0.5); per sentence each
    reference sentence is matched in full (union LCS 4 of 4), so ROUGE-Lsum F1 = 1 -- only if the texts are split."""
    pred, ref = "b a. c d.", "c d. b a."
    assert split_sentences(pred) == ["b a.", "c d."]
    scores = rouge_scores(pred, ref)
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rougeLsum"] == pytest.approx(_direct("b a.\nc d.", "c d.\nb a.", True)["rougeLsum"])


def test_split_sentences_rules(monkeypatch, tmp_path):
    assert split_sentences('He said "Stop." Then he left! Why? Dr. Who') == ['He said "Stop."', "Then he left!",
                                                                            "Why?", "Dr.", "Who"]
    assert split_sentences("line one. still one\n\nline two") == ["line one. still one", "line two"]
    assert split_sentences("3.5 percent rise") == ["3.5 percent rise"]
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError, match="nltk.downloader punkt_tab"):
        split_sentences("One. Two.", "punkt")
    with pytest.raises(ValueError, match="sentence_splitter"):
        split_sentences("One. Two.", "spacy")


def test_identical_and_disjoint():
    for text in ("The storm hit the coast on Monday.", "Zürich café, 2024!"):
        assert rouge_scores(text, text) == {k: 1.0 for k in ROUGE_KEYS}
    assert rouge_scores("red green blue", "cat dog fish") == {k: 0.0 for k in ROUGE_KEYS}


def test_rouge_agrees_with_torchmetrics():
    """torchmetrics' ROUGEScore (rouge-score's tokeniser, nltk's Porter stemmer) on ASCII texts whose stems agree;
    its ROUGE-Lsum is left out (it needs punkt data)."""
    preds = [p for p, _ in PAIRS[:4]]
    refs = [r for _, r in PAIRS[:4]]
    metric = SummaryROUGE()
    metric.update(preds, refs)
    ours = metric.compute()
    theirs = ROUGEScore(use_stemmer=True, rouge_keys=("rouge1", "rouge2", "rougeL"))(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert float(ours[key]) == pytest.approx(float(theirs[f"{key}_fmeasure"]), abs=1e-6)


def test_summary_rouge_state_merges_like_one_process():
    """Two shards merged (what a DDP gather does with ``cat`` states) equal one metric over all pairs."""
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    whole, first, second = SummaryROUGE(), SummaryROUGE(), SummaryROUGE()
    whole.update(preds, refs)
    first.update(preds[:3], refs[:3])
    second.update(preds[3:], refs[3:])
    first.merge_state(second)
    expected = {k: np.mean([rouge_scores(p, r)[k] for p, r in PAIRS]) for k in ROUGE_KEYS}
    for metric in (whole, first):
        out = metric.compute()
        assert {k: float(v) for k, v in out.items()} == pytest.approx(expected)
        assert metric.per_item()["rouge1"].shape == (len(PAIRS),)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(SummaryROUGE().compute()["rouge1"]))
    with pytest.raises(ValueError, match="2 summaries and 1 references"):
        SummaryROUGE().update(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"references\[1\] is NoneType"):
        SummaryROUGE().update(["a", "b"], ["a", None])


# -- METEOR ------------------------------------------------------------------------------------
class _Lemma:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class _Synset:
    def __init__(self, names) -> None:
        self._lemmas = [_Lemma(n) for n in names]

    def lemmas(self):
        return self._lemmas


class TinyWordNet:
    """A WordNet stand-in with the one method nltk's METEOR calls: ``synsets(word)`` -> objects whose
    ``lemmas()`` have ``name()``."""

    def __init__(self, groups) -> None:
        self.groups = [set(g) for g in groups]

    def synsets(self, word: str):
        return [_Synset(sorted(g)) for g in self.groups if word in g]


# nltk matches synonyms against the Porter stems of the reference words left over, so these words are their own
# stems; "motor_car" has an underscore, which nltk skips.
WORDNET = TinyWordNet([{"car", "auto", "motor_car"}, {"big", "huge"}])


def test_meteor_skip_path_names_how_to_supply_wordnet(monkeypatch, tmp_path):
    from nltk.corpus import wordnet

    if not hasattr(wordnet, "_LazyCorpusLoader__load"):
        pytest.skip("WordNet already loaded in this process")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    ok, reason = meteor_available()
    assert not ok
    assert "python -m nltk.downloader wordnet" in reason and "NLTK_DATA" in reason
    with pytest.raises(LookupError, match="nltk.downloader wordnet"):
        SummaryMETEOR()


def test_meteor_equals_nltk_with_a_given_wordnet():
    """Our wrapper equals nltk's meteor_score on Treebank tokens; identical 3-word texts: F_mean 1, one chunk of 3
    matches, penalty 0.5 * (1/3)**3, so METEOR = 1 - 1/54."""
    from nltk.translate.meteor_score import meteor_score

    preds = ["The big car stopped.", "the cat sat", "Nothing alike here"]
    refs = ["A huge auto stopped!", "the cat sat", "entirely different words"]
    metric = SummaryMETEOR(wordnet=WORDNET)
    metric.update(preds[:2], refs[:2])
    metric.update(preds[2:], refs[2:])
    expected = [meteor_score([meteor_tokens(r)], meteor_tokens(p), wordnet=WORDNET) for p, r in zip(preds, refs)]
    assert metric.per_item().tolist() == pytest.approx(expected)
    assert float(metric.compute()) == pytest.approx(np.mean(expected))
    assert expected[1] == pytest.approx(1 - 1 / 54)
    assert meteor_tokens("isn't it?") == ["is", "n't", "it", "?"]
    # synonyms count only through the WordNet given
    assert expected[0] > SummaryMETEOR(wordnet=TinyWordNet([])).score(preds[0], refs[0])


MULTI_SENTENCE = ["The mayor left. Prices rose.", "Storm hits the coast! Thousands lose power on Monday.",
                  'He said "no." Then he left the town, quietly.']


def test_meteor_tokens_split_sentences_like_nltk_word_tokenize(monkeypatch):
    """``nltk.word_tokenize`` (nltk's recommended usage, what HF ``evaluate``'s METEOR runs) splits sentences with
    Punkt, then words: every sentence's final period is a token. Punkt's data is not installed here, so nltk's
    own untrained ``PunktSentenceTokenizer`` stands in for it (these texts have no abbreviations)."""
    import nltk.tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    from nltk.translate.meteor_score import meteor_score

    monkeypatch.setattr(nltk.tokenize, "_get_punkt_tokenizer", lambda language="english": PunktSentenceTokenizer())
    for text in MULTI_SENTENCE:
        assert meteor_tokens(text) == nltk.tokenize.word_tokenize(text), text
    assert "left" in meteor_tokens("The mayor left. Prices rose.")
    # swapped sentences: every word matches, two chunks (nltk alone on whole-text Treebank tokens gives 0.53)
    metric = SummaryMETEOR(wordnet=TinyWordNet([]))
    expected = meteor_score([nltk.tokenize.word_tokenize(MULTI_SENTENCE[0])],
                            nltk.tokenize.word_tokenize("Prices rose. The mayor left."), wordnet=TinyWordNet([]))
    assert metric.score("Prices rose. The mayor left.", MULTI_SENTENCE[0]) == pytest.approx(expected)
    assert expected > 0.9


@pytest.mark.skipif(not meteor_available()[0], reason=meteor_available()[1])
def test_meteor_with_installed_wordnet():
    metric = SummaryMETEOR()
    metric.update(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert float(metric.compute()) > 0.99


# -- BERTScore ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bertscore") / "tiny-bert")


# Pairs of varied lengths whose length orders differ between summaries and references (torchmetrics'
# BERTScore mis-pairs these), with an identical pair that must score 1.
BERT_PAIRS = [
    ("the town harbour", "the town harbour"),
    ("how can i help you", "what is that"),
    ("steal the poison", "help the town"),
    ("a town of the harbour is not", "the harbour"),
    ("the mayor", "prices in the town rose again on monday"),
    ("storm hits the coast and thousands lose power", "a storm"),
]


def test_bertscore_equals_bert_score_package_and_identical_is_one(bert_dir):
    import bert_score

    preds, refs = [p for p, _ in BERT_PAIRS], [r for _, r in BERT_PAIRS]
    metric = SummaryBERTScore(bert_dir, num_layers=1, max_length=64, device="cpu")
    metric.update(preds[:4], refs[:4])
    metric.update(preds[4:], refs[4:])
    items = metric.per_item()
    theirs = bert_score.score(preds, refs, model_type=bert_dir, num_layers=1, device="cpu")
    for key, values in zip(("precision", "recall", "f1"), theirs):
        assert items[f"bertscore_{key}"].tolist() == pytest.approx(values.tolist(), abs=1e-5)
    assert float(items["bertscore_f1"][0]) == pytest.approx(1.0, abs=1e-5)
    assert float(items["bertscore_f1"][1]) < 0.999
    for i, (pred, ref) in enumerate(BERT_PAIRS):  # one pair at a time gives the same score as in a batch
        one = bert_score.score([pred], [ref], model_type=bert_dir, num_layers=1, device="cpu")[2]
        assert float(items["bertscore_f1"][i]) == pytest.approx(float(one[0]), abs=1e-5)
    assert float(metric.compute()["bertscore_f1"]) == pytest.approx(float(theirs[2].mean()), abs=1e-5)
    metric.update(["", "the town"], ["the town", " "])  # an empty side scores 0
    assert metric.per_item()["bertscore_f1"][-2:].tolist() == [0.0, 0.0]


def test_bertscore_config_errors(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="baseline_path"):
        SummaryBERTScore(bert_dir, num_layers=1, rescale_with_baseline=True)
    with pytest.raises(ValueError, match="num_layers"):
        SummaryBERTScore(bert_dir, num_layers=0)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SummaryBERTScore(str(tmp_path / "missing"), num_layers=1)
    # review20c #7: beyond the encoder's positions (128 here) is an error at construction, naming the key
    with pytest.raises(ConfigError, match=r"model.metrics.bertscore_max_length: 512 tokens.*128 positions"):
        SummaryBERTScore(bert_dir, num_layers=1, max_length=512, max_length_key="model.metrics.bertscore_max_length")
    assert SummaryBERTScore(bert_dir, num_layers=1, max_length=128, idf=True)._scorer.idf


# -- length and bootstrap ----------------------------------------------------------------------
def test_length_ratio_by_hand():
    """Words: summaries 2 and 3, references 4 and 6, articles 8 and 30 -> ratios (0.5, 0.5) and (0.25, 0.1);
    an empty reference gives NaN, left out of the mean."""
    metric = LengthRatio()
    metric.update(["a b", "a b c"], ["a b c d", "a b c d e f"], ["w " * 8, "w " * 30])
    metric.update(["x"], [""], ["x y"])
    items = metric.per_item()
    assert items["summary_to_reference"][:2].tolist() == [0.5, 0.5]
    assert math.isnan(float(items["summary_to_reference"][2]))
    assert items["summary_to_article"].tolist() == pytest.approx([0.25, 0.1, 0.5])
    out = metric.compute()
    assert float(out["summary_to_reference"]) == pytest.approx(0.5)
    assert float(out["summary_to_article"]) == pytest.approx((0.25 + 0.1 + 0.5) / 3)


def test_bootstrap_ci_equals_scipy_and_handles_degenerate_input():
    values = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.35]
    for method in ("percentile", "BCa"):
        mean, low, high = bootstrap_ci(values, n_resamples=500, seed=3, method=method)
        ref = bootstrap((np.array(values),), np.mean, n_resamples=500, confidence_level=0.95, method=method,
                        rng=np.random.default_rng(3)).confidence_interval
        assert (low, high) == pytest.approx((ref.low, ref.high))
        assert mean == pytest.approx(np.mean(values))
        assert low < mean < high
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(torch.tensor(values, dtype=torch.float64), seed=1)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)
    assert bootstrap_ci([0.7, 0.7, 0.7], method="BCa") == pytest.approx((0.7, 0.7, 0.7))
    assert bootstrap_ci([0.4, float("nan")]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=95)


def test_one_cached_rouge_scorer_is_shared():
    """Summarisation metrics, post-processing and the unlearning metrics score through one cached scorer per
    setting; the human-eval export and the judge share one criteria list."""
    from lit_align.data.rouge import rouge_scorer
    from lit_align.data.summarization_postprocess import copy_precision
    from lit_align.metrics import human_eval, judge
    from lit_align.metrics.unlearning import rouge_l_recall

    assert SummaryROUGE()._rouge is rouge_scorer(ROUGE_KEYS, True)
    assert rouge_scorer(("rougeL",), True) is rouge_scorer(("rougeL",), True)
    before = rouge_scorer.cache_info().hits
    rouge_scores("a cat", "the cat")
    copy_precision("a cat", "the cat sat")
    rouge_l_recall("a cat", "the cat")
    assert rouge_scorer.cache_info().hits == before + 3
    assert human_eval.DEFAULT_CRITERIA is judge.DEFAULT_CRITERIA
