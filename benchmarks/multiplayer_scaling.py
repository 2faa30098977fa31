"""Benchmark: rollout-plus-update throughput of the multi-player methods on 2 processes vs 1 (issue 15).

For each method, ``lit-align fit`` of its tiny config runs in a fresh process on 1 rank and on ``--world`` ranks
(``callbacks/ddp_cpu.yaml`` or, with ``--strategy fsdp2``, ``callbacks/fsdp2_cpu.yaml``, over gloo on CPU), one
torch thread per rank, the same per-rank batch (so N ranks process N times the samples per step), W&B replaced by
a CSV logger, no validation and no checkpoints (see :mod:`fit_timing`). The per-batch clock
(:mod:`step_clock`) times the batches after a warm-up:

    samples/s = (samples of the timed batches, summed over ranks) / (their seconds, each batch timed from the end
    of the batch before it to its own end on the slowest rank)

An epoch's last, partial batch (the watermark's corpus gives each of 2 ranks 7 batches of 16 and one of 4 per
epoch) is left out of both sums, so both world sizes are timed on full per-rank batches (``partial_skipped`` in
the JSON counts them).

* ``game``: ``configs/game/tiny.yaml`` (both players generate, the judge scores, the scheduled player's PPO update);
* ``watermark``: ``configs/watermark/tiny.yaml`` (LLM rollouts, detector scores, PPO of the LLM and critic, the
  detector's update);
* ``debate``: ``configs/debate/tiny.yaml``'s generate stage only (natural debates, guided responses, one-step
  rollout rewards, pairs: the run stops before the stage's last batch, which also scores the reference before DPO),
  with ``questions_per_phase: null`` (the whole training split) so the stage outlasts the timed batches;
* ``dpo``: ``configs/dpo/tiny.yaml`` (not in the default set: a method that already runs under DDP, to check the
  harness).

The machine's own ceiling (``--independent``): N separate 1-rank runs of the same config started together, each
in its own process on one thread, with nothing shared (no process group, no collective, no waiting for the slowest
rank). Their summed samples/s over one 1-rank run alone is the most any N-rank run could reach on this machine
(shared caches, memory bandwidth, clock speed with every core busy); the N-rank runs' share of it (``efficiency``)
is what the method's own distributed work costs. ``overlap`` says how much of the longest timed window all the
copies ran together (near 1: the sum is a fair ceiling; lower: a copy ran partly alone, which inflates it).

A synchronous data-parallel run cannot reach that sum when the cores run at different speeds: every optimiser step
waits for the slowest rank. The same copies timed in lockstep, each batch as long as the slower copy's (the
``lockstep ceiling``, :func:`fit_timing.steady_window` with ``lockstep=True``), estimate what N ranks at those
speeds reach with free communication; ``lockstep efficiency``, the N-rank runs' share of it, is then what the
collectives and their waits cost. It is an estimate: the copies' batches are paired by index, not by time, and a
rank waits at every collective of a step, not once per batch (so the real lockstep cost can be higher).
On a shared VM whose cores' speeds drift apart by 10-25% for seconds at a time (as this 2-vCPU machine's do), the
lockstep ceiling can sit well below the plain one.

Runs interleave 1 rank and N ranks within each repeat (their order alternating between repeats). Reported per
method: the mean samples/s of each over ``--repeats`` with a 95% Student-t interval, and the mean of the per-repeat
ratios N ranks / 1 rank with its interval, against the target (>= 1.7x with 2 ranks). A run that fails (a method
that does not run under N processes yet) is reported with its error line, its world size is not tried again, and
the other methods still run. Timings are meaningful only on an otherwise idle machine with at least N free cores.

Prints a Markdown table, then one JSON line (``bench: multiplayer_scaling``); ``--out`` also writes the JSON.

Usage: ``python benchmarks/multiplayer_scaling.py [--methods game,watermark,debate] [--strategy ddp|fsdp2]
[--world 2] [--repeats 5] [--independent] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # runnable as `python benchmarks/multiplayer_scaling.py`

from fit_timing import (  # noqa: E402
    FitRun,
    RunFailed,
    add_run_arguments,
    mean_interval,
    overlap_share,
    run_fit,
    selected_methods,
    steady_window,
    window_span,
)

ROOT = HERE.parent
TARGET = 1.7  # issue 15: 2 ranks at least 1.7x the samples/s of 1


@dataclass(frozen=True)
class Workload:
    """What one method's runs time."""

    config: str
    """the tiny config, relative to the tree"""
    warmup: int
    """batches run before the timed ones"""
    steps: int
    """batches timed"""
    quick: tuple[int, int]
    """``(warmup, steps)`` of ``--quick``"""
    stage: str | None = None
    """time only this stage of the module's ``phase_state`` (the debate's ``generate``)"""
    model_keys: dict = field(default_factory=dict)
    """keys set wherever they sit under the config's ``model`` section"""


