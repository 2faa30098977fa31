"""Preference data: (prompt, chosen, rejected) records -> :class:`~lit_align.data.batches.PreferenceBatch`."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import Record, describe_record
from lit_align.data.tokenize import PreferenceCollator, PreferenceExample, encode_prompt, encode_response
from lit_align.errors import DataError

__all__ = ["PreferenceDataModule"]


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs for DPO-style methods.

    Records need ``chosen`` and ``rejected``, and ``prompt`` unless they are conversational:
    with chat-message lists (as in ``trl-lib/ultrafeedback_binarized``) the prompt defaults to
    every message of ``chosen`` but the last. Example::

        data:
          class_path: lit_align.data.PreferenceDataModule
          init_args:
            train: {path: builtin:preferences}
            batch_size: 8
    """

    required_fields = ("chosen", "rejected")
    optional_fields = ("prompt",)

    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase, chat: bool) -> PreferenceExample:
        prompt = record.get("prompt")
        if prompt is None:
            if not isinstance(record["chosen"], list):
                raise DataError(
                    f"{describe_record(record['_source'], record['_source_index'])}: missing field "
                    "'prompt' (only conversational records, whose `chosen` is a message list, may omit it)"
                )
            prompt = record["chosen"][:-1]
        return PreferenceExample(
            encode_prompt(tokenizer, prompt, chat),
            encode_response(tokenizer, record["chosen"]),
            encode_response(tokenizer, record["rejected"]),
            index,
        )

    def _collator(self, pad_token_id: int) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id)
