"""Data for continuous adversarial training (C-AdvUL / C-AdvIPO, others.md §8(a)): harmful behaviours, each with
several harmful target prefixes and a safe response, mixed with clean utility data.

Records
-------
* **Behaviours** (``data.behaviours``): HarmBench CSV rows (``Behavior``, ``BehaviorID``, optional
  ``ContextString``, put before the behaviour as HarmBench does) whose targets come from ``data.targets`` (a
  HarmBench-style JSON ``{behaviour_id: [targets] | target}``), or JSON/JSONL records ``{behaviour, targets: [..]
  | target, safe_response?, id?}``. Local files, ``builtin:`` sets and HF ids all go through
  :mod:`lit_align.data.records`; ``fields`` renames columns as in the other DataModules (``{behaviour: goal}``).
  **Every (behaviour, target) pair is one adversarial row**: its ``away`` sequence is the prompt + that target
  (a prefix: no EOS appended), its ``toward`` sequence the same prompt tokens + the safe response (EOS appended).
* **Safe response**: ``data.safe_response`` (the release's fixed "Sorry, I can't do that."), or with
  ``diverse_safe_answers`` each behaviour's own (its record's ``safe_response`` field or ``data.safe_responses``,
  a mapping like ``data.targets``).
* **Utility** (``data.utility``): records with ``prompt`` / ``response``, or a ``messages`` conversation (UltraChat
  ``train_sft``: its first user turn and the assistant turn after it); first user turns longer than
  ``utility_max_prompt_chars`` (768, as released) are dropped.
* **Benign prompts** (``data.benign``): records with a ``prompt``, for over-refusal checks (:meth:`eval_prompts`).

Built-in tiny sets
------------------
``builtin:adv_behaviours`` (192 toy behaviours, 2-4 targets and a refusal each), ``builtin:adv_benign`` and
``builtin:adv_utility`` (126 benign questions, with a toy answer in the latter), written by
``scripts/build_tiny_game.py --data-only``, are split **by action**: each ``/val`` set (48 behaviours, 42 benign
questions) asks all six question frames of one held-out action per family ("steal a bike", "bake a cake", ...),
which no training record, target or refusal mentions, so held-out ASR measures carry-over to unseen behaviours,
not memorised target strings.

The training stream (the mixer)
-------------------------------
Each row of epoch ``e`` is adversarial with probability ``p = adversarial_probability`` (a Bernoulli draw per row
from a generator seeded by ``(seed, e)``; row ``t`` is the ``t``-th draw). The ``k``-th adversarial row of the epoch
is pair ``perm_{e, k // n_pairs}[k % n_pairs]``, the ``j``-th utility row utility example
``perm'_{e, j // n_util}[j % n_util]``: seeded permutations, a fresh one for each pass.

**Epoch length** (the release's ``first_exhausted`` stopping rule, fixed in advance): an epoch has
``min(ceil(n_pairs / p), ceil(n_util / (1 - p)))`` rows, the expected row at which the first of the two streams runs
out; with ``p = 1`` (C-AdvIPO, no utility) exactly one pass over the pairs. The length is the same every epoch, so
Lightning knows it up front; a stream that the draws happen to exhaust before the epoch ends starts its next
permutation. Data-parallel rank ``r`` of ``n`` takes rows ``r, r + n, ...`` (the last rows repeat to even the
shares), so two ranks with batch ``b`` see the rows one process with batch ``2b`` sees; a resumed run continues with
exactly the next batch (the loader's ``state_dict``, as in the other DataModules). The losses are another matter:
each rank averages over its own rows and data parallelism averages the ranks, so when only one rank's share of a
step holds adversarial rows, its away / toward terms weigh half of what one process would give them (the released
code, on accelerate, does the same); C-AdvIPO with ``p = 1`` is unaffected.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.batches import AdversarialBatch
from lit_align.data.records import DataSource, Record, describe_record, load_records, read_rows
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler
from lit_align.data.tokenize import (
    SequenceExample,
    TokenizedDataset,
    check_response_room,
    encode_prompt,
    encode_response,
    prompt_response_batch,
    truncate_keep_response,
)
from lit_align.errors import ConfigError, DataError

__all__ = [
    "AdversarialBehaviourDataModule",
    "AdversarialCollator",
    "AdversarialPair",
    "AdversarialStream",
    "Behaviour",
    "MixSampler",
    "check_assistant_header",
    "load_behaviours",
    "load_multiple_choice",
    "load_utility",
    "mix_epoch_length",
]

log = logging.getLogger(__name__)

#: The released fixed safe answer (``diverse_safe_answers=False``).
DEFAULT_SAFE_RESPONSE = "Sorry, I can't do that."

# Stream tags: independent random streams from one seed.
_MIX, _PAIRS, _UTILITY = range(11, 14)

#: Canonical field -> column names tried in order (after the source's ``fields`` mapping).
_ALIASES = {
    "behaviour": ("behaviour", "behavior", "Behavior", "prompt"),
    "id": ("id", "BehaviorID", "behaviour_id", "behavior_id"),
    "context": ("context", "ContextString"),
    "targets": ("targets", "target"),
    "safe_response": ("safe_response",),
}


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key``."""
    return np.random.default_rng([seed % 2**63, *key])