WORKLOADS = {
    "game": Workload("configs/game/tiny.yaml", warmup=2, steps=24, quick=(1, 3)),
    "watermark": Workload("configs/watermark/tiny.yaml", warmup=5, steps=100, quick=(2, 8)),
    "debate": Workload("configs/debate/tiny.yaml", warmup=1, steps=7, quick=(1, 2), stage="generate",
                       model_keys={"questions_per_phase": None}),
    "dpo": Workload("configs/dpo/tiny.yaml", warmup=3, steps=40, quick=(2, 6)),
}
DEFAULT_METHODS = "game,watermark,debate"


def summarize(single: list[float], multi: list[float], target: float = TARGET,
              independent: list[float] | None = None, lockstep: list[float] | None = None) -> dict:
    """Per-method summary of paired repeats (``single[i]`` and ``multi[i]``: samples/s of repeat i on 1 and N
    ranks): means and 95% intervals of each and of the per-repeat ratios, and whether the mean ratio meets
    ``target``. ``multi`` may be shorter or empty (runs that failed): only complete pairs enter the ratio. With
    ``independent[i]`` (N separate 1-rank runs at once, summed) also the machine's ceiling ``independent / single``
    and the N-rank runs' ``efficiency``, ``multi / independent``; with ``lockstep[i]`` (the same runs timed as if
    each batch waited for the slowest copy) ``lockstep_ceiling``, ``lockstep / single``, and
    ``lockstep_efficiency``, ``multi / lockstep``."""
    out = {"repeats": len(single)}
    for name, values in (("single", single), ("multi", multi), ("independent", independent or [])):
        if values:
            out[f"{name}_samples_s"] = interval_stats(values)
    ratios = [m / s for s, m in zip(single, multi)]
    if ratios:
        out["ratio"] = interval_stats(ratios)
        out["met"] = out["ratio"]["mean"] >= target
    for prefix, ceilings in (("", independent), ("lockstep_", lockstep)):
        if ceilings:
            out[f"{prefix}ceiling"] = interval_stats([c / s for s, c in zip(single, ceilings)])
            efficiency = [m / c for m, c in zip(multi, ceilings)]
            if efficiency:
                out[f"{prefix}efficiency"] = interval_stats(efficiency)
    return out


def interval_stats(values: list[float]) -> dict:
    """``{"mean", "low", "high", "values"}``: the mean and its 95% interval (``None`` with one value)."""
    mean, low, high = mean_interval(values)
    return {"mean": mean, "low": None if math.isnan(low) else low, "high": None if math.isnan(high) else high,
            "values": list(values)}


def _cell(stats: dict | None, digits: int = 1) -> str:
    """``mean [low, high]`` (the interval left out when there is none)."""
    if not stats:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    if stats["low"] is not None:
        text += f" [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"
    return text


def markdown(results: dict, world: int, strategy: str) -> str:
    """The table of :func:`main`'s results: one row per method."""
    ceiling = any("ceiling" in res for res in results.values())
    head = f"| method | 1 rank samples/s | {world} ranks ({strategy}) samples/s | ratio | target >= {TARGET}x |"
    if ceiling:
        head += f" {world} independent 1-rank runs, samples/s | ceiling | efficiency | lockstep ceiling | efficiency |"
    lines = [head + " note |", "|---" * head.count("|") + "|"]  # one column more: the note
    for method, res in results.items():
        met = "-" if "met" not in res else ("yes" if res["met"] else "**no**")
        note = res.get("error", "").replace("|", "/")
        row = (f"| {method} | {_cell(res.get('single_samples_s'))} | {_cell(res.get('multi_samples_s'))} | "
               f"{_cell(res.get('ratio'), 2)} | {met} |")
        if ceiling:
            row += (f" {_cell(res.get('independent_samples_s'))} | {_cell(res.get('ceiling'), 2)} | "
                    f"{_cell(res.get('efficiency'), 2)} | {_cell(res.get('lockstep_ceiling'), 2)} | "
                    f"{_cell(res.get('lockstep_efficiency'), 2)} |")
        lines.append(f"{row} {note} |")
    return "\n".join(lines)


def _fit_run(work: Workload, world: int, strategy: str, warmup: int, steps: int, timeout: float) -> FitRun:
    return FitRun(tree=ROOT, config=work.config, batches=warmup + steps, world=world, strategy=strategy,
                  stage=work.stage, model_keys=work.model_keys or None, timeout=timeout)


