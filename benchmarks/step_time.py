"""Benchmark: is a method's step after the redesign no slower than before it? (issue 15: at most 1.05x)

Two source trees run the same tiny config, each in fresh ``lit-align fit`` processes (1 process, or ``--world``
ranks under ``--strategy``; one torch thread each, CSV logger, no validation, no checkpoints; see
:mod:`fit_timing`):

* **current**: this checkout (``--current``, default: the tree this script lives in, uncommitted changes included);
* **baseline**: the code of ``--baseline`` (default ``2b9c0fc``, the commit before the engine's DDP work),
  exported with ``git archive`` into a temporary folder outside the repository and deleted afterwards (nothing is
  written to the repository or its git directory), or an existing checkout given with ``--baseline-tree``.

Each tree runs **its own** ``configs/<method>/tiny.yaml`` (keys may have moved from flat arguments into config
blocks between the two), with only overrides both understand: run length, logger, validation and checkpoints off,
threads. The runs alternate A/B, B/A over ``--repeats``, so a drift in the machine's load hits both alike. The
per-batch clock (:mod:`step_clock`) gives the mean wall time per full batch after ``warmup`` batches, per stage of the
module's ``phase_state`` (the debate's ``generate`` and DPO ``train`` stages, each with its own warm-up; ``all``
for the game and the watermark). Reported per method and stage: each tree's mean step (ms, 95% interval over
repeats) and the mean of the per-repeat ratios current / baseline with its 95% Student-t interval; the target is
a mean ratio <= 1.05.

The batches timed are the same in both trees only while the two sample the same tokens: a change in seeding
changes generation lengths (EOS) and so the work per step; the JSON keeps every run's numbers.

Prints a Markdown table, then one JSON line (``bench: step_time``); ``--out`` also writes the JSON.

Usage: ``python benchmarks/step_time.py [--baseline 2b9c0fc | --baseline-tree DIR] [--methods game,watermark,debate]
[--repeats 5] [--world 1] [--strategy ddp|fsdp2] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # runnable as `python benchmarks/step_time.py`

from fit_timing import FitRun, RunFailed, add_run_arguments, run_fit, selected_methods, stage_windows  # noqa: E402
from multiplayer_scaling import interval_stats  # noqa: E402

ROOT = HERE.parent
TARGET = 1.05  # issue 15: the redesigned step at most 1.05x the previous code's
DEFAULT_BASELINE = "2b9c0fc"


@dataclass(frozen=True)
class Workload:
    """What one method's runs time."""

    config: str
    """the tiny config, relative to each tree"""
    batches: int
    """training batches per run (warm-up included)"""
    warmup: int
    """batches dropped at the start of each stage"""
    quick_batches: int
    """batches per run with ``--quick``"""


WORKLOADS = {
    # 2 warm-up + 24 timed batches: 12 defender and 12 attacker steps of the tiny schedule (blocks of 12)
    "game": Workload("configs/game/tiny.yaml", batches=26, warmup=2, quick_batches=4),
    "watermark": Workload("configs/watermark/tiny.yaml", batches=105, warmup=5, quick_batches=10),
    # the tiny config's generate stage is 12 batches (160 + 32 questions in batches of 16), then DPO steps
    "debate": Workload("configs/debate/tiny.yaml", batches=24, warmup=1, quick_batches=3),
    "dpo": Workload("configs/dpo/tiny.yaml", batches=40, warmup=3, quick_batches=8),
}
DEFAULT_METHODS = "game,watermark,debate"


def summarize(current: list[float], baseline: list[float], target: float = TARGET) -> dict:
    """Paired repeats (mean step seconds of repeat i in each tree): each tree's mean step in ms with its 95%
    interval, the per-repeat ratios current / baseline with theirs, and whether the mean ratio meets ``target``."""
    out = {"current_ms": interval_stats([1e3 * v for v in current]),
           "baseline_ms": interval_stats([1e3 * v for v in baseline])}
    ratios = [c / b for c, b in zip(current, baseline)]
    if ratios:
        out["ratio"] = interval_stats(ratios)
        out["met"] = out["ratio"]["mean"] <= target
    return out


def _cell(stats: dict | None, digits: int) -> str:
    if not stats:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    if stats["low"] is not None:
        text += f" [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"
    return text


