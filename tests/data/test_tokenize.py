"""Tokenization: chat formatting, EOS, truncation that keeps the response, collation, fingerprints."""

from __future__ import annotations

import pytest
import torch

from lit_align.data import PreferenceBatch, SequenceBatch
from lit_align.data.tokenize import (
    PreferenceCollator,
    PreferenceExample,
    SequenceCollator,
    SequenceExample,
    TokenizedDataset,
    encode_prompt,
    encode_prompts,
    encode_response,
    encode_responses,
    prompt_response_batch,
    truncate_keep_response,
)
from lit_align.models import ModelSpec, TinyArch, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelSpec(tiny=TinyArch()))


# --------------------------------------------------------------------------- encoding


def test_prompt_with_chat_template_is_a_user_turn_and_generation_prompt(tok):
    ids = encode_prompt(tok, "What is 7 plus 5?", chat_template=True)
    assert tok.decode(ids) == "<|user|>\nWhat is 7 plus 5?<|end|>\n<|assistant|>\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")


def test_conversational_prompt_keeps_every_message(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = encode_prompt(tok, messages, chat_template=True)
    assert tok.decode(ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_prompt_without_chat_template_is_plain_text(tok):
    ids = encode_prompt(tok, "What is 7 plus 5?", chat_template=False)
    assert ids == tok("What is 7 plus 5?")["input_ids"]
    assert tok.decode(ids) == "What is 7 plus 5?"
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(tok, [{"role": "user", "content": "Hi"}], chat_template=False)


def test_response_ends_with_eos(tok):
    ids = encode_response(tok, "7 plus 5 is 12.")
    assert ids[-1] == tok.eos_token_id
    assert ids[:-1] == tok("7 plus 5 is 12.", add_special_tokens=False)["input_ids"]
    conversation = [{"role": "user", "content": "Sum?"}, {"role": "assistant", "content": "7 plus 5 is 12."}]
    assert encode_response(tok, conversation) == ids  # a message list contributes its last message


@pytest.mark.parametrize("chat", [True, False])
def test_batched_encoding_equals_one_call_per_text(tok, chat):
    """One tokenizer call for many texts (what rankers and online methods use) gives each text's own ids: no
    padding, special tokens and EOS as for a single text, a message list as its own text."""
    texts = ["What is 7 plus 5?", "Hi", "", "A longer prompt, with punctuation; and digits 12345."]
    prompts = texts + ([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]] if chat else [])
    assert encode_prompts(tok, prompts, chat_template=chat) == [
        tok(tok.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                    add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        if chat else tok(p)["input_ids"] for p in prompts]
    responses = texts + [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A."}]]
    assert encode_responses(tok, responses) == [
        tok(r[-1]["content"] if isinstance(r, list) else r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for r in responses]
    assert encode_prompts(tok, [], chat_template=chat) == [] and encode_responses(tok, []) == []


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    ("prompt", "response", "max_length", "expected"),
    [
        # fits exactly: untouched
        ([1, 2, 3], [4, 5], 5, ([1, 2, 3], [4, 5], False)),
        # overflow 2: the prompt loses its first two tokens, the response stays whole
        ([1, 2, 3, 4], [5, 6], 4, ([3, 4], [5, 6], True)),
        # the response alone fills max_length: one prompt token survives, the response loses its tail
        ([1, 2, 3], [4, 5, 6, 7], 3, ([3], [4, 5], True)),
        # the response is exactly max_length - 1: prompt cut to one token, response whole
        ([1, 2, 3], [4, 5, 6], 4, ([3], [4, 5, 6], True)),
        # an empty prompt stays empty and the response is cut by exactly the overflow
        ([], [1, 2, 3], 2, ([], [1, 2], True)),
    ],
)
def test_truncate_keep_response(prompt, response, max_length, expected):
    assert truncate_keep_response(prompt, response, max_length) == expected


def test_preference_truncation_shares_one_prompt_and_both_fit():
    """prompt 6, chosen 2, rejected 5, max 8: rejected needs the prompt cut to 3 tokens, so both use
    the last 3 prompt tokens; chosen (2) and rejected (5) stay whole (3 + 5 = 8)."""
    ex = PreferenceExample(prompt=[1, 2, 3, 4, 5, 6], chosen=[7, 8], rejected=[9, 10, 11, 12, 13], index=4)
    ds = TokenizedDataset([ex], max_length=8)
    out = ds[0]
    assert (out.prompt, out.chosen, out.rejected, out.index) == ([4, 5, 6], [7, 8], [9, 10, 11, 12, 13], 4)
    assert ds.truncated == 1


def test_preference_truncation_cuts_only_the_response_that_is_too_long():
    """max 4: chosen (5 tokens) alone is too long -> prompt keeps 1 token, chosen keeps 3, rejected whole."""
    ex = PreferenceExample(prompt=[1, 2, 3], chosen=[4, 5, 6, 7, 8], rejected=[9, 10], index=0)
    out = TokenizedDataset([ex], max_length=4)[0]
    assert (out.prompt, out.chosen, out.rejected) == ([3], [4, 5, 6], [9, 10])


def test_dataset_counts_truncated_examples():
    examples = [SequenceExample([1, 2], [3], 0), SequenceExample([1, 2, 3, 4], [5], 1), SequenceExample([1], [2], 2)]
    ds = TokenizedDataset(examples, max_length=3)
    assert ds.truncated == 1
    assert [len(e.prompt) + len(e.response) for e in ds] == [3, 3, 2]


# --------------------------------------------------------------------------- collation


def test_sequence_collator_right_pads_and_masks_the_response():
    examples = [SequenceExample([10, 11], [12, 1], index=5), SequenceExample([20], [21, 22, 23, 1], index=2)]
    batch = SequenceCollator(pad_token_id=0)(examples)
    assert isinstance(batch, SequenceBatch) and len(batch) == 2
    assert batch.input_ids.tolist() == [[10, 11, 12, 1, 0], [20, 21, 22, 23, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch.index.tolist() == [5, 2]
    assert batch.num_tokens == 9


def test_prompt_response_batch_takes_a_list_or_a_tensor_index():
    """The one collation of (prompt, response) rows (the collators, online pairs, unlearning and watermark views call
    it): prompt then response, right-padded, the response scored; a tensor index (online pairs) is kept as is."""
    rows = [([10, 11], [12, 1]), ([20], [21, 22, 23, 1])]
    from_list = prompt_response_batch(rows, [5, 2], pad_token_id=0)
    index = torch.tensor([5, 2])
    from_tensor = prompt_response_batch(rows, index, pad_token_id=0)
    for batch in (from_list, from_tensor):
        assert batch.input_ids.tolist() == [[10, 11, 12, 1, 0], [20, 21, 22, 23, 1]]
        assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
        assert batch.index.tolist() == [5, 2] and batch.index.dtype == torch.long
    assert from_tensor.index is index


def test_preference_collator_builds_both_sides_with_the_shared_prompt():
    examples = [
        PreferenceExample([10, 11], chosen=[12, 1], rejected=[13, 14, 15, 1], index=3),
        PreferenceExample([20], chosen=[21, 1], rejected=[22, 1], index=0),
    ]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert isinstance(batch, PreferenceBatch) and len(batch) == 2
    assert batch.index.tolist() == [3, 0]
    assert batch.chosen.index.tolist() == batch.rejected.index.tolist() == [3, 0]
    assert batch.chosen.input_ids.tolist() == [[10, 11, 12, 1], [20, 21, 1, 0]]
    assert batch.chosen.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert batch.rejected.input_ids.tolist() == [[10, 11, 13, 14, 15, 1], [20, 22, 1, 0, 0, 0]]
    assert batch.rejected.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert batch.rejected.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch.num_tokens == 7 + 9


def test_sequence_batch_cat_pads_to_the_widest():
    a = SequenceCollator(0)([SequenceExample([5], [6, 1], 0)])  # width 3
    b = SequenceCollator(0)([SequenceExample([7, 8], [9, 2, 1], 1)])  # width 5
    both = SequenceBatch.cat([a, b], pad_token_id=99)
    assert both.input_ids.tolist() == [[5, 6, 1, 99, 99], [7, 8, 9, 2, 1]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert both.loss_mask.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert both.index.tolist() == [0, 1]
    assert both.input_ids.dtype == both.loss_mask.dtype == torch.long


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_follows_data_and_max_length():
    def make(response_last=1, max_length=8, index=0):
        return TokenizedDataset([SequenceExample([1, 2, 3], [4, response_last], index)], max_length)

    assert make().fingerprint() == make().fingerprint()
    assert make(response_last=5).fingerprint() != make().fingerprint()
    assert make(max_length=9).fingerprint() != make().fingerprint()
    assert make(index=1).fingerprint() != make().fingerprint()
    # token boundaries matter: [1, 2] + [3] is not [1] + [2, 3]
    left = TokenizedDataset([SequenceExample([1, 2], [3], 0)], 8)
    right = TokenizedDataset([SequenceExample([1], [2, 3], 0)], 8)
    assert left.fingerprint() != right.fingerprint()