def _column(row: Record, source: DataSource, name: str) -> Any:
    """The value of canonical field ``name`` in ``row`` (the ``fields`` mapping first, then the aliases), or None."""
    for column in (source.fields[name],) if name in source.fields else _ALIASES[name]:
        value = row.get(column)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def _as_texts(value: Any) -> list[str]:
    """A target field (a string or a list of strings) as a list of non-empty strings."""
    values = value if isinstance(value, list) else [value] if value is not None else []
    return [v for v in values if isinstance(v, str) and v.strip()]


# ------------------------------------------------------------------------------ records


@dataclass
class Behaviour:
    """One harmful behaviour.

    Attributes:
        id: the record's ``id`` / ``BehaviorID`` (its position when it has none).
        prompt: the behaviour as the user asks it (a HarmBench ``ContextString`` put before it).
        targets: harmful target prefixes (one adversarial row each).
        safe_response: the behaviour's own safe response, when its record or ``data.safe_responses`` gives one.
    """

    id: str
    prompt: str
    targets: list[str]
    safe_response: str | None = None


def _read_mapping(source: DataSource, value: str) -> dict[str, Any]:
    """``{id: value}`` of a mapping source: a JSON object file (HarmBench's targets JSON), or records with an id
    column and a ``value`` column (``fields`` renames them)."""
    path = Path(source.path).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "data" not in data:
            return {str(k): v for k, v in data.items()}
    out = {}
    for i, row in enumerate(read_rows(source)):
        key, val = _column(row, source, "id"), _column(row, source, value)
        if key is None or val is None:
            raise DataError(f"{describe_record(source.path, i)}: a mapping record needs an id and a {value!r}; it has "
                            f"{sorted(row)}. Map the columns with `fields: {{id: <column>, {value}: <column>}}`")
        out[str(key)] = val
    return out


def load_behaviours(source: DataSource, targets: DataSource | None = None,
                    safe_responses: DataSource | None = None, key: str = "data.behaviours") -> list[Behaviour]:
    """The behaviours of ``source``, targets from each record or from the ``targets`` mapping by id.

    Raises a :class:`DataError` naming the record for a behaviour without a prompt or without any target, and a
    :class:`ConfigError` naming ``key`` for a source without records.
    """
    rows = read_rows(source)
    if not rows:
        raise ConfigError(f"{key} ({source.path!r}) is empty: adversarial training needs at least one behaviour with "
                          "targets; check its path, split and limit")
    target_map = _read_mapping(targets, "targets") if targets is not None else {}
    safe_map = _read_mapping(safe_responses, "safe_response") if safe_responses is not None else {}
    out = []
    for i, row in enumerate(rows):
        where = f"{key}: {describe_record(source.path, i)}"
        text = _column(row, source, "behaviour")
        if not isinstance(text, str):
            raise DataError(f"{where}: no behaviour text; it has {sorted(row)}. Name its column with "
                            "`fields: {behaviour: <column>}`")
        context = _column(row, source, "context")
        prompt = f"{context}\n\n---\n\n{text}" if isinstance(context, str) else text
        bid = str(_column(row, source, "id") if _column(row, source, "id") is not None else i)
        texts = _as_texts(_column(row, source, "targets")) or _as_texts(target_map.get(bid))
        if not texts:
            raise DataError(f"{where} (id {bid!r}) has no targets: give the record `targets` (a list) or `target`, "
                            "or an entry for its id in data.targets (a JSON object {behaviour_id: [targets]})")
        safe = _column(row, source, "safe_response") or safe_map.get(bid)
        out.append(Behaviour(bid, prompt, texts, safe if isinstance(safe, str) else None))
    return out


def _first_exchange(messages: list[dict]) -> tuple[str, str] | None:
    """(first user turn, the assistant turn after it) of a conversation, or None."""
    for k, m in enumerate(messages):
        if m.get("role") == "user":
            reply = next((n for n in messages[k + 1:] if n.get("role") == "assistant"), None)
            return (m["content"], reply["content"]) if reply is not None else None
    return None


