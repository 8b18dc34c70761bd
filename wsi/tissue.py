"""Tissue mask and artefact rejection, from a low-resolution RGB thumbnail.

:func:`tissue_masks` keeps every stained tissue piece (dense dark tumour, pale stroma, fat, mucin, haemorrhage,
small biopsy fragments) and rejects glass, white scanner padding, marker ink (blue, green, black, red),
dust/debris specks and faint smudges. Sizes in :class:`TissueParams` are in microns, so the same parameters give
the same mask from a thumbnail at any resolution (within a pixel of its outline).

Steps (``rgb`` in, boolean masks out; ``mpp`` is the thumbnail's pixel size):

1. **Glass colour, locally.** White padding that a scanner writes where it imaged nothing (every channel
   >= 253) and the JPEG ringing beside it are set aside: were they taken for the glass, the real, light-grey
   scanned glass would read as faint stain wherever it touches tissue. The glass colour is the median of the
   brightest tenth of the remaining pixels, then re-estimated per field of ``glass_field_um`` (scanners stitch
   camera fields of slightly different brightness) from the pixels within a few percent of it, blended between
   field centres, and divided out, so grey, yellow or blue casts and brightness steps behave like white glass.
   A thumbnail with no near-neutral bright glass (filled with tissue) keeps its colours.
2. **Marker ink** (``pen_filter``), decided region by region, never grown into tissue. Pixels of an ink colour
   (outside H&E's purple-to-pink range) form candidate regions, one colour at a time so crossing strokes part: green
   (green the brightest channel: never in H&E), blue (blue the brightest with red at most half of it), red (blue
   barely above green; eosin's pink has blue well above green), black (dark grey, or darker than any nucleus). Each
   region of at least 5,000 um2 is then judged as a whole: green and black regions are ink; a blue region is ink
   when its mean red/blue is at most 0.42 (blue ink 0.25-0.4; the darkest pixels of dense high-grade tumour reach
   0.5-0.55, but a tumour region's mean is 0.7 and more, and its few ink-coloured pixels form only specks). A blue
   or black region is not ink where the tissue beside it is H&E-coloured and the density the region adds over it is
   H&E's (green absorbed most, blue little) and sizeable (a quarter of the tissue's and more): a fold doubles the
   tissue's density, so over dense tumour it is as dark as black ink and its red/blue as low as blue ink's, but it
   adds the tissue's own density, where ink adds its own; in such a region, the pieces of 5,000 um2 or more whose
   own excess over the tissue beside it, or over the fold's own density, is an ink's (a stroke across the fold) are
   ink; and in a blue or black region found ink beside H&E-coloured tissue, the pieces of 5,000 um2 or more left
   off the stroke's strip (a marker leaves a strip of even width along its own line: followed on where it crosses
   tissue that hides its colour), judged as regions of their own by the same rules, are not (a fold the stroke
   touches; per pixel it can be as blue as the ink over tumour). A region darker than JPEG can measure in red or
   blue keeps the colour rules' verdict. A red region is ink only where it is stroke-shaped
   (``keep_blood``): blood is as red as red ink, but a marker leaves strokes of even width, long for their width,
   while haemorrhage lies in pools. Each red region is opened by a disc half again as wide as its typical
   half-width, which keeps the parts wider than a stroke (a pool, even one a stroke touches) as blood; the removed,
   thin parts are ink where at least 3 times as long as wide. Where what lies under a stroke hides its colour (red
   ink over dark-blue tumour is a purple H&E also shows; any ink over blood turns dark), the stroke is followed on
   in optical density: ink adds its own density to what lies under it, so a pixel whose excess density over the
   tissue of its kind around it (blood against blood) points along the ink's, at 0.7 of its strength or more, is ink
   where it joins the stroke and is no wider than it. Blue, green and black are followed only over and beside blood,
   and over folds (blue ink absorbs much as haematoxylin does), and a stroke that reaches a fold also goes on across
   it along its own line at its own width (a fold hides even black ink's colour); a red stub that a crossing stroke
   cuts off goes with its stroke, and so does a stroke's rounded end just past a pool it crossed (red ink on glass is
   blood's colour: the red beyond the run-on's end, along its axis, where it reaches the glass). A marker also bleeds
   into the glass beside it and fades out there (a halo, enough to pass for faint stain): the tinted pixels joined to a
   blue, green or black stroke whose density, less as much of the ink's as they can hold, leaves glass are ink too;
   H&E's density does not point along those inks', so stain under a halo stays (a faint red is pale eosin's colour as
   much as red ink's halo's: red halos are left to the stain tests). Ink then grows by up to two pixels into pixels that
   are not H&E-coloured or pale (a stroke's blurred edge, JPEG ringing), never into stain. Where ink lies over tissue,
   only the inked pixels go.
3. **Stain.** H&E absorbs unevenly across R, G, B; glass, smudges and dust absorb evenly. A pixel is
   *stained* when its saturation ``(max - min) / max`` reaches ``saturation_min`` and its brightness (mean of
   R, G, B relative to the glass) is at most ``brightness_max``. *Faint* pixels (darker than
   ``brightness_max``, or tinted as stain tints, green the darkest, with half of ``saturation_min``) count too
   where they touch stained ones: fat shows in a thumbnail only as a faint pink net of septa around white
   vacuoles, which hole filling then closes.
4. **Clean-up.** Closing by a disc of ``close_um`` joins tissue split by thin gaps; holes smaller than
   ``min_hole_um2`` (fat vacuoles, small lumens) are filled when ``fill_holes``, and so are the fat cells a
   stroke across fat closes (holes of tissue and ink up to ``FAT_CELL_MAX_UM2``, walled more by tissue than by
   ink: the glass a stroke walls in against tissue is larger); ink is taken out again; the
   outermost pixel counts only when stained (a thumbnail pixel across the edge is part glass, and blur tints
   the glass beside it: the outline sits where the edge is half tissue); pieces smaller than
   ``min_fragment_um2`` (dust, debris, leftover ink fringes) are dropped, and returned as debris.

numpy and OpenCV only (scipy.ndimage would double a tiling job's start-up for the same operations). Distance
transforms run on the box around their mask only (a stroke or a pool is a small part of a thumbnail).

>>> import numpy as np
>>> thumb = np.full((64, 64, 3), 240, np.uint8)
>>> thumb[16:48, 16:48] = (225, 150, 190)            # a pink piece of 256 x 256 um at 8 um/px
>>> thumb[4:8, 4:60] = (40, 60, 190)                 # a blue marker stroke on the glass
>>> masks = tissue_masks(thumb, 8.0, TissueParams.default())
>>> int(masks.tissue.sum()), bool(masks.tissue[32, 32]), bool(masks.tissue[2, 2]), bool(masks.ink[6, 30])
(1024, True, False, True)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .config import load_config
from .errors import ConfigError

QC_OUTLINE_RGB = (0, 220, 0)  # tissue outline colour in QC images
QC_REJECTED_RGB = (255, 0, 255)  # outline colour of rejected ink and debris in QC images
PADDING_MIN = 253  # a pixel with every channel at least this is white padding a scanner wrote, not imaged glass
PADDING_RING_PX = 6  # JPEG rings this far into the glass beside padding; left out of the glass estimate
GLASS_FIELD_TOLERANCE = 0.06  # a field's glass pixels are within this share of the slide's glass colour
INK_MIN_UM2 = 5000.0  # a smaller ink-coloured speck is left to the fragment-size test (dust, a nucleus or two)
INK_MAX_RED_OVER_BLUE = 0.42  # blue ink regions: mean red/blue at most this (dense tumour: 0.7 and more)
STROKE_MIN_ELONGATION = 3.0  # red regions at least this long for their width are ink strokes; rounder ones blood
RED_INK_MAX_BLUE_OVER_GREEN = 0.4  # red ink and blood: (B - G) / (R - G) at most this; eosin's pink has 0.5 and more
RUN_ON_MIN = 0.7  # ink over tissue adds at least this share of the ink's density (full strokes 0.85-1; a dense
# tumour beside pale stroma reads as at most 0.56 of blue ink's, haematoxylin absorbing much as blue ink does)
FAT_CELL_MAX_UM2 = 6000.0  # a fat cell (70 um across, 3,800 um2; up to 90 um): the largest hole a stroke may close
RING_UM = 24.0  # a blue or black region's excess density is measured over the ring this wide around it,
RING_TISSUE_OD = 0.15  # over the ring's pixels of at least this summed density (tissue) where they are a quarter
STAIN_MIN_GREEN_OVER_RED = 0.9  # H&E's density: green at least this share of red (blue ink 0.67, black 1.0;
STAIN_MAX_BLUE_OVER_GREEN = 0.7  # tumour 1.2-1.9) and blue at most this share of green (black ink 0.93; H&E 0.3-0.5,
# the real Aperio slide's epidermis 0.61-0.64)
STAIN_MAX_BLUE_OVER_RED = 0.7  # and of red (black ink 0.9-1.07, over a fold 0.74-0.79; H&E 0.36-0.65),
STAIN_GREEN_DOMINANT = 1.3  # unless green is at least this times red (haematoxylin-rich epidermis: blue 1.0-1.07
# of red, green 1.6-1.8; black ink absorbs all three alike, green about red)
FOLD_MIN_EXCESS = 0.25  # a fold adds about the tissue's own density (0.45 at the test's densest core; 0.26 over a
# dense microarray core, green read too light): at least this share of it
FOLD_MAX_OD = 3.5  # median density above this in a channel (under 1/33 of the glass): JPEG's error hides its hue
STROKE_EDGE_PX = 2.0  # a stroke found in or beside a fold takes its blurred edge this far with it
OVER_FOLD_MIN_OD = 0.15  # a stroke over a fold: its pixels add at least this red density to the fold's
INK_KINDS = ("green", "blue", "black", "red")  # the order candidate colours claim a pixel in


@dataclass(frozen=True)
class TissueParams:
    """The ``tissue:`` section of the config (see ``configs/default.yaml`` for each key's meaning)."""

    mask_mpp: float
    saturation_min: float
    brightness_max: float
    pen_filter: bool
    keep_blood: bool
    glass_field_um: float
    min_fragment_um2: float
    min_hole_um2: float
    fill_holes: bool
    close_um: float

    def __post_init__(self):
        def bad(key: str, why: str):
            raise ConfigError(None, f"config key tissue.{key}: {why}, got {getattr(self, key)!r}",
                              "see configs/default.yaml")

        if not self.mask_mpp > 0:
            bad("mask_mpp", "must be a positive number of microns per pixel")
        for key in ("saturation_min", "brightness_max"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, "must be within 0..1")
        if not self.glass_field_um > 0:
            bad("glass_field_um", "must be a positive number of microns")
        for key in ("min_fragment_um2", "min_hole_um2", "close_um"):
            if not getattr(self, key) >= 0:
                bad(key, "must be 0 or more")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TissueParams:
        """From the config's ``tissue`` section; unknown or missing keys are errors."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise ConfigError(None, f"tissue section: unknown keys {unknown}, missing keys {missing}",
                              "see configs/default.yaml")
        return cls(**{n: data[n] for n in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def default(cls) -> TissueParams:
        """The ``tissue`` section of ``configs/default.yaml`` (the one place defaults live)."""
        return cls.from_dict(load_config()["tissue"])


@dataclass(frozen=True)
class TissueMasks:
    """What :func:`tissue_masks` found, each a boolean (h, w) mask on the thumbnail's grid."""

    tissue: np.ndarray  # kept tissue
    ink: np.ndarray  # marker ink (over glass or over tissue)
    debris: np.ndarray  # stain-coloured pieces dropped as too small to be tissue (dust, debris, flecks)
    glass: np.ndarray | None = None  # the glass colour ((3,) or per pixel (h, w, 3)), for slide QC (wsi.qc)

    @property
    def rejected(self) -> np.ndarray:
        return self.ink | self.debris


def tissue_masks(rgb: np.ndarray, mpp: float, params: TissueParams) -> TissueMasks:
    """Tissue, ink and debris masks of an RGB uint8 thumbnail (h, w, 3) whose pixels are ``mpp`` um wide."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_masks needs an RGB uint8 image (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if not mpp > 0:
        raise ValueError(f"tissue_masks needs the thumbnail's positive um per pixel, got {mpp!r}")
    rgb = rgb[..., :3]
    glass = _glass_colour(rgb, params.glass_field_um / mpp)
    r, g, b = (np.minimum(rgb[..., i] / glass[..., i], 1, dtype=np.float32) for i in range(3))
    hi = np.maximum(np.maximum(r, g), b)
    saturation = (hi - np.minimum(np.minimum(r, g), b)) / np.maximum(hi, 1e-6)
    brightness = (r + g + b) / 3
    # tinted the way H&E tints: green absorbed most, hue between purple (haematoxylin) and pink (eosin)
    stain_tint = (saturation >= params.saturation_min / 2) & (g <= np.minimum(r, b))
    stain_hue = stain_tint & (b - g > RED_INK_MAX_BLUE_OVER_GREEN * (r - g))
    ink = np.zeros(hi.shape, bool)
    if params.pen_filter:  # ink first, so its colour neither counts as stain nor tints the faint test
        tinted = (brightness <= params.brightness_max) | (saturation >= params.saturation_min / 2)
        ink = _ink(r, g, b, hi, saturation, stain_hue & (brightness < 0.9), tinted, mpp, params)
        saturation[ink] = 0
    stained = (brightness <= params.brightness_max) & (saturation >= params.saturation_min)
    faint = ((brightness <= params.brightness_max) | stain_tint) & ~ink  # no bridge over a stroke to a smudge
    tissue = (stained | (faint & _touching(faint, stained))) & ~ink

    radius = params.close_um / mpp
    if radius >= 0.5:
        tissue = _close(tissue, radius)
    px_area = mpp * mpp
    if params.fill_holes and params.min_hole_um2 > 0:
        tissue = _fill_small_holes(tissue, params.min_hole_um2 / px_area)
        tissue |= _cells_walled_in(tissue, ink, min(params.min_hole_um2, FAT_CELL_MAX_UM2) / px_area)
    tissue &= ~ink  # where ink lies over tissue, the inked pixels go (closing and filling put none back)
    # a thumbnail pixel across the outline is part tissue, part glass, and blur tints its neighbour faintly:
    # the outermost pixel counts only when stained, so the outline sits where the edge is half tissue
    tissue &= stained | _erode(tissue, 1, outside=1)
    kept = _drop_small(tissue, params.min_fragment_um2 / px_area)
    return TissueMasks(tissue=kept, ink=ink, debris=tissue & ~kept, glass=glass)


def qc_image(rgb: np.ndarray, tissue: np.ndarray, rejected: np.ndarray | None = None) -> np.ndarray:
    """A copy of the thumbnail with the tissue outlined in green and what was rejected (ink, debris) in
    magenta (2 px each, drawn inside each region), for a per-slide QC PNG."""
    rgb = np.asarray(rgb)[..., :3]
    out = rgb.astype(np.uint8, copy=True)
    for mask, colour in ((rejected, QC_REJECTED_RGB), (tissue, QC_OUTLINE_RGB)):
        if mask is None:
            continue
        mask = np.asarray(mask, bool)
        if rgb.shape[:2] != mask.shape:
            raise ValueError(f"qc_image: thumbnail {rgb.shape[:2]} and mask {mask.shape} differ in size")
        inner = _erode(_erode(mask, 1, outside=0), 1, outside=0)  # a disc of radius 1 is the 4-neighbour cross
        out[mask & ~inner] = colour
    return out


def glass_colour(rgb: np.ndarray, mpp: float, field_um: float) -> np.ndarray:
    """The scanned glass's colour around each pixel of a thumbnail (step 1 above; (3,) or (h, w, 3) float32)."""
    return _glass_colour(np.asarray(rgb)[..., :3], field_um / mpp)


# ----------------------------------------------------------------------------------------------- steps
def _glass_colour(rgb: np.ndarray, field_px: float) -> np.ndarray:
    """The colour of the scanned glass around each pixel, (h, w, 3) float32 (or (3,) when one colour serves).

    White padding (every channel >= ``PADDING_MIN``: never imaged) and the JPEG ringing beside it are left
    out, so grey glass beside padding is not taken for faint stain. The slide's glass colour is the median of
    its brightest tenth of imaged pixels, if that is near-neutral and bright; with no such glass (a thumbnail
    filled with tissue) the colours are left alone (white). Scanners stitch camera fields of slightly different
    brightness, so the glass is then estimated per square field of ``field_px`` pixels, as the median of its
    pixels within a few percent of the slide's glass colour; a field with too few of them (tissue, mucin, a
    smudge) takes its nearest neighbour's colour, and field colours are blended linearly between field centres.
    """
    imaged = _erode(rgb.min(axis=2) < PADDING_MIN, PADDING_RING_PX, outside=1)
    total = rgb.astype(np.uint16).sum(axis=2)
    values = total[imaged]
    if values.size < 16:
        return np.full(3, 255, np.float32)
    bright = imaged & (total >= _histogram_quantile(values, 0.9, 766))
    overall = np.array([_histogram_quantile(rgb[..., c][bright], 0.5, 256) for c in range(3)], np.float32)
    if not (overall.max() >= 0.6 * 255 and overall.min() >= 0.88 * overall.max()):
        return np.full(3, 255, np.float32)
    like_glass = imaged & cv2.inRange(rgb, overall * (1 - GLASS_FIELD_TOLERANCE),
                                      overall * (1 + GLASS_FIELD_TOLERANCE)).view(bool)
    n = max(8, int(round(field_px)))
    rows, cols = -(-rgb.shape[0] // n), -(-rgb.shape[1] // n)
    if rows == cols == 1:
        return overall
    fields = np.zeros((rows, cols, 3), np.float32)
    good = np.zeros((rows, cols), bool)
    for i in range(rows):
        for j in range(cols):
            block = (slice(i * n, (i + 1) * n), slice(j * n, (j + 1) * n))
            pixels = rgb[block][like_glass[block]]
            if len(pixels) >= max(32, 0.02 * n * n):
                fields[i, j], good[i, j] = np.median(pixels, axis=0), True
    if not good.any():
        return overall
    good_at = np.argwhere(good)
    for i, j in np.argwhere(~good):  # a few dozen fields: brute force
        fields[i, j] = fields[tuple(good_at[np.argmin(((good_at - (i, j)) ** 2).sum(axis=1))])]
    # each field's colour at its centre, linear in between (cv2 aligns pixel centres the same way)
    return cv2.resize(fields, (cols * n, rows * n), interpolation=cv2.INTER_LINEAR)[:rgb.shape[0], :rgb.shape[1]]


def _histogram_quantile(values: np.ndarray, q: float, bins: int) -> int:
    """The ``q`` quantile of non-negative integers below ``bins``, by counting (no sort)."""
    counts = np.cumsum(np.bincount(values.ravel(), minlength=bins))
    return int(np.searchsorted(counts, q * counts[-1]))


def _ink(r: np.ndarray, g: np.ndarray, b: np.ndarray, hi: np.ndarray, saturation: np.ndarray,
         stain: np.ndarray, tinted: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Marker ink, decided region by region (see the module docstring), followed into the glass it tints (of the
    ``tinted`` pixels, those that would be glass without it), then grown by up to two pixels into what is not
    ``stain`` (a thumbnail blurs a stroke's edge over a pixel, and JPEG rings around it)."""
    keep_blood = params.keep_blood
    ink_colour = (  # in INK_KINDS order
        (g >= np.maximum(r, b)) & (saturation >= 0.2),  # green: never the brightest channel in H&E
        (b >= np.maximum(r, g)) & (r <= 0.5 * b) & (saturation >= 0.3),  # blue, with little red
        (hi <= 0.25) | ((hi <= 0.4) & (saturation <= 0.2)),  # black: dark grey, or darker than any nucleus
        # red, also over tissue: blue barely above green, where pink eosin has blue well above green
        (r >= np.maximum(g, b)) & (b - g <= RED_INK_MAX_BLUE_OVER_GREEN * (r - g)) & (saturation >= 0.55),
    )
    ink = np.zeros(r.shape, bool)
    taken = np.zeros(r.shape, bool)
    candidates, decided = {}, []  # each ink colour's candidate pixels; (ink colour, its decided ink)
    # optical density, -log of the glass-relative RGB: computed on first use (blue or black regions, or ink at all)
    optical_density = functools.cache(lambda: -np.log(np.maximum(np.dstack([r, g, b]), 1 / 255)))
    folds = np.zeros(r.shape, bool)  # blue and black candidates found to be folds (doubled tissue), not ink
    for kind, pixels in zip(INK_KINDS, ink_colour):
        pixels = candidates[kind] = pixels & ~taken  # each pixel: the first ink colour it has (crossings part)
        stroke_parts = np.zeros(r.shape, bool)  # this colour's strokes found inside fold regions
        fold_parts = np.zeros(r.shape, bool)  # folds found inside this colour's ink regions
        taken |= pixels
        labels, n = _label(pixels)
        if n == 0:
            continue
        at = labels[pixels]  # the region of each candidate pixel (statistics over these only: fast)
        area = np.bincount(at, minlength=n + 1)
        big = area * mpp * mpp >= INK_MIN_UM2
        big[0] = False
        if kind == "blue":  # dense tumour's darkest pixels are as blue, but never a whole region
            red_over_blue = np.bincount(at, weights=r[pixels] / np.maximum(b[pixels], 1e-6), minlength=n + 1)
            big &= red_over_blue <= INK_MAX_RED_OVER_BLUE * area
        if kind in ("blue", "black") and big.any():  # doubled tissue (a fold) is as dark: its density is H&E's
            od = optical_density()
            regions = np.flatnonzero(big)
            candidates_any = np.logical_or.reduce(ink_colour)
            stain_like, stroke_parts, fold_parts = _stain_excess(labels, regions, candidates_any, od, mpp)
            big[regions[stain_like]] = False
            folds |= (np.isin(labels, regions[stain_like]) & ~stroke_parts) | fold_parts
        if kind == "red" and keep_blood:  # blood is as red: strokes are told from pools by their shape
            kind_ink = _red_strokes(labels, np.flatnonzero(big))
        else:  # green is never H&E's colour; blue and black were judged above
            kind_ink = big[labels]
        kind_ink = (kind_ink | stroke_parts) & ~fold_parts  # a stroke across a fold: each part goes its own way
        ink |= kind_ink
        decided.append((kind, kind_ink))
    red = candidates["red"]
    blood = red & ~ink  # red, not ink: what hides the other inks
    glass = (r + g + b) >= 2.7  # near the glass colour in every channel (glass-relative, 3 = glass)
    if ink.any():  # strokes run on where what lies under them hides their colour
        od = optical_density()
        for kind, kind_ink in decided:
            if not kind_ink.any():
                continue
            half_width = _half_width(kind_ink)
            host = ~glass & ~ink
            if kind == "red":
                if keep_blood:  # red pieces cut off by a crossing stroke
                    ink |= _red_stubs(kind_ink, half_width, red, ink)
                    host &= ~ink
            else:  # blue, green and black keep their colour over stain (blue ink and haematoxylin absorb
                # alike), not over blood or over a fold (as dark as black, as blue as blue ink): look there only
                host &= _dilate(blood, 3 * half_width) | folds
                if folds.any():  # a stroke across a fold: its line, at its width, where it joins ink both sides
                    ink |= _across_folds(kind_ink, folds)
            run_on = _run_on(kind_ink, half_width, host, blood & ~ink, od)
            ink |= run_on
            if kind == "red" and keep_blood:  # where a stroke found over blood pokes out of the pool
                ink |= _stroke_ends(run_on, half_width, red & ~ink, glass)
        for kind, kind_ink in decided:  # then the glass each ink tints (a stroke's halo); not red's: a faint red
            if kind != "red" and kind_ink.any():  # is pale eosin's colour as much as red ink's halo's
                ink |= _tinted_glass(kind_ink, tinted & ~ink, od, params)
    for _ in range(2):
        ink |= _dilate(ink, 1.5) & ~stain
    return ink


def _stain_excess(labels: np.ndarray, regions: np.ndarray, candidates: np.ndarray, od: np.ndarray,
                  mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``regions`` (labels of blue or black ink ``candidates``): whether the density it adds over
    the tissue beside it is H&E's, not an ink's; the inked parts of those that are; and the folded parts of
    those that are not.

    A fold doubles the tissue's density, so over dense tumour it is as dark as black ink and its red/blue as
    low as blue ink's; but what it adds over the tissue beside it points along that tissue's own density, where
    ink adds its own. The excess is the region's median density less the median of the ring around it
    (``RING_UM`` wide, pixels of any ink colour left out; its pixels of ``RING_TISSUE_OD`` or more, which must be
    a quarter of it: a region with glass beside it is a stroke or blot on the glass). The ring's median must be
    H&E's itself (a blot's dark core lies in its own lighter ink), and the excess at least ``FOLD_MIN_EXCESS`` of
    it (a fold about doubles the tissue). A region whose median is darker than ``FOLD_MAX_OD`` in red or blue
    keeps the colour rules' verdict: JPEG's error there hides the direction, and a channel read too light makes
    ink look like H&E. Green may be that dark (a fold over dense tumour is nearly black in green, H&E's darkest
    channel): green read too light only makes the excess look less like H&E's.
    It is H&E's when green takes the most of it (``STAIN_MIN_GREEN_OVER_RED`` of red at least: haematoxylin and
    eosin both absorb green most, blue ink red) and blue little (``STAIN_MAX_BLUE_OVER_GREEN`` of green and
    ``STAIN_MAX_BLUE_OVER_RED`` of red at most: black ink absorbs all three alike, and over a fold, where green
    is read too light, it keeps blue near red), blue over red unbounded where green is ``STAIN_GREEN_DOMINANT``
    times red or more (haematoxylin-rich epidermis absorbs as much blue as red, as black ink does, but green far
    more than either). A stroke across a fold joins it into one region: in a region
    found H&E's, the pieces of ``INK_MIN_UM2`` or more whose own excess is not H&E's, over the ring or (with
    ``OVER_FOLD_MIN_OD`` of red or more: blue and black ink absorb red) over the median of the region's H&E
    pixels, the fold's, are returned as ink, with their blurred edge (``STROKE_EDGE_PX``). A fold that a stroke
    or a blot touches joins it into one region too, ink by its median: in a region beside H&E-coloured tissue
    found ink, the stroke's strip is cut out (``_stroke_strip``: its pixels of an ink's excess, followed on along
    their line at their width), and each piece left of ``INK_MIN_UM2`` or more is judged as a region of its own
    (its own ring H&E-coloured tissue, a sizeable H&E excess over it); those found so are returned as folded, not
    ink, less the stroke's pixels over them that join the strip. Per pixel a fold over haematoxylin-heavy tumour
    adds green only 1.2 x red, as blue ink over tumour does; the stroke's shape, not the hue, parts them."""
    stain_like = np.zeros(len(regions), bool)
    inked = np.zeros(labels.shape, bool)
    folded = np.zeros(labels.shape, bool)
    width = max(1, int(round(RING_UM / mpp)))
    min_px = INK_MIN_UM2 / (mpp * mpp)

    def hne(excess):
        red, green, blue = excess[..., 0], excess[..., 1], excess[..., 2]
        return ((green > 0) & (green >= STAIN_MIN_GREEN_OVER_RED * red) & (blue <= STAIN_MAX_BLUE_OVER_GREEN * green)
                & ((blue <= STAIN_MAX_BLUE_OVER_RED * red) | (green >= STAIN_GREEN_DOMINANT * red)))

    def tissue_beside(pixels, box):  # the ring's median density where it is H&E-coloured tissue, else None
        ring = _dilate(pixels, width) & ~candidates[box]
        if not ring.any():
            return None
        beside = ring & (od[box].sum(axis=2) >= RING_TISSUE_OD)  # the tissue beside it, where there is some
        if beside.sum() < 0.25 * ring.sum():  # glass beside it: a stroke (or a blot) on the glass
            return None
        under = np.median(od[box][beside], axis=0)
        return under if hne(under) else None  # else not H&E-coloured tissue (a blot's own lighter ink)

    def fold_like(densities, under):  # their median adds a sizeable H&E-hued excess over ``under``, the ring's
        excess = np.median(densities, axis=0) - under
        return bool(hne(excess)) and excess.sum() >= FOLD_MIN_EXCESS * under.sum()

    for k, region in enumerate(regions):
        ys, xs = np.nonzero(labels == region)
        box = (slice(max(ys.min() - width - 1, 0), ys.max() + width + 2),
               slice(max(xs.min() - width - 1, 0), xs.max() + width + 2))
        inside = labels[box] == region
        under = tissue_beside(inside, box)
        if under is None:
            continue
        dark = np.median(od[box][inside], axis=0)
        if max(dark[0], dark[2]) > FOLD_MAX_OD:  # near black in red or blue: its direction is JPEG's noise
            continue
        stain_like[k] = fold_like(od[box][inside], under)
        pixel_hne = hne(od[box] - under)  # each pixel's own excess over the ring: H&E's or not
        if stain_like[k]:
            folds, strip = [inside], None
        else:  # ink as a whole: a fold it joins lies off the stroke's strip; judged as a region of its own
            strip = _stroke_strip(_drop_small(inside & ~pixel_hne, min_px), inside)
            rest, n_rest = _label(inside & ~strip)
            folds = []
            for piece in (rest == label for label in range(1, n_rest + 1)):
                piece_under = tissue_beside(piece, box) if piece.sum() >= min_px else None
                if piece_under is not None and fold_like(od[box][piece], piece_under):
                    folds.append(piece)
        for fold_region in folds:
            fold = fold_region & pixel_hne
            ink_part = fold_region & ~pixel_hne
            if fold.any():  # ink over the fold itself: what it adds over the fold's density is the ink's
                over_fold = od[box] - np.median(od[box][fold], axis=0)
                ink_part |= fold_region & ~hne(over_fold) & (over_fold[..., 0] >= OVER_FOLD_MIN_OD)
            # a stroke across the fold: of ink's size, or running on from the strip cut out before
            ink_part = _drop_small(ink_part, min_px) if strip is None else _touching(ink_part, strip) & ink_part
            ink_part = _dilate(ink_part, STROKE_EDGE_PX) if ink_part.any() else ink_part  # its blurred edge
            if stain_like[k]:
                inked[box] |= ink_part
            else:
                folded[box] |= fold_region & ~ink_part
    return stain_like, inked, folded


def _stroke_strip(stroke: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The pixels of ``region`` that belong to the marker ``stroke`` in it (pixels of the ink's own colour).

    A marker leaves a strip of even width along a smooth path, so where the stroke crosses tissue that hides
    its colour (a fold over dense tumour) it goes on along its own line at its own width. Each piece of
    ``stroke`` long for its width (``STROKE_MIN_ELONGATION``) is followed on both ways along its principal
    axis, through the region, at its half-width from it; every piece takes its blurred edge
    (``STROKE_EDGE_PX``)."""
    strip = _dilate(stroke, STROKE_EDGE_PX) & region
    pieces, n = _label(stroke)
    ys, xs = np.nonzero(region)
    for piece in range(1, n + 1):
        mask = pieces == piece
        half_width = _half_width(mask)
        py, px = np.nonzero(mask)
        if py.size < STROKE_MIN_ELONGATION * np.pi * half_width ** 2:  # a blot, not a stroke: no line to follow
            continue
        centre = np.array([py.mean(), px.mean()])
        _, _, axes = np.linalg.svd(np.column_stack([py, px]) - centre, full_matrices=False)
        normal = axes[1]  # across the stroke's principal axis
        along = np.abs((ys - centre[0]) * normal[0] + (xs - centre[1]) * normal[1]) <= half_width + STROKE_EDGE_PX
        strip[ys[along], xs[along]] = True
    return strip


def _across_folds(strokes: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """The fold pixels a stroke crosses: the strokes reaching the ``folds`` are followed on through them along
    their line at their width (``_stroke_strip``), and each piece of that path across a fold is kept where it
    meets ``strokes`` in two places (the stroke on both sides). A fold hides even black ink's colour; a path that
    meets it in one place only runs on past the stroke's end (or beside it, along a fold under its edge), over the
    fold's tumour."""
    near = 2 * STROKE_EDGE_PX  # a stroke's blurred edge on either side of the fold's
    reaching = _touching(strokes, strokes & _dilate(folds, near))
    paths, n = _label(_stroke_strip(reaching, reaching | folds) & folds & ~reaching)
    across = np.zeros(strokes.shape, bool)
    for path in range(1, n + 1):
        at = paths == path
        if _label(_dilate(at, near) & reaching)[1] >= 2:  # it meets the stroke in two places: both sides
            across |= at
    return across


def _run_on(strokes: np.ndarray, half_width: float, host: np.ndarray, blood: np.ndarray,
            od: np.ndarray) -> np.ndarray:
    """Where ink ``strokes`` of one colour run on over ``host`` pixels whose colour hides them from the colour
    tests: red ink over dark-blue tumour is a purple that H&E also shows, any ink over blood is a darker red or
    near black.

    A marker absorbs on top of what lies under it, so in optical density (``od``: -log of the glass-relative
    RGB) ink over tissue is the tissue's density plus the ink's. The ink's density is its median over the
    strokes; what lies under a host pixel is the mean of the host pixels of its own kind around it (``blood``
    apart from the rest) in a window eight stroke half-widths wide, refined once leaving out the pixels with half
    the ink's excess or more (ink, and what may be). A pixel is inked when its excess over that points along the
    ink's density (within about 27 degrees) with ``RUN_ON_MIN`` of its strength or more. Inked pixels connected
    to a stroke (or within half its width of it) are ink where no wider than the stroke: an opening by a disc of
    1.5 half-widths takes away a whole region of dark stain."""
    if not host.any():
        return np.zeros(strokes.shape, bool)
    ink_od = np.median(od[strokes], axis=0).astype(np.float32)
    strength = float(ink_od @ ink_od)
    window = 8 * half_width
    ys, xs = np.nonzero(host)  # work on the part of the thumbnail a host pixel's window reaches
    pad = int(window) + 2
    box = (slice(max(ys.min() - pad, 0), ys.max() + pad + 1), slice(max(xs.min() - pad, 0), xs.max() + pad + 1))
    run_on = np.zeros(strokes.shape, bool)
    strokes, host, blood, od = strokes[box], host[box], blood[box], od[box]
    on_blood = host & blood
    darker = np.zeros(strokes.shape, bool)  # left out of the estimate of what lies under (ink, and what may be)
    for _ in range(2):
        (blood_mean, blood_weight), (rest_mean, rest_weight) = (
            _local_mean(od, kind & ~darker, window) for kind in (on_blood, host & ~blood))
        measured = host & (np.where(on_blood, blood_weight, rest_weight) > 0.05)
        excess = od - np.where(on_blood[..., None], blood_mean, rest_mean)
        along = excess @ (ink_od / strength)  # excess density along the ink's, in units of the ink's
        darker = measured & (along >= 0.5 * RUN_ON_MIN)
    excess_sq = np.einsum("...c,...c->...", excess, excess)
    off_line_sq = excess_sq - along * along * strength  # squared distance from the ink's line
    inked = measured & (along >= RUN_ON_MIN) & (off_line_sq <= 0.25 * along * along * strength)
    joined = _touching(inked, _dilate(strokes, half_width)) & inked & ~strokes  # a rim pixel or two may part them
    run_on[box] = _narrow(joined, 1.5 * half_width)
    return run_on


def _tinted_glass(strokes: np.ndarray, tinted: np.ndarray, od: np.ndarray, params: TissueParams) -> np.ndarray:
    """The ``tinted`` pixels joined to blue, green or black ink ``strokes`` of one colour that are glass under the
    ink: a marker bleeds into the glass beside it and fades out there (a halo), tinting it enough to pass for
    faint stain.

    Ink adds its optical density to what lies under it, so under a pixel lies its density less as much of the
    ink's (the median over the strokes) as it can hold (the most that leaves no channel below zero). Where that
    much ink alone would tint glass (half of ``saturation_min``, or darker than ``brightness_max``) and what lies
    under it passes neither the faint test (darker than ``brightness_max``, or tinted as stain tints: green the
    darkest, or within half of ``saturation_min`` of it, with half of ``saturation_min``) nor so the stained one,
    the pixel is tinted glass. Stain under a halo stays: these inks absorb red as much as green or more, H&E
    green the most, so taking the ink out leaves it. A real marker's faint halo is not exactly its dense core's
    colour diluted (the scanner's response), which this allows for, and the ink taken out is an estimate (what is
    left of pale septa may have blue as dark as green)."""
    ink_od = np.median(od[strokes], axis=0)
    strong = ink_od >= 0.1 * ink_od.max()  # channels the ink absorbs in (a near-clear one says nothing)
    ys, xs = np.nonzero(_touching(tinted, strokes) & ~strokes)  # a halo can only lie among these
    pixels = [od[ys, xs, c] for c in range(3)]  # channel by channel: reductions over 3 columns are slow
    share = np.maximum(np.minimum.reduce([pixels[c] / ink_od[c] for c in np.flatnonzero(strong)]), 0)
    ink_part = [np.exp(-share * ink_od[c]) for c in range(3)]  # transmittance of the ink alone, and of what
    under = [np.exp(-np.maximum(pixels[c] - share * ink_od[c], 0)) for c in range(3)]  # lies under it

    def low_high_mean(t):
        return np.minimum.reduce(t), np.maximum.reduce(t), (t[0] + t[1] + t[2]) / 3

    faint = 1 - params.saturation_min / 2
    low, high, mean = low_high_mean(ink_part)
    inked = (low < faint * high) | (mean <= params.brightness_max)
    low, high, mean = low_high_mean(under)
    stain_tint = (low < faint * high) & (under[1] * faint <= low)
    glass_under = inked & ~stain_tint & (mean > params.brightness_max)
    halo = np.zeros(strokes.shape, bool)
    halo[ys[glass_under], xs[glass_under]] = True
    return _touching(halo, strokes) & ~strokes


def _stroke_ends(run_on: np.ndarray, half_width: float, red: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """The ``red`` pixels where a stroke ``run_on`` found over blood carries on out of the pool onto ``glass``
    (a marker's rounded end just past a clot's edge): red ink over glass is blood's colour, and joined to the
    pool it is too short to pass as a stroke. They are the red pixels within 1.25 half-widths of the run-on
    whose offset from its nearest run-on pixel lies along that run-on piece's long axis (within about 37
    degrees: past its end, not beside it, where the pool goes on), in pieces that reach the glass (blood past a
    stroke that ends inside a pool stays)."""
    pieces, n = _label(run_on)
    beyond = red & _dilate(run_on, 1.25 * half_width)
    if n == 0 or not beyond.any():
        return np.zeros(red.shape, bool)
    ys, xs = np.nonzero(run_on)
    at = pieces[ys, xs]
    count = np.bincount(at, minlength=n + 1).astype(np.float64)
    centred = [np.bincount(at, weights=v, minlength=n + 1) / np.maximum(count, 1) for v in (ys, xs)]
    dy, dx = ys - centred[0][at], xs - centred[1][at]
    syy, sxx, sxy = (np.bincount(at, weights=w, minlength=n + 1) for w in (dy * dy, dx * dx, dy * dx))
    angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # each piece's long axis (x, y) = (cos, sin)
    spread = np.sqrt((sxx - syy) ** 2 + 4 * sxy ** 2)
    elongated = spread >= 0.6 * (sxx + syy)  # eigenvalues 4:1 or more (a stroke, not a blob)
    _, nearest = cv2.distanceTransformWithLabels(np.ascontiguousarray(~run_on).view(np.uint8), cv2.DIST_L2, 5,
                                                  labelType=cv2.DIST_LABEL_PIXEL)
    source_y = np.zeros(nearest.max() + 1, np.int64)  # each run-on pixel's label -> its position
    source_x = np.zeros_like(source_y)
    source_y[nearest[ys, xs]], source_x[nearest[ys, xs]] = ys, xs
    py, px = np.nonzero(beyond)
    qy, qx = source_y[nearest[py, px]], source_x[nearest[py, px]]
    piece = pieces[qy, qx]
    vy, vx = py - qy, px - qx
    along = np.abs(vx * np.cos(angle[piece]) + vy * np.sin(angle[piece]))
    end = np.zeros(red.shape, bool)
    end[py, px] = elongated[piece] & (along >= 0.8 * np.hypot(vy, vx))
    return _touching(end, _dilate(glass, 1.5) & end)


def _local_mean(values: np.ndarray, where: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray]:
    """The mean of ``values`` (h, w, k) over the ``where`` pixels in a square ``window`` px wide around each pixel,
    and the share of the window they fill. Summed on a grid an eighth of the window's width and interpolated
    back: the mean is smooth at that scale, and a thumbnail-wide window costs no more than a narrow one."""
    h, w = where.shape
    step = max(1, int(window // 8))
    small = (max(1, round(w / step)), max(1, round(h / step)))
    weight = cv2.resize(where.astype(np.float32), small, interpolation=cv2.INTER_AREA)
    sums = cv2.resize(values * where[..., None], small, interpolation=cv2.INTER_AREA)
    side = (2 * max(1, round(window / step / 2)) + 1,) * 2
    weight, sums = cv2.boxFilter(weight, -1, side), cv2.boxFilter(sums, -1, side)
    mean = sums / np.maximum(weight, 1e-6)[..., None]
    return (cv2.resize(mean, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(weight, (w, h), interpolation=cv2.INTER_LINEAR))


def _red_stubs(strokes: np.ndarray, half_width: float, red: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """The ``red`` pieces (not ``ink``) that a crossing stroke of another colour cut from red ink ``strokes``,
    too short to pass as strokes alone: the parts of the red left over that are no wider than the stroke (an
    opening by 1.5 half-widths parts a stub from a clot it touches; a pool the crossing stroke covers stays whole)
    and lie within three half-widths of a stroke across another colour's ink."""
    crossing = _dilate(strokes, 3 * half_width) & ink & ~strokes
    pieces, n = _label(_narrow(red & ~ink, 1.5 * half_width))  # parted from clots
    if n == 0 or not crossing.any():
        return np.zeros(red.shape, bool)
    stub = np.zeros(n + 1, bool)
    stub[pieces[_dilate(crossing, 1.5)]] = True
    widest = np.zeros(n + 1, np.float32)
    np.maximum.at(widest, pieces.ravel(), _distance_inside(pieces > 0).ravel())
    stub &= widest <= 1.5 * half_width
    stub[0] = False
    return stub[pieces]


def _half_width(mask: np.ndarray) -> float:
    """A mask's typical half-width, at least one pixel."""
    return max(_ridge_depth(mask, _distance_inside(mask)), 1.0)


def _ridge_depth(mask: np.ndarray, depth: np.ndarray) -> float:
    """The median of ``depth`` (distance to the edge) along the ridge of ``mask``: its typical half-width."""
    ridge = mask & (depth >= cv2.dilate(depth, np.ones((3, 3), np.uint8)))
    return float(np.median(depth[ridge]))


def _narrow(mask: np.ndarray, radius: float, depth: np.ndarray | None = None) -> np.ndarray:
    """The parts of ``mask`` an opening by a disc of ``radius`` takes away: those narrower than the disc
    (``depth``: the distance inside ``mask`` to its edge, when already known)."""
    depth = _distance_inside(mask) if depth is None else depth
    return mask & ~_dilate(depth >= radius, radius)


def _red_strokes(labels: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """The stroke-shaped parts of the red ``regions`` of ``labels``: each region is opened by a disc half again
    as wide as its typical half-width (the median distance to its edge along its ridge), which keeps the parts
    wider than a stroke (pools of blood); what the opening removes is ink where it is long for its width."""
    ink = np.zeros(labels.shape, bool)
    for region in regions:
        ys, xs = np.nonzero(labels == region)
        rows = slice(max(ys.min() - 1, 0), ys.max() + 2)
        cols = slice(max(xs.min() - 1, 0), xs.max() + 2)
        mask = labels[rows, cols] == region
        depth = _distance_inside(_fill_small_holes(mask, np.inf))  # gaps in a clot are no edge
        thin, n = _label(_narrow(mask, 1.5 * _ridge_depth(mask, depth), depth))
        if n == 0:
            continue
        area = np.bincount(thin.ravel(), minlength=n + 1)
        half_width = np.zeros(n + 1)
        np.maximum.at(half_width, thin[thin > 0], depth[thin > 0])
        stroke = area >= STROKE_MIN_ELONGATION * np.pi * np.maximum(half_width, 0.5) ** 2
        stroke[0] = False
        ink[rows, cols] |= stroke[thin]
    return ink


def _label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(labels int32, number of pieces) of a boolean mask; 0 is the background."""
    n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
    return labels, n - 1


def _around(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The box of ``mask``'s pixels grown by ``margin`` (clipped to the image), or None when it has none: the
    distance transforms below work there only (a stroke or a pool is a small part of a thumbnail)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _distance_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (float32) of each mask pixel to the nearest pixel outside it (0 outside)."""
    depth = np.zeros(mask.shape, np.float32)
    box = _around(mask, 0)
    if box is not None:  # the nearest pixel outside lies in the box or on the ring of zeros around it
        padded = cv2.copyMakeBorder(mask[box].view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        depth[box] = _euclidean_distance(padded)[1:-1, 1:-1]
    return depth


def _euclidean_distance(zero_at: np.ndarray) -> np.ndarray:
    """The exact Euclidean distance (float32) of each pixel of a uint8 image to its nearest zero pixel.

    OpenCV's precise transform (Intel IPP's, where OpenCV is built with it) rounds it differently from one
    process to another: the same thumbnail gave one of two results, 1 ulp apart on a few pixels, which flipped
    a mask decision and so the mask. An exact distance is the root of an integer (the squared offset), so the
    root of its rounded square is the same value in every process."""
    distance = cv2.distanceTransform(zero_at, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.sqrt(np.rint(np.square(distance, dtype=np.float64))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _disc(radius: float) -> np.ndarray:
    k = int(np.ceil(radius))
    y, x = np.mgrid[-k:k + 1, -k:k + 1]
    disc = (x * x + y * y <= radius * radius).astype(np.uint8)
    disc.flags.writeable = False  # shared by every call with this radius
    return disc


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a disc of ``radius`` px: a kernel for small discs, the exact Euclidean distance to the mask
    for wide ones (its cost does not grow with the radius), within the mask's box grown by the radius."""
    if radius <= 4:
        return cv2.dilate(mask.view(np.uint8), _disc(radius), borderValue=0).view(bool)
    grown = np.zeros(mask.shape, bool)
    box = _around(mask, int(np.ceil(radius)) + 1)
    if box is not None:
        outside = np.ascontiguousarray(~mask[box]).view(np.uint8)
        grown[box] = _euclidean_distance(outside) <= radius
    return grown


def _erode(mask: np.ndarray, radius: float, outside: int) -> np.ndarray:
    """Erosion by a disc of ``radius`` px; ``outside`` (0 or 1) is what lies beyond the image border."""
    return cv2.erode(mask.view(np.uint8), _disc(radius), borderType=cv2.BORDER_CONSTANT,
                     borderValue=outside).view(bool)


def _touching(region: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of ``region`` (or ``seeds``) whose connected piece of both (8-connected) holds a pixel of ``seeds``."""
    labels, n = _label(region | seeds)
    hit = np.zeros(n + 1, bool)
    hit[labels[seeds]] = True
    hit[0] = False
    return hit[labels]


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological closing by a disc of ``radius`` px; the erosion treats the outside as tissue, so tissue
    cut by the image border keeps its edge."""
    return _erode(_dilate(mask, radius), radius, outside=1)


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background pieces that do not touch the border and are smaller than ``max_px`` pixels."""
    labels, n = _label(~mask, connectivity=4)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes < max_px
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def _cells_walled_in(tissue: np.ndarray, ink: np.ndarray, max_px: float) -> np.ndarray:
    """The holes of ``tissue`` that ``ink`` closes, smaller than ``max_px`` and walled mostly by tissue: a stroke
    across fat leaves the fat cells beside it open to the ink, so hole filling would leave them out (their pale
    septa alone stay). A bay of glass that a stroke closes against tissue is walled by the stroke as much."""
    labels, n = _label(~(tissue | ink), connectivity=4)
    if n == 0:
        return np.zeros(tissue.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ring = _dilate(labels > 0, 1) & (labels == 0)  # the wall around each hole, one pixel thick
    # a wall pixel's hole: the largest label beside it (float32 holds labels exactly up to 2 ** 24)
    near = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int64)
    by_tissue = np.bincount(near[ring & tissue], minlength=n + 1)
    by_ink = np.bincount(near[ring & ink], minlength=n + 1)
    fill = (sizes < max_px) & (by_tissue > by_ink) & (by_ink > 0)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill[border] = False
    fill[0] = False
    return fill[labels]


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Remove 8-connected pieces smaller than ``min_px`` pixels."""
    labels, n = _label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    return keep[labels]


def tissue_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray, footprint: float) -> np.ndarray:
    """Share of mask pixels inside each tile's level-0 box, from an integral image (O(1) per tile)."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    h, w = mask.shape

    def edges(start):
        lo = np.clip(np.round(start / downsample).astype(np.int64), 0, None)
        hi = np.round((start + footprint) / downsample).astype(np.int64)
        return lo, np.maximum(hi, lo + 1)

    x0, x1 = edges(coords[:, 0])
    y0, y1 = edges(coords[:, 1])
    x0, x1 = np.minimum(x0, w), np.minimum(x1, w)
    y0, y1 = np.minimum(y0, h), np.minimum(y1, h)
    area = (x1 - x0) * (y1 - y0)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0).astype(np.float32)
