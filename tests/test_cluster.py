"""wsi.cluster: real local clusters (worker processes), a real scheduler address, the SLURM job script, and the
device and precision a worker's tasks run with.

There is no GPU here: where a test needs torch to report one, it patches torch's CUDA queries (``gpu`` fixture)
and nothing else, so the choice code under test is the real one."""

import json
import os
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from distributed import Client, LocalCluster, Scheduler, SpecCluster, Worker

from wsi.cluster import (
    CudaUnusedWarning,
    choose_precision,
    dask_client,
    gpu_resources,
    local_cluster,
    slurm_job_script,
    worker_device,
)
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.mil.training import autocast_dtype


def _cluster_cfg(**over):
    cfg = load_config()["cluster"]
    cfg.update({"dashboard_address": ":0", **over})
    return cfg


def _worker_env(name):
    return os.environ.get(name)


def test_local_default_is_two_cpu_workers_and_closes(capsys):
    with dask_client(_cluster_cfg()) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert gpu_resources(client) is None
        assert client.submit(sum, [1, 2, 3]).result() == 6
        cluster = client.cluster
    assert "Dask dashboard: http" in capsys.readouterr().err
    assert cluster.status.name == "closed"


@pytest.mark.slow
def test_gpu_workers_each_see_their_own_device_and_advertise_gpu():
    """The per-GPU wiring, checked on CPU: each GPU worker gets its CUDA_VISIBLE_DEVICES and GPU=1; the worker
    beyond the GPUs sees none, so it cannot put a model on a GPU another worker owns."""
    cfg = _cluster_cfg(threads_per_worker=1, n_workers=3)
    with local_cluster(cfg, gpus=["3", "5"]) as cluster, Client(cluster) as client:
        assert gpu_resources(client) == {"GPU": 1}
        envs = client.run(_worker_env, "CUDA_VISIBLE_DEVICES")
        assert sorted(envs.values()) == ["", "3", "5"]
        seen = {client.submit(_worker_env, "CUDA_VISIBLE_DEVICES", resources={"GPU": 1}, pure=False).result()
                for _ in range(4)}
        assert seen <= {"3", "5"}


_FORKED_WORKERS = """
import json, os, sys
from distributed import Client
from wsi.cluster import local_cluster

def start():
    import torch
    return [os.getppid(), "wsi.mil.training" in sys.modules, torch.cuda.is_initialized(),
            os.environ.get("CUDA_VISIBLE_DEVICES")]

if __name__ == "__main__":
    cfg = {"n_workers": 3, "threads_per_worker": 1, "dashboard_address": ":0"}
    with local_cluster(cfg, gpus=["3", "5"], preload=["wsi.mil.training"]) as cluster, Client(cluster) as client:
        print(json.dumps({"me": os.getpid(), "workers": list(client.run(start).values())}))
"""


@pytest.mark.slow
def test_local_workers_fork_from_one_server_that_imported_the_stage_and_still_see_their_own_gpu(tmp_path):
    """A fresh process (the server starts with a process's first cluster): its three workers share one parent
    that is not the process itself, hold the stage's module before any task ran, have not touched CUDA, and
    each still gets its own CUDA_VISIBLE_DEVICES."""
    script = tmp_path / "forked.py"
    script.write_text(_FORKED_WORKERS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    parents = {w[0] for w in got["workers"]}
    assert len(parents) == 1 and got["me"] not in parents
    assert all(w[1] for w in got["workers"])
    assert not any(w[2] for w in got["workers"])
    assert sorted(w[3] for w in got["workers"]) == ["", "3", "5"]


def test_address_connects_and_leaves_the_scheduler_running():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", processes=False) as cluster:
        with dask_client(_cluster_cfg(kind="address", address=cluster.scheduler_address)) as client:
            assert client.submit(pow, 2, 5).result() == 32
        assert cluster.status.name == "running"


def test_address_unreachable_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1"):
        with dask_client(_cluster_cfg(kind="address", address="tcp://127.0.0.1:1", connect_timeout_s=1)):
            pass


def test_slurm_job_script_requests_gpu_and_declares_resource():
    cfg = _cluster_cfg(kind="slurm")
    cfg["slurm"].update({"queue": "gpu", "account": "lab", "cores": 6, "memory": "24GB", "walltime": "01:00:00",
                         "job_extra_directives": ["--constraint=a100"],
                         "job_script_prologue": ["module load cuda"]})
    script = slurm_job_script(cfg)
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH --cpus-per-task=6", "#SBATCH -t 01:00:00",
                 "#SBATCH --constraint=a100", "#SBATCH --gres=gpu:1", "module load cuda"):
        assert line in script
    assert "--resources GPU=1" in script
    cfg["slurm"]["gpus_per_job"] = 0
    script = slurm_job_script(cfg)
    assert "--gres" not in script and "GPU=1" not in script


def test_slurm_processes_sharing_a_gpu_is_refused():
    cfg = _cluster_cfg(kind="slurm")
    cfg["slurm"]["processes"] = 2
    with pytest.raises(ConfigError, match="processes is 2"):
        slurm_job_script(cfg)


