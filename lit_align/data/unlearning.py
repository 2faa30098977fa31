"""Unlearning data: a forget set, an optional retain set, and the rows paired with each forget example.

:class:`ForgetRetainDataModule` yields :class:`~lit_align.data.batches.ForgetRetainBatch` es. One training
epoch is one pass over the FORGET set (shuffled, seeded, sharded over data-parallel ranks). Every other
part of a batch is chosen deterministically from ``(seed, stream position)``, where the stream position
of a forget sample is ``epoch * padded_epoch_size + position in the epoch's permutation``; so two ranks
with batch ``b`` see exactly what one process with batch ``2b`` sees, and a resumed run (the loader's
``state_dict``, as in the other DataModules) continues with the very same pairs:

* ``retain``: ``retain_per_forget`` retain examples per forget example; ``retain_sampling: cycle`` walks a
  shuffled pass over the retain set, continued across forget epochs (a fresh shuffle per pass), so every
  retain example is used before any repeats; ``random`` draws uniformly (WAGLE's pairing).
* ``mismatch`` (LLMU): the forget prompt with ``num_mismatch`` answers drawn from the mismatch pool.
* ``refusal`` (PO): the forget prompt with one refusal drawn from ``refusals``.

Records have a ``prompt`` and a ``response``; corpus-style sources (a ``text`` column mapped to
``response`` and no ``prompt``) have an empty prompt, and their whole text is scored. Evaluation records
may add ``paraphrased_prompt``, ``paraphrased_response``, ``perturbed_responses`` (list), ``choices``
(list) and ``label`` (int: the index of the right choice; ``response`` then defaults to that choice).

Presets for public benchmarks: :class:`TOFUDataModule`, :class:`WMDPDataModule`, :class:`MUSEDataModule`,
:class:`PKUSafeRLHFDataModule`. Each reads hub ids by default; their ``path`` arguments also take a local
directory holding ``<subset>.jsonl`` (or ``.json``/``.parquet``/``.csv``) or ``<subset>/<split>.jsonl`` files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.batches import ForgetRetainBatch, SequenceBatch
from lit_align.data.records import BUILTIN_DIR, DataSource, Record, describe_record, load_records, read_rows
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler
from lit_align.data.tokenize import (
    SequenceCollator,
    SequenceExample,
    TokenizedDataset,
    check_response_room,
    prompt_response_batch,
    truncate_keep_response,
    warn_truncated,
)
from lit_align.data.tokenize import encode_prompt as _encode_prompt
from lit_align.data.tokenize import encode_response as _encode_response
from lit_align.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_REFUSALS",
    "check_eval_record",
    "ForgetRetainCollator",
    "ForgetRetainDataModule",
    "ForgetRetainDataset",
    "MUSEDataModule",
    "PKUSafeRLHFDataModule",
    "StreamSampler",
    "TOFUDataModule",
    "WMDPDataModule",
    "WeightedBatches",
]

log = logging.getLogger(__name__)

#: Polite refusals for the PO forget target (one per line of ``builtin/refusals.txt``).
DEFAULT_REFUSALS: tuple[str, ...] = tuple(
    line.strip() for line in (BUILTIN_DIR / "refusals.txt").read_text(encoding="utf-8").splitlines() if line.strip()
)

# Stream tags: independent random streams from one seed.
_RETAIN, _MISMATCH, _REFUSAL, _ATTR_RETAIN, _ATTR_REFUSAL = range(1, 6)

EVAL_TEXT_FIELDS = ("prompt", "response", "paraphrased_prompt", "paraphrased_response")
EVAL_EXTRA_FIELDS = ("perturbed_responses", "choices", "label")


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key`` (platform- and process-independent)."""
    return np.random.default_rng([seed % 2**63, *key])


def _as_list(sources: DataSource | Sequence[DataSource] | None) -> list[DataSource]:
    if sources is None:
        return []
    return [sources] if isinstance(sources, DataSource) else list(sources)


def _text_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------------------ sampling and datasets


