"""What the workflow checks on a SLURM cluster before it submits anything (``--profile configs/slurm``).

The Snakefile calls :func:`preflight` once, when a run starts under the ``slurm`` executor (not in dry runs, not
inside the jobs). Each check ends the run with one line that names what is wrong and what to set, where SLURM
itself would have refused the jobs one by one or, worse, left Snakemake waiting without a word:

Status check
    snakemake-executor-plugin-slurm (2.x) learns that a job ended from ``sacct`` or ``squeue``. ``sacct`` needs
    SLURM accounting (slurmdbd); without it every query fails and the plugin waits forever. Even with it, the
    plugin misses a job cancelled with ``scancel`` (``sacct`` says ``CANCELLED by <uid>``) and waits for it
    forever. ``squeue --states=all`` needs no accounting and shows a cancelled job as ``CANCELLED``, but only while
    slurmctld keeps finished jobs (``MinJobAge``, 300 s by default): the plugin polls at most 180 s apart, so
    ``MinJobAge`` must outlast that (:data:`MIN_JOB_AGE_S`), and below three times the first poll interval the
    plugin itself swaps ``squeue`` for ``sacct``. The profile asks for ``squeue``; :func:`check_status_command`
    refuses a combination that would hang.
Requests
    Each job's cores (``threads``), memory (``mem_mb``) and GPUs (``gpu``) come from the config's ``resources``
    section; Dask workers (``cluster.kind: slurm``) ask for ``cluster.slurm.cores``, ``memory`` and
    ``gpus_per_job``. :func:`check_requests` compares them with the nodes of the partition each would go to
    (``sinfo``) and names the rule, its request and the partition's largest node when no node can hold it.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass

from .errors import ConfigError

MIN_JOB_AGE_S = 240  # the plugin's longest poll interval (180 s) plus a minute for a slow squeue
COMMAND_TIMEOUT_S = 30
CPU_OVERLAY = "configs/slurm/cpu.yaml"


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int

    def describe(self) -> str:
        return f"{self.cpus} cores, {self.mem_mb} MB and {self.gpus or 'no'} GPU{'s' if self.gpus != 1 else ''}"


@dataclass(frozen=True)
class Request:
    """What one rule's jobs (or the Dask worker jobs) ask SLURM for."""

    what: str  # "rule extract", "the Dask worker jobs"
    key: str  # where it is set: "resources.extract", "cluster.slurm"
    partition: str | None  # None: the cluster's default partition
    cpus: int
    mem_mb: int
    gpus: int

    def describe(self) -> str:
        return f"{self.cpus} cores, {self.mem_mb} MB and {self.gpus} GPU{'s' if self.gpus != 1 else ''}"


