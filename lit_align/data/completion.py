"""Text-completion data for watermarking: a fixed-length prompt prefix and the human continuation.

Each kept record gives a prompt (token ids of the module tokenizer) and the *human* continuation
that followed it, plus both decoded to strings, because a detector may use another tokenizer.
The formats follow the released code of the RL watermark (Xu, Yao, Liu 2024, "Learning to Watermark
LLM-generated Text via Reinforcement Learning", arXiv 2403.10553; github.com/xiaojunxu/learning-to-watermark-llm:
``utils.py``, ``pretrain_detector.py``). Two formats:

* ``text`` (C4 realnewslike, the built-in corpus): the record's ``text`` is tokenized once;
  prompt = its first ``prompt_tokens`` tokens exactly, continuation = the next ``continuation_tokens``.
  Records shorter than ``prompt_tokens + continuation_tokens`` tokens are dropped and counted.
* ``qa`` (PKU-SafeRLHF): prompt = ``prompt_template`` over the record's ``prompt``
  (``"### Question: {prompt}\\n ### Answer:"``), continuation = ``response_template`` over its
  ``response`` (``" {response}"``) followed by EOS, capped at ``continuation_tokens``. Prompts
  longer than ``prompt_tokens`` are dropped and counted.

Shortcut hygiene (a difference in length, EOS or tokenization between human and LLM text would let
the detector separate them without any watermark): every prompt of the ``text`` format has the same
length; human continuations are capped at the length the LLM may generate; ``append_eos`` ends the
human text with EOS as the LLM's ends; :func:`retokenize` is the one way to turn *both* human and LLM strings
into a detector's token ids. Llama-style tokenizers (which add a leading space themselves) need
``strip_leading_whitespace`` here and in :func:`retokenize`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.batches import SequenceBatch
from lit_align.data.records import BUILTIN_DIR, DataSource, Record, load_records
from lit_align.data.tokenize import SequenceCollator, SequenceExample
from lit_align.errors import ConfigError, DataError

__all__ = [
    "CompletionBatch",
    "CompletionCollator",
    "CompletionDataset",
    "CompletionExample",
    "TextCompletionDataModule",
    "load_completion_records",
    "retokenize",
]

#: Built-in plain-text sources: ``builtin:<name>`` -> a ``.txt`` file with one passage per line (-> ``{text}``).
_BUILTIN_TEXT = {"corpus": "corpus.txt"}


def load_completion_records(source: DataSource, required: Sequence[str], optional: Sequence[str] = ()) -> list[Record]:
    """:func:`~lit_align.data.records.load_records`, plus ``builtin:corpus`` (one ``{text}`` record per
    non-empty line of ``corpus.txt``; ``limit`` applies)."""
    name = source.path.removeprefix("builtin:") if source.path.startswith("builtin:") else None
    if name not in _BUILTIN_TEXT:
        return load_records(source, required, optional)
    if "text" not in required:
        raise DataError(f"data source {source.path!r} has only a 'text' field; use data.format='text'")
    lines = Path(str(BUILTIN_DIR / _BUILTIN_TEXT[name])).read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if source.limit is not None:
        texts = texts[: source.limit]
    return [{"_source": source.path, "_source_index": i, "text": t} for i, t in enumerate(texts)]


def retokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int | None = None,
               strip_leading_whitespace: bool = False) -> list[list[int]]:
    """Token ids of strings in ``tokenizer`` (no special tokens added; special-token *text* such as
    an EOS string is parsed), optionally cut to ``max_tokens``.

    Use it for human and LLM continuations alike, so the detector never sees a difference that comes
    from tokenization rather than from the text. ``strip_leading_whitespace`` drops leading spaces
    first, for tokenizers that add a space before the first word themselves (Llama); otherwise a
    decoded continuation starting with a space would gain a lone-space token (a detector shortcut).
    """
    texts = [t.lstrip() if strip_leading_whitespace else t for t in texts]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [list(x[:max_tokens]) if max_tokens is not None else list(x) for x in ids]


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text by default (a BOS for OPT and Llama, nothing for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


@dataclass
class CompletionExample:
    """One prompt with its human continuation.

    Attributes:
        prompt: prompt ids in the module tokenizer (its default prefix, e.g. BOS, then the prompt tokens).
        continuation: human continuation ids (ending with EOS when ``append_eos`` reached it).
        prompt_text: the prompt tokens decoded (without the special prefix).
        human_text: the continuation decoded (special tokens such as EOS kept as text).
        index: position in its dataset (0..N-1 over the kept examples).
        source_index: position of the record in its source.
    """

    prompt: list[int]
    continuation: list[int]
    prompt_text: str
    human_text: str
    index: int
    source_index: int


class CompletionDataset(Dataset):
    """Kept :class:`CompletionExample` s; ``dropped`` counts the records that were too short or too long."""

    def __init__(self, examples: list[CompletionExample], dropped: int, max_length: int) -> None:
        self.examples = [replace(ex, index=i) for i, ex in enumerate(examples)]
        self.dropped = dropped
        self.max_length = max_length
        self.truncated = 0  # examples are cut to fixed lengths by design; nothing to warn about

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> CompletionExample:
        return self.examples[i]

    def fingerprint(self) -> str:
        """sha256 of every token id and index, in order: changes whenever the data or tokenizer do."""
        h = hashlib.sha256(f"completion|max_length={self.max_length}".encode())
        for ex in self.examples:
            for part in (ex.prompt, ex.continuation):
                h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
            h.update(str(ex.index).encode())
        return h.hexdigest()


@dataclass
class CompletionBatch:
    """Prompts to complete and their human continuations.

    Attributes:
        prompt_ids: (B, P) prompt ids, left-padded (ready for generation).
        prompt_mask: (B, P) 1 on real prompt tokens.
        human: (B, T) prompt + human continuation, right-padded; ``loss_mask`` 1 on the continuation.
        index: (B,) example index in its dataset.
        prompt_text: B decoded prompts, for a detector with another tokenizer.
        human_text: B decoded human continuations, for a detector with another tokenizer.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    human: SequenceBatch
    index: Tensor
    prompt_text: list[str] = field(default_factory=list)
    human_text: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real tokens of the human sequences (prompt + continuation)."""
        return self.human.num_tokens


@dataclass
class CompletionCollator:
    """Left-pads the prompts and right-pads prompt + human continuation into a :class:`CompletionBatch`."""

    pad_token_id: int

    def __call__(self, examples: list[CompletionExample]) -> CompletionBatch:
        width = max(len(e.prompt) for e in examples)
        prompt_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)  # (B, P)
        prompt_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, P)
        for i, e in enumerate(examples):
            prompt_ids[i, width - len(e.prompt) :] = torch.tensor(e.prompt, dtype=torch.long)
            prompt_mask[i, width - len(e.prompt) :] = 1
        human = SequenceCollator(self.pad_token_id)(
            [SequenceExample(e.prompt, e.continuation, e.index) for e in examples]
        )
        return CompletionBatch(prompt_ids, prompt_mask, human, human.index,
                               [e.prompt_text for e in examples], [e.human_text for e in examples])


class TextCompletionDataModule(TokenizedDataModule):
    """Prompt prefixes with human continuations at fixed token lengths (watermark training and detection).

    Sources: a local file, an HF dataset id, or ``builtin:corpus`` (400 short passages; most are
    under 24 tiny-tokenizer tokens, hence the small default lengths). Examples::

        data:  # the tiny CPU setup
          class_path: lit_align.data.TextCompletionDataModule
          init_args:
            train: {path: builtin:corpus}
            prompt_tokens: 8
            continuation_tokens: 8

        data:  # C4 realnewslike at the paper's lengths (those of its released code, ``utils.py``)
          class_path: lit_align.data.TextCompletionDataModule
          init_args:
            train: {path: allenai/c4, subset: realnewslike, split: train, limit: 60000}
            val: {path: allenai/c4, subset: realnewslike, split: validation, limit: 15000}
            prompt_tokens: 32
            continuation_tokens: 128

        data:  # PKU-SafeRLHF Q&A: human continuation = " " + response_0 + EOS
          class_path: lit_align.data.TextCompletionDataModule
          init_args:
            train: {path: PKU-Alignment/PKU-SafeRLHF, fields: {response: response_0}}
            format: qa
            prompt_tokens: 100
            continuation_tokens: 100

    Batches are :class:`CompletionBatch` es; loaders are rank-sharded and resumable (the base class's).
    The datasets' ``dropped`` attribute counts the records left out.
    """

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        prompt_tokens: int = 8,
        continuation_tokens: int = 8,
        format: Literal["text", "qa"] = "text",
        prompt_template: str = "### Question: {prompt}\n ### Answer:",
        response_template: str = " {response}",
        append_eos: bool | None = None,
        strip_leading_whitespace: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            train: where the training records come from (``text`` field, or ``prompt``/``response`` for ``qa``).
            val: validation records; ``None`` splits ``val_fraction`` off ``train`` (seeded).
            test: records for ``lit-align test`` and ``predict``; ``None`` uses the validation records.
            val_fraction: share of ``train`` held out when ``val`` is not given; 0 disables validation.
            batch_size: prompts per step on each data-parallel rank.
            eval_batch_size: prompts per validation step (default ``batch_size``).
            prompt_tokens: ``text``: the exact prompt length in tokens (the paper: 32); ``qa``: the longest
                prompt kept. Counted without the tokenizer's own prefix (e.g. BOS), which every prompt gets.
            continuation_tokens: ``text``: the exact human continuation length (the paper: 128); ``qa``: the
                cap on it. Give the LLM the same cap on new tokens.
            format: ``text`` (a fixed-length prefix of each ``text``) or ``qa`` (templated prompt and response).
            prompt_template: ``qa`` prompt, a ``str.format`` template over the record's ``prompt``.
            response_template: ``qa`` human continuation, a template over the record's ``response``.
            append_eos: end each record's token ids with EOS before cutting (``None``: on for ``qa``,
                off for ``text``), so human text ends with EOS where the LLM's would.
            strip_leading_whitespace: strip leading spaces of the ``qa`` response before tokenizing
                (Llama tokenizers add one themselves; the spare space token would be a shortcut).
            shuffle: shuffle training examples each epoch (seeded by ``seed`` and the epoch).
            seed: seed of the validation split and the shuffling.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
        """
        if prompt_tokens <= 0 or continuation_tokens <= 0:
            raise ConfigError(f"data.prompt_tokens and data.continuation_tokens must be positive, got "
                             f"{prompt_tokens} and {continuation_tokens}")
        if format not in ("text", "qa"):
            raise ConfigError(f"data.format must be 'text' or 'qa', got {format!r}")
        super().__init__(train, val, test, val_fraction=val_fraction, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, max_length=prompt_tokens + continuation_tokens,
                         chat_template=False, shuffle=shuffle, seed=seed, num_workers=num_workers,
                         tokenizer=tokenizer)
        self.prompt_tokens, self.continuation_tokens, self.format = prompt_tokens, continuation_tokens, format
        self.prompt_template, self.response_template = prompt_template, response_template
        self.append_eos = (format == "qa") if append_eos is None else append_eos
        self.strip_leading_whitespace = strip_leading_whitespace
        self.required_fields = ("text",) if format == "text" else ("prompt", "response")
        self._prefix: list[int] = []

    # -- records ---------------------------------------------------------------------------
    def _load(self, source: DataSource) -> list[Record]:
        return load_completion_records(source, self.required_fields, self.optional_fields)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        if self.append_eos and self.tokenizer.eos_token_id is None:
            raise ConfigError("data.append_eos is on but the tokenizer has no EOS token")
        self._prefix = _special_prefix(self.tokenizer)
        train, val = self._split()
        self.train_dataset = self._tokenize(train, "train")
        self.val_dataset = self._tokenize(val, "val")
        self.test_dataset = self._tokenize(self._load(self.test_source), "test") if self.test_source else self.val_dataset

    # -- tokenization ----------------------------------------------------------------------
    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase,
                chat: bool = False) -> CompletionExample | None:
        """One record -> one example, or ``None`` when it does not fit the lengths."""
        eos = [tokenizer.eos_token_id] if self.append_eos else []
        if self.format == "text":
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + eos
            if len(ids) < self.prompt_tokens + self.continuation_tokens:
                return None
            prompt = ids[: self.prompt_tokens]
            continuation = ids[self.prompt_tokens : self.prompt_tokens + self.continuation_tokens]
        else:
            response = self.response_template.format(response=record["response"])
            if self.strip_leading_whitespace:
                response = response.lstrip()
            prompt = tokenizer(self.prompt_template.format(prompt=record["prompt"]), add_special_tokens=False)["input_ids"]
            if len(prompt) > self.prompt_tokens:
                return None
            continuation = (tokenizer(response, add_special_tokens=False)["input_ids"] + eos)[: self.continuation_tokens]
        return CompletionExample(
            prompt=self._prefix + prompt, continuation=continuation,
            prompt_text=tokenizer.decode(prompt), human_text=tokenizer.decode(continuation),
            index=index, source_index=record.get("_source_index", index),
        )

    def _tokenize(self, records: list[Record], split: str = "train") -> CompletionDataset | None:
        if not records:
            return None
        encoded = [self._encode(r, i, self.tokenizer) for i, r in enumerate(records)]
        kept = [ex for ex in encoded if ex is not None]
        dropped = len(encoded) - len(kept)
        what = (f"shorter than data.prompt_tokens + data.continuation_tokens = "
                f"{self.prompt_tokens} + {self.continuation_tokens} tokens" if self.format == "text"
                else f"with prompts longer than data.prompt_tokens = {self.prompt_tokens} tokens")
        if not kept:
            raise DataError(f"all {len(records)} {split} records are {what}; lower data.prompt_tokens / "
                             "data.continuation_tokens or use longer texts")
        if dropped:
            rank_zero_warn(f"{split}: dropped {dropped} of {len(records)} records {what}", category=UserWarning)
        return CompletionDataset(kept, dropped, len(self._prefix) + self.prompt_tokens + self.continuation_tokens)

    def _collator(self, pad_token_id: int) -> CompletionCollator:
        return CompletionCollator(pad_token_id)
