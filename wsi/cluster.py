"""A Dask ``distributed`` cluster from ``config["cluster"]``: the same stage code on a laptop, a GPU
workstation and a SLURM cluster.

``kind``
    ``local`` (default): worker processes on this machine. With GPUs, one worker per GPU, each seeing only its
    own device (``CUDA_VISIBLE_DEVICES``) and advertising the Dask resource ``GPU=1``; without, ``n_workers``
    (default 2) workers sharing the cores this process may use. Workers beyond the GPUs see none
    (``CUDA_VISIBLE_DEVICES=""``), so no model lands on a GPU another worker owns.
    ``slurm``: a ``dask_jobqueue.SLURMCluster``; every SLURM job runs one worker that holds ``gpus_per_job``
    (0 or 1) GPUs and advertises ``GPU=1`` when it has one. ``n_workers`` jobs are submitted, and
    :func:`dask_client` waits for the first worker at most ``slurm.start_timeout_s`` seconds: a job sbatch
    refuses, worker jobs that all end before a worker joins, or the timeout end it with one
    :class:`~wsi.errors.ConfigError` that quotes sbatch's error, the jobs' states and pending reasons, or the
    last line of a worker's log. The worker jobs' output goes to ``slurm.log_directory`` (the CLI sets
    ``OUT/logs/<stage>/workers``), never to ``slurm-<id>.out`` files in the working directory. Closing the
    client (a finished stage, an error, or SIGINT/SIGTERM through :mod:`wsi.stop`) cancels the worker jobs.
    ``address``: connect to a running scheduler at ``address``; it is left running on exit.

Local workers are forked from one server process (multiprocessing's ``forkserver``) that has imported the
stage's worker modules (``preload``: torch, timm and wsi's own) once, instead of each worker importing them anew
(Dask's default, ``spawn``): about 5 CPU-seconds and their memory pages saved per worker after the first, which
on a GPU node of eight workers is most of the cluster's start-up. The server imports no CUDA state (torch
initialises CUDA lazily), so each worker's ``CUDA_VISIBLE_DEVICES``, set by its nanny after the fork, still
decides the one GPU it sees.

Dask does not know what a GPU is: tasks that need one ask for ``resources=gpu_resources(client)``, so that one
task holds one GPU (or a share of it), and CPU-only clusters run the same tasks without the request (which would
otherwise wait forever for a worker that does not exist).

Device and precision
--------------------
:func:`worker_device` is where a task runs: on a Dask worker it follows the worker's ``GPU`` resource (a worker
that advertises a GPU CUDA cannot use is an error, never a silent CPU run); elsewhere CUDA when present.
:func:`choose_precision` is the one rule for ``precision: auto`` (extraction and MIL): bf16 on GPUs of compute
capability 8 or more (Ampere and later), fp16 below (V100, T4: ``torch.cuda.is_bf16_supported()`` says yes there,
but only by emulation, far slower than fp16), fp32 on CPU.

>>> with dask_client({"kind": "local", "n_workers": 1, "threads_per_worker": 1,
...                   "dashboard_address": ":0"}) as client:  # doctest: +SKIP
...     client.submit(sum, [1, 2], resources=gpu_resources(client)).result()
3
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .errors import ConfigError

# Defaults for keys a caller's cluster section may leave out (configs/default.yaml documents them).
_LOCAL_DEFAULT_WORKERS = 2
_DEFAULT_DASHBOARD = ":8787"
_DEFAULT_START_TIMEOUT_S = 1800
_CLOSE_TIMEOUT_S = 60
WORKER_JOB_NAME = "wsi-worker"
# SLURM job states in which a worker may still join; any other state means the job ended
_LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


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

    With GPUs the default is one worker per GPU; workers beyond the number of GPUs see none
    (``CUDA_VISIBLE_DEVICES=""``) and serve CPU tasks only.
    """
    from distributed import Nanny

    n_workers = cluster_cfg.get("n_workers") or (len(gpus) or _LOCAL_DEFAULT_WORKERS)
    threads = cluster_cfg.get("threads_per_worker") or max(1, cores // n_workers)
    specs = {}
    for i in range(n_workers):
        options = {"nthreads": threads, "memory_limit": cluster_cfg.get("memory_limit", "auto"),
                   "host": "127.0.0.1", "silence_logs": logging.WARNING, "dashboard": False}
        options["env"] = {"CUDA_VISIBLE_DEVICES": gpus[i] if i < len(gpus) else ""}
        if i < len(gpus):
            options["resources"] = {"GPU": 1}
        specs[i] = {"cls": Nanny, "options": options}
    return specs


def _fork_workers_from(preload: Sequence[str]) -> None:
    """Start this process's local Dask workers by ``forkserver``, its server importing ``preload`` first.

    The server starts with the first worker and lives as long as this process, so the first call's modules are
    the ones it holds; a worker imports whatever else its tasks need. Where there is no forkserver (Windows)
    workers are spawned, as Dask does by default."""
    import dask
    from distributed.utils import get_mp_context

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    # distributed sets its own list on its first call, and never again: ours replaces it after that call
    get_mp_context().set_forkserver_preload(["distributed", "numpy", *preload])


def local_cluster(cluster_cfg: dict, *, gpus: list[str] | None = None, preload: Sequence[str] = ()):
    """A ``SpecCluster`` of local worker processes (a ``LocalCluster`` cannot give each worker its own GPU).
    ``gpus`` are the CUDA device ids to hand out, one per worker (default: every visible GPU); ``preload`` the
    modules the workers' tasks import (the stage's), imported once by the server the workers are forked from."""
    from distributed import Scheduler, SpecCluster

    _fork_workers_from(preload)

    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard": True,
        "dashboard_address": cluster_cfg.get("dashboard_address") or _DEFAULT_DASHBOARD}}
    workers = local_worker_specs(cluster_cfg, visible_gpus() if gpus is None else gpus, usable_cores())
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING, name="wsi-local")


