"""Preference data: (prompt, chosen, rejected) records -> :class:`~lit_align.data.batches.PreferenceBatch`."""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import DataSource, Record, describe_record, load_records
from lit_align.data.tokenize import PreferenceCollator, PreferenceExample, encode_prompt, encode_response
from lit_align.errors import DataError

__all__ = ["PreferenceDataModule"]


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs for DPO-style methods.

    Records need ``chosen`` and ``rejected``, and ``prompt`` unless they are conversational:
    with chat-message lists (as in ``trl-lib/ultrafeedback_binarized``) the prompt defaults to
    every message of ``chosen`` but the last. A record may also carry a numeric ``margin`` (how strongly
    ``chosen`` is preferred, e.g. Llama 2's graded ratings mapped to margins; TRL's ``margin`` column): when
    the records of a source have one, every record of that source must, and batches carry them as
    ``PreferenceBatch.margin`` (:class:`~lit_align.methods.RewardModelModule` reads them with
    ``margin: per_record``). Example::

        data:
          class_path: lit_align.data.PreferenceDataModule
          init_args:
            train: {path: builtin:preferences}
            batch_size: 8
    """

    required_fields = ("chosen", "rejected")
    optional_fields = ("prompt",)

    def _load(self, source: DataSource) -> list[Record]:
        records = load_records(source, self.required_fields, self.optional_fields, extra=("margin",))
        return _checked_margins(records)

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
            record.get("margin"),
        )

    def _collator(self, pad_token_id: int) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id)


def _checked_margins(records: list[Record]) -> list[Record]:
    """The records, their ``margin`` fields (when any record has one) checked: a finite number on every record."""
    if not any("margin" in r for r in records):
        return records
    for r in records:
        where = describe_record(r["_source"], r["_source_index"])
        value = r.get("margin")
        if value is None:
            raise DataError(f"{where}: missing field 'margin', which other records of this source have; give every "
                            "record a margin (0 for no preference strength) or none")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: field 'margin' must be a finite number, got {value!r}")
        r["margin"] = float(value)
    return records
