"""DICOM WSI files: the format's constants, the check that every file of a slide is whole, and where each
JPEG frame's bytes lie (for the direct JPEG reader, :mod:`wsi.slide.backends.jpeg`).

pydicom parses only the headers; pixels are never decoded here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError

# DICOM WSI format constants, shared with the synthetic writer (wsi_synth)
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


def check_dicom_files(folder: Path, files: list[Path]) -> list[DicomHeader]:
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


def image_type(dataset) -> list[str]:
    """ImageType as a list (pydicom gives a single value as a plain string)."""
    value = dataset.get("ImageType")
    return [value] if isinstance(value, str) else list(value or [])


def frame_ranges(path: Path, pixel_data_at: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
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
