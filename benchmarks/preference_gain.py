"""Issue 17's preference-optimisation gains on tiny setups, as means with 95% t-intervals over seeds.

Two comparisons, one function each, registered in ``COMPARISONS`` and run by one command line (``--only`` picks
some; ``--seeds`` and ``--quick`` apply to both). Each returns ``{"setup", "summary", "runs"}``; ``--write`` merges
them by name into ``benchmarks/results_preference.json`` (a comparison not run keeps its stored entry).

``curry`` (:func:`curry_vs_single_pair`; ``--beta``, ``--lr``): Curry-DPO (Pattnaik et al. 2024, arXiv 2403.07230)
against single-pair DPO at equal pairs seen, on ``builtin:ranked_preferences`` (four responses per prompt, rated 0-3
by how closely they copy a word: ``lit_align.data.tiny_ranked.gold_quality``). A fixed split holds out 60 prompts.
Per seed, a tiny random Llama-shaped model is first fine-tuned (SFT) on all four responses of the 240 training
prompts, so it copies words only roughly; from it:

* ``single_pair``: DPO on each training prompt's (best, worst) pair, 3 epochs (``configs/dpo/tiny.yaml``);
* ``curry``: iterative Curry-DPO, best vs 4th, 3rd, 2nd rated, one stage each, each stage's reference the previous
  stage's policy (``configs/curry_dpo/tiny.yaml``);
* ``curry_non_iterative``: the same pairs in one curriculum-ordered stage against the SFT reference.

All see 720 pairs (3 x 240) with the same optimiser, learning rate, beta and batch size. Reported on the held-out
prompts: ranking accuracy over all their ranked pairs (C(4, 2) = 6 per prompt) by the implicit reward
``log pi(y) - log pi_sft(y)`` (a tie counts half), and the gold quality of greedy outputs (0-3), with the gain of
each Curry variant over single-pair DPO paired by seed. ``curry_met`` when Curry-DPO's paired gain interval lies
above 0.

``selm`` (:func:`selm_vs_online_dpo`; ``--selm-prompts``, ``--selm-alpha``): SELM (Zhang et al. 2024, arXiv
2405.19332) against iterative online DPO (alpha = 0) at equal steps, on ``configs/selm/tiny.yaml``:
builtin:tiny-game-base, fully fine-tuned, answers the built-in seed questions inside ``"Human: {prompt}\\nAI:"``;
3 iterations over disjoint slices of the training prompts; each step the start-of-iteration model samples 2
answers per prompt and the TOY rule judge (``lit_align.game.RuleJudge``, P(safe); the **gold** reward here) ranks
them. Methods, same prompts, seeds, steps and learning rates:

* ``online_dpo``: the SELM config with ``alpha = 0`` (iterative online DPO);
* ``selm``: the paper's ``alpha = 1e-3`` with ``beta = 0.01``: the optimism term's gradient is ``alpha beta / B`` per
  y_ref log-prob against the DPO term's ``beta sigmoid(-beta Delta) / B ~ beta / 2B``, 500x smaller, so at this
  scale it is expected to change little;
* ``selm_large_alpha``: ``alpha = --selm-alpha`` (default 0.5), an exaggerated optimism term, to show its direction.

Reported on the 48 held-out seed questions (4 samples each, drawn from the same generators for every method): the
gold reward of the trained policy's samples and its gain over the starting policy; exploration as distinct-2 (unique
word bigrams over all bigrams of the samples) and the share of samples unlike any answer of the starting policy to
the same question (not among its 4 samples), with the gold reward of those novel samples. The paper claims SELM
explores more efficiently; the JSON says what this tiny setup shows, met or not (``selm_met``: SELM's paired gold
gain over online DPO has an interval above 0).

    python benchmarks/preference_gain.py --seeds 6               # both comparisons; the lead runs it alone
    python benchmarks/preference_gain.py --seeds 6 --write       # also writes benchmarks/results_preference.json
    python benchmarks/preference_gain.py --seeds 6 --only selm   # one comparison (--write keeps the other's entry)
    python benchmarks/preference_gain.py --quick                 # smoke run: 2 seeds, tiny budgets (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from fit_timing import QUIET, fit_in_process, interval  # noqa: E402  (this folder is on sys.path when a script runs)

from lit_align.cli import cli_main  # noqa: E402
from lit_align.data import BUILTIN_DIR, PromptDataModule, build_pairs  # noqa: E402
from lit_align.data.records import DataSource  # noqa: E402
from lit_align.data.tiny_ranked import gold_quality  # noqa: E402
from lit_align.data.tokenize import SequenceCollator, SequenceExample, encode_prompt, encode_response  # noqa: E402
from lit_align.engine.seeds import row_generators  # noqa: E402
from lit_align.game import RuleJudge  # noqa: E402
from lit_align.modes import eval_mode  # noqa: E402
from lit_align.rollout.logps import token_logps  # noqa: E402
from lit_align.rollout.sampler import SamplingConfig, sample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results_preference.json"


def _fit(config: str, root: Path, seed: int, args: list[str]):
    """``lit-align fit`` of a shipped config, in process and quiet; the fitted module."""
    return fit_in_process(REPO / config, root, seed, args, QUIET)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- Curry-DPO vs single-pair DPO ------------------------------------------------------------------
CURRY_BUDGET = {"full": {"held_out": 60, "sft_steps": 150}, "quick": {"held_out": 20, "sft_steps": 30}}


@torch.no_grad()
def _response_logps(model, tokenizer, records: list[dict]) -> torch.Tensor:
    """(N, M) summed log-probs of every record's responses under ``model`` (chat-formatted prompts, as trained)."""
    chat = bool(tokenizer.chat_template)
    examples = [SequenceExample(encode_prompt(tokenizer, r["prompt"], chat), encode_response(tokenizer, y), i)
                for i, r in enumerate(records) for y in r["responses"]]
    batch = SequenceCollator(tokenizer.pad_token_id)(examples)
    model.eval()
    logps = token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask).sum()  # (N * M,)
    return logps.view(len(records), -1).float()


