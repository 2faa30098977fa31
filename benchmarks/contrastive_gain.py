"""Contrastive rewards vs plain PPO, RLOO and GRPO on a miscalibrated proxy reward, at equal online samples.

The tiny setup (configs/ppo/contrastive_tiny.yaml): a LoRA policy on builtin:tiny-game-base answers the built-in
seed questions; the **gold** reward is the toy rule judge's P(safe) (lit_align.game.RuleJudge); the **proxy** PPO
is trained on is gold plus a per-prompt offset ``scale * z(x)``, ``z ~ N(0, 1)`` (lit_align.rewards.PromptOffset):
a reward model that rates some prompts higher whatever the answer, the miscalibration contrastive rewards
(Shen et al. 2024, arXiv 2403.07708) are meant to remove. Every method sees 8 sampled responses per step for the
same number of steps (PPO and contrastive PPO: 8 prompts x 1; RLOO and GRPO: 2 prompts x 4); contrastive PPO
also spends k = 4 offline samples per training prompt before training (reported).

Reported per method, as a mean with a 95% t-interval over seeds: the gold reward of the trained policy on the 48
held-out prompts (4 samples each, the same draws for every method), its gain over the starting policy, and the
variance of the rewards fed to PPO (mean over steps). The README row for contrastive rewards is "met" only when
its gold gain's interval lies above plain PPO's.

    python benchmarks/contrastive_gain.py --seeds 6            # ~10 min on 2 cores
    python benchmarks/contrastive_gain.py --seeds 6 --write    # also writes benchmarks/results_contrastive.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from fit_timing import interval  # noqa: E402  (this folder is on sys.path when a script runs)

from lit_align.cli import cli_main  # noqa: E402
from lit_align.rewards import JudgeReward  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROXY = ("{class_path: lit_align.rewards.PromptOffset, init_args: {base: {class_path: lit_align.rewards.JudgeReward},"
         " scale: %s}}")
GOLD = "{gold: {class_path: lit_align.rewards.JudgeReward}}"
METHODS = {  # name -> (config, extra arguments)
    "ppo": ("configs/ppo/tiny.yaml", []),
    "contrastive": ("configs/ppo/contrastive_tiny.yaml", []),
    "rloo": ("configs/rloo/tiny.yaml", []),
    "grpo": ("configs/grpo/tiny.yaml", []),
}
EVAL_SAMPLES = 4


@torch.no_grad()
def _gold(module, datamodule) -> float:
    """Mean gold reward of ``EVAL_SAMPLES`` samples per held-out prompt, drawn from the same seeds for every method."""
    gold = JudgeReward()
    gold.build(module.tokenizer)
    scores = []
    for batch in datamodule.val_dataloader():
        rollout = module._rollout(batch, EVAL_SAMPLES, "benchmark/gold", step=0)
        scores.append(module._score(batch, rollout, EVAL_SAMPLES, gold))
    return float(torch.cat(scores).mean())


def _reward_var(root: Path) -> float:
    rows = [r for f in root.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    values = [float(r["train/reward_var"]) for r in rows if r.get("train/reward_var")]
    return statistics.fmean(values)


def run(method: str, seed: int, scale: float, batches: int, root: Path) -> dict[str, float]:
    config, extra = METHODS[method]
    args = ["--config", str(REPO / config), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), "--trainer.default_root_dir", str(root), "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.limit_train_batches", str(batches), "--seed_everything", str(seed),
            "--model.init_args.sample_seed", str(seed), "--model.init_args.reward", PROXY % scale,
            "--model.init_args.eval_rewards", GOLD, "--data.init_args.eval_batch_size", "48", *extra]
    cli = cli_main(args, run=False)
    cli.datamodule.tokenizer = cli.model.tokenizer
    cli.datamodule.setup("fit")
    cli.model.configure_model()
    start = _gold(cli.model, cli.datamodule)
    began = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - began
    end = _gold(cli.model, cli.datamodule)
    return {"gold_start": start, "gold": end, "gain": end - start, "reward_var": _reward_var(root), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--scale", type=float, default=0.5, help="std of the proxy's per-prompt offset")
    parser.add_argument("--batches", type=int, default=24, help="training steps of every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--write", action="store_true", help="write benchmarks/results_contrastive.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {m: [] for m in opts.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(opts.seeds):
            for method in opts.methods:
                runs[method].append(run(method, seed, opts.scale, opts.batches, Path(tmp) / f"{method}-{seed}"))
                print(method, seed, {k: round(v, 4) for k, v in runs[method][-1].items()}, file=sys.stderr, flush=True)
    summary = {m: {k: interval([r[k] for r in rs]) for k in ("gold", "gain", "reward_var", "seconds")}
               for m, rs in runs.items()}
    if "ppo" in runs:
        for m in runs:
            if m != "ppo":  # paired by seed (the same data order, initial adapter and evaluation draws)
                summary[m]["gain_over_ppo"] = interval([a["gold"] - b["gold"] for a, b in zip(runs[m], runs["ppo"])])
    if "contrastive" in summary and "ppo" in summary:
        c, p = summary["contrastive"]["gain"], summary["ppo"]["gain"]
        summary["contrastive_met"] = bool(c["low"] > p["high"])
    result = {"setup": {"seeds": opts.seeds, "scale": opts.scale, "batches": opts.batches, "online_samples_per_step": 8,
                        "offline_samples_per_prompt": 4, "eval_samples_per_prompt": EVAL_SAMPLES},
              "summary": summary, "runs": runs}
    print(json.dumps({"summary": summary}))
    if opts.write:
        (REPO / "benchmarks" / "results_contrastive.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
