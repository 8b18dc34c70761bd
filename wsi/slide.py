"""Open a whole-slide image, resolve its microns per pixel, and read regions fast.

Backends
--------
``openslide`` (OpenSlide 4: SVS, NDPI, MRXS, SCN, BIF, generic and OME TIFF, DICOM) is tried first because it
knows the most vendor formats; ``tiffslide`` (pure Python over tifffile) is the fallback for TIFF-like files
OpenSlide refuses; ``wsidicom`` (imi-bigpicture's reader of the DICOM WSI standard, :class:`WsidicomReader`)
reads DICOM folders only. ``slide.backend: auto`` tries OpenSlide, then tiffslide for a file and wsidicom for
a DICOM folder; naming one uses only that one.

A DICOM slide (VL Whole Slide Microscopy Image) is a folder of ``.dcm`` files, one or more per level; pass the
folder (or any one of its files: it stands for the folder). OpenSlide is handed one ``.dcm`` file of it (the
first by name) and gathers the other files of the same series from that folder itself. Every whole-slide
``.dcm`` file of the folder must be whole before it is opened, since OpenSlide silently skips files it cannot
parse. The slide id is the folder's name, and the folder's size and modification time, which decide whether a
store is up to date, are those of its files (:func:`source_stat`).

With ``auto``, metadata (vendor, MPP, levels) comes from OpenSlide, but pixels of a pyramid of JPEG tiles are
decoded straight from the files (:class:`JpegTileReader`, ``Slide.pixel_backend == "jpeg-tiles"``: each tile's
JPEG data read with ``pread`` at its byte range and decoded by imagecodecs into the output). The byte ranges
come from the tile tags of an SVS/TIFF pyramid, or from the frames of a DICOM folder when that is safe: every
level OpenSlide reports is exactly one VOLUME instance of the series with those TotalPixelMatrixColumns/Rows,
TILED_FULL, JPEG Baseline (1.2.840.10008.1.2.4.50), 8-bit YBR_FULL_422, one optical path and one focal plane
(NumberOfFrames = tiles across x down), and each frame one fragment (the Basic Offset Table, when filled in,
must point at them). pydicom only parses the headers. A TIFF the direct reader refuses is read through
tiffslide when it sees the same pyramid; a DICOM slide it refuses (TILED_SPARSE, other transfer syntaxes,
fragmented frames, several focal planes or optical paths) through OpenSlide, unless OpenSlide cannot read or
misreads one of its levels: then through wsidicom (see :func:`_dicom_pixel_reader`). OpenSlide 4.0.1 does both
on wsidicomizer's output for an SVS with ``add_missing_levels``: the added levels are YCbCr JPEG frames tagged
RGB, which OpenSlide decodes as RGB (glass comes out pink-grey) or fails on ("Dimensional mismatch reading
JPEG"), while wsidicom decodes them as the JPEG data say.

The direct path is several times faster than OpenSlide's premultiplied-ARGB path (``bench/tiling.py`` measures
each) and gives identical pixels (tested for SVS and DICOM, at every level, across tile edges and in the padded
edge tiles) with one exception, OpenSlide's: where ``location / downsample`` is not a whole level pixel,
OpenSlide paints the level shifted by that fraction (interpolated), while the direct path and tiffslide start at
the level pixel ``int(location / downsample)``. The tiler's locations (:func:`level0_position`) are whole level
pixels at integer downsamples; at a fractional one (e.g. 15.95 for a level of 188 px from 3000) they overshoot by
less than one level-0 pixel, which OpenSlide turns into differences of 1-2 grey levels.

MPP
---
Microns per pixel come from the file (``openslide.mpp-x`` / ``tiffslide.mpp-x`` / ``wsidicom.mpp-x``), then from
the override table (``slide.mpp_overrides``: CSV ``slide_id,mpp``; it wins over the file, since labs use it to
correct wrong files), then from ``slide.default_mpp``. A value outside ``slide.mpp_range`` (e.g. 72-dpi TIFF
defaults that read as ~350 um/px) is an error naming the override table, never a silent guess.

Pyramid levels are not trusted blindly: :mod:`wsi.levels` compares a level with level 0 before the tiler
uses it.

Reading
-------
:meth:`Slide.read_region` returns RGB uint8 with transparent (unscanned) pixels painted white. The tiler reads
whole rows of tiles per call (see ``wsi.tiling``), which amortises the per-call overhead of OpenSlide over
many tiles; ``bench/tiling.py`` compares backends and the decode floor.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, SlideError

#: ``slide.backend`` values (see the module docstring).
BACKENDS = ("auto", "openslide", "tiffslide", "wsidicom")
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


@dataclass
class Slide:
    """An open slide. Level geometry comes from the backend; ``mpp_x``/``mpp_y`` are the resolved level-0 MPP."""

    path: Path
    slide_id: str
    backend: str
    handle: object
    mpp_x: float
    mpp_y: float
    mpp_source: str
    vendor: str | None
    objective_power: float | None
    level_dimensions: tuple = field(default=())
    level_downsamples: tuple = field(default=())
    pixel_backend: str = ""
    pixel_handle: object = None

    @property
    def width(self) -> int:
        return int(self.level_dimensions[0][0])

    @property
    def height(self) -> int:
        return int(self.level_dimensions[0][1])

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp_x * float(self.level_downsamples[level])

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level``, top-left at level-0 ``(x, y)``; unscanned areas white."""
        try:
            if self.pixel_backend in ("jpeg-tiles", "wsidicom"):  # both give RGB with white past the edges
                return self.pixel_handle.read_region((int(x), int(y)), level, (int(width), int(height)))
            if self.pixel_backend == "tiffslide":
                rgb = np.asarray(self.pixel_handle.read_region((int(x), int(y)), level, (int(width), int(height)),
                                                               as_array=True))
                return _over_white(rgb) if rgb.shape[2] == 4 else rgb
            rgba = np.asarray(self.pixel_handle.read_region((int(x), int(y)), level, (int(width), int(height))))
            return _over_white(rgba)
        except Exception as e:  # both backends raise their own types for damaged tiles
            raise SlideError(self.path, f"cannot read level {level} at ({x}, {y}) size {width}x{height}: "
                                        f"{type(e).__name__}: {e}", "the file may be truncated or corrupt") from e

    def close(self) -> None:
        if self.pixel_handle is not self.handle:
            self.pixel_handle.close()
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA (non-premultiplied, as both backends return it) over white, the colour of glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _open_backend(path: Path, backend: str):
    """Open with one backend and touch its metadata: tiffslide opens lazily, so a damaged file only fails here.
    wsidicom is handed the slide's folder."""
    if backend == "openslide":
        import openslide

        handle = openslide.OpenSlide(str(path))
    elif backend == "wsidicom":
        handle = WsidicomReader(path.parent if path.is_file() else path)
    else:
        import tiffslide

        handle = tiffslide.TiffSlide(str(path))
    try:
        dict(handle.properties)
        if not handle.level_dimensions or min(handle.level_dimensions[0]) <= 0:
            raise ValueError("no image levels")
    except Exception:
        handle.close()
        raise
    return handle