def _spans(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


@pytest.mark.slow
@pytest.mark.parametrize("tasks_per_gpu,overlap", [(1, False), (2, True)])
def test_tasks_share_a_gpu_worker_only_when_asked(tasks_per_gpu, overlap):
    """One GPU worker with two threads: tasks asking for a whole GPU run one after the other, tasks asking for
    half of it run together (one's I/O can then overlap the other's GPU work)."""
    cfg = _cluster_cfg(n_workers=1, threads_per_worker=2)
    with local_cluster(cfg, gpus=["0"]) as cluster, Client(cluster) as client:
        resources = gpu_resources(client, tasks_per_gpu=tasks_per_gpu)
        assert resources == {"GPU": 1 / tasks_per_gpu}
        (a0, a1), (b0, b1) = client.gather([client.submit(_spans, 1.0, resources=resources, pure=False)
                                            for _ in range(2)])
    assert (max(a0, b0) < min(a1, b1)) == overlap


# ------------------------------------------------------------------------------------------ device, precision
@pytest.fixture
def gpu(monkeypatch):
    """``gpu(major, minor)``: torch reports one CUDA device of that compute capability."""
    def report(major: int, minor: int, name: str = "a test GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "init", lambda: None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # torch's answer on V100/T4
    return report


@pytest.mark.parametrize("capability,expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                 ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_from_compute_capability_8_and_fp16_below(gpu, capability, expected):
    gpu(*capability)
    assert choose_precision("auto", "cuda") == expected
    assert autocast_dtype("auto", torch.device("cuda")) == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_explicit_precisions_on_gpu_and_cpu(gpu):
    assert choose_precision("auto", "cpu") == "fp32" and autocast_dtype("auto", torch.device("cpu")) is None
    assert choose_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="mil.precision fp16 needs a CUDA device"):
        autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="extract.precision must be one of auto, fp32, fp16, bf16, got 'half'"):
        choose_precision("half", "cpu", key="extract.precision")
    gpu(7, 5, "Tesla T4")
    assert choose_precision("fp16", "cuda") == "fp16" and choose_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ConfigError, match=r"bf16 has no hardware support on Tesla T4 \(compute capability 7.5"):
        choose_precision("bf16", "cuda")
    gpu(9, 0)
    assert choose_precision("bf16", "cuda") == "bf16"


@pytest.fixture
def in_process_workers():
    """A scheduler and two workers in this process (so patched torch queries reach them): ``gpu`` advertises
    GPU=1, ``cpu`` nothing."""
    workers = {"gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
               "cpu": {"cls": Worker, "options": {"nthreads": 1}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        yield client, {name: w.address for name, w in cluster.workers.items()}


def _device_of(dask_worker):
    return worker_device(dask_worker)


def test_the_device_follows_the_workers_gpu_resource(gpu, in_process_workers):
    client, address = in_process_workers
    gpu(9, 0)
    assert client.run(_device_of, workers=[address["gpu"]]) == {address["gpu"]: "cuda"}
    assert client.run(_device_of, workers=[address["cpu"]]) == {address["cpu"]: "cpu"}  # though CUDA is there
    assert client.submit(worker_device, resources={"GPU": 1}, pure=False).result() == "cuda"  # in a task
    assert worker_device() == "cuda"  # outside a worker: CUDA when torch sees it


def test_a_worker_that_sees_cuda_without_the_gpu_resource_warns_once_naming_it(gpu):
    """``dask cuda worker`` under ``cluster.kind: address`` sets no GPU resource: its work would run on the CPU,
    some 100x slower, without a word."""
    worker = SimpleNamespace(address="tcp://10.0.0.7:4242", state=SimpleNamespace(total_resources={}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert worker_device(worker) == "cpu"  # no CUDA: nothing to say
        gpu(9, 0)
        assert [worker_device(worker) for _ in range(3)] == ["cpu"] * 3
    assert len(caught) == 1 and caught[0].category is CudaUnusedWarning
    assert "Dask worker tcp://10.0.0.7:4242 sees a CUDA device" in str(caught[0].message)
    assert "--resources GPU=1" in str(caught[0].message)


@pytest.mark.slow
def test_an_advertised_gpu_that_cuda_cannot_use_is_an_error():
    """Real worker processes on this machine, which has no GPU: the worker that advertises one fails loudly, the
    one that does not runs on the CPU."""
    cfg = _cluster_cfg(n_workers=2, threads_per_worker=1)
    with local_cluster(cfg, gpus=["0"]) as cluster, Client(cluster) as client:
        with pytest.raises(ConfigError, match=r"advertises GPU=1 but torch sees no usable CUDA device "
                                              r"\(CUDA_VISIBLE_DEVICES='0'"):
            client.submit(worker_device, resources={"GPU": 1}, pure=False).result()
        cpu_worker = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                          if not w.get("resources"))
        assert client.run(_device_of, workers=[cpu_worker]) == {cpu_worker: "cpu"}
