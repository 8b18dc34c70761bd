"""The workflow on a real SLURM: slurmctld, slurmd and munge on this machine, one partition over this 2-core node
without GPUs and without an accounting database, as `.ci/slurm-up.sh` sets them up. Snakemake submits through
the profile (configs/slurm) and snakemake-executor-plugin-slurm; Dask workers are SLURM jobs through
dask-jobqueue. Nothing is mocked.

- the README's SLURM command on the demo, with the CPU overlay (configs/slurm/cpu.yaml), end to end;
- the README command without the overlay (extract asks for a GPU), a job bigger than any node, and a status
  check that cannot work here: each one line before any job is submitted;
- Dask on SLURM (configs/slurm/dask.yaml) with CPU workers; Ctrl-C while its workers run; worker jobs that
  SLURM refuses, or that never start;
- a tile job cancelled with scancel: the run ends naming that batch; the re-run finishes.

The README's demo runs in the background from the module's start, and its test, the last, waits for it: most of
its minutes are SLURM's status polls, during which the other tests run their own jobs. So each test looks only at
the jobs of its own working folder (squeue's %Z): none may be left in the queue, and no `slurm-<id>.out` in the
folder. Marked slow. Skipped when no such cluster answers, except in CI, where `.ci/run` starts it and sets
WSI_SLURM_REQUIRED=1 (then a missing cluster is a failure).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from wsi_synth import make_demo_cohort

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "configs" / "slurm"
DEMO = REPO / "configs" / "demo.yaml"
CPU = PROFILE / "cpu.yaml"
DASK = PROFILE / "dask.yaml"
TEST_CLUSTER = "wsi-ci"  # .ci/slurm-up.sh's ClusterName
# As an sbatch script that never activated the venv: no `wsi` on PATH; SLURM jobs inherit this environment
ENV = {**os.environ, "PATH": "/usr/bin:/bin"}
LIVE = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED"
# The tests after the README's command poll SLURM from 3 s after a submission (the profile: 10 s; both then add
# 10 s per poll), which finds the short jobs of a small cohort sooner and keeps the lane within its 10 minutes.
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "3"]

pytestmark = pytest.mark.slow


def _unusable() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if not shutil.which("sinfo"):
        return "SLURM's client commands are not installed"
    try:
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer"
    if conf.returncode != 0:
        return f"slurmctld does not answer ({' '.join(conf.stderr.split())})"
    if not re.search(rf"^ClusterName\s*=\s*{TEST_CLUSTER}$", conf.stdout, re.M):
        return f"the SLURM that answers is not the test cluster {TEST_CLUSTER} (.ci/slurm-up.sh)"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.split()
    if not {"idle", "mixed", "allocated"} & set(state):
        return f"the test cluster's node is {state or 'missing'}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = _unusable()
    if reason:
        if os.environ.get("WSI_SLURM_REQUIRED"):
            pytest.fail(f"{reason}; .ci/run starts it with .ci/slurm-up.sh")
        pytest.skip(f"{reason}: start it with `bash .ci/slurm-up.sh` (root; installs slurm-wlm and munge) and stop "
                    "it with `bash .ci/slurm-down.sh`")
    yield


def job_states(work: Path | None, states: str = "all") -> dict[str, tuple[str, str]]:
    """{job id: (state, job name)} of the jobs that ``work`` is the working folder of (Snakemake's jobs, and the
    Dask worker jobs of a `wsi` started there; None: of any folder) that slurmctld still lists: finished ones for
    MinJobAge."""
    out = subprocess.run(["squeue", "-h", f"--states={states}", "-o", "%i|%T|%j|%Z"], capture_output=True,
                         text=True).stdout
    return {i: (t, j) for i, t, j, folder in (line.split("|", 3) for line in out.splitlines())
            if work is None or Path(folder) == work}


def live_jobs(work: Path | None, name: str | None = None) -> list[str]:
    """Ids of ``work``'s jobs queued or running (of job name ``name``)."""
    return [i for i, (_, j) in job_states(work, LIVE).items() if name is None or j == name]


