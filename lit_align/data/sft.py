"""SFT data: (prompt, response) records -> :class:`~lit_align.data.batches.SequenceBatch`."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lit_align.data.base import TokenizedDataModule
from lit_align.data.records import Record
from lit_align.data.tokenize import SequenceCollator, SequenceExample, encode_prompt, encode_response

__all__ = ["SFTDataModule"]


class SFTDataModule(TokenizedDataModule):
    """Supervised fine-tuning pairs; the loss covers response tokens (and the EOS) only.

    Records need ``prompt`` and ``response`` (strings, or chat-message lists). Example::

        data:
          class_path: lit_align.data.SFTDataModule
          init_args:
            train: {path: builtin:instructions}
            batch_size: 16
            max_length: 256
    """

    required_fields = ("prompt", "response")

    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase, chat: bool) -> SequenceExample:
        return SequenceExample(
            encode_prompt(tokenizer, record["prompt"], chat), encode_response(tokenizer, record["response"]), index
        )

    def _collator(self, pad_token_id: int) -> SequenceCollator:
        return SequenceCollator(pad_token_id)
