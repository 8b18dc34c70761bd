"""The per-slide Zarr v3 store: the contract between the stages.

Every stage reads and writes slides only through this module. ``tile`` creates the store; ``extract`` adds
``features/<encoder>``; ``predict`` adds ``scores/<run>``; ``heatmap`` only reads.
The names in the table below are spelled once, in :mod:`wsi.keys`, which also derives the feature-set key.

Layout of ``<out>/stores/<slide_id>.zarr`` (schema_version 1)
==============================================================

============================  ==========================  =====================================================
path                          kind                        what
============================  ==========================  =====================================================
attrs ``schema_version``      int                         1; bumped on a breaking change
attrs ``slide_id``            str                         slide file name without extension (DICOM: folder)
attrs ``slide``               :class:`SlideAttrs`         source path/size/mtime, backend, vendor, level-0 size,
                                                          MPP and where it came from, objective power, levels
attrs ``tiling``              :class:`TilingAttrs`        target MPP, tile size, read level, footprint at
                                                          level 0, tissue parameters, codec, wsi version
attrs ``levels``              :class:`LevelCheckAttrs`    which pyramid levels were compared with level 0
                                                          (``wsi.levels``), what was found, and the levels the
                                                          mask and tiles wanted and were read from; absent in
                                                          stores written before the check
attrs ``complete``            bool                        set last by ``tile``; a store without it is absent
``coords``                    int64 (N, 2)                x, y of each tile's top-left corner at level 0
``tissue_fraction``           float32 (N,)                tissue share of each tile, from the tissue mask
``tiles``                     uint8 (N, T, T, 3)          RGB tiles at ``target_mpp``; chunked by
                                                          ``tiling.chunk_tiles`` tiles; absent when
                                                          ``tiling.store_pixels`` is false
``mask/tissue``               uint8 (h, w)                tissue mask (0/1); attrs ``downsample`` (level-0
                                                          pixels per mask pixel) and ``mpp``
``mask/thumbnail``            uint8 (h, w, 3)             RGB thumbnail on the mask's grid; same attrs
``mask/ink``                  uint8 (h, w)                marker ink found on the thumbnail (0/1), over glass or
                                                          tissue (rejected from the tissue); same attrs; absent
                                                          in stores written before wsi 0.1 kept it
``mask/fold``,                uint8 (h, w)                slide QC (:mod:`wsi.qc`): the folds and the air bubbles
``mask/bubble``                                           found on the thumbnail (0/1); same attrs; absent when
                                                          ``tiling.qc`` is ``off`` and in stores written before
                                                          QC (added without a schema bump, as all ``qc`` keys)
attrs ``qc``                  :class:`QCAttrs`            the slide's QC summary: mode, ``blur_pct``,
                                                          ``fold_pct``, ``bubble_pct`` (percent of its tissue
                                                          area), focus median and 10th percentile, reference
                                                          sharpness, tiles flagged and excluded, the bubbles'
                                                          circles, the thresholds; absent when QC did not run
``qc/focus``                  float32 (N,)                each tile's focus score: its sharpness over the
                                                          slide's sharp tissue (1 = as sharp; NaN = too little
                                                          structure to judge)
``qc/blur``, ``qc/fold``,     uint8 (N,)                  each tile's flags (0/1); with ``tiling.qc: exclude``
``qc/bubble``                                             every stored tile has 0 (flagged tiles are not stored)
``qc/excluded_coords``        int64 (M, 2)                ``tiling.qc: exclude`` only: the M tiles left out,
                                                          level-0 x, y, with ``qc/excluded_flags`` uint8 (M,)
                                                          (1 blur, 2 fold, 4 bubble), ``qc/excluded_focus``
                                                          and ``qc/excluded_tissue_fraction`` float32 (M,)
``features/<key>``            float32 (N, D)              written by extract; attrs :class:`FeatureAttrs`
                                                          and ``complete``; ``key =
                                                          encoder_key(feature_set(encoder, stain))``: the
                                                          encoder's name, plus ``+macenko`` / ``+reinhard``
                                                          for stain-normalised tiles (``extract.stain``), so
                                                          raw and normalised features live side by side
attrs ``stain`` of            dict or null                normalised features only (added in 0.1 without a
``features/<key>``                                        schema bump: older stores read as raw): ``method``,
                                                          ``reference`` (what it was fitted on), ``target``
                                                          (the reference's fit) and ``slide`` (this slide's):
                                                          Macenko ``stain_matrix`` (3 x 2, H and E optical
                                                          densities) and ``max_concentrations`` (2, 99th
                                                          percentiles); Reinhard CIE L*a*b* ``means`` and
                                                          ``stds`` (3 each); :mod:`wsi.features.stain`
``fine/coords``               int64 (M, 2)                the finer, overlapping grid of high-res heatmaps
                                                          (:mod:`wsi.features.fine_grid`): level-0 corners at
                                                          a stride of ``(1 - overlap)`` tiles; attrs ``overlap``;
                                                          only for slides extracted with ``--high-res`` (added
                                                          without a schema bump: older stores have none)
``fine/features/<key>``       float32 (M, D)              features of the fine grid's tiles; attrs
                                                          :class:`FeatureAttrs` and ``complete``
``features/<key>+augment``    float32 (K, N, D)           augmented views of the same tiles (``extract.augment:
                                                          K``; :mod:`wsi.features.augment`), chunked one view
                                                          by ``chunk_tiles`` rows; attrs as ``features/<key>``
                                                          plus ``augment`` (``views`` K and the strengths); not
                                                          a feature set of its own: MIL training draws from it
``scores/<run>/attention``    float32 (N,)                per-tile attention of the fold ensemble (sums to 1)
``scores/<run>/class_scores`` float32 (N, C)              per-tile class probabilities of the ensemble
``scores/<run>/oof_*``        as the two above            only for a slide of the run's own cohort: the same
                                                          from the fold models that held it out (one per CV
                                                          repeat; out of fold: none trained on this slide)
``scores/<run>/fine_*``       (M,) and (M, C)             the fine grid's attention and class scores, scored
                                                          as one bag (out of fold for a slide of the run's
                                                          cohort), when the store has ``fine/features/<key>``
attrs of ``scores/<run>``     :class:`ScoreAttrs` +       model run, classes, encoder, slide prediction; with
                              ``complete``                ``oof_*`` arrays also ``oof_folds`` and the out-of-
                                                          fold prediction (added in 0.1 without a schema bump:
                                                          older stores read as having none; ``oof_fold``, one
                                                          int, of stores scored before CV repeats reads as a
                                                          one-fold ``oof_folds``); ``temperature`` (the run's
                                                          calibration, applied to the probabilities; null: raw;
                                                          ``calibration_site``: the site whose own calibration
                                                          was applied instead, ``mil.calibration: site``)
                                                          and ``ood_score``/``ood`` (:mod:`wsi.mil.ood`), added
                                                          without a schema bump: older stores read as null;
                                                          ``fine_folds``/``fine_probabilities``/
                                                          ``fine_predicted``: the fine bag's (likewise)
============================  ==========================  =====================================================

Completion and atomicity
------------------------
* ``tile`` writes the whole store under a temporary sibling name, sets ``complete`` last and renames it into
  place, so a killed run never leaves a store that claims to be complete.
* ``features/<key>`` and ``scores/<run>`` are written in place, with ``complete`` set last on the array or
  group. Anything without ``complete`` is treated as absent: the next run deletes and redoes it.
* Writers that run in parallel (Dask tasks) write whole chunks only, so no two writers share a chunk: Zarr v3
  has no write locks.
* ``tiles`` chunks are encoded by :class:`TileStoreWriter` itself and written as the chunk files Zarr would
  write (the same bytes; an edge chunk padded with the fill value): Zarr 3's write path cost as much CPU as
  decoding the slide. Readers use Zarr as usual.

Tile codecs
-----------
``lossless`` stores tiles with Blosc/LZ4 (level 9): on real H&E tiles it writes about 10x faster than zstd-1 for
about 9% more bytes (2.2x against 2.4x; 1.9x against 2.4x on the generator's noisier tiles), and compressing was
as much CPU as decoding the slide. ``jpeg`` and ``jpegxl`` use :class:`TileImageCodec`, a Zarr v3
array-to-bytes codec (name ``wsi.tile_image``) that encodes each tile of a chunk as its own image, so lossy
compression never bleeds across tiles. Reading such a store needs ``import wsi.store`` (which registers it).

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> slide = SlideAttrs(source_path="a.svs", source_size=1, source_mtime=0.0, backend="openslide",
...                    vendor="aperio", width=1024, height=512, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
...                    objective_power=40.0, level_count=1, level_downsamples=(1.0,))
>>> tiling = TilingAttrs(target_mpp=0.5, tile_px=256, overlap_px=0, read_level=0, read_downsample=1.0,
...                      tile_px_level0=512.0, stride_px_level0=512.0, effective_mpp=0.5,
...                      min_tissue_fraction=0.25, store_pixels=True, codec="lossless", quality=90,
...                      chunk_tiles=2, tissue={}, wsi_version="0.1.0")
>>> w = TileStoreWriter.create(f"{d}/a.zarr", "a", slide, tiling,
...                            coords=np.array([[0, 0], [512, 0]]), tissue_fraction=np.array([1.0, 0.5]))
>>> w.write_tiles(0, np.zeros((2, 256, 256, 3), np.uint8))
>>> w.write_mask(np.ones((16, 32), bool), np.zeros((16, 32, 3), np.uint8), downsample=32.0, mpp=8.0)
>>> store = w.commit()
>>> store.n_tiles, store.tiling.tile_px, store.has_pixels
(2, 256, True)
>>> SlideStore.open(f"{d}/a.zarr").coords.tolist()
[[0, 0], [512, 0]]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, BloscShuffle

from . import atomic, keys
from .errors import StoreError
from .keys import encoder_key, feature_set
from .layout import Layout

SCHEMA_VERSION = 1
TILE_CODECS = ("lossless", "jpeg", "jpegxl")


# --------------------------------------------------------------------------------------------- attrs models
class _Attrs:
    """from_dict/to_dict for the frozen attrs dataclasses; unknown or missing keys are errors."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise ValueError(f"{cls.__name__}: missing keys {sorted(missing)}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class SlideAttrs(_Attrs):
    """What was read from the slide file (a DICOM slide: its folder, sized by its files, dated by the newest);
    ``mpp_source`` is ``file``, ``override`` or ``default``."""

    source_path: str
    source_size: int
    source_mtime: float
    backend: str
    vendor: str | None
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    mpp_source: str
    objective_power: float | None
    level_count: int
    level_downsamples: tuple

    def __post_init__(self):
        if self.mpp_source not in ("file", "override", "default"):
            raise ValueError(f"SlideAttrs.mpp_source must be file|override|default, got {self.mpp_source!r}")
        if not (self.mpp_x > 0 and self.mpp_y > 0):
            raise ValueError(f"SlideAttrs: MPP must be positive, got {self.mpp_x}, {self.mpp_y}")


