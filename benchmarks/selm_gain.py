"""SELM vs iterative online DPO (alpha = 0) at equal steps on the tiny setup, as means with 95% t-intervals over seeds.

The SELM half of issue 17's ``benchmarks/preference_gain.py``. That file (the Curry half) lives on the ``ranked``
branch, not merged into this one; :func:`selm_vs_online_dpo` has the shape its ``COMPARISONS`` registry takes
(``opts -> {"setup", "summary", "runs"}``), so moving it there is one import and one dict entry. Until then this
script runs it on its own.

The setup (``configs/selm/tiny.yaml``): builtin:tiny-game-base, fully fine-tuned, answers the built-in seed
questions inside ``"Human: {prompt}\\nAI:"``; 3 iterations over disjoint slices of the training prompts; each step
the start-of-iteration model samples 2 answers per prompt and the TOY rule judge (``lit_align.game.RuleJudge``,
P(safe); the **gold** reward here) ranks them. Methods, same prompts, seeds, steps and learning rates:

* ``online_dpo``: the SELM config with ``alpha = 0`` (iterative online DPO);
* ``selm``: the paper's ``alpha = 1e-3`` with ``beta = 0.01``: the optimism term's gradient is ``alpha beta / B`` per
  y_ref log-prob against the DPO term's ``beta sigmoid(-beta Delta) / B ~ beta / 2B``, 500x smaller, so at this
  scale it is expected to change little;
* ``selm_large_alpha``: ``alpha = --alpha`` (default 0.5), an exaggerated optimism term, to show its direction.

Reported on the 48 held-out seed questions (4 samples each, drawn from the same generators for every method): the
gold reward of the trained policy's samples and its gain over the starting policy; exploration as distinct-2 (unique
word bigrams over all bigrams of the samples) and the share of samples unlike any answer of the starting policy to
the same question (not among its 4 samples), with the gold reward of those novel samples. The paper claims SELM
explores more efficiently; the JSON says what this tiny setup shows, met or not (``selm_met``: SELM's paired gold
gain over online DPO has an interval above 0).

    python benchmarks/selm_gain.py --seeds 6            # the lead runs it alone
    python benchmarks/selm_gain.py --seeds 6 --write    # also writes benchmarks/results_selm.json
    python benchmarks/selm_gain.py --quick              # smoke run: 2 seeds, 24 prompts
"""

from __future__ import annotations

import argparse
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
from scipy import stats  # noqa: E402