def _throughput(method: str, work: Workload, world: int, strategy: str, warmup: int, steps: int,
                timeout: float) -> tuple[float, dict]:
    """samples/s of one run, and what it timed."""
    rows = run_fit(_fit_run(work, world, strategy, warmup, steps, timeout))
    try:
        window = steady_window(rows, warmup, work.stage, max_steps=steps, full_batches=True)
    except ValueError as exc:
        raise RunFailed(str(exc)) from exc
    return window.samples_per_s, {"steps": window.steps, "samples": window.samples, "seconds": window.seconds,
                                  "partial_skipped": window.skipped,
                                  "per_rank_batch": window.samples / (window.steps * world)}


def _independent_throughput(method: str, work: Workload, copies: int, warmup: int, steps: int,
                            timeout: float) -> tuple[float, dict]:
    """Summed samples/s of ``copies`` 1-rank runs started together (the machine's ceiling for that many ranks), and
    what they timed: the share of the longest timed window that all of them ran together, and ``lockstep_samples_s``,
    their samples over the sum of each batch's slowest copy (``steady_window(lockstep=True)``)."""
    from concurrent.futures import ThreadPoolExecutor

    run = _fit_run(work, 1, "ddp", warmup, steps, timeout)  # one process: the strategy is not used
    with ThreadPoolExecutor(copies) as pool:
        clocks = list(pool.map(run_fit, [run] * copies))
    try:
        windows = [steady_window(rows, warmup, work.stage, max_steps=steps, full_batches=True) for rows in clocks]
        lockstep = steady_window({i: rows[0] for i, rows in enumerate(clocks)}, warmup, work.stage, max_steps=steps,
                                 full_batches=True, lockstep=True)
        spans = [window_span(rows[0], warmup, work.stage, max_steps=steps) for rows in clocks]
    except ValueError as exc:
        raise RunFailed(str(exc)) from exc
    return sum(w.samples_per_s for w in windows), {
        "steps": windows[0].steps, "samples": sum(w.samples for w in windows),
        "seconds": max(w.seconds for w in windows), "copies": copies, "overlap": overlap_share(spans),
        "per_copy_samples_s": [w.samples_per_s for w in windows], "lockstep_samples_s": lockstep.samples_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--world", type=int, default=2, help="ranks of the multi-process runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, help="warm-up batches (default: per method)")
    parser.add_argument("--steps", type=int, help="timed batches (default: per method)")
    parser.add_argument("--independent", action="store_true",
                        help="also time --world separate 1-rank runs started together: the machine's ceiling")
    add_run_arguments(parser)
    args = parser.parse_args()
    methods = selected_methods(parser, args.methods, WORKLOADS)
    repeats = 1 if args.quick else args.repeats

    results: dict[str, dict] = {}
    for method in methods:
        work = WORKLOADS[method]
        warmup, steps = work.quick if args.quick else (work.warmup, work.steps)
        warmup, steps = args.warmup or warmup, args.steps or steps
        kinds = [1, args.world] + (["independent"] if args.independent else [])
        samples: dict[int | str, list[float]] = {kind: [] for kind in kinds}
        runs: list[dict] = []
        failed: dict[int | str, str] = {}
        for repeat in range(repeats):
            order = kinds if repeat % 2 == 0 else kinds[::-1]
            for kind in order:
                if kind in failed:
                    continue
                start = time.perf_counter()
                try:
                    if kind == "independent":
                        value, timed = _independent_throughput(method, work, args.world, warmup, steps, args.timeout)
                    else:
                        value, timed = _throughput(method, work, kind, args.strategy, warmup, steps, args.timeout)
                except RunFailed as exc:
                    failed[kind] = f"{kind} rank(s): {exc}" if kind != "independent" else f"independent runs: {exc}"
                    print(f"{method} repeat {repeat} {kind}: FAILED {exc}", file=sys.stderr, flush=True)
                    continue
                samples[kind].append(value)
                runs.append({"repeat": repeat, "world": kind, "samples_s": value, **timed,
                             "run_s": time.perf_counter() - start})
                print(f"{method} repeat {repeat} {kind}: {value:.2f} samples/s ({timed['steps']} batches, "
                      f"{timed['seconds']:.1f} s)", file=sys.stderr, flush=True)
            if 1 in failed:
                break
        lockstep = [run["lockstep_samples_s"] for run in runs if run["world"] == "independent"]
        res = summarize(samples[1], samples[args.world], independent=samples.get("independent"),
                        lockstep=lockstep) if samples[1] else {"repeats": 0}
        res.update(config=work.config, warmup=warmup, steps=steps, stage=work.stage, runs=runs)
        if failed:
            res["error"] = "; ".join(failed.values())
        results[method] = res

    table = markdown(results, args.world, args.strategy)
    out = {"bench": "multiplayer_scaling", "strategy": args.strategy, "world": args.world, "repeats": repeats,
           "quick": args.quick, "target": TARGET, "threads_per_rank": 1, "results": results, "markdown": table}
    print(table)
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
