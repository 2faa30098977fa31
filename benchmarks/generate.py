"""Benchmark: lit_align's KV-cache sampler vs HF ``generate`` (greedy, CPU, one thread).

Builds a tiny Qwen2-shaped model locally (hidden 64, 2 layers, vocab 4096; nothing is
downloaded), then times greedy generation of ``--new-tokens`` tokens for ``--batch``
prompts of 32 tokens with both :func:`lit_align.rollout.sampler.sample` and
``model.generate(use_cache=True)``. The EOS id is outside the vocabulary, so no row stops
early and both produce exactly ``batch * new_tokens`` tokens (checked to be identical).

``--sample``: sampling at temperature 1 instead (no top-k/top-p), lit_align with one generator per row (as the
online methods draw), the prompts left-padded to lengths between 16 and 32; the two outputs then differ (each side
draws its own noise) and only their shapes are checked.

Prints one JSON line::

    {"bench": "generate", "lit_align_tok_s": ..., "hf_generate_tok_s": ..., "ratio": ...}

where ``ratio = lit_align_tok_s / hf_generate_tok_s`` (>= 1.0 means lit_align is faster).

Usage: ``python benchmarks/generate.py [--new-tokens 64] [--batch 8] [--repeats 10] [--sample]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python benchmarks/generate.py`

from lit_align.rollout.sampler import SamplingConfig, sample  # noqa: E402

VOCAB = 4096
PROMPT_LEN = 32
PAD = 0
EOS = VOCAB  # never produced: ids are < VOCAB


def build_model() -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def median_seconds(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each function; runs are interleaved so load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample", action="store_true", help="sample (per-row generators, padded prompts)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = build_model()
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, VOCAB, (args.batch, PROMPT_LEN), generator=gen)  # (B, P)
    prompt_mask = torch.ones_like(prompt_ids)  # (B, P)
    if args.sample:  # left padding: row i keeps its last 16..32 tokens
        keep = torch.randint(PROMPT_LEN // 2, PROMPT_LEN + 1, (args.batch, 1), generator=gen)  # (B, 1)
        prompt_mask = (torch.arange(PROMPT_LEN) >= PROMPT_LEN - keep).long()  # (B, P)
        prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, PAD)
    config = SamplingConfig(max_new_tokens=args.new_tokens, do_sample=args.sample)

    def run_lit_align() -> torch.Tensor:
        rows = [torch.Generator().manual_seed(i) for i in range(args.batch)] if args.sample else None
        return sample(model, prompt_ids, prompt_mask, config, eos_token_id=EOS, pad_token_id=PAD,
                      generator=rows).response_ids

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=args.sample,
                top_k=0 if args.sample else None,
                top_p=1.0 if args.sample else None,
                max_new_tokens=args.new_tokens,
                eos_token_id=EOS,
                pad_token_id=PAD,
                use_cache=True,
            )
        return out[:, PROMPT_LEN:]

    ours, ref = run_lit_align(), run_hf()
    if ours.shape != (args.batch, args.new_tokens) or ref.shape != ours.shape or (
            not args.sample and not torch.equal(ours, ref)):
        raise SystemExit("lit_align sample and HF generate disagree; benchmark is meaningless")

    tokens = args.batch * args.new_tokens
    medians = median_seconds({"lit_align": run_lit_align, "hf": run_hf}, args.warmup, args.repeats)
    lit_s, hf_s = medians["lit_align"], medians["hf"]
    lit_tok_s, hf_tok_s = tokens / lit_s, tokens / hf_s
    print(
        json.dumps(
            {
                "bench": "generate_sample" if args.sample else "generate",
                "lit_align_tok_s": round(lit_tok_s, 1),
                "hf_generate_tok_s": round(hf_tok_s, 1),
                "ratio": round(lit_tok_s / hf_tok_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