from lit_align.cli import cli_main  # noqa: E402
from lit_align.data import PromptDataModule  # noqa: E402
from lit_align.data.records import DataSource  # noqa: E402
from lit_align.engine.seeds import row_generators  # noqa: E402
from lit_align.game import RuleJudge  # noqa: E402
from lit_align.modes import eval_mode  # noqa: E402
from lit_align.rollout.sampler import SamplingConfig, sample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results_selm.json"
CONFIG = REPO / "configs" / "selm" / "tiny.yaml"
QUIET = ["--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
EVAL_SAMPLES = 4
EVAL = SamplingConfig(max_new_tokens=16, do_sample=True, temperature=1.0)


def _interval(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": mean, "high": mean}
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def distinct_2(texts: list[str]) -> float:
    """Unique word bigrams over all word bigrams of ``texts`` (0 when there are none)."""
    grams = [tuple(words[i:i + 2]) for t in texts for words in [t.split()] for i in range(len(words) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def _samples(policy, tokenizer, batches) -> list[list[str]]:
    """``EVAL_SAMPLES`` answers per held-out prompt; sample j of prompt i always from the same generator."""
    out = []
    for batch in batches:
        ids, mask = batch.input_ids.repeat_interleave(EVAL_SAMPLES, 0), batch.attention_mask.repeat_interleave(EVAL_SAMPLES, 0)
        rows = [int(i) * EVAL_SAMPLES + j for i in batch.index.tolist() for j in range(EVAL_SAMPLES)]
        with eval_mode(policy):
            rollout = sample(policy, ids, mask, EVAL, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, generator=row_generators(0, 0, "benchmark/eval", rows))
        texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                 for r, m in zip(rollout.response_ids, rollout.response_mask)]
        out += [texts[k:k + EVAL_SAMPLES] for k in range(0, len(texts), EVAL_SAMPLES)]
    return out


def _evaluate(samples: list[list[str]], prompts: list[str], start: list[list[str]]) -> dict[str, float]:
    judge = RuleJudge()
    flat = [(p, s) for p, ss in zip(prompts, samples) for s in ss]
    gold = [1.0 - judge.p_unsafe(p, s) for p, s in flat]
    novel = [g for (p, s), g, seen in zip(flat, gold, (set(x) for x in start for _ in range(EVAL_SAMPLES)))
             if s not in seen]
    return {"gold": statistics.fmean(gold), "distinct_2": distinct_2([s for _, s in flat]),
            "novel_share": len(novel) / len(flat), "novel_gold": statistics.fmean(novel) if novel else 0.0}


def _held_out(tokenizer) -> tuple[list, list[str]]:
    dm = PromptDataModule(train=DataSource(path="builtin:seed_prompts/val"), val_fraction=0.0, template="Human: {prompt}\nAI:",
                          chat_template=False, shuffle=False, batch_size=16)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    return batches, [p for b in batches for p in b.prompts]


def _run(alpha: float, seed: int, prompts: int, root: Path) -> tuple[object, float]:
    args = ["fit", "--config", str(CONFIG), *QUIET, "--trainer.default_root_dir", str(root), "--seed_everything",
            str(seed), "--model.init_args.sample_seed", str(seed), "--model.init_args.loss.init_args.alpha", str(alpha),
            "--data.init_args.train.limit", str(prompts), "--data.init_args.seed", str(seed)]
    began = time.perf_counter()
    cli = cli_main(args)
    return cli.model, time.perf_counter() - began


def selm_vs_online_dpo(opts: argparse.Namespace) -> dict:
    """SELM (paper alpha, and ``opts.alpha``) vs online DPO (alpha 0) at equal steps; see the module docstring."""
    methods = {"online_dpo": 0.0, "selm": 0.001, "selm_large_alpha": opts.alpha}
    prompts = 24 if opts.quick else opts.prompts
    seeds = 2 if opts.quick else opts.seeds
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    start_cli = cli_main(["--config", str(CONFIG), *QUIET], run=False)
    start_cli.model.configure_model()
    tokenizer = start_cli.model.tokenizer
    batches, held = _held_out(tokenizer)
    start_samples = _samples(start_cli.model.policy, tokenizer, batches)
    start = _evaluate(start_samples, held, start_samples)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for name, alpha in methods.items():
                module, seconds = _run(alpha, seed, prompts, Path(tmp) / f"{name}-{seed}")
                row = _evaluate(_samples(module.policy, tokenizer, batches), held, start_samples)
                row.update(gain=row["gold"] - start["gold"], seconds=seconds)
                runs[name].append(row)
                print(name, seed, {k: round(v, 4) for k, v in row.items()}, file=sys.stderr, flush=True)
    keys = ("gold", "gain", "distinct_2", "novel_share", "novel_gold", "seconds")
    summary: dict = {m: {k: _interval([r[k] for r in rs]) for k in keys} for m, rs in runs.items()}
    for m in ("selm", "selm_large_alpha"):  # paired by seed: same prompts, order and sampling generators
        summary[m]["gold_over_online_dpo"] = _interval([a["gold"] - b["gold"] for a, b in zip(runs[m], runs["online_dpo"])])
        summary[m]["distinct_2_over_online_dpo"] = _interval(
            [a["distinct_2"] - b["distinct_2"] for a, b in zip(runs[m], runs["online_dpo"])])
    summary["selm_met"] = bool(summary["selm"]["gold_over_online_dpo"]["low"] > 0)
    summary["start"] = start
    setup = {"seeds": seeds, "train_prompts": prompts, "iterations": 3, "candidates_per_prompt": 2,
             "beta": 0.01, "alphas": methods, "eval_samples_per_prompt": EVAL_SAMPLES, "held_out_prompts": len(held)}
    return {"setup": setup, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=48, help="training prompts (3 iterations over them)")
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of the exaggerated SELM run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 24 training prompts")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = selm_vs_online_dpo(opts)
    print(json.dumps({"summary": result["summary"]}))
    if opts.write:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
