"""Benchmark: KGW watermark detection throughput and generation overhead (CPU, one thread).

1. **Detection**: :meth:`lit_align.watermark.KGWWatermark.score` on ``--rows`` x ``--length``
   random token ids (vocab 4096), tokens scored per second (target >= 1e6 tok/s).
2. **Generation overhead**: greedy decoding with the KGW bias on every step
   (:func:`lit_align.watermark.watermarked_sample`) vs the plain sampler
   (:func:`lit_align.rollout.sampler.sample`), with the tiny model of ``generate.py`` (Qwen2-shaped,
   hidden 64, 2 layers, vocab 4096, batch 8, prompt 32, +64 tokens; the EOS id is outside the
   vocabulary so every row generates all tokens). ``gen_overhead = plain_tok_s / kgw_tok_s``
   (target <= 1.1). The mean z-scores of the two outputs are reported as a sanity check.

Prints one JSON line::

    {"bench": "kgw", "detect_tok_s": ..., "plain_tok_s": ..., "kgw_tok_s": ..., "gen_overhead": ...,
     "z_kgw": ..., "z_plain": ...}

Usage: ``python benchmarks/kgw.py [--rows 64] [--length 512] [--repeats 10]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python benchmarks/kgw.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import EOS, PAD, PROMPT_LEN, VOCAB, build_model  # noqa: E402

from lit_align.rollout.sampler import SamplingConfig, sample  # noqa: E402
from lit_align.watermark import KGWWatermark, watermarked_sample  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import median_seconds  # noqa: E402  (the same interleaved timing as generate.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="detection batch: rows")
    parser.add_argument("--length", type=int, default=512, help="detection batch: tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    wm = KGWWatermark(VOCAB, gamma=0.5, delta=2.0)
    gen = torch.Generator().manual_seed(1)

    # -- detection throughput
    ids = torch.randint(0, VOCAB, (args.rows, args.length), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)  # (B, T)
    detect_s = median_seconds({"score": lambda: wm.score(ids, mask)}, args.warmup, max(args.repeats, 5))["score"]
    detect_tok_s = ids.numel() / detect_s

    # -- generation overhead
    model = build_model()
    prompt_ids = torch.randint(1, VOCAB, (args.batch, PROMPT_LEN), generator=gen)  # (B, P)
    prompt_mask = torch.ones_like(prompt_ids)  # (B, P)
    config = SamplingConfig(max_new_tokens=args.new_tokens, do_sample=False)

    def run_plain():
        return sample(model, prompt_ids, prompt_mask, config, eos_token_id=EOS, pad_token_id=PAD)

    def run_kgw():
        return watermarked_sample(model, prompt_ids, prompt_mask, config, wm, eos_token_id=EOS, pad_token_id=PAD)

    plain, kgw = run_plain(), run_kgw()
    if plain.response_ids.shape != (args.batch, args.new_tokens) or kgw.response_ids.shape != plain.response_ids.shape:
        raise SystemExit("a generation stopped early; benchmark is meaningless")
    z = {}
    for name, r in (("plain", plain), ("kgw", kgw)):
        score_mask = torch.cat([torch.zeros_like(r.prompt_mask), r.response_mask], dim=1)
        z[name] = wm.score(r.sequences, r.attention_mask, score_mask=score_mask).z.mean().item()

    tokens = args.batch * args.new_tokens
    medians = median_seconds({"plain": run_plain, "kgw": run_kgw}, args.warmup, args.repeats)
    plain_tok_s, kgw_tok_s = tokens / medians["plain"], tokens / medians["kgw"]
    print(
        json.dumps(
            {
                "bench": "kgw",
                "detect_tok_s": round(detect_tok_s, 1),
                "plain_tok_s": round(plain_tok_s, 1),
                "kgw_tok_s": round(kgw_tok_s, 1),
                "gen_overhead": round(plain_tok_s / kgw_tok_s, 3),
                "z_kgw": round(z["kgw"], 2),
                "z_plain": round(z["plain"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
