"""Benchmark: the adversary/defender game (GPO) -- where a step's time goes, and what sharing one base costs.

Two parts, each printed in the one JSON line:

**Step-time breakdown** (``configs/game/tiny.yaml``'s module and data: builtin:tiny-game-base players as
two LoRA adapters on one base, batch 15 seeds, attack prompts up to 24 new tokens, answers up to 16, the
toy rule judge, SelfBLEU + sentence-embedding diversity). ``--warmup + --steps`` training batches run
through the Lightning Trainer under a schedule of alternating blocks of ``--block`` steps; per step the
module logs ``train/time/<phase>`` (seconds): ``attacker/generate``, ``defender/generate`` (both players
generate every step), ``judge``, ``diversity``, and for the player that learns this step
``<player>/experience`` (old / reference log-probs, values, rewards, GAE) and ``<player>/update`` (PPO
policy and critic steps). Reported: the median of each phase over the measured steps, the median step
(wall time between batch ends), the median step of each player's blocks, and ``generate_share``, the
share of the summed phase medians spent generating.

**Memory of the players** (each mode in its own subprocess, so peaks do not mix): the module is built
and trained for ``--mem-steps`` steps with a larger model (CPU: a random 16-layer, width-1024 decoder on
the bundled tokenizer, ~200M parameters in float32; ``--device cuda``: a Qwen2-0.5B-shaped random model,
~360M parameters with the bundled 1k vocabulary, bf16), in three modes:

* ``shared``: both players are LoRA adapters on one base; their references are that base with the
  adapters off (the module's default): one copy of the base weights;
* ``separate``: a base per player (``share_base: false``), references adapter-off: two copies;
* ``copy``: a base per player and a frozen reference copy each (``reference: copy``; what a PPO setup
  with a reference model per policy holds): four copies.

Reported per mode: the bytes of the module's unique parameter / buffer storages (critics and judge
included), and the peak resident memory of the process (CPU) or peak allocated GPU memory (CUDA).

Usage: ``python benchmarks/game_step.py [--steps 24] [--warmup 2] [--block 6] [--threads 1]
[--device cpu|cuda] [--mem-steps 1] [--skip-memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/game_step.py`

PHASES = ("attacker/generate", "defender/generate", "judge", "diversity", "defender/experience",
          "defender/update", "attacker/experience", "attacker/update")
MODES = {"shared": {}, "separate": {"share_base": False}, "copy": {"share_base": False, "reference": "copy"}}


def _module(block: int, *, defender=None, encoder=None, critic=None, max_new_tokens: int | None = None, **overrides):
    """The tiny config's game (its model blocks), with the schedule in blocks of ``block`` steps."""
    import yaml

    from lit_align.engine import Optimization
    from lit_align.game import (
        CriticConfig,
        DiversityConfig,
        GameSampling,
        GameSchedule,
        PoolConfig,
        RewardConfig,
        RuleJudge,
    )
    from lit_align.methods import AdversarialGameModule
    from lit_align.models import LoRASpec, ModelSpec

    cfg = yaml.safe_load((ROOT / "configs/game/tiny.yaml").read_text())["model"]["init_args"]
    diversity = {**cfg["diversity"], "encoder": encoder or ModelSpec(**cfg["diversity"]["encoder"])}
    sampling = dict(cfg["sampling"])
    if max_new_tokens is not None:
        sampling.update(attacker_max_new_tokens=max_new_tokens, defender_max_new_tokens=max_new_tokens)
    args = dict(defender=defender or ModelSpec(name_or_path=cfg["defender"]["name_or_path"],
                                               lora=LoRASpec(**cfg["defender"]["lora"])),
                judge=RuleJudge(), schedule=GameSchedule(defender_steps=block, attacker_steps=block),
                sampling=GameSampling(**sampling), rewards=RewardConfig(**cfg["rewards"]),
                diversity=DiversityConfig(**diversity), pool=PoolConfig(**cfg["pool"]),
                optimization={p: Optimization(**b) for p, b in cfg["optimization"].items()},
                critic=CriticConfig(model=critic) if critic is not None else None)
    args.update(overrides)
    return AdversarialGameModule(**args)


def _data(batch_size: int):
    from lit_align.data.prompts import SeedPromptDataModule
    from lit_align.data.records import DataSource

    return SeedPromptDataModule(train=DataSource(path="builtin:seed_prompts"), batch_size=batch_size, val_fraction=0.0)