@dataclass(frozen=True)
class TilingAttrs(_Attrs):
    """How the tiles were cut. Sizes are recorded three ways: requested (``target_mpp``, ``tile_px``), at the
    read level (``read_level``, ``read_downsample``) and at level 0 (``tile_px_level0``, the footprint of one
    tile, and ``stride_px_level0``, the step between neighbouring tiles)."""

    target_mpp: float
    tile_px: int
    overlap_px: int
    read_level: int
    read_downsample: float
    tile_px_level0: float
    stride_px_level0: float
    effective_mpp: float
    min_tissue_fraction: float
    store_pixels: bool
    codec: str
    quality: int
    chunk_tiles: int
    tissue: dict = field(default_factory=dict)
    wsi_version: str = ""
    qc: str = "off"  # tiling.qc (wsi.qc); stores written before QC read as "off"

    def __post_init__(self):
        if self.qc not in ("off", "flag", "exclude"):
            raise ValueError(f"TilingAttrs.qc must be off|flag|exclude, got {self.qc!r}")
        if self.codec not in TILE_CODECS:
            raise ValueError(f"TilingAttrs.codec must be one of {TILE_CODECS}, got {self.codec!r}")
        if self.tile_px <= 0 or self.chunk_tiles <= 0:
            raise ValueError("TilingAttrs: tile_px and chunk_tiles must be positive")