class StreamSampler(ShardedSampler):
    """A :class:`ShardedSampler` yielding ``(stream_position, forget_index)`` keys.

    ``stream_position = epoch * total_size + position`` numbers the samples of every epoch's padded
    permutation (the same on every rank count only when ``len(dataset)`` divides evenly), so the dataset
    can pick paired rows from ``(seed, stream_position)`` alone. Resumes like its parent.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._epoch_order()
        base = self.epoch * self.total_size
        mine = [(base + p, order[p]) for p in range(self.rank, self.total_size, self.num_replicas)]
        return iter(mine[self._skip():])


@dataclass
class _Item:
    forget: SequenceExample
    retain: list[SequenceExample]
    mismatch: list[SequenceExample]
    refusal: SequenceExample | None


class ForgetRetainDataset(Dataset):
    """Forget examples with their paired rows; ``dataset[(stream_position, i)]`` (or ``dataset[i]``,
    stream position ``i``) is forget example ``i`` with the retain / mismatch / refusal rows of that position.

    Args:
        forget: tokenized forget examples.
        retain: tokenized retain examples, or ``None``.
        pool: tokenized mismatch answers (EOS included), or ``None``.
        refusals: tokenized refusal answers (EOS included), or ``None``.
        retain_sampling: ``cycle``, ``random``, or ``spread`` (validation: forget ``i`` takes retain
            ``i * n_r // n_f``, an even, fixed spread over the retain set; cycled when it is smaller).
    """

    def __init__(self, forget: TokenizedDataset, retain: TokenizedDataset | None = None, *,
                 pool: list[list[int]] | None = None, refusals: list[list[int]] | None = None,
                 num_mismatch: int = 5, retain_sampling: str = "cycle", retain_per_forget: int = 1,
                 seed: int = 0, pad_in_loss_to: int | None = None) -> None:
        self.forget, self.retain, self.pool, self.refusals = forget, retain, pool or None, refusals or None
        self.pad_in_loss_to = pad_in_loss_to  # the WMDP quirk: collated rows padded to this width, pads scored
        self.num_mismatch, self.retain_sampling, self.retain_per_forget = num_mismatch, retain_sampling, retain_per_forget
        self.seed = seed
        self.max_length = forget.max_length
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.forget)

    @property
    def truncated(self) -> int:
        """Forget and retain examples cut to ``max_length``."""
        return self.forget.truncated + (self.retain.truncated if self.retain is not None else 0)

    def fingerprint(self) -> str:
        """sha256 over every part and pairing setting (keys precomputed reference tables)."""
        h = hashlib.sha256(self.forget.fingerprint().encode())
        if self.retain is not None:
            h.update(f"|retain:{self.retain.fingerprint()}|{self.retain_sampling}|{self.retain_per_forget}".encode())
        for name, rows in (("pool", self.pool), ("refusals", self.refusals)):
            if rows is not None:
                h.update(f"|{name}:".encode())
                for r in rows:
                    h.update(torch.tensor(r, dtype=torch.int64).numpy().tobytes() + b",")
        h.update(f"|k={self.num_mismatch}|seed={self.seed}|pad_in_loss_to={self.pad_in_loss_to}".encode())
        return h.hexdigest()

    def _cycle_perm(self, n_pass: int) -> np.ndarray:
        if n_pass not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[n_pass] = _rng(self.seed, _RETAIN, n_pass).permutation(len(self.retain))
        return self._perms[n_pass]

    def retain_indices(self, stream: int, forget_index: int) -> list[int]:
        """Retain example indices paired with the sample at ``stream`` (forget example ``forget_index``)."""
        n, r = len(self.retain), self.retain_per_forget
        if self.retain_sampling == "cycle":
            ks = [stream * r + j for j in range(r)]
            return [int(self._cycle_perm(k // n)[k % n]) for k in ks]
        if self.retain_sampling == "random":
            return _rng(self.seed, _RETAIN, stream).integers(0, n, size=r).tolist()
        # spread (validation): a fixed, even pick
        nf = len(self.forget)
        return [((forget_index * r + j) * n // (nf * r)) if n >= nf * r else (forget_index * r + j) % n
                for j in range(r)]

    def _row(self, prompt: list[int], answer: list[int], index: int) -> SequenceExample:
        p, a, _ = truncate_keep_response(prompt, answer, self.max_length)
        return SequenceExample(p, a, index)

    def __getitem__(self, key: int | tuple[int, int]) -> _Item:
        stream, i = (key, key) if isinstance(key, int) else key
        f = self.forget[i]
        retain = [self.retain[j] for j in self.retain_indices(stream, i)] if self.retain is not None else []
        mismatch = []
        if self.pool is not None:
            rng = _rng(self.seed, _MISMATCH, stream)
            picks = rng.choice(len(self.pool), size=self.num_mismatch, replace=self.num_mismatch > len(self.pool))
            mismatch = [self._row(f.prompt, self.pool[int(k)], f.index) for k in picks]
        refusal = None
        if self.refusals is not None:
            k = int(_rng(self.seed, _REFUSAL, stream).integers(len(self.refusals)))
            refusal = self._row(f.prompt, self.refusals[k], f.index)
        return _Item(f, retain, mismatch, refusal)


def pad_in_loss(b: SequenceBatch, width: int, pad_token_id: int) -> SequenceBatch:
    """WAGLE's WMDP quirk: pad rows to ``width`` and score the pad positions too (its labels are the
    input ids, pads included). lit_align never scores a position outside the attention mask, so the
    pads are marked real tokens here: the loss on real tokens is unchanged (they come first, the
    attention is causal); the pad positions' hidden states also see the earlier pads, which the
    reference's attention mask hides (a small difference in the quirk's own extra terms)."""
    extra = width - b.input_ids.shape[1]
    if extra < 0:
        return b
    pad = torch.nn.functional.pad
    ids = pad(b.input_ids, (0, extra), value=pad_token_id)
    real = pad(b.attention_mask, (0, extra), value=0).bool()
    loss = torch.where(real, pad(b.loss_mask, (0, extra), value=0), 1)  # every pad position is scored
    return SequenceBatch(ids, torch.ones_like(loss), loss, b.index)  # ... so it must count as a real token


@dataclass
class ForgetRetainCollator:
    """Right-pads :class:`_Item` s into a :class:`ForgetRetainBatch`.

    ``pad_in_loss_to`` (reference quirk of WAGLE's WMDP code, off by default): the forget and
    retain rows go through :func:`pad_in_loss`.
    """

    pad_token_id: int
    pad_in_loss_to: int | None = None

    def _pad_in_loss(self, b: SequenceBatch) -> SequenceBatch:
        return pad_in_loss(b, self.pad_in_loss_to, self.pad_token_id)

    def _collate(self, rows: list[SequenceExample]) -> SequenceBatch | None:
        if not rows:
            return None
        return prompt_response_batch([(r.prompt, r.response) for r in rows], [r.index for r in rows], self.pad_token_id)

    def __call__(self, items: list[_Item]) -> ForgetRetainBatch:
        forget = self._collate([it.forget for it in items])
        retain = self._collate([r for it in items for r in it.retain])
        if self.pad_in_loss_to is not None:
            forget = self._pad_in_loss(forget)
            retain = self._pad_in_loss(retain) if retain is not None else None
        mismatch = self._collate([m for it in items for m in it.mismatch])
        refusal = self._collate([it.refusal for it in items if it.refusal is not None])
        return ForgetRetainBatch(forget=forget, retain=retain, mismatch=mismatch, refusal=refusal, index=forget.index)


class WeightedBatches:
    """Re-iterable ``(SequenceBatch, weights (B,) float)`` batches over a fixed list of rows."""

    def __init__(self, rows: list[SequenceExample], weights: list[float], batch_size: int, pad_token_id: int,
                 pad_in_loss_to: int | None = None) -> None:
        self.rows, self.weights, self.batch_size = rows, weights, batch_size
        self.collate = SequenceCollator(pad_token_id)
        self.pad_token_id, self.pad_in_loss_to = pad_token_id, pad_in_loss_to

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[SequenceBatch, torch.Tensor]]:
        for s in range(0, len(self.rows), self.batch_size):
            batch = self.collate(self.rows[s : s + self.batch_size])
            if self.pad_in_loss_to is not None:
                batch = pad_in_loss(batch, self.pad_in_loss_to, self.pad_token_id)
            yield batch, torch.tensor(self.weights[s : s + self.batch_size], dtype=torch.float32)


# ------------------------------------------------------------------------------ the DataModule


class ForgetRetainDataModule(L.LightningDataModule):
    """Forget / retain data for unlearning, yielding :class:`ForgetRetainBatch` es.

    Example (the tiny TOFU-like built-in set)::

        data:
          class_path: lit_align.data.ForgetRetainDataModule
          init_args:
            forget: {path: builtin:fictitious_facts/forget10, fields: {prompt: question, response: answer}}
            retain: {path: builtin:fictitious_facts/retain90, fields: {prompt: question, response: answer}}
            batch_size: 4

    Attributes set by :meth:`setup`: ``forget_dataset``, ``retain_dataset`` (``TokenizedDataset`` s of
    ``SequenceExample`` whose ``index`` is the position in the set), ``val_forget_dataset``,
    ``val_retain_dataset`` (the evaluation sets, or the same objects when no eval source is given).

    Reference log-probs (``ReferencePolicy.precompute``): :meth:`split_loaders` yields batches whose
    ``forget`` part is to be scored, so pass ``sequences=lambda batch: [batch.forget]`` and look tables up
    with ``split_of(stage)`` and ``batch.index`` (the forget index).
    """

    def __init__(
        self,
        forget: DataSource | list[DataSource] | None = None,
        retain: DataSource | list[DataSource] | None = None,
        mismatch_pool: DataSource | list[DataSource] | None = None,
        refusals: list[str] | None = None,
        num_mismatch: int = 5,
        retain_sampling: Literal["cycle", "random"] = "cycle",
        retain_per_forget: int = 1,
        eval_forget: DataSource | list[DataSource] | None = None,
        eval_retain: DataSource | list[DataSource] | None = None,
        eval_holdout: DataSource | list[DataSource] | None = None,
        validate: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        chat_template: bool | None = None,
        prompt_template: str | None = None,
        response_template: str | None = None,
        pad_in_loss: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            forget: the examples to unlearn (one source or several, concatenated); required (presets fill it).
            retain: examples whose behaviour must be kept; ``None`` for forget-only methods (GA, NPO).
            mismatch_pool: answers (field ``response``) for LLMU's random-mismatch term; ``None`` disables it.
            refusals: refusal answers for PO; ``None`` uses the built-in list (``DEFAULT_REFUSALS``),
                ``[]`` disables the refusal rows.
            num_mismatch: pool answers per forget example (LLMU's K).
            retain_sampling: ``cycle`` (a shuffled pass over the retain set, continued across forget
                epochs) or ``random`` (uniform seeded draws, WAGLE's pairing).
            retain_per_forget: retain examples per forget example.
            eval_forget / eval_retain: evaluation records (default: the forget / retain sets).
            eval_holdout: never-trained-on records (e.g. for membership inference); optional.
            validate: run validation (forget and retain NLL over the evaluation sets).
            batch_size: forget examples per step on each data-parallel rank.
            eval_batch_size: forget examples per validation step (default ``batch_size``).
            max_length: longest prompt + response in tokens (prompts cut from the left first).
            chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when present.
            prompt_template: ``str.format`` template over ``{prompt}`` applied to non-empty prompts before
                tokenization, e.g. ``"### Question: {prompt}\\n ### Answer:"`` (LLMU).
            response_template: template over ``{response}`` applied to every answer, e.g. ``" {response}"``.
            pad_in_loss: reference quirk (WAGLE's WMDP code): pad forget and retain rows to ``max_length``
                and score the pad tokens too. Off by default; only for reproducing reference numbers.
            seed: seed of the shuffling and of every pairing.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when used without a lit_align module.
        """
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if retain_sampling not in ("cycle", "random"):
            raise ConfigError(f"data.retain_sampling must be 'cycle' or 'random', got {retain_sampling!r}")
        if retain_per_forget < 1:
            raise ConfigError(f"data.retain_per_forget must be at least 1, got {retain_per_forget}")
        if num_mismatch < 1:
            raise ConfigError(f"data.num_mismatch must be at least 1, got {num_mismatch}")
        for name, tpl, key in (("prompt_template", prompt_template, "prompt"),
                               ("response_template", response_template, "response")):
            if tpl is not None and "{" + key + "}" not in tpl:
                raise ConfigError(f"data.{name} must contain {{{key}}}, got {tpl!r}")
        self.save_hyperparameters()
        self.sources: dict[str, list[DataSource]] = {
            "forget": _as_list(forget), "retain": _as_list(retain), "mismatch_pool": _as_list(mismatch_pool),
            "eval_forget": _as_list(eval_forget), "eval_retain": _as_list(eval_retain),
            "eval_holdout": _as_list(eval_holdout),
        }
        if not self.sources["forget"]:
            raise ConfigError("data.forget is required: give the source of the examples to unlearn")
        self.refusals = list(DEFAULT_REFUSALS if refusals is None else refusals)
        self.num_mismatch, self.retain_sampling, self.retain_per_forget = num_mismatch, retain_sampling, retain_per_forget
        self.validate = validate
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.chat_template = max_length, chat_template
        self.prompt_template, self.response_template = prompt_template, response_template
        self.pad_in_loss, self.seed, self.num_workers = pad_in_loss, seed, num_workers
        self.tokenizer_name = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._chat = False
        self._records: dict[str, list[Record]] = {}
        self.forget_dataset: TokenizedDataset | None = None
        self.retain_dataset: TokenizedDataset | None = None
        self.val_forget_dataset: TokenizedDataset | None = None
        self.val_retain_dataset: TokenizedDataset | None = None
        self._pool: list[list[int]] | None = None
        self._refusal_ids: list[list[int]] | None = None
        self._train_loader: ResumableDataLoader | None = None

    # the tokenizer and rank plumbing of the other DataModules
    _resolve_tokenizer = TokenizedDataModule._resolve_tokenizer
    missing_pad_token = TokenizedDataModule.missing_pad_token
    _shard = TokenizedDataModule._shard
    on_after_batch_transfer = TokenizedDataModule.on_after_batch_transfer

    # -- flags ---------------------------------------------------------------------------------
    @property
    def has_retain(self) -> bool:
        """Whether batches carry a ``retain`` part."""
        return bool(self.sources["retain"])

    @property
    def has_mismatch_pool(self) -> bool:
        """Whether batches carry a ``mismatch`` part (LLMU's random-answer term needs it)."""
        return bool(self.sources["mismatch_pool"])

    @property
    def has_refusals(self) -> bool:
        """Whether batches carry a ``refusal`` part (PO needs it)."""
        return bool(self.refusals)

    # -- records -------------------------------------------------------------------------------
    def _load_records(self, role: str, source: DataSource) -> list[Record]:
        """Normalized records of one source of ``role`` (``forget``, ``retain``, ``mismatch_pool``,
        ``eval_forget``, ``eval_retain``, ``eval_holdout``). Presets override this for derived layouts."""
        if role == "mismatch_pool":
            return load_records(source, ("response",))
        if role.startswith("eval_"):
            return self._eval_records_of(source, role)
        records = load_records(source, ("response",), ("prompt",))
        return self._check_prompts(records, source, role)

    @staticmethod
    def _check_prompts(records: list[Record], source: DataSource, role: str) -> list[Record]:
        """Fill the empty prompt of corpus-style sources; refuse a source where only some records have one."""
        have = sum("prompt" in r for r in records)
        if 0 < have < len(records):
            missing = next(r["_source_index"] for r in records if "prompt" not in r)
            raise DataError(f"data.{role}: {describe_record(source.path, missing)} has no 'prompt' while {have} "
                            "others do; give every record a prompt, or none (plain-text corpus, response = text)")
        if have == 0:
            log.info("data.%s (%s): no 'prompt' field, records are plain text (the whole text is scored)",
                     role, source.path)
        for r in records:
            r.setdefault("prompt", "")
        return records

    def _eval_records_of(self, source: DataSource, role: str) -> list[Record]:
        records = load_records(source, (), EVAL_TEXT_FIELDS, EVAL_EXTRA_FIELDS)
        for r in records:
            where = f"data.{role}: {describe_record(source.path, r['_source_index'])}"
            if "choices" in r or "label" in r:
                choices, label = r.get("choices"), r.get("label")
                if not (isinstance(choices, list) and choices and isinstance(label, int)
                        and 0 <= label < len(choices)):
                    raise DataError(f"{where}: multiple-choice records need `choices` (a non-empty list) and an "
                                     f"integer `label` indexing it; got choices={choices!r}, label={label!r}")
                r.setdefault("response", choices[label])
            if "response" not in r:
                raise DataError(f"{where}: no 'response' (map your answer column with `fields: {{response: ...}}`, "
                               "or give `choices` and `label`)")
            if "perturbed_responses" in r and not isinstance(r["perturbed_responses"], list):
                r["perturbed_responses"] = [r["perturbed_responses"]]
        return self._check_prompts(records, source, role)

    def _load_role(self, role: str) -> list[Record]:
        if role not in self._records:
            out: list[Record] = []
            for source in self.sources[role]:
                try:
                    recs = self._load_records(role, source)
                except ValueError as err:
                    if "has no records" in str(err) and role == "forget":
                        raise ConfigError(
                            f"data.forget is empty: {err}. Unlearning needs at least one example to forget; check "
                            "the path, split, subset and limit of data.forget (or the forget split name)"
                        ) from err
                    raise
                if len(self.sources[role]) > 1:
                    for r in recs:
                        r.setdefault("group", source.subset or source.path)
                out += recs
            if role == "forget" and not out:
                raise ConfigError("data.forget is empty: unlearning needs at least one example to forget; check "
                                 "the path, split, subset and limit of data.forget")
            self._records[role] = out
        return self._records[role]

    def eval_records(self) -> dict[str, list[dict]]:
        """Evaluation records: ``forget``, ``retain`` (when there is a retain or eval_retain source) and
        ``holdout`` (when given). Each record holds ``prompt`` (raw, unformatted: pass it to
        :meth:`encode_prompt`), ``response`` and, when the source has them, ``paraphrased_prompt``,
        ``paraphrased_response``, ``perturbed_responses`` (list[str]), ``choices`` (list[str]), ``label``
        (int), ``group`` (the subset or source path, for sets made of several sources)."""
        keep = (*EVAL_TEXT_FIELDS, *EVAL_EXTRA_FIELDS, "group")
        out = {}
        for key, role, fallback in (("forget", "eval_forget", "forget"), ("retain", "eval_retain", "retain"),
                                    ("holdout", "eval_holdout", None)):
            if self.sources[role]:
                recs = self._load_role(role)
            elif fallback is not None and self.sources[fallback]:
                recs = self._load_role(fallback)
            else:
                continue
            out[key] = [{k: r[k] for k in keep if k in r} for r in recs]
        return out

    # -- tokenization --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """Prompt token ids, formatted exactly as in training (``prompt_template``, then the chat template
        or plain text). An empty prompt (corpus text) is the tokenizer's BOS alone, or nothing."""
        tok = self._tok()
        if isinstance(prompt, str) and not prompt:
            ids = tok("")["input_ids"]
            return ids if ids or tok.bos_token_id is None else [tok.bos_token_id]
        if self.prompt_template is not None and isinstance(prompt, str):
            prompt = self.prompt_template.format(prompt=prompt)
        return _encode_prompt(tok, prompt, self._chat)

    def encode_response(self, response: str | list[dict]) -> list[int]:
        """Response token ids as in training (``response_template`` applied), EOS appended."""
        if self.response_template is not None and isinstance(response, str):
            response = self.response_template.format(response=response)
        return _encode_response(self._tok(), response)

    def _tok(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError("the DataModule is not set up: call setup() first (the tokenizer comes from the module)")
        return self.tokenizer

    def _tokenize(self, records: list[Record]) -> TokenizedDataset:
        return TokenizedDataset([SequenceExample(self.encode_prompt(r["prompt"]), self.encode_response(r["response"]), i)
                                 for i, r in enumerate(records)], self.max_length)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.forget_dataset is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        chat = self.chat_template if self.chat_template is not None else bool(self.tokenizer.chat_template)
        if chat and not self.tokenizer.chat_template:
            raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
        check_response_room(self.tokenizer, chat, self.max_length)
        self._chat = chat
        forget = self._load_role("forget")
        retain = self._load_role("retain") if self.has_retain else []
        self._warn_overlap(forget, retain)
        self.forget_dataset = self._tokenize(forget)
        self.retain_dataset = self._tokenize(retain) if retain else None
        if self.has_mismatch_pool:
            pool = self._load_role("mismatch_pool")
            self._pool = [self.encode_response(r["response"]) for r in pool]
        self._refusal_ids = [self.encode_response(r) for r in self.refusals] or None
        self.val_forget_dataset = self._eval_dataset("eval_forget", self.forget_dataset)
        self.val_retain_dataset = self._eval_dataset("eval_retain", self.retain_dataset)
        for name, dataset, train in (("eval_forget", self.val_forget_dataset, self.forget_dataset),
                                     ("eval_retain", self.val_retain_dataset, self.retain_dataset)):
            if dataset is not train:  # training examples: the train loader warns every epoch
                warn_truncated(dataset, f"data.{name}")

    def _eval_dataset(self, role: str, train: TokenizedDataset | None) -> TokenizedDataset | None:
        """The tokenized evaluation set of ``role``; the training set itself when absent or identical
        (so a precomputed reference scores it once)."""
        if not self.sources[role]:
            return train
        dataset = self._tokenize(self._load_role(role))
        return train if train is not None and dataset.fingerprint() == train.fingerprint() else dataset

    @staticmethod
    def _warn_overlap(forget: list[Record], retain: list[Record]) -> None:
        if not retain:
            return
        keys = {(_text_key(r["prompt"]), _text_key(r["response"])) for r in retain}
        shared = sum((_text_key(r["prompt"]), _text_key(r["response"])) in keys for r in forget)
        if shared:
            rank_zero_warn(
                f"{shared} of {len(forget)} forget examples also appear in the retain set (same prompt and "
                "response); they are kept in both, so the forget and retain terms pull them in opposite "
                "directions. Remove them from data.retain if that is not intended.",
                category=UserWarning,
            )

    # -- loaders -------------------------------------------------------------------------------
    def _dataset(self, forget: TokenizedDataset, retain: TokenizedDataset | None, sampling: str,
                 paired: bool = True, pad_in_loss: bool = False) -> ForgetRetainDataset:
        return ForgetRetainDataset(
            forget, retain if paired else None, pool=self._pool if paired else None,
            refusals=self._refusal_ids if paired else None, num_mismatch=self.num_mismatch,
            retain_sampling=sampling, retain_per_forget=self.retain_per_forget, seed=self.seed,
            pad_in_loss_to=self.max_length if pad_in_loss else None,
        )

    def _loader(self, dataset: ForgetRetainDataset, batch_size: int, *, shuffle: bool, shard: bool,
                train: bool = False) -> ResumableDataLoader:
        replicas, rank = self._shard() if shard else (1, 0)
        sampler = StreamSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed)
        collate = ForgetRetainCollator(self.tokenizer.pad_token_id, dataset.pad_in_loss_to)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   warn_truncated=train)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, rank-sharded passes over the forget set with the paired rows (resumable)."""
        dataset = self._dataset(self.forget_dataset, self.retain_dataset, self.retain_sampling,
                                pad_in_loss=self.pad_in_loss)
        self._train_loader = self._loader(dataset, self.batch_size, shuffle=True, shard=True, train=True)
        return self._train_loader

    def val_dataloader(self) -> ResumableDataLoader | list:
        """The evaluation forget set in order, each example with a fixed, evenly spread retain example
        (so ``val/retain_nll`` covers ``min(n_forget, n_retain)`` retain examples) and fixed mismatch and
        refusal rows."""
        if not self.validate:
            return []
        dataset = self._dataset(self.val_forget_dataset, self.val_retain_dataset, "spread")
        return self._loader(dataset, self.eval_batch_size, shuffle=False, shard=True)

    def test_dataloader(self) -> ResumableDataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> ResumableDataLoader | list:
        return self.val_dataloader()

    def split_of(self, stage: str) -> str:
        """Name of the forget set a stage reads (``train``, or ``val`` for ``val``/``test`` when there is a
        separate evaluation forget set): the key of :meth:`split_loaders` / precomputed reference tables."""
        if stage == "train" or self.val_forget_dataset is self.forget_dataset:
            return "train"
        return "val"

    def split_loaders(self, shard: bool = False) -> dict[str, ResumableDataLoader]:
        """A loader per distinct forget set (``train``, and ``val`` when the evaluation forget set differs),
        unshuffled, yielding :class:`ForgetRetainBatch` es with only the ``forget`` part (the rows a
        precomputed reference scores: ``sequences=lambda b: [b.forget]``). With ``shard`` each rank gets its
        padded share, every rank running the same number of batches."""
        splits = {"train": self.forget_dataset}
        if self.val_forget_dataset is not self.forget_dataset:
            splits["val"] = self.val_forget_dataset
        # the training split is scored as training sees it (the pad-in-loss quirk included)
        return {k: self._loader(self._dataset(d, None, "spread", paired=False, pad_in_loss=self.pad_in_loss and k == "train"),
                                self.eval_batch_size, shuffle=False, shard=shard) for k, d in splits.items()}

    def attribution_loaders(self, num_replicas: int, rank: int, batch_size: int) -> dict[str, WeightedBatches]:
        """Batches for weight attribution (WAGLE), over this rank's share in a fixed order.

        Keys: ``forget`` (the forget examples), ``retain`` (one seeded, uniformly drawn retain example per
        forget example, WAGLE's pairing; absent without a retain set) and ``refusal`` (each forget prompt
        with a seeded refusal; absent when refusals are disabled). Each yields ``(SequenceBatch, weights)``
        with ``weights`` (B,) float: rank ``r`` takes forget positions ``r, r + num_replicas, ...`` up to the
        set size rounded up to a multiple of ``num_replicas``; positions past the end repeat early examples
        with weight 0, so every rank yields the same number of batches and weighted sums count each example once.
        """
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        forget, n = self.forget_dataset, len(self.forget_dataset)
        padded = math.ceil(n / num_replicas) * num_replicas
        positions = list(range(rank, padded, num_replicas))
        weights = [1.0 if p < n else 0.0 for p in positions]
        idx = [p % n for p in positions]
        pad_id = self.tokenizer.pad_token_id
        quirk = self.max_length if self.pad_in_loss else None  # gradients of the loss training optimises
        out = {"forget": WeightedBatches([forget[i] for i in idx], weights, batch_size, pad_id, quirk)}
        if self.retain_dataset is not None:
            n_r = len(self.retain_dataset)
            pair = [int(_rng(self.seed, _ATTR_RETAIN, i).integers(n_r)) for i in idx]
            out["retain"] = WeightedBatches([self.retain_dataset[j] for j in pair], weights, batch_size, pad_id,
                                            quirk)
        if self._refusal_ids:
            rows = []
            for i in idx:
                k = int(_rng(self.seed, _ATTR_REFUSAL, i).integers(len(self._refusal_ids)))
                p, a, _ = truncate_keep_response(forget[i].prompt, self._refusal_ids[k], self.max_length)
                rows.append(SequenceExample(p, a, i))
            out["refusal"] = WeightedBatches(rows, weights, batch_size, pad_id)
        return out


# ------------------------------------------------------------------------------ presets


def _subset_source(path: str, subset: str | None, split: str, *, fields: dict[str, str] | None = None,
                   revision: str | None = None, limit: int | None = None) -> DataSource:
    """A source for ``subset``/``split`` of a hub dataset, or of a local directory laid out as
    ``<path>/<subset>.<ext>`` or ``<path>/<subset>/<split>.<ext>`` (ext: jsonl, json, parquet, csv)."""
    local = Path(path).expanduser()
    if local.is_dir() and subset is not None:
        for stem in (local / subset, local / subset / split):
            for ext in (".jsonl", ".json", ".parquet", ".csv"):
                file = stem.with_name(stem.name + ext)
                if file.is_file():
                    return DataSource(str(file), fields=dict(fields or {}), limit=limit, subset=subset)
    return DataSource(path, split=split, subset=subset, fields=dict(fields or {}), revision=revision, limit=limit)


def _default(kwargs: dict[str, Any], key: str, value: Any) -> None:
    """A preset's default for a base argument left unset (absent, or ``None`` as config parsers pass it)."""
    if kwargs.get(key) is None:
        kwargs[key] = value


