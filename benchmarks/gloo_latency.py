"""Benchmark: how long one gloo all-reduce between 2 local CPU processes takes on this machine (issue 15's context).

Every multi-player step under DDP on CPU runs a handful of collectives (gradient averages per optimiser step, global
counts, whitening moments, logged means: ``lit_align.engine.distributed``). Their cost is set by the transport's
latency far more than by their size, which this script measures: ``--world`` processes (spawned, one torch thread
each, gloo over the loopback interface) all-reduce float32 tensors of each size ``--iters`` times after a warm-up,
synchronised by a barrier, and rank 0 reports the median and the 10th/90th percentiles of one call in microseconds.
With ``--busy`` each iteration first runs about ``--busy`` ms of matrix products on every rank (so the collective
meets a peer that was computing, as in a training step), and the time reported is the whole iteration's minus the
compute alone, timed the same way without the collective.

Prints one JSON line ``{"bench": "gloo_latency", "world", "sizes": {n: {"median_us", "p10_us", "p90_us"}},
"busy_overhead_us"}``.

Usage: ``python benchmarks/gloo_latency.py [--world 2] [--iters 200] [--busy 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

SIZES = (1, 16, 256, 4096, 65536, 1_048_576)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=10)
    return {"median_us": round(statistics.median(seconds) * 1e6, 1), "p10_us": round(cuts[0] * 1e6, 1),
            "p90_us": round(cuts[-1] * 1e6, 1)}


def _worker(rank: int, world: int, port: int, iters: int, busy_ms: float, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {"sizes": {}}
    for n in SIZES:
        x = torch.ones(n)
        for _ in range(10):
            dist.all_reduce(x)
        times = []
        for _ in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        out["sizes"][n] = _percentiles(times)
    if busy_ms > 0:
        a = torch.randn(128, 128)
        start = time.perf_counter()
        reps = 0
        while time.perf_counter() - start < busy_ms / 1e3:  # calibrate: products per busy_ms
            a = (a @ a).tanh()
            reps += 1
        x = torch.ones(256)
        timed = {}
        for with_collective in (True, False, True, False):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters // 4 or 1):
                for _ in range(reps):
                    a = (a @ a).tanh()
                if with_collective:
                    dist.all_reduce(x)
            timed.setdefault(with_collective, []).append((time.perf_counter() - start) / (iters // 4 or 1))
        out["busy_overhead_us"] = round((sum(timed[True]) - sum(timed[False])) / 2 * 1e6, 1)
        out["busy_compute_ms"] = round(sum(timed[False]) / 2 * 1e3, 2)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--busy", type=float, default=10.0, help="ms of compute before each collective (0: skip)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args.iters, args.busy, queue))
             for r in range(args.world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    print(json.dumps({"bench": "gloo_latency", "world": args.world, "iters": args.iters, **result}))


if __name__ == "__main__":
    main()
