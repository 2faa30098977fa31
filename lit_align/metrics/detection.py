"""Watermark-detection metrics, text quality, and the attacks of the robustness tables of Xu, Yao, Liu (2024),
"Learning to Watermark LLM-generated Text via Reinforcement Learning" (arXiv 2403.10553), as its released
code evaluates them (``eval_utils.py``, ``evaluate.py`` in github.com/xiaojunxu/learning-to-watermark-llm).

Pure functions (checked by hand in ``tests/metrics/test_detection_metrics.py``):

* :func:`fpr_at_tpr` -- the false-positive rate at a threshold set by a percentile of the positives;
* :func:`tpr_at_fpr` -- the best true-positive rate whose realised false-positive rate is within a budget;
* :func:`roc_curve_points` -- the ROC curve, for plotting (its area is :func:`~lit_align.metrics.binary_auc`);
* :func:`perplexity` -- exp of the mean token NLL of each sequence under an oracle LM;
* attacks: :func:`random_substitution` (token ids), :func:`word_deletion` (text), and paraphrasers
  (:class:`ShuffleWordsParaphraser`, the test stub; :class:`HFParaphraser`, a seq2seq model).

:class:`DetectionMetrics` accumulates detector scores and labels (``cat`` states, so DDP-safe) and
computes AUROC, TPR at 1% FPR and FPR at 90% / 99% TPR. Label 1 = watermarked LLM text (positive),
0 = human text (negative).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_align.metrics.unlearning import binary_auc
from lit_align.rollout.logps import token_logps

__all__ = [
    "DetectionMetrics",
    "HFParaphraser",
    "Paraphraser",
    "ShuffleWordsParaphraser",
    "fpr_at_tpr",
    "perplexity",
    "random_substitution",
    "roc_curve_points",
    "tpr_at_fpr",
    "word_deletion",
]


# -- error rates at a percentile threshold ------------------------------------------------------
def _scores(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().double().flatten().cpu()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(t).any():
        raise ValueError(f"{name} has NaN scores")
    return t


def _rate(value: float, name: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value} (e.g. 0.9 for 90%)")
    return float(value)


def fpr_at_tpr(pos_scores, neg_scores, tpr: float) -> float:
    """False-positive rate at the threshold that keeps a fraction ``tpr`` of the positives.

    As in the released code of Xu et al. (2024) (``eval_utils.py``): threshold = the ``(1 - tpr)`` quantile
    of the positive scores (the ``(100 - p)``-th percentile for ``p = 100 tpr``), with numpy's default
    *linear* interpolation (``torch.quantile``'s too); FPR = the fraction of negative scores strictly above it.

    Example: positives {1, 2, 3, 4}, negatives {0, 2.5}, tpr = 0.75: the 25th percentile
    of the positives is 1 + 0.75 (2 - 1) = 1.75, and one negative of two is above it, so FPR = 0.5.
    """
    pos, neg = _scores(pos_scores, "fpr_at_tpr positives"), _scores(neg_scores, "fpr_at_tpr negatives")
    threshold = torch.quantile(pos, 1.0 - _rate(tpr, "fpr_at_tpr tpr"), interpolation="linear")
    return (neg > threshold).double().mean().item()


def tpr_at_fpr(pos_scores, neg_scores, fpr: float) -> float:
    """True-positive rate at the best threshold whose realised false-positive rate is at most ``fpr``.

    The ROC convention (scikit-learn's ``roc_curve``): a threshold flags every score ``>=`` it; among the
    thresholds that flag at most ``floor(fpr * n_neg)`` negatives, take the highest TPR. With 16 negatives
    and ``fpr = 0.01`` no negative may be flagged, so the threshold sits above the highest negative: a
    quantile threshold with a strict ``>`` (this function's earlier rule) let one through, a realised FPR
    of 6.25%.
    """
    pos, neg = _scores(pos_scores, "tpr_at_fpr positives"), _scores(neg_scores, "tpr_at_fpr negatives")
    allowed = int(_rate(fpr, "tpr_at_fpr fpr") * len(neg) + 1e-9)  # negatives that may be flagged
    labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).bool()
    fprs, tprs, _ = roc_curve_points(torch.cat([pos, neg]), labels)  # (K + 1,) each, from (0, 0)
    within = fprs * len(neg) <= allowed + 1e-6  # (K + 1,): points whose flagged negatives fit the budget
    return tprs[within].max().item()


def roc_curve_points(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC curve: ``(fpr, tpr, thresholds)``, each (K + 1,) for K distinct scores.

    Point ``k`` flags every score ``>= thresholds[k]``; thresholds decrease from ``+inf`` (the point
    (0, 0)) to the lowest score (the point (1, 1)). The trapezoid area under it equals
    :func:`~lit_align.metrics.binary_auc` (ties count 1/2). The points equal torchmetrics' ``binary_roc``
    (tested); they are computed here in float64 because :func:`tpr_at_fpr` counts negatives as
    ``fpr * n_neg``, which torchmetrics' float32 rates would blur for large sets.
    """
    scores, labels = _scores(scores, "roc_curve_points scores"), torch.as_tensor(labels).flatten().cpu().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_curve_points: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_curve_points needs both classes, got {n_pos} positives and {n_neg} negatives")
    values, inverse = torch.unique(scores, return_inverse=True)  # ascending
    pos_at = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, labels.double())
    neg_at = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, (~labels).double())
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, pos_at.flip(0).cumsum(0)]) / n_pos  # (K + 1,)
    fpr = torch.cat([zero, neg_at.flip(0).cumsum(0)]) / n_neg  # (K + 1,)
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), values.flip(0)])
    return fpr, tpr, thresholds