class TOFUDataModule(ForgetRetainDataModule):
    """TOFU (fictitious author QA): forget ``forgetXX``, retain ``retain{100-XX}``; evaluation on
    ``forgetXX_perturbed`` and ``retain_perturbed`` (paraphrased question and answer, perturbed answers).

    ``path: builtin:fictitious_facts`` selects the tiny built-in TOFU-like set with the same split names.
    ``reference_format: true`` reproduces the WAGLE reference prompt format ``"[INST] {q} [\\INST] {a}"``
    (backslash included, as in its training and evaluation) without the chat template.

    Example::

        data:
          class_path: lit_align.data.TOFUDataModule
          init_args: {split: forget10, batch_size: 1}
    """

    SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}

    def __init__(self, split: Literal["forget01", "forget05", "forget10"] = "forget10", path: str = "locuslab/TOFU",
                 revision: str | None = None, reference_format: bool = False, **kwargs: Any) -> None:
        """
        Args:
            split: the forget split; the retain split is its complement.
            path: hub id or local directory (``<subset>.json`` files), or ``builtin:fictitious_facts``.
            revision: pin the hub dataset.
            reference_format: the WAGLE reference prompt format (see the class doc).
            **kwargs: :class:`ForgetRetainDataModule` arguments (batch_size, max_length, ...).
        """
        if split not in self.SPLITS:
            raise ConfigError(f"data.split must be one of {sorted(self.SPLITS)}, got {split!r}")
        qa = {"prompt": "question", "response": "answer"}
        if path.startswith("builtin:"):
            base = path.rstrip("/")
            evalf = {**qa, "paraphrased_prompt": "paraphrased_question", "paraphrased_response": "paraphrased_answer",
                     "perturbed_responses": "perturbed_answers"}
            sources = {
                "forget": DataSource(f"{base}/{split}", fields=qa),
                "retain": DataSource(f"{base}/{self.SPLITS[split]}", fields=qa),
                "eval_forget": DataSource(f"{base}/{split}", fields=evalf),
                "eval_retain": DataSource(f"{base}/{self.SPLITS[split]}", fields=evalf),
            }
        else:
            evalf = {**qa, "paraphrased_prompt": "paraphrased_question", "paraphrased_response": "paraphrased_answer",
                     "perturbed_responses": "perturbed_answer"}
            sources = {
                "forget": _subset_source(path, split, "train", fields=qa, revision=revision),
                "retain": _subset_source(path, self.SPLITS[split], "train", fields=qa, revision=revision),
                "eval_forget": _subset_source(path, f"{split}_perturbed", "train", fields=evalf, revision=revision),
                "eval_retain": _subset_source(path, "retain_perturbed", "train", fields=evalf, revision=revision),
            }
        if reference_format:
            _default(kwargs, "prompt_template", "[INST] {prompt} [\\INST]")
            _default(kwargs, "chat_template", False)
        for key, source in sources.items():
            _default(kwargs, key, source)
        super().__init__(**kwargs)