def _run(cmd: list[str]) -> str:
    """stdout of a SLURM client command; a SLURM that does not answer is one ConfigError."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError as e:
        raise ConfigError(None, f"`{cmd[0]}` is not on PATH, so SLURM cannot be queried",
                          "run on a host with the SLURM client commands (the login node)") from e
    except subprocess.TimeoutExpired as e:
        raise ConfigError(None, f"`{' '.join(cmd)}` did not answer within {COMMAND_TIMEOUT_S} s",
                          "check that slurmctld is up (scontrol ping)") from e
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise ConfigError(None, f"`{' '.join(cmd)}` failed: {err}", "check that slurmctld is up (scontrol ping)")
    return proc.stdout


def slurm_config() -> dict[str, str]:
    """``scontrol show config`` as ``{key: value}``."""
    conf = {}
    for line in _run(["scontrol", "show", "config"]).splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            conf[key.strip()] = value.strip()
    return conf


def _seconds(value: str) -> int | None:
    """``300 sec`` / ``1h`` / ``300`` -> seconds (as ``scontrol show config`` prints MinJobAge)."""
    m = re.match(r"^(\d+)\s*([a-zA-Z]*)", value or "")
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).lower()
    return n * 3600 if unit in ("h", "hour", "hours") else n * 60 if unit in ("min", "mins", "minutes") else n


def check_status_command(status_command: str | None, first_poll_s: int, conf: dict[str, str]) -> str | None:
    """Refuse a status check that would leave the run waiting forever (see the module docstring); return a
    warning for one that works until a job is cancelled."""
    accounting = conf.get("AccountingStorageType", "")
    min_job_age = _seconds(conf.get("MinJobAge", ""))
    if status_command == "sacct":
        if accounting.endswith("/none") or not accounting:
            raise ConfigError(None, "the SLURM status check is sacct, but this cluster keeps no job accounting "
                              f"(AccountingStorageType={accounting or 'unset'}), so Snakemake would never learn "
                              "that a job ended", "set slurm-status-command: squeue, as configs/slurm/config.yaml "
                              "does")
        return ("the SLURM status check is sacct: the plugin does not notice a job cancelled with scancel "
                "(CANCELLED by <uid>) and would wait for it; slurm-status-command: squeue does")
    need = max(MIN_JOB_AGE_S, 3 * first_poll_s)
    if min_job_age is None or min_job_age < need:
        raise ConfigError(None, f"the SLURM status check is squeue, but slurmctld forgets a finished job after "
                          f"MinJobAge={conf.get('MinJobAge', 'unset')}, before the plugin's next poll may see it "
                          f"(it needs at least {need} s)", "ask the cluster's admins for MinJobAge=300 (SLURM's "
                          "default), or, where slurmdbd keeps accounting, set slurm-status-command: sacct (a job "
                          "cancelled with scancel is then not noticed)")
    return None


def partitions() -> tuple[dict[str, list[Node]], str | None]:
    """``({partition: nodes}, default partition)`` from ``sinfo``."""
    parts: dict[str, list[Node]] = {}
    default = None
    for line in _run(["sinfo", "--noheader", "--Node", "--format=%P|%N|%c|%m|%G"]).splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, name, cpus, mem, gres = fields
        if part.endswith("*"):
            part = default = part[:-1]
        parts.setdefault(part, []).append(Node(name, _int(cpus), _int(mem), gpu_count(gres)))
    return parts, default


def _int(text: str) -> int:
    m = re.match(r"\d+", text.strip())
    return int(m.group()) if m else 0


def gpu_count(gres: str) -> int:
    """GPUs in a node's ``sinfo %G`` field: ``gpu:a100:4(S:0-1),shard:8`` -> 4, ``(null)`` -> 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check_requests(requests: list[Request], parts: dict[str, list[Node]], default: str | None) -> None:
    """One ConfigError for the first request no node of its partition can hold."""
    for req in requests:
        name = req.partition or default
        nodes = parts.get(name or "")
        where = f"partition {name}" if req.partition else f"the default partition ({name})"
        if not nodes:
            raise ConfigError(None, f"{req.what} is to run in {where}, which SLURM does not know (partitions: "
                              f"{', '.join(sorted(parts)) or 'none'})", "set slurm_partition in the profile "
                              "(configs/slurm/config.yaml) to one of them")
        if any(n.cpus >= req.cpus and n.mem_mb >= req.mem_mb and n.gpus >= req.gpus for n in nodes):
            continue
        largest = max(nodes, key=lambda n: (n.gpus >= req.gpus, n.cpus, n.mem_mb))
        fix = f"lower {req.key} in the config, or send it to a bigger partition"
        if req.gpus and not any(n.gpus for n in nodes):
            fix = (f"on a cluster without GPUs add --configfile {CPU_OVERLAY}; else set its slurm_partition to your "
                   "GPU partition in configs/slurm/config.yaml")
        raise ConfigError(None, f"{req.what} asks for {req.describe()} ({req.key}), but the largest node of {where}"
                          f", {largest.name}, has {largest.describe()}", fix)


def rule_request(config: dict, rule: str, partition: str | None) -> Request:
    res = config["resources"][rule]
    return Request(f"rule {rule}", f"resources.{rule}", partition or None, int(res["threads"]),
                   int(res["mem_mb"]), int(res.get("gpu") or 0))


def worker_request(cluster_cfg: dict) -> Request:
    """The Dask worker jobs' request, with memory rounded as dask-jobqueue writes ``#SBATCH --mem``."""
    from dask.utils import parse_bytes

    s = cluster_cfg.get("slurm") or {}
    mem_mb = math.ceil(parse_bytes(str(s.get("memory", "32GB"))) / 2**30) * 1024
    return Request("the Dask worker jobs (cluster.kind: slurm)", "cluster.slurm", s.get("queue") or None,
                   int(s.get("cores", 8)), mem_mb, int(s.get("gpus_per_job", 0)))


def preflight(config: dict, rules: dict[str, str | None], *, status_command: str | None,
              first_poll_s: int) -> list[str]:
    """Every check before the first submission: the status command, then the requests of ``rules`` (``{rule:
    slurm_partition or None}``, the rules this run submits) and of the Dask workers when ``cluster.kind`` is
    slurm. Raises :class:`~wsi.errors.ConfigError`; returns warnings (one line each)."""
    warning = check_status_command(status_command, first_poll_s, slurm_config())
    requests = [rule_request(config, r, rules[r]) for r in config["resources"] if r in rules]  # stage order
    if config["cluster"]["kind"] == "slurm":
        requests.append(worker_request(config["cluster"]))
    parts, default = partitions()
    check_requests(requests, parts, default)
    return [warning] if warning else []