# -- the accumulating metric ---------------------------------------------------------------------
def _percent(x: float) -> str:
    return f"{100 * x:g}".replace(".", "_")


class DetectionMetrics(Metric):
    """AUROC and error rates of a detector: ``update(scores (B,), labels (B,))``, 1 = watermarked.

    ``compute()`` returns ``{"auroc", "tpr_at_fpr_1", "fpr_at_tpr_90", "fpr_at_tpr_99"}`` (the levels
    are configurable; a level of 0.5% is named ``_0_5``). AUROC is
    :func:`~lit_align.metrics.binary_auc`, the error rates :func:`tpr_at_fpr` / :func:`fpr_at_tpr`.
    """

    full_state_update = False

    def __init__(self, fpr_levels: Sequence[float] = (0.01,), tpr_levels: Sequence[float] = (0.9, 0.99),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.fpr_levels = [_rate(x, "DetectionMetrics fpr_levels") for x in fpr_levels]
        self.tpr_levels = [_rate(x, "DetectionMetrics tpr_levels") for x in tpr_levels]
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        scores = scores.detach().double().reshape(-1)
        labels = labels.detach().to(scores.device).long().reshape(-1)
        if scores.shape != labels.shape:
            raise ValueError(f"DetectionMetrics: {scores.numel()} scores but {labels.numel()} labels")
        self.scores.append(scores)
        self.labels.append(labels)

    def compute(self) -> dict[str, Tensor]:
        scores, labels = dim_zero_cat(self.scores), dim_zero_cat(self.labels).bool()
        pos, neg = scores[labels], scores[~labels]
        out = {"auroc": binary_auc(scores, labels)}
        out |= {f"tpr_at_fpr_{_percent(f)}": tpr_at_fpr(pos, neg, f) for f in self.fpr_levels}
        out |= {f"fpr_at_tpr_{_percent(t)}": fpr_at_tpr(pos, neg, t) for t in self.tpr_levels}
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


# -- text quality -------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
               reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Perplexity under an oracle LM: per sequence ``exp(mean NLL of the scored tokens)``.

    The text-quality metric of Xu et al. (2024; released code, ``eval_utils.py``) scores prompt + continuation: pass
    ``loss_mask = attention_mask`` (each row's first token is never scored, nothing predicts it).

    Args:
        model: HF causal LM (the oracle, e.g. OPT-2.7B).
        input_ids: (B, T) token ids in the oracle's tokenizer (see :func:`~lit_align.data.completion.retokenize`).
        attention_mask: (B, T) 1 on real tokens.
        loss_mask: (B, T) 1 on the tokens to score.
        reduction: ``mean`` averages the per-sequence perplexities (a scalar); ``none`` returns them (B,).
    """
    lp = token_logps(model, input_ids, attention_mask, loss_mask)
    if (lp.mask.sum(-1) == 0).any():
        raise ValueError("perplexity: a row has no scored token (empty loss_mask beyond its first token)")
    ppl = torch.exp(-lp.mean().double())  # (B,)
    return ppl.mean() if reduction == "mean" else ppl


# -- attacks ------------------------------------------------------------------------------------
def random_substitution(ids: Tensor, mask: Tensor, ratio: float, vocab_size: int,
                        generator: torch.Generator | None = None) -> Tensor:
    """Replace ``round(ratio * n)`` of each row's ``n`` masked tokens (the continuation) by other random ids.

    Positions are drawn uniformly without replacement; each new id is uniform over the ``vocab_size - 1``
    ids that differ from the original, so exactly that many tokens change. Returns a new (B, T) tensor.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"random_substitution ratio must be in [0, 1], got {ratio}")
    if vocab_size < 2:
        raise ValueError(f"random_substitution needs vocab_size >= 2, got {vocab_size}")
    out = ids.clone()
    device = generator.device if generator is not None else torch.device("cpu")
    for row in range(ids.shape[0]):
        positions = mask[row].nonzero().flatten()
        k = round(ratio * len(positions))
        if k == 0:
            continue
        chosen = positions[torch.randperm(len(positions), generator=generator, device=device)[:k].to(positions.device)]
        shift = torch.randint(1, vocab_size, (k,), generator=generator, device=device).to(ids.device)
        out[row, chosen] = (ids[row, chosen] + shift) % vocab_size
    return out


def word_deletion(text: str, ratio: float, rng: random.Random) -> str:
    """Delete ``round(ratio * n)`` of the ``n`` whitespace-separated words at random; words joined by one space."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"word_deletion ratio must be in [0, 1], got {ratio}")
    words = text.split()
    drop = set(rng.sample(range(len(words)), round(ratio * len(words))))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


@runtime_checkable
class Paraphraser(Protocol):
    """Rewrites texts, keeping their meaning: ``paraphraser(texts) -> texts`` (same length and order)."""

    def __call__(self, texts: Sequence[str]) -> list[str]: ...


class ShuffleWordsParaphraser:
    """Test stub for a paraphraser (real ones such as DIPPER, a T5-XXL, are too large for tests): shuffles each
    text's words, seeded."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out = []
        for text in texts:
            words = text.split()
            self.rng.shuffle(words)
            out.append(" ".join(words))
        return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class HFParaphraser:
    """Paraphrase with an HF seq2seq model (Pegasus, ``tuner007/pegasus_paraphrase``, in the paper).

    Sentence-wise as the paper's Pegasus attack: each text is split after ``.``, ``!`` or ``?``, every
    sentence is paraphrased by sampling at ``temperature``, and the results are joined by spaces.
    The model is loaded on first use. Not exercised by the offline tests (it needs the weights).
    """

    def __init__(self, model_id: str = "tuner007/pegasus_paraphrase", temperature: float = 1.5,
                 max_new_tokens: int = 60, batch_size: int = 32, sentence_wise: bool = True,
                 device: str | None = None, seed: int = 0) -> None:
        self.model_id, self.temperature, self.max_new_tokens = model_id, temperature, max_new_tokens
        self.batch_size, self.sentence_wise, self.seed = batch_size, sentence_wise, seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_id)
            self._model = AutoModelForSeq2SeqLM.from_pretrained(self.model_id).to(self.device).eval()

    @torch.no_grad()
    def _generate(self, pieces: list[str]) -> list[str]:
        out = []
        for start in range(0, len(pieces), self.batch_size):
            enc = self._tokenizer(pieces[start : start + self.batch_size], return_tensors="pt", padding=True,
                                  truncation=True).to(self.device)
            gen = self._model.generate(**enc, do_sample=True, temperature=self.temperature,
                                       max_new_tokens=self.max_new_tokens)
            out += self._tokenizer.batch_decode(gen, skip_special_tokens=True)
        return out

    def __call__(self, texts: Sequence[str]) -> list[str]:
        self._load()
        torch.manual_seed(self.seed)
        splits = [[s for s in _SENTENCE_END.split(t.strip()) if s] if self.sentence_wise else [t] for t in texts]
        flat = self._generate([s for parts in splits for s in parts]) if any(splits) else []
        out, pos = [], 0
        for parts in splits:
            out.append(" ".join(p.strip() for p in flat[pos : pos + len(parts)]))
            pos += len(parts)
        return out