class WMDPDataModule(ForgetRetainDataModule):
    """WMDP-style hazardous-knowledge unlearning: forget and retain text corpora, 4-way multiple-choice
    evaluation (``question``, ``choices``, ``answer`` = index of the right choice).

    Corpora come from ``cais/wmdp-corpora`` (``cyber-forget-corpus``, ``{bio,cyber}-retain-corpus``,
    column ``text``). The bio forget corpus is access-controlled: give its local JSONL file
    (``bio_remove_dataset.jsonl``, a ``text`` per line) as ``bio_forget_path``, or drop ``bio``.
    ``pad_in_loss: true`` reproduces the reference code's pad tokens in the loss.

    Example::

        data:
          class_path: lit_align.data.WMDPDataModule
          init_args: {domains: [cyber], max_length: 1024, batch_size: 1}   # 1024: the reference length
    """

    def __init__(self, domains: list[str] | None = None, corpora_path: str = "cais/wmdp-corpora",
                 questions_path: str = "cais/wmdp", bio_forget_path: str | None = None,
                 limit: int | None = None, **kwargs: Any) -> None:
        """
        Args:
            domains: among ``bio``, ``cyber`` (default both).
            corpora_path: hub id or local directory of the corpora (``<subset>.jsonl``).
            questions_path: hub id or local directory of the questions (``wmdp-<domain>.jsonl``, split ``test``).
            bio_forget_path: local JSONL of the bio forget corpus (required with ``bio``).
            limit: keep the first ``limit`` records of each corpus (documents are long).
            **kwargs: :class:`ForgetRetainDataModule` arguments.
        """
        domains = list(domains or ["bio", "cyber"])
        unknown = set(domains) - {"bio", "cyber"}
        if unknown or not domains:
            raise ConfigError(f"data.domains must be a non-empty subset of ['bio', 'cyber'], got {domains}")
        text = {"response": "text"}
        forget, retain, questions = [], [], []
        for d in domains:
            if d == "bio":
                if bio_forget_path is None:
                    raise ConfigError("data.bio_forget_path is required with domain 'bio': the WMDP bio forget corpus "
                                     "is access-controlled; request it and give the local bio_remove_dataset.jsonl, "
                                     "or set data.domains: [cyber]")
                forget.append(DataSource(bio_forget_path, fields=text, limit=limit, subset="bio-forget-corpus"))
            else:
                forget.append(_subset_source(corpora_path, f"{d}-forget-corpus", "train", fields=text, limit=limit))
            retain.append(_subset_source(corpora_path, f"{d}-retain-corpus", "train", fields=text, limit=limit))
            questions.append(_subset_source(questions_path, f"wmdp-{d}", "test",
                                            fields={"prompt": "question", "label": "answer"}))
        _default(kwargs, "forget", forget)
        _default(kwargs, "retain", retain)
        _default(kwargs, "eval_forget", questions)
        _default(kwargs, "chat_template", False)
        super().__init__(**kwargs)


