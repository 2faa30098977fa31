"""Per-model scoring of unlearning evaluation records, shared by the evaluation callback and the assessment.

:class:`~lit_align.callbacks.UnlearningEvaluation` (during an unlearning fit) and
:class:`~lit_align.methods.UnlearningAssessmentModule` (``lit-align test`` on finished models) score a model the
same way, with the code here:

* :func:`encode_record` tokenizes one eval record (``prompt``, ``response``, optional ``paraphrased_prompt``,
  ``paraphrased_response``, ``perturbed_responses``, ``choices`` / ``label``) once per tokenizer;
* :class:`ModelScorer` runs one model over encoded records: batched answer log-probs (NLL, P(a|q), token
  accuracy, the Min-K% MIA score from the same forward), greedy answers (ROUGE-L recall), truth ratios and
  multiple-choice accuracy; :func:`score_splits` does it for several splits and the MIA AUC across two of them;
* :func:`relearn_copy` is the fine-tuning relearning attack: a trained deep copy, the model itself untouched.

Columns are ``<split>_<metric>`` (see :meth:`ModelScorer.score_split`) and ``mia_auc``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_align.data.tokenize import prompt_response_batch
from lit_align.data.unlearning import check_eval_record
from lit_align.losses.sft import nll_loss
from lit_align.metrics.unlearning import MeanNLL, MinKProbMIA, MultipleChoiceAccuracy, RougeLRecall, TruthRatio
from lit_align.modes import eval_mode
from lit_align.rollout.logps import token_logps, token_stats
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

__all__ = ["TRUTH_RATIO_QUESTIONS", "EncodedRecord", "ModelScorer", "ScoreSettings", "check_eval_record",
           "encode_record", "relearn_copy", "score_splits"]

#: Values of :attr:`ScoreSettings.truth_ratio_question`.
TRUTH_RATIO_QUESTIONS = ("original", "paraphrased")


@dataclass
class EncodedRecord:
    """One evaluation record, tokenized once (the same for every model sharing a tokenizer)."""

    prompt: list[int]
    """Prompt ids, formatted as in training."""
    response: list[int]
    """Answer ids, EOS appended."""
    response_text: str
    """The reference answer (ROUGE-L target)."""
    para_prompt: list[int] | None = None
    """The paraphrased question q' (the prompt when the record has no paraphrase); set when it has perturbed
    answers. FA asks it; the truth ratio asks it only with ``truth_ratio_question: paraphrased``."""
    para_response: list[int] | None = None
    """a' of the truth ratio (the response when the record has no paraphrase)."""
    perturbed: list[list[int]] = field(default_factory=list)
    """The perturbed (wrong) answers' ids."""
    choices: list[list[int]] = field(default_factory=list)
    """Multiple-choice answers' ids."""
    label: int | None = None
    """Index of the right choice."""
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The raw record (texts for embedding-based metrics, ``kind``, ``group``)."""


def encode_record(record: Mapping[str, Any], encode_prompt: Callable[[str], list[int]],
                  encode_response: Callable[[str], list[int]], where: str) -> EncodedRecord:
    """Tokenize ``record`` (checked by :func:`check_eval_record`); ``where`` names it in errors (e.g.
    ``eval_records()['forget'][3]``)."""
    check_eval_record(record, where)
    prompt, response = encode_prompt(record["prompt"]), encode_response(record["response"])
    item = EncodedRecord(prompt=prompt, response=response, response_text=record["response"], record=record)
    if record.get("perturbed_responses"):
        para_prompt = record.get("paraphrased_prompt") or record["prompt"]
        item.para_prompt = encode_prompt(para_prompt) if para_prompt != record["prompt"] else prompt
        para = record.get("paraphrased_response") or record["response"]
        item.para_response = encode_response(para)
        item.perturbed = [encode_response(p) for p in record["perturbed_responses"]]
    if record.get("choices"):
        item.choices, item.label = [encode_response(c) for c in record["choices"]], record["label"]
    return item


@dataclass
class ScoreSettings:
    """How a model is scored (the same for every model of one evaluation)."""

    batch_size: int = 8
    """Sequences (or prompts, for greedy decoding) per forward pass."""
    max_new_tokens: int = 64
    """Greedy answer length limit (ROUGE-L)."""
    mia_k: float = 0.5
    """K of Min-K% Prob, in (0, 1]."""
    truth_ratio_mean: Literal["arithmetic", "geometric"] = "arithmetic"
    """How the perturbed answers' probabilities are averaged (:func:`lit_align.metrics.truth_ratio`)."""
    chunk_tokens: int | None = None
    """Rows per LM-head chunk (memory only)."""
    rouge_stemmer: bool = True
    """ROUGE-L recall from rouge-score with its Porter stemmer (TOFU, WAGLE) or without."""
    mia_convention: Literal["forget_positive", "open_unlearning"] = "forget_positive"
    """Which class is positive in ``mia_auc`` (:class:`lit_align.metrics.MinKProbMIA`)."""
    truth_ratio_question: Literal["original", "paraphrased"] = "original"
    """The question the truth ratio conditions the paraphrased answer a' and the perturbed answers on:
    ``original`` (TOFU's ``eval_everything.yaml``, ``question_key: question``, and open-unlearning's
    ``question_key: "question"``) or ``paraphrased`` (q', as core.md §4.8 writes it)."""

    def __post_init__(self) -> None:
        if self.truth_ratio_question not in TRUTH_RATIO_QUESTIONS:
            raise ValueError(f"truth_ratio_question must be one of {TRUTH_RATIO_QUESTIONS}, "
                             f"got {self.truth_ratio_question!r}")


