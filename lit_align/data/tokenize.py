"""Turning records into token ids: chat formatting, truncation that keeps the response, collation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.errors import ConfigError
from lit_align.padding import pad_rows

__all__ = [
    "PreferenceCollator",
    "PreferenceExample",
    "SequenceCollator",
    "SequenceExample",
    "TokenizedDataset",
    "encode_prompt",
    "encode_prompts",
    "encode_response",
    "encode_responses",
    "check_response_room",
    "prompt_response_batch",
    "truncate_keep_response",
    "warn_truncated",
]

Text = str | list[dict]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text, chat_template: bool) -> list[int]:
    """Token ids of a prompt; with ``chat_template`` the prompt is a user turn (or a message list)
    followed by the generation prompt, otherwise plain text with the tokenizer's special tokens."""
    return encode_prompts(tokenizer, [prompt], chat_template)[0]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Text], chat_template: bool) -> list[list[int]]:
    """:func:`encode_prompt` of each prompt, in one tokenizer call."""
    if not prompts:
        return []
    if chat_template:
        texts = [tokenizer.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                               add_generation_prompt=True, tokenize=False) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    if any(isinstance(p, list) for p in prompts):
        raise ValueError("a conversational prompt (list of messages) needs a tokenizer with a chat template")
    return tokenizer(list(prompts))["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, response: Text) -> list[int]:
    """Token ids of a response followed by EOS (a message list contributes its last message)."""
    return encode_responses(tokenizer, [response])[0]


def encode_responses(tokenizer: PreTrainedTokenizerBase, responses: list[Text]) -> list[list[int]]:
    """:func:`encode_response` of each response, in one tokenizer call (a fast tokenizer encodes the batch at once:
    16 short responses in about a fifth of the time of 16 calls)."""
    if not responses:
        return []
    texts = [r[-1]["content"] if isinstance(r, list) else r for r in responses]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def truncate_keep_response(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Fit ``prompt + response`` in ``max_length``: cut the prompt from the left first (keeping at
    least one prompt token), then the response from the right. Returns ``(prompt, response, cut)``."""
    overflow = len(prompt) + len(response) - max_length
    if overflow <= 0:
        return prompt, response, False
    cut_prompt = max(0, min(overflow, len(prompt) - 1))  # an empty prompt stays empty
    prompt = prompt[cut_prompt:]
    overflow -= cut_prompt
    if overflow > 0:
        response = response[: len(response) - overflow]
    return prompt, response, True


@dataclass
class SequenceExample:
    """A tokenized (prompt, response) example, untruncated."""

    prompt: list[int]
    response: list[int]
    index: int


@dataclass
class PreferenceExample:
    """A tokenized (prompt, chosen, rejected) example, untruncated."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    index: int
    margin: float | None = None
    """The record's ``margin`` field (a per-pair preference margin), when it has one."""


def _truncate(ex: SequenceExample | PreferenceExample, max_length: int) -> tuple[SequenceExample | PreferenceExample, bool]:
    if isinstance(ex, SequenceExample):
        prompt, response, cut = truncate_keep_response(ex.prompt, ex.response, max_length)
        return SequenceExample(prompt, response, ex.index), cut
    p_c, chosen, cut_c = truncate_keep_response(ex.prompt, ex.chosen, max_length)
    p_r, rejected, cut_r = truncate_keep_response(ex.prompt, ex.rejected, max_length)
    prompt = p_c if len(p_c) <= len(p_r) else p_r  # one prompt for both, short enough for either
    room = max_length - len(prompt)
    return PreferenceExample(prompt, chosen[:room], rejected[:room], ex.index, ex.margin), cut_c or cut_r


def _responses(ex: SequenceExample | PreferenceExample) -> tuple[list[int], ...]:
    return (ex.response,) if isinstance(ex, SequenceExample) else (ex.chosen, ex.rejected)


def check_response_room(tokenizer: PreTrainedTokenizerBase, chat_template: bool, max_length: int) -> None:
    """Refuse a ``data.max_length`` that the prompt format alone fills (the chat template around an empty
    prompt), leaving no token for a response."""
    overhead = len(encode_prompt(tokenizer, "", chat_template))
    if max_length <= overhead:
        kind = "the chat template" if chat_template else "the tokenizer's special tokens"
        raise ConfigError(
            f"data.max_length={max_length} leaves no room for a response: {kind} around an empty prompt already "
            f"takes {overhead} tokens. Raise data.max_length well above {overhead}."
        )


def warn_truncated(dataset: TokenizedDataset | None, split: str) -> None:
    """Warn that examples of ``split`` (``validation``, ``test``...) were cut to ``data.max_length``."""
    if dataset is None or not getattr(dataset, "truncated", 0):
        return
    also = f"; {dataset.responses_cut} lost part of their response too" if dataset.responses_cut else ""
    rank_zero_warn(
        f"{dataset.truncated} of {len(dataset)} {split} examples are longer than data.max_length="
        f"{dataset.max_length}; their prompts were cut from the left{also}. Raise data.max_length to keep them whole.",
        category=UserWarning,
    )


class TokenizedDataset(Dataset):
    """Tokenized examples, truncated to ``max_length`` by :func:`truncate_keep_response`.

    ``truncated`` counts the examples that were cut; the train loader warns about it every epoch.
    """

    def __init__(self, examples: list[SequenceExample] | list[PreferenceExample], max_length: int) -> None:
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        pairs = [_truncate(ex, max_length) for ex in examples]
        self.examples = [ex for ex, _ in pairs]
        self.truncated = sum(cut for _, cut in pairs)
        #: examples whose response (chosen or rejected) lost tokens, not only their prompt
        self.responses_cut = sum(_responses(new) != _responses(old) for old, (new, _) in zip(examples, pairs))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SequenceExample | PreferenceExample:
        return self.examples[i]

    def fingerprint(self) -> str:
        """sha256 of every token id and index, in order: changes whenever the data or tokenizer do."""
        h = hashlib.sha256(f"max_length={self.max_length}".encode())
        for ex in self.examples:
            parts = [ex.prompt, ex.response] if isinstance(ex, SequenceExample) else [ex.prompt, ex.chosen, ex.rejected]
            for p in parts:
                h.update(torch.tensor(p, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
            h.update(str(ex.index).encode())
        return h.hexdigest()


def prompt_response_batch(rows: list[tuple[list[int], list[int]]], index: list[int] | torch.Tensor,
                          pad_token_id: int) -> SequenceBatch:
    """``(prompt, response)`` token-id rows as one :class:`SequenceBatch`: prompt then response, right-padded with
    ``pad_token_id``, ``loss_mask`` 1 on the response tokens; ``index`` (B,) gives each row's example index."""
    ids, attn = pad_rows([list(p) + list(r) for p, r in rows], pad_token_id, side="right")  # (B, T) each
    loss = torch.zeros_like(attn)  # (B, T)
    for i, (p, r) in enumerate(rows):
        loss[i, len(p) : len(p) + len(r)] = 1
    return SequenceBatch(ids, attn, loss, torch.as_tensor(index, dtype=torch.long))


@dataclass
class SequenceCollator:
    """Right-pads :class:`SequenceExample` s into a :class:`SequenceBatch`."""

    pad_token_id: int

    def __call__(self, examples: list[SequenceExample]) -> SequenceBatch:
        return prompt_response_batch([(e.prompt, e.response) for e in examples], [e.index for e in examples],
                                  self.pad_token_id)


@dataclass
class PreferenceCollator:
    """Right-pads :class:`PreferenceExample` s; chosen and rejected are padded to one width so the
    method can run both in a single forward (``SequenceBatch.cat``)."""

    pad_token_id: int

    def __call__(self, examples: list[PreferenceExample]) -> PreferenceBatch:
        idx = [e.index for e in examples]
        chosen = prompt_response_batch([(e.prompt, e.chosen) for e in examples], idx, self.pad_token_id)
        rejected = prompt_response_batch([(e.prompt, e.rejected) for e in examples], idx, self.pad_token_id)
        margins = [e.margin for e in examples]
        margin = torch.tensor(margins, dtype=torch.float32) if None not in margins else None  # (B,)
        return PreferenceBatch(chosen=chosen, rejected=rejected, index=chosen.index, margin=margin)
