"""SIGINT and SIGTERM stop a ``wsi`` command cleanly, once, within a bounded time.

Ctrl-C, Snakemake stopping a job, ``scancel`` and a SLURM time limit all arrive as SIGINT or SIGTERM. Inside
:func:`stop_on_signals` the first of them raises :class:`Stopped` in the main thread, so every ``with`` and
``finally`` on the way out runs: the Dask client and cluster close (local worker processes end, SLURM worker jobs
are cancelled), temporary results are dropped, and the command prints one line saying which signal stopped it.
Further signals are ignored meanwhile (a terminal's SIGINT and Snakemake's SIGTERM often come together), and a
timer ends the process after ``grace_s`` seconds should that clean-up (inside the block) hang, so one signal is
always enough.

:class:`Stopped` derives from ``KeyboardInterrupt``: the per-slide loops (:mod:`wsi.runner`) let it through
instead of recording it as a slide's failure.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

GRACE_S = 60.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The command received SIGINT or SIGTERM (``signum``); its exit status is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} (Ctrl-C, scancel, the job's time limit or "
                         "Snakemake stopping the job); finished results are kept and the same command resumes")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises :class:`Stopped`; later ones are ignored, and the
    process exits ``128 + signum`` at the latest ``grace_s`` seconds after the first. Main thread only."""

    timers = []

    def stop(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        timer = threading.Timer(grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
        timers.append(timer)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in SIGNALS}
    try:
        yield
    finally:  # the clean-up inside the block is over: no forced exit, and signals as before
        for timer in timers:
            timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, exited ones not yet reaped included (Linux ``/proc``; elsewhere none)."""
    kids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return kids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def stop_children(grace_s: float = GRACE_S + 10, *, poll_s: float = 0.2, settle_s: float = 1.0) -> list[int]:
    """SIGTERM to this process's children, then wait until they have exited and been reaped, at most
    ``grace_s`` seconds; returns those left.

    Snakemake, interrupted, cancels its SLURM jobs but leaves its local jobs (``localrules``: extract and train
    with Dask workers on SLURM) running, and tears down while their threads still wait for them, which fails
    with "Cannot close a running event loop". The workflow's ``onerror`` calls this first: each ``wsi`` command
    closes its cluster (cancelling its worker jobs) and logs why it stopped before the run's summary reads the
    logs (one that already had the terminal's SIGINT ignores this SIGTERM), and ``settle_s`` after the last is
    reaped lets the thread that waited for it finish.
    """
    kids = _children(os.getpid())
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    waited = bool(kids)
    deadline = time.monotonic() + grace_s
    while kids and time.monotonic() < deadline:
        time.sleep(poll_s)
        kids = _children(os.getpid())
    if waited and not kids:
        time.sleep(settle_s)
    return kids
