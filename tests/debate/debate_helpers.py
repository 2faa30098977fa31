"""Tiny models for the debate tests: a random tiny LM, a scripted one (fixed answers with fixed
probabilities, whatever the prompt), and a counter of the sampler's prefill calls."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lit_align.models import ModelSpec, build_causal_lm
from lit_align.models.spec import TinyArch

SPEC = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))


def tiny_model(tokenizer, seed: int = 0):
    """A random tiny causal LM (eval mode) of ``SPEC`` with initialisation seed ``seed``."""
    return build_causal_lm(replace(SPEC, seed=seed), tokenizer).eval()


def script(model, tokenizer, texts: list[str], probs: list[float]):
    """Make ``model`` answer ``texts[i]`` with probability ``probs[i]`` (then EOS), whatever the prompt.

    The hook sees the forward's ``input_ids``: a prefill (several tokens) gets the mixture over the
    texts' first tokens, a decoding step follows the text the previous token belongs to (the texts'
    tokens must be distinct) and ends with EOS.
    """
    eos = tokenizer.eos_token_id
    seqs = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
    vocab = model.get_output_embeddings().weight.shape[0]
    table = torch.full((vocab,), eos, dtype=torch.long)  # next token after each token
    for s in seqs:
        for a, b in zip(s, s[1:]):
            assert table[a] in (eos, b), "scripted texts must not share tokens"
            table[a] = b
    first = torch.full((vocab,), -math.inf)
    for s, p in zip(seqs, probs):
        first[s[0]] = math.log(p)

    def hook(module, args, kwargs, out):
        ids = kwargs["input_ids"]  # (B, T)
        logits = torch.full_like(out.logits[:, -1:], -math.inf)  # (B, 1, V)
        if ids.shape[1] > 1:
            logits[:] = first
        else:
            logits.scatter_(-1, table[ids[:, -1:]].unsqueeze(-1), 0.0)
        out.logits = logits
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def count_prefills(model) -> list[int]:
    """A one-element counter of the sampler's prefill forwards (more than one input token)."""
    calls = [0]

    def pre(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            calls[0] += 1

    model.register_forward_pre_hook(pre, with_kwargs=True)
    return calls
