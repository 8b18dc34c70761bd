"""A Dask ``distributed`` cluster from ``config["cluster"]``: the same stage code on a laptop, a GPU
workstation and a SLURM cluster.

``kind``
    ``local`` (default): worker processes on this machine. With GPUs, one worker per GPU, each seeing only its
    own device (``CUDA_VISIBLE_DEVICES``) and advertising the Dask resource ``GPU=1``; without, ``n_workers``
    (default 2) workers sharing the cores this process may use.
    ``slurm``: a ``dask_jobqueue.SLURMCluster``; every SLURM job runs one worker that holds ``gpus_per_job``
    (0 or 1) GPUs and advertises ``GPU=1`` when it has one. ``n_workers`` jobs are submitted.
    ``address``: connect to a running scheduler at ``address``; it is left running on exit.

Dask does not know what a GPU is: tasks that need one ask for ``resources=gpu_resources(client)``, so that one
task holds one GPU, and CPU-only clusters run the same tasks without the request (which would otherwise wait
forever for a worker that does not exist).

>>> with dask_client({"kind": "local", "n_workers": 1, "threads_per_worker": 1,
...                   "dashboard_address": ":0"}) as client:  # doctest: +SKIP
...     client.submit(sum, [1, 2], resources=gpu_resources(client)).result()
3
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ConfigError

# Defaults for keys a caller's cluster section may leave out (configs/default.yaml documents them).
_LOCAL_DEFAULT_WORKERS = 2
_DEFAULT_DASHBOARD = ":8787"


def usable_cores() -> int:
    """Cores this process may run on (respects cgroup/SLURM CPU sets, unlike ``os.cpu_count``)."""
    return len(os.sched_getaffinity(0))


def visible_gpus() -> list[str]:
    """CUDA device ids this process may hand out, honouring an existing ``CUDA_VISIBLE_DEVICES``."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in inherited.split(",") if d.strip()] if inherited else []
    return ids[:count] if ids else [str(i) for i in range(count)]


def local_worker_specs(cluster_cfg: dict, gpus: list[str], cores: int) -> dict[int, dict]:
    """Nanny options per worker: threads, memory, and for GPU workers their device and ``GPU=1``.

    With GPUs the default is one worker per GPU; workers beyond the number of GPUs get none and serve CPU
    tasks only.
    """
    from distributed import Nanny

    n_workers = cluster_cfg.get("n_workers") or (len(gpus) or _LOCAL_DEFAULT_WORKERS)
    threads = cluster_cfg.get("threads_per_worker") or max(1, cores // n_workers)
    specs = {}
    for i in range(n_workers):
        options = {"nthreads": threads, "memory_limit": cluster_cfg.get("memory_limit", "auto"),
                   "host": "127.0.0.1", "silence_logs": logging.WARNING, "dashboard": False}
        if i < len(gpus):
            options["env"] = {"CUDA_VISIBLE_DEVICES": gpus[i]}
            options["resources"] = {"GPU": 1}
        specs[i] = {"cls": Nanny, "options": options}
    return specs


def local_cluster(cluster_cfg: dict, *, gpus: list[str] | None = None):
    """A ``SpecCluster`` of local worker processes (a ``LocalCluster`` cannot give each worker its own GPU).
    ``gpus`` are the CUDA device ids to hand out, one per worker (default: every visible GPU)."""
    from distributed import Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard": True,
        "dashboard_address": cluster_cfg.get("dashboard_address") or _DEFAULT_DASHBOARD}}
    workers = local_worker_specs(cluster_cfg, visible_gpus() if gpus is None else gpus, usable_cores())
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING, name="wsi-local")


def slurm_cluster(cluster_cfg: dict):
    """A ``dask_jobqueue.SLURMCluster`` from ``cluster_cfg["slurm"]``; no job is submitted yet."""
    from dask_jobqueue import SLURMCluster

    s = cluster_cfg.get("slurm") or {}
    gpus = int(s.get("gpus_per_job", 0))
    processes = int(s.get("processes", 1))
    if gpus > 1:
        raise ConfigError(None, f"cluster.slurm.gpus_per_job is {gpus}; one GPU per job is supported",
                          "set gpus_per_job: 1 and raise cluster.n_workers (jobs) instead")
    if gpus == 1 and processes != 1:
        raise ConfigError(None, f"cluster.slurm.processes is {processes} with a GPU per job; the worker "
                                "processes would share one GPU", "set cluster.slurm.processes: 1")
    directives = list(s.get("job_extra_directives") or [])
    worker_args = []
    if gpus:
        # SLURM sets CUDA_VISIBLE_DEVICES per job, so the worker sees exactly its own GPU.
        directives.append(f"--gres=gpu:{gpus}")
        worker_args = ["--resources", "GPU=1"]
    return SLURMCluster(
        queue=s.get("queue"), account=s.get("account"), cores=int(s.get("cores", 8)),
        memory=s.get("memory", "32GB"), processes=processes, walltime=s.get("walltime"),
        local_directory=s.get("local_directory"), interface=s.get("interface"),
        job_extra_directives=directives, job_script_prologue=list(s.get("job_script_prologue") or []),
        worker_extra_args=worker_args, job_name="wsi-worker",
        scheduler_options={"dashboard_address": cluster_cfg.get("dashboard_address") or _DEFAULT_DASHBOARD})


def slurm_job_script(cluster_cfg: dict) -> str:
    """The batch script each SLURM job of ``kind: slurm`` would run (for inspection; submits nothing)."""
    cluster = slurm_cluster(cluster_cfg)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def _connect(cluster_cfg: dict):
    from distributed import Client

    address = cluster_cfg.get("address")
    if not address:
        raise ConfigError(None, "cluster.kind is address but cluster.address is empty",
                          "e.g. --cluster tcp://10.0.0.5:8786")
    try:
        return Client(address, timeout=cluster_cfg.get("connect_timeout_s", 30))
    except OSError as e:
        raise ConfigError(None, f"cannot reach the Dask scheduler at {address}: {e}",
                          "start it first (`dask scheduler`) or use --cluster local") from e


def _start_cluster(cluster_cfg: dict):
    """The cluster this process owns for ``kind`` local or slurm; ``None`` for ``address``."""
    kind = cluster_cfg.get("kind", "local")
    if kind == "address":
        return None
    if kind == "local":
        return local_cluster(cluster_cfg)
    if kind == "slurm":
        cluster = slurm_cluster(cluster_cfg)
        cluster.scale(jobs=cluster_cfg.get("n_workers") or 1)
        return cluster
    raise ConfigError(None, f"cluster.kind must be local, slurm or address, got {kind!r}")


@contextmanager
def dask_client(cluster_cfg: dict) -> Iterator:
    """A ``distributed.Client`` for ``config["cluster"]``; prints the dashboard link; closes what it started
    (a scheduler given by ``address`` is left running)."""
    from distributed import Client

    cluster = _start_cluster(cluster_cfg)
    try:
        client = Client(cluster) if cluster is not None else _connect(cluster_cfg)
        try:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def gpu_resources(client, *, wait_timeout: float | None = None) -> dict | None:
    """``{"GPU": 1}`` when the cluster's workers advertise GPUs, else ``None`` (CPU tasks ask for nothing).

    Waits for a first worker (SLURM jobs may still be queued), at most ``wait_timeout`` seconds.
    """
    client.wait_for_workers(1, timeout=wait_timeout)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers) else None
