"""What a local Dask cluster's start costs: workers forked from a server that imported the stage's modules
(``wsi.cluster.local_cluster``) against workers spawned to import them each (Dask's default).

    python bench/worker_start.py [--workers 2] [--rounds 5] [--stage wsi.features.extract]

Each measurement is a fresh Python process (a process's forkserver starts with its first cluster), alternating
the two ways round by round. A measurement starts the cluster, runs ``import <stage>`` on every worker (what the
stage's first task does), and sums the CPU seconds of every process the cluster started (workers, the forkserver,
multiprocessing's resource tracker) before closing it; the process's own imports, the same either way, are not
counted. Prints each round and the ratio of medians, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(way: str, workers: int, stage: str) -> dict:
    """One cluster start in this process: CPU seconds of the processes it started, and seconds until every
    worker has imported ``stage``."""
    import importlib

    import psutil
    from distributed import Client

    import wsi.cluster

    if way == "spawn":  # Dask's default: each worker process imports everything itself
        wsi.cluster._fork_workers_from = lambda preload: None
    cfg = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": ":0"}
    start = time.perf_counter()
    with wsi.cluster.local_cluster(cfg, gpus=[], preload=[stage]) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(importlib.import_module, stage)
        ready = time.perf_counter() - start
        cpu = 0.0
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return {"way": way, "cpu_s": cpu, "ready_s": ready}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stage", default="wsi.features.extract", help="the module the workers import")
    parser.add_argument("--way", choices=("spawn", "forkserver"), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.workers, args.stage)))
        return 0
    runs: dict[str, list[dict]] = {"spawn": [], "forkserver": []}
    for r in range(args.rounds):
        for way in ("spawn", "forkserver") if r % 2 == 0 else ("forkserver", "spawn"):
            done = subprocess.run([sys.executable, __file__, "--way", way, "--workers", str(args.workers),
                                   "--stage", args.stage], capture_output=True, text=True, check=True)
            one = json.loads(done.stdout.strip().splitlines()[-1])
            runs[way].append(one)
            print(f"round {r + 1}: {way:10s} {one['cpu_s']:6.2f} CPU-s in the cluster's processes, "
                  f"workers ready in {one['ready_s']:5.2f} s", flush=True)
    med = {way: {k: statistics.median(x[k] for x in v) for k in ("cpu_s", "ready_s")} for way, v in runs.items()}
    print(f"\n{args.workers} workers importing {args.stage}, medians of {args.rounds}:")
    for way, m in med.items():
        print(f"  {way:10s} {m['cpu_s']:6.2f} CPU-s, ready in {m['ready_s']:5.2f} s")
    print(f"  forkserver / spawn: CPU {med['forkserver']['cpu_s'] / med['spawn']['cpu_s']:.2f}, "
          f"ready {med['forkserver']['ready_s'] / med['spawn']['ready_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
