"""Online pair sequences (others.md §7(g)4): prompt tokens never scored, padding of chosen, rejected and the
reference response to different lengths changes no log-prob, truncation keeps the prompt's last tokens."""

from __future__ import annotations

import torch
from conftest import tiny_lm

from lit_align.containers import SequenceBatch
from lit_align.data.online_pairs import fit_row, pair_batch
from lit_align.rollout import sequence_logps

PAD = 0


def _logps(model, batch: SequenceBatch) -> torch.Tensor:
    return sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)


def test_masks_cover_the_responses_only_and_placeholders_are_marked():
    """Prompt [5, 6, 7]; candidates [new 8 9], [dataset 10], [dataset 11 12 13]; pick (2, 0): chosen is a dataset
    response, rejected the new one; y_ref = [14]. A tied row gets candidates 0 / 1 and kept False."""
    pairs = pair_batch([[5, 6, 7], [3]], [[[8, 9], [10], [11, 12, 13]], [[4], [4]]], [(2, 0), None], 1,
                       torch.tensor([7, 9]), PAD, reference=[[14], [4, 4]])
    assert pairs.chosen.input_ids[0].tolist() == [5, 6, 7, 11, 12, 13]
    assert pairs.chosen.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert pairs.rejected.input_ids[0].tolist()[:5] == [5, 6, 7, 8, 9]
    assert pairs.rejected.loss_mask[0].tolist()[:5] == [0, 0, 0, 1, 1]
    assert pairs.reference.input_ids[0].tolist()[:4] == [5, 6, 7, 14]
    assert pairs.reference.loss_mask[0].tolist()[:4] == [0, 0, 0, 1]
    assert pairs.kept.tolist() == [True, False]
    assert pairs.chosen_new.tolist() == [False, False] and pairs.rejected_new.tolist() == [True, False]
    assert pairs.chosen.index.tolist() == [7, 9]


def test_prompt_tokens_contribute_nothing_and_padding_changes_nothing():
    """The summed log-prob of a response depends on the prompt as context only: scoring it alone (one row) and
    inside a batch where the other sequences (chosen, rejected, y_ref of another row) are longer, so that it
    is right-padded by 0 to 9 tokens, gives the same value; it equals the sum of the per-token log-probs of the
    response positions computed by hand from the logits."""
    model = tiny_lm(vocab_size=40, hidden_size=32)
    prompt, chosen, rejected, y_ref = [1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]
    pairs = pair_batch([prompt, [20]], [[chosen, rejected], [[21] * 9, [22]]], [(0, 1), (0, 1)], 1,
                       torch.tensor([0, 1]), PAD, reference=[y_ref, [23] * 11])
    both = SequenceBatch.cat([pairs.chosen, pairs.rejected, pairs.reference], PAD)  # (6, T)
    batched = _logps(model, both)
    for row, response in ((0, chosen), (2, rejected), (4, y_ref)):
        alone = pair_batch([prompt], [[response, response]], [(0, 1)], 1, torch.tensor([0]), PAD).chosen
        assert torch.allclose(batched[row], _logps(model, alone)[0], atol=1e-5)
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits.log_softmax(-1)[0]  # (T, V)
        by_hand = sum(logits[len(prompt) - 1 + t, tok] for t, tok in enumerate(response))
        assert torch.allclose(batched[row], by_hand, atol=1e-5)


def test_truncation_keeps_the_last_prompt_tokens():
    """max_length 8, max_prompt_length 3: prompt [1..6] + longest response [7, 8, 9, 10] = 10 > 8, so the prompt
    keeps its last 3 tokens [4, 5, 6]; room = 5, the responses fit. A response of 7 is then cut to 5."""
    prompt, responses = fit_row([1, 2, 3, 4, 5, 6], [[7, 8, 9, 10], [11]], 8, 3)
    assert prompt == [4, 5, 6] and responses == [[7, 8, 9, 10], [11]]
    prompt, responses = fit_row([1, 2, 3, 4, 5, 6], [[7] * 7, [11]], 8, 3)
    assert prompt == [4, 5, 6] and responses == [[7] * 5, [11]]
    assert fit_row([1, 2], [[3], [4, 5]], 8, 3) == ([1, 2], [[3], [4, 5]])  # fits: untouched
    pairs = pair_batch([[1, 2, 3, 4, 5, 6]], [[[7, 8, 9, 10], [11]]], [(0, 1)], 1, torch.tensor([0]), PAD,
                       max_length=8, max_prompt_length=3)
    assert pairs.chosen.input_ids[0].tolist() == [4, 5, 6, 7, 8, 9, 10]
    assert pairs.rejected.input_ids[0].tolist()[:4] == [4, 5, 6, 11]
