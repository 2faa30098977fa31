"""A tiny BERT sequence classifier and its WordPiece tokenizer, built offline (encoder reward-model tests)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: Words of the tiny vocabulary besides single characters (enough for the built-in texts to tokenize).
WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "that", "how", "what", "i", "you", "can", "not",
         "sorry", "steal", "poison", "help", "town", "harbour", "##s", "##ed", "##ing")


def save_tiny_bert(path: Path, num_labels: int = 1, seed: int = 0) -> str:
    """Write a random 2-layer ``BertForSequenceClassification`` with ``num_labels`` logits and a
    ``BertTokenizerFast`` (lower case, no EOS token, ``[PAD]`` = 0) to ``path``; return the path."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *WORDS]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, do_lower_case=True,
                                  model_max_length=128)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
