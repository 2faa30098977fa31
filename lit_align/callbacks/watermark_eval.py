"""End-of-training evaluation of a model-level watermark: detection, robustness, KGW, quality.

The evaluation of Xu, Yao, Liu 2024, "Learning to Watermark LLM-generated Text via Reinforcement Learning"
(arXiv 2403.10553), as its released code runs it (github.com/xiaojunxu/learning-to-watermark-llm:
``eval_utils.py``, ``evaluate.py``).

:class:`WatermarkEvaluation` runs once training ends (``on_train_end``). It takes the first
``num_batches`` batches of the DataModule's validation loader (:class:`~lit_align.data.completion.CompletionBatch`
es) and, for each prompt:

* samples a continuation with the trained actor (``WatermarkModule._generate``, the module's own
  sampling settings) and takes the human continuation (``WatermarkModule._human``: the data's text,
  or the frozen reference's samples under ``human_from_reference``);
* scores both with the trained detector (label 1 = watermarked LLM text, 0 = human text).

Rows of the table (one per condition; the *attacks touch only the watermarked text*, the human
text is the same in every row, as in the paper):

* ``clean`` -- the detector on the actor's text as generated;
* ``substitution_<r>`` -- ``round(r n)`` of the ``n`` continuation tokens replaced by random other ids
  (:func:`~lit_align.metrics.detection.random_substitution`; ``r = 0`` reproduces ``clean`` exactly);
* ``deletion_<r>`` -- the continuation decoded, that share of its words deleted
  (:func:`~lit_align.metrics.detection.word_deletion`; its leading whitespace kept), re-tokenized with
  :func:`~lit_align.data.completion.retokenize` and cut to the module's ``max_new_tokens`` (the cap
  the LLM had: no length shortcut). A text attack goes through decode + re-tokenize, which does not
  give back the sampled ids when the LLM sampled a non-canonical tokenization (common for small or
  random models): ``deletion_0`` measures that round trip alone;
* ``paraphrase`` -- the decoded continuation rewritten by ``paraphraser`` (any
  :class:`~lit_align.metrics.detection.Paraphraser`), re-tokenized the same way;
* ``kgw_clean``, ``kgw_substitution_<r>``, ``kgw_deletion_<r>``, ``kgw_paraphrase`` -- the KGW
  green-list baseline (γ = ``kgw_gamma``, δ = ``kgw_delta``) on the *same prompts*: the **original**
  model (the module's reference: LoRA switched off, or the frozen copy) samples with the green-list
  bias, and the z-score of its continuation is the detection score, against the z-score of the same
  human continuations. Under the same attacks;
* ``original``, ``human`` -- only with an ``oracle``: the perplexity of the original model's
  unwatermarked samples and of the human text, for comparison.

Columns: ``auroc``, ``tpr_at_fpr_1``, ``fpr_at_tpr_90``, ``fpr_at_tpr_99``
(:class:`~lit_align.metrics.detection.DetectionMetrics`), ``n_watermarked``, ``n_human``, and with an
``oracle`` a ``perplexity`` column (exp of the mean token NLL of prompt + continuation under the
oracle, averaged over texts) on ``clean`` (the watermarked LLM), ``kgw_clean``, ``original`` and ``human``.

Generations with fewer than two tokens are dropped with their human pair (as the module does in
training and validation) and counted in :attr:`WatermarkEvaluation.dropped`. With the same batches as
the last validation, ``clean`` equals the module's ``val/auroc`` (same sampling seeds).

Under DDP or FSDP2 each rank evaluates its share of the batches' prompts (every row is generated and
scored, so sharded models run the same forwards on every rank) and the scores are gathered, so the table
covers every rank's prompts; every random draw (KGW and original-model samples, substitutions, deletions)
comes from a generator seeded by the prompt's global index, so the table does not depend on the world size.

Outputs (rank 0): ``watermark_eval.csv`` (rows = conditions) and ``watermark_roc.png`` (ROC curves of
the detector and of KGW on clean text, if matplotlib is installed) under ``dirpath`` (default
``trainer.log_dir``); on a ``WandbLogger`` a table ``watermark_eval`` and the image ``watermark_roc``;
every number also goes to every logger as ``watermark/<row>/<column>``; :attr:`results`,
:attr:`roc` and :attr:`files` keep them in memory; a summary is printed when ``verbose``.
Everything runs under ``no_grad`` with every model in eval mode; each submodule's mode is restored.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from lit_align.callbacks.reporting import eval_mode, publish, report_dir, write_csv
from lit_align.data.batches import SequenceBatch
from lit_align.data.completion import retokenize
from lit_align.engine import derive_seed, row_generators
from lit_align.engine.distributed import all_gather_objects
from lit_align.metrics.detection import (
    DetectionMetrics,
    Paraphraser,
    perplexity,
    random_substitution,
    roc_curve_points,
    word_deletion,
)
from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer
from lit_align.padding import pad_rows
from lit_align.rollout.sampler import sample
from lit_align.watermark.kgw import KGWWatermark, watermarked_sample

__all__ = ["WatermarkEvaluation"]

#: Detection columns, in display order.
METRIC_COLUMNS = ("auroc", "tpr_at_fpr_1", "fpr_at_tpr_90", "fpr_at_tpr_99")
#: Columns shown in the printed summary.
SUMMARY_COLUMNS = (*METRIC_COLUMNS, "perplexity")

#: scorer(ids (B, T), attention (B, T), continuation mask (B, T)) -> (B,) detection scores
Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]


def _ratio_name(kind: str, ratio: float) -> str:
    return f"{kind}_{ratio:g}"


def _check_ratios(name: str, ratios: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in ratios)
    bad = [r for r in out if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"WatermarkEvaluation.{name} must be fractions in [0, 1], got {bad}")
    return tuple(dict.fromkeys(out))


def _join(prompt_ids: Tensor, prompt_mask: Tensor, cont_ids: Tensor, cont_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded prompts + right-padded continuations -> ``(ids, attention, continuation mask)``, (B, P + R) each."""
    ids = torch.cat([prompt_ids, cont_ids], dim=1)
    attention = torch.cat([prompt_mask, cont_mask], dim=1)
    return ids, attention, torch.cat([torch.zeros_like(prompt_mask), cont_mask], dim=1)