def _file_mpp(handle, backend: str) -> tuple[float | None, float | None]:
    props = handle.properties
    prefix = backend
    values = []
    for axis in ("x", "y"):
        v = props.get(f"{prefix}.mpp-{axis}")
        try:
            values.append(float(v) if v not in (None, "") else None)
        except ValueError:
            values.append(None)
    return values[0], values[1] if values[1] is not None else values[0]


def open_slide(path: str | os.PathLike, *, backend: str = "auto", mpp_overrides: str | dict | None = None,
               default_mpp: float | None = None, mpp_range=(0.05, 20.0)) -> Slide:
    """Open ``path`` (a slide file, or a DICOM folder) with the configured backend and resolve its MPP (see
    the module docstring).

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
        dicom_headers = _check_dicom_files(path, files)
        entry = files[0] if entry == path else entry
    elif backend == "wsidicom":
        raise SlideError(path, "slide.backend wsidicom reads DICOM folders only",
                         "use slide.backend auto, openslide or tiffslide for this file")
    if backend == "auto":
        candidates = ("openslide", "wsidicom") if dicom_headers is not None else ("openslide", "tiffslide")
    else:
        candidates = (backend,)
    errors = []
    handle = used = None
    for name in candidates:
        try:
            handle, used = _open_backend(entry, name), name
            break
        except Exception as e:  # each backend has its own "unsupported"/"corrupt" exception types
            errors.append(f"{name}: {type(e).__name__}: {str(e) or 'cannot open'}")
    if handle is None:
        raise SlideError(path, "not a readable slide (" + "; ".join(errors) + ")",
                         "check the file is a complete slide in a supported format")
    try:
        overrides = mpp_overrides if isinstance(mpp_overrides, dict) else load_mpp_overrides(mpp_overrides)
        mpp_x, mpp_y = _file_mpp(handle, used)
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
        props = handle.properties
        prefix = used
        power = props.get(f"{prefix}.objective-power")
        try:
            power = float(power) if power not in (None, "") else None
        except ValueError:
            power = None
        pixel_backend, pixel_handle = used, handle
        if backend == "auto" and used == "openslide":
            pixel_backend, pixel_handle = _fast_pixel_reader(entry, handle, dicom_headers)
        return Slide(path=path, slide_id=slide_id, backend=used, handle=handle, mpp_x=float(mpp_x),
                     mpp_y=float(mpp_y), mpp_source=source, vendor=props.get(f"{prefix}.vendor"),
                     objective_power=power,
                     level_dimensions=tuple(tuple(int(v) for v in d) for d in handle.level_dimensions),
                     level_downsamples=tuple(float(d) for d in handle.level_downsamples),
                     pixel_backend=pixel_backend, pixel_handle=pixel_handle)
    except Exception:
        handle.close()
        raise


# DICOM WSI format constants, shared with the synthetic writer (wsi.demo)
DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
DICOM_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # transfer syntax JPEG Baseline (Process 1), 8-bit lossy
DICOM_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
DICOM_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000): an item of encapsulated pixel data (offset table, fragment)
DICOM_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # ends encapsulated pixel data


@dataclass(frozen=True)
class DicomHeader:
    """A whole-slide ``.dcm`` file's header (pydicom, up to the pixel data) and where its Pixel Data starts."""

    path: Path
    dataset: object
    pixel_data_at: int


