"""What the watermark detector reads: rollouts as prompt + continuation rows, the continuations decoded and
encoded again, EOS handled as the reference code does, paraphrases and other vocabularies."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_align.data.batches import SequenceBatch
from lit_align.data.completion import retokenize
from lit_align.data.tokenize import prompt_response_batch
from lit_align.rollout.sampler import Rollout

__all__ = ["as_batch", "detector_view", "encode_for", "ended_with_eos", "paraphrased"]


def as_batch(rollout: Rollout, index: Tensor | None = None) -> SequenceBatch:
    """A rollout as prompt + continuation rows, ``loss_mask`` on the continuation; ``index``: the rows' global
    example indices (default ``0..B-1``)."""
    loss_mask = torch.cat([torch.zeros_like(rollout.prompt_mask), rollout.response_mask], dim=1)
    index = index if index is not None else torch.arange(len(loss_mask), device=loss_mask.device)
    return SequenceBatch(rollout.sequences, rollout.attention_mask, loss_mask, index)


def ended_with_eos(rollout: Rollout, eos_token_id: int) -> Tensor:
    """(B,) whether each generated continuation ended with EOS."""
    last = (rollout.response_mask.sum(-1) - 1).clamp(min=0)
    return rollout.response_ids.gather(1, last[:, None]).squeeze(1).eq(eos_token_id) & rollout.response_mask.any(-1)


def detector_view(batch: SequenceBatch, tokenizer, *, max_tokens: int, retokenize_text: bool, eos_action: bool,
                  add_eos: Tensor | None = None) -> SequenceBatch:
    """What the detector reads: prompt + continuation with the continuation decoded and encoded again
    (:func:`~lit_align.data.completion.retokenize`, cut to ``max_tokens``), right-padded; the ids as they are
    without ``retokenize_text``. A final EOS is dropped (the reference code reads the score before the first
    EOS), or, with ``eos_action``, kept; then ``add_eos`` (B,) bool appends an EOS to rows that lack one: a human
    continuation gets one where the LLM's continuation of the same prompt ended with EOS, so the presence of EOS
    tells the detector nothing (no shortcut)."""
    eos = tokenizer.eos_token_id
    if not retokenize_text and add_eos is None and eos_action:
        return batch
    rows = []
    for i, (ids, attn, cont) in enumerate(zip(batch.input_ids, batch.attention_mask.bool(), batch.loss_mask.bool())):
        answer = ids[cont & attn].tolist()
        ended = bool(answer) and answer[-1] == eos
        if retokenize_text:
            text = tokenizer.decode(answer[:-1] if ended else answer, skip_special_tokens=True)
            body = retokenize([text], tokenizer, max_tokens=max_tokens)[0]
        else:
            body = answer[:-1] if ended else answer
        ended = eos_action and (ended or (add_eos is not None and bool(add_eos[i])))
        rows.append((ids[attn & ~cont].tolist(), body + ([eos] if ended else [])))
    view = prompt_response_batch(rows, batch.index.tolist(), tokenizer.pad_token_id)
    device = batch.input_ids.device
    return SequenceBatch(*(t.to(device) for t in (view.input_ids, view.attention_mask, view.loss_mask)), batch.index)


def paraphrased(rollout: Rollout, paraphraser: Callable[[list[str]], list[str]], tokenizer, *,
                max_tokens: int) -> tuple[Tensor, Tensor]:
    """(B, T) prompt + paraphrased continuation of every row, right-padded, re-encoded the same way as every
    other text (:func:`~lit_align.data.completion.retokenize`)."""
    rows = list(range(len(rollout.prompt_ids)))
    texts = [tokenizer.decode(rollout.response_ids[i][rollout.response_mask[i].bool()], skip_special_tokens=True)
             for i in rows]
    encoded = retokenize(paraphraser(texts), tokenizer, max_tokens=max_tokens)
    prompts = [rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist() for i in rows]
    batch = prompt_response_batch(list(zip(prompts, encoded)), rows, tokenizer.pad_token_id)
    device = rollout.prompt_ids.device
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def encode_for(target, tokenizer, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``tokenizer``'s ids decoded and encoded with the ``target`` tokenizer (another vocabulary), cut to
    its ``model_max_length`` (absolute positions: stay inside), padded; on ``ids``' device."""
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask)]
    cap = target.model_max_length if target.model_max_length < 100_000 else None
    enc = target(texts, return_tensors="pt", padding=True, truncation=cap is not None, max_length=cap).to(ids.device)
    return enc["input_ids"], enc["attention_mask"]