def _import_slurm_cluster():
    """``dask_jobqueue.SLURMCluster``. dask-jobqueue (0.9) replaces the SIGINT handler when imported (its
    ``runner`` module: Ctrl-C becomes a silent exit 0, skipping wsi's clean-up and its one line); the handler in
    place before is put back."""
    handler = signal.getsignal(signal.SIGINT)
    from dask_jobqueue import SLURMCluster

    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGINT, handler)
    return SLURMCluster


def slurm_cluster(cluster_cfg: dict):
    """A ``dask_jobqueue.SLURMCluster`` from ``cluster_cfg["slurm"]``; no job is submitted yet."""
    SLURMCluster = _import_slurm_cluster()

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
        worker_extra_args=worker_args, job_name=WORKER_JOB_NAME, log_directory=worker_log_directory(cluster_cfg),
        job_cls=_recording_job_class(),
        scheduler_options={"dashboard_address": cluster_cfg.get("dashboard_address") or _DEFAULT_DASHBOARD})


def worker_log_directory(cluster_cfg: dict) -> str:
    """Where the SLURM worker jobs write ``wsi-worker-<job id>.out/.err``: ``slurm.log_directory``, else a
    folder under the temporary directory (never the working directory)."""
    s = cluster_cfg.get("slurm") or {}
    return str(s.get("log_directory") or os.path.join(tempfile.gettempdir(), "wsi-dask-workers"))


def _recording_job_class():
    """dask-jobqueue's ``SLURMJob`` that keeps sbatch's error on the job (``submit_error``): dask-jobqueue
    submits from its event loop, where a refused submission is only logged. Its status follows what happened
    (failed, closed), so the cluster closes cleanly after either."""
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status

    class RecordingSLURMJob(SLURMJob):
        submit_error: str | None = None

        async def start(self):
            try:
                await super().start()
            except RuntimeError as e:
                self.submit_error = _sbatch_error(str(e))
                self.status = Status.failed  # so that closing the cluster passes over it
                raise

        async def close(self):
            await super().close()  # scancel; dask-jobqueue leaves the status at running, which closing the
            self.status = Status.closed  # cluster asserts against while anything still holds the job

    return RecordingSLURMJob


def _sbatch_error(text: str) -> str:
    """The line that says why, from dask-jobqueue's 'Command exited with non-zero exit code' message."""
    stderr = text.split("stderr:", 1)[-1]
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [" ".join(text.split())])[-1]