class MUSEDataModule(ForgetRetainDataModule):
    """MUSE (news or books): forget and retain corpora from the ``raw`` subset (``forget``, ``retain1``/
    ``retain2``, column ``text``), knowledge QA evaluation from ``knowmem`` (``forget_qa``, ``retain_qa``:
    ``question``, ``answer``) and the ``privleak`` ``holdout`` texts as the never-seen set.

    Example::

        data:
          class_path: lit_align.data.MUSEDataModule
          init_args: {corpus: News, max_length: 2048}   # MUSE documents are up to 2048 tokens
    """

    def __init__(self, corpus: Literal["News", "Books"] = "News", path: str | None = None,
                 retain_split: Literal["retain1", "retain2"] = "retain1", limit: int | None = None, **kwargs: Any) -> None:
        """
        Args:
            corpus: ``News`` or ``Books`` (hub id ``muse-bench/MUSE-<corpus>``).
            path: another hub id, or a local directory laid out as ``<subset>/<split>.jsonl``.
            retain_split: the retain corpus split.
            limit: keep the first ``limit`` documents of each corpus.
            **kwargs: :class:`ForgetRetainDataModule` arguments.
        """
        path = path or f"muse-bench/MUSE-{corpus}"
        text, qa = {"response": "text"}, {"prompt": "question", "response": "answer"}
        _default(kwargs, "forget", _subset_source(path, "raw", "forget", fields=text, limit=limit))
        _default(kwargs, "retain", _subset_source(path, "raw", retain_split, fields=text, limit=limit))
        _default(kwargs, "eval_forget", _subset_source(path, "knowmem", "forget_qa", fields=qa))
        _default(kwargs, "eval_retain", _subset_source(path, "knowmem", "retain_qa", fields=qa))
        _default(kwargs, "eval_holdout", _subset_source(path, "privleak", "holdout", fields=text))
        _default(kwargs, "chat_template", False)
        super().__init__(**kwargs)