def _check_dicom_files(folder: Path, files: list[Path]) -> list[DicomHeader]:
    """Every whole-slide image file of a DICOM folder must be whole, up to its last frame; returns their headers.

    OpenSlide skips a file beside the one it opens when it cannot parse it, so a damaged level would quietly
    vanish from the pyramid (or another level become level 0). Here each ``.dcm`` header is parsed (pydicom,
    up to the pixel data) and its pixel data must end where the file ends: encapsulated frames with their
    sequence delimiter, native pixels with their full length. A sparse tiling must say where its frames go.
    Files of other SOP classes are left alone, as OpenSlide leaves them."""
    import pydicom

    headers = []
    for f in files:
        try:
            with open(f, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
                meta = getattr(ds, "file_meta", None)
                if meta is None or meta.get("MediaStorageSOPClassUID") != DICOM_WSI_SOP_CLASS:
                    continue
                if "SeriesInstanceUID" not in ds or "TotalPixelMatrixColumns" not in ds:
                    raise ValueError("the header is cut short")
                # OpenSlide 4.0.1 crashes the whole process on a sparse tiling with no frame positions
                sparse = ds.get("DimensionOrganizationType") == "TILED_SPARSE"
                if sparse and "PerFrameFunctionalGroupsSequence" not in ds:
                    raise ValueError("TILED_SPARSE without per-frame positions (PerFrameFunctionalGroupsSequence)")
                start, head = fp.tell(), fp.read(12)
                if head[:4] != DICOM_PIXEL_DATA_TAG:
                    raise ValueError("no pixel data")
                explicit = not meta.TransferSyntaxUID.is_implicit_VR
                length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
                if length == 0xFFFFFFFF:
                    fp.seek(-len(DICOM_SEQUENCE_DELIMITER), os.SEEK_END)
                    whole = fp.read() == DICOM_SEQUENCE_DELIMITER
                else:
                    whole = start + (12 if explicit else 8) + length <= os.fstat(fp.fileno()).st_size
                if not whole:
                    raise ValueError("the pixel data is cut short")
                headers.append(DicomHeader(f, ds, start))
        except Exception as e:  # pydicom raises its own types and plain ones for damaged headers
            raise SlideError(folder, f"{f.name} is not a whole DICOM file ({type(e).__name__}: {e})",
                             "the file may be truncated or corrupt; replace it, or move it out of the folder "
                             "if it is not part of the slide") from e
    return headers


def _fast_pixel_reader(path: Path, handle, dicom_headers: list[DicomHeader] | None = None) -> tuple[str, object]:
    """The fastest reader that sees OpenSlide's very pyramid: JPEG tiles decoded directly, else tiffslide
    (for DICOM: wsidicom where OpenSlide fails on or misreads a level), else OpenSlide itself. ``path`` is the
    file OpenSlide opened; ``dicom_headers`` its folder's whole-slide files when it is a DICOM slide."""
    dims = tuple(map(tuple, handle.level_dimensions))
    downsamples = tuple(float(d) for d in handle.level_downsamples)
    if dicom_headers is not None:
        try:
            return "jpeg-tiles", JpegTileReader.from_dicom(path, dicom_headers, dims, downsamples)
        # not a pyramid of whole JPEG frames that OpenSlide's levels map onto, or header values of the wrong type
        except (ValueError, TypeError, AttributeError, KeyError, OSError):
            return _dicom_pixel_reader(path.parent, handle, dims)
    if path.suffix.lower() not in (".svs", ".tif", ".tiff"):
        return "openslide", handle
    try:
        return "jpeg-tiles", JpegTileReader.from_tiff(path, dims, downsamples)
    except (ValueError, OSError):
        pass
    try:
        import tiffslide

        fast = tiffslide.TiffSlide(str(path))
        if tuple(map(tuple, fast.level_dimensions)) == dims:
            return "tiffslide", fast
        fast.close()
    except Exception:  # tiffslide cannot read this variant: OpenSlide it is
        pass
    return "openslide", handle


@dataclass(frozen=True)
class JpegTileLevel:
    """One level of a pyramid of JPEG tiles: the file, each tile's byte range in it (row by row; a count of 0
    is a tile never written, left white), the tile grid, the shared JPEG tables (TIFF ``JPEGTables``) and the
    colour space of the JPEG data (``YCBCR`` or ``RGB``). Edge tiles are full tiles, cropped on reading."""

    path: Path
    offsets: np.ndarray
    counts: np.ndarray
    tile_w: int
    tile_h: int
    width: int
    height: int
    tables: bytes | None = None
    colorspace: str = "YCBCR"

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def down(self) -> int:
        return -(-self.height // self.tile_h)


class JpegTileReader:
    """Reads regions of a pyramid of JPEG tiles at known byte ranges by decoding the needed tiles straight into
    the output with imagecodecs: the decode floor plus one copy, with no per-call conversions. Thread-safe
    (``os.pread``, no shared file position). Locations follow tiffslide: level pixel = int(level-0 / downsample),
    with the downsamples OpenSlide reports (OpenSlide agrees where that division is whole; see the module
    docstring).

    The byte ranges come from TIFF tile tags (:meth:`from_tiff`) or from DICOM frames (:meth:`from_dicom`);
    both raise ValueError for a pyramid they cannot vouch for, and the caller keeps OpenSlide."""

    def __init__(self, levels: list[JpegTileLevel], level_downsamples: tuple[float, ...]):
        if len(levels) != len(level_downsamples):
            raise ValueError(f"{len(levels)} levels but {len(level_downsamples)} downsamples")
        self.levels = list(levels)
        self.level_downsamples = tuple(level_downsamples)
        self._fds: dict[Path, int] = {}
        try:
            for level in self.levels:
                if level.path not in self._fds:
                    self._fds[level.path] = os.open(level.path, os.O_RDONLY)
        except OSError:
            self.close()
            raise

    @classmethod
    def from_tiff(cls, path: Path, level_dimensions: tuple, level_downsamples: tuple) -> JpegTileReader:
        """The pages of a tiled, JPEG-compressed TIFF (SVS, generic) whose sizes are ``level_dimensions``;
        ValueError for anything else (other codecs, strips, planar data)."""
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = {}
            for series in tif.series:
                for level in series.levels:
                    page = level.keyframe
                    pages.setdefault((page.imagewidth, page.imagelength), page)
            levels = []
            for dims in level_dimensions:
                page = pages.get(tuple(dims))
                if (page is None or page.compression != 7 or not page.is_tiled or page.samplesperpixel != 3
                        or page.planarconfig != 1 or page.photometric not in (2, 6) or page.bitspersample != 8):
                    raise ValueError(f"level {dims} is not a tiled 8-bit RGB/YCbCr JPEG page")
                levels.append(JpegTileLevel(
                    path=Path(path), offsets=np.asarray(page.dataoffsets, np.int64),
                    counts=np.asarray(page.databytecounts, np.int64), tile_w=page.tilewidth,
                    tile_h=page.tilelength, width=page.imagewidth, height=page.imagelength,
                    tables=page.jpegtables, colorspace="YCBCR" if page.photometric == 6 else "RGB"))
        return cls(levels, level_downsamples)

    @classmethod
    def from_dicom(cls, entry: Path, headers: list[DicomHeader], level_dimensions: tuple,
                   level_downsamples: tuple) -> JpegTileReader:
        """The DICOM WSI instances behind OpenSlide's levels, read frame by frame; ValueError unless it is safe.

        ``entry`` is the file OpenSlide opened, ``headers`` its folder's whole-slide files. Each level must be
        exactly one VOLUME instance of the entry's series with that TotalPixelMatrixColumns/Rows, organised
        TILED_FULL, in JPEG Baseline, 8-bit YBR_FULL_422, one optical path and one focal plane (NumberOfFrames
        = tiles across x down), each frame one fragment (see :func:`_dicom_frame_ranges`)."""
        series = next((h.dataset.SeriesInstanceUID for h in headers if h.path == entry), None)
        volumes = [h for h in headers
                   if h.dataset.SeriesInstanceUID == series and _image_type(h.dataset)[2:3] == ["VOLUME"]]
        levels = []
        for dims in level_dimensions:
            matches = [h for h in volumes if (int(h.dataset.TotalPixelMatrixColumns),
                                              int(h.dataset.TotalPixelMatrixRows)) == tuple(dims)]
            if len(matches) != 1:
                raise ValueError(f"level {dims} is {len(matches)} VOLUME instances, not one")
            h = matches[0]
            d = h.dataset
            tile_w, tile_h = int(d.get("Columns", 0)), int(d.get("Rows", 0))
            width, height = dims
            checks = {
                "transfer syntax": (d.file_meta.get("TransferSyntaxUID"), DICOM_JPEG_BASELINE),
                "dimension organisation": (d.get("DimensionOrganizationType"), "TILED_FULL"),
                "photometric interpretation": (d.get("PhotometricInterpretation"), "YBR_FULL_422"),
                "samples per pixel": (d.get("SamplesPerPixel"), 3),
                "bits allocated": (d.get("BitsAllocated"), 8),
                "optical paths": (d.get("NumberOfOpticalPaths", 1), 1),
                "focal planes": (d.get("TotalPixelMatrixFocalPlanes", 1), 1),
                "frames": (int(d.get("NumberOfFrames", 0)),
                           -(-width // tile_w) * -(-height // tile_h) if tile_w and tile_h else -1),
            }
            for what, (found, wanted) in checks.items():
                if found != wanted:
                    raise ValueError(f"{h.path.name}: {what} {found!r}, not {wanted!r}")
            offsets, counts = _dicom_frame_ranges(h.path, h.pixel_data_at, int(d.NumberOfFrames))
            levels.append(JpegTileLevel(path=h.path, offsets=offsets, counts=counts, tile_w=tile_w, tile_h=tile_h,
                                        width=width, height=height, tables=None, colorspace="YCBCR"))
        return cls(levels, level_downsamples)

    def read_region(self, location, level: int, size) -> np.ndarray:
        import imagecodecs

        info = self.levels[level]
        fd = self._fds[info.path]
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image: white, as glass
        tw, th = info.tile_w, info.tile_h
        for ty in range(max(0, y0 // th), min(info.down, (y0 + h - 1) // th + 1)):
            for tx in range(max(0, x0 // tw), min(info.across, (x0 + w - 1) // tw + 1)):
                index = ty * info.across + tx
                count = int(info.counts[index])
                if count == 0:
                    continue
                blob = os.pread(fd, count, int(info.offsets[index]))
                tile = imagecodecs.jpeg_decode(blob, tables=info.tables, colorspace=info.colorspace,
                                               outcolorspace="RGB")
                # the tile's overlap with the requested box, in tile and in output coordinates
                ox, oy = tx * tw - x0, ty * th - y0
                sx, sy = max(0, -ox), max(0, -oy)
                ex = min(tw, w - ox, info.width - tx * tw)
                ey = min(th, h - oy, info.height - ty * th)
                if ex > sx and ey > sy:
                    out[oy + sy:oy + ey, ox + sx:ox + ex] = tile[sy:ey, sx:ex, :3]
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class WsidicomReader:
    """A DICOM WSI folder read by wsidicom: metadata (``level_dimensions``, ``level_downsamples``,
    ``properties`` with ``wsidicom.mpp-x/-y`` and ``wsidicom.vendor``) and RGB regions by level-0 location,
    white past the level's edges, as :class:`JpegTileReader` reads them (level pixel = int(level-0 /
    downsample), with OpenSlide's downsamples: level 0's size over the level's, averaged over x and y).
    Thread-safe (wsidicom locks its file reads). Its first optical path and focal plane are read."""

    def __init__(self, folder: Path):
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNoResolutionError

        self._wsi = WsiDicom.open(folder)
        try:
            levels = list(self._wsi.levels.levels)
            (w0, h0) = base = (levels[0].size.width, levels[0].size.height)
            self.level_dimensions = (base,) + tuple((lv.size.width, lv.size.height) for lv in levels[1:])
            self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
            self._pyramid_index = [lv.level for lv in levels]  # wsidicom's own level numbers (log2 of the scale)
            self.properties = {"wsidicom.vendor": "dicom"}
            try:
                mpp = self._wsi.mpp
                self.properties.update({"wsidicom.mpp-x": str(mpp.width), "wsidicom.mpp-y": str(mpp.height)})
            except WsiDicomNoResolutionError:
                pass
        except Exception:
            self._wsi.close()
            raise

    def read_region(self, location, level: int, size) -> np.ndarray:
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image: white, as glass
        lw, lh = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(lw, x0 + w), min(lh, y0 + h)
        if cx1 > cx0 and cy1 > cy0:  # wsidicom refuses regions past the level's edges
            image = self._wsi.read_region((cx0, cy0), self._pyramid_index[level], (cx1 - cx0, cy1 - cy0))
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = np.asarray(image.convert("RGB"))
        return out

    def close(self) -> None:
        self._wsi.close()


def _dicom_pixel_reader(folder: Path, handle, dims: tuple) -> tuple[str, object]:
    """OpenSlide, or wsidicom where OpenSlide cannot read or misreads a level of a DICOM slide.

    Both readers read a 64-px box at the centre of every level and the box's level-0 footprint (wsidicom
    first: after an error an OpenSlide handle reads nothing more). wsidicom takes the pixels when it reads
    them all and OpenSlide fails, or when only OpenSlide's boxes differ from their footprints in mean colour
    (by more than :data:`wsi.levels.COLOUR_TOLERANCE`). Two readers that merely differ do not say which is
    wrong: wsidicom reads only the first fragment of a frame split into several, which OpenSlide
    reassembles. OpenSlide stays otherwise, and the level check (:mod:`wsi.levels`) keeps the tiler off any
    level that still disagrees with level 0."""
    import openslide

    from .levels import COLOUR_TOLERANCE

    try:
        reader = WsidicomReader(folder)
    except Exception:  # wsidicom's own error types for folders it does not understand
        return "openslide", handle

    def consistent(read) -> bool:
        for level, (w, h) in enumerate(dims):
            ds = reader.level_downsamples[level]
            bw, bh = min(w, 64), min(h, 64)
            x, y = level0_position((w - bw) // 2, ds), level0_position((h - bh) // 2, ds)
            box = read((x, y), level, (bw, bh)).reshape(-1, 3).mean(axis=0)
            footprint = read((x, y), 0, (round(bw * ds), round(bh * ds))).reshape(-1, 3).mean(axis=0)
            if np.abs(box - footprint).max() > COLOUR_TOLERANCE:
                return False
        return True

    try:
        if reader.level_dimensions != dims:
            raise ValueError("wsidicom sees other levels than OpenSlide")
        wsidicom_consistent = consistent(reader.read_region)
    except Exception:  # wsidicom cannot read this slide (its own error types, PIL's for JPEG data)
        reader.close()
        return "openslide", handle
    try:
        openslide_consistent = consistent(lambda *args: _over_white(np.asarray(handle.read_region(*args))))
    except openslide.OpenSlideError:
        return "wsidicom", reader
    if wsidicom_consistent and not openslide_consistent:
        return "wsidicom", reader
    reader.close()
    return "openslide", handle


def level0_position(level_px: int, downsample: float) -> int:
    """The level-0 coordinate that every backend maps back to ``level_px`` on a level of ``downsample``.

    Backends take level-0 locations and truncate ``location / downsample``; rounding up (by at most one level-0
    pixel, which is less than one level pixel) keeps that exact when the downsample is not an integer."""
    return int(np.ceil(level_px * downsample - 1e-6))


def _image_type(dataset) -> list[str]:
    """ImageType as a list (pydicom gives a single value as a plain string)."""
    value = dataset.get("ImageType")
    return [value] if isinstance(value, str) else list(value or [])


def _dicom_frame_ranges(path: Path, pixel_data_at: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, byte counts) of the JPEG data of each frame of a DICOM file's encapsulated Pixel Data.

    Every frame must be exactly one fragment: the items after the Basic Offset Table are walked (8-byte item
    headers) up to the sequence delimiter and must number ``n_frames``; a filled Basic Offset Table must point
    at those very items. Anything else (several fragments per frame, a table pointing elsewhere) is a
    ValueError, and OpenSlide, which reassembles fragments, reads the slide instead."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 20, pixel_data_at)
        undefined_length = head[8:12] == b"\xff\xff\xff\xff"
        if head[:4] != DICOM_PIXEL_DATA_TAG or not undefined_length or head[12:16] != DICOM_ITEM_TAG:
            raise ValueError(f"{path.name}: pixel data is not encapsulated")
        table_length = int.from_bytes(head[16:20], "little")
        table = np.frombuffer(os.pread(fd, table_length, pixel_data_at + 20), "<u4").astype(np.int64)
        first = pixel_data_at + 20 + table_length
        offsets, counts = [], []
        at = first
        while True:
            item = os.pread(fd, 8, at)
            if item == DICOM_SEQUENCE_DELIMITER:
                break
            if len(item) < 8 or item[:4] != DICOM_ITEM_TAG or len(offsets) == n_frames:
                raise ValueError(f"{path.name}: fragments are not one per frame ({n_frames} frames)")
            count = int.from_bytes(item[4:], "little")
            offsets.append(at + 8)
            counts.append(count)
            at += 8 + count
        if len(offsets) != n_frames:
            raise ValueError(f"{path.name}: {len(offsets)} fragments for {n_frames} frames")
        offsets = np.asarray(offsets, np.int64)
        if table_length and not np.array_equal(first + table + 8, offsets):
            raise ValueError(f"{path.name}: the Basic Offset Table does not point at one fragment per frame")
        return offsets, np.asarray(counts, np.int64)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ReadPlan:
    """Where to read for a target MPP: the level, its MPP, and the resampling factor to the target (>= 1)."""

    level: int
    level_mpp: float
    scale: float  # level pixels per target pixel; 1.0 means no resampling

    @property
    def effective_mpp(self) -> float:
        return self.level_mpp * self.scale


def choose_level(slide: Slide, target_mpp: float, tolerance: float = 0.05, levels=None) -> ReadPlan:
    """The coarsest level not coarser than ``target_mpp`` (within ``tolerance``), as DESIGN.md says; only
    among ``levels`` when given (the tiler leaves out levels that disagree with level 0, see
    :mod:`wsi.levels`).

    A level within the tolerance is read as is (no resampling; the effective MPP is recorded); otherwise the
    finer level is read and area-averaged down by ``scale``. A target finer than level 0 beyond the tolerance
    is an error: upsampling would invent detail.
    """
    best = None
    for level in range(slide.level_count) if levels is None else levels:
        mpp = slide.level_mpp(level)
        if mpp <= target_mpp * (1 + tolerance) and (best is None or mpp > slide.level_mpp(best)):
            best = level
    if best is None:
        raise SlideError(slide.path, f"target {target_mpp:g} um/px is finer than the slide's level 0 "
                                     f"({slide.mpp_x:g} um/px)", "choose a larger tiling.target_mpp")
    mpp = slide.level_mpp(best)
    scale = target_mpp / mpp
    if abs(scale - 1) <= tolerance:
        scale = 1.0
    return ReadPlan(level=best, level_mpp=mpp, scale=scale)
