"""Synthetic slides as files: a pyramidal, JPEG-tiled TIFF (Aperio SVS or generic) that openslide (4.x) and
tiffslide both open and decode to identical pixels, or a DICOM WSI folder that openslide opens.

The pixels come from :mod:`wsi_synth.render`, tile by tile, streamed to :class:`tifffile.TiffWriter` or into the
DICOM files (a 40,000 x 30,000 slide never holds a level in memory).

File layout and vendor quirks (openslide 4.0.1 / openslide-python 1.4, tiffslide 3.0, tifffile 2026.3, pydicom 3)
-------------------------------------------------------------------------------------------------------------------
* TIFF tiles are JPEG in YCbCr with 2x2 chroma subsampling (tifffile's default for RGB + JPEG;
  PhotometricInterpretation YCbCr, ReferenceBlackWhite written). Both backends decode them to the same bytes
  (exactly, not within a tolerance); against the rendered RGB the error is JPEG's (a few levels on average at
  quality 85).
* ``kind="aperio"``: page 0 is level 0, tiled, ImageDescription ``Aperio Image Library v12.0.0`` +
  ``|AppMag = <10/mpp>|MPP = <mpp>``. Page 1 is a stripped JPEG *thumbnail* (longest side <= 768 px), as in a real
  SVS: tifffile (hence tiffslide) always takes an SVS's second page for the thumbnail, so without it level 1
  would vanish. Pages 2+ are the lower levels, tiled, NewSubfileType 0 (tifffile stops reading SVS levels at a
  page flagged "reduced"). openslide reports vendor ``aperio``, ``openslide.mpp-x`` = MPP and
  ``openslide.objective-power`` = AppMag; tiffslide reports vendor ``aperio`` and ``tiffslide.mpp-x`` = MPP.
  With ``mpp=None`` the description has neither MPP nor AppMag and both backends report no MPP.
* ``kind="generic"``: a plain tiled TIFF, lower levels on following pages flagged NewSubfileType 1 (reduced).
  The MPP is in XResolution/YResolution with ResolutionUnit centimeter (10,000 / mpp pixels per cm; lower
  levels carry their own coarser resolution). openslide reports vendor ``generic-tiff`` and
  ``openslide.mpp-x`` from the resolution tags; tiffslide reports ``tiffslide.mpp-x`` likewise. With
  ``mpp=None`` the tags hold tifffile's default, 1 pixel per unit with ResolutionUnit NONE (no physical
  unit, as an un-calibrated scanner leaves it), and neither backend reports an MPP. Aperio files carry
  that default too; their MPP lives only in the description.
* BigTIFF is used when a level's raw size passes 2 GiB; both backends read it.
* ``kind="dicom"``: ``path`` is a *folder* (a path with a file suffix is refused) holding ``level-<i>.dcm``, one
  VL Whole Slide Microscopy Image (SOP class 1.2.840.10008.5.1.4.1.1.77.1.6) per level, all in one study,
  series and frame of reference. ImageType is ``ORIGINAL\\PRIMARY\\VOLUME\\NONE`` for level 0 and
  ``DERIVED\\PRIMARY\\VOLUME\\RESAMPLED`` below (exactly four values: openslide ignores other image types);
  DimensionOrganizationType ``TILED_FULL`` (frames row by row, Columns x Rows = the tile, edge tiles padded
  to full size); transfer syntax JPEG Baseline 1.2.840.10008.1.2.4.50, PhotometricInterpretation
  ``YBR_FULL_422`` (YCbCr, chroma halved horizontally), one fragment per frame, Basic Offset Table filled
  in (left empty, which readers also accept, when a level could pass 4 GiB).
  openslide needs PlanarConfiguration 0 even for JPEG, 8 bits, 3 samples, and takes the MPP from level 0's
  ``SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing`` (mm, row spacing first) and
  objective power from ``OpticalPathSequence[0].ObjectiveLensPower``: it reports vendor ``dicom``,
  ``openslide.mpp-x`` = MPP and ``openslide.objective-power`` = 10/MPP. It opens a slide from any one of
  its files and gathers the other files of the same SeriesInstanceUID in that folder, so a folder holding
  someone else's .dcm files is refused, and UIDs are fresh on every write. ``mpp=None`` is refused
  (PixelSpacing is mandatory). tiffslide does not read DICOM.

>>> import tempfile, openslide
>>> s = write_synthetic_slide(tempfile.mkdtemp() + "/a.svs", width=1024, height=768, tumour_tiles=1)
>>> with openslide.OpenSlide(s.path) as o:
...     o.properties["openslide.vendor"], o.properties["openslide.mpp-x"], o.level_count
('aperio', '0.5', 3)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from wsi.errors import ConfigError
from wsi.slide.dicom import (
    DICOM_ITEM_TAG,
    DICOM_JPEG_BASELINE,
    DICOM_PIXEL_DATA_TAG,
    DICOM_SEQUENCE_DELIMITER,
    DICOM_WSI_SOP_CLASS,
)
from wsi.slide.paths import DICOM_SUFFIX

from .render import (
    RENDER_MPP_WITHOUT_CALIBRATION,
    Box,
    HardCases,
    Scene,
    SiteProfile,
    SyntheticSlide,
    glass_texture,
    illumination,
    make_scene,
    render,
    render_region,
)

_DICOM_LEVEL_NAME = re.compile(r"level-\d+\.dcm")  # the files a DICOM slide folder of ours holds
KINDS = ("aperio", "generic", "dicom")
THUMBNAIL_PX = 768  # longest side of an SVS thumbnail page
APERIO_HEADER = "Aperio Image Library v12.0.0"

def _check_args(path: Path, width: int, height: int, mpp: float | None, tile: int, downsamples, jpeg_quality: int,
                kind: str) -> tuple[float, ...]:
    def bad(cause: str, hint: str | None = None):
        raise ConfigError(path, cause, hint)

    if kind not in KINDS:
        bad(f"unknown synthetic slide kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if kind == "dicom":
        if mpp is None:
            bad("a DICOM slide needs an mpp (PixelSpacing is mandatory in the WSI IOD)", "pass mpp=<um per px>")
        if path.suffix:
            bad(f"a DICOM slide is a folder; the path has a file suffix {path.suffix!r}",
                "pass a folder path without a suffix, e.g. slides/case7")
        if path.exists() and not path.is_dir():
            bad("a DICOM slide is a folder, but a file of that name exists")
        if path.is_dir():
            foreign = sorted(c.name for c in path.iterdir() if c.suffix.lower() == DICOM_SUFFIX
                             and not _DICOM_LEVEL_NAME.fullmatch(c.name))
            if foreign:
                bad(f"the folder already holds other .dcm files ({', '.join(foreign[:3])})",
                    "use an empty folder: OpenSlide reads every DICOM file beside the one it opens")
    if width < 1 or height < 1:
        bad(f"slide size must be positive, got {width} x {height}")
    if mpp is not None and not (0 < mpp < 100):
        bad(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    if tile < 16 or tile % 16:
        bad(f"tile must be a positive multiple of 16 (JPEG 2x2 subsampled blocks), got {tile}")
    if not 1 <= jpeg_quality <= 100:
        bad(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    ds = tuple(float(d) for d in downsamples)
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:])):
        bad(f"downsamples must start at 1 and increase, got {tuple(downsamples)}")
    return ds


def _level_tiles(scene: Scene, downsample: float, size: tuple[int, int], tile: int,
                 pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """The tiles of one level in TIFF order, rendered a row of tiles at a time on ``pool``."""
    w, h = size
    glass = glass_texture(scene, downsample)

    def one(col_row):
        col, row = col_row
        x0, y0, span = col * downsample, row * downsample, tile * downsample
        light = illumination(scene, glass, col, row, tile, tile, downsample)
        if not scene.touches((math.floor(x0 - downsample), math.floor(y0 - downsample),
                              math.ceil(x0 + span + downsample), math.ceil(y0 + span + downsample))):
            return np.clip(light * np.asarray(scene.cast, np.float32) + 0.5, 0, 255).astype(np.uint8)
        return render(scene, x0, y0, downsample, light)

    for row in range(0, h, tile):
        yield from pool.map(one, [(col, row) for col in range(0, w, tile)])


def write_synthetic_slide(path, *, width: int, height: int, mpp: float | None = 0.5, tile: int = 256,
                          downsamples: Sequence[float] = (1, 4, 16), jpeg_quality: int = 85, kind: str = "aperio",
                          seed: int = 0, tumour_boxes: Sequence[Box] | None = None, tumour_tiles: int = 0,
                          pen_marks: bool = False, specks: bool = False, lymphoid_aggregates: int = 0,
                          stain: tuple[float, float] = (1.0, 1.0), hard: HardCases | None = None,
                          site: SiteProfile | None = None, defects: Sequence = (),
                          write: bool = True) -> SyntheticSlide:
    """Write a pyramidal JPEG-tiled H&E-like slide to ``path``; return its ground truth.

    ``kind`` is ``aperio`` (SVS-like, MPP in the description), ``generic`` (tiled TIFF, MPP in the
    resolution tags) or ``dicom`` (``path`` is a folder of one .dcm file per level; MPP in PixelSpacing);
    ``mpp=None`` writes no MPP at all (see the module docstring for what each backend then reports; ``dicom``
    refuses it). One level per entry of ``downsamples`` (starting at 1, any increasing factors such as
    (1, 3, 9)), each ``ceil(size / downsample)`` pixels. ``tumour_boxes`` (level-0 x0, y0, x1, y1) are filled
    with tumour (a rounded box, its corners trimmed); ``tumour_tiles`` adds that many small tumour foci of
    about one 256-px tile at 0.5 um/px inside tissue. ``pen_marks`` draws blue, green, black and red marker
    arcs over glass and tissue edges; ``specks`` adds dust/debris specks and faint smudges on glass.
    ``lymphoid_aggregates`` adds that many round clusters of small, dark, packed lymphocytes (70-150 um
    radius), the classic tumour mimic: more and darker nuclei than tumour, found in normal tissue too. ``stain``
    scales the haematoxylin and eosin optical densities (1, 1 is the standard look; labs and batches vary by
    about +-30%). ``hard`` (:class:`HardCases`) adds what tissue detection gets wrong on real slides: solid
    high-grade tumour sheets (crowded, dark, blue), haemorrhage (as red as red ink), mucin (pale blue-grey),
    marker strokes across tissue, stitched scanner fields of grey glass with brightness steps beside white
    padding, and a glass colour cast. ``site`` (:class:`SiteProfile`) draws it as that site would: its stain
    vectors, its strengths (times ``stain``: a batch within the site), its scanner's cast and JPEG quality (in
    place of ``jpeg_quality``). ``defects`` (:mod:`wsi_synth.defects`, level-0 px) draws out-of-focus regions and
    stripes, folds and air bubbles (:func:`wsi_synth.defects.draw_defects` places random ones). Deterministic
    for a ``seed``. ``write=False`` only draws the scene: the returned slide's
    :meth:`~SyntheticSlide.render_level` and :meth:`~SyntheticSlide.truth_masks` work, no file is written (for
    benchmarks that need only a coarse level).
    """
    path = Path(path)
    ds = _check_args(path, width, height, mpp, tile, downsamples, jpeg_quality, kind)
    for b in tumour_boxes or ():
        if len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            raise ConfigError(path, f"tumour box {tuple(b)} is not (x0, y0, x1, y1) inside {width} x {height}")
    if len(stain) != 2 or not all(0.2 <= float(v) <= 5 for v in stain):
        raise ConfigError(path, f"stain must be two strengths (haematoxylin, eosin) in 0.2..5, got {tuple(stain)}")
    um = mpp if mpp is not None else RENDER_MPP_WITHOUT_CALIBRATION
    if site is not None:
        stain, jpeg_quality = tuple(a * b for a, b in zip(stain, site.stain)), site.jpeg_quality
    scene = make_scene(path, width, height, um, seed, [tuple(int(v) for v in b) for b in tumour_boxes or ()],
                       tumour_tiles, pen_marks, specks, lymphoid_aggregates, stain, hard)
    if site is not None:
        scene = dataclasses.replace(scene, haem_od=tuple(site.haem_od), eosin_od=tuple(site.eosin_od),
                                    cast=tuple(site.cast))
    if defects:
        scene = dataclasses.replace(scene, defects=tuple(defects))
    sizes = [(max(1, math.ceil(width / d)), max(1, math.ceil(height / d))) for d in ds]

    if write and kind == "dicom":
        _write_dicom(path, scene, ds, sizes, tile, jpeg_quality, mpp)
    elif write:
        _write_tiff(path, scene, ds, sizes, tile, jpeg_quality, mpp, kind)

    boxes = lambda objs: tuple(_clip_box(o.box(), width, height) for o in objs)  # noqa: E731
    return SyntheticSlide(path=path, width=width, height=height, mpp=mpp,
                          tumour_boxes=boxes(scene.tumours + scene.solid),
                          tissue_boxes=boxes(scene.tissue), pen_boxes=boxes(scene.strokes),
                          speck_boxes=boxes(scene.specks), lymphoid_boxes=boxes(scene.lymphoid), scene=scene)


def _write_tiff(path: Path, scene: Scene, ds: tuple[float, ...], sizes: list[tuple[int, int]], tile: int,
                jpeg_quality: int, mpp: float | None, kind: str) -> None:
    """The ``aperio`` and ``generic`` kinds: one TIFF, levels streamed tile by tile."""
    width, height = sizes[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality}, metadata=None)
    bigtiff = width * height * 3 > 2 ** 31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif, ThreadPoolExecutor(2) as pool:
        for level, (d, (w, h)) in enumerate(zip(ds, sizes)):
            page = dict(common, tile=(tile, tile), shape=(h, w, 3), dtype=np.uint8)
            if kind == "aperio":
                page["description"] = _aperio_description(width, height, (w, h), tile, jpeg_quality, mpp)
            else:
                page["subfiletype"] = 1 if level else 0
                if mpp is not None:
                    page["resolution"] = (1e4 / (mpp * width / w), 1e4 / (mpp * height / h))
                    page["resolutionunit"] = "CENTIMETER"
            tif.write(_level_tiles(scene, d, (w, h), tile, pool), **page)
            if kind == "aperio" and level == 0:
                tif.write(_thumbnail(scene), rowsperstrip=16,
                          description=_aperio_description(width, height, None, tile, jpeg_quality, mpp), **common)


def _write_dicom(path: Path, scene: Scene, ds: tuple[float, ...], sizes: list[tuple[int, int]], tile: int,
                 jpeg_quality: int, mpp: float) -> None:
    """The ``dicom`` kind: folder ``path`` with ``level-<i>.dcm`` per level, one series (see the module docstring).

    Each file's header is written by pydicom without pixel data; the encapsulated Pixel Data element follows,
    its frames JPEG-encoded as ``_level_tiles`` renders them and itemised one by one, so memory holds a row of
    tiles, not a level. The Basic Offset Table is reserved up front and filled in at the end."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import itemize_frame
    from pydicom.uid import generate_uid

    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("level-*.dcm"):  # a previous write of this folder with more levels
        if _DICOM_LEVEL_NAME.fullmatch(stale.name) and int(stale.name[6:-4]) >= len(sizes):
            stale.unlink()
    width, height = sizes[0]
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    dimension_organization = generate_uid()

    def item(**kwargs) -> Dataset:
        d = Dataset()
        for k, v in kwargs.items():
            setattr(d, k, v)
        return d

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        return item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)

    with ThreadPoolExecutor(2) as pool:
        for level, (d, (w, h)) in enumerate(zip(ds, sizes)):
            across, down = -(-w // tile), -(-h // tile)
            n_frames = across * down
            image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
                ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
            sop_instance = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = DICOM_WSI_SOP_CLASS
            meta.MediaStorageSOPInstanceUID = sop_instance
            meta.TransferSyntaxUID = DICOM_JPEG_BASELINE
            dcm = Dataset()
            dcm.file_meta = meta
            dcm.SOPClassUID, dcm.SOPInstanceUID = DICOM_WSI_SOP_CLASS, sop_instance
            # patient, study, series, frame of reference, equipment
            dcm.PatientName, dcm.PatientID, dcm.PatientBirthDate, dcm.PatientSex = "SYNTHETIC", "SYNTHETIC", "", ""
            dcm.StudyInstanceUID, dcm.StudyID, dcm.AccessionNumber = study, "1", ""
            dcm.StudyDate, dcm.StudyTime, dcm.ReferringPhysicianName = "", "", ""
            dcm.Modality, dcm.SeriesInstanceUID, dcm.SeriesNumber = "SM", series, 1
            dcm.FrameOfReferenceUID, dcm.PositionReferenceIndicator = frame_of_reference, "SLIDE_CORNER"
            dcm.Manufacturer, dcm.ManufacturerModelName = "wsi", "wsi.demo synthetic slide"
            dcm.DeviceSerialNumber, dcm.SoftwareVersions = "0", "wsi.demo"
            dcm.ContainerIdentifier, dcm.IssuerOfTheContainerIdentifierSequence = "SYNTHETIC", []
            dcm.ContainerTypeCodeSequence = [code("433466003", "SCT", "Microscope slide")]
            dcm.SpecimenDescriptionSequence = [item(SpecimenIdentifier="SYNTHETIC", SpecimenUID=generate_uid(),
                                                    IssuerOfTheSpecimenIdentifierSequence=[],
                                                    SpecimenPreparationSequence=[])]
            # image: one focal plane, one optical path (bright field), tiles in TILED_FULL order
            dcm.ImageType, dcm.InstanceNumber = image_type, level + 1
            dcm.ContentDate, dcm.ContentTime = "20260101", "000000"
            dcm.BurnedInAnnotation, dcm.SpecimenLabelInImage = "NO", "NO"
            dcm.VolumetricProperties, dcm.FocusMethod, dcm.ExtendedDepthOfField = "VOLUME", "AUTO", "NO"
            dcm.LossyImageCompression, dcm.LossyImageCompressionMethod = "01", "ISO_10918_1"
            dcm.ImagedVolumeWidth, dcm.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
            dcm.ImagedVolumeDepth = 0.001
            dcm.TotalPixelMatrixColumns, dcm.TotalPixelMatrixRows = w, h
            dcm.TotalPixelMatrixFocalPlanes, dcm.NumberOfFocalPlanes = 1, 1
            dcm.TotalPixelMatrixOriginSequence = [item(XOffsetInSlideCoordinateSystem=0.0,
                                                       YOffsetInSlideCoordinateSystem=0.0)]
            dcm.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
            dcm.DimensionOrganizationType = "TILED_FULL"
            dcm.DimensionOrganizationSequence = [item(DimensionOrganizationUID=dimension_organization)]
            dcm.NumberOfOpticalPaths = 1
            dcm.OpticalPathSequence = [item(
                OpticalPathIdentifier="1",
                IlluminationTypeCodeSequence=[code("111744", "DCM", "Brightfield illumination")],
                IlluminationColorCodeSequence=[code("414298005", "SCT", "Full Spectrum")],
                ObjectiveLensPower=round(10 / mpp))]
            dcm.AcquisitionContextSequence = []
            spacing = [mpp * height / h / 1000, mpp * width / w / 1000]  # mm: row (y), then column (x)
            dcm.SharedFunctionalGroupsSequence = [item(
                PixelMeasuresSequence=[item(PixelSpacing=spacing, SliceThickness=0.001)],
                WholeSlideMicroscopyImageFrameTypeSequence=[item(FrameType=image_type)],
                OpticalPathIdentificationSequence=[item(OpticalPathIdentifier="1")])]
            # pixels: 8-bit RGB sent as JPEG baseline in YCbCr with 4:2:2 chroma
            dcm.SamplesPerPixel, dcm.PhotometricInterpretation, dcm.PlanarConfiguration = 3, "YBR_FULL_422", 0
            dcm.Rows, dcm.Columns, dcm.NumberOfFrames = tile, tile, n_frames
            dcm.BitsAllocated, dcm.BitsStored, dcm.HighBit, dcm.PixelRepresentation = 8, 8, 7, 0
            target = path / f"level-{level}.dcm"
            dcm.save_as(target, enforce_file_format=True)
            # a 32-bit Basic Offset Table needs every frame to start below 4 GiB; otherwise leave it empty
            # (readers then index the frames by walking the items, one item per frame)
            with_bot = n_frames * (tile * tile * 3 + 4096) < 2 ** 32
            with open(target, "r+b") as f:
                f.seek(0, 2)
                f.write(DICOM_PIXEL_DATA_TAG + b"OB\x00\x00\xff\xff\xff\xff")  # OB, undefined length
                bot_at = f.tell() + 8
                f.write(DICOM_ITEM_TAG + (4 * n_frames if with_bot else 0).to_bytes(4, "little"))
                f.write(bytes(4 * n_frames if with_bot else 0))
                first = f.tell()
                offsets = []
                for rgb in _level_tiles(scene, d, (w, h), tile, pool):
                    offsets.append(f.tell() - first)
                    jpeg = imagecodecs.jpeg8_encode(rgb, level=jpeg_quality, outcolorspace="YCBCR",
                                                    subsampling="422")
                    f.writelines(itemize_frame(jpeg, 1))
                f.write(DICOM_SEQUENCE_DELIMITER)
                if with_bot:
                    f.seek(bot_at)
                    f.write(np.asarray(offsets, "<u4").tobytes())


def _clip_box(box: Box, width: int, height: int) -> Box:
    return (max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3]))


def _thumbnail(scene: Scene) -> np.ndarray:
    """The whole slide at about ``THUMBNAIL_PX`` px on its longest side (at most its own size)."""
    d = max(1.0, max(scene.width, scene.height) / THUMBNAIL_PX)
    w, h = max(1, round(scene.width / d)), max(1, round(scene.height / d))
    return render_region(scene, scene.width / w, 0, 0, w, h)


def _aperio_description(width: int, height: int, level_size: tuple[int, int] | None, tile: int, quality: int,
                        mpp: float | None) -> str:
    """The ImageDescription an Aperio scanner writes: header line, then ``|key = value`` pairs."""
    if level_size is None:
        line = f"{width}x{height} -> thumbnail"
    elif level_size == (width, height):
        line = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    else:
        line = f"{width}x{height} -> {level_size[0]}x{level_size[1]} - ({tile}x{tile}) JPEG/RGB Q={quality}"
    keys = "" if mpp is None else f"|AppMag = {round(10 / mpp)}|MPP = {mpp:g}"
    return f"{APERIO_HEADER}\r\n{line}{keys}"
