"""Peak memory and time of scoring responses: naive full logits vs ``lit_align.rollout.sequence_logps``.

Workload (forward + backward of ``sum_b log p(response_b | prompt_b)``):

* model: Qwen2 with Qwen2.5's padded vocabulary of 151,936 tokens, ``hidden_size=16``, 2 layers,
  4 attention heads (2 KV heads), ``intermediate_size=64``, untied LM head (~4.9M parameters,
  almost all in the embedding and the head), seeded, fp32, CPU, ``torch.set_num_threads(1)``;
* batch: 16 sequences x 66 tokens, no padding, the first 33 tokens prompt and the last 33
  response (the loss mask), random token ids;
* (a) naive: ``model(...).logits`` (B, T, V) -> ``log_softmax`` -> ``gather`` -> mask -> sum;
  (b) lit_align: ``sequence_logps(model, ...)`` with its default chunking.

Memory method: each path runs in a **fresh subprocess**. After the model and batch are built,
the worker resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets
``VmHWM`` to the current ``VmRSS``), runs one forward + backward, and reports ``VmHWM - VmRSS``
measured just before it: the peak resident memory the step added (activations, logits, their
gradients, parameter gradients). Large tensors are ``mmap``-ed by the allocator and handed back on
free, so RSS tracks live tensors closely; running each path in its own process keeps one path's
freed-but-cached memory out of the other's numbers. Where ``clear_refs`` is not writable the worker
falls back to ``ru_maxrss`` (peak since process start) minus the RSS before the step.

Time: median wall time of ``--repeats`` further forward + backward steps in the same worker.
``max_abs_diff``: max |naive - lit_align| over the 16 sequence log-probs.

Run: ``python benchmarks/logps_memory.py``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936
BATCH, PROMPT, RESPONSE = 16, 33, 33
MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024  # reset took effect (1 MiB slack)
    except OSError:
        return False


def _build():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).float().train()
    T = PROMPT + RESPONSE
    input_ids = torch.randint(0, VOCAB, (BATCH, T), generator=torch.Generator().manual_seed(1))  # (B, T)
    attention_mask = torch.ones(BATCH, T, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(BATCH, T, dtype=torch.long)  # (B, T)
    loss_mask[:, PROMPT:] = 1
    return model, input_ids, attention_mask, loss_mask


def _naive_step(model, input_ids, attention_mask, loss_mask):
    from lit_align.rollout.logps import position_ids_from_mask

    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).logits  # (B, T, V)
    logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    seq = (logps * loss_mask[:, 1:]).sum(-1)  # (B,)
    seq.sum().backward()
    return seq.detach()


def _lit_align_step(model, input_ids, attention_mask, loss_mask):
    from lit_align.rollout.logps import sequence_logps

    seq = sequence_logps(model, input_ids, attention_mask, loss_mask)  # (B,)
    seq.sum().backward()
    return seq.detach()


def _worker(path: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    step = {"naive": _naive_step, "lit_align": _lit_align_step}[path]
    model, input_ids, attention_mask, loss_mask = _build()

    exact = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seq = step(model, input_ids, attention_mask, loss_mask)
    if exact:
        peak_kib = _status_kib("VmHWM") - rss_before
        method = "VmHWM"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(rss_before, maxrss_before)
        method = "ru_maxrss"

    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(model, input_ids, attention_mask, loss_mask)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "path": path,
        "peak_mb": peak_kib / 1024,
        "ms": statistics.median(times),
        "method": method,
        "seq_logps": seq.double().tolist(),
    }


def _run_worker(path: str, repeats: int) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", path, "--repeats", str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["naive", "lit_align"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward steps per path")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.repeats)))
        return

    naive = _run_worker("naive", args.repeats)
    ours = _run_worker("lit_align", args.repeats)
    diff = max(abs(a - b) for a, b in zip(naive["seq_logps"], ours["seq_logps"]))
    print(
        json.dumps(
            {
                "bench": "logps_memory",
                "naive_peak_mb": round(naive["peak_mb"], 1),
                "lit_align_peak_mb": round(ours["peak_mb"], 1),
                "ratio": round(ours["peak_mb"] / naive["peak_mb"], 4),
                "naive_ms": round(naive["ms"], 1),
                "lit_align_ms": round(ours["ms"], 1),
                "max_abs_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
