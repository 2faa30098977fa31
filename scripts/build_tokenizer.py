"""Train the bundled tiny byte-level BPE tokenizer.

Run from the repository root (after ``scripts/build_builtin_data.py``)::

    python scripts/build_tokenizer.py
    python scripts/build_tokenizer.py --data DIR --out DIR

The tokenizer is trained with the ``tokenizers`` library on every line of
``corpus.txt`` plus every string of the ``.jsonl`` files that
``build_builtin_data.py`` writes (:data:`TRAINING_FILES`) in the data
directory (default ``lit_align/data/builtin``), in a fixed order, and saved
with ``transformers.PreTrainedTokenizerFast.save_pretrained`` into the output
directory (default ``lit_align/models/assets/tiny_tokenizer``).

Properties:

* vocabulary of 1024 entries: the special tokens below, the 256 byte symbols
  and the learned merges;
* special tokens, with fixed ids in this order: ``<|pad|>`` (pad token, id 0),
  ``<|endoftext|>`` (eos token, id 1), ``<|user|>``, ``<|assistant|>``,
  ``<|system|>``, ``<|end|>``; there is no bos or unk token;
* byte-level pre-tokenizer (``add_prefix_space=False``) and decoder, so
  ``decode(encode(text)) == text`` for any text, ASCII or not;
* chat template: ``<|{role}|>\\n{content}<|end|>\\n`` per message, followed by
  ``<|assistant|>\\n`` when ``add_generation_prompt`` is true;
* right padding, ``model_max_length`` 2048.

Training runs on a single thread and the output is deterministic: running the
script twice produces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Single-threaded training keeps the merge order reproducible; this must be set
# before ``tokenizers`` starts its thread pool.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "lit_align" / "data" / "builtin"
DEFAULT_OUT = ROOT / "lit_align" / "models" / "assets" / "tiny_tokenizer"

VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 2048
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, *CHAT_TOKENS]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _strings(value: Any) -> Iterator[str]:
    """Yield every string inside a JSON value, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


#: The ``.jsonl`` files the tokenizer is trained on, in this order (the files ``build_builtin_data.py`` writes;
#: later built-ins such as ``isara_seeds.jsonl`` are left out, so adding one does not change the tokenizer).
TRAINING_FILES = ("fictitious_facts.jsonl", "instructions.jsonl", "preferences.jsonl")


def training_texts(data_dir: Path) -> list[str]:
    """Return the training texts: corpus lines, then the strings of :data:`TRAINING_FILES` file by file."""
    texts = [line for line in (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines() if line]
    for path in (data_dir / name for name in TRAINING_FILES):
        with path.open(encoding="utf-8") as f:
            for line in f:
                texts.extend(_strings(json.loads(line)))
    return texts


def train_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer as a ``PreTrainedTokenizerFast`` with special tokens and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=CHAT_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build(data_dir: Path, out: Path) -> PreTrainedTokenizerFast:
    """Train on ``data_dir`` and save the tokenizer into ``out`` (created if missing)."""
    tokenizer = wrap(train_tokenizer(training_texts(data_dir)))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"data directory (default: {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    build(args.data, args.out)


if __name__ == "__main__":
    main()
