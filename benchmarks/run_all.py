"""Run every benchmark, save ``benchmarks/results.json`` and print a Markdown table for the README.

Runs, one after the other, each in its own subprocess (so no benchmark's imports, caches or
allocator state leak into the next):

* ``benchmarks/generate.py``: lit_align's KV-cache sampler vs HF ``generate`` (tokens/s);
* ``benchmarks/logps_memory.py``: chunked log-probs vs full logits (peak memory, time);
* ``benchmarks/dpo_step.py``: a DPO optimiser step, lit_align vs TRL vs a hand-written loop;
* ``benchmarks/wagle.py``, ``kgw.py``, ``watermark_step.py``, ``game_step.py``, ``debate_step.py``:
  method-specific costs;
* ``benchmarks/debate_gain.py``: the tiny ACC-Debate team's held-out accuracy before and after training;
* ``benchmarks/cpu_threads.py``: ``lit-align fit`` of the tiny configs with lit_align's CPU thread policy vs
  torch's default, alone and beside a busy process.

Each prints one JSON line (the last line starting with ``{`` that has a ``"bench"`` key is
taken). ``results.json`` holds those lines, the date, the versions of the libraries involved and
the machine (``nproc``, CPU model, torch threads), plus the table. The table compares each
lit_align number with its peer against the targets below, which come from
``shared/PEERS.md`` (numbers measured on this project's 2-core machines).

A benchmark that fails is recorded with its error and shown as ``failed``; the others still run.
The exit status is 1 when a benchmark failed (a missed target is reported, not an error).

Usage: ``python benchmarks/run_all.py [--quick] [--only dpo_step,generate] [--out benchmarks/results.json]``
(``make bench`` runs it with the defaults). ``--quick`` shortens every benchmark for a smoke
test; its numbers are noisier and should not go into the README. ``--render`` runs nothing: it
rebuilds the table from the results already in ``--out`` (after a change to :func:`rows` or
:func:`markdown`), rewrites that file's ``table`` and ``markdown`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (script, default args, --quick args)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "generate": ("generate.py", [], ["--repeats", "3", "--warmup", "1"]),
    "logps_memory": ("logps_memory.py", [], ["--repeats", "1"]),
    "dpo_step": ("dpo_step.py", [], ["--steps", "8", "--warmup", "2"]),
    "wagle": ("wagle.py", [], ["--examples", "16", "--steps", "6", "--warmup", "2", "--rounds", "1"]),
    "kgw": ("kgw.py", [], ["--repeats", "3", "--warmup", "1"]),
    "watermark_step": ("watermark_step.py", [], ["--steps", "8", "--warmup", "2"]),
    "game_step": ("game_step.py", [], ["--steps", "6", "--warmup", "1", "--skip-memory"]),
    "debate_step": ("debate_step.py", [], ["--generate", "1", "--dpo", "2"]),
    "debate_gain": ("debate_gain.py", [], ["--questions", "16", "--val-questions", "8", "--repeats", "2"]),
    "cpu_threads": ("cpu_threads.py", [], ["--configs", "configs/dpo/tiny.yaml"]),
}
PACKAGES = ("torch", "transformers", "trl", "lightning", "peft", "datasets", "lit_align")


# -- running ---------------------------------------------------------------------------------------
def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "bench" in obj:
                return obj
    return None


def run_benchmark(name: str, quick: bool) -> dict:
    script, args, quick_args = BENCHMARKS[name]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, str(HERE / script), *(quick_args if quick else args)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    result = _last_json(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"bench": name, "error": f"exit {proc.returncode}: {tail}", "command": " ".join(cmd[1:]),
                "seconds": seconds}
    result["command"] = " ".join(["python", *(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c
                                              for c in cmd[1:])])
    result["seconds"] = seconds
    return result


# -- environment -----------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "machine": {"nproc": nproc, "cpu": _cpu_model(), "torch_threads": "torch threads 1",
                    "platform": platform.platform(), "load_average_at_start": list(os.getloadavg())},
    }


# -- table -----------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}") + unit


def rows(results: dict[str, dict]) -> list[dict]:
    """One row per compared number: what lit_align got, what the peer got, the ratio and the target.

    Ratios are always lit_align / peer. ``better`` says which direction wins (``lower`` for time
    and memory, ``higher`` for throughput); ``target`` is the bound from PEERS.md.
    """
    out: list[dict] = []

    def add(bench, what, ours, peer_name, peer, ratio, op, bound, unit):
        met = None if ratio is None else (ratio <= bound if op == "<=" else ratio >= bound)
        out.append({"benchmark": bench, "what": what, "lit_align": ours, "peer_name": peer_name, "peer": peer,
                    "ratio": ratio, "target": f"{'≤' if op == '<=' else '≥'} {bound}×", "met": met, "unit": unit})

    g = results.get("generate", {})
    if "error" not in g and g:
        add("generate", "greedy decoding, tokens/s (batch 8, prompt 32, +64)", g.get("lit_align_tok_s"),
            "HF generate", g.get("hf_generate_tok_s"), g.get("ratio"), ">=", 1.0, " tok/s")
    m = results.get("logps_memory", {})
    if "error" not in m and m:
        add("logps_memory", "peak memory of scoring, MiB (vocab 151,936)", m.get("lit_align_peak_mb"),
            "full logits", m.get("naive_peak_mb"), m.get("ratio"), "<=", 0.55, " MiB")
        t = None if not m.get("naive_ms") else round(m["lit_align_ms"] / m["naive_ms"], 3)
        add("logps_memory", "time of scoring fwd+bwd, ms", m.get("lit_align_ms"), "full logits", m.get("naive_ms"),
            t, "<=", 1.0, " ms")
    d = results.get("dpo_step", {})
    if "error" not in d and d:
        # precomputed: the reference forward runs once before training, outside the timed steps;
        # copy: a frozen reference runs inside every step, the same work as TRL and the hand loop
        pre = "DPO optimiser step, ms (precomputed reference: its forward runs before training)"
        copy = "DPO optimiser step, ms (frozen copy reference: its forward runs in every step, as in the peers)"
        add("dpo_step", pre, d.get("lit_align_ms"),
            "TRL DPOTrainer", d.get("trl_ms"), d.get("ratio_vs_trl"), "<=", 0.5, " ms")
        add("dpo_step", copy, d.get("lit_align_copy_ms"),
            "TRL DPOTrainer", d.get("trl_ms"), d.get("copy_ratio_vs_trl"), "<=", 0.5, " ms")
        add("dpo_step", pre, d.get("lit_align_ms"),
            "hand-written loop", d.get("hand_ms"), d.get("ratio_vs_hand"), "<=", 1.3, " ms")
        add("dpo_step", copy, d.get("lit_align_copy_ms"),
            "hand-written loop", d.get("hand_ms"), d.get("copy_ratio_vs_hand"), "<=", 1.3, " ms")
        add("dpo_step", "peak RSS of the training process, MiB", d.get("lit_align_peak_rss_mb"),
            "TRL DPOTrainer", d.get("trl_peak_rss_mb"), d.get("rss_ratio_vs_trl"), "<=", 1.0, " MiB")
    w = results.get("wagle", {})
    if "error" not in w and w:
        add("wagle", "WAGLE attribution (forget + retain gradients, scores, global top-k), ms", w.get("attribution_ms"),
            "one fwd+bwd over forget+retain", w.get("fwd_bwd_ms"), w.get("attribution_ratio"), "<=", 1.1, " ms")
        add("wagle", "masking the gradients in an unlearning step, ms", w.get("mask_apply_ms"),
            "the whole step without mask", w.get("dense_step_ms"), w.get("mask_step_overhead"), "<=", 0.1, " ms")
        step = None if not w.get("dense_step_ms") else round(w["masked_step_ms"] / w["dense_step_ms"], 3)
        add("wagle", "unlearning step with the mask, end to end (±10% noise), ms", w.get("masked_step_ms"),
            "same step without mask", w.get("dense_step_ms"), step, "<=", 1.1, " ms")
    k = results.get("kgw", {})
    if "error" not in k and k:
        det = k.get("detect_tok_s")
        add("kgw", "KGW z-score detection, tokens/s (64 x 512, one thread)", det,
            "target 1e6 tok/s", 1e6, None if det is None else round(det / 1e6, 1), ">=", 1.0, " tok/s")
        add("kgw", "greedy decoding with the KGW bias, tokens/s (batch 8, prompt 32, +64; ratio: time with / without)", k.get("kgw_tok_s"),
            "same sampler without bias", k.get("plain_tok_s"), k.get("gen_overhead"), "<=", 1.1, " tok/s")
    ws = results.get("watermark_step", {})
    if "error" not in ws and ws:
        add("watermark_step", f"watermark co-training step, ms (tiny setup; generation {ws.get('generate_share')}, "
            f"PPO update {ws.get('update_share')} of the phases)", ws.get("step_ms"),
            "report only", None, None, "<=", 1.0, " ms")
        add("watermark_step", "KV-cache sampler during co-training, tokens/s (tiny setup, batch 16, +8)",
            ws.get("sampler_tok_s"), "report only", None, None, ">=", 1.0, " tok/s")
    ct = results.get("cpu_threads", {})
    for config, r in ct.get("runs", {}).items() if "error" not in ct else ():
        name = config.removeprefix("configs/").removesuffix(".yaml") + (f" {r['overrides']}" if r.get("overrides") else "")
        add("cpu_threads", f"`lit-align fit` {name} beside a busy process, s (--threads auto vs torch's default)",
            r.get("busy_auto_s"), "torch default threads", r.get("busy_torch_default_s"),
            None if not r.get("busy_ratio") else round(1 / r["busy_ratio"], 2), "<=", 0.5, " s")
        add("cpu_threads", f"`lit-align fit` {name} alone, s (same)", r.get("alone_auto_s"), "torch default threads",
            r.get("alone_torch_default_s"), None if not r.get("alone_ratio") else round(1 / r["alone_ratio"], 2),
            "<=", 1.15, " s")
    gs = results.get("game_step", {})
    if "error" not in gs and gs:
        add("game_step", f"adversary/defender game step, ms (tiny setup; generation {gs.get('generate_share')}, "
            f"PPO {gs.get('update_share')} of the phases; defender steps {gs.get('defender_step_ms')}, "
            f"attacker steps {gs.get('attacker_step_ms')})", gs.get("step_ms"), "report only", None, None, "<=", 1.0, " ms")
        if gs.get("shared_model_mb") is not None:
            add("game_step", "game weights in memory, MiB (both LoRA players on one ~180M base; references = adapters off)",
                gs.get("shared_model_mb"), "a base per player", gs.get("separate_model_mb"),
                round(gs["shared_model_mb"] / gs["separate_model_mb"], 3), "<=", 0.55, " MiB")
            add("game_step", "game training, peak RSS, MiB (same)", gs.get("shared_peak_mb"),
                "a base and a reference copy per player", gs.get("copy_peak_mb"), gs.get("peak_ratio_shared_vs_copy"),
                "<=", 0.6, " MiB")
    ds = results.get("debate_step", {})
    if "error" not in ds and ds:
        add("debate_step", f"ACC-Debate generate step, ms (tiny setup: 16 questions x {ds.get('trials')} trials x "
            f"{ds.get('rounds')} rounds, K = {ds.get('k')}; reward estimation {ds.get('rewards_share')} of it)",
            ds.get("generate_step_ms"), "report only", None, None, "<=", 1.0, " ms")
        add("debate_step", "one-step rollouts for rewards, per second (batched: one sampler call per role per round)",
            ds.get("rollouts_per_s"), "report only", None, None, ">=", 1.0, " rollouts/s")
    dg = results.get("debate_gain", {})
    if "error" not in dg and dg:
        teams = dg["teams"]
        trained, untrained = teams["trained"], teams["untrained"]
        # met: the gain clears both 95% intervals (a ratio >= 1 alone would count noise as a gain)
        out.append({"benchmark": "debate_gain", "what": (
            f"ACC-Debate held-out accuracy after the last round, trained team (tiny setup, {dg.get('val_questions')} "
            f"questions x {dg.get('repeats')} debates, 95% CI ±{trained['final_ci95']} / ±{untrained['final_ci95']}; "
            f"trained actor only {teams['trained_actor']['final']}, trained critic only {teams['trained_critic']['final']})"),
            "lit_align": trained["final"], "peer_name": "untrained team", "peer": untrained["final"],
            "ratio": round(trained["final"] / max(untrained["final"], 1e-9), 3), "target": "gain > both CIs",
            "met": trained["final"] - untrained["final"] > trained["final_ci95"] + untrained["final_ci95"], "unit": ""})
    for name, r in results.items():
        if "error" in r:
            out.append({"benchmark": name, "what": "failed (see results.json)", "lit_align": None, "peer_name": "",
                        "peer": None, "ratio": None, "target": "", "met": None, "unit": ""})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| benchmark | lit_align | peer | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for r in table:
        if r["what"].startswith("failed"):
            lines.append(f"| {r['benchmark']} | failed | | | | |")
            continue
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        lines.append(
            f"| {r['benchmark']}: {r['what']} | {_fmt(r['lit_align'], r['unit'])} | {r['peer_name']} "
            f"{_fmt(r['peer'], r['unit'])} | {ratio} | {r['target']} | {met} |"
        )
    return "\n".join(lines)


def _print_summary(doc: dict, out: str) -> None:
    """The table, then one line with the date, versions and machine it was measured on."""
    v, mach = doc["versions"], doc["machine"]
    print()
    print(doc["markdown"])
    print()
    print(f"{doc['date']}; torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
          f"lightning {v['lightning']}; nproc {mach['nproc']} ({mach['cpu']}), {mach['torch_threads']}"
          f"{'; --quick' if doc.get('quick') else ''}. Saved to {out}.")


def render(path: str) -> None:
    """Rebuild the table of an existing results file in place, without running any benchmark."""
    doc = json.loads(Path(path).read_text())
    doc["table"] = rows(doc["results"])
    doc["markdown"] = markdown(doc["table"])
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    _print_summary(doc, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="short runs for a smoke test (noisy numbers)")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="where to write the results")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: re-render the table from the results in --out and rewrite its table")
    args = parser.parse_args()
    if args.render:
        render(args.out)
        return

    names = [n for n in BENCHMARKS if n in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    env = environment()
    results: dict[str, dict] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_benchmark(name, args.quick)
        print(json.dumps(results[name]), flush=True)

    table = rows(results)
    md = markdown(table)
    doc = {**env, "quick": args.quick, "results": results, "table": table, "markdown": md}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    _print_summary(doc, args.out)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