def markdown(results: dict, baseline: str) -> str:
    """One row per method and stage."""
    lines = [f"| method | stage | baseline {baseline} ms/step | current ms/step | ratio current/baseline | "
             f"target <= {TARGET}x | note |", "|---|---|---|---|---|---|---|"]
    for method, res in results.items():
        stages = res.get("stages") or {"-": {}}
        for stage, s in stages.items():
            met = "-" if "met" not in s else ("yes" if s["met"] else "**no**")
            note = res.get("error", "").replace("|", "/")
            lines.append(f"| {method} | {stage} | {_cell(s.get('baseline_ms'), 1)} | {_cell(s.get('current_ms'), 1)} | "
                         f"{_cell(s.get('ratio'), 3)} | {met} | {note} |")
    return "\n".join(lines)


def export_commit(commit: str, dest: Path) -> str:
    """Write the files of ``commit`` (of this repository) into ``dest`` with ``git archive``; returns its full hash."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {sha} failed")
    return sha


def _step_seconds(tree: Path, work: Workload, batches: int, timeout: float, world: int = 1,
                  strategy: str = "ddp") -> dict[str, float]:
    """stage -> mean seconds per timed full batch of one run of ``tree`` (on ``world`` ranks: the slowest rank's
    time; an epoch's last, partial batch is left out, so 1 and N ranks time the same batch size)."""
    rows = run_fit(FitRun(tree=tree, config=work.config, batches=batches, world=world, strategy=strategy,
                          timeout=timeout))
    windows = stage_windows(rows, work.warmup, full_batches=True)
    if not windows:
        raise RunFailed(f"no batch left after {work.warmup} of warm-up in any stage ({len(rows.get(0, []))} logged)")
    return {stage: w.step_s for stage, w in windows.items()}


def compare(method: str, trees: dict[str, Path], repeats: int, quick: bool, timeout: float, world: int = 1,
            strategy: str = "ddp") -> dict:
    """Run ``method`` in both trees, alternating, and summarise per stage."""
    work = WORKLOADS[method]
    batches = work.quick_batches if quick else work.batches
    seconds: dict[str, list[dict[str, float]]] = {"current": [], "baseline": []}
    runs = []
    for repeat in range(repeats):
        order = ("baseline", "current") if repeat % 2 == 0 else ("current", "baseline")
        for name in order:
            start = time.perf_counter()
            try:
                stages = _step_seconds(trees[name], work, batches, timeout, world, strategy)
            except RunFailed as exc:
                print(f"{method} repeat {repeat} {name}: FAILED {exc}", file=sys.stderr, flush=True)
                return {"error": f"{name}: {exc}", "runs": runs, "batches": batches, "warmup": work.warmup}
            seconds[name].append(stages)
            runs.append({"repeat": repeat, "tree": name, "step_s": stages, "run_s": time.perf_counter() - start})
            shown = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in stages.items())
            print(f"{method} repeat {repeat} {name}: {shown}", file=sys.stderr, flush=True)
    common = [s for s in seconds["current"][0] if all(s in r for r in seconds["current"] + seconds["baseline"])]
    out = {"stages": {s: summarize([r[s] for r in seconds["current"]], [r[s] for r in seconds["baseline"]])
                      for s in common},
           "runs": runs, "config": work.config, "batches": batches, "warmup": work.warmup}
    missing = sorted({s for r in seconds["current"] + seconds["baseline"] for s in r} - set(common))
    if missing:
        out["error"] = f"stages timed in one tree or repeat only: {missing}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="the commit to compare against")
    parser.add_argument("--baseline-tree", type=Path, help="an existing checkout to use instead of --baseline")
    parser.add_argument("--current", type=Path, default=ROOT, help="the tree under test (default: this checkout)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--world", type=int, default=1, help="ranks of every run (2: both trees under DDP)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp", help="with --world > 1")
    add_run_arguments(parser)
    args = parser.parse_args()
    methods = selected_methods(parser, args.methods, WORKLOADS)
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory(prefix="lit_align_baseline_") as tmp:
        if args.baseline_tree is not None:
            baseline_tree, label = args.baseline_tree.resolve(), str(args.baseline_tree)
        else:
            baseline_tree = Path(tmp) / "tree"
            label = export_commit(args.baseline, baseline_tree)[:9]
        trees = {"current": args.current.resolve(), "baseline": baseline_tree}
        results = {m: compare(m, trees, repeats, args.quick, args.timeout, args.world, args.strategy)
                   for m in methods}

    table = markdown(results, label)
    current = "this checkout" if args.current.resolve() == ROOT.resolve() else str(args.current)
    out = {"bench": "step_time", "baseline": label, "current": current, "repeats": repeats, "world": args.world,
           "strategy": args.strategy if args.world > 1 else None, "quick": args.quick, "target": TARGET,
           "threads": 1, "results": results, "markdown": table}
    print(table)
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
