"""Which files are slides, and what a slide's id, size and date are.

A DICOM slide (VL Whole Slide Microscopy Image) is a folder of ``.dcm`` files, one or more per level; the
folder (or any one of its files: it stands for the folder) is the slide. Its id is the folder's name, and its
size and modification time, which decide whether a store is up to date, are those of its files
(:func:`source_stat`).
"""

from __future__ import annotations

import os
from pathlib import Path

#: File endings the folder scan picks up as slides. A DICOM slide is a folder of ``.dcm`` (DICOM_SUFFIX) files.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff")
DICOM_SUFFIX = ".dcm"
_DOUBLE_SUFFIXES = (".ome.tif", ".ome.tiff")


def _visible_files(folder: Path) -> list[Path]:
    """The regular files directly in ``folder`` whose names do not start with a dot, sorted by name."""
    return sorted(c for c in folder.iterdir() if not c.name.startswith(".") and c.is_file())


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.dcm`` files directly in ``folder`` (sorted; hidden ones skipped): a DICOM slide if any."""
    return [c for c in _visible_files(Path(folder)) if c.suffix.lower() == DICOM_SUFFIX]


def is_dicom_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and bool(dicom_files(p))


def source_stat(path: str | os.PathLike) -> tuple[int, float]:
    """(size in bytes, modification time) of a slide: a file's own, or for a folder (DICOM) the sum of its
    files' sizes and the newest file's mtime, so adding, changing or removing a file changes it."""
    p = Path(path)
    if not p.is_dir():
        st = p.stat()
        return st.st_size, st.st_mtime
    stats = [c.stat() for c in _visible_files(p)]
    return sum(st.st_size for st in stats), max((st.st_mtime for st in stats), default=p.stat().st_mtime)


def slide_id_from_path(path: str | os.PathLike) -> str:
    """The file name without its extension (``a.ome.tif`` -> ``a``); a DICOM folder's own name, also for one of
    its ``.dcm`` files."""
    p = Path(path)
    if p.is_dir():
        return p.name
    if p.suffix.lower() == DICOM_SUFFIX:
        return p.resolve().parent.name
    name = p.name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def expand_slide_paths(paths) -> list[Path]:
    """The slides named by ``paths``, in order, each once.

    A file is itself, except a ``.dcm`` file, which stands for its folder. A folder holding ``.dcm`` files is
    one DICOM slide. Any other folder expands to its slide files and its DICOM subfolders, sorted by name
    (hidden entries and other subfolders are skipped; the scan does not recurse further).
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix.lower() == DICOM_SUFFIX:
            out.append(p.parent)
        elif p.is_dir() and not is_dicom_folder(p):
            out.extend(sorted(c for c in p.iterdir() if not c.name.startswith(".") and (
                (c.is_file() and c.suffix.lower() in SLIDE_SUFFIXES) or is_dicom_folder(c))))
        else:
            out.append(p)
    return list(dict.fromkeys(out))