def breakdown(steps: int, warmup: int, block: int) -> dict:
    import lightning as L

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self._last = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            row = dict(module.last_step_times)  # phase -> seconds, this step only
            row["player"] = "+".join(module.schedule.active(module.step_count - 1))
            row["step"] = None if self._last is None else now - self._last
            self._last = now
            self.rows.append(row)

    L.seed_everything(0)
    module = _module(block)
    timer = Timer()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, limit_val_batches=0,
                            limit_train_batches=1.0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                            callbacks=[timer, _stop_after(warmup + steps)], num_sanity_val_steps=0)
        trainer.fit(module, _data(15))
    rows = timer.rows[warmup:]
    out: dict = {"steps": len(rows), "block": block}
    medians = {}
    for phase in PHASES:
        values = [r[phase] for r in rows if phase in r]
        if values:
            medians[phase] = statistics.median(values)
            out[f"{phase.replace('/', '_')}_ms"] = round(1000 * medians[phase], 2)
    out["step_ms"] = round(1000 * statistics.median(r["step"] for r in rows if r["step"] is not None), 2)
    for player in ("defender", "attacker"):
        values = [r["step"] for r in rows if r["player"] == player and r["step"] is not None]
        if values:
            out[f"{player}_step_ms"] = round(1000 * statistics.median(values), 2)
    # phase medians of a typical step: both generations, judge, diversity, and one player's learning
    learn = statistics.mean([medians.get(f"{p}/experience", 0) + medians.get(f"{p}/update", 0)
                             for p in ("defender", "attacker")])
    generate = medians.get("attacker/generate", 0) + medians.get("defender/generate", 0)
    total = generate + medians.get("judge", 0) + medians.get("diversity", 0) + learn
    out["generate_share"] = round(generate / total, 3) if total else None
    out["update_share"] = round(learn / total, 3) if total else None
    return out


def _stop_after(n: int):
    """A callback stopping the run after ``n`` training batches."""
    import lightning as L

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if module.step_count >= n:
                trainer.should_stop = True

    return Stop()


def _unique_bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_mode(mode: str, device: str, steps: int) -> dict:
    """Build and train one mode (in this process); report its bytes and peak memory."""
    import lightning as L
    import torch

    from lit_align.models import LoRASpec, ModelSpec, TinyArch

    if device == "cuda":
        arch = TinyArch(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864)
        spec = ModelSpec(tiny=arch, dtype="bfloat16", lora=LoRASpec(r=16, alpha=32))
        encoder = ModelSpec(tiny=TinyArch(hidden_size=64, num_layers=2), dtype="bfloat16")
    else:
        arch = TinyArch(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=2816)
        spec = ModelSpec(tiny=arch, lora=LoRASpec(r=16, alpha=32))
        encoder = ModelSpec(tiny=TinyArch(hidden_size=64, num_layers=2))
    from lit_align.models import RewardModelSpec

    critic = RewardModelSpec(model=ModelSpec(tiny=TinyArch(hidden_size=128, num_layers=2), dtype=spec.dtype))
    L.seed_everything(0)
    module = _module(1, defender=spec, encoder=encoder, critic=critic, max_new_tokens=16, **MODES[mode])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=-1, max_steps=-1,
                            limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, callbacks=[_stop_after(steps)],
                            num_sanity_val_steps=0, precision="bf16-true" if device == "cuda" else "32-true")
        start = time.perf_counter()
        trainer.fit(module, _data(8))
        seconds = time.perf_counter() - start
    out = {"mode": mode, "model_mb": round(_unique_bytes(module) / 2**20, 1), "seconds": round(seconds, 1)}
    if device == "cuda":
        out["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=6, help="schedule block length (defender, then attacker)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mem-steps", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-mode", choices=tuple(MODES), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.memory_mode:
        print(json.dumps(memory_mode(args.memory_mode, args.device, args.mem_steps)))
        return
    result: dict = {"bench": "game_step", "device": args.device, "threads": args.threads}
    if args.device == "cpu":
        result.update(breakdown(args.steps, args.warmup, args.block))
    if not args.skip_memory:
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--memory-mode", mode, "--device", args.device,
                                   "--threads", str(args.threads), "--mem-steps", str(args.mem_steps)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise RuntimeError(f"memory mode {mode} failed:\n{proc.stderr[-3000:]}")
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
            row = json.loads(line)
            for key in ("model_mb", "peak_mb", "seconds"):
                result[f"{mode}_{key}"] = row[key]
        result["peak_ratio_shared_vs_copy"] = round(result["shared_peak_mb"] / result["copy_peak_mb"], 3)
        result["model_ratio_shared_vs_copy"] = round(result["shared_model_mb"] / result["copy_model_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
