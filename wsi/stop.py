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
