"""wsi.cluster: real local clusters (worker processes), a real scheduler address, the SLURM job script."""

import os

import pytest
from distributed import LocalCluster

from wsi.cluster import dask_client, gpu_resources, local_cluster, slurm_job_script
from wsi.config import load_config
from wsi.errors import ConfigError


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


def test_gpu_workers_each_see_their_own_device_and_advertise_gpu():
    """The per-GPU wiring, checked on CPU: each worker gets CUDA_VISIBLE_DEVICES and GPU=1."""
    from distributed import Client

    cfg = _cluster_cfg(threads_per_worker=1)
    with local_cluster(cfg, gpus=["3", "5"]) as cluster, Client(cluster) as client:
        assert gpu_resources(client) == {"GPU": 1}
        envs = client.run(_worker_env, "CUDA_VISIBLE_DEVICES")
        assert sorted(envs.values()) == ["3", "5"]
        seen = {client.submit(_worker_env, "CUDA_VISIBLE_DEVICES", resources={"GPU": 1}, pure=False).result()
                for _ in range(4)}
        assert seen <= {"3", "5"}


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
