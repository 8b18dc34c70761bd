"""SIGINT and SIGTERM stop a `wsi` command once, cleanly: wsi.stop in this process, and `wsi extract` whose Dask
worker processes must not outlive it (what Snakemake's SIGTERM, scancel and Ctrl-C send a workflow job)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from wsi.stop import Stopped, stop_on_signals


def test_the_first_signal_raises_stopped_and_later_ones_are_ignored_until_the_block_ends():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e:
        with stop_on_signals(grace_s=30):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the handler raises as soon as the signal arrives
    assert e.value.exit_status == 128 + signal.SIGTERM
    assert str(e.value).startswith("stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are put back


def test_a_signal_during_the_clean_up_does_not_interrupt_it():
    cleaned = []
    with pytest.raises(Stopped):
        with stop_on_signals(grace_s=30):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # e.g. Snakemake's SIGTERM after the terminal's SIGINT
                time.sleep(0.2)
                cleaned.append(True)
    assert cleaned == [True]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_extract_says_so_in_one_line_and_leaves_no_dask_worker(signum, small_slide, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "wsi.cli", "tile", str(small_slide.path), "--out", str(out),
                    "--no-progress"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "wsi.cli", "extract", "--out", str(out), "--no-progress",
                             "--encoder", "tf_efficientnet_lite0", "--checkpoint",
                             str(_lite0_weights()), "--set", "cluster.n_workers=2",
                             "--set", "cluster.dashboard_address=:0", "--log", str(tmp_path / "extract.log")],
                            env=env, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_workers(parent)) < 2:
        time.sleep(0.2)
    assert len(_workers(parent)) >= 2, "the Dask workers never started"
    children = parent.children(recursive=True)  # the workers, and the server they were forked from
    proc.send_signal(signum)
    start = time.monotonic()
    _, err = proc.communicate(timeout=90)
    seconds = time.monotonic() - start
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum
    assert err.strip().splitlines() == [f"wsi extract: error: stopped by {name} (Ctrl-C, scancel, the job's time "
                                        "limit or Snakemake stopping the job); finished results are kept and the "
                                        "same command resumes"], err
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert seconds < 30, seconds


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """The Dask worker processes under ``parent``: everything it started but multiprocessing's forkserver and
    resource tracker (the workers are forked from that server, so they are its children)."""
    helpers = ("forkserver import main", "resource_tracker import main")
    found = []
    for p in parent.children(recursive=True):
        try:
            if p.ppid() != parent.pid or not any(h in " ".join(p.cmdline()) for h in helpers):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _lite0_weights():
    from wsi.config import load_config

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    return config["extract"]["checkpoint"]