def _truthfulqa_row(row: Record) -> tuple[str, str, list[str]]:
    """(question, best answer, every other answer) of a TruthfulQA row, CSV (``Question``, ``Best Answer``,
    ``;``-separated ``Correct Answers`` / ``Incorrect Answers``) or HF (lowercase, lists) layout."""
    if "Question" in row:
        q, best = row["Question"], row["Best Answer"]
        others = [a for col in ("Correct Answers", "Incorrect Answers") for a in str(row.get(col) or "").split(";")]
    else:
        q, best = row["question"], row["best_answer"]
        others = [*row.get("correct_answers", []), *row.get("incorrect_answers", [])]
    return q.strip(), best.strip(), [a.strip() for a in others if a and a.strip()]


class PKUSafeRLHFDataModule(ForgetRetainDataModule):
    """LLMU's harmful-response unlearning: forget = one record per unsafe response of PKU-SafeRLHF
    (``response_0`` when ``is_response_0_safe`` is false, likewise ``response_1``); retain (normal data)
    = TruthfulQA ``(Question, Best Answer)``; mismatch pool = every TruthfulQA best answer plus every
    correct and incorrect answer (the CSV's ``;``-separated items, stripped). Text format
    ``"### Question: {x}\\n ### Answer: {y}"`` (prompt template + response template), no chat template.

    The whole TruthfulQA set is the normal data (the reference code trains on a random 70% of it; give a
    local file or ``data.retain`` to choose a part). The hub layout of PKU-SafeRLHF has changed across
    releases (split names, columns): pin ``revision``.
    ``truthfulqa_path`` takes the hub dataset or the original ``TruthfulQA.csv``.

    Example::

        data:
          class_path: lit_align.data.PKUSafeRLHFDataModule
          init_args: {batch_size: 2, revision: <commit>}
    """

    def __init__(self, path: str = "PKU-Alignment/PKU-SafeRLHF", split: str = "train", revision: str | None = None,
                 truthfulqa_path: str = "truthfulqa/truthful_qa", truthfulqa_subset: str | None = "generation",
                 truthfulqa_split: str = "validation", limit: int | None = None, **kwargs: Any) -> None:
        """
        Args:
            path: PKU-SafeRLHF hub id or a local file of its rows.
            split: its split (``330k_train`` in older revisions).
            revision: pin the PKU-SafeRLHF revision.
            truthfulqa_path: TruthfulQA hub id, or the local ``TruthfulQA.csv``.
            truthfulqa_subset, truthfulqa_split: hub configuration and split of TruthfulQA.
            limit: keep the first ``limit`` PKU-SafeRLHF rows.
            **kwargs: :class:`ForgetRetainDataModule` arguments.
        """
        local_tqa = Path(truthfulqa_path).expanduser().is_file()
        tqa = DataSource(truthfulqa_path, split=truthfulqa_split, subset=None if local_tqa else truthfulqa_subset)
        _default(kwargs, "forget", DataSource(path, split=split, revision=revision, limit=limit))
        _default(kwargs, "retain", tqa)
        _default(kwargs, "mismatch_pool", tqa)
        _default(kwargs, "prompt_template", "### Question: {prompt}\n ### Answer:")
        _default(kwargs, "response_template", " {response}")
        _default(kwargs, "chat_template", False)
        super().__init__(**kwargs)

    def _load_records(self, role: str, source: DataSource) -> list[Record]:
        rows = read_rows(source)
        where = f"data.{role} ({source.path!r})"
        if role in ("forget", "eval_forget"):
            out = []
            for i, row in enumerate(rows):
                for k in (0, 1):
                    flag = row.get(f"is_response_{k}_safe")
                    if flag is None or "prompt" not in row or f"response_{k}" not in row:
                        raise DataError(f"{where}, record {i + 1}: expected PKU-SafeRLHF columns prompt, response_{k}, "
                                       f"is_response_{k}_safe; it has {sorted(row)} (pin data.revision)")
                    if isinstance(flag, str):
                        flag = flag.strip().lower() == "true"
                    if not flag and str(row[f"response_{k}"]).strip():
                        out.append({"_source": source.path, "_source_index": i, "prompt": row["prompt"],
                                    "response": row[f"response_{k}"]})
            if not out and rows:
                log.warning("%s: no unsafe responses in %d rows", where, len(rows))
            return out
        try:
            parsed = [_truthfulqa_row(r) for r in rows]
        except KeyError as err:
            raise DataError(f"{where}: expected TruthfulQA columns (Question, Best Answer, Correct Answers, "
                           f"Incorrect Answers, or the hub's lowercase names); missing {err}") from None
        if role == "mismatch_pool":
            answers = [a for _, best, others in parsed for a in (best, *others)]
            return [{"_source": source.path, "_source_index": i, "response": a} for i, a in enumerate(answers)]
        return [{"_source": source.path, "_source_index": i, "prompt": q, "response": best}
                for i, (q, best, _) in enumerate(parsed)]


def check_eval_record(record: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the field when an eval record is malformed: ``prompt`` and
    ``response`` must be strings; ``perturbed_responses`` and ``choices``, when present, non-empty lists of
    non-empty strings (a bare string is refused: it would be read as one answer per character); ``label`` an int
    indexing ``choices``; ``paraphrased_prompt`` / ``paraphrased_response`` strings."""
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where} needs a string field {key!r}, got {record.get(key)!r}")
    for key in ("paraphrased_prompt", "paraphrased_response"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {record[key]!r}")
    for key in ("perturbed_responses", "choices"):
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: field {key!r} must be a non-empty list of answer strings, got {value!r} "
                             f"(write one string as [\"...\"], or leave the field out)")
        bad = [i for i, v in enumerate(value) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"{where}: field {key!r} item {bad[0]} is {value[bad[0]]!r}; every item must be a "
                             "non-empty string")
    if record.get("choices") is not None:
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(record["choices"]):
            raise ValueError(f"{where}: field 'label' must be the int index of the right one of its "
                             f"{len(record['choices'])} choices, got {label!r}")