def _gathered(scores: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    """Every rank's ``{row: [scores]}``, concatenated per row in rank order (CPU tensors; the same on every rank;
    ``scores`` itself in one process)."""
    local = {row: torch.cat(values).cpu() for row, values in scores.items()}
    ranks = all_gather_objects(local)
    return {row: [torch.cat([r[row] for r in ranks])] for row in local}


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token-id lists -> right-padded ``(ids, mask)``, (B, max(1, longest)) each, on ``device``."""
    ids, mask = pad_rows(rows, pad_id, side="right", min_width=1)
    return ids.to(device), mask.to(device)


class WatermarkEvaluation(L.Callback):
    """Detection, robustness, the KGW baseline and text quality of a trained ``WatermarkModule``.

    See the module docstring for the rows, columns and outputs. Example::

        trainer:
          callbacks:
            - class_path: lit_align.callbacks.WatermarkEvaluation
              init_args:
                num_batches: 8
                paraphraser:
                  class_path: lit_align.metrics.HFParaphraser
                  init_args: {temperature: 1.5}
                oracle: {name_or_path: facebook/opt-2.7b}
    """

    def __init__(
        self,
        num_batches: int | None = 8,
        substitution_ratios: Sequence[float] = (0.05, 0.1, 0.2, 0.5),
        deletion_ratios: Sequence[float] = (0.1, 0.3),
        paraphraser: Paraphraser | None = None,
        oracle: ModelSpec | None = None,
        kgw: bool = True,
        kgw_gamma: float = 0.5,
        kgw_delta: float = 2.0,
        kgw_key: int = 15485863,
        seed: int = 0,
        plot: bool = True,
        dirpath: str | None = None,
        verbose: bool = True,
    ) -> None:
        """
        Args:
            num_batches: validation batches to evaluate (the first ones of ``val_dataloader()``); ``None``: all.
            substitution_ratios: shares of continuation tokens replaced at random, one row each (0.05-0.5
                in the paper).
            deletion_ratios: shares of continuation words deleted, one row each.
            paraphraser: rewrites the watermarked continuations (the ``paraphrase`` rows), e.g.
                ``lit_align.metrics.HFParaphraser`` or the stub ``ShuffleWordsParaphraser``; ``None``: no row.
            oracle: the LM whose perplexity measures text quality (OPT-2.7B in the paper), built with its
                own tokenizer (texts are re-tokenized when its vocabulary differs); ``None``: no perplexity.
            kgw: add the KGW green-list baseline rows.
            kgw_gamma, kgw_delta: green-list share γ and logit bias δ (the paper's baseline: 0.5, 2.0).
            kgw_key: the KGW secret key.
            seed: seed of the substitution / deletion draws and of the KGW and original-model sampling.
            plot: write ``watermark_roc.png`` (skipped with a warning without matplotlib).
            dirpath: where the CSV and the plot go; default ``trainer.log_dir`` (or ``default_root_dir``).
            verbose: print the table and where the files went (rank 0).
        """
        if num_batches is not None and num_batches <= 0:
            raise ValueError(f"WatermarkEvaluation.num_batches must be positive or null, got {num_batches}")
        if paraphraser is not None and not callable(paraphraser):
            raise TypeError(f"WatermarkEvaluation.paraphraser must be callable (texts -> texts), got {paraphraser!r}")
        self.num_batches = num_batches
        self.substitution_ratios = _check_ratios("substitution_ratios", substitution_ratios)
        self.deletion_ratios = _check_ratios("deletion_ratios", deletion_ratios)
        self.paraphraser, self.oracle = paraphraser, oracle
        KGWWatermark(1, gamma=kgw_gamma, delta=kgw_delta, key=kgw_key)  # validates the settings now
        self.kgw, self.kgw_gamma, self.kgw_delta, self.kgw_key = kgw, kgw_gamma, kgw_delta, kgw_key
        self.seed, self.plot, self.dirpath, self.verbose = seed, plot, dirpath, verbose
        self.results: dict[str, dict[str, float]] = {}
        """``{row: {column: value}}`` after the evaluation (see the module docstring)."""
        self.roc: dict[str, tuple[Tensor, Tensor]] = {}
        """``{"detector" | "kgw": (fpr, tpr)}`` ROC points on clean text (:func:`roc_curve_points`)."""
        self.files: dict[str, Path] = {}
        """Paths written (``csv``, ``png``), on rank 0."""
        self.dropped = 0
        """Prompts left out because the actor generated fewer than two tokens."""

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: the models are still on their device
        self.evaluate(trainer, pl_module)
        self._write(trainer)

    # -- evaluation -----------------------------------------------------------------------------
    def _loader(self, trainer: L.Trainer):
        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None and callable(getattr(dm, "val_dataloader", None)) else None
        if loader is None or loader == []:
            loader = trainer.val_dataloaders
        if loader is None or loader == []:
            raise ValueError("WatermarkEvaluation needs validation data (CompletionBatches from "
                             "trainer.datamodule.val_dataloader()); give the DataModule a val source or val_fraction > 0")
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        return loader

    def _generators(self, device, purpose: str, index: Tensor) -> list[torch.Generator]:
        """One generator per row, from ``seed``, what the draw is for and the row's global example ``index``
        (:func:`lit_align.engine.row_generators`): the same draws on one rank or several, in any batch."""
        return row_generators(self.seed, 0, purpose, index.tolist(), device=device)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, dict[str, float]]:
        """Run the evaluation (without writing files) and return :attr:`results`."""
        for name in ("detector", "policy", "tokenizer", "sampling", "_generate", "_human", "_keep", "_reference_args"):
            if not hasattr(pl_module, name):
                raise TypeError(f"WatermarkEvaluation needs a WatermarkModule; {type(pl_module).__name__} has no {name}")
        module, device, tok = pl_module, pl_module.device, pl_module.tokenizer
        strip = bool(getattr(trainer.datamodule, "strip_leading_whitespace", False))
        max_tokens = module.sampling.max_new_tokens
        reference, ref_context = module._reference_args()
        oracle = self._build_oracle(tok, device) if self.oracle is not None else None
        positives: dict[str, list[Tensor]] = defaultdict(list)
        negatives: dict[str, list[Tensor]] = defaultdict(list)
        ppl: dict[str, list[Tensor]] = defaultdict(list)
        self.dropped, self.results, self.roc = 0, {}, {}
        def detector_score(ids: Tensor, attn: Tensor, cont: Tensor, add_eos: Tensor | None = None) -> Tensor:
            """The detector as in training: continuations read as re-encoded text (module._detector_view)."""
            rows = SequenceBatch(ids, attn, cont, torch.arange(len(ids), device=ids.device))
            return module._detector_scores(rows, add_eos=add_eos)

        kgw_score: Scorer | None = None
        if self.kgw:
            watermark = KGWWatermark(len(tok), gamma=self.kgw_gamma, delta=self.kgw_delta, key=self.kgw_key)
            kgw_score = lambda ids, attn, cont: watermark.score(ids, attn, score_mask=cont).z  # noqa: E731
        with ExitStack() as stack:
            for model in {id(m): m for m in (module.policy, module.detector, reference)}.values():
                stack.enter_context(eval_mode(model))
            if oracle is not None:
                stack.enter_context(eval_mode(oracle[0]))
            for b, batch in enumerate(self._loader(trainer)):
                if self.num_batches is not None and b >= self.num_batches:
                    break
                # every row is generated and scored (the same forwards on every rank: sharded models need
                # that); the rows with >= 2 generated tokens, as in training, are kept
                batch = move_data_to_device(batch, device)
                rollout = module._generate(batch)
                human = module._human(batch)
                keep = module._keep(rollout)
                self.dropped += int((~keep).sum())
                prompt_ids, prompt_mask, index = batch.prompt_ids, batch.prompt_mask, batch.index
                h_ids, h_attn, h_cont = human.input_ids, human.attention_mask, human.loss_mask
                rows = (tok, strip, max_tokens, keep, index)
                negatives["detector"].append(detector_score(h_ids, h_attn, h_cont,
                                                            add_eos=module._ended_with_eos(rollout))[keep])
                self._conditions("", detector_score, prompt_ids, prompt_mask, rollout.response_ids,
                                 rollout.response_mask, positives, rows)
                if kgw_score is not None:
                    negatives["kgw"].append(kgw_score(h_ids, h_attn, h_cont)[keep])
                    with ref_context() if ref_context is not None else nullcontext():
                        marked = watermarked_sample(reference, prompt_ids, prompt_mask, module.sampling, watermark,
                                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                    generator=self._generators(device, "kgw", index))
                    self._conditions("kgw_", kgw_score, prompt_ids, prompt_mask, marked.response_ids,
                                     marked.response_mask, positives, rows)
                if oracle is not None:  # replicated on every rank: the kept rows only
                    ids, attn, _ = _join(prompt_ids[keep], prompt_mask[keep], rollout.response_ids[keep],
                                         rollout.response_mask[keep])
                    ppl["clean"].append(self._perplexity(oracle, tok, ids, attn))
                    ppl["human"].append(self._perplexity(oracle, tok, h_ids[keep], h_attn[keep]))
                    with ref_context() if ref_context is not None else nullcontext():
                        plain = sample(reference, prompt_ids, prompt_mask, module.sampling,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                       generator=self._generators(device, "original", index))
                    ppl["original"].append(self._perplexity(oracle, tok, plain.sequences[keep],
                                                            plain.attention_mask[keep]))
                    if kgw_score is not None:
                        ppl["kgw_clean"].append(self._perplexity(oracle, tok, marked.sequences[keep],
                                                                 marked.attention_mask[keep]))
        positives, negatives, ppl = (_gathered(d) for d in (positives, negatives, ppl))
        self.dropped = sum(all_gather_objects(self.dropped))
        if not positives or not len(positives["clean"][0]):
            warnings.warn(f"WatermarkEvaluation: nothing to evaluate ({self.dropped} prompts dropped for generations "
                          "under two tokens, or no validation batch)", stacklevel=2)
            return self.results
        for row, scores in positives.items():
            pos = torch.cat(scores).double().cpu()
            neg = torch.cat(negatives["kgw" if row.startswith("kgw_") else "detector"]).double().cpu()
            metric = DetectionMetrics()
            metric.update(torch.cat([pos, neg]), torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
            self.results[row] = {k: float(v) for k, v in metric.compute().items()}
            self.results[row] |= {"n_watermarked": float(len(pos)), "n_human": float(len(neg))}
            if row in ("clean", "kgw_clean"):
                fpr, tpr, _ = roc_curve_points(torch.cat([pos, neg]),
                                               torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
                self.roc["detector" if row == "clean" else "kgw"] = (fpr, tpr)
        for row, values in ppl.items():
            self.results.setdefault(row, {})["perplexity"] = float(torch.cat(values).mean())
        return self.results

    def _conditions(self, prefix: str, scorer: Scorer, prompt_ids: Tensor, prompt_mask: Tensor, cont_ids: Tensor,
                    cont_mask: Tensor, out: dict[str, list[Tensor]], rows: tuple) -> None:
        """Scores of clean and attacked continuations of one batch's kept rows, appended to ``out[prefix + row]``.
        ``rows``: ``(tokenizer, strip, max_tokens, keep (B,), global index (B,))``; every row is scored."""
        tok, strip, max_tokens, keep, index = rows
        ids, attn, cont = _join(prompt_ids, prompt_mask, cont_ids, cont_mask)
        out[f"{prefix}clean"].append(scorer(ids, attn, cont)[keep])
        for r in self.substitution_ratios:
            row = _ratio_name("substitution", r)
            attacked = torch.cat([random_substitution(i[None], c[None], r, len(tok), generator=g) for i, c, g
                                  in zip(ids, cont, self._generators(ids.device, prefix + row, index))])
            out[prefix + row].append(scorer(attacked, attn, cont)[keep])
        if not self.deletion_ratios and self.paraphraser is None:
            return
        texts = [tok.decode(r[m.bool()], skip_special_tokens=False) for r, m in zip(cont_ids, cont_mask)]

        # the attacks split on whitespace: keep each text's leading whitespace (a leading space is part
        # of the first token in byte-level BPE), so that only the attack changes the text
        leads = [t[: len(t) - len(t.lstrip())] for t in texts]

        def rescore(row: str, new_texts: list[str]) -> None:
            new_texts = [lead + t.lstrip() for lead, t in zip(leads, new_texts)]
            encoded = retokenize(new_texts, tok, max_tokens=max_tokens, strip_leading_whitespace=strip)
            new_ids, new_mask = _pad(encoded, tok.pad_token_id, ids.device)
            out[prefix + row].append(scorer(*_join(prompt_ids, prompt_mask, new_ids, new_mask))[keep])

        for r in self.deletion_ratios:
            row = _ratio_name("deletion", r)
            rngs = [random.Random(derive_seed(self.seed, 0, prefix + row, int(i))) for i in index]
            rescore(row, [word_deletion(t, r, rng) for t, rng in zip(texts, rngs)])
        if self.paraphraser is not None:
            paraphrased = list(self.paraphraser(texts))
            if len(paraphrased) != len(texts):
                raise ValueError(f"WatermarkEvaluation.paraphraser returned {len(paraphrased)} texts for {len(texts)}")
            rescore("paraphrase", paraphrased)

    # -- perplexity -----------------------------------------------------------------------------
    def _build_oracle(self, tok, device):
        oracle_tok = build_tokenizer(self.oracle, key="WatermarkEvaluation.oracle", needs_eos=False)
        model = build_causal_lm(self.oracle, oracle_tok).to(device)
        model.requires_grad_(False)
        same = oracle_tok.get_vocab() == tok.get_vocab()
        return model, (None if same else oracle_tok)

    def _perplexity(self, oracle, tok, ids: Tensor, attn: Tensor) -> Tensor:
        """(B,) perplexity of prompt + continuation under the oracle (re-tokenized if its vocabulary differs)."""
        model, oracle_tok = oracle
        if oracle_tok is not None:
            texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, attn)]
            rows = oracle_tok(texts)["input_ids"]
            ids, attn = _pad([list(r) for r in rows], oracle_tok.pad_token_id, attn.device)
        return perplexity(model, ids, attn, attn, reduction="none").cpu()

    # -- reporting ------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        """Every column of :attr:`results`: the detection metrics first, then in first-seen order."""
        seen = dict.fromkeys(k for row in self.results.values() for k in row)
        return [c for c in METRIC_COLUMNS if c in seen] + [c for c in seen if c not in METRIC_COLUMNS]

    def format_table(self, columns: Sequence[str] | None = None) -> str:
        """The results as a fixed-width text table (rows = conditions)."""
        columns = list(columns or self.columns())
        width = max([len("condition"), *map(len, self.results)])
        head = "condition".ljust(width) + "".join(f"  {c:>{max(9, len(c))}}" for c in columns)
        lines = [head, "-" * len(head)]
        for row, values in self.results.items():
            cells = [f"  {'' if values.get(c) is None else f'{values[c]:.4g}':>{max(9, len(c))}}" for c in columns]
            lines.append(row.ljust(width) + "".join(cells))
        return "\n".join(lines)

    def _write(self, trainer: L.Trainer) -> None:
        if not self.results:
            trainer.log_dir  # noqa: B018 -- a collective under distributed strategies: every rank asks once
            return
        directory = report_dir(trainer, self.dirpath)  # every rank calls it (a collective)
        if directory is None:
            return
        columns = self.columns()
        table = [[r, *(vals.get(c) for c in columns)] for r, vals in self.results.items()]
        path = write_csv(directory / "watermark_eval.csv", ["condition", *columns], table)
        self.files["csv"] = path
        if self.plot and self.roc:
            png = self._plot(directory / "watermark_roc.png")
            if png is not None:
                self.files["png"] = png
        flat = {f"watermark/{r}/{c}": v for r, vals in self.results.items() for c, v in vals.items()}
        publish(trainer, "watermark_eval", ["condition", *columns], table, metrics=flat,
                image=self.files.get("png"), image_key="watermark_roc")
        if self.verbose:
            shown = [c for c in SUMMARY_COLUMNS if c in columns]
            print(f"\nWatermark evaluation (rows = conditions; attacks on the watermarked text only):\n"
                  f"{self.format_table(shown)}")
            if self.dropped:
                print(f"Dropped {self.dropped} prompts whose generation had fewer than two tokens.")
            print(f"Full table: {path}" + (f"\nROC plot: {self.files['png']}" if "png" in self.files else ""))

    def _plot(self, path: Path) -> Path | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("WatermarkEvaluation.plot: matplotlib is not installed; no watermark_roc.png written "
                          "(pip install matplotlib, or set plot: false)", stacklevel=2)
            return None
        fig = Figure(figsize=(4.8, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        labels = {"detector": ("clean", "learned detector"), "kgw": ("kgw_clean", "KGW z-score")}
        for name, (fpr, tpr) in self.roc.items():
            row, label = labels[name]
            ax.plot(fpr.numpy(), tpr.numpy(),  # straight segments: the area is the AUROC (ties count 1/2)
                    label=f"{label} (AUROC {self.results[row]['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false-positive rate (human text flagged)")
        ax.set_ylabel("true-positive rate (watermarked text found)")
        ax.set_title("Watermark detection ROC")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path
