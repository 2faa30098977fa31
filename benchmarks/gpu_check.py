"""GPU check: lit_align's sampler, chunked log-probs and a DPO step on a Qwen2-0.5B-shaped model (CUDA, bf16).

Not part of ``run_all.py`` (those benchmarks are CPU-only by design). Builds a randomly
initialised Qwen2 model from a config (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151,936, bf16; nothing is downloaded) and measures:

(a) greedy generation, batch 32, prompts of 64 tokens, 128 new tokens:
    ``lit_align.rollout.sampler.sample`` vs ``model.generate(use_cache=True)``, tokens/s, and
    whether the greedy outputs are identical (EOS outside the vocabulary, so no row stops early);
(b) scoring 16 x 512 tokens (last 256 scored), forward + backward:
    ``lit_align.rollout.logps.token_logps`` vs naive full logits -> log_softmax -> gather,
    peak CUDA memory added by the step (``torch.cuda.max_memory_allocated``) and median time;
(c) one DPO optimiser step (AdamW) on 8 pairs x 512 tokens, chosen and rejected concatenated,
    reference = frozen copy under no_grad: lit_align (``token_logps`` + ``lit_align.losses.dpo_loss``)
    vs a hand loop with full logits; median time and peak memory.

Prints one JSON line ``{"bench": "gpu_check", ...}``.

``--only gen_fp32`` repeats (a) in fp32 (TF32 off) to check greedy equality without bf16 near-ties.

Usage: ``python benchmarks/gpu_check.py [--only gen,logps,dpo,gen_fp32] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_align.losses import dpo_loss  # noqa: E402
from lit_align.rollout.logps import position_ids_from_mask, token_logps  # noqa: E402
from lit_align.rollout.sampler import SamplingConfig, sample  # noqa: E402

VOCAB = 151_936
PAD = 0
EOS = VOCAB  # never produced


def build_model(dtype=torch.bfloat16) -> torch.nn.Module:
    config = Qwen2Config(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.to("cuda")


def timed(fn, warmup: int, repeats: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_generate(model, repeats: int) -> dict:
    batch, prompt_len, new = 32, 64, 128
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(1, VOCAB, (batch, prompt_len), generator=gen).cuda()
    prompt_mask = torch.ones_like(prompt_ids)
    config = SamplingConfig(max_new_tokens=new, do_sample=False)
    model.eval()

    def ours():
        return sample(model, prompt_ids, prompt_mask, config, eos_token_id=EOS, pad_token_id=PAD).response_ids

    def hf():
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                                 max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD, use_cache=True)
        return out[:, prompt_len:]

    t_ours, a = timed(ours, 1, repeats)
    t_hf, b = timed(hf, 1, repeats)
    same = a.shape == b.shape and bool(torch.equal(a, b))
    agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    # bf16 near-ties can flip an argmax between kernels, after which a row diverges: count the rows
    # identical to the end and the mean position of the first differing token.
    diff = (a != b) if a.shape == b.shape else torch.ones(batch, new, dtype=torch.bool, device=a.device)
    first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((batch,), new, device=a.device))
    tokens = batch * new
    return {
        "gen_lit_align_tok_s": round(tokens / t_ours, 1),
        "gen_hf_tok_s": round(tokens / t_hf, 1),
        "gen_ratio": round(t_hf / t_ours, 3),
        "gen_greedy_identical": same,
        "gen_token_agreement": round(agree, 4),
        "gen_rows_identical": int((~diff.any(1)).sum()),
        "gen_mean_first_diff": round(float(first.float().mean()), 1),
    }


def _batch(batch: int, length: int, scored: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen).cuda()
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, length - scored:] = 1
    return ids, attn, loss_mask


def naive_seq_logps(model, ids, attn, loss_mask):
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * loss_mask[:, 1:]).sum(-1)


def ours_seq_logps(model, ids, attn, loss_mask):
    return token_logps(model, ids, attn, loss_mask).sum()


def bench_logps(model, repeats: int) -> dict:
    ids, attn, loss_mask = _batch(16, 512, 256, 2)
    model.train()
    out = {}
    vals = {}
    for name, fn in (("naive", naive_seq_logps), ("lit_align", ours_seq_logps)):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def step(fn=fn):
            model.zero_grad(set_to_none=True)
            seq = fn(model, ids, attn, loss_mask)
            seq.sum().backward()
            return seq.detach()

        vals[name] = step()
        peak = torch.cuda.max_memory_allocated() - base
        t, _ = timed(step, 1, repeats)
        out[f"logps_{name}_peak_mib"] = round(peak / 2**20, 1)
        out[f"logps_{name}_ms"] = round(t * 1e3, 2)
    model.zero_grad(set_to_none=True)
    out["logps_max_abs_diff"] = float((vals["naive"].float() - vals["lit_align"].float()).abs().max())
    out["logps_mem_ratio"] = round(out["logps_lit_align_peak_mib"] / out["logps_naive_peak_mib"], 3)
    return out


def bench_dpo(repeats: int) -> dict:
    out = {}
    pairs, length, scored = 8, 512, 256
    chosen = _batch(pairs, length, scored, 3)
    rejected = _batch(pairs, length, scored, 4)
    ids = torch.cat([chosen[0], rejected[0]])
    attn = torch.cat([chosen[1], rejected[1]])
    loss_mask = torch.cat([chosen[2], rejected[2]])
    for name, score in (("lit_align", lambda m: token_logps(m, ids, attn, loss_mask).sum()),
                        ("hand", lambda m: naive_seq_logps(m, ids, attn, loss_mask))):
        policy = build_model().train()
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

        def step(score=score, policy=policy, ref=ref, opt=opt):
            with torch.no_grad():
                r = score(ref)
            p = score(policy)
            loss, _ = dpo_loss(p[:pairs], p[pairs:], r[:pairs], r[pairs:], beta=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t, loss = timed(step, 2, repeats)
        out[f"dpo_{name}_ms"] = round(t * 1e3, 2)
        out[f"dpo_{name}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        out[f"dpo_{name}_loss"] = float(loss)
        del policy, ref, opt
        torch.cuda.empty_cache()
    out["dpo_ratio_vs_hand"] = round(out["dpo_lit_align_ms"] / out["dpo_hand_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="gen,logps,dpo")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    only = set(args.only.split(","))
    result: dict = {"bench": "gpu_check", "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if only & {"gen", "logps"}:
        model = build_model()
        result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        if "gen" in only:
            result.update(bench_generate(model, args.repeats))
            print(json.dumps(result), flush=True)
        if "logps" in only:
            result.update(bench_logps(model, args.repeats))
            print(json.dumps(result), flush=True)
        del model
        torch.cuda.empty_cache()
    if "gen_fp32" in only:  # greedy equality without bf16 near-ties (fp32 weights, TF32 off)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = build_model(torch.float32)
        result.update({k.replace("gen_", "gen_fp32_"): v for k, v in bench_generate(model, 1).items()})
        del model
        torch.cuda.empty_cache()
    if "dpo" in only:
        result.update(bench_dpo(args.repeats))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
