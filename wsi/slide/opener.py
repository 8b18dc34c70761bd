"""Open a slide file or DICOM folder: its readers (:mod:`.auto`), its MPP (:mod:`.mpp`), its id."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, SlideError
from .auto import METADATA_ORDER, READERS, open_reader, pixel_reader
from .dicom import check_dicom_files
from .mpp import file_mpp, load_mpp_overrides, resolve_mpp
from .paths import DICOM_SUFFIX, dicom_files, slide_id_from_path
from .slide import Slide

#: ``slide.backend`` values: ``auto`` chooses (:mod:`wsi.slide.auto`), a reader's name uses only it.
BACKENDS = ("auto", *READERS)


def open_slide(path: str | os.PathLike, *, backend: str = "auto", mpp_overrides: str | dict | None = None,
               default_mpp: float | None = None, mpp_range=(0.05, 20.0)) -> Slide:
    """Open ``path`` (a slide file, or a DICOM folder or one of its files) with the configured backend and
    resolve its MPP (:mod:`wsi.slide.mpp`).

    Keyword arguments are the ``slide:`` section of the config, so ``open_slide(p, **config["slide"])`` works;
    ``mpp_overrides`` may be the CSV path or an already loaded {slide_id: mpp}.
    """
    path = Path(path)
    slide_id = slide_id_from_path(path)
    if not path.exists():
        raise SlideError(path, "file does not exist")
    if backend not in BACKENDS:
        raise ConfigError(None, f"slide.backend {backend!r} is not {'|'.join(BACKENDS)}")
    entry = path  # the file the backend opens
    dicom_headers = None  # the whole-slide files of a DICOM folder
    if path.is_file() and path.suffix.lower() == DICOM_SUFFIX:  # one file of a DICOM slide: the slide is its folder
        entry, path = path, path.parent
    if path.is_dir():  # a DICOM slide: the backend opens one file and finds the rest of the series beside it
        files = dicom_files(path)
        if not files:
            raise SlideError(path, "folder holds no .dcm files, so it is not a DICOM slide",
                             "pass a slide file, or the folder of one DICOM slide")
        dicom_headers = check_dicom_files(path, files)
        entry = files[0] if entry == path else entry
    elif backend == "wsidicom":
        raise SlideError(path, "slide.backend wsidicom reads DICOM folders only",
                         "use slide.backend auto, openslide or tiffslide for this file")
    if backend == "auto":
        candidates = METADATA_ORDER["dicom" if dicom_headers is not None else "file"]
    else:
        candidates = (backend,)
    errors = []
    reader = None
    for name in candidates:
        try:
            reader = open_reader(name, entry)
            break
        except Exception as e:  # each backend has its own "unsupported"/"corrupt" exception types
            errors.append(f"{name}: {type(e).__name__}: {str(e) or 'cannot open'}")
    if reader is None:
        raise SlideError(path, "not a readable slide (" + "; ".join(errors) + ")",
                         "check the file is a complete slide in a supported format")
    try:
        overrides = mpp_overrides if isinstance(mpp_overrides, dict) else load_mpp_overrides(mpp_overrides)
        props, prefix = reader.properties, reader.name
        mpp_x, mpp_y, source = resolve_mpp(path, slide_id, file_mpp(props, prefix), overrides, default_mpp,
                                           mpp_range)
        power = props.get(f"{prefix}.objective-power")
        try:
            power = float(power) if power not in (None, "") else None
        except ValueError:
            power = None
        pixels = pixel_reader(entry, reader, dicom_headers) if backend == "auto" else reader
        return Slide(path=path, slide_id=slide_id, reader=reader, pixels=pixels, mpp_x=mpp_x, mpp_y=mpp_y,
                     mpp_source=source, vendor=props.get(f"{prefix}.vendor"), objective_power=power,
                     level_dimensions=tuple(tuple(int(v) for v in d) for d in reader.level_dimensions),
                     level_downsamples=tuple(float(d) for d in reader.level_downsamples))
    except Exception:
        reader.close()
        raise
