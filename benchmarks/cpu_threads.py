"""Wall time of the tiny configs as a user runs them, with lit_align's thread policy vs torch's default.

For each config, ``lit-align fit -c <config>`` runs four times, each in a fresh process:

* ``--threads auto`` (lit_align's default: one thread per process for small models) and ``--threads 0``
  (torch's default: one thread per core);
* alone on the machine, and beside a busy process (a torch matrix-multiply loop with torch's default threads,
  standing in for a test suite, a CI neighbour or the second rank of a CPU run).

``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are removed from the runs' environment (``auto`` defers to them).
W&B runs offline as it does for a user without credentials. A run still going after ``--timeout`` seconds is
stopped and reported as at least that long.

Usage: ``python benchmarks/cpu_threads.py [--configs configs/dpo/tiny.yaml,...] [--timeout 600]``. Prints one
JSON line (``bench: cpu_threads``) with the times in seconds and the ratios default / auto.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = "import torch\na = torch.randn(768, 768)\nwhile True:\n    a = torch.tanh(a @ a)\n"
#: the tiny configs measured by default, with overrides that keep the longest within minutes beside a busy process
CONFIGS = {"configs/dpo/tiny.yaml": [], "configs/watermark/tiny.yaml": ["--trainer.max_epochs", "4"]}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_once(config: str, overrides: list[str], threads: str, timeout: float) -> float:
    """Seconds of one ``lit-align fit`` (``timeout`` when it had to be stopped)."""
    exe = Path(sys.executable).with_name("lit-align")
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(exe), "fit", "-c", config, "--threads", threads, "--trainer.default_root_dir", out, *overrides]
        start = time.perf_counter()
        try:
            subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=timeout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.TimeoutExpired:
            return timeout
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is stopped")
    args = parser.parse_args()
    result: dict = {"bench": "cpu_threads", "nproc": os.cpu_count(), "runs": {}}
    for config in args.configs.split(","):
        overrides = CONFIGS.get(config, [])
        times = {}
        for busy in (False, True):
            neighbour = subprocess.Popen([sys.executable, "-c", BUSY], env=_env()) if busy else None
            try:
                if neighbour is not None:
                    time.sleep(2.0)  # let it spin up
                for threads in ("auto", "0"):
                    key = f"{'busy' if busy else 'alone'}_{'auto' if threads == 'auto' else 'torch_default'}_s"
                    times[key] = round(run_once(config, overrides, threads, args.timeout), 1)
                    print(f"{config} {key}: {times[key]}", file=sys.stderr, flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
        times["alone_ratio"] = round(times["alone_torch_default_s"] / times["alone_auto_s"], 2)
        times["busy_ratio"] = round(times["busy_torch_default_s"] / times["busy_auto_s"], 2)
        times["overrides"] = " ".join(overrides)
        result["runs"][config] = times
    print(json.dumps(result))


if __name__ == "__main__":
    main()
