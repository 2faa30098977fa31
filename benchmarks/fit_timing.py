"""Time real ``lit-align fit`` runs from the per-batch clock of :mod:`step_clock` (shared by
``multiplayer_scaling.py`` and ``step_time.py``).

A run is a fresh ``lit-align fit`` subprocess of one source tree (its ``lit_align`` first on ``PYTHONPATH``, its own
copy of the config), with one torch thread per process (``--threads 1``, ``OMP_NUM_THREADS=1``), W&B off in favour
of a CSV logger, no validation, no checkpoints, no progress bar, and :class:`step_clock.StepClock` as the only
callback. Each timed batch counts from the end of the batch before it to its own end (on the slowest rank), after
``warmup`` batches, so start-up (imports, model building, process-group set-up) and the first, slower batches stay
out of the window.

The pure functions (:func:`read_clock`, :func:`steady_window`, :func:`stage_windows`, :func:`mean_interval`,
:func:`error_line`, :func:`set_keys`) are tested in ``tests/misc/test_benchmark_timing.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRESETS", "FitRun", "RunFailed", "Window", "check_meta", "command", "environment", "error_line",
           "git_commit", "interval", "mean_interval", "provenance", "read_clock", "run_fit", "set_keys", "stage_windows", "steady_window"]

HERE = Path(__file__).resolve().parent
#: the 2-process presets of each strategy, relative to the tree's root
PRESETS = {"ddp": "callbacks/ddp_cpu.yaml", "fsdp2": "callbacks/fsdp2_cpu.yaml"}


@dataclass(frozen=True)
class Window:
    """The timed part of one run."""

    steps: int
    """batches timed (after the warm-up), the same on every rank"""
    samples: int
    """examples those batches held, summed over ranks"""
    seconds: float
    """the timed batches' wall time on the slowest rank, each from the end of the batch before it to its own end"""
    skipped: int = 0
    """partial batches left out of the window (``full_batches``)"""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def step_s(self) -> float:
        """mean seconds per timed batch"""
        return self.seconds / self.steps


class RunFailed(RuntimeError):
    """A ``lit-align fit`` run that exited non-zero, timed out or logged too few batches; ``str()`` is one line."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both harnesses take after their own: ``--timeout``, ``--quick``, ``--out``."""
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before a run is stopped")
    parser.add_argument("--quick", action="store_true", help="1 repeat of a few batches: a smoke test, not numbers")
    parser.add_argument("--out", type=Path, help="also write the JSON here")


def selected_methods(parser: argparse.ArgumentParser, methods: str, known: Mapping) -> list[str]:
    """The comma-separated ``--methods``, each checked against ``known`` (a parser error otherwise)."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(known)}")
    return chosen


def read_clock(folder: Path) -> dict[int, list[dict]]:
    """``rank -> rows`` from the ``rank<r>.jsonl`` files :class:`step_clock.StepClock` wrote (rows in batch order)."""
    out = {}
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _timed_rows(rows: Sequence[dict], warmup: int, stage: str | None) -> tuple[int, int]:
    """``[first, stop)`` of the batches to time: from index ``warmup`` of the first contiguous run of ``stage``
    (all batches when ``stage`` is None) to that run's end."""
    begin = 0
    if stage is not None:
        begin = next((i for i, row in enumerate(rows) if row.get("stage") == stage), len(rows))
    stop = begin
    while stop < len(rows) and (stage is None or rows[stop].get("stage") == stage):
        stop += 1
    return begin + warmup, stop


def _timed_range(rows: Sequence[dict], warmup: int, stage: str | None, max_steps: int | None) -> tuple[int, int]:
    """:func:`_timed_rows`, at most ``max_steps`` of them."""
    first, stop = _timed_rows(rows, warmup, stage)
    return first, stop if max_steps is None else min(stop, first + max_steps)


def window_span(rows: Sequence[dict], warmup: int, stage: str | None = None,
                max_steps: int | None = None) -> tuple[float, float]:
    """``(start, end)`` clock times (``time.perf_counter``, one system-wide monotonic clock on Linux, so spans of
    separate processes compare) of the batches :func:`steady_window` times in one rank's ``rows``: from the end of
    the last warm-up batch to the end of the last timed one."""
    first, stop = _timed_range(rows, warmup, stage, max_steps)
    if warmup < 1 or stop <= first:
        raise ValueError(f"no timed batch in {len(rows)} rows after {warmup} of warm-up")
    return rows[first - 1]["end"], rows[stop - 1]["end"]