def start_snakemake(work: Path, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Snakemake through the SLURM profile in ``work``, in a process group of its own: a signal to the group
    reaches every process of the run, as a terminal's Ctrl-C does."""
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(work), *args]
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=ENV, cwd=work, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900, console: Path | None = None) -> subprocess.CompletedProcess:
    """Wait for a started Snakemake; past ``timeout`` (a hang), stop it as Ctrl-C would (so that it cancels its
    jobs) and fail. Returns it finished, its stdout and stderr (read from ``console``/stdout and stderr when it
    wrote there) and ``console``, the two together."""
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    if console is not None:
        out, err = (console / "stdout").read_text(), (console / "stderr").read_text()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out or "", err or "")
    done.console = done.stdout + done.stderr
    if hung:
        pytest.fail(f"snakemake ran past {timeout:.0f} s: {' '.join(proc.args)}\n{done.console[-3000:]}")
    return done


def snakemake(work: Path, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run Snakemake to its end (see :func:`finish`)."""
    return finish(start_snakemake(work, *args), timeout)


def wsi_processes(work: Path) -> list[psutil.Process]:
    """Processes of this machine whose command line names ``work`` (Snakemake, its jobs, wsi, Dask workers)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(str(work) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_clean(work: Path, proc=None, *, linger_s: float = 30):
    """No job queued, running or completing, no slurm-<id>.out in the working folder, and no process of the run
    left, once cancelled jobs have had SLURM's KillWait (10 s on the test cluster) to end."""
    deadline = time.monotonic() + linger_s
    while live_jobs(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_jobs(work) == [], f"jobs left in the queue: {live_jobs(work)}"
    assert not list(work.glob("slurm-*.out")), sorted(p.name for p in work.glob("slurm-*"))
    _, left = psutil.wait_procs(wsi_processes(work), timeout=linger_s)
    assert not left, [" ".join(p.cmdline()) for p in left]
    if proc is not None:
        assert "Traceback" not in proc.console, proc.console[-3000:]


def submitted_rules(console: str) -> set[str]:
    """Rules whose jobs Snakemake handed to sbatch (its 'has been submitted with SLURM jobid' lines)."""
    rules, current = set(), None
    for line in console.splitlines():
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip()):
            current = m.group(1)
        elif "has been submitted with SLURM jobid" in line and current:
            rules.add(current)
    return rules


def error_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("wsi: error:")]


# --------------------------------------------------------------------------------------------- the README command
DEMO_TEST = "test_readme_slurm_command_runs_the_demo_as_slurm_jobs"


@pytest.fixture(scope="module", autouse=True)
def demo_run(request, tmp_path_factory):
    """`snakemake --profile configs/slurm --configfile configs/demo.yaml configs/slurm/cpu.yaml`, as the README
    says for a cluster without GPUs, in a fresh folder, started in the background as the module starts (when its
    test is selected); yields ``result() -> (folder, finished process, seconds until result() had it)``. Its
    console goes to files beside the folder: a pipe that nobody reads until the end would fill and stall it."""
    if not any(item.originalname == DEMO_TEST for item in request.session.items):
        yield None
        return
    work = tmp_path_factory.mktemp("demo")
    console = tmp_path_factory.mktemp("demo-console")
    start = time.monotonic()
    with open(console / "stdout", "w") as out, open(console / "stderr", "w") as err:
        proc = start_snakemake(work, "--configfile", str(DEMO), str(CPU), stdout=out, stderr=err)

    def result() -> tuple[Path, subprocess.CompletedProcess, float]:
        done = finish(proc, timeout=max(900 - (time.monotonic() - start), 1), console=console)
        return work, done, time.monotonic() - start

    yield result
    if proc.poll() is None:  # the module was cut short: stop the run as Ctrl-C would, so that it cancels its jobs
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


# ------------------------------------------------------------------------------------ refused before submission
@pytest.mark.parametrize("case", ["gpu", "too_big", "sacct"])
def test_what_the_cluster_cannot_do_is_one_line_before_any_job(case, tmp_path):
    args = ["--configfile", str(DEMO)]
    if case == "too_big":
        big = tmp_path / "big.yaml"
        big.write_text(yaml.safe_dump({"resources": {"tile": {"mem_mb": 64000}}}))
        args += [str(CPU), str(big)]
    if case == "sacct":
        args += [str(CPU), "--slurm-status-command", "sacct"]
    start = time.monotonic()
    proc = snakemake(tmp_path, *args, timeout=120)
    seconds = time.monotonic() - start
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.console[-3000:]
    expected = {
        # the README command as it stands on a cluster without GPUs: extract asks for one
        "gpu": "rule extract asks for 2 cores, 4000 MB and 1 GPU (resources.extract), but the largest node of the "
               "default partition (debug), ",
        # tile comes after the demo's checkpoint: checked all the same
        "too_big": "rule tile asks for 2 cores, 64000 MB and 0 GPUs (resources.tile)",
        "sacct": "the SLURM status check is sacct, but this cluster keeps no job accounting",
    }[case]
    assert expected in errors[0], errors
    if case == "gpu":
        assert "no GPUs" in errors[0] and "configs/slurm/cpu.yaml" in errors[0]
    assert job_states(tmp_path) == {}, "a job was submitted"
    assert not (tmp_path / "demo" / "slides").exists()  # not even the demo's slides were made
    assert seconds < 60
    assert_clean(tmp_path, proc)


# ------------------------------------------------------------------------------- a smaller cohort for the rest
@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """Six small synthetic slides (three per class) and their labels: the Dask and scancel runs' cohort."""
    folder = tmp_path_factory.mktemp("cohort")
    make_demo_cohort(folder, n_slides=6, seed=1, field_mm=(1.6, 1.2))
    return folder


def small_config(cohort: Path, out: Path, path: Path, **top) -> Path:
    """The demo config on ``cohort``, writing to ``out``, with ``top``-level keys replaced."""
    config = yaml.safe_load(DEMO.read_text())
    config.pop("demo")
    config.update(slides_dir=str(cohort / "slides"), labels=str(cohort / "labels.csv"), out_dir=str(out), **top)
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------------------------- Dask on SLURM
def small_workers(path: Path) -> Path:
    """configs/slurm/dask.yaml's workers sized to this node: two jobs of 1 core and 2 GB (the overlay asks for 8
    cores and 32 GB each, more than the node has)."""
    path.write_text(yaml.safe_dump({"cluster": {"n_workers": 2, "slurm": {"cores": 1, "memory": "2GB",
                                                                          "walltime": "00:30:00"}}}))
    return path


@pytest.fixture(scope="module")
def dask_work(small_cohort, tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder and the arguments that tile the small cohort and extract its features with the Dask overlay
    (mode features: tile, then extract)."""
    work = tmp_path_factory.mktemp("dask")
    config = small_config(small_cohort, work / "out", work / "config.yaml", mode="features")
    return work, ["--configfile", str(config), str(DASK), str(CPU), str(small_workers(work / "workers.yaml")),
                  *FAST_POLL]


def test_ctrl_c_stops_a_dask_on_slurm_run_at_once_and_cancels_its_workers(dask_work):
    """Ctrl-C (SIGINT to the terminal's process group) while extract's worker jobs run: one signal ends the run
    within seconds, with one line saying so; no wsi process and no worker job is left."""
    work, args = dask_work
    before = set(job_states(work))
    proc = start_snakemake(work, *args, stderr=subprocess.STDOUT)
    running = []
    deadline = time.monotonic() + 240
    while not running and time.monotonic() < deadline and proc.poll() is None:
        running = [i for i, (state, name) in job_states(work).items()
                   if name == "wsi-worker" and state == "RUNNING" and i not in before]
        time.sleep(0.5)
    assert proc.poll() is None and running, "the worker jobs never ran"
    time.sleep(5)  # the workers join and extraction starts
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    console, _ = proc.communicate(timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    assert "wsi extract: error: stopped by SIGINT" in console, console[-3000:]
    assert "Cannot close a running event loop" not in console
    assert seconds < 60, seconds
    assert_clean(work)
    print(f"Ctrl-C: the run ended {seconds:.1f} s after the signal")


def test_dask_workers_as_slurm_jobs_extract_a_cohort(dask_work):
    """configs/slurm/dask.yaml (+ cpu.yaml): extract runs on the submit host and its CPU workers are SLURM jobs
    that log under OUT/logs/extract/workers and are cancelled when it ends. (After the Ctrl-C above, the same
    command finishes what that run left.)"""
    work, args = dask_work
    before = set(job_states(work))
    proc = snakemake(work, *args)
    assert proc.returncode == 0, proc.console[-4000:]
    assert "localrule extract:" in proc.console and "extract" not in submitted_rules(proc.console)
    workers = {i for i, (state, name) in job_states(work).items() if name == "wsi-worker" and i not in before}
    assert len(workers) == 2, job_states(work)
    logs = work / "out" / "logs" / "extract" / "workers"
    assert {p.name for p in logs.iterdir()} >= {f"wsi-worker-{i}.err" for i in workers}
    status = json.loads((work / "out" / "status" / "extract" / "tf_efficientnet_lite0.json").read_text())
    assert [i for i in status["items"] if i["status"] == "failed"] == [] and len(status["items"]) == 6
    assert any(i["status"] == "done" for i in status["items"])  # the workers extracted
    assert_clean(work, proc)


@pytest.fixture(scope="module")
def fresh_store(small_slide, tmp_path_factory) -> Path:
    """An output folder holding one tiled slide without features, so extract starts a cluster."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    subprocess.run([sys.executable, "-m", "wsi.cli", "tile", str(small_slide.path), "--out", str(out),
                    "--config", str(DEMO), "--no-progress"], check=True, env=ENV, capture_output=True)
    return out


@pytest.mark.parametrize("case", ["never_starts", "refused", "dies"])
def test_dask_workers_that_cannot_start_end_extract_with_one_line(case, fresh_store, tmp_path):
    sets = {"never_starts": ['cluster.slurm.job_extra_directives=["--begin=now+3600"]'],  # pending: BeginTime
            "refused": ["cluster.slurm.gpus_per_job=1"],  # a GPU on a node without: sbatch refuses it
            "dies": ['cluster.slurm.job_script_prologue=["echo no python here >&2", "exit 3"]']}[case]
    # only never_starts is about the timeout; the others must end on their cause, well before it, even when a
    # loaded machine's slurmctld is slow to place the job (a 15 s timeout then met a job still PENDING (Resources))
    start_timeout_s = 15 if case == "never_starts" else 90
    cmd = [sys.executable, "-m", "wsi.cli", "extract", "--out", str(fresh_store), "--config", str(DEMO),
           "--no-progress", "--set", "cluster.kind=slurm", "--set", "cluster.n_workers=1",
           "--set", "cluster.slurm.cores=1", "--set", "cluster.slurm.memory=2GB",
           "--set", "cluster.slurm.gpus_per_job=0", "--set", f"cluster.slurm.start_timeout_s={start_timeout_s}",
           "--set", "cluster.dashboard_address=:0"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    cmd += ["--log", str(tmp_path / "extract.log")]  # as a workflow job: the console gets only the cause
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    seconds = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    expected = {"never_starts": r"no Dask worker joined within 15 s \(cluster.slurm.start_timeout_s\): "
                                r"job \d+ PENDING \(BeginTime\)",
                "refused": r"SLURM refused the Dask worker jobs: sbatch: error: .*(gres|GRES)",
                "dies": r"every Dask worker job ended before its worker joined: job \d+ FAILED; .*"
                        r"logs/extract/workers/wsi-worker-\d+\.err ends: no python here"}[case]
    assert re.search(rf"^wsi extract: error: {expected}", lines[0]), lines
    assert seconds < {"never_starts": 60}.get(case, start_timeout_s), seconds
    assert_clean(tmp_path)
    assert live_jobs(tmp_path, "wsi-worker") == []


# ------------------------------------------------------------------------------------------------- a cancelled job
def test_scancel_of_a_tile_job_ends_the_run_naming_that_batch_and_a_rerun_finishes(small_cohort, tiny_vit,
                                                                                   tmp_path):
    """Two tile jobs of three slides; the second is cancelled while its `wsi tile` runs. (Mode features with the
    session's tiny test_vit encoder: the run ends with the stage after tiling, in seconds; the README demo below
    runs every stage on SLURM.)"""
    path = small_config(small_cohort, tmp_path / "out", tmp_path / "config.yaml", slides_per_job=3, mode="features")
    config = yaml.safe_load(path.read_text())
    config["resources"]["tile"]["threads"] = 1  # both tile jobs at once on the 2 cores
    config["extract"].update(encoder="test_vit", checkpoint=str(tiny_vit))
    path.write_text(yaml.safe_dump(config))
    args = ["--configfile", str(path), str(CPU), *FAST_POLL]
    proc = start_snakemake(tmp_path, *args, stderr=subprocess.STDOUT)
    log = tmp_path / "out" / "logs" / "tile" / "batch-00001.log"
    job = None
    deadline = time.monotonic() + 180
    while job is None and time.monotonic() < deadline and proc.poll() is None:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k|%Z"], capture_output=True,
                             text=True).stdout
        ids = [i for i, comment, folder in (line.split("|", 2) for line in out.splitlines())
               if comment.endswith("batch-00001") and Path(folder) == tmp_path]
        job = ids[0] if ids else None
        time.sleep(0 if job else 0.2)
    assert job, "the tile job of batch-00001 never ran"
    # cancelled while its `wsi tile` tiles: its three small slides take about a second, less than scancel takes to
    # reach the job, so the command is frozen (SIGSTOP, on this one-node cluster) at its first progress line, and
    # scancel's SIGCONT before its SIGTERM wakes it to that signal mid-tiling
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert log.exists() and log.stat().st_size, "the tile job of batch-00001 never started tiling"
    tiler = [p for p in wsi_processes(log) if p.cmdline()[1:4] == ["-m", "wsi.cli", "tile"]]
    assert len(tiler) == 1, [p.cmdline() for p in tiler]
    tiler[0].suspend()
    assert "slides done" not in log.read_text(), "batch-00001 was tiled before it could be stopped"
    subprocess.run(["scancel", job], check=True)
    start = time.monotonic()
    console, _ = proc.communicate(timeout=240)
    seconds = time.monotonic() - start
    assert proc.returncode != 0
    summary = console[console.index("wsi: summary of"):]
    tile_line = next(line for line in summary.splitlines() if line.strip().startswith("tile"))
    assert "batch-00001" in tile_line and "batch-00000" not in tile_line, summary
    assert "stopped by SIGTERM" in tile_line, summary
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in console
    assert seconds < 90, seconds
    assert_clean(tmp_path)
    print(f"scancel: the run ended {seconds:.1f} s after the cancel")

    rerun = snakemake(tmp_path, *args)
    assert rerun.returncode == 0, rerun.console[-4000:]
    status = json.loads((tmp_path / "out" / "status" / "extract" / "test_vit.json").read_text())
    assert sorted(i["status"] for i in status["items"]) == ["done"] * 6, status["items"]
    # only the cancelled batch was tiled again
    assert re.findall(r"wildcards: batch=(batch-\d+)", rerun.console.split("rule extract:")[0]) == ["batch-00001"]
    assert_clean(tmp_path, rerun)


# ------------------------------------------------- the README command, which ran in the background all along
def test_readme_slurm_command_runs_the_demo_as_slurm_jobs(demo_run):
    """The README's SLURM command (:func:`demo_run`), which ran beside the tests above."""
    work, proc, seconds = demo_run()
    assert proc.returncode == 0, proc.console[-4000:]
    assert (work / "demo" / "out" / "report.html").stat().st_size > 10_000
    # every stage ran as its own SLURM job, the demo's checkpoint and the heatmaps after it included
    assert submitted_rules(proc.console) == {"demo_data", "tile", "extract", "train", "predict", "heatmap",
                                             "report"}, proc.console[-3000:]
    summary = proc.stderr[proc.stderr.index("wsi: summary of"):]
    assert re.search(r"tile\s+8 done", summary) and re.search(r"heatmap\s+8 done", summary), summary
    assert "sbatch failed" not in proc.console
    assert_clean(work, proc)
    assert live_jobs(None) == [], job_states(None, LIVE)  # the whole lane, whose other tests are done, left none
    print(f"demo on SLURM: done within {seconds:.0f} s")
