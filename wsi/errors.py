"""The errors every stage raises; nothing else (the ``failures.csv`` they end up in is :mod:`wsi.failures`).

A :class:`WsiError` prints as one line: which file, what went wrong, what to do. Stages raise it for bad
input; the per-slide loops catch it, record one ``failures.csv`` row (slide, stage, cause) and go on with
the other slides. :func:`format_ids` is how their messages list slide ids.
"""

from __future__ import annotations

import os

SHOWN_IDS = 8  # slide ids quoted in one error message


def format_ids(ids) -> str:
    """Up to a few ids, comma-separated, then "and N more"."""
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


class WsiError(Exception):
    """A problem with one input, reported as ``<path>: <cause> (<hint>)``."""

    def __init__(self, path: str | os.PathLike | None, cause: str, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.cause = cause
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.path}: {self.cause}" if self.path else self.cause
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class SlideError(WsiError):
    """The slide file cannot be opened or read, or lacks what tiling needs (MPP, tissue)."""


class StoreError(WsiError):
    """A per-slide store is missing, incomplete, corrupt, or lacks the group a stage needs."""


class ConfigError(WsiError):
    """A configuration value, labels table or model file is wrong."""
