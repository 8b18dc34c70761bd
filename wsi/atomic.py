"""One way to write a file so that a reader never sees half of it: write a temporary sibling, then rename.

``os.replace`` within one folder is atomic on POSIX file systems (NFS and Lustre included), so a killed job
leaves either the old file or the new one, never a mix. The temporary name starts with a dot and carries the
process id, so two writers never share it and folder scans (``*.json``, ``*.csv``) never pick it up.
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with replacing(target) as tmp:
    ...     _ = tmp.write_text("whole")
    >>> target.read_text()
    'whole'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """``obj`` as JSON (``default=str`` so paths and numpy scalars print), written atomically."""
    return write_text(path, json.dumps(obj, default=str, **({"indent": 1} | dumps_kwargs)))


def write_csv(path: str | os.PathLike, header: list[str], rows) -> Path:
    """A header and rows as CSV (``\n`` line ends), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())