def _job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue`` (finished jobs stay listed for MinJobAge); a job squeue
    no longer lists is absent. Empty when squeue fails: the caller waits on."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%r", "--jobs",
                              ",".join(job_ids)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def _last_line(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def wait_for_slurm_workers(client, cluster, timeout_s: float, *, log_dir: str, poll_s: float = 1.0) -> None:
    """Return once a worker of ``cluster``'s SLURM jobs has joined; else one :class:`ConfigError`: at once when
    sbatch refused the jobs or every job ended without a worker joining, else after ``timeout_s`` seconds,
    naming each job's state and pending reason."""
    deadline = time.monotonic() + timeout_s
    hint = ("size cluster.slurm (queue, cores, memory, gpus_per_job) to what the partition offers, or raise "
            "cluster.slurm.start_timeout_s when the queue is long")
    while not client.scheduler_info()["workers"]:
        jobs = list(cluster.workers.values())
        refused = [j.submit_error for j in jobs if getattr(j, "submit_error", None)]
        if refused:
            raise ConfigError(None, f"SLURM refused the Dask worker jobs: {refused[0]}", hint)
        ids = [j.job_id for j in jobs if getattr(j, "job_id", None)]
        states = _job_states(ids) if ids else {}
        if ids and states and all(states.get(i, ("GONE", ""))[0] not in _LIVE_STATES for i in ids):
            err = os.path.join(log_dir, f"{WORKER_JOB_NAME}-{ids[0]}.err")
            last = _last_line(err)
            raise ConfigError(None, "every Dask worker job ended before its worker joined: "
                              + ", ".join(f"job {i} {states.get(i, ('GONE', ''))[0]}" for i in ids)
                              + (f"; {err} ends: {last}" if last else ""), f"see the worker logs in {log_dir}")
        if time.monotonic() > deadline:
            waiting = ", ".join(f"job {i} {states[i][0]} ({states[i][1]})" if i in states else f"job {i}"
                                for i in ids) or "no job was submitted"
            raise ConfigError(None, f"no Dask worker joined within {timeout_s:g} s "
                              f"(cluster.slurm.start_timeout_s): {waiting}", hint)
        time.sleep(poll_s)


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


def _start_cluster(cluster_cfg: dict, preload: Sequence[str]):
    """The cluster this process owns for ``kind`` local or slurm; ``None`` for ``address``."""
    kind = cluster_cfg.get("kind", "local")
    if kind == "address":
        return None
    if kind == "local":
        return local_cluster(cluster_cfg, preload=preload)
    if kind == "slurm":
        cluster = slurm_cluster(cluster_cfg)
        cluster.scale(jobs=cluster_cfg.get("n_workers") or 1)
        return cluster
    raise ConfigError(None, f"cluster.kind must be local, slurm or address, got {kind!r}")


@contextmanager
def dask_client(cluster_cfg: dict, *, preload: Sequence[str] = ()) -> Iterator:
    """A ``distributed.Client`` for ``config["cluster"]``; prints the dashboard link; closes what it started
    (a scheduler given by ``address`` is left running). ``preload``: the modules a local cluster's workers are
    forked with (:func:`local_cluster`)."""
    from distributed import Client

    cluster = _start_cluster(cluster_cfg, preload)
    try:
        client = Client(cluster) if cluster is not None else _connect(cluster_cfg)
        try:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
            if cluster_cfg.get("kind") == "slurm":
                s = cluster_cfg.get("slurm") or {}
                wait_for_slurm_workers(client, cluster, float(s.get("start_timeout_s") or _DEFAULT_START_TIMEOUT_S),
                                       log_dir=worker_log_directory(cluster_cfg))
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close(timeout=_CLOSE_TIMEOUT_S)  # a SLURMCluster scancels its worker jobs here


def gpu_resources(client, *, tasks_per_gpu: int = 1, wait_timeout: float | None = None) -> dict | None:
    """``{"GPU": 1 / tasks_per_gpu}`` when the cluster's workers advertise GPUs, else ``None`` (CPU tasks ask
    for nothing). With ``tasks_per_gpu`` above 1, that many tasks share a GPU worker at once (their own locks
    keep the GPU work one at a time), so one task's reads and writes overlap another's GPU work.

    Waits for a first worker (SLURM jobs may still be queued), at most ``wait_timeout`` seconds.
    """
    client.wait_for_workers(1, timeout=wait_timeout)
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
        return None
    return {"GPU": 1 / tasks_per_gpu}


# ------------------------------------------------------------------------------------------ device, precision
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def _advertised_gpus(worker) -> float:
    return worker.state.total_resources.get("GPU", 0)


def worker_device(worker=None) -> str:
    """``"cuda"`` or ``"cpu"``: where work of this process runs.

    On a Dask worker (``worker``, or the one running the current task) the device follows its ``GPU`` resource:
    a worker that advertises a GPU but cannot use CUDA raises a :class:`~wsi.errors.ConfigError` (it would
    otherwise run some 100x slower on its CPU); one that advertises none runs on the CPU, with a
    :class:`CudaUnusedWarning` when it sees a GPU (``dask cuda worker`` under ``cluster.kind: address``, say).
    Outside a worker: CUDA when torch sees a GPU.
    """
    import torch

    if worker is None:
        from distributed import get_worker

        try:
            worker = get_worker()
        except ValueError:  # not in a Dask task
            return "cuda" if torch.cuda.is_available() else "cpu"
    if _advertised_gpus(worker) <= 0:
        if torch.cuda.is_available():
            _warn_cuda_unused(worker.address)
        return "cpu"
    problem = _cuda_problem()
    if problem:
        raise ConfigError(None, f"Dask worker {worker.address} advertises GPU={_advertised_gpus(worker):g} but "
                                f"{problem}", "fix the worker's CUDA driver or torch build, or start it without "
                                              "the GPU resource")
    return "cuda"


class CudaUnusedWarning(UserWarning):
    """A Dask worker that sees a CUDA device runs on its CPU, since it advertises no ``GPU`` resource."""


def _warn_cuda_unused(address: str) -> None:
    """Once per worker process (a warning repeated with the same text at the same place is shown once by
    Python's default filter); in a task, the clients see it too (``distributed.warn``)."""
    from distributed import warn

    warn(CudaUnusedWarning(
        f"Dask worker {address} sees a CUDA device but advertises no GPU resource, so its work runs on the CPU; "
        "start it with `--resources GPU=1` (e.g. `dask worker ADDRESS --resources GPU=1`, or `dask cuda worker "
        "ADDRESS --resources GPU=1`), or hide the GPU from it (CUDA_VISIBLE_DEVICES=\"\") to mean the CPU"))


def _cuda_problem() -> str | None:
    """Why CUDA cannot run here, or None."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            torch.cuda.init()
            return None
    except RuntimeError as e:  # a driver or device that fails to start raises here
        return f"CUDA does not start: {e} {where}"
    return f"torch sees no usable CUDA device {where}"


def choose_precision(requested: str, device: str, *, key: str = "precision") -> str:
    """The precision a model runs in on ``device``: ``fp32``, ``bf16`` or ``fp16``.

    ``auto`` is fp32 on CPU; on CUDA, bf16 on compute capability 8 or more, fp16 below it, where bf16 has no
    tensor cores. An explicit ``bf16`` on such a GPU, or ``fp16`` on CPU, is an error naming the config ``key``.
    """
    if requested not in PRECISIONS:
        raise ConfigError(None, f"{key} must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if not str(device).startswith("cuda"):
        if requested == "fp16":
            raise ConfigError(None, f"{key} fp16 needs a CUDA device", "use fp32 or bf16 on CPU")
        return "fp32" if requested == "auto" else requested
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    has_bf16 = major >= 8
    if requested == "auto":
        return "bf16" if has_bf16 else "fp16"
    if requested == "bf16" and not has_bf16:
        raise ConfigError(None, f"{key} bf16 has no hardware support on {torch.cuda.get_device_name(device)} "
                                f"(compute capability {major}.{minor}; bf16 needs 8.0 or more)",
                          "use auto or fp16")
    return requested


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN's kernel autotuning (``torch.backends.cudnn.benchmark``, a per-process flag) set for a block and
    put back after it: extraction's fixed batch shapes gain from it, while a MIL fold on the same worker, whose
    every bag has a new shape, would re-tune at every step."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def torch_dtype(precision: str):
    """The torch dtype of a precision :func:`choose_precision` returned."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
