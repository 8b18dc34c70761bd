"""A slide's microns per pixel: from the file, the override table, or the configured default.

The file's value (``<backend>.mpp-x`` / ``-y`` in its reader's properties) comes first; the override table
(``slide.mpp_overrides``: CSV ``slide_id,mpp``) wins over it, since labs use it to correct wrong files; then
``slide.default_mpp``. A value outside ``slide.mpp_range`` (e.g. 72-dpi TIFF defaults that read as ~350 um/px)
is an error naming the override table, never a silent guess.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError, SlideError


def load_mpp_overrides(path: str | os.PathLike | None) -> dict[str, float]:
    """``slide_id,mpp`` CSV -> {slide_id: mpp}; a bad row is an error naming the file and row."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "MPP override table does not exist", "fix slide.mpp_overrides")
    overrides = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide_id", "mpp"} <= set(reader.fieldnames):
            raise ConfigError(path, "MPP override table needs the columns slide_id,mpp")
        for i, row in enumerate(reader, start=2):
            try:
                overrides[row["slide_id"].strip()] = float(row["mpp"])
            except (TypeError, ValueError):
                raise ConfigError(path, f"line {i}: mpp {row['mpp']!r} is not a number") from None
    return overrides


def file_mpp(properties: Mapping[str, str], prefix: str) -> tuple[float | None, float | None]:
    """(x, y) MPP as the file records it under ``<prefix>.mpp-x``/``-y``; y falls back to x."""
    values = []
    for axis in ("x", "y"):
        v = properties.get(f"{prefix}.mpp-{axis}")
        try:
            values.append(float(v) if v not in (None, "") else None)
        except ValueError:
            values.append(None)
    return values[0], values[1] if values[1] is not None else values[0]


def resolve_mpp(path: Path, slide_id: str, recorded: tuple[float | None, float | None], overrides: dict[str, float],
                default_mpp: float | None, mpp_range) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, where they came from: ``file``, ``override`` or ``default``), checked against
    ``mpp_range``; ``recorded`` is the file's (x, y) (:func:`file_mpp`)."""
    mpp_x, mpp_y = recorded
    source = "file"
    if slide_id in overrides:
        mpp_x = mpp_y = overrides[slide_id]
        source = "override"
    elif mpp_x is None:
        if default_mpp is None:
            raise SlideError(path, "the file records no microns per pixel",
                             f"add '{slide_id},<mpp>' to the table named by slide.mpp_overrides, "
                             "or set slide.default_mpp")
        mpp_x = mpp_y = float(default_mpp)
        source = "default"
    lo, hi = mpp_range
    for value in (mpp_x, mpp_y):
        if not (lo <= value <= hi):
            raise SlideError(path, f"implausible MPP {value:g} um/px from {source} (expected {lo:g}-{hi:g})",
                             f"add '{slide_id},<mpp>' to the table named by slide.mpp_overrides")
    return float(mpp_x), float(mpp_y), source