@dataclass(frozen=True)
class LevelCheckAttrs(_Attrs):
    """The level check (:mod:`wsi.levels`): ``pixel_backend`` is the reader whose pixels were checked
    (``jpeg-tiles``, ``openslide``, ``tiffslide``, ``wsidicom``); ``mask_level``/``tile_level`` the levels the
    mask and the tiles were read from and ``*_wanted`` those their resolutions asked for (they differ when the
    wanted level disagreed with level 0); ``checked`` one dict per compared level: ``level``, ``agrees``,
    ``cause`` (why not), ``colour_difference`` (grey levels), ``correlation`` and ``contrast_ratio`` (None
    where level 0 showed no structure); ``summary`` the line the QC image shows (empty when all agreed)."""

    pixel_backend: str
    mask_level: int
    mask_level_wanted: int
    tile_level: int
    tile_level_wanted: int
    checked: tuple = ()
    summary: str = ""

    def __post_init__(self):
        for v in self.checked:
            if not isinstance(v, dict) or not {"level", "agrees", "cause"} <= set(v):
                raise ValueError(f"LevelCheckAttrs.checked entries need level, agrees, cause; got {v!r}")

    @property
    def rejected(self) -> list[int]:
        return [v["level"] for v in self.checked if not v["agrees"]]


@dataclass(frozen=True)
class QCAttrs(_Attrs):
    """Slide quality control (:mod:`wsi.qc`): ``mode`` (``flag`` or ``exclude``); the share of the slide's tissue
    area in blurred, fold and bubble tiles (percent); the judged tiles' focus median and 10th percentile and the
    reference sharpness they are relative to (None when no tile was judged); the share of tiles judged; counts
    of tiles (before exclusion) and of flagged and excluded tiles; ``bubbles``, one (x, y, radius) in level-0 px
    per bubble found; ``thresholds``, the constants the flags used."""

    mode: str
    blur_pct: float
    fold_pct: float
    bubble_pct: float
    focus_median: float | None
    focus_p10: float | None
    judged_pct: float
    sharpness_ref: float | None
    tiles: int
    blur_tiles: int
    fold_tiles: int
    bubble_tiles: int
    excluded_tiles: int = 0
    bubbles: tuple = ()
    thresholds: dict = field(default_factory=dict)
    wsi_version: str = ""

    def __post_init__(self):
        if self.mode not in ("flag", "exclude"):
            raise ValueError(f"QCAttrs.mode must be flag|exclude, got {self.mode!r}")


@dataclass(frozen=True)
class FeatureAttrs(_Attrs):
    """Where a feature matrix came from: enough to recompute it or to refuse mixing encoders."""

    encoder: str
    dim: int
    weights_source: str
    weights_sha256: str | None
    input_size: tuple
    interpolation: str
    mean: tuple
    std: tuple
    precision: str
    wsi_version: str = ""
    stain: dict | None = None     # stain normalisation: method, reference, fitted target and slide values
    augment: dict | None = None   # augmented views only: ``views`` (K) and the strengths (wsi.features.augment)


def same_stain_target(a: dict, b: dict) -> bool:
    """Whether two fitted stain references (``FeatureAttrs.stain["target"]``) are the same, to float precision:
    extraction reuses a cohort's reference by it, and predict refuses features normalised to another."""
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


OOD_WARNING = "this slide is unlike the slides this model was trained on"  # what ScoreAttrs.ood says, to a reader