def _ranking_accuracy(policy: torch.Tensor, sft: torch.Tensor, records: list[dict]) -> float:
    """Share of all ranked pairs of ``records`` whose implicit reward ``log pi - log pi_sft`` orders them as the
    ratings do (ties count half)."""
    reward = policy - sft  # (N, M)
    scores = []
    for i, r in enumerate(records):
        for chosen, rejected, _ in build_pairs(r["ratings"], "all_pairs"):
            diff = float(reward[i, chosen] - reward[i, rejected])
            scores.append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
    return statistics.fmean(scores)


def _gold(module, records: list[dict]) -> float:
    module.policy.eval()
    outputs = module.generate([r["prompt"] for r in records])
    return statistics.fmean(gold_quality(r["prompt"], y) for r, y in zip(records, outputs))


def _curry_run(seed: int, root: Path, train_file: str, pairs_file: str, held: list[dict], steps: int,
               dpo: list[str]) -> dict[str, dict[str, float]]:
    sft_dir = root / "sft"
    root.mkdir(parents=True, exist_ok=True)
    sft_data = [{"prompt": r["prompt"], "response": y} for r in json.loads(Path(train_file).read_text())
                for y in r["responses"]]
    sft = _fit("configs/sft/tiny.yaml", root / "sft-run", seed, [
        "--data.init_args.train.path", _write(root / "sft.jsonl", sft_data), "--data.init_args.val_fraction", "0",
        "--data.init_args.batch_size", "32", "--data.init_args.max_length", "48", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0"])
    sft.policy.save_pretrained(sft_dir)
    sft.tokenizer.save_pretrained(sft_dir)
    tokenizer = sft.tokenizer
    sft_logps = _response_logps(sft.policy, tokenizer, held)
    out = {"sft": {"rank_acc": _ranking_accuracy(sft_logps, sft_logps, held), "gold": _gold(sft, held)}}
    start = ["--model.init_args.model.tiny", "null", "--model.init_args.model.name_or_path", str(sft_dir), *dpo,
             "--data.init_args.val_fraction", "0", "--trainer.limit_val_batches", "0"]
    runs = {
        "single_pair": ("configs/dpo/tiny.yaml", [
            "--data.init_args.train.path", pairs_file, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
            "--trainer.val_check_interval", "null"]),
        # the Curry config's per-stage rates give way to the shared constant rate (fresh AdamW state each stage)
        "curry": ("configs/curry_dpo/tiny.yaml", [
            f"--data.init_args.train={{path: {train_file}, limit: null}}",
            "--model.init_args.stage_lrs", "null"]),
        "curry_non_iterative": ("configs/curry_dpo/tiny.yaml", [
            f"--data.init_args.train={{path: {train_file}, limit: null}}",
            "--model.init_args.stage_lrs", "null", "--data.init_args.curriculum", "non_iterative"]),
    }
    for name, (config, args) in runs.items():
        began = time.perf_counter()
        module = _fit(config, root / name, seed, [*start, *args])
        seconds = time.perf_counter() - began
        logps = _response_logps(module.policy, tokenizer, held)
        out[name] = {"rank_acc": _ranking_accuracy(logps, sft_logps, held), "gold": _gold(module, held),
                     "steps": module.global_step, "seconds": seconds}
        print(name, seed, {k: round(v, 4) for k, v in out[name].items()}, file=sys.stderr, flush=True)
    return out


def curry_vs_single_pair(opts: argparse.Namespace) -> dict:
    """Curry-DPO (iterative and non-iterative) vs single-pair DPO at equal pairs seen (see the module doc)."""
    budget = CURRY_BUDGET["quick" if opts.quick else "full"]
    records = json.loads((Path(str(BUILTIN_DIR)) / "ranked_preferences.json").read_text(encoding="utf-8"))
    random.Random(0).shuffle(records)
    held, train = records[: budget["held_out"]], records[budget["held_out"]:]
    if opts.quick:
        train = train[:60]
    # the same hyperparameters for every method: constant lr, beta, batch; fresh AdamW per Curry stage
    dpo = ["--model.init_args.loss.init_args.beta", str(opts.beta), "--model.init_args.optimizer.init_args.lr",
           str(opts.lr), "--data.init_args.batch_size", "16", "--data.init_args.max_length", "48"]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_file = root / "train.json"
        train_file.write_text(json.dumps(train), encoding="utf-8")
        pairs = []
        for r in train:
            chosen, rejected, _ = build_pairs(r["ratings"], "best_vs_worst")[0]
            pairs.append({"prompt": r["prompt"], "chosen": r["responses"][chosen], "rejected": r["responses"][rejected]})
        pairs_file = _write(root / "best_vs_worst.jsonl", pairs)
        for seed in range(opts.seeds):
            out = _curry_run(seed, root / f"seed{seed}", str(train_file), pairs_file, held, budget["sft_steps"], dpo)
            for name, values in out.items():
                runs.setdefault(name, []).append(values)
    summary = {m: {k: interval([r[k] for r in rs]) for k in rs[0]} for m, rs in runs.items()}
    for m in ("curry", "curry_non_iterative"):
        for k in ("rank_acc", "gold"):  # paired by seed: the same SFT start and data
            summary[m][f"{k}_gain_over_single_pair"] = interval(
                [a[k] - b[k] for a, b in zip(runs[m], runs["single_pair"])])
    summary["curry_met"] = {k: bool(summary["curry"][f"{k}_gain_over_single_pair"]["low"] > 0)
                            for k in ("rank_acc", "gold")}
    setup = {"seeds": opts.seeds, "quick": opts.quick, "held_out_prompts": len(held), "train_prompts": len(train),
             "pairs_seen": 3 * len(train), "sft_steps": budget["sft_steps"], "beta": opts.beta, "lr": opts.lr,
             "batch_size": 16}
    return {"setup": setup, "summary": summary, "runs": runs}


# -- SELM vs iterative online DPO (alpha 0) -------------------------------------------------------
SELM_CONFIG = REPO / "configs" / "selm" / "tiny.yaml"
SELM_QUICK_PROMPTS = 24
EVAL_SAMPLES = 4
EVAL = SamplingConfig(max_new_tokens=16, do_sample=True, temperature=1.0)


def distinct_2(texts: list[str]) -> float:
    """Unique word bigrams over all word bigrams of ``texts`` (0 when there are none)."""
    grams = [tuple(words[i:i + 2]) for t in texts for words in [t.split()] for i in range(len(words) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def _eval_samples(policy, tokenizer, batches) -> list[list[str]]:
    """``EVAL_SAMPLES`` answers per held-out prompt; sample j of prompt i always from the same generator."""
    out = []
    for batch in batches:
        ids = batch.input_ids.repeat_interleave(EVAL_SAMPLES, 0)
        mask = batch.attention_mask.repeat_interleave(EVAL_SAMPLES, 0)
        rows = [int(i) * EVAL_SAMPLES + j for i in batch.index.tolist() for j in range(EVAL_SAMPLES)]
        with eval_mode(policy):
            rollout = sample(policy, ids, mask, EVAL, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id,
                             generator=row_generators(0, 0, "benchmark/eval", rows))
        texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                 for r, m in zip(rollout.response_ids, rollout.response_mask)]
        out += [texts[k:k + EVAL_SAMPLES] for k in range(0, len(texts), EVAL_SAMPLES)]
    return out


def _selm_metrics(samples: list[list[str]], prompts: list[str], start: list[list[str]]) -> dict[str, float]:
    """Gold reward, distinct-2, and share and gold reward of the samples not among the starting policy's."""
    judge = RuleJudge()
    flat = [(p, s) for p, ss in zip(prompts, samples) for s in ss]
    gold = [1.0 - judge.p_unsafe(p, s) for p, s in flat]
    novel = [g for (p, s), g, seen in zip(flat, gold, (set(x) for x in start for _ in range(EVAL_SAMPLES)))
             if s not in seen]
    return {"gold": statistics.fmean(gold), "distinct_2": distinct_2([s for _, s in flat]),
            "novel_share": len(novel) / len(flat), "novel_gold": statistics.fmean(novel) if novel else 0.0}


def _held_out_prompts(tokenizer) -> tuple[list, list[str]]:
    """The held-out seed questions (``builtin:seed_prompts/val``) as batches, and their texts."""
    dm = PromptDataModule(train=DataSource(path="builtin:seed_prompts/val"), val_fraction=0.0,
                          template="Human: {prompt}\nAI:", chat_template=False, shuffle=False, batch_size=16)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    return batches, [p for b in batches for p in b.prompts]


def _selm_run(alpha: float, seed: int, prompts: int, root: Path) -> tuple[object, float]:
    """``lit-align fit`` of the SELM tiny config with ``alpha``, in process and quiet; the module and seconds."""
    args = ["fit", "--config", str(SELM_CONFIG), *QUIET, "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(root), "--seed_everything", str(seed),
            "--model.init_args.sample_seed", str(seed), "--model.init_args.loss.init_args.alpha", str(alpha),
            "--data.init_args.train.limit", str(prompts), "--data.init_args.seed", str(seed)]
    began = time.perf_counter()
    cli = cli_main(args)
    return cli.model, time.perf_counter() - began


def selm_vs_online_dpo(opts: argparse.Namespace) -> dict:
    """SELM (paper alpha, and ``opts.selm_alpha``) vs online DPO (alpha 0) at equal steps (see the module doc)."""
    methods = {"online_dpo": 0.0, "selm": 0.001, "selm_large_alpha": opts.selm_alpha}
    prompts = SELM_QUICK_PROMPTS if opts.quick else opts.selm_prompts
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    start_cli = cli_main(["--config", str(SELM_CONFIG), *QUIET, "--trainer.limit_val_batches", "0"], run=False)
    start_cli.model.configure_model()
    tokenizer = start_cli.model.tokenizer
    batches, held = _held_out_prompts(tokenizer)
    start_samples = _eval_samples(start_cli.model.policy, tokenizer, batches)
    start = _selm_metrics(start_samples, held, start_samples)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(opts.seeds):
            for name, alpha in methods.items():
                module, seconds = _selm_run(alpha, seed, prompts, Path(tmp) / f"{name}-{seed}")
                row = _selm_metrics(_eval_samples(module.policy, tokenizer, batches), held, start_samples)
                row.update(gain=row["gold"] - start["gold"], seconds=seconds)
                runs[name].append(row)
                print(name, seed, {k: round(v, 4) for k, v in row.items()}, file=sys.stderr, flush=True)
    keys = ("gold", "gain", "distinct_2", "novel_share", "novel_gold", "seconds")
    summary: dict = {m: {k: interval([r[k] for r in rs]) for k in keys} for m, rs in runs.items()}
    for m in ("selm", "selm_large_alpha"):  # paired by seed: same prompts, order and sampling generators
        summary[m]["gold_over_online_dpo"] = interval(
            [a["gold"] - b["gold"] for a, b in zip(runs[m], runs["online_dpo"])])
        summary[m]["distinct_2_over_online_dpo"] = interval(
            [a["distinct_2"] - b["distinct_2"] for a, b in zip(runs[m], runs["online_dpo"])])
    summary["selm_met"] = bool(summary["selm"]["gold_over_online_dpo"]["low"] > 0)
    summary["start"] = start
    setup = {"seeds": opts.seeds, "quick": opts.quick, "train_prompts": prompts, "iterations": 3,
             "candidates_per_prompt": 2, "beta": 0.01, "alphas": methods, "eval_samples_per_prompt": EVAL_SAMPLES,
             "held_out_prompts": len(held)}
    return {"setup": setup, "summary": summary, "runs": runs}


#: name -> comparison; ``--only`` picks some, ``--write`` stores each result under its name.
COMPARISONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "curry": curry_vs_single_pair,
    "selm": selm_vs_online_dpo,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds of each comparison (curry and selm)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: at most 2 seeds and tiny budgets (curry: {CURRY_BUDGET['quick']['held_out']} "
                             f"held-out and 60 training prompts, {CURRY_BUDGET['quick']['sft_steps']} SFT steps; "
                             f"selm: {SELM_QUICK_PROMPTS} training prompts)")
    parser.add_argument("--only", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS))
    parser.add_argument("--beta", type=float, default=0.1, help="curry: DPO beta of every Curry / single-pair run")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="curry: constant learning rate of every Curry / single-pair run")
    parser.add_argument("--selm-prompts", type=int, default=48,
                        help="selm: training prompts (3 iterations over disjoint slices of them)")
    parser.add_argument("--selm-alpha", type=float, default=0.5, help="selm: alpha of the exaggerated SELM run")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seeds = min(opts.seeds, 2)
    torch.set_num_threads(1)
    results = {name: COMPARISONS[name](opts) for name in opts.only}
    print(json.dumps({name: r["summary"] for name, r in results.items()}))
    if opts.write:
        stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        RESULTS.write_text(json.dumps({**stored, **results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
