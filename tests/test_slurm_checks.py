"""wsi.slurm's checks on what `sinfo` and `scontrol show config` report, without a cluster: which requests a
partition can hold, what a request beyond every node says, and which status checks would wait forever.
(tests/test_slurm.py runs them against a real SLURM.)"""

import pytest

from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.slurm import Node, Request, check_requests, check_status_command, gpu_count, rule_request, worker_request

CPU_NODES = {"cpu": [Node("c1", 32, 128000, 0), Node("c2", 64, 256000, 0)]}
MIXED = {**CPU_NODES, "gpu": [Node("g1", 16, 64000, 2), Node("g2", 32, 512000, 4)]}


def req(cpus, mem_mb, gpus=0, partition=None, what="rule extract", key="resources.extract"):
    return Request(what, key, partition, cpus, mem_mb, gpus)


@pytest.mark.parametrize("gres, n", [("(null)", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4),
                                     ("gpu:a100:2,gpu:v100:1", 3), ("shard:8,gpu:h100:8(S:0-3)", 8),
                                     ("mps:100", 0)])
def test_gpu_count_reads_sinfo_gres(gres, n):
    assert gpu_count(gres) == n


def test_a_request_some_node_holds_passes():
    check_requests([req(64, 200000, partition="cpu"), req(32, 500000, 4, partition="gpu")], MIXED, "cpu")
    check_requests([req(2, 4000)], CPU_NODES, "cpu")  # no partition named: the default one


def test_a_request_no_single_node_holds_names_the_rule_the_request_and_the_largest_node():
    # c2 has the cores, c1... neither has 300 GB: the largest node is named with what it has
    with pytest.raises(ConfigError) as e:
        check_requests([req(16, 300000, partition="cpu")], MIXED, "cpu")
    assert e.value.one_line() == (
        "rule extract asks for 16 cores, 300000 MB and 0 GPUs (resources.extract), but the largest node of "
        "partition cpu, c2, has 64 cores, 256000 MB and no GPUs (lower resources.extract in the config, or send it "
        "to a bigger partition)")


def test_a_gpu_request_on_a_partition_without_gpus_points_at_the_cpu_overlay():
    with pytest.raises(ConfigError) as e:
        check_requests([req(2, 4000, 1)], CPU_NODES, "cpu")
    assert ("but the largest node of the default partition (cpu), c2, has 64 cores, 256000 MB and no GPUs"
            in str(e.value))
    assert "add --configfile configs/slurm/cpu.yaml" in str(e.value)


def test_a_partition_slurm_does_not_know_is_named_with_those_it_does():
    with pytest.raises(ConfigError, match=r"rule extract is to run in partition a100, which SLURM does not know "
                                          r"\(partitions: cpu, gpu\)"):
        check_requests([req(1, 1000, partition="a100")], MIXED, "cpu")


def test_requests_come_from_the_config_resources_and_the_dask_worker_settings():
    config = load_config()
    assert rule_request(config, "extract", None) == Request("rule extract", "resources.extract", None, 16, 32000, 1)
    cluster = {"slurm": {"queue": "gpu", "cores": 8, "memory": "32GB", "gpus_per_job": 1}}
    # dask-jobqueue writes --mem in whole GiB, rounded up: 32 GB -> 30 GiB
    assert worker_request(cluster) == Request("the Dask worker jobs (cluster.kind: slurm)", "cluster.slurm", "gpu",
                                              8, 30 * 1024, 1)


NO_ACCOUNTING = {"AccountingStorageType": "accounting_storage/none", "MinJobAge": "300 sec"}
ACCOUNTING = {"AccountingStorageType": "accounting_storage/slurmdbd", "MinJobAge": "300 sec"}


def test_squeue_works_with_or_without_accounting_while_finished_jobs_stay_listed():
    assert check_status_command("squeue", 10, NO_ACCOUNTING) is None
    assert check_status_command("squeue", 10, ACCOUNTING) is None


def test_sacct_with_accounting_runs_with_a_warning_about_cancelled_jobs():
    warning = check_status_command("sacct", 10, ACCOUNTING)
    assert "does not notice a job cancelled with scancel" in warning and "squeue" in warning


def test_sacct_without_accounting_would_wait_forever_and_is_refused():
    with pytest.raises(ConfigError, match="status check is sacct, but this cluster keeps no job accounting.*"
                                          "set slurm-status-command: squeue"):
        check_status_command("sacct", 10, NO_ACCOUNTING)


@pytest.mark.parametrize("min_job_age, first_poll", [("60 sec", 10), ("200 sec", 10), ("300 sec", 120)])
def test_squeue_that_forgets_jobs_before_the_next_poll_is_refused(min_job_age, first_poll):
    with pytest.raises(ConfigError, match=f"forgets a finished job after MinJobAge={min_job_age}"):
        check_status_command("squeue", first_poll, {**ACCOUNTING, "MinJobAge": min_job_age})
