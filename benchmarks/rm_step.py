"""Benchmark: one reward-model training step, lit_align ``RewardModelModule`` vs TRL ``RewardTrainer``.

Workload, identical for both (the DPO benchmark's, :mod:`dpo_step`, whose helpers it shares):

* model: a Qwen2-shaped decoder (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, vocab 4096,
  fp32, seed 0) with a bias-free ``hidden -> 1`` head starting at zero, read at each sequence's last token.
  lit_align builds ``RewardModelSpec(model=ModelSpec(tiny=...), kind="scalar_head")`` (the default
  ``configs/rm/tiny.yaml`` shape); TRL gets an ``AutoModelForSequenceClassification`` (one label) built with
  transformers alone from the same config, its decoder given the same weights. Each worker reports a hash
  of its starting decoder and head (``model_fingerprint``'s algorithm) and the parent checks they agree;
* tokenizer: the bundled tiny tokenizer, no chat template; data: the DPO benchmark's synthetic pairs made of
  one-token words, prompt 64 tokens, chosen and rejected 63 tokens + EOS, so every sequence is exactly 128
  tokens and nothing is padded or truncated; 8 pairs per step (16 sequences, 2,048 tokens); each worker counts
  the real tokens per step and the parent asserts the counts agree;
* one step: the rewards of chosen and rejected (TRL: both whole sequences in one forward; lit_align: its
  default ``share_prompt``, each prompt once and both responses in one forward on its KV cache, the same
  scores), the Bradley-Terry loss with TRL's default ``center_rewards_coefficient`` (none), backward, AdamW
  step (lr 1e-5; each side's default implementation: fused for both), zero_grad.

Implementations (each in its own fresh subprocess, torch on one thread):

* ``lit_align``: the real ``RewardModelModule`` + ``PreferenceDataModule`` over a JSONL file of the pairs
  (``val_fraction=0``, ``chat_template=False``, ``max_length=256``) + a real ``lightning.Trainer`` (CPU, no
  logger, checkpointing, progress bar, model summary or validation);
* ``trl``: ``trl.RewardTrainer`` with its defaults otherwise (e.g. ``max_grad_norm=1.0``, the linear LR
  schedule, its reward metrics each step), ``max_length=256``, no gradient checkpointing.

Time: a step is one optimiser step from the framework's "step begins" hook to its "step ends" hook
(Lightning ``on_train_batch_start`` -> ``on_train_batch_end``; TRL ``on_step_begin`` -> ``on_step_end``),
``time.perf_counter``; batch loading is outside the span in both. The first ``--warmup`` steps are dropped,
reported is the median of the next ``--steps``; ``cpu_ms`` is the median process CPU time over the same spans
(less disturbed by other load on a shared machine). Memory: each worker's peak RSS from interpreter start.

Prints one JSON line (times in ms, memory in MiB)::

    {"bench": "rm_step", "lit_align_ms": ..., "trl_ms": ..., "ratio_vs_trl": ..., "targets_met": {...}, ...}

``ratio_vs_trl`` is ``lit_align_ms / trl_ms`` (lower is better); target ``<= 0.7``.

Usage: ``python benchmarks/rm_step.py [--steps 30] [--warmup 5] [--rounds 1] [--write]`` (``--write`` also
writes the line, the command and the versions to ``benchmarks/results_rm.json``; ``--profile DIR`` writes a
cProfile of each worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # lit_align, for `python benchmarks/rm_step.py`
sys.path.insert(0, str(HERE))  # the DPO benchmark's workload helpers

from dpo_step import (  # noqa: E402
    ARCH,
    PAIRS_PER_STEP,
    SEQ_LEN,
    _build_model,
    _pairs,
    _spec,
    _StepTimes,
    _tokenizer,
    timed_worker,
    trl_step_timer,
)

IMPLS = ("lit_align", "trl")
LR = 1e-5
TARGETS = {"ratio_vs_trl": 0.7}
RESULTS = HERE / "results_rm.json"


def _fingerprint(decoder, head_weight) -> str:
    """sha256 over the decoder's parameter names, shapes, dtypes, sums and sums of squares, and the head's."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        named = sorted(decoder.named_parameters()) + [("head", head_weight)]
        for name, p in named:
            t = p.detach().double()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{t.sum().item():.12e}|{t.square().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


def _write_pairs(path: Path, n: int) -> None:
    with path.open("w") as f:
        for rec in _pairs(n, _tokenizer()):
            f.write(json.dumps(rec) + "\n")


# -- workers -------------------------------------------------------------------------------------
def _run_lit_align(total_steps: int, workdir: Path) -> dict:
    import lightning as L

    from lit_align.data import PreferenceDataModule
    from lit_align.data.records import DataSource
    from lit_align.methods import RewardModelModule
    from lit_align.models import RewardModelSpec

    path = workdir / "pairs.jsonl"
    _write_pairs(path, PAIRS_PER_STEP * total_steps)
    times, extra = _StepTimes(), {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.tokens.append(batch.num_tokens)
            times.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.end()

        def on_train_start(self, trainer, pl_module):
            model = pl_module.reward_model
            extra["fingerprint"] = _fingerprint(model.backbone.model, model.head.weight)

    module = RewardModelModule(RewardModelSpec(model=_spec(), kind="scalar_head"))  # its default AdamW(lr=1e-5)
    data = PreferenceDataModule(train=DataSource(path=str(path)), val_fraction=0.0, batch_size=PAIRS_PER_STEP,
                                max_length=2 * SEQ_LEN, chat_template=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=total_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()],
        default_root_dir=str(workdir),
    )
    trainer.fit(module, datamodule=data)
    assert data.train_dataset.truncated == 0, "lit_align truncated examples"
    return {"fingerprint": extra["fingerprint"], "times": times}


def _run_trl(total_steps: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = _tokenizer()
    causal = _build_model(tokenizer)  # what lit_align's tiny spec builds: its decoder is the reward model's
    config = causal.config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.model.load_state_dict(causal.model.state_dict())
        model.score.weight.zero_()  # lit_align's head starts at zero (head_init_std: 0)
    del causal
    fingerprint = _fingerprint(model.model, model.score.weight)
    dataset = Dataset.from_list(_pairs(PAIRS_PER_STEP * total_steps, tokenizer))
    times = _StepTimes()

    args = RewardConfig(
        output_dir=str(workdir / "trl"), gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none",
        per_device_train_batch_size=PAIRS_PER_STEP, max_length=2 * SEQ_LEN, logging_steps=10**6,
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, learning_rate=LR, max_steps=total_steps,
        num_train_epochs=1, disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[trl_step_timer(times)])
    collate = trainer.data_collator

    def counting_collate(examples):  # runs in this process (num_workers=0), once per step
        batch = collate(examples)
        times.tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collate
    trainer.train()
    return {"fingerprint": fingerprint, "times": times}


def _worker(impl: str, steps: int, warmup: int, profile: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix=f"rm_step_{impl}_") as tmp:
        run = {"lit_align": lambda: _run_lit_align(total, Path(tmp)), "trl": lambda: _run_trl(total, Path(tmp))}[impl]
        result = timed_worker(impl, run, warmup, total, profile, f"rm_{impl}.prof")
    result.pop("times")
    return result


def _run_worker(impl: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--profile", args.profile] if args.profile else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {impl} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    res = {impl: {"ms": statistics.median([t for r in rs for t in r["step_ms"]]),
                  "cpu_ms": statistics.median([t for r in rs for t in r["step_cpu_ms"]]),
                  "rss": max(r["peak_rss_mb"] for r in rs), "tokens": rs[0]["tokens_per_step"],
                  "fingerprint": rs[0]["fingerprint"]} for impl, rs in runs.items()}
    # the same starting weights and the same real tokens per step, or the comparison is meaningless
    if len({r["fingerprint"] for r in res.values()}) != 1:
        raise SystemExit(f"initial weights differ: { {k: r['fingerprint'] for k, r in res.items()} }")
    if len({r["tokens"] for r in res.values()}) != 1:
        raise SystemExit(f"token counts differ: { {k: r['tokens'] for k, r in res.items()} }")

    def get(impl: str, key: str):
        return round(res[impl][key], 1) if impl in res else None

    ratio = lambda a, b: None if a is None or b is None else round(a / b, 3)  # noqa: E731
    out = {"bench": "rm_step", "lit_align_ms": get("lit_align", "ms"), "trl_ms": get("trl", "ms"),
           "lit_align_peak_rss_mb": get("lit_align", "rss"), "trl_peak_rss_mb": get("trl", "rss")}
    out["ratio_vs_trl"] = ratio(res.get("lit_align", {}).get("ms"), res.get("trl", {}).get("ms"))
    out["cpu_ratio_vs_trl"] = ratio(res.get("lit_align", {}).get("cpu_ms"), res.get("trl", {}).get("cpu_ms"))
    out["targets_met"] = {k: out[k] <= v for k, v in TARGETS.items() if out[k] is not None}
    out["cpu_ms"] = {impl: round(r["cpu_ms"], 1) for impl, r in res.items()}
    out.update(tokens_per_step=next(iter(res.values()))["tokens"], pairs_per_step=PAIRS_PER_STEP, steps=args.steps,
               warmup=args.warmup, rounds=args.rounds, arch=ARCH)
    return out


def _write(line: dict, argv: list[str], seconds: float) -> None:
    """``benchmarks/results_rm.json``: the line, the command, its run time, the versions and the machine."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "trl", "lightning", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(["python",
              "benchmarks/rm_step.py", *argv]), "seconds": round(seconds, 1), "python": platform.python_version(),
              "versions": versions, "machine": {"nproc": os.cpu_count(), "load_average": os.getloadavg(),
                                                "torch_threads": 1}, "result": line}
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per implementation")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every worker this many times, interleaved; step times are pooled")
    parser.add_argument("--only", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.relative_to(HERE.parent)}")
    parser.add_argument("--profile", default=None, help="directory for a cProfile dump of each worker")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.warmup, args.profile)))
        return
    start = time.perf_counter()
    impls = [i for i in IMPLS if i in args.only.split(",")]
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:  # interleaved so slow phases of a shared machine hit both alike
            runs[impl].append(_run_worker(impl, args))
    line = _summary(runs, args)
    print(json.dumps(line))
    if args.write:
        _write(line, sys.argv[1:], time.perf_counter() - start)


if __name__ == "__main__":
    main()
