"""Benchmark: where the time of one watermark co-training step goes (tiny setup, CPU, one thread).

Workload: ``configs/watermark/tiny.yaml`` unchanged apart from the run length and the plumbing (tiny
Llama actor and detector, hidden 64, 2 layers; batch 16 prompts of 8 tokens from ``builtin:corpus``;
8 new tokens; the "human" side sampled from the frozen reference, as the tiny config does). It runs
in-process through :func:`lit_align.cli.cli_main` (``fit``) for ``--warmup + --steps`` co-training
batches (``max_steps`` = 3 optimiser steps per batch, over as many epochs as that takes) with a CSV logger (``log_every_n_steps=1``), no validation, checkpointing or export.

Per step the module logs ``train/time/{generate,score,experience,update,detector}`` (seconds):

* ``generate``: sampling the continuations with the actor (plus, with ``human_from_reference``, the
  reference's "human" continuations: two sampler calls per step);
* ``score``: the detector's score of the continuations (no grad);
* ``experience``: old / reference log-probs, values, KL-shaped rewards and GAE;
* ``update``: the PPO update of actor and critic (forward, backward, clip, step of each);
* ``detector``: the detector's pairwise-loss update on the same batch.

The first ``--warmup`` steps are dropped; the report gives the median of each phase, the median step
(sum of the phases), and the shares ``generate_share`` and ``update_share`` of the summed phase time
(medians over steps of each phase divided by the sum of the phase medians). ``sampler_tok_s`` is the
throughput of the KV-cache sampler during the run: generated tokens (response mask) over the wall
time of every ``sample`` call of the measured steps (wrapped in-process, the call itself unchanged).

Prints one JSON line::

    {"bench": "watermark_step", "steps": ..., "generate_ms": ..., "score_ms": ..., "experience_ms": ...,
     "update_ms": ..., "detector_ms": ..., "step_ms": ..., "generate_share": ..., "update_share": ...,
     "sampler_tok_s": ..., "sampler_calls_per_step": ..., "tokens_per_call": ...}

Usage: ``python benchmarks/watermark_step.py [--steps 20] [--warmup 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/watermark_step.py`

CONFIG = ROOT / "configs/watermark/tiny.yaml"
PHASES = ("generate", "score", "experience", "update", "detector")


def _config(tmp: Path, batches: int) -> Path:
    """The tiny config with the run length and plumbing for the benchmark."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    trainer = cfg["trainer"]
    # the tiny corpus gives 15 batches per epoch: run over epochs and stop on optimiser steps, 3 per
    # co-training batch (the tiny config has no detector-pretraining stage)
    trainer.update(max_epochs=-1, max_steps=3 * batches, limit_train_batches=1.0, limit_val_batches=0,
                   log_every_n_steps=1, default_root_dir=str(tmp), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[],
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(tmp), "name": "bench"}})
    trainer.pop("check_val_every_n_epoch", None)
    path = tmp / "watermark_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _phase_times(tmp: Path) -> list[dict[str, float]]:
    """One dict per logged training step (in order), phase -> seconds."""
    files = sorted(tmp.glob("bench/version_*/metrics.csv"))
    if not files:
        raise SystemExit(f"no metrics.csv under {tmp}")
    rows = []
    with files[-1].open() as f:
        for row in csv.DictReader(f):
            value = row.get("train/time/generate", "")
            if value == "":
                continue
            rows.append({p: float(row[f"train/time/{p}"]) for p in PHASES if row.get(f"train/time/{p}", "") != ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured co-training batches")
    parser.add_argument("--warmup", type=int, default=3, help="batches dropped first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    import lit_align.methods.watermark as wm
    from lit_align.cli import cli_main

    torch.set_num_threads(args.threads)
    calls: list[tuple[int, float]] = []  # (generated tokens, seconds) of each sampler call
    original = wm.sample

    def timed_sample(*a, **kw):
        start = time.perf_counter()
        rollout = original(*a, **kw)
        calls.append((int(rollout.response_mask.sum()), time.perf_counter() - start))
        return rollout

    wm.sample = timed_sample
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp, total)
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            cli_main(["fit", "--config", str(config)])
        wall = time.perf_counter() - start
        rows = _phase_times(tmp)
    wm.sample = original
    if len(rows) != total:
        raise SystemExit(f"expected {total} logged steps, got {len(rows)}:\n{log.getvalue()[-2000:]}")
    measured = rows[args.warmup:]
    missing = [p for p in PHASES if any(p not in r for r in measured)]
    if missing:
        raise SystemExit(f"phases {missing} not logged in every step (stage-1 steps or dropped batches?)")
    medians = {p: statistics.median(r[p] for r in measured) for p in PHASES}
    step_s = statistics.median(sum(r.values()) for r in measured)
    phase_sum = sum(medians.values())
    per_step = len(calls) // total
    sampled = calls[args.warmup * per_step:]
    tokens, seconds = sum(c[0] for c in sampled), sum(c[1] for c in sampled)
    print(json.dumps({
        "bench": "watermark_step",
        "steps": args.steps,
        **{f"{p}_ms": round(medians[p] * 1e3, 2) for p in PHASES},
        "step_ms": round(step_s * 1e3, 2),
        "generate_share": round(medians["generate"] / phase_sum, 3),
        "update_share": round(medians["update"] / phase_sum, 3),
        "sampler_tok_s": round(tokens / seconds, 1) if seconds else None,
        "sampler_calls_per_step": per_step,
        "tokens_per_call": round(tokens / max(1, len(sampled)), 1),
        "run_wall_s": round(wall, 1),
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