def _right_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt, response) pairs -> right-padded ``input_ids``, ``attention_mask``, ``response_mask``, all (B, T)."""
    batch = prompt_response_batch([(list(p), list(r)) for p, r in rows], list(range(len(rows))), pad_id)
    return batch.input_ids.to(device), batch.attention_mask.to(device), batch.loss_mask.to(device)


class ModelScorer:
    """Scores one model (HF causal LM, in eval mode for the scoring) on encoded records.

    ``rank`` / ``world``: the records of each split are sharded across ranks and the metric states reduced, so
    every rank gets the same numbers; every rank runs the same number of forward passes (short shards repeat a
    batch whose results are dropped).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device | str, settings: ScoreSettings,
                 rank: int = 0, world: int = 1) -> None:
        self.model, self.tokenizer, self.device, self.settings = model, tokenizer, torch.device(device), settings
        self.rank, self.world = rank, world

    def batches(self, items: list, fallback) -> Iterator[tuple[list, bool]]:
        """``(chunk, real)`` pairs over ``items``; every rank yields as many (short ones repeat a dummy chunk)."""
        size = self.settings.batch_size
        count = math.ceil(len(items) / size)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = torch.tensor(count, device=self.device)
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
            count = int(total)
        for b in range(count):
            chunk = items[b * size : (b + 1) * size]
            yield (chunk, True) if chunk else ([fallback], False)

    def row_logps(self, rows: list[tuple[list[int], list[int]]], fallback) -> list[Tensor]:
        """Summed and mean answer log-probs of each (prompt, response) row: a list of (2,) tensors."""
        out: list[Tensor] = []
        pad = self.tokenizer.pad_token_id
        for chunk, real in self.batches(rows, fallback):
            ids, attn, resp = _right_pad(chunk, pad, self.device)
            stats = token_logps(self.model, ids, attn, resp, chunk_tokens=self.settings.chunk_tokens)
            if real:
                out.extend(torch.stack([stats.sum(), stats.mean()], -1).double().cpu())
        return out

    def greedy_answers(self, prompts: list[list[int]], fallback: list[int]) -> list[str]:
        """Greedy answers (``max_new_tokens``) to each prompt, decoded without special tokens."""
        tok = self.tokenizer
        config = SamplingConfig(max_new_tokens=self.settings.max_new_tokens, do_sample=False)
        answers: list[str] = []
        with eval_mode(self.model):
            for chunk, real in self.batches(prompts, fallback):
                ids, mask = left_pad(chunk, tok.pad_token_id)
                out = sample(self.model, ids.to(self.device), mask.to(self.device), config,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                if real:
                    answers += [tok.decode(r[m.bool()], skip_special_tokens=True)
                                for r, m in zip(out.response_ids, out.response_mask)]
        return answers

    def truth_ratio_prompt(self, item: EncodedRecord) -> list[int]:
        """The question ids the truth ratio conditions on (:attr:`ScoreSettings.truth_ratio_question`)."""
        if self.settings.truth_ratio_question == "paraphrased" and item.para_prompt is not None:
            return item.para_prompt
        return item.prompt

    @torch.no_grad()
    def score_split(self, split: str, everything: list[EncodedRecord], *, forget_side: bool,
                    mia: MinKProbMIA | None = None, mia_label: int | None = None,
                    mias: Sequence[tuple[MinKProbMIA, int]] = ()) -> tuple[dict[str, float], Tensor | None]:
        """Every metric of one split; ``(values, truth ratios or None)``. Columns:

        ``<split>_nll`` / ``_accuracy`` / ``_prob`` (answer tokens), ``<split>_rouge`` (ROUGE-L recall of the greedy
        answer), ``<split>_truth_ratio`` (mean ratio) and ``_truth_ratio_score`` (TOFU's summary: mean min(TR, 1/TR)
        when ``forget_side``, else mean max(0, 1 - TR)) when records have perturbed answers, ``<split>_mc_accuracy``
        when they have choices. With ``mia``, each record's whole text is added with label ``mia_label``; so it
        is to every ``(metric, label)`` of ``mias``.
        """
        s, device, tok = self.settings, self.device, self.tokenizer
        values: dict[str, float] = {}
        ratios: Tensor | None = None
        fallback = everything[0]
        local = everything[self.rank :: self.world]
        with eval_mode(self.model):
            # answers: NLL, P(a|q), accuracy; the Min-K% score of the whole text from the same forward
            nll = MeanNLL().to(device)
            for chunk, real in self.batches(local, fallback):
                ids, attn, resp = _right_pad([(it.prompt, it.response) for it in chunk], tok.pad_token_id, device)
                out = token_stats(self.model, ids, attn, attn, correct=True, chunk_tokens=s.chunk_tokens)
                logps, mask, correct = out.logps, out.mask, out.correct
                answer = mask * resp
                if real:
                    nll.update(logps * answer, answer, correct)
                    pairs = [*([(mia, mia_label)] if mia is not None and mia_label is not None else []), *mias]
                    for metric, label in pairs:
                        metric.update(logps, mask, torch.full((len(chunk),), label, device=device))
            for key, value in nll.compute().items():
                values[f"{split}_{key}"] = float(value)
            # greedy answers: ROUGE-L recall
            rouge = RougeLRecall(use_stemmer=s.rouge_stemmer).to(device)
            answers = self.greedy_answers([it.prompt for it in local], fallback.prompt)
            rouge.update(answers, [it.response_text for it in local])
            values[f"{split}_rouge"] = float(rouge.compute())
            # truth ratio: the paraphrased answer against the perturbed ones, given the original question
            # (TOFU, open-unlearning) or the paraphrased one (``truth_ratio_question``)
            if any(it.perturbed for it in everything):
                with_tr = [it for it in local if it.perturbed]
                ask = self.truth_ratio_prompt
                rows = [r for it in with_tr for r in [(ask(it), it.para_response),
                                                      *((ask(it), p) for p in it.perturbed)]]
                tr_fallback = next(it for it in everything if it.perturbed)
                means = [t[1] for t in self.row_logps(rows, (ask(tr_fallback), tr_fallback.para_response))]
                ratio = TruthRatio(mean=s.truth_ratio_mean).to(device)
                pos = 0
                for it in with_tr:
                    nlls = -torch.stack(means[pos : pos + 1 + len(it.perturbed)])  # (1 + K,)
                    pos += 1 + len(it.perturbed)
                    ratio.update(nlls[:1].to(device), nlls[1:].unsqueeze(0).to(device))
                tr = ratio.compute()
                values[f"{split}_truth_ratio"] = float(tr["mean"])
                values[f"{split}_truth_ratio_score"] = float(tr["forget_score" if forget_side else "retain_score"])
                ratios = tr["ratios"].cpu()
            # multiple choice: the choice with the highest summed log-likelihood
            if any(it.choices for it in everything):
                with_mc = [it for it in local if it.choices]
                rows = [(it.prompt, c) for it in with_mc for c in it.choices]
                mc_fallback = next(it for it in everything if it.choices)
                sums = [t[0] for t in self.row_logps(rows, (mc_fallback.prompt, mc_fallback.choices[0]))]
                width = max((len(it.choices) for it in with_mc), default=1)
                scores = torch.full((len(with_mc), width), float("-inf"), dtype=torch.float64)
                pos = 0
                for i, it in enumerate(with_mc):
                    scores[i, : len(it.choices)] = torch.stack(sums[pos : pos + len(it.choices)])
                    pos += len(it.choices)
                acc = MultipleChoiceAccuracy().to(device)
                acc.update(scores.to(device), torch.tensor([it.label for it in with_mc], device=device))
                values[f"{split}_mc_accuracy"] = float(acc.compute())
        return values, ratios


def score_splits(scorer: ModelScorer, items: Mapping[str, list[EncodedRecord]], *, forget_splits: Sequence[str],
                 mia_positive: str | None = None, mia_negative: str | None = None,
                 mia_pairs: Mapping[str, tuple[str, str]] | None = None
                 ) -> tuple[dict[str, float], dict[str, Tensor]]:
    """:meth:`ModelScorer.score_split` over every non-empty split of ``items`` (in its order); ``forget_splits`` get
    the forget-side truth-ratio score. ``mia_auc``: the Min-K% Prob ROC-AUC with ``mia_positive`` records the
    members and ``mia_negative`` records the non-members (computed when both splits are scored), in the settings'
    ``mia_convention``; ``mia_pairs`` (``{column: (members split, non-members split)}``) adds more such columns
    from the same forward passes. Returns ``(values, truth ratios per split)``."""
    values: dict[str, float] = {}
    ratios: dict[str, Tensor] = {}
    has = {k for k, v in items.items() if v}
    pairs = dict(mia_pairs or {})
    if mia_positive is not None and mia_negative is not None:
        pairs = {"mia_auc": (mia_positive, mia_negative), **pairs}
    metrics = {name: MinKProbMIA(k=scorer.settings.mia_k, convention=scorer.settings.mia_convention).to(scorer.device)
               for name, (pos, neg) in pairs.items() if pos in has and neg in has}
    for split, records in items.items():
        if not records:
            continue
        mias = [(metrics[name], label) for name, (pos, neg) in pairs.items() if name in metrics
                for label, side in ((1, pos), (0, neg)) if side == split]
        row, tr = scorer.score_split(split, records, forget_side=split in forget_splits, mias=mias)
        values.update(row)
        if tr is not None:
            ratios[split] = tr
    for name, metric in metrics.items():
        values[name] = float(metric.compute())
    return values, ratios


def relearn_copy(model: nn.Module, items: list[EncodedRecord], *, steps: int, fraction: float, lr: float, seed: int,
                 batch_size: int, pad_id: int, device: torch.device | str, chunk_tokens: int | None = None) -> nn.Module:
    """The fine-tuning relearning attack: a deep copy of ``model`` trained ``steps`` AdamW steps (``lr``, no weight
    decay, every weight) on the answers' token-mean NLL of a seeded ``fraction`` of ``items`` (at least one), in
    seeded passes of ``batch_size``. Returns the copy in eval mode; ``model`` is never written."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * len(items)))
    chosen = [items[i] for i in torch.randperm(len(items), generator=generator)[:count].tolist()]
    with torch.inference_mode(False), torch.enable_grad():
        copied = copy.deepcopy(model)
        copied.requires_grad_(True)
        copied.train()
        optimizer = torch.optim.AdamW(copied.parameters(), lr=lr, weight_decay=0.0)
        order: list[EncodedRecord] = []
        for _ in range(steps):
            if len(order) < batch_size:  # a fresh seeded pass over the chosen records
                order += [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
                while len(order) < batch_size:
                    order += chosen
            chunk, order = order[:batch_size], order[batch_size:]
            ids, attn, resp = _right_pad([(it.prompt, it.response) for it in chunk], pad_id, device)
            stats = token_logps(copied, ids, attn, resp, chunk_tokens=chunk_tokens)
            loss, _ = nll_loss(stats.logps, stats.mask)  # SFT's objective: token-mean NLL of the answers
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        copied.eval()
        del optimizer
    return copied