def overlap_share(spans: Sequence[tuple[float, float]]) -> float:
    """The share of the longest span that every span covers (1.0: they ran over the same wall time)."""
    common = min(end for _, end in spans) - max(start for start, _ in spans)
    return max(common, 0.0) / max(end - start for start, end in spans)


def steady_window(ranks: Mapping[int, Sequence[dict]], warmup: int, stage: str | None = None,
                  max_steps: int | None = None, full_batches: bool = False, lockstep: bool = False) -> Window:
    """The timed window over every rank's clock rows: the batches after the first ``warmup`` (of the first run of
    ``stage``, when given), at most ``max_steps`` of them. A batch's time on a rank is the wall time from the end
    of the batch before it to its own end; the window's seconds are the slowest rank's sum of them (the run's wall
    time: with every batch timed, the slowest rank's time from its last warm-up batch to its last timed batch),
    its samples summed over ranks. With ``full_batches``, steps where some rank's batch is shorter than the longest
    in the window (an epoch's last, partial batch) are left out and counted in :attr:`Window.skipped`.

    ``lockstep`` times the "ranks" as if each batch waited for the slowest: the sum over batches of the longest
    rank's time for it. For ranks of one run that overstates its wall time whenever the slower rank changes from
    batch to batch (one rank's late batch end is the other's early one); for separate runs started together
    (``multiplayer_scaling.py --independent``) it is what a synchronous run at their speeds would take with
    communication free.

    ``warmup`` must be at least 1 (the first timed batch starts at the end of a warm-up batch). Raises
    ``ValueError`` when no batch is left or the ranks timed different counts."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the window starts at the end of a warm-up batch), got {warmup}")
    if not ranks:
        raise ValueError("no clock rows: the run logged no training batch")
    spans = {}
    for rank, rows in sorted(ranks.items()):
        first, stop = _timed_range(rows, warmup, stage, max_steps)
        if stop <= first:
            where = f" of stage {stage!r}" if stage else ""
            raise ValueError(f"rank {rank} logged {len(rows)} batches: none{where} left after {warmup} of warm-up")
        if any(rows[i].get("samples") is None for i in range(first, stop)):
            raise ValueError(f"rank {rank}: a timed batch has no length (StepClock could not measure the batch)")
        spans[rank] = (first, stop)
    counts = {stop - first for first, stop in spans.values()}
    if len(counts) != 1:
        raise ValueError(f"the ranks timed different numbers of batches: {sorted(counts)}")
    n = counts.pop()
    # per timed step k: (samples of each rank, each rank's seconds since the end of its batch before)
    per_step = [([ranks[r][first + k]["samples"] for r, (first, _) in spans.items()],
                 [ranks[r][first + k]["end"] - ranks[r][first + k - 1]["end"] for r, (first, _) in spans.items()])
                for k in range(n)]
    if full_batches:
        longest = max(max(sizes) for sizes, _ in per_step)
        kept = [(sizes, secs) for sizes, secs in per_step if min(sizes) == longest]
    else:
        kept = per_step
    if lockstep:
        seconds = math.fsum(max(secs) for _, secs in kept)
    else:
        seconds = max((math.fsum(column) for column in zip(*(secs for _, secs in kept))), default=0.0)
    return Window(steps=len(kept), samples=sum(sum(sizes) for sizes, _ in kept), seconds=seconds,
                  skipped=n - len(kept))


def stage_windows(ranks: Mapping[int, Sequence[dict]], warmup: int, full_batches: bool = False) -> dict[str, Window]:
    """One window per stage of the module's ``phase_state`` (``"all"`` when it has none), in the order rank 0 ran
    them, each the stage's first contiguous run of batches less its own ``warmup`` (and, with ``full_batches``, less
    its partial batches, as :func:`steady_window`); stages with no batch left after the warm-up are left out."""
    first_rows = ranks[min(ranks)] if ranks else []
    stages = list(dict.fromkeys(row.get("stage") for row in first_rows))
    out = {}
    for stage in stages:
        try:
            out["all" if stage is None else stage] = steady_window(ranks, warmup, stage, full_batches=full_batches)
        except ValueError:
            continue
    return out


#: ``lit-align fit`` arguments of an in-process effect run: no logger, callbacks, checkpoints, bars or sanity check
QUIET = ["--trainer.logger", "false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.num_sanity_val_steps", "0"]


def fit_in_process(config: Path, root: Path, seed: int, args: Sequence[str], quiet: Sequence[str] = QUIET,
                   callbacks: Sequence = ()):
    """``lit-align fit`` of ``config`` in this process, quiet (``quiet`` arguments), with ``seed`` as the run's,
    the model's and the data's seed, ``args`` last and ``callbacks`` (Lightning callbacks, after the config's)
    added; the fitted module (the effect benchmarks' training runs; its DataModule is ``module.trainer.datamodule``)."""
    from lit_align.cli import cli_main

    seeds = ["--seed_everything", str(seed), "--model.init_args.model.seed", str(seed), "--data.init_args.seed",
             str(seed)]
    cli = cli_main(["--config", str(config), "--trainer.default_root_dir", str(root), *seeds, *quiet, *args],
                   run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli.model


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its Student-t interval (``scipy.stats.t``); the interval is
    ``nan`` with fewer than 2 values, and collapses to the mean when they are all equal."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy import stats

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def interval(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "low", "high"}``: :func:`mean_interval` as the effect benchmarks store it (one value: low and
    high are the mean)."""
    mean, low, high = mean_interval(values)
    return {"mean": mean, "low": mean, "high": mean} if len(values) < 2 else {"mean": mean, "low": low, "high": high}


def paired_bootstrap(units: Sequence[Sequence[float]], draws: int = 2000) -> dict[str, float]:
    """``{"low", "high"}``: a percentile 95% interval of the mean of ``units[s][i]`` (one value per seed ``s`` and
    evaluation item ``i``) when the items are resampled with replacement (the same draw for every seed, seeds pooled):
    the uncertainty from which items were evaluated, next to :func:`interval`'s over seeds."""
    import random
    import statistics

    n = len(units[0])
    rng = random.Random(0)
    means = []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        means.append(statistics.fmean(u[i] for u in units for i in pick))
    means.sort()
    return {"low": means[int(0.025 * draws)], "high": means[int(0.975 * draws) - 1]}


#: ``NameError: ...`` at the start of a line, or after a ``[rank1]: `` prefix (torch.distributed's)
_ERROR = re.compile(r"^(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(:|$)")


def error_line(output: str) -> str:
    """The line that says why a run failed: the last ``SomeError: ...`` line of its output (a traceback's last
    line), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR.match(line):
            return line
    return lines[-1] if lines else "(no output)"


def set_keys(node, values: Mapping[str, object]) -> list[str]:
    """Set every key named in ``values`` wherever it occurs in the nested dicts / lists ``node`` (in place: a key
    that moved into a config block is still found). Returns the dotted paths it set."""
    found = []

    def visit(item, path: str) -> None:
        if isinstance(item, dict):
            for key in list(item):
                if key in values:
                    item[key] = values[key]
                    found.append(f"{path}{key}")
                else:
                    visit(item[key], f"{path}{key}.")
        elif isinstance(item, list):
            for i, child in enumerate(item):
                visit(child, f"{path}{i}.")

    visit(node, "")
    return found


@dataclass
class FitRun:
    """One timed ``lit-align fit`` run."""

    tree: Path
    """the source tree whose ``lit_align`` and config run"""
    config: str
    """the method config, relative to ``tree``"""
    batches: int
    """training batches before the clock stops the run (warm-up included)"""
    world: int = 1
    """processes (1: no strategy; more: the strategy's 2-process preset with ``--trainer.devices``)"""
    strategy: str = "ddp"
    """``ddp`` or ``fsdp2`` (the presets in :data:`PRESETS`)"""
    stage: str | None = None
    """stop after this stage of the module's ``phase_state`` ends (the debate's ``generate``)"""
    model_keys: Mapping[str, object] | None = None
    """keys set anywhere under the config's ``model`` section (:func:`set_keys`) in a copy of the config"""
    timeout: float = 1200.0
    """seconds before the run is stopped and reported as failed"""


def _config_copy(run: FitRun, folder: Path) -> Path:
    """The tree's config, or a copy with :attr:`FitRun.model_keys` set; raises :class:`RunFailed` when a key is in
    none of the config's ``model`` blocks."""
    source = run.tree / run.config
    if not run.model_keys:
        return source
    import yaml

    cfg = yaml.safe_load(source.read_text())
    found = set_keys(cfg.get("model", {}), run.model_keys)
    missing = [k for k in run.model_keys if not any(p == k or p.endswith("." + k) for p in found)]
    if missing:
        raise RunFailed(f"{run.config}: no key {missing} under model: (the benchmark sets it; update the benchmark)")
    path = folder / Path(run.config).name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def command(run: FitRun, config: Path, out: Path, clock_dir: Path) -> list[str]:
    """The ``lit-align fit`` command line of ``run``, writing under ``out``."""
    exe = Path(sys.executable).with_name("lit-align")
    cmd = [str(exe), "fit", "--config", str(config)]
    if run.world > 1:
        cmd += ["--config", str(run.tree / PRESETS[run.strategy]), "--trainer.devices", str(run.world)]
    cmd += ["--threads", "1",
            "--trainer.max_epochs", "-1", "--trainer.max_steps", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
            "--trainer.callbacks", "step_clock.StepClock",
            "--trainer.callbacks.out_dir", str(clock_dir),
            "--trainer.callbacks.stop_after", str(run.batches)]
    if run.stage is not None:
        cmd += ["--trainer.callbacks.stage", run.stage]
    return cmd


def git_commit(tree: Path = HERE.parent) -> str:
    """The short commit of ``tree``'s HEAD, stored beside a benchmark's results (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """What a benchmark's results file records of its run: the command as typed, the commit, the UTC date."""
    import shlex
    import time

    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def environment(tree: Path, clock_path: Path) -> dict[str, str]:
    """The runs' environment: ``tree`` then the clock's folder first on ``PYTHONPATH``, one thread, W&B offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    extra = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), str(clock_path), extra) if p)
    return env


def run_fit(run: FitRun) -> dict[int, list[dict]]:
    """Run ``run`` in a fresh process and return its clock rows (``rank -> rows``); :class:`RunFailed` with the
    error line when it fails or times out."""
    with tempfile.TemporaryDirectory(prefix="lit_align_bench_") as tmp_name:
        tmp = Path(tmp_name)
        clock_path = tmp / "clock_module"
        clock_path.mkdir()
        # a private copy: this tree's benchmarks/ folder holds scripts whose names could shadow other modules
        shutil.copy(HERE / "step_clock.py", clock_path / "step_clock.py")
        config = _config_copy(run, tmp)
        clock_dir = tmp / "clock"
        cmd = command(run, config, tmp / "run", clock_dir)
        # its own process group: on a timeout the ranks Lightning started (children of rank 0) are stopped too
        proc = subprocess.Popen(cmd, cwd=run.tree, env=environment(run.tree, clock_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=run.timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RunFailed(f"timed out after {run.timeout:.0f} s (a rank hung?)") from exc
        if proc.returncode != 0:
            raise RunFailed(f"exit {proc.returncode}: {error_line(output)}")
        check_meta(clock_dir, run.tree, run.world)
        return read_clock(clock_dir)


def check_meta(clock_dir: Path, tree: Path, world: int) -> None:
    """Raise :class:`RunFailed` unless every rank ran the module of ``tree`` (not an installed copy) on ``world``
    processes."""
    metas = [json.loads(p.read_text()) for p in sorted(Path(clock_dir).glob("meta_rank*.json"))]
    if len(metas) != world:
        raise RunFailed(f"{len(metas)} rank(s) started training, expected {world}")
    for meta in metas:
        if not Path(meta["module_file"]).resolve().is_relative_to(Path(tree).resolve()):
            raise RunFailed(f"the run imported {meta['module_file']}, not the code of {tree} (PYTHONPATH?)")
        if meta["world_size"] != world:
            raise RunFailed(f"the run had world size {meta['world_size']}, expected {world}")
