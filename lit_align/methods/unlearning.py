"""LLM unlearning: a forget term, a retain term and a mismatch term, composed from YAML."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lit_align.data.batches import ForgetRetainBatch, SequenceBatch
from lit_align.errors import ConfigError
from lit_align.losses.unlearning import GradientAscent, UnlearningTerm
from lit_align.methods.base import ReferencedPolicyModule
from lit_align.models import ModelSpec
from lit_align.rollout.logps import TokenStats, token_kl, token_stats

__all__ = ["UnlearningModule"]

log = logging.getLogger(__name__)

#: Batch parts whose rows are keyed by the forget example's index (what precomputed tables can hold;
#: refusal rows are drawn per stream position, so they are scored on the fly).
_FORGET_KEYED = ("forget",)


def _split_rows(stats: TokenStats, sizes: list[int]) -> list[TokenStats]:
    """Cut a :class:`TokenStats` of concatenated batches back into one per batch (rows in order)."""
    out, start = [], 0
    for n in sizes:
        fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
        out.append(type(stats)(**{k: v[start:start + n] if isinstance(v, Tensor) else v for k, v in fields.items()}))
        start += n
    return out


def _nll(stats: TokenStats) -> Tensor:
    """Token-mean NLL of the scored tokens (detached)."""
    return (-(stats.logps * stats.mask).sum() / stats.mask.sum().clamp(min=1)).detach()


class UnlearningModule(ReferencedPolicyModule):
    """Unlearning by fine-tuning: push the forget set's answers away, keep the retain set.

    Objective (minimised)::

        forget_weight * forget(batch.<forget.target>)
          + retain_weight * retain(batch.retain)
          + mismatch_weight * mismatch(batch.mismatch)

    where each term (``forget_loss``, ``retain_loss``, ``mismatch_loss``) is an :class:`~lit_align.losses.UnlearningTerm` chosen in YAML, so the
    published methods are configurations of this one class (``configs/unlearning/*``):

    ==========  ==========================================  ================================
    method      forget / mismatch                           retain
    ==========  ==========================================  ================================
    GA          ``GradientAscent``                          none
    GradDiff    ``GradientAscent``                          ``RetainNLL``
    NPO         ``NPO`` (beta 0.1)                          none, ``RetainNLL`` or ``RetainKL``
    LLMU        ``GradientAscent`` x0.5, ``MismatchNLL`` x1   ``RetainKL`` x1 (normal data)
    UGradSL     ``LabelSmoothedAscent`` x(1-p)              ``RetainNLL`` x p
    PO          ``Refusal`` (NLL of a refusal answer)       ``RetainNLL``
    ==========  ==========================================  ================================

    WAGLE (and the other weight-selection baselines) is the :class:`~lit_align.callbacks.WeightMask`
    callback on top of any of these.

    Models: the policy (full weights or LoRA); a reference when a term needs one (NPO's reference
    log-probs, the retain KL): ``reference: auto`` picks ``precomputed`` when only sequence
    log-probs of forget rows are needed (no second model: they are computed once, before the
    first step), else ``adapter`` with LoRA or a frozen ``copy``.
    Batch: :class:`~lit_align.data.ForgetRetainBatch` from
    :class:`~lit_align.data.ForgetRetainDataModule`. All parts scored by token statistics run in
    one forward; KL terms run the policy and the reference on their part. With several ranks a
    token-mean term is the token mean of the global batch (N ranks train like one process).
    Logged: ``<stage>/loss``; ``<stage>/forget_loss`` (``retain_loss``, ``mismatch_loss``) and each
    term's metrics under ``<stage>/forget_loss/...``; ``<stage>/<part>/nll``, the token-mean NLL of
    the answers of every batch part scored (``val/forget/nll`` and ``val/retain/nll`` always: the
    true forget answers, whatever the forget term reads); ``train/tokens_per_sec``.

    Stopping (LLMU's intended rule; its reference code's check never fires because it compares
    the negated loss): with ``stop_forget_nll`` the run stops once the forget NLL of a training
    batch (mean over ranks) exceeds it, after ``stop_extra_steps_factor`` times as many further
    steps as it took to get there (the paper keeps going 3-5x longer).

    Run: ``lit-align fit --config configs/unlearning/npo/tiny.yaml``.
    """

    def __init__(
        self,
        model: ModelSpec,
        forget_loss: UnlearningTerm | None = None,
        retain_loss: UnlearningTerm | None = None,
        mismatch_loss: UnlearningTerm | None = None,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        mismatch_weight: float = 1.0,
        reference: Literal["auto", "precomputed", "adapter", "copy"] = "auto",
        reference_cache_dir: str | None = None,
        stop_forget_nll: float | None = None,
        stop_extra_steps_factor: float = 0.0,
        token_mean: Literal["global", "rank"] = "global",
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            model: the model to unlearn from (hub id, local directory, ``builtin:`` name; LoRA; dtype).
            forget_loss: the forget term; default ``GradientAscent()``.
            retain_loss: the retain term (``RetainNLL``, ``RetainKL``) or ``None``.
            mismatch_loss: LLMU's random-answer term (``MismatchNLL``) or ``None``.
            forget_weight, retain_weight, mismatch_weight: the terms' weights (LLMU: 0.5, 1, 1).
            reference: ``auto``, ``precomputed``, ``adapter`` or ``copy`` (see the class docstring).
            reference_cache_dir: where precomputed reference log-probs are cached.
            stop_forget_nll: stop once the training forget NLL exceeds this (nats per token); ``None``: never.
            stop_extra_steps_factor: after crossing ``stop_forget_nll`` at step s, run ``factor * s`` more steps.
            token_mean: with several ranks, a token-mean term is the mean over the ``global`` batch's tokens
                (N ranks train exactly like one process with N times the batch) or each ``rank``'s own mean,
                averaged over ranks (one sequence per rank then reproduces a reference trained with batch 1
                and gradient accumulation, which averages per-sequence means).
            optimizer: optimiser factory over the trainable parameters; default AdamW(lr=1e-5).
            scheduler: LR scheduler factory (stepped every optimiser step); default none.
            chunk_tokens: rows per LM-head chunk in log-prob computation (memory only; default auto).
        """
        forget = forget_loss if forget_loss is not None else GradientAscent()
        terms = [(n, t, w) for n, t, w in (("forget", forget, forget_weight), ("retain", retain_loss, retain_weight),
                                           ("mismatch", mismatch_loss, mismatch_weight)) if t is not None]
        for name, _, weight in terms:
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"model.{name}_weight must be a finite non-negative number, got {weight}")
        needs_kl = any(t.needs_kl for _, t, _ in terms)
        needs_logps = [t for _, t, _ in terms if t.needs_reference_logps]
        if reference == "auto":
            reference = ("adapter" if model.lora is not None else "copy") if needs_kl else "precomputed"
        if needs_kl and reference == "precomputed" and model.lora is None:
            raise ValueError("a KL term needs the reference distribution at every token, which precomputed "
                             "log-probs do not keep: set model.reference to copy (or adapter with model.lora)")
        if reference == "precomputed" and any(t.target not in _FORGET_KEYED for t in needs_logps):
            raise ValueError("reference: precomputed keeps log-probs of forget rows only; a term reading "
                             f"{[t.target for t in needs_logps]} needs reference: copy or adapter")
        super().__init__(model, reference=reference, reference_cache_dir=reference_cache_dir, optimizer=optimizer,
                         scheduler=scheduler, chunk_tokens=chunk_tokens)
        if stop_extra_steps_factor < 0:
            raise ConfigError(f"model.stop_extra_steps_factor must be >= 0, got {stop_extra_steps_factor}")
        if stop_forget_nll is not None and not math.isfinite(stop_forget_nll):
            raise ConfigError(f"model.stop_forget_nll must be a finite number of nats (or null), got {stop_forget_nll}")
        if token_mean not in ("global", "rank"):
            raise ConfigError(f"model.token_mean must be 'global' or 'rank', got {token_mean!r}")
        self.token_mean = token_mean
        self.forget_term, self.retain_term, self.mismatch_term = forget, retain_loss, mismatch_loss
        self.terms = terms
        self._needs_reference = needs_kl or bool(needs_logps)
        #: precomputed table columns: the distinct forget-keyed parts whose reference log-probs a term reads
        self._reference_targets = list(dict.fromkeys(t.target for t in needs_logps))
        self.stop_forget_nll, self.stop_extra_steps_factor = stop_forget_nll, stop_extra_steps_factor
        self._crossed_at: int | None = None  # step at which the forget NLL first exceeded stop_forget_nll

    # -- reference -----------------------------------------------------------------------------
    def _attach_base(self, base: torch.nn.Module, weights: torch.nn.Module | None) -> None:
        if self._needs_reference:  # GA, GradDiff, PO, UGradSL: no reference at all (nothing hashed or copied)
            super()._attach_base(base, weights)

    def _reference_sequences(self, batch: ForgetRetainBatch) -> list[SequenceBatch]:
        return [self._part(batch, target, "reference") for target in self._reference_targets]

    def _precompute_reference(self) -> None:
        self._check_data()
        if self._needs_reference and self._reference_targets:
            super()._precompute_reference()

    #: batch part -> (DataModule flag that says it is there, the data key that provides it)
    _PROVIDERS = {"retain": ("has_retain", "data.retain"), "mismatch": ("has_mismatch_pool", "data.mismatch_pool"),
                  "refusal": ("has_refusals", "data.refusals")}

    def _check_data(self) -> None:
        """Fail before the first step when a term reads a batch part the DataModule will not provide."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        for name, term, _ in self.terms:
            flag, key = self._PROVIDERS.get(term.target, (None, None))
            if flag is not None and dm is not None and getattr(dm, flag, True) is False:
                raise ConfigError(f"model.{name}_loss ({term!r}) reads batch.{term.target}, but the DataModule has "
                                 f"none: set {key} (or drop model.{name}_loss)")

    def _reference_logps(self, part: SequenceBatch, term: UnlearningTerm, split: str) -> Tensor:
        reduction = term.reduction
        if self.reference.mode == "precomputed":
            column = self._reference_targets.index(term.target)
            return self.reference.lookup(split, part.index, column, reduction)
        ref = self.reference.token_logps(self.policy, part)
        return ref.sum() if reduction == "sum" else ref.mean()

    def _kl(self, part: SequenceBatch):
        if self.reference.copy is not None:
            model, context = self.reference.copy, None
        else:  # adapter mode (or precomputed with LoRA): the policy with its adapters switched off
            model, context = self.policy, lambda: self.policy.disable_adapter()
        return token_kl(self.policy, model, part.input_ids, part.attention_mask, part.loss_mask,
                        reference_context=context, chunk_tokens=self.chunk_tokens)

    # -- objective -----------------------------------------------------------------------------
    @staticmethod
    def _part(batch: ForgetRetainBatch, target: str, name: str) -> SequenceBatch:
        part = getattr(batch, target, None)
        if part is None:
            raise ValueError(f"the {name} term reads batch.{target}, which the DataModule does not provide: "
                             f"give {UnlearningModule._PROVIDERS.get(target, (None, 'data.' + target))[1]} (or drop the term)")
        return part

    @staticmethod
    def _positions(part: SequenceBatch, term: UnlearningTerm | None) -> SequenceBatch:
        """The part as the term scores it: answer tokens (``loss_mask``), or every real token."""
        if term is None or term.positions == "response":
            return part
        return dataclasses.replace(part, loss_mask=part.attention_mask)

    def _objective(self, batch: ForgetRetainBatch, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        split = self.reference_split(stage)
        # every (part, positions) read through token statistics goes through the policy in one forward
        views = {(t.target, t.positions): t for _, t, _ in self.terms if not t.needs_kl}
        if stage != "train" or self.stop_forget_nll is not None:  # forget/retain NLL, whatever the terms
            views.setdefault(("forget", "response"), None)
            if batch.retain is not None:
                views.setdefault(("retain", "response"), None)
        parts = {key: self._positions(self._part(batch, key[0], key[0]), term) for key, term in views.items()}
        stats: dict[tuple[str, str], TokenStats] = {}
        if parts:
            both = SequenceBatch.cat(list(parts.values()), self.tokenizer.pad_token_id)
            mean_logps = any(t.needs_mean_logps for _, t, _ in self.terms)
            out = token_stats(self.policy, both.input_ids, both.attention_mask, both.loss_mask,
                              mean_logps=mean_logps, chunk_tokens=self.chunk_tokens)
            stats = dict(zip(parts, _split_rows(out, [len(p) for p in parts.values()])))

        total = torch.zeros((), device=self.device)
        metrics = {f"{target}/nll": _nll(s) for (target, positions), s in stats.items() if positions == "response"}
        for name, term, weight in self.terms:
            part = self._positions(self._part(batch, term.target, name), term)
            kl = self._kl(part) if term.needs_kl else None
            ref = self._reference_logps(part, term, split) if term.needs_reference_logps else None
            scored = stats.get((term.target, term.positions))
            loss, term_metrics = term(scored, ref_logps=ref, kl=kl)
            metrics[f"{name}_loss"] = loss.detach()  # keys follow the config: forget_loss, retain_loss, ...
            metrics.update({f"{name}_loss/{k}": v for k, v in term_metrics.items()})
            if (stage == "train" and self.token_mean == "global" and self.trainer.world_size > 1
                    and getattr(term, "reduction", None) == "token"):
                loss = loss * self._global_token_factor((kl if kl is not None else scored).mask)
            total = total + weight * loss
        return total, metrics

    def _global_token_factor(self, mask: Tensor) -> Tensor:
        """``local tokens * ranks / global tokens``: turns this rank's token mean into its share of the
        global batch's token mean, so averaging gradients over ranks equals one process with the
        whole batch (as SFT does; a rank's own mean would weigh its tokens by its batch's length)."""
        local = mask.sum().detach()
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return local * self.trainer.world_size / total.clamp(min=1)

    def _step(self, batch: ForgetRetainBatch, stage: str) -> Tensor:
        loss, metrics = self._objective(batch, stage)
        self.log_stage(stage, loss, metrics, len(batch), prog_bar="forget/nll")
        if stage == "train" and self.stop_forget_nll is not None:
            self._check_stop(metrics["forget/nll"])
        return loss

    def _check_stop(self, forget_nll: Tensor) -> None:
        step = self.global_step
        if self._crossed_at is None:
            mean_nll = self.trainer.strategy.reduce(forget_nll, reduce_op="mean")  # same decision on every rank
            if float(mean_nll) > self.stop_forget_nll:
                self._crossed_at = max(step, 1)
                log.info("forget NLL %.2f > %.2f at step %d", float(mean_nll), self.stop_forget_nll, step)
        if self._crossed_at is not None and step >= self._crossed_at * (1 + self.stop_extra_steps_factor):
            self.trainer.should_stop = True

    def training_step(self, batch: ForgetRetainBatch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._log_throughput(batch.num_tokens)
        return loss

    def validation_step(self, batch: ForgetRetainBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: ForgetRetainBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: ForgetRetainBatch, batch_idx: int) -> list[dict[str, str]]:
        return super().predict_step(batch.forget, batch_idx)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["unlearning"] = {"crossed_at": self._crossed_at}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._crossed_at = checkpoint.get("unlearning", {}).get("crossed_at")