@dataclass(frozen=True)
class ScoreAttrs(_Attrs):
    """Per-tile scores of one trained model run on this slide, and the slide-level prediction."""

    run: str
    model: str
    encoder: str
    classes: tuple
    probabilities: tuple
    predicted: str
    wsi_version: str = ""
    oof_folds: tuple | None = None              # the folds (one per CV repeat) whose models held this slide out;
    oof_probabilities: tuple | None = None      # their mean slide probabilities; None: not in the run's cohort
    oof_predicted: str | None = None
    temperature: float | None = None            # the run's calibration, applied to both probabilities; None: raw
    calibration_site: str | None = None         # the site whose own calibration was applied instead (site runs)
    ood_score: float | None = None              # out-of-distribution score against the run's training slides
    ood: bool | None = None                     # ood_score above 1: unlike the slides the model was trained on
    fine_folds: tuple | None = None             # the fine grid's bag (fine/): the folds that scored it (None: the
    fine_probabilities: tuple | None = None     # ensemble), its slide probabilities (None: an empty grid) and call;
    fine_predicted: str | None = None           # all None without a fine grid

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Stores scored before CV repeats name one fold (``oof_fold``): read as a one-fold ``oof_folds``."""
        if "oof_fold" in data:
            data = {**data, "oof_folds": None if data["oof_fold"] is None else [data["oof_fold"]]}
            del data["oof_fold"]
        return super().from_dict(data)


# ------------------------------------------------------------------------------------------ tile codec
@dataclass(frozen=True)
class TileImageCodec(ArrayBytesCodec):
    """Zarr v3 array-to-bytes codec: each (T, T, 3) tile of a (k, T, T, 3) uint8 chunk becomes one JPEG or
    JPEG-XL image. Chunk bytes: uint32 k, k uint32 lengths, then the k images."""

    is_fixed_size = False
    format: str = "jpeg"
    quality: int = 90

    @classmethod
    def from_dict(cls, data):
        config = data.get("configuration", {})
        return cls(format=config.get("format", "jpeg"), quality=int(config.get("quality", 90)))

    def to_dict(self):
        return {"name": "wsi.tile_image", "configuration": {"format": self.format, "quality": self.quality}}

    def _encode_one(self, tile: np.ndarray) -> bytes:
        import imagecodecs

        if self.format == "jpeg":
            return imagecodecs.jpeg_encode(np.ascontiguousarray(tile), level=self.quality)
        return imagecodecs.jpegxl_encode(np.ascontiguousarray(tile), level=self.quality)

    def _decode_one(self, data: bytes) -> np.ndarray:
        import imagecodecs

        if self.format == "jpeg":
            return imagecodecs.jpeg_decode(data)
        return imagecodecs.jpegxl_decode(data)

    def _encode_chunk(self, tiles: np.ndarray) -> np.ndarray:
        blobs = [self._encode_one(t) for t in tiles]
        header = struct.pack(f"<I{len(blobs)}I", len(blobs), *[len(b) for b in blobs])
        return np.frombuffer(header + b"".join(blobs), dtype=np.uint8)

    def _decode_chunk(self, raw: bytes, shape) -> np.ndarray:
        (k,) = struct.unpack_from("<I", raw, 0)
        lengths = struct.unpack_from(f"<{k}I", raw, 4)
        offset = 4 + 4 * k
        out = np.empty(shape, dtype=np.uint8)
        for i, n in enumerate(lengths):
            out[i] = self._decode_one(raw[offset:offset + n]).reshape(shape[1:])
            offset += n
        return out

    # Zarr runs codecs in its event loop; the image codecs release the GIL, so run them in threads (as Zarr's
    # own codecs do) and chunks of one read decode in parallel instead of one tile at a time.
    async def _encode_single(self, chunk_array, chunk_spec):
        payload = await asyncio.to_thread(self._encode_chunk, chunk_array.as_numpy_array())
        return chunk_spec.prototype.buffer.from_array_like(payload)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        out = await asyncio.to_thread(self._decode_chunk, chunk_bytes.to_bytes(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)

    def compute_encoded_size(self, input_byte_length, chunk_spec):
        raise NotImplementedError("variable-size codec")


zarr.registry.register_codec("wsi.tile_image", TileImageCodec)


_LOSSLESS = {"cname": "lz4", "clevel": 9}  # Blosc, no shuffle: on uint8 bytes shuffling does nothing


def _lossless() -> BloscCodec:
    return BloscCodec(**_LOSSLESS, shuffle=BloscShuffle.noshuffle)


def _lossless_numcodecs():
    """:func:`_lossless` as numcodecs' Blosc, which writes the same frame without Zarr's pipeline around it."""
    import numcodecs

    return numcodecs.Blosc(**_LOSSLESS, shuffle=numcodecs.Blosc.NOSHUFFLE)


def store_path(out_dir, slide_id: str) -> Path:
    """``OUT/stores/<slide_id>.zarr`` (:meth:`wsi.layout.Layout.store`)."""
    return Layout(out_dir).store(slide_id)


def _read_attrs(node, key: str, model, path):
    try:
        return model.from_dict(dict(node.attrs[key]))
    except (KeyError, ValueError, TypeError) as e:
        raise StoreError(path, f"store attrs '{key}' are missing or invalid: {e}",
                         "re-run `wsi tile` for this slide") from e


# ------------------------------------------------------------------------------------------ reading
class SlideStore:
    """A complete per-slide store, opened for reading and for adding features and scores."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.slide_id: str = group.attrs[keys.SLIDE_ID]
        self.slide = _read_attrs(group, keys.SLIDE, SlideAttrs, path)
        self.tiling = _read_attrs(group, keys.TILING, TilingAttrs, path)
        self.levels = _read_attrs(group, keys.LEVELS, LevelCheckAttrs, path) if keys.LEVELS in group.attrs else None
        self.qc = _read_attrs(group, keys.QC, QCAttrs, path) if keys.QC in group.attrs else None

    @classmethod
    def open(cls, path: str | os.PathLike) -> SlideStore:
        """Open a store that ``tile`` completed; anything else is a :class:`StoreError` naming the path."""
        path = Path(path)
        if not path.exists():
            raise StoreError(path, "store does not exist", "run `wsi tile` for this slide first")
        try:
            group = zarr.open_group(str(path), mode="r+")
        except Exception as e:  # zarr raises several types for damaged metadata
            raise StoreError(path, f"not a readable Zarr store ({type(e).__name__}: {e})",
                             "delete it and re-run `wsi tile`") from e
        if group.attrs.get(keys.SCHEMA_VERSION) != SCHEMA_VERSION:
            raise StoreError(path, f"store schema_version is {group.attrs.get(keys.SCHEMA_VERSION)!r}, "
                                   f"this wsi reads {SCHEMA_VERSION}", "re-run `wsi tile`")
        if group.attrs.get(keys.COMPLETE) is not True:
            raise StoreError(path, "store is incomplete (tiling did not finish)", "re-run `wsi tile`")
        return cls(path, group)

    # -- tiles
    @property
    def n_tiles(self) -> int:
        return int(self.group[keys.COORDS].shape[0])

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self.group[keys.COORDS][:], dtype=np.int64).reshape(-1, 2)

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self.group[keys.TISSUE_FRACTION][:], dtype=np.float32)

    @property
    def has_pixels(self) -> bool:
        return keys.TILES in self.group

    def read_tiles(self, lo: int, hi: int) -> np.ndarray:
        """Tiles ``lo:hi`` as uint8 (n, T, T, 3); the store must hold pixels (see ``has_pixels``)."""
        if not self.has_pixels:
            raise StoreError(self.path, "store is coordinates-only (tiling.store_pixels=false)",
                             "read the tiles from the slide with wsi.tiling.read_tiles")
        try:
            return np.asarray(self.group[keys.TILES][lo:hi])
        except Exception as e:
            raise StoreError(self.path, f"tiles {lo}:{hi} cannot be decoded ({type(e).__name__}: {e})",
                             "delete the store and re-run `wsi tile`") from e

    def mask(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(tissue mask bool (h, w), thumbnail RGB (h, w, 3), downsample = level-0 px per mask px)."""
        m = self.group[keys.mask_path(keys.MASK_TISSUE)]
        return np.asarray(m[:]).astype(bool), np.asarray(self.group[keys.mask_path(keys.MASK_THUMBNAIL)][:]), float(
            m.attrs["downsample"])

    def qc_flags(self) -> dict[str, np.ndarray] | None:
        """Per stored tile: ``focus`` (float32, NaN = not judged) and ``blur``, ``fold``, ``bubble`` (bool), or
        None when QC did not run on this store."""
        if self.qc is None or keys.QC not in self.group:
            return None
        g = self.group[keys.QC]
        out = {keys.QC_FOCUS: np.asarray(g[keys.QC_FOCUS][:], np.float32)}
        out.update({k: np.asarray(g[k][:]).astype(bool) for k in keys.QC_FLAGS})
        return out

    def qc_excluded(self) -> tuple[np.ndarray, np.ndarray]:
        """The tiles ``tiling.qc: exclude`` left out: level-0 (x, y) int64 (M, 2) and their flag bits uint8 (M,)
        (1 blur, 2 fold, 4 bubble); M = 0 in flag mode or without QC."""
        coords = keys.qc_path(keys.QC_EXCLUDED + "coords")
        if coords not in self.group:
            return np.zeros((0, 2), np.int64), np.zeros(0, np.uint8)
        return (np.asarray(self.group[coords][:], np.int64).reshape(-1, 2),
                np.asarray(self.group[keys.qc_path(keys.QC_EXCLUDED + "flags")][:], np.uint8))

    def qc_masks(self) -> dict[str, np.ndarray]:
        """The fold and bubble masks QC found on the thumbnail (bool, the tissue mask's grid); empty without QC."""
        return {k: np.asarray(self.group[keys.mask_path(k)][:]).astype(bool) for k in keys.MASK_QC
                if keys.mask_path(k) in self.group}

    def ink_mask(self) -> np.ndarray | None:
        """The marker ink found on the thumbnail (bool, on the tissue mask's grid), or None in older stores."""
        ink = keys.mask_path(keys.MASK_INK)
        return np.asarray(self.group[ink][:]).astype(bool) if ink in self.group else None

    # -- features
    def features_array_path(self, encoder: str) -> str:
        return keys.features_path(encoder)

    def has_features(self, encoder: str) -> bool:
        name = self.features_array_path(encoder)
        return name in self.group and self.group[name].attrs.get(keys.COMPLETE) is True

    def feature_encoders(self) -> list[str]:
        if keys.FEATURES not in self.group:
            return []
        return sorted(feature_set(a.attrs["encoder"], (a.attrs.get("stain") or {}).get("method"))
                      for _, a in self.group[keys.FEATURES].arrays()
                      if a.attrs.get(keys.COMPLETE) is True and not a.attrs.get("augment"))  # views: not a set

    def create_features(self, encoder: str, dim: int, chunk_tiles: int, views: int | None = None) -> zarr.Array:
        """A fresh, incomplete ``features/<key>`` array (NaN-filled, so a chunk never written reads as NaN),
        (N, D), or (views, N, D) for augmented views. An incomplete one from a killed run is replaced; a complete
        one is never overwritten."""
        if self.has_features(encoder):
            raise StoreError(self.path, f"features for {encoder} are already complete",
                             "delete them first to recompute")
        features = self.group.require_group(keys.FEATURES)
        key = encoder_key(encoder)
        if key in features:
            shutil.rmtree(self.path / keys.FEATURES / key)
        shape, chunks = (self.n_tiles, dim), (max(1, chunk_tiles), dim)
        if views is not None:
            shape, chunks = (views, *shape), (1, *chunks)
        return features.create_array(key, shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                                     compressors=[_lossless()])

    def features_writer(self, encoder: str) -> zarr.Array:
        """The incomplete ``features/<key>`` array for a task to write its chunk-aligned rows into."""
        return zarr.open_array(str(self.path / keys.features_path(encoder)), mode="r+")

    def complete_features(self, encoder: str, attrs: FeatureAttrs) -> None:
        """Check every row is written and finite, then mark the features complete."""
        arr = self.features_writer(encoder)
        data = np.asarray(arr[:])
        bad = ~np.isfinite(data).all(axis=-1)
        if bad.ndim == 2:  # augmented views: a tile is bad when any of its views is
            bad = bad.any(axis=0)
        if bad.any():
            raise StoreError(self.path, f"features for {encoder} have {int(bad.sum())} unwritten or "
                                        f"non-finite rows (first tile index {int(np.flatnonzero(bad)[0])})")
        arr.attrs.update({**attrs.to_dict(), keys.COMPLETE: True})

    def features(self, encoder: str, view: int | None = None) -> np.ndarray:
        """The complete ``features/<key>`` array; of an augmented views array, ``view`` alone (0-based)."""
        if not self.has_features(encoder):
            raise StoreError(self.path, f"no complete features for encoder {encoder}",
                             f"run `wsi extract --encoder {encoder}`")
        array = self.group[self.features_array_path(encoder)]
        return np.asarray(array[:] if view is None else array[view], dtype=np.float32)

    def feature_attrs(self, encoder: str) -> FeatureAttrs:
        attrs = dict(self.group[self.features_array_path(encoder)].attrs)
        attrs.pop(keys.COMPLETE, None)
        return FeatureAttrs.from_dict(attrs)

    # -- the fine grid of high-res heatmaps
    def has_fine_features(self, encoder: str) -> bool:
        name = keys.fine_features_path(encoder)
        return name in self.group and self.group[name].attrs.get(keys.COMPLETE) is True

    def fine_coords(self) -> np.ndarray:
        return np.asarray(self.group[keys.fine_coords_path()][:], dtype=np.int64).reshape(-1, 2)

    def write_fine_features(self, encoder: str, coords: np.ndarray, overlap: float, features: np.ndarray,
                            attrs: FeatureAttrs) -> None:
        """Write (or replace) the fine grid at ``overlap`` and its ``encoder`` features, ``complete`` last; a grid
        of another overlap is replaced with every feature set on it."""
        fine = self.group.require_group(keys.FINE)
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        if keys.COORDS in fine and (fine[keys.COORDS].attrs.get("overlap") != overlap
                                    or not np.array_equal(self.fine_coords(), coords)):
            shutil.rmtree(self.path / keys.FINE)
            fine = self.group.require_group(keys.FINE)
        if keys.COORDS not in fine:
            arr = fine.create_array(keys.COORDS, shape=coords.shape, chunks=(max(1, len(coords)), 2), dtype="int64",
                                    compressors=[_lossless()])
            arr[:] = coords
            arr.attrs["overlap"] = overlap
        name = keys.fine_features_path(encoder)
        if name in self.group:
            shutil.rmtree(self.path / name)
        features = np.asarray(features, np.float32).reshape(len(coords), -1)
        arr = self.group.require_group(f"{keys.FINE}/{keys.FEATURES}").create_array(
            encoder_key(encoder), shape=features.shape, chunks=(max(1, len(coords)), features.shape[1]),
            dtype="float32", compressors=[_lossless()])
        arr[:] = features
        arr.attrs.update({**attrs.to_dict(), keys.COMPLETE: True})

    def fine_features(self, encoder: str) -> tuple[np.ndarray, FeatureAttrs]:
        """(features (M, D), their attrs) of the fine grid."""
        if not self.has_fine_features(encoder):
            raise StoreError(self.path, f"no complete fine-grid features for encoder {encoder}",
                             f"run `wsi extract --high-res {self.slide_id}`")
        arr = self.group[keys.fine_features_path(encoder)]
        attrs = dict(arr.attrs)
        attrs.pop(keys.COMPLETE, None)
        return np.asarray(arr[:], dtype=np.float32), FeatureAttrs.from_dict(attrs)

    # -- scores
    def has_scores(self, run: str) -> bool:
        name = keys.scores_path(run)
        return name in self.group and self.group[name].attrs.get(keys.COMPLETE) is True

    def write_scores(self, run: str, attention: np.ndarray, class_scores: np.ndarray, attrs: ScoreAttrs, *,
                     out_of_fold: tuple[np.ndarray, np.ndarray] | None = None,
                     fine: tuple[np.ndarray, np.ndarray] | None = None):
        """Write (or replace) one run's per-tile scores, the out-of-fold ``(attention, class_scores)`` when given
        (``attrs.oof_folds`` must say whose) and the fine grid's (``attrs.fine_*`` say what they gave);
        ``complete`` is set after every array."""
        if (out_of_fold is None) != (attrs.oof_folds is None):
            raise ValueError("out-of-fold scores and ScoreAttrs.oof_folds come together")
        arrays = {keys.ATTENTION: attention, keys.CLASS_SCORES: class_scores}
        if out_of_fold is not None:
            arrays.update({keys.OUT_OF_FOLD + keys.ATTENTION: out_of_fold[0],
                           keys.OUT_OF_FOLD + keys.CLASS_SCORES: out_of_fold[1]})
        if fine is not None:
            arrays.update({keys.FINE_SCORES + keys.ATTENTION: fine[0], keys.FINE_SCORES + keys.CLASS_SCORES: fine[1]})
        n, c = self.n_tiles, len(attrs.classes)
        scores = self.group.require_group(keys.SCORES)
        if run in scores:
            shutil.rmtree(self.path / keys.scores_path(run))
        g = scores.create_group(run)
        for name, values in arrays.items():
            rows = len(fine[0]) if name.startswith(keys.FINE_SCORES) else n
            values = np.asarray(values, np.float32).reshape((rows,) if name.endswith(keys.ATTENTION) else (rows, c))
            g.create_array(name, shape=values.shape, dtype="float32", chunks=(max(1, rows),) + values.shape[1:],
                           compressors=[_lossless()])[:] = values
        g.attrs.update({**attrs.to_dict(), keys.COMPLETE: True})

    def scores(self, run: str, *, out_of_fold: bool = False, fine: bool = False
               ) -> tuple[np.ndarray, np.ndarray, ScoreAttrs]:
        """(attention (N,), class scores (N, C), attrs) of the ensemble, or with ``out_of_fold`` of the fold
        model that held this slide out (a StoreError when the slide was not in the run's cohort), or with
        ``fine`` of the fine grid's tiles (M rows; a StoreError when the slide has no fine-grid scores)."""
        if not self.has_scores(run):
            raise StoreError(self.path, f"no complete scores for model run {run}", "run `wsi predict` first")
        g = self.group[keys.scores_path(run)]
        attrs = dict(g.attrs)
        attrs.pop(keys.COMPLETE, None)
        prefix = keys.OUT_OF_FOLD if out_of_fold else keys.FINE_SCORES if fine else ""
        if out_of_fold and attrs.get("oof_folds", attrs.get("oof_fold")) is None:
            raise StoreError(self.path, f"no out-of-fold scores for model run {run}: the slide was not in its "
                                        "training cohort")
        if fine and prefix + keys.ATTENTION not in g:
            raise StoreError(self.path, f"no fine-grid scores for model run {run}",
                             f"run `wsi extract --high-res {self.slide_id}`, then `wsi predict` with the run")
        return (np.asarray(g[prefix + keys.ATTENTION][:], np.float32),
                np.asarray(g[prefix + keys.CLASS_SCORES][:], np.float32), ScoreAttrs.from_dict(attrs))


def open_cohort(out_dir) -> list[SlideStore]:
    """Every complete store under ``<out>/stores``, sorted by slide id (incomplete ones are skipped)."""
    stores, layout = [], Layout(out_dir)
    for slide_id in layout.store_ids():
        try:
            stores.append(SlideStore.open(layout.store(slide_id)))
        except StoreError:
            continue
    return stores


# ------------------------------------------------------------------------------------------ writing
class TileStoreWriter:
    """Builds a store under a temporary sibling name; :meth:`commit` marks it complete and renames it."""

    def __init__(self, final: Path, tmp: Path, group: zarr.Group, tiling: TilingAttrs):
        self.final, self.tmp, self.group, self.tiling = final, tmp, group, tiling
        if tiling.codec == "lossless":
            self._encode_chunk = _lossless_numcodecs().encode
        else:
            image = TileImageCodec(format=tiling.codec, quality=tiling.quality)
            self._encode_chunk = lambda tiles: image._encode_chunk(tiles).tobytes()

    @classmethod
    def create(cls, path, slide_id: str, slide: SlideAttrs, tiling: TilingAttrs, *,
               coords: np.ndarray, tissue_fraction: np.ndarray,
               levels: LevelCheckAttrs | None = None) -> TileStoreWriter:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.partial-*"):  # left by a killed run of this slide
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs.update({keys.SCHEMA_VERSION: SCHEMA_VERSION, keys.SLIDE_ID: slide_id, keys.SLIDE: slide.to_dict(),
                            keys.TILING: tiling.to_dict(), keys.COMPLETE: False})
        if levels is not None:
            group.attrs[keys.LEVELS] = levels.to_dict()
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        n = coords.shape[0]
        chunk = max(1, n)
        group.create_array(keys.COORDS, shape=(n, 2), chunks=(chunk, 2), dtype="int64",
                           compressors=[_lossless()])[:] = coords
        group.create_array(keys.TISSUE_FRACTION, shape=(n,), chunks=(chunk,), dtype="float32",
                           compressors=[_lossless()])[:] = np.asarray(tissue_fraction, np.float32)
        if tiling.store_pixels:
            _create_tiles(group, tiling, n)
        return cls(final, tmp, group, tiling)

    def keep_tiles(self, keep: np.ndarray) -> None:
        """Drop the tiles where ``keep`` is false (``tiling.qc: exclude``), before :meth:`commit`: ``coords``,
        ``tissue_fraction`` and ``tiles`` are rewritten with the kept tiles, in order (the tiles chunk by chunk,
        so memory stays at a chunk or two)."""
        keep = np.asarray(keep, bool)
        coords = np.asarray(self.group["coords"][:])[keep]
        fractions = np.asarray(self.group["tissue_fraction"][:])[keep]
        n = len(coords)
        for name, data in (("coords", coords), ("tissue_fraction", fractions)):
            self.group.create_array(name, shape=data.shape, chunks=(max(1, n),) + data.shape[1:], dtype=data.dtype,
                                    compressors=[_lossless()], overwrite=True)[...] = data
        if "tiles" not in self.group:
            return
        old_path = self.tmp / "tiles.dropped"
        os.replace(self.tmp / "tiles", old_path)
        old = zarr.open_array(str(old_path), mode="r")
        _create_tiles(self.group, self.tiling, n)
        chunk = self.tiling.chunk_tiles
        pending, written = [], 0
        for lo in range(0, len(keep), chunk):
            mine = keep[lo:lo + chunk]
            if mine.any():
                pending.append(np.asarray(old[lo:lo + len(mine)])[mine])
            while sum(len(p) for p in pending) >= chunk or (lo + chunk >= len(keep) and pending):
                block = np.concatenate(pending)
                self.write_tiles(written, block[:chunk])
                written += min(chunk, len(block))
                pending = [block[chunk:]] if len(block) > chunk else []
        shutil.rmtree(old_path)

    def write_qc(self, attrs: QCAttrs, flags: dict[str, np.ndarray], *, excluded: dict | None = None,
                 masks: dict[str, np.ndarray] | None = None, downsample: float = 1.0, mpp: float = 1.0) -> None:
        """Slide QC (:mod:`wsi.qc`): per stored tile ``focus`` and the ``blur``/``fold``/``bubble`` flags, the
        excluded tiles (``coords``, ``flags``, ``focus``, ``tissue_fraction``) in exclude mode, the fold and
        bubble masks on the thumbnail's grid, and the summary attrs."""
        self._require_group(keys.QC)
        n = len(flags[keys.QC_FOCUS])
        arrays = {keys.QC_FOCUS: np.asarray(flags[keys.QC_FOCUS], np.float32)}
        arrays.update({k: np.asarray(flags[k], np.uint8) for k in keys.QC_FLAGS})
        for key, data in (excluded or {}).items():
            arrays[keys.QC_EXCLUDED + key] = np.asarray(data)
        for name, data in arrays.items():
            rows = max(1, len(data) if name.startswith(keys.QC_EXCLUDED) else n)
            self._write_array(f"{keys.QC}/{name}", data, (rows,) + data.shape[1:])
        if masks:
            self._write_masks({name: np.asarray(data, np.uint8) for name, data in masks.items()},
                              downsample=downsample, mpp=mpp)
        self.group.attrs[keys.QC] = attrs.to_dict()

    def _require_group(self, name: str) -> None:
        """The group ``name`` (with no attributes) as Zarr's ``require_group`` writes it, unless it is there."""
        meta = self.tmp / name / "zarr.json"
        if not meta.exists():
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2))

    def _write_array(self, name: str, data: np.ndarray, chunks: tuple | None, attributes: dict | None = None) -> None:
        """A small array (one chunk; ``chunks`` None: the whole array) written as the files Zarr's
        ``create_array(..., compressors=[_lossless()])`` writes: its ``zarr.json`` and, unless every value is the
        fill value 0 (Zarr writes no such chunk), its one chunk's Blosc frame (tested against Zarr's own files).
        Zarr's path costs ~3 ms of CPU an array in round trips to its I/O thread; QC writes 6 to 10 a slide."""
        data = np.ascontiguousarray(data)
        chunks = tuple(data.shape if chunks is None else chunks)
        if any(c < s for c, s in zip(chunks, data.shape, strict=True)) or data.dtype.byteorder == ">":
            raise ValueError(f"_write_array writes one little-endian chunk, got {data.dtype} {data.shape} in {chunks}")
        item = data.dtype.itemsize
        meta = {"shape": list(data.shape), "data_type": data.dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0.0 if data.dtype.kind == "f" else 0,
                "codecs": [{"name": "bytes", **({"configuration": {"endian": "little"}} if item > 1 else {})},
                           {"name": "blosc", "configuration": {"typesize": item, **_LOSSLESS, "shuffle": "noshuffle",
                                                               "blocksize": 0}}],
                "attributes": attributes or {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "zarr.json").write_text(json.dumps(meta, indent=2))
        if data.size and (data != 0).any():  # NaN is not the fill value: written
            if chunks != data.shape:  # an edge chunk: padded with the fill value to the chunk's shape
                padded = np.zeros(chunks, data.dtype)
                padded[tuple(slice(0, s) for s in data.shape)] = data
                data = padded
            chunk = folder / "c" / "/".join(["0"] * data.ndim)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            chunk.write_bytes(_lossless_numcodecs().encode(data))

    def write_tiles(self, lo: int, tiles: np.ndarray) -> None:
        """Write tiles ``lo:lo+len(tiles)``: whole chunks (the slide's last may be short).

        Each chunk is encoded here and written as the chunk's file, the bytes Zarr's own write path would write
        (its codec, an edge chunk padded with the fill value to the full chunk shape; tested byte for byte):
        Zarr 3's per-chunk copies cost about as much CPU as decoding the slide, twice the encoding itself."""
        arr = self.group[keys.TILES]
        chunk, n = arr.chunks[0], arr.shape[0]
        hi = lo + len(tiles)
        if lo % chunk or not (hi % chunk == 0 or hi == n) or not lo < hi <= n:
            raise ValueError(f"write_tiles takes whole chunks of {chunk} tiles (the last may be short), "
                             f"got tiles {lo}:{hi} of {n}")
        for start in range(lo, hi, chunk):
            part = tiles[start - lo:start - lo + chunk]
            if len(part) < chunk:
                part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], np.uint8)])
            path = self.tmp / arr.path / arr.metadata.encode_chunk_key((start // chunk, 0, 0, 0))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self._encode_chunk(np.ascontiguousarray(part, np.uint8)))

    def write_mask(self, tissue: np.ndarray, thumbnail: np.ndarray, *, downsample: float, mpp: float,
                   ink: np.ndarray | None = None) -> None:
        arrays = {keys.MASK_TISSUE: np.asarray(tissue, np.uint8), keys.MASK_THUMBNAIL: np.asarray(thumbnail)}
        if ink is not None:
            arrays[keys.MASK_INK] = np.asarray(ink, np.uint8)
        self._write_masks(arrays, downsample=downsample, mpp=mpp)

    def _write_masks(self, arrays: dict[str, np.ndarray], *, downsample: float, mpp: float) -> None:
        """uint8 images under ``mask/``, one chunk each, with the downsample and MPP they are drawn at (given at
        creation: each array's zarr.json is written once)."""
        self._require_group(keys.MASK)
        for name, data in arrays.items():
            self._write_array(f"{keys.MASK}/{name}", data, None, {"downsample": float(downsample), "mpp": float(mpp)})

    def commit(self) -> SlideStore:
        """Mark complete, then move into place; an old store at the final path is replaced as a whole."""
        self.group.attrs[keys.COMPLETE] = True
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return SlideStore.open(self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _create_tiles(group: zarr.Group, tiling: TilingAttrs, n: int) -> zarr.Array:
    t = tiling.tile_px
    kwargs = ({"compressors": [_lossless()]} if tiling.codec == "lossless" else
              {"serializer": TileImageCodec(format=tiling.codec, quality=tiling.quality), "compressors": None})
    return group.create_array(keys.TILES, shape=(n, t, t, 3), chunks=(tiling.chunk_tiles, t, t, 3), dtype="uint8",
                              fill_value=0, **kwargs)


def is_complete(path) -> bool:
    """True when ``path`` is a store that ``tile`` finished (cheap: reads the root attrs only)."""
    try:
        g = zarr.open_group(str(path), mode="r")
        return g.attrs.get(keys.COMPLETE) is True and g.attrs.get(keys.SCHEMA_VERSION) == SCHEMA_VERSION
    except Exception:
        return False


def export_h5(store: SlideStore, encoder: str, path) -> Path:
    """Write ``features`` (N, D) and ``coords`` (N, 2) in the CLAM/TRIDENT layout, via tmp + rename.

    Attrs on ``coords`` follow CLAM's patch files (``patch_size`` and ``patch_level`` at level 0) and TRIDENT's
    (``patch_size_level0``, ``target_mag``), so their MIL and heatmap code read our output unchanged.
    """
    import h5py

    path = Path(path)
    feats = store.features(encoder)
    fattrs = store.feature_attrs(encoder)
    t = store.tiling
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=store.coords)
        c.attrs["patch_size"] = int(round(t.tile_px_level0))
        c.attrs["patch_level"] = 0
        c.attrs["patch_size_level0"] = int(round(t.tile_px_level0))
        c.attrs["target_mpp"] = t.target_mpp
        c.attrs["target_mag"] = round(10.0 / t.target_mpp)  # 0.5 um/px ~ 20x by the usual convention
        c.attrs["level0_width"], c.attrs["level0_height"] = store.slide.width, store.slide.height
        f.attrs["slide_id"] = store.slide_id
        f.attrs["encoder"] = encoder
        f.attrs["weights_source"] = fattrs.weights_source
    return path


def describe(store: SlideStore) -> str:
    """The summary ``wsi inspect`` prints: slide, MPP, read level, tiles, codec, what later stages added."""
    s, t = store.slide, store.tiling
    lines = [
        f"store      {store.path}",
        f"slide      {store.slide_id}  ({s.source_path})",
        f"backend    {s.backend} (vendor {s.vendor or '-'}), level 0 {s.width} x {s.height}, "
        f"{s.level_count} levels",
        f"mpp        {s.mpp_x:.4g} x {s.mpp_y:.4g} um/px (from {s.mpp_source}), "
        f"objective {s.objective_power or '-'}x",
        f"tiling     target {t.target_mpp:g} um/px (effective {t.effective_mpp:.4g}), {t.tile_px} px, "
        f"overlap {t.overlap_px}, read level {t.read_level} (downsample {t.read_downsample:.4g}), "
        f"footprint {t.tile_px_level0:.1f} px at level 0",
        f"tiles      {store.n_tiles} ({'pixels, ' + t.codec if store.has_pixels else 'coordinates only'}), "
        f"min tissue fraction {t.min_tissue_fraction:g}",
        f"levels     {_describe_levels(store.levels)}",
        f"qc         {_describe_qc(store.qc)}",
        f"features   {', '.join(store.feature_encoders()) or '-'}",
        f"scores     {', '.join(sorted(store.group[keys.SCORES].group_keys())) if keys.SCORES in store.group else '-'}",
        "complete   yes",
    ]
    return "\n".join(lines)


def _describe_levels(levels: LevelCheckAttrs | None) -> str:
    if levels is None:
        return "not checked (store written before the level check)"
    checked = ", ".join(str(v["level"]) for v in levels.checked) or "none (level 0 only)"
    return (f"mask from level {levels.mask_level}, tiles from level {levels.tile_level} "
            f"({levels.pixel_backend}); compared with level 0: {checked}"
            + (f"; {levels.summary}" if levels.summary else ""))


def _describe_qc(qc: QCAttrs | None) -> str:
    if qc is None:
        return "not run (tiling.qc: off, or a store written before QC)"
    focus = "-" if qc.focus_median is None else f"{qc.focus_median:.2f}"
    return (f"{qc.mode}: blur {qc.blur_pct:.1f}%, fold {qc.fold_pct:.1f}%, bubble {qc.bubble_pct:.1f}% of the "
            f"tissue; focus median {focus}; {qc.blur_tiles + qc.fold_tiles + qc.bubble_tiles} flags, "
            f"{qc.excluded_tiles} tiles excluded")