def load_utility(source: DataSource, max_prompt_chars: int | None = 768, key: str = "data.utility") -> list[Record]:
    """Utility records ``{prompt, response}``: a record's own ``prompt``/``response``, or the first exchange of its
    ``messages`` (UltraChat style). Records whose prompt is longer than ``max_prompt_chars`` are dropped."""
    rows = read_rows(source)
    out = []
    for i, row in enumerate(rows):
        messages = row.get(source.fields.get("messages", "messages"))
        if isinstance(messages, list) and messages:
            pair = _first_exchange(messages)
        else:
            prompt, response = (row.get(source.fields.get(n, n)) for n in ("prompt", "response"))
            pair = (prompt, response) if isinstance(prompt, str) and isinstance(response, str) else None
        if pair is None or not pair[1].strip():
            raise DataError(f"{key}: {describe_record(source.path, i)} has neither `prompt` and `response` nor a "
                            f"`messages` conversation with a user and an assistant turn; it has {sorted(row)}. Map the "
                            "columns with `fields: {prompt: <column>, response: <column>}`")
        if max_prompt_chars is None or len(pair[0]) <= max_prompt_chars:
            out.append({"_source": source.path, "_source_index": i, "prompt": pair[0], "response": pair[1]})
    if len(out) < len(rows):
        log.info("%s: dropped %d of %d records whose first user turn is over %s characters", key,
                 len(rows) - len(out), len(rows), max_prompt_chars)
    if not out:
        raise ConfigError(f"{key} ({source.path!r}) has no usable records (under utility_max_prompt_chars="
                          f"{max_prompt_chars}); check the source or raise data.utility_max_prompt_chars")
    return out


