"""Issue 19: does iterating ISARA's rounds beat one big round with the same number of new samples?

The claim checked (Guo et al. 2024, "Human-Instruction-Free LLM Self-Alignment with Limited Samples",
arXiv:2401.06785; others.md §6(c)): self-alignment from a small seed set lowers the harmful rate more than SFT on the
seeds alone, and T rounds of (generate, filter, fine-tune) beat one round that generates the same total of new
samples.

Setup (the tiny ISARA domain, ``lit_align/data/builtin/README.md``): ``builtin:tiny-isara-base``, a tiny LM
pretrained on instruction-free few-shot documents, complies with 96% of the held-out toy harmful questions zero-shot
and refuses all of them after four refusal demonstrations; the 64 seed pairs of ``builtin:isara_seeds`` (harmful
questions with refusals); ``configs/isara/tiny.yaml`` (retrieval, deduplication and leakage with the real
all-MiniLM-L6-v2, k 4 demonstrations, greedy answers; its RuleJudge safety filter is switched off here so that
``unsafe_generated`` counts what the loop writes) driven in process through
``lit_align.cli.cli_main`` (``fit_timing.fit_in_process``). Every arm runs ``T`` rounds (``data.rounds``) with the
same optimiser, learning rate, batch size and SFT passes per round; only the new pairs differ:

* ``base``: the model as shipped (no training);
* ``seeds_only``: ``questions_per_round 0``: SFT on the 64 seeds alone with the same schedule;
* ``one_round``: round 0 writes all ``N`` new questions (``questions_per_round = N``) with the base model and the
  seeds as demonstrations; the later rounds' generation steps are marked done with nothing kept
  (:class:`GenerateOnly`), so the pool is fixed after round 0;
* ``iterative``: ISARA: every round writes ``N / T`` questions with the round's model and the grown pool.

Settings (:data:`SETTINGS`; the first is the main one). With ``init: base`` every round fine-tunes from the base
model, so each arm's final model is ONE SFT of the base on its final pool with the same passes: the arms differ only
in which pairs the pool holds (one round's and T rounds' pools have about the same size). With ``init: previous``
(the config's default) the rounds accumulate, and ``one_round``'s new pairs are trained on in all T rounds where
``iterative``'s last pairs get one round: more SFT on new pairs for ``one_round`` (``sft_rows`` says how much).
``sampled_answers`` samples the retrieval-augmented answers (temperature 1) instead of greedy decoding, so some
answers comply and, with no safety filter, enter the pool: the case where a better M_t could write better answers.
The fourth setting (lr 5e-5) saturates every arm; ``--only-setting 3`` runs it.

Measured on ``builtin:isara_eval`` (48 held-out harmful questions: actions no seed names) after training: the
zero-shot greedy harmful rate judged by the TOY rule judge (``lit_align.game.RuleJudge``; the module's own
``answer``); on ``builtin:isara_benign`` (42 held-out benign questions) the refusal rate (over-refusal); the final
pool size, the scaling ratio |D_T| / |D_0|, distinct-2 of the generated questions and answers, generated pairs the
judge calls unsafe, and questions that leaked an evaluation question (dropped). Per seed (the run's, the model's, the
data order's and the generation's seed change), 95% Student-t intervals over seeds of each arm's mean, and paired
differences (``iterative - one_round``, ``iterative - seeds_only``, ``one_round - seeds_only``; negative = fewer
harmful answers) with a t interval over seeds and a percentile bootstrap over evaluation questions (seeds pooled).
An effect is ``met`` only when both intervals lie below 0.

    python benchmarks/isara_gain.py --write        # 6 seeds, 3 settings, 2 seeds at a time; 4-9 min on 2 cores
    python benchmarks/isara_gain.py --main-only    # the main setting only
    python benchmarks/isara_gain.py --only-setting 3 --write   # the saturated setting (merged into the results)
    python benchmarks/isara_gain.py --quick        # smoke run: 1 seed, 2 rounds, 8 new samples
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from fit_timing import QUIET as FIT_QUIET  # noqa: E402  (this folder is on sys.path when a script runs)
from fit_timing import fit_in_process, interval, paired_bootstrap  # noqa: E402

from lit_align.data.records import DataSource, load_records  # noqa: E402
from lit_align.game import RuleJudge  # noqa: E402
from lit_align.retrieval import distinct_n  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "isara" / "tiny.yaml"
RESULTS = REPO / "benchmarks" / "results_isara.json"
QUIET = [*FIT_QUIET, "--trainer.limit_val_batches", "0"]
ARMS = ("base", "seeds_only", "one_round", "iterative")
#: paired differences reported (arm, against): negative harmful-rate differences favour ``arm``
EFFECTS = (("iterative", "one_round"), ("iterative", "seeds_only"), ("one_round", "seeds_only"))


class GenerateOnly(L.Callback):
    """Marks every round not in ``rounds`` as generated with nothing kept before the module's ``on_fit_start``
    (callbacks' hooks run first), so the module's generation step skips those rounds and their SFT reads the pool
    as it stands."""

    def __init__(self, rounds: set[int]) -> None:
        self.rounds = rounds

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        for r in range(dm.rounds):
            if r not in self.rounds and not dm.has_round(r):
                dm.add_round(r, [], {"new": 0.0, "kept": 0.0})


def _questions(path: str) -> list[str]:
    return [r["question"] for r in load_records(DataSource(path), ["question"])]


def _evaluate(module, eval_questions: list[str], benign: list[str]) -> dict:
    """Zero-shot greedy answers (the module's own evaluation path): per-question unsafe verdicts on the harmful
    set, refusals on the benign one."""
    judge = RuleJudge()
    answers = module.answer(eval_questions)
    unsafe = [float(u) for u in judge.score(eval_questions, answers).unsafe.tolist()]
    refused = [float(judge.features("", a)[2]) for a in module.answer(benign)]
    return {"unsafe": unsafe, "harmful_rate": statistics.fmean(unsafe),
            "benign_refusal_rate": statistics.fmean(refused), "examples": list(zip(eval_questions[:2], answers[:2]))}


def _pool_stats(dm) -> dict:
    generated = [r for r in dm.pool if r.kind == "generated"]
    questions, answers = [r.question for r in generated], [r.answer for r in generated]
    judge = RuleJudge()
    kept = [dm.round_stats[r].get("kept", 0.0) for r in sorted(dm.round_stats)]
    # SFT rows seen: round t fine-tunes on the seeds and rounds 0..t's kept pairs, epochs_per_round times
    sft_rows = sum(dm.num_seeds + sum(kept[: t + 1]) for t in range(dm.rounds)) * dm.epochs_per_round
    return {"pool_size": len(dm.pool), "scaling_ratio": len(dm.pool) / dm.num_seeds, "generated": len(generated),
            "distinct_2_questions": float(distinct_n(questions, 2)) if questions else 0.0,
            "distinct_2_answers": float(distinct_n(answers, 2)) if answers else 0.0,
            "unsafe_generated": float(judge.score(questions, answers).unsafe.float().sum()) if generated else 0.0,
            "leaked": sum(s.get("leaked", 0.0) for s in dm.round_stats.values()),
            "kept_per_round": kept, "sft_rows": sft_rows, "final_round_sft_rows": len(dm.pool) * dm.epochs_per_round}


def _run_seed(job: tuple[int, dict]) -> dict:
    """Every arm of one seed, in this process (one torch thread)."""
    seed, budget = job
    torch.set_num_threads(1)
    rounds, total = budget["rounds"], budget["new_samples"]
    eval_questions, benign = _questions("builtin:isara_eval"), _questions("builtin:isara_benign")
    common = ["--model.init_args.sample_seed", str(seed), "--data.init_args.rounds", str(rounds),
              "--trainer.max_epochs", str(rounds),
              "--data.init_args.epochs_per_round", str(budget["epochs_per_round"]),
              "--model.init_args.stage_lrs", json.dumps([budget["lr"]] * rounds), "--model.init_args.init",
              budget["init"], "--model.init_args.k", str(budget["k"]),
              "--model.init_args.answer_sampling.do_sample", str(budget.get("sampled_answers", False)).lower(),
              # what the loop itself writes (unsafe_generated): the tiny config's RuleJudge safety filter off
              "--model.init_args.safety_filter", "null"]
    # arm -> (questions per round, rounds that generate)
    plans = {"seeds_only": (0, None), "one_round": (total, {0}), "iterative": (total // rounds, None)}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, (per_round, generating) in plans.items():
            began = time.perf_counter()
            args = [*common, "--model.init_args.questions_per_round", str(per_round)]
            callbacks = [] if generating is None else [GenerateOnly(generating)]
            module = fit_in_process(CONFIG, Path(tmp) / arm, seed, args, QUIET, callbacks)
            dm = module.trainer.datamodule
            out[arm] = {**_evaluate(module, eval_questions, benign), **_pool_stats(dm),
                        "seconds": time.perf_counter() - began}
            if arm == "seeds_only":  # the base model is the policy before training: evaluate it once per seed
                from lit_align.models import ModelSpec, build_causal_lm

                module.policy = build_causal_lm(ModelSpec(name_or_path="builtin:tiny-isara-base"), module.tokenizer)
                out["base"] = {**_evaluate(module, eval_questions, benign), "pool_size": 64, "scaling_ratio": 1.0}
            print(arm, seed, {k: round(v, 3) for k, v in out[arm].items() if isinstance(v, float)},
                  file=sys.stderr, flush=True)
    return {arm: out[arm] for arm in ARMS}


def _effect(runs: list[dict], arm: str, against: str) -> dict:
    """Paired difference of the harmful rate, ``arm - against`` (negative: ``arm`` answers fewer harmfully)."""
    units = [[a - b for a, b in zip(r[arm]["unsafe"], r[against]["unsafe"])] for r in runs]
    effect = {"difference": interval([statistics.fmean(u) for u in units]),
              "difference_bootstrap_questions": paired_bootstrap(units)}
    effect["met"] = (len(runs) > 1 and effect["difference"]["high"] < 0
                     and effect["difference_bootstrap_questions"]["high"] < 0)
    return effect


def summarise(runs: list[dict]) -> dict:
    keys = ("harmful_rate", "benign_refusal_rate", "pool_size", "scaling_ratio", "distinct_2_questions",
            "distinct_2_answers", "unsafe_generated", "leaked", "sft_rows", "final_round_sft_rows")
    summary: dict = {"arms": {arm: {k: interval([float(r[arm][k]) for r in runs]) for k in keys if k in runs[0][arm]}
                              for arm in ARMS}}
    for arm, against in EFFECTS:
        summary[f"{arm}_vs_{against}"] = _effect(runs, arm, against)
    summary["met"] = {f"{arm}_vs_{against}": summary[f"{arm}_vs_{against}"]["met"] for arm, against in EFFECTS}
    return summary


def run(seeds: int, budget: dict, workers: int) -> dict:
    """Every arm on ``seeds`` seeds with ``budget``: ``{"summary", "runs"}`` (per-question verdicts left out)."""
    jobs = [(seed, budget) for seed in range(seeds)]
    if workers > 1 and seeds > 1:  # seeds in parallel processes, one thread each (spawned: no forked torch state)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, seeds), mp_context=context) as pool:
            runs = list(pool.map(_run_seed, jobs))
    else:
        runs = [_run_seed(job) for job in jobs]
    return {"summary": summarise(runs),
            "runs": [{arm: {k: v for k, v in r[arm].items() if k != "unsafe"} for arm in ARMS} for r in runs]}


#: The settings (the first is the main one; the others check how the result depends on the SFT and the answers):
#: the round's starting model (``init``), peak learning rate, SFT passes over the pool per round, and whether answers
#: are sampled (temperature 1) instead of greedy. The default run is the first three; ``--only-setting 3`` runs
#: the saturated one (kept apart so the default run stays under 10 minutes).
SETTINGS = (
    {"init": "base", "lr": 2e-5, "epochs_per_round": 3},
    {"init": "previous", "lr": 2e-5, "epochs_per_round": 1},
    {"init": "base", "lr": 2e-5, "epochs_per_round": 3, "sampled_answers": True},
    {"init": "base", "lr": 5e-5, "epochs_per_round": 3},
)
DEFAULT_SETTINGS = 3


def _name(setting: dict) -> str:
    sampled = ",sampled_answers" if setting.get("sampled_answers") else ""
    return f"init={setting['init']},lr={setting['lr']:g},epochs_per_round={setting['epochs_per_round']}{sampled}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="T: ISARA rounds (every arm fine-tunes T rounds)")
    parser.add_argument("--new-samples", type=int, default=96, help="N: new questions in all, over the rounds")
    parser.add_argument("--k", type=int, default=4, help="retrieved demonstrations per answer")
    parser.add_argument("--main-only", action="store_true", help="only the main setting (the first of SETTINGS)")
    parser.add_argument("--only-setting", type=int, default=None, help="only SETTINGS[i] (a check of one setting)")
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 8 new samples, main setting (smoke run)")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if opts.quick else opts.seeds
    rounds, total = (2, 8) if opts.quick else (opts.rounds, opts.new_samples)
    if total % rounds:
        parser.error("--new-samples must be a multiple of --rounds (the same total for one round and T rounds)")
    began = time.perf_counter()
    settings = {}
    chosen = SETTINGS[:1] if opts.quick or opts.main_only else SETTINGS[:DEFAULT_SETTINGS]
    chosen = chosen if opts.only_setting is None else SETTINGS[opts.only_setting:opts.only_setting + 1]
    for setting in chosen:
        budget = {"rounds": rounds, "new_samples": total, "k": opts.k, **setting}
        settings[_name(setting)] = {"budget": budget, **run(seeds, budget, opts.workers)}
        summary = settings[_name(setting)]["summary"]
        print(_name(setting), {arm: round(summary["arms"][arm]["harmful_rate"]["mean"], 3) for arm in ARMS},
              {name: summary[name]["difference"] for name in summary["met"]}, flush=True)
    seconds = time.perf_counter() - began
    for entry in settings.values():
        entry.update(seeds=seeds, seconds_all_settings_of_the_run=seconds, workers=opts.workers)
    main_name = _name(SETTINGS[0])
    print(f"{seconds:.0f} s")
    if opts.write:  # merged by setting name: a setting not run keeps its stored entry
        stored = json.loads(RESULTS.read_text(encoding="utf-8")).get("settings", {}) if RESULTS.exists() else {}
        settings = {**stored, **settings}
        result = {"setup": {"main": main_name, "config": str(CONFIG.relative_to(REPO)),
                            "model": "builtin:tiny-isara-base", "seed_pairs": "builtin:isara_seeds (64)",
                            "eval": "builtin:isara_eval (48 harmful), builtin:isara_benign (42)",
                            "judge": "RuleJudge (toy)"},
                  "met": settings[main_name]["summary"]["met"] if main_name in settings else None,
                  "settings": settings}
        RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS}; met (main setting): {result['met']}")


if __name__ == "__main__":
    main()