def _choice_texts(value: Any) -> tuple[list[str], list[str]] | None:
    """``(texts, labels)`` of a record's choices: a list of strings (labels A, B, ...), or ARC's
    ``{"text": [...], "label": [...]}``; ``None`` when it is neither."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        texts = [str(t) for t in value["text"]]
        labels = [str(x) for x in value.get("label", [])] or [chr(65 + i) for i in range(len(texts))]
        return texts, labels
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return list(value), [chr(65 + i) for i in range(len(value))]
    return None


def load_multiple_choice(source: DataSource, key: str = "data.multiple_choice") -> list[Record]:
    """Multiple-choice records ``{prompt, choices, label}`` (``label`` the index of the right choice) from records
    with a question (``prompt``; MMLU's and ARC's ``question`` is found too), ``choices`` (a list of strings, or
    ARC's ``{text, label}``) and ``label`` (an index, or a choice label / letter such as ARC's ``answerKey``;
    MMLU's ``answer`` is found too). ``fields`` renames columns."""
    def get(row: Record, name: str, *fallbacks: str) -> Any:
        for column in (source.fields.get(name, name), *fallbacks):
            if column in row:
                return row[column]
        return None

    out = []
    for i, row in enumerate(read_rows(source)):
        prompt, label = get(row, "prompt", "question"), get(row, "label", "answer", "answerKey")
        choices = _choice_texts(get(row, "choices"))
        if not isinstance(prompt, str) or choices is None or label is None:
            raise DataError(f"{key}: {describe_record(source.path, i)} needs a question (`prompt` or `question`), "
                            f"`choices` (a list of strings or {{text, label}}) and a `label` (index or letter); it "
                            f"has {sorted(row)}. Map the columns with `fields: {{prompt: ..., choices: ..., label: ...}}`")
        texts, letters = choices
        if isinstance(label, str) and not label.isdigit():
            if label not in letters:
                raise DataError(f"{key}: {describe_record(source.path, i)} has label {label!r}, not one of its "
                                f"choices' labels {letters}")
            index = letters.index(label)
        else:
            index = int(label)
        if not 0 <= index < len(texts):
            raise DataError(f"{key}: {describe_record(source.path, i)} has label {label!r} but {len(texts)} choices")
        out.append({"prompt": prompt, "choices": texts, "label": index})
    if not out:
        raise ConfigError(f"{key} ({source.path!r}) has no records")
    return out


def check_assistant_header(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> None:
    """Refuse a chat template whose generation prompt (``add_generation_prompt=True``) is not a token prefix of the
    whole conversation: the response's start (the assistant header) could not be located."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(head_ids)] != head_ids:
        raise ConfigError(
            "data.chat_template: the tokenizer's chat template does not put the conversation's prompt tokens "
            "(add_generation_prompt=True) before the assistant's reply, so the assistant header cannot be located "
            "and the prompt positions to perturb are unknown. Set data.chat_template: false and give "
            "data.prompt_template (e.g. \"Human: {prompt}\\nAI:\")."
        )


# ------------------------------------------------------------------------------ the stream


@dataclass
class AdversarialPair:
    """One (behaviour, target) pair, tokenized: ``away`` = prompt + target, ``toward`` = the same prompt + the
    safe response; ``index`` = the pair's position in its set."""

    away: SequenceExample
    toward: SequenceExample
    index: int
    cut: bool = False
    """Whether ``max_length`` cut the prompt or a response."""


def _pair(prompt: list[int], harmful: list[int], safe: list[int], index: int, max_length: int) -> AdversarialPair:
    """A pair cut to ``max_length`` with ONE prompt for both rows (the shorter of the two cuts)."""
    p_h, harmful_cut, cut_h = truncate_keep_response(prompt, harmful, max_length)
    p_s, safe_cut, cut_s = truncate_keep_response(prompt, safe, max_length)
    prompt = p_h if len(p_h) <= len(p_s) else p_s
    room = max_length - len(prompt)
    return AdversarialPair(SequenceExample(prompt, harmful_cut[:room], index),
                           SequenceExample(list(prompt), safe_cut[:room], index), index, cut_h or cut_s)


def mix_epoch_length(n_pairs: int, n_utility: int, p: float) -> int:
    """Rows per epoch: ``n_pairs`` when ``p = 1`` or there is no utility data, else
    ``min(ceil(n_pairs / p), ceil(n_utility / (1 - p)))`` (first_exhausted, in expectation)."""
    if p >= 1.0 or n_utility == 0:
        return n_pairs
    return min(math.ceil(n_pairs / p), math.ceil(n_utility / (1.0 - p)))


class AdversarialStream(Dataset):
    """Adversarial pairs and utility rows; ``dataset[(epoch, row)]`` is row ``row`` of epoch ``epoch``.

    ``mixed``: the seeded mixer of the module docstring (training); otherwise every pair in order then every utility
    example in order (evaluation, reference precomputation). Items are :class:`AdversarialPair` or
    :class:`SequenceExample` (a utility row).
    """

    def __init__(self, pairs: list[AdversarialPair], utility: TokenizedDataset | None, *, p: float = 1.0,
                 seed: int = 0, mixed: bool = True, max_length: int = 256) -> None:
        self.pairs, self.utility, self.p, self.seed, self.mixed = pairs, utility, p, seed, mixed
        self.max_length = max_length
        n_util = len(utility) if utility is not None else 0
        self.length = mix_epoch_length(len(pairs), n_util, p) if mixed else len(pairs) + n_util

    def __len__(self) -> int:
        return self.length

    @property
    def truncated(self) -> int:
        """Pairs and utility examples cut to ``max_length`` (the train loader warns about them)."""
        return sum(p.cut for p in self.pairs) + (self.utility.truncated if self.utility is not None else 0)

    def fingerprint(self) -> str:
        """sha256 of every pair's token ids and index, in order (the keys of precomputed reference tables):
        changes whenever the behaviours, targets, safe responses, template or tokenizer do."""
        h = hashlib.sha256(f"adversarial|max_length={self.max_length}".encode())
        for pair in self.pairs:
            for part in (pair.away.prompt, pair.away.response, pair.toward.response):
                h.update(np.asarray(part, dtype=np.int64).tobytes())
                h.update(b"|")
            h.update(str(pair.index).encode())
        return h.hexdigest()

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few epochs' plans; the dataset lives as long as its loader)
    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(adversarial (L,) bool, index (L,) int)``: each row's kind and pair / utility index in ``epoch``."""
        n_pairs = len(self.pairs)
        n_util = len(self.utility) if self.utility is not None else 0
        if not self.mixed:
            adv = np.arange(self.length) < n_pairs
            return adv, np.where(adv, np.arange(self.length), np.arange(self.length) - n_pairs)
        adv = _rng(self.seed, _MIX, epoch).random(self.length) < self.p if n_util else np.ones(self.length, bool)
        index = np.empty(self.length, dtype=np.int64)
        for kind, n, tag in ((adv, n_pairs, _PAIRS), (~adv, n_util, _UTILITY)):
            ordinal = np.flatnonzero(kind)
            passes = [_rng(self.seed, tag, epoch, k).permutation(n) for k in range(math.ceil(len(ordinal) / n))] if n else []
            index[ordinal] = [passes[k // n][k % n] for k in range(len(ordinal))]
        return adv, index

    def __getitem__(self, key: int | tuple[int, int]) -> AdversarialPair | SequenceExample:
        epoch, row = (0, key) if isinstance(key, int) else key
        adv, index = self.plan(epoch)
        return self.pairs[index[row]] if adv[row] else self.utility[int(index[row])]


class MixSampler(ShardedSampler):
    """A :class:`ShardedSampler` over the rows of an epoch in order, yielding ``(epoch, row)`` keys of an
    :class:`AdversarialStream` (the stream does its own seeded shuffling). Resumes like its parent."""

    def __init__(self, dataset: AdversarialStream, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._epoch_order()
        mine = [(self.epoch, order[p]) for p in range(self.rank, self.total_size, self.num_replicas)]
        return iter(mine[self._skip():])


@dataclass
class AdversarialCollator:
    """Right-pads a list of stream items into an :class:`AdversarialBatch` (pairs in their order; away and toward
    rows aligned). Refuses a pair whose away and toward prompt ids differ."""

    pad_token_id: int

    def __call__(self, items: list[AdversarialPair | SequenceExample]) -> AdversarialBatch:
        pairs = [it for it in items if isinstance(it, AdversarialPair)]
        utility = [it for it in items if not isinstance(it, AdversarialPair)]
        for pair in pairs:
            if pair.away.prompt != pair.toward.prompt:
                raise DataError(f"adversarial pair {pair.index}: its away and toward rows have different prompt ids; "
                                "the perturbation transplant needs the same prompt tokens in both")
        index = torch.tensor([pair.index for pair in pairs], dtype=torch.long)

        def batch(rows: list[SequenceExample]) -> Any:
            if not rows:
                return None
            return prompt_response_batch([(r.prompt, r.response) for r in rows], [r.index for r in rows],
                                         self.pad_token_id)

        return AdversarialBatch(away=batch([p.away for p in pairs]), toward=batch([p.toward for p in pairs]),
                                utility=batch(utility), index=index)


def _warn_cut(stream: AdversarialStream | None, split: str) -> None:
    """Warn once that ``data.max_length`` cut pairs or utility examples of ``split``."""
    if stream is None or not stream.truncated:
        return
    pairs = sum(p.cut for p in stream.pairs)
    util = stream.utility.truncated if stream.utility is not None else 0
    rank_zero_warn(
        f"{split}: {pairs} of {len(stream.pairs)} adversarial pairs and {util} of "
        f"{len(stream.utility) if stream.utility is not None else 0} utility examples are longer than "
        f"data.max_length={stream.max_length}; their prompts were cut from the left (the same prompt tokens for a "
        "pair's away and toward rows; responses kept whole where they fit). Raise data.max_length to keep them whole.",
        category=UserWarning,
    )


# ------------------------------------------------------------------------------ the DataModule


class AdversarialBehaviourDataModule(L.LightningDataModule):
    """Harmful behaviours (targets + safe responses) mixed with utility data, yielding :class:`AdversarialBatch` es.

    Example (the tiny built-in sets on the tiny game base)::

        data:
          class_path: lit_align.data.AdversarialBehaviourDataModule
          init_args:
            behaviours: {path: builtin:adv_behaviours}
            val_behaviours: {path: builtin:adv_behaviours/val}
            utility: {path: builtin:adv_utility}
            val_utility: {path: builtin:adv_utility/val}
            benign: {path: builtin:adv_benign}
            val_benign: {path: builtin:adv_benign/val}
            prompt_template: "Human: {prompt}\\nAI:"
            response_template: " {response}"

    See the module docstring for the records and the mixer. After :meth:`setup`: ``train_dataset`` (the mixed
    stream), ``val_dataset`` / ``test_dataset`` (unmixed; ``None`` without evaluation data), ``behaviours``
    (``{"train": [...], "val": [...], "test": [...]}`` of :class:`Behaviour`).
    """

    def __init__(
        self,
        behaviours: DataSource,
        val_behaviours: DataSource | None = None,
        test_behaviours: DataSource | None = None,
        utility: DataSource | None = None,
        val_utility: DataSource | None = None,
        benign: DataSource | None = None,
        val_benign: DataSource | None = None,
        multiple_choice: DataSource | None = None,
        targets: DataSource | None = None,
        safe_responses: DataSource | None = None,
        safe_response: str = DEFAULT_SAFE_RESPONSE,
        diverse_safe_answers: bool = False,
        adversarial_probability: float = 0.125,
        utility_max_prompt_chars: int | None = 768,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_length: int = 256,
        chat_template: bool | None = None,
        prompt_template: str | None = None,
        response_template: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            behaviours: training behaviours (HarmBench CSV with ``data.targets``, or JSON/JSONL records).
            val_behaviours: held-out behaviours (validation loss and :meth:`eval_prompts`); optional.
            test_behaviours: behaviours for ``lit-align test``; default ``val_behaviours``.
            utility: clean utility records (prompt/response or ``messages``); required when
                ``adversarial_probability < 1``.
            val_utility: held-out utility records (validation utility NLL); optional.
            benign: benign prompts (field ``prompt``) for over-refusal checks; optional.
            val_benign: held-out benign prompts; default ``benign``.
            multiple_choice: held-out multiple-choice questions for utility accuracy in evaluation (MMLU, ARC or
                records ``{prompt, choices, label}``: :func:`load_multiple_choice`); optional, never trained on.
            targets: ``{behaviour_id: [targets] | target}`` JSON (or records with id and target columns), for
                behaviour records without their own targets.
            safe_responses: ``{behaviour_id: safe_response}`` mapping, read with ``diverse_safe_answers``.
            safe_response: the fixed safe answer (the release's default).
            diverse_safe_answers: use each behaviour's own safe response (record field or ``safe_responses``);
                a behaviour without one is an error.
            adversarial_probability: chance that a training row is adversarial, in (0, 1] (0.125 released for
                C-AdvUL; C-AdvIPO: 1.0 and no utility).
            utility_max_prompt_chars: drop utility records whose (first user) prompt is longer (768 released);
                ``None`` keeps all.
            batch_size: rows of the mixed stream per step on each data-parallel rank (each adversarial row brings
                an away and a toward sequence).
            val_batch_size: rows per validation step (default ``batch_size``).
            max_length: longest prompt + response in tokens (256 released for C-AdvUL, 128 for C-AdvIPO).
            chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when the tokenizer
                has one and no ``prompt_template`` is given.
            prompt_template: ``str.format`` template over ``{prompt}`` for raw models, e.g.
                ``"Human: {prompt}\\nAI:"``; exclusive with ``chat_template: true``.
            response_template: template over ``{response}`` applied to targets, safe and utility responses, e.g.
                ``" {response}"`` for a model whose answers start with a space.
            seed: seed of the mixer and its permutations.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when used without a lit_align module (a missing pad token falls
                back to unk, then EOS: ``missing_pad_token: unk``).
        """
        super().__init__()
        if not 0.0 < adversarial_probability <= 1.0:
            raise ConfigError(f"data.adversarial_probability must be in (0, 1], got {adversarial_probability}: it is "
                              "the share of adversarial rows (0.125 released for C-AdvUL, 1.0 for C-AdvIPO)")
        if adversarial_probability < 1.0 and utility is None:
            raise ConfigError(f"data.utility is required with data.adversarial_probability={adversarial_probability} "
                              "< 1 (the other rows are utility rows): give data.utility, or set "
                              "data.adversarial_probability: 1.0 to train on adversarial rows only (C-AdvIPO)")
        if adversarial_probability == 1.0 and utility is not None:
            rank_zero_warn("data.utility is never drawn with data.adversarial_probability=1.0; it is used for "
                           "validation only", category=UserWarning)
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if prompt_template is not None and chat_template:
            raise ConfigError("data.prompt_template and data.chat_template: true exclude each other: give one")
        for name, tpl, field in (("prompt_template", prompt_template, "prompt"),
                                 ("response_template", response_template, "response")):
            if tpl is not None and "{" + field + "}" not in tpl:
                raise ConfigError(f"data.{name} must contain {{{field}}}, got {tpl!r}")
        self.save_hyperparameters()
        self.sources = {"train": behaviours, "val": val_behaviours, "test": test_behaviours or val_behaviours}
        self.utility_sources = {"train": utility, "val": val_utility}
        self.benign_sources = {"train": benign, "val": val_benign or benign}
        self.multiple_choice_source = multiple_choice
        self.targets_source, self.safe_responses_source = targets, safe_responses
        self.safe_response, self.diverse_safe_answers = safe_response, diverse_safe_answers
        self.p, self.utility_max_prompt_chars = adversarial_probability, utility_max_prompt_chars
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_length, self.chat_template = max_length, chat_template
        self.prompt_template, self.response_template = prompt_template, response_template
        self.seed, self.num_workers, self.tokenizer_name = seed, num_workers, tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._chat = False
        self.behaviours: dict[str, list[Behaviour]] = {}
        self.train_dataset: AdversarialStream | None = None
        self.val_dataset: AdversarialStream | None = None
        self.test_dataset: AdversarialStream | None = None
        self._train_loader: ResumableDataLoader | None = None

    _shard = TokenizedDataModule._shard
    on_after_batch_transfer = TokenizedDataModule.on_after_batch_transfer
    _resolve_tokenizer = TokenizedDataModule._resolve_tokenizer
    #: ``data.tokenizer`` without a pad token pads with unk, else EOS (the release pads with unk; Llama-3 has none)
    missing_pad_token = "unk"

    # -- tokenization --------------------------------------------------------------------------
    def _tok(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError("the DataModule is not set up: call setup() first (the tokenizer comes from the module)")
        return self.tokenizer

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through the tokenizer's chat template (decided at :meth:`setup`)."""
        return self._chat

    def format_prompt(self, prompt: str) -> str:
        """The prompt text as the model reads it before the chat template (``prompt_template`` applied)."""
        return self.prompt_template.format(prompt=prompt) if self.prompt_template is not None else prompt

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids exactly as in training (``prompt_template``, then the chat template or plain text)."""
        return encode_prompt(self._tok(), self.format_prompt(prompt), self._chat)

    def encode_response(self, response: str, eos: bool = True) -> list[int]:
        """Response token ids as in training (``response_template`` applied; EOS appended unless ``eos`` is False,
        as for the harmful targets, which are prefixes)."""
        if self.response_template is not None:
            response = self.response_template.format(response=response)
        ids = encode_response(self._tok(), response)
        return ids if eos else ids[:-1]

    def _safe_response(self, behaviour: Behaviour, key: str) -> str:
        if not self.diverse_safe_answers:
            return self.safe_response
        if behaviour.safe_response is None:
            raise DataError(f"{key}: behaviour {behaviour.id!r} has no safe_response, which data.diverse_safe_answers "
                            "needs: give its record a `safe_response`, an entry in data.safe_responses, or set "
                            "data.diverse_safe_answers: false (the fixed data.safe_response)")
        return behaviour.safe_response

    def _pairs(self, split: str) -> list[AdversarialPair]:
        """One tokenized pair per (behaviour, target) of ``split``."""
        key = f"data.{'behaviours' if split == 'train' else split + '_behaviours'}"
        pairs = []
        for b in self.behaviours[split]:
            prompt, safe = self.encode_prompt(b.prompt), self.encode_response(self._safe_response(b, key))
            for target in b.targets:
                pairs.append(_pair(prompt, self.encode_response(target, eos=False), safe, len(pairs), self.max_length))
        return pairs

    def _utility(self, split: str) -> TokenizedDataset | None:
        source = self.utility_sources[split]
        if source is None:
            return None
        records = load_utility(source, self.utility_max_prompt_chars,
                               key="data.utility" if split == "train" else "data.val_utility")
        return TokenizedDataset([SequenceExample(self.encode_prompt(r["prompt"]), self.encode_response(r["response"]),
                                                 i) for i, r in enumerate(records)], self.max_length)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        tok = self.tokenizer = self._resolve_tokenizer()
        if tok.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token: build it with lit_align.models.build_tokenizer "
                              "(model.missing_pad_token: unk falls back to unk, then EOS)")
        chat = self.chat_template if self.chat_template is not None else (
            self.prompt_template is None and bool(tok.chat_template))
        if chat and not tok.chat_template:
            raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
        check_response_room(tok, chat, self.max_length)
        self._chat = chat
        for split, source in self.sources.items():
            if source is not None:
                key = f"data.{'behaviours' if split == 'train' else split + '_behaviours'}"
                self.behaviours[split] = load_behaviours(source, self.targets_source, self.safe_responses_source, key)
        if chat:
            first = self.behaviours["train"][0]
            check_assistant_header(tok, self.format_prompt(first.prompt), first.targets[0])
        self.train_dataset = AdversarialStream(self._pairs("train"), self._utility("train"), p=self.p, seed=self.seed,
                                               max_length=self.max_length)
        val_pairs = self._pairs("val") if "val" in self.behaviours else []
        val_utility = self._utility("val")
        if val_pairs or val_utility is not None:
            self.val_dataset = AdversarialStream(val_pairs, val_utility, mixed=False, max_length=self.max_length)
        self.test_dataset = self.val_dataset
        if self.sources["test"] is not self.sources["val"]:
            self.test_dataset = AdversarialStream(self._pairs("test"), val_utility, mixed=False,
                                                  max_length=self.max_length)
        for name, dataset in (("training", self.train_dataset), ("validation", self.val_dataset)):
            _warn_cut(dataset, name)

    # -- evaluation prompts --------------------------------------------------------------------
    def eval_prompts(self, split: str = "val") -> dict[str, list]:
        """Raw (unformatted: pass them to :meth:`encode_prompt`) evaluation prompts of ``split`` (``train``,
        ``val`` or ``test``): ``harmful`` (behaviour prompts), ``ids``, ``targets`` (list of targets per
        behaviour), ``safe`` (each behaviour's safe response as trained), ``benign`` (benign prompts; empty
        without ``data.benign``), ``utility`` (``{prompt, response}`` records; ``data.val_utility`` for held-out
        splits, empty without it) and ``multiple_choice`` (``{prompt, choices, label}`` of ``data.multiple_choice``,
        whatever the split; empty without it)."""
        split = "val" if split == "test" and "test" not in self.behaviours else split
        if split not in self.behaviours:
            raise ConfigError(f"no {split} behaviours: give data.{split}_behaviours")
        behaviours = self.behaviours[split]
        benign_source = self.benign_sources["train" if split == "train" else "val"]
        benign = [r["prompt"] for r in load_records(benign_source, ("prompt",))] if benign_source else []
        key = f"data.{'behaviours' if split == 'train' else split + '_behaviours'}"
        utility_source = self.utility_sources["train" if split == "train" else "val"]
        utility = load_utility(utility_source, self.utility_max_prompt_chars,
                               key="data.utility" if split == "train" else "data.val_utility") if utility_source else []
        return {"harmful": [b.prompt for b in behaviours], "ids": [b.id for b in behaviours],
                "targets": [list(b.targets) for b in behaviours],
                "safe": [self._safe_response(b, key) for b in behaviours], "benign": benign,
                "utility": [{"prompt": r["prompt"], "response": r["response"]} for r in utility],
                "multiple_choice": load_multiple_choice(self.multiple_choice_source)
                if self.multiple_choice_source is not None else []}

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, dataset: AdversarialStream, batch_size: int, *, shard: bool = True) -> ResumableDataLoader:
        replicas, rank = self._shard() if shard else (1, 0)
        sampler = MixSampler(dataset, num_replicas=replicas, rank=rank, seed=self.seed)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size,
                                   collate_fn=AdversarialCollator(self.tokenizer.pad_token_id),
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableDataLoader:
        """The seeded, resumable, rank-sharded mixed stream."""
        self._train_loader = self._loader(self.train_dataset, self.batch_size)
        return self._train_loader

    def val_dataloader(self) -> ResumableDataLoader | list:
        """Every held-out pair, then every held-out utility example, in order."""
        return self._loader(self.val_dataset, self.val_batch_size) if self.val_dataset is not None else []

    def test_dataloader(self) -> ResumableDataLoader | list:
        return self._loader(self.test_dataset, self.val_batch_size) if self.test_dataset is not None else []

    def predict_dataloader(self) -> ResumableDataLoader | list:
        return self.test_dataloader()

    def evaluated_parts(self, stage: str, batches: int | float) -> frozenset[str]:
        """The parts, ``adversarial`` (pairs) and ``utility``, that the first ``batches`` batches of the ``stage``
        (``val`` or ``test``) loaders of ALL data-parallel ranks hold together: the same answer on every rank,
        known before the epoch (the module logs these parts' metrics on every rank at every step).

        Args:
            stage: ``val`` or ``test``.
            batches: batches each rank runs (Lightning's ``num_val_batches``; ``inf`` for all).
        """
        dataset = self.test_dataset if stage == "test" else self.val_dataset
        if dataset is None:
            return frozenset()
        replicas, _ = self._shard()
        limit = None if math.isinf(batches) else int(batches) * self.val_batch_size
        kinds = {bool(dataset.plan(epoch)[0][row]) for rank in range(replicas)
                 for epoch, row in itertools.islice(MixSampler(dataset, num_replicas=replicas, rank=rank), limit)}
        return frozenset({True: "adversarial", False: "utility"}[kind] for kind in kinds)

    def split_of(self, stage: str) -> str:
        """The pair set a stage reads (``train``, ``val``, ``test``): the key of :meth:`split_loaders`."""
        return "val" if stage == "test" and self.test_dataset is self.val_dataset else stage

    def split_loaders(self, shard: bool = False) -> dict[str, ResumableDataLoader]:
        """A loader per distinct pair set (``train``, ``val``, ``test``), every pair once in order and no utility
        rows, for per-pair precomputation (C-AdvIPO's clean reference: key tables by ``split_of(stage)`` and
        ``batch.index``). With ``shard`` each rank gets its padded share."""
        sets = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}
        if self.test_dataset is self.val_dataset:
            del sets["test"]
        return {k: self._loader(AdversarialStream(d.pairs, None, mixed=False, max_length=self.max_length),
                                self.val_batch_size, shard=shard)
                for k, d in sets.items() if d is not None and d.pairs}
