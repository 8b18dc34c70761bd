"""The renderer of synthetic H&E-like slides: what a slide shows, drawn pixel by pixel at any level.

The files are written by :mod:`wsi_synth.writers`; :mod:`wsi_synth.cohort` makes the demo's labelled cohort.

What a slide shows
------------------
White-ish glass with slight noise; tissue pieces with wobbly outlines: pink eosin stroma with streaky fibres
and sparse spindle-shaped purple nuclei, pale fat (white vacuoles in thin pink septa), a few small separate
biopsy fragments, and optional dense tumour (crowded, larger, darker, irregular nuclei). Options add marker-pen
strokes (blue, green, black, red) over glass and tissue edges, dust/debris specks and faint smudges on glass,
and lymphoid aggregates (the tumour mimic). Colours are mixed with Beer-Lambert optical densities of
haematoxylin and eosin, whose strengths a slide may scale (its staining batch). A :class:`SiteProfile` draws the
slide as one institution would: its own stain vectors (the hue of its haematoxylin and eosin) and strengths, its
scanner's colour cast and JPEG quality (:data:`SITE_PROFILES` holds four).

Every pixel is a deterministic function of its level-0 position and its size (the level's downsample), so
tiles are rendered independently and streamed to :class:`tifffile.TiffWriter` or into the DICOM files (a
40,000 x 30,000 slide never holds a level in memory), and coarse levels look like area-averaged level 0
without computing level 0: edges are anti-aliased over the pixel footprint, fine noise fades with the
downsample, and nuclei smaller than a pixel turn into their mean coverage. Features are sized in microns
(nuclei 5-11 um, fat cells ~70 um), so a 0.25 um/px slide shows the same tissue as a 0.5 um/px one at twice
the pixels; a slide written with ``mpp=None`` is drawn as if at 0.5 um/px.

The returned :class:`SyntheticSlide` holds the level-0 boxes of what was drawn (tissue pieces, tumour, pen
strokes, specks and smudges) and :meth:`SyntheticSlide.truth_masks` renders the exact per-pixel ground truth
at any downsample, from the same functions that drew the pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi.errors import ConfigError

from . import defects as demo_defects

Box = tuple[int, int, int, int]
RENDER_MPP_WITHOUT_CALIBRATION = 0.5  # um/px used to size features when a slide is written with mpp=None

# Optical density per unit stain (R, G, B); a pixel transmits exp(-sum(conc * od)) of the light.
EOSIN_OD = np.array([0.05, 0.60, 0.22], np.float32)
HAEM_OD = np.array([0.62, 0.78, 0.28], np.float32)
GLASS_RGB = np.array([242.0, 241.0, 245.0], np.float32)
GLASS_NOISE_LEVELS = 2.0  # std of the per-pixel glass noise at level 0, in 8-bit levels
GLASS_PERIOD = 509  # px; the glass noise repeats with this period on every level (prime: never in step with tiles)
# Marker ink transmittance (R, G, B) at full density.
PEN_INKS = {
    "blue": (0.20, 0.34, 0.76),
    "green": (0.26, 0.60, 0.40),
    "black": (0.15, 0.15, 0.17),
    "red": (0.80, 0.17, 0.22),
}
# Packed red cells (haemorrhage) at full density: as red as red marker ink, so colour alone cannot tell them apart.
BLOOD_T = np.array([0.78, 0.22, 0.27], np.float32)
SCANNER_FIELD_UM = (500.0, 400.0)  # a scanner's stitched camera field (w, h); each has its own brightness
SMUDGE_T = np.array([0.90, 0.90, 0.885], np.float32)  # transmittance at the centre of a smudge
SPECK_TS = ((0.30, 0.29, 0.28), (0.45, 0.36, 0.27), (0.55, 0.55, 0.52))  # dark dust, brown debris, grey
HALO_REACH = 5.0  # a marker's halo is drawn out to this many of its e-folding lengths (then under 1% of its density)
INK_VISIBLE_DENSITY = 0.02  # truth: ink where its density is at least this share of the full ink's (blue: red -3%)


# ------------------------------------------------------------------------------------------ hashing + noise
def _hash01(seed: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats from integer lattice coordinates: a splitmix64-style mix, no state."""
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point of the mix
        h = (np.asarray(ix, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(iy, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(
            (seed * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(2.0 ** -24)


def _interp(coords: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lattice cell (relative to the first one), smoothstep weight of its upper neighbour, first cell, count."""
    g = coords / spacing
    i0 = np.floor(g).astype(np.int64)
    f = (g - i0).astype(np.float32)
    lo = int(i0.min())
    return i0 - lo, f * f * (3 - 2 * f), lo, int(i0.max()) - lo + 2


def _noise(seed: int, xs: np.ndarray, ys: np.ndarray, spacing_x: float, spacing_y: float | None = None,
           pixel: float = 1.0) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the grid ``ys x xs`` (level-0 px), lattice ``spacing`` px.

    Separable: interpolate the lattice along x for the lattice rows in reach, then those rows along y. Its
    contrast fades as the pixel (``pixel`` level-0 px) outgrows the lattice, as area averaging would fade it.
    """
    spacing_y = spacing_x if spacing_y is None else spacing_y
    fade = np.float32(min(1.0, min(spacing_x, spacing_y) / pixel))
    if fade < 0.5:  # mostly averaged away; skipping it spares hashing a lattice finer than the pixels
        return np.zeros((ys.size, xs.size), np.float32)
    ix, fx, x0, nx = _interp(xs, spacing_x)
    iy, fy, y0, ny = _interp(ys, spacing_y)
    lattice = 2 * _hash01(seed, np.arange(x0, x0 + nx)[None, :], np.arange(y0, y0 + ny)[:, None]) - 1
    rows = lattice[:, ix] * (1 - fx) + lattice[:, ix + 1] * fx
    return (rows[iy] * ((1 - fy) * fade)[:, None]) + rows[iy + 1] * (fy * fade)[:, None]


def _overlap(centre: np.ndarray, lo: float, hi: float, pixel: float) -> np.ndarray:
    """Share of the pixel interval [centre - pixel/2, centre + pixel/2] that lies inside [lo, hi]."""
    return np.clip(np.minimum(centre + pixel / 2, hi) - np.maximum(centre - pixel / 2, lo), 0, None) / pixel


def _edge(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage of a region from its signed distance (level-0 px, positive inside)."""
    return np.clip(signed_distance / pixel + 0.5, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------- scene
@dataclass(frozen=True)
class _Blob:
    """A tissue piece or tumour region: a wobbly (super)ellipse. ``inward`` wobble keeps it inside its box."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    wobble: float
    power: float
    inward: bool
    seed: int

    def box(self) -> Box:
        if self.inward:
            ex, ey = self.rx, self.ry
        else:
            c, s = math.cos(self.angle), math.sin(self.angle)
            ex = math.hypot(self.rx * c, self.ry * s) * (1 + self.wobble)
            ey = math.hypot(self.rx * s, self.ry * c) * (1 + self.wobble)
        return (math.floor(self.cx - ex), math.floor(self.cy - ey), math.ceil(self.cx + ex), math.ceil(self.cy + ey))

    def signed_distance(self, xs: np.ndarray, ys: np.ndarray, pixel: float) -> np.ndarray:
        """Approximate distance to the outline in level-0 px, positive inside, on the grid ``ys x xs``."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = (xs - self.cx)[None, :].astype(np.float32)
        dy = (ys - self.cy)[:, None].astype(np.float32)
        u = np.abs(dx * c + dy * s) / self.rx
        v = np.abs(dy * c - dx * s) / self.ry
        rho = np.sqrt(u * u + v * v) if self.power == 2 else (u ** self.power + v ** self.power) ** (1 / self.power)
        r = min(self.rx, self.ry)
        n = 0.7 * _noise(self.seed, xs, ys, 0.45 * r, pixel=pixel) + 0.3 * _noise(self.seed + 1, xs, ys, 0.12 * r,
                                                                                  pixel=pixel)
        wob = self.wobble * ((n + 1) / 2 if self.inward else -n)
        return (1 - rho - wob) * r


@dataclass(frozen=True)
class PenStroke:
    """A marker-pen stroke: a polyline of level-0 points, ``half_width`` px, ink ``colour`` (a PEN_INKS key).
    With a ``halo`` (px), ink that bled into the glass fades out beside it: its density, ``halo_density`` of the
    full ink's at the stroke's edge, falls by e every ``halo`` px."""

    points: tuple
    half_width: float
    colour: str
    seed: int
    halo: float = 0.0
    halo_density: float = 0.0

    def box(self) -> Box:
        p = np.asarray(self.points)
        reach = self.half_width + HALO_REACH * self.halo
        lo, hi = p.min(0) - reach, p.max(0) + reach
        return (math.floor(lo[0]), math.floor(lo[1]), math.ceil(hi[0]), math.ceil(hi[1]))

    def coverage(self, xs: np.ndarray, ys: np.ndarray, pixel: float) -> tuple[np.ndarray, np.ndarray]:
        """Anti-aliased coverage on the grid ``ys x xs``, and the halo's ink density (a share of the full ink's)
        outside it; each segment only touches the pixels in its reach."""
        dist = np.full((ys.size, xs.size), np.inf, np.float32)
        reach = self.half_width + HALO_REACH * self.halo + pixel
        p = np.asarray(self.points, np.float32)
        for a, b in zip(p[:-1], p[1:]):
            c0, c1 = np.searchsorted(xs, [min(a[0], b[0]) - reach, max(a[0], b[0]) + reach])
            r0, r1 = np.searchsorted(ys, [min(a[1], b[1]) - reach, max(a[1], b[1]) + reach])
            if c0 == c1 or r0 == r1:
                continue
            X, Y = xs[None, c0:c1].astype(np.float32) - a[0], ys[r0:r1, None].astype(np.float32) - a[1]
            ab = b - a
            t = np.clip((X * ab[0] + Y * ab[1]) / float(ab @ ab), 0, 1)
            np.minimum(dist[r0:r1, c0:c1], np.hypot(X - t * ab[0], Y - t * ab[1]), out=dist[r0:r1, c0:c1])
        coverage = _edge(self.half_width - dist, pixel)
        if not self.halo:
            return coverage, np.zeros_like(coverage)
        beyond = np.maximum(dist - self.half_width, 0) / self.halo
        return coverage, (1 - coverage) * np.where(beyond <= HALO_REACH, self.halo_density * np.exp(-beyond), 0)


@dataclass(frozen=True)
class Speck:
    """A dust or debris speck (``radius`` px, transmittance ``ink``) or, with ``smudge``, a faint smear."""

    cx: float
    cy: float
    radius: float
    ink: tuple
    smudge: bool
    seed: int

    def box(self) -> Box:
        r = self.radius
        return (math.floor(self.cx - r), math.floor(self.cy - r), math.ceil(self.cx + r), math.ceil(self.cy + r))

    def coverage(self, xs: np.ndarray, ys: np.ndarray, pixel: float) -> np.ndarray:
        dx = (xs - self.cx)[None, :].astype(np.float32)
        dy = (ys - self.cy)[:, None].astype(np.float32)
        if self.smudge:  # a soft bump with streaks, zero outside its radius
            rho2 = (dx * dx + dy * dy) / self.radius ** 2
            streaks = 0.7 + 0.3 * _noise(self.seed, xs, ys, self.radius / 3, self.radius / 12, pixel=pixel)
            return np.clip(1 - rho2, 0, None) ** 2 * streaks
        if self.radius >= pixel:
            return _edge(self.radius - np.sqrt(dx * dx + dy * dy), pixel)
        half = self.radius * math.sqrt(math.pi) / 2  # sub-pixel: a square of equal area keeps the mean right
        return (_overlap(ys, self.cy - half, self.cy + half, pixel)[:, None]
                * _overlap(xs, self.cx - half, self.cx + half, pixel)[None, :]).astype(np.float32)


@dataclass(frozen=True)
class _ScanArea:
    """What a scanner leaves around the tissue: a grid of stitched camera fields of ``field`` level-0 px, the
    ``scanned`` ones (rows of bools) imaged with their own brightness ``gain`` (a step at each seam), the rest
    pure white padding (255) that was never imaged."""

    field: tuple  # (w, h) level-0 px
    scanned: tuple  # rows of bool
    gain: tuple  # rows of float

    def light(self, light: np.ndarray, x0: float, y0: float, pixel: float) -> np.ndarray:
        """``light`` (h, w, 3) of the region whose top-left is level-0 (x0, y0) with field gains and padding
        applied, area-averaged over each pixel's footprint (a pixel across a seam gets its share of each)."""
        h, w = light.shape[:2]
        scanned = np.asarray(self.scanned, np.float32)
        fx = np.arange(scanned.shape[1] + 1) * self.field[0]
        fy = np.arange(scanned.shape[0] + 1) * self.field[1]
        over_x = _overlap(x0 + (np.arange(w)[:, None] + 0.5) * pixel, fx[None, :-1], fx[None, 1:], pixel)
        over_y = _overlap(y0 + (np.arange(h)[:, None] + 0.5) * pixel, fy[None, :-1], fy[None, 1:], pixel)
        over_x, over_y = over_x.astype(np.float32), over_y.astype(np.float32)
        cover = over_y @ scanned @ over_x.T
        gain = over_y @ (scanned * np.asarray(self.gain, np.float32)) @ over_x.T
        return light * gain[..., None] + 255 * (1 - cover)[..., None]

    def padding(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether each pixel centre of the grid ``ys x xs`` (level-0 px) lies in the white padding."""
        scanned = np.asarray(self.scanned, bool)
        col = np.clip((xs // self.field[0]).astype(np.int64), 0, scanned.shape[1] - 1)
        row = np.clip((ys // self.field[1]).astype(np.int64), 0, scanned.shape[0] - 1)
        return ~scanned[row[:, None], col[None, :]]


@dataclass(frozen=True)
class Scene:
    """Everything drawn on one slide, in level-0 px; ``um`` is the render scale in um per level-0 px."""

    width: int
    height: int
    um: float
    seed: int
    tissue: tuple  # _Blob, main pieces first
    n_main: int  # how many of ``tissue`` are main pieces (fat only grows in those)
    tumours: tuple  # _Blob
    strokes: tuple  # PenStroke
    specks: tuple  # Speck (dust, debris and smudges)
    lymphoid: tuple = ()  # _Blob: lymphoid aggregates, the tumour mimics
    stain: tuple = (1.0, 1.0)  # haematoxylin, eosin strength: the slide's staining batch
    solid: tuple = ()  # _Blob: solid sheets of high-grade tumour
    blood: tuple = ()  # _Blob: haemorrhage
    mucin: tuple = ()  # _Blob: mucin pools
    glass_rgb: tuple = tuple(GLASS_RGB.tolist())  # the scanned glass's colour (a grey, yellow or blue cast)
    scan: _ScanArea | None = None  # stitched scanner fields with white padding outside them; None: all glass
    haem_od: tuple = tuple(HAEM_OD.tolist())  # the site's stain vectors: optical density per unit stain (R, G, B)
    eosin_od: tuple = tuple(EOSIN_OD.tolist())
    cast: tuple = (1.0, 1.0, 1.0)  # the scanner's gain per RGB channel (its colour cast over everything)
    defects: tuple = ()  # wsi_synth.defects: blur, focus stripes, folds, bubbles (level-0 px)

    def px(self, microns: float) -> float:
        return microns / self.um

    def touches(self, region: Box) -> bool:
        """Whether anything but glass may show in ``region`` (level-0 box)."""
        return any(_intersects(o.box(), region) for o in self.objects()) or any(
            _intersects(d.box(), region) for d in self.defects if isinstance(d, demo_defects.Bubble))

    def objects(self) -> tuple:
        return (self.tissue + self.tumours + self.solid + self.lymphoid + self.blood + self.mucin + self.strokes
                + self.specks)


def _intersects(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------------------- tissue texture
@dataclass(frozen=True)
class _Nuclei:
    """A population of nuclei, one per kept cell of a warped jittered lattice (``cell`` um); sizes in um."""

    cell: float
    keep: float  # share of cells that hold a nucleus
    radius: tuple  # (min, max) semi-minor axis
    aspect: tuple  # (min, max) semi-major / semi-minor
    haem: tuple  # (min, max) haematoxylin concentration
    warp: float  # lattice warp amplitude, in cells
    wobble: float  # outline irregularity


STROMA_NUCLEI = _Nuclei(cell=12.0, keep=0.30, radius=(1.3, 1.9), aspect=(1.8, 3.2), haem=(1.2, 1.6), warp=0.8,
                        wobble=0.1)
TUMOUR_NUCLEI = _Nuclei(cell=9.5, keep=0.88, radius=(3.0, 4.6), aspect=(1.0, 1.5), haem=(1.5, 2.4), warp=0.45,
                        wobble=0.35)
# solid high-grade tumour: large, crowded, hyperchromatic, pleomorphic nuclei; with its scant amphophilic
# cytoplasm a thumbnail shows it at least as dark and blue as a real dense tumour core (median about
# (108, 82, 150), red/blue about 0.72), the colour marker-ink filters mistake for blue ink
HIGH_GRADE_NUCLEI = _Nuclei(cell=8.0, keep=0.8, radius=(3.6, 5.2), aspect=(1.0, 1.4), haem=(1.1, 1.6), warp=0.4,
                            wobble=0.4)
HIGH_GRADE_CYTOPLASM = (0.3, 0.6)  # haematoxylin (mean; it varies by +-80% across a sheet), eosin concentration
# small, round, hyperchromatic, packed: more and darker nuclei than tumour, so "dark nuclei" is no tumour sign
LYMPHOCYTE_NUCLEI = _Nuclei(cell=7.0, keep=0.9, radius=(2.3, 2.9), aspect=(1.0, 1.15), haem=(2.3, 2.9), warp=0.3,
                            wobble=0.05)


def _nuclei_absorbance(nuc: _Nuclei, seed: int, scene: Scene, xs, ys, pixel: float,
                       where: np.ndarray) -> np.ndarray:
    """(h, w, 3) share of light the nuclei absorb, for nuclei centred where ``where`` (h, w) > 0. Discrete
    nuclei blend into their mean absorbance as the pixel outgrows them (what area averaging of level 0 gives).
    """
    r_mean = scene.px(sum(nuc.radius) / 2)
    span = scene.px(nuc.cell) / 2 - r_mean
    # nuclei wider than half their cell (crowded high-grade ones) stay discrete at every level: the ratio below
    # would turn negative and, clipped, paint them as their mean shade at level 0 alone
    blend = float(np.clip((pixel - r_mean) / span, 0, 1)) if span > 0 else 0.0
    if blend >= 1:
        return np.broadcast_to(_mean_absorbance(nuc, seed, scene), (ys.size, xs.size, 3))
    absorbed = _discrete_absorbance(nuc, seed, scene, xs, ys, pixel, where)
    return absorbed if blend <= 0 else (1 - blend) * absorbed + blend * _mean_absorbance(nuc, seed, scene)


def _mean_absorbance(nuc: _Nuclei, seed: int, scene: Scene) -> np.ndarray:
    """(3,) mean absorbance of the nuclei over a 160 um square drawn at level 0: the shade they average to."""
    xs = np.arange(math.ceil(scene.px(160))) + 0.5
    return _discrete_absorbance(nuc, seed, scene, xs, xs, 1.0, np.ones((xs.size, xs.size))).mean(axis=(0, 1))


def _discrete_absorbance(nuc: _Nuclei, seed: int, scene: Scene, xs, ys, pixel: float,
                         where: np.ndarray) -> np.ndarray:
    """(h, w, 3) absorbance of the individual nuclei, their haematoxylin textured (chromatin)."""
    density = _nuclei_density(nuc, seed, scene, xs, ys, pixel, where)
    density *= 1 + 0.22 * _noise(seed + 14, xs, ys, scene.px(0.9), pixel=pixel)
    absorbed = np.zeros((*density.shape, 3), np.float32)
    hit = density > 0  # nuclei cover a small share of the pixels: exp only there
    absorbed[hit] = 1 - np.exp(-np.asarray(scene.haem_od, np.float32) * scene.stain[0] * density[hit][:, None])
    return absorbed


def _nuclei_density(nuc: _Nuclei, seed: int, scene: Scene, xs, ys, pixel: float, where: np.ndarray) -> np.ndarray:
    """(h, w) haematoxylin density of the nuclei: each an ellipse splatted into its own small patch, with an
    anti-aliased outline roughened by noise; where nuclei overlap the denser wins."""
    cell = scene.px(nuc.cell)
    shape = (ys.size, xs.size)
    # the nuclei of the lattice cells within reach of this region, with their hashed parameters
    reach = (nuc.warp + 1) * cell + scene.px(nuc.radius[1] * nuc.aspect[1])
    cx = np.arange(math.floor((xs[0] - reach) / cell), math.ceil((xs[-1] + reach) / cell) + 1)
    cy = np.arange(math.floor((ys[0] - reach) / cell), math.ceil((ys[-1] + reach) / cell) + 1)
    gy, gx = np.nonzero(_hash01(seed + 6, cx[None, :], cy[:, None]) < nuc.keep)
    ix, iy = cx[gx], cy[gy]
    lattice_x, lattice_y = (cx + 0.5) * cell, (cy + 0.5) * cell
    centres_x = (ix + 0.2 + 0.6 * _hash01(seed + 1, ix, iy)) * cell
    centres_y = (iy + 0.2 + 0.6 * _hash01(seed + 2, ix, iy)) * cell
    centres_x += nuc.warp * cell * _noise(seed + 11, lattice_x, lattice_y, 2.7 * cell)[gy, gx]
    centres_y += nuc.warp * cell * _noise(seed + 12, lattice_x, lattice_y, 2.7 * cell)[gy, gx]

    # patches: the pixels each nucleus may touch; keep the nuclei centred in ``where`` that reach the region
    half = math.ceil(scene.px(nuc.radius[1] * nuc.aspect[1]) / pixel) + 1  # outline + its anti-aliasing
    size = 2 * half + 1
    col = np.rint((centres_x - xs[0]) / pixel).astype(np.int64)  # the pixel whose centre is nearest
    row = np.rint((centres_y - ys[0]) / pixel).astype(np.int64)
    col0, row0 = col - half, row - half
    keep = (col0 + size > 0) & (col0 < shape[1]) & (row0 + size > 0) & (row0 < shape[0])
    keep &= where[np.clip(row, 0, shape[0] - 1), np.clip(col, 0, shape[1] - 1)] > 0
    density = np.zeros(shape, np.float32)
    if not keep.any():
        return density
    ix, iy, col0, row0 = ix[keep], iy[keep], col0[keep, None, None], row0[keep, None, None]
    centres_x, centres_y = centres_x[keep, None, None], centres_y[keep, None, None]
    minor = scene.px(nuc.radius[0]) + scene.px(nuc.radius[1] - nuc.radius[0]) * _hash01(seed + 3, ix, iy)
    major = minor * (nuc.aspect[0] + (nuc.aspect[1] - nuc.aspect[0]) * _hash01(seed + 4, ix, iy))
    angle = math.pi * _hash01(seed + 5, ix, iy)
    conc = nuc.haem[0] + (nuc.haem[1] - nuc.haem[0]) * _hash01(seed + 7, ix, iy)
    minor, major, conc = minor[:, None, None], major[:, None, None], conc[:, None, None]

    offsets = np.arange(size)
    cols = col0 + offsets[None, None, :]
    rows = row0 + offsets[None, :, None]
    dx = (xs[0] + cols * pixel - centres_x).astype(np.float32)  # xs, ys are pixel centres
    dy = (ys[0] + rows * pixel - centres_y).astype(np.float32)
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (dx * c + dy * s) / major
    v = (dy * c - dx * s) / minor
    valid = (cols >= 0) & (cols < shape[1]) & (rows >= 0) & (rows < shape[0])
    flat = np.where(valid, rows * shape[1] + cols, 0)
    rough = nuc.wobble * _noise(seed + 13, xs, ys, scene.px(1.6), pixel=pixel).ravel()[flat]
    cover = _edge((1 - np.sqrt(u * u + v * v) - rough) * minor, pixel)
    np.maximum.at(density.ravel(), flat[valid], (cover * conc)[valid])
    return density


def _fat_septa(scene: Scene, xs, ys, pixel: float) -> np.ndarray:
    """Coverage of the thin walls between fat vacuoles: the bisectors of a jittered point lattice (Voronoi)."""
    cell = scene.px(70.0)
    half_width = scene.px(1.6)
    gx, gy = xs / cell, ys / cell
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    cx = np.arange(ix[0] - 1, ix[-1] + 2)[None, :]  # the lattice cells in reach, one point each
    cy = np.arange(iy[0] - 1, iy[-1] + 2)[:, None]
    points_x = cx + 0.15 + 0.7 * _hash01(scene.seed + 21, cx, cy)
    points_y = cy + 0.15 + 0.7 * _hash01(scene.seed + 22, cx, cy)
    nearest = np.full((ys.size, xs.size), np.inf, np.float32)  # distance to the nearest point, then the next
    second = nearest.copy()
    for ox in (0, 1, 2):
        for oy in (0, 1, 2):
            r, c = (iy - iy[0] + oy)[:, None], (ix - ix[0] + ox)[None, :]
            d = np.hypot(gx[None, :] - points_x[r, c], gy[:, None] - points_y[r, c]) * cell
            np.minimum(second, np.maximum(nearest, d), out=second)
            np.minimum(nearest, d, out=nearest)
    to_wall = (second - nearest) / 2
    return _overlap(to_wall, -half_width, half_width, pixel)


# ------------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _Layers:
    """Coverages (0..1) of what lies at each pixel of a region."""

    tissue: np.ndarray
    tumour: np.ndarray
    lymphoid: np.ndarray
    fat: np.ndarray
    solid: np.ndarray
    blood: np.ndarray
    mucin: np.ndarray
    pens: list  # (coverage, halo density, PenStroke)
    specks: list  # (coverage, Speck)


def _layers(scene: Scene, xs: np.ndarray, ys: np.ndarray, pixel: float) -> _Layers:
    shape = (ys.size, xs.size)
    region = (math.floor(xs[0] - pixel), math.floor(ys[0] - pixel), math.ceil(xs[-1] + pixel) + 1,
              math.ceil(ys[-1] + pixel) + 1)
    tissue = np.zeros(shape, np.float32)
    fat = np.zeros(shape, np.float32)
    for i, blob in enumerate(scene.tissue):
        if not _intersects(blob.box(), region):
            continue
        sd = blob.signed_distance(xs, ys, pixel)
        np.maximum(tissue, _edge(sd, pixel), out=tissue)
        if i < scene.n_main:  # fat: lobules in the inner part of main pieces, never at the rim
            inner = _edge(sd - scene.px(150), pixel)
            if inner.any():
                spacing = max(scene.px(260), 0.25 * min(blob.rx, blob.ry))  # larger lobules in larger pieces
                lobules = _noise(scene.seed + 31 + i, xs, ys, spacing, pixel=pixel)
                np.maximum(fat, inner * _edge((lobules - 0.3) * spacing, pixel), out=fat)
    def cover(blobs) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        for blob in blobs:
            if _intersects(blob.box(), region):
                np.maximum(out, _edge(blob.signed_distance(xs, ys, pixel), pixel), out=out)
        return out

    # each kind claims what the kinds before it left: tumour foci, solid tumour, lymphoid, blood, mucin
    tumour = cover(scene.tumours)
    solid = cover(scene.solid) * (1 - tumour)
    lymphoid = cover(scene.lymphoid)
    lymphoid *= 1 - tumour - solid
    blood = cover(scene.blood) * (1 - tumour - solid - lymphoid)
    mucin = cover(scene.mucin) * (1 - tumour - solid - lymphoid - blood)
    np.maximum(tissue, tumour + lymphoid + solid + blood + mucin, out=tissue)
    fat *= 1 - tumour - lymphoid - solid - blood - mucin
    pens = [(*s.coverage(xs, ys, pixel), s) for s in scene.strokes if _intersects(s.box(), region)]
    specks = [(s.coverage(xs, ys, pixel), s) for s in scene.specks if _intersects(s.box(), region)]
    return _Layers(tissue, tumour, lymphoid, fat, solid, blood, mucin, pens, specks)


def render(scene: Scene, x0: float, y0: float, pixel: float, light: np.ndarray) -> np.ndarray:
    """RGB uint8 of the region whose top-left is level-0 (x0, y0), pixels ``pixel`` level-0 px wide, lit by
    ``light`` (h, w, 3), the glass's brightness with its noise; defects (:mod:`wsi_synth.defects`) alter the
    specimen before the light and the noise."""
    h, w = light.shape[:2]
    xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * pixel
    ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * pixel
    if scene.defects:
        transmit = demo_defects.apply(scene.defects, lambda gx, gy: _transmittance(scene, gx, gy, pixel), xs, ys,
                                      pixel)
    else:
        transmit = _transmittance(scene, xs, ys, pixel)
    return np.clip(light * transmit * np.asarray(scene.cast, np.float32) + 0.5, 0, 255).astype(np.uint8)


def _transmittance(scene: Scene, xs: np.ndarray, ys: np.ndarray, pixel: float) -> np.ndarray:
    """(h, w, 3) light the specimen (tissue, marks) lets through on the grid ``ys x xs``."""
    lay = _layers(scene, xs, ys, pixel)
    transmit = np.ones((ys.size, xs.size, 3), np.float32)
    if lay.tissue.any():
        transmit = _tissue_transmittance(scene, lay, xs, ys, pixel)
    _apply_marks(transmit, lay.pens, lay.specks, xs, ys, pixel)
    return transmit


def _apply_marks(transmit: np.ndarray, pens: list, specks: list, xs, ys, pixel: float) -> None:
    """Multiply ``transmit`` (h, w, 3) in place by what dust, smudges and marker ink let through: each adds its
    optical density to what lies under it (a stroke's density varies by +-15% along it)."""
    for cov, speck in specks:
        ink = SMUDGE_T if speck.smudge else np.asarray(speck.ink, np.float32)
        transmit *= 1 - cov[..., None] * (1 - ink)
    for cov, halo, stroke in pens:
        density = 0.85 + 0.15 * _noise(stroke.seed, xs, ys, stroke.half_width * 3, stroke.half_width / 3,
                                       pixel=pixel)
        ink = np.asarray(PEN_INKS[stroke.colour], np.float32)
        transmit *= 1 - cov[..., None] * (1 - ink ** density[..., None])
        if stroke.halo:
            transmit *= ink ** halo[..., None]


def _marks_truth(pens: list, specks: list, shape: tuple) -> dict[str, np.ndarray]:
    """Truth of drawn marks: ``pen`` where a stroke covers half a pixel or its halo is visible, ``halo`` that
    visible halo alone (what lies under it shows through), ``speck`` where dust covers 5%."""
    out = {k: np.zeros(shape, bool) for k in ("pen", "halo", "speck")}
    for cov, halo, _ in pens:
        out["pen"] |= cov > 0.5
        out["halo"] |= (cov <= 0.5) & (halo >= INK_VISIBLE_DENSITY)
    out["halo"] &= ~out["pen"]
    out["pen"] |= out["halo"]
    for cov, _ in specks:
        out["speck"] |= cov > 0.05
    return out


def composite_marks(rgb: np.ndarray, strokes: Sequence[PenStroke] = (), specks: Sequence[Speck] = ()
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Marker ``strokes`` and dust ``specks`` (in the image's pixels) drawn over a real image ``rgb`` as a
    slide's own are drawn: each adds its optical density to what lies under it (Beer-Lambert). Returns the
    image (uint8) and the truth masks ``pen``, ``halo`` and ``speck`` (see :meth:`SyntheticSlide.truth_masks`)."""
    h, w = rgb.shape[:2]
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    pens = [(*s.coverage(xs, ys, 1.0), s) for s in strokes]
    dust = [(s.coverage(xs, ys, 1.0), s) for s in specks]
    transmit = np.ones((h, w, 3), np.float32)
    _apply_marks(transmit, pens, dust, xs, ys, 1.0)
    out = np.clip(rgb * transmit + 0.5, 0, 255).astype(np.uint8)
    return out, _marks_truth(pens, dust, (h, w))


def glass_texture(scene: Scene, pixel: float) -> np.ndarray:
    """(2P, 2P, 3) float32 glass brightness with per-pixel noise, for pixels ``pixel`` level-0 px wide (fainter
    when coarser, as averaging makes it). It repeats every ``GLASS_PERIOD`` px; doubled so a window fits."""
    noise = np.random.default_rng([scene.seed, 0x61A55, round(pixel * 1000)]).standard_normal(
        (GLASS_PERIOD, GLASS_PERIOD, 3), np.float32)
    glass = np.asarray(scene.glass_rgb, np.float32)
    return np.tile(glass + noise * np.float32(GLASS_NOISE_LEVELS / pixel), (2, 2, 1))


def illumination(scene: Scene, texture: np.ndarray, col: int, row: int, width: int, height: int,
           pixel: float) -> np.ndarray:
    """The light (height, width, 3) reaching the level pixels from (col, row): the glass texture's window, with
    the scanner's field gains and white padding where the slide has them."""
    light = _window(texture, col, row, width, height)
    return light if scene.scan is None else scene.scan.light(light, col * pixel, row * pixel, pixel)


def _window(texture: np.ndarray, col: int, row: int, width: int, height: int) -> np.ndarray:
    """The ``height x width`` window of a periodic texture whose top-left is level pixel (col, row)."""
    if width <= GLASS_PERIOD and height <= GLASS_PERIOD:
        r, c = row % GLASS_PERIOD, col % GLASS_PERIOD
        return texture[r:r + height, c:c + width]
    rows = (row + np.arange(height)) % GLASS_PERIOD
    cols = (col + np.arange(width)) % GLASS_PERIOD
    return texture[rows[:, None], cols[None, :]]


def render_region(scene: Scene, downsample: float, col: int, row: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the level with this downsample, from level pixel (col, row); rendered in
    bands so memory stays bounded."""
    glass = glass_texture(scene, downsample)
    band = 512
    return np.concatenate([
        render(scene, col * downsample, r * downsample, downsample,
                illumination(scene, glass, col, r, width, min(band, row + height - r), downsample))
        for r in range(row, row + height, band)], axis=0)


def _tissue_transmittance(scene: Scene, lay: _Layers, xs, ys, pixel: float) -> np.ndarray:
    """(h, w, 3) light transmitted by the tissue (1 on glass): stroma, fat, lymphoid and tumour backgrounds, then
    nuclei; the slide's stain strengths scale every optical density."""
    seed = scene.seed
    eosin_od = np.asarray(scene.eosin_od, np.float32) * scene.stain[1]
    haem_od = np.asarray(scene.haem_od, np.float32) * scene.stain[0]
    big = _noise(seed + 41, xs, ys, scene.px(300), pixel=pixel)
    fibres_x = _noise(seed + 42, xs, ys, scene.px(40), scene.px(5), pixel=pixel)
    fibres_y = _noise(seed + 43, xs, ys, scene.px(5), scene.px(40), pixel=pixel)
    along_x = np.clip(0.5 + 1.5 * _noise(seed + 44, xs, ys, scene.px(300), pixel=pixel), 0, 1)
    eosin = 0.58 + 0.08 * big + 0.22 * (along_x * fibres_x + (1 - along_x) * fibres_y)
    stroma_t = np.exp(-eosin_od * eosin[..., None] - haem_od * 0.05)

    w_tum, w_lym, w_fat = lay.tumour, lay.lymphoid, lay.fat
    w_str = np.clip(1 - w_tum - w_lym - w_fat - lay.solid - lay.blood - lay.mucin, 0, 1)
    absorbed = w_str[..., None] * _nuclei_absorbance(STROMA_NUCLEI, seed + 100, scene, xs, ys, pixel,
                                                     w_str * lay.tissue)
    background = w_str[..., None] * stroma_t
    if w_fat.any():
        septa = _fat_septa(scene, xs, ys, pixel)[..., None]
        septa_t = np.exp(-eosin_od * 0.95 - haem_od * 0.05)
        background += w_fat[..., None] * (1 - septa * (1 - septa_t))
    if w_tum.any():
        cytoplasm = 0.42 + 0.06 * big
        tum_t = np.exp(-eosin_od * cytoplasm[..., None] - haem_od * 0.22)
        background += w_tum[..., None] * tum_t
        absorbed += w_tum[..., None] * _nuclei_absorbance(TUMOUR_NUCLEI, seed + 200, scene, xs, ys, pixel, w_tum)
    if w_lym.any():  # scant cytoplasm between the lymphocytes
        background += w_lym[..., None] * np.exp(-eosin_od * 0.3 - haem_od * 0.12)
        absorbed += w_lym[..., None] * _nuclei_absorbance(LYMPHOCYTE_NUCLEI, seed + 300, scene, xs, ys, pixel,
                                                          w_lym)
    if lay.solid.any():  # scant amphophilic (bluish) cytoplasm between crowded nuclei
        haem = HIGH_GRADE_CYTOPLASM[0] * (1 + 0.8 * _noise(seed + 55, xs, ys, scene.px(120), pixel=pixel))
        background += lay.solid[..., None] * np.exp(-eosin_od * HIGH_GRADE_CYTOPLASM[1] - haem_od * haem[..., None])
        absorbed += lay.solid[..., None] * _nuclei_absorbance(HIGH_GRADE_NUCLEI, seed + 400, scene, xs, ys, pixel,
                                                              lay.solid)
    if lay.blood.any():  # packed red cells, denser in clots; eosin stains them
        density = 0.8 + 0.12 * _noise(seed + 51, xs, ys, scene.px(4), pixel=pixel) + 0.12 * _noise(
            seed + 52, xs, ys, scene.px(60), pixel=pixel)
        background += lay.blood[..., None] * BLOOD_T ** (density[..., None] * scene.stain[1])
    if lay.mucin.any():  # pale blue-grey pools with wispy strands (mucin takes a little haematoxylin)
        strands = _noise(seed + 53, xs, ys, scene.px(30), scene.px(8), pixel=pixel)
        conc = 0.55 + 0.2 * strands + 0.1 * _noise(seed + 54, xs, ys, scene.px(200), pixel=pixel)
        background += lay.mucin[..., None] * np.exp(-(haem_od * 0.3 + eosin_od * 0.06) * conc[..., None])
    background *= 1 - absorbed
    if lay.tissue.min() == 1:  # the common tile: all tissue
        return background
    t = lay.tissue[..., None]
    return 1 - t + t * background


# -------------------------------------------------------------------------------------- scene generation
def _clear_of(blobs: Sequence[_Blob], x: float, y: float, r: float, margin: float) -> bool:
    """Whether the square of half-side ``r`` around (x, y) stays ``margin`` px outside every blob."""
    xs, ys = np.linspace(x - r, x + r, 5), np.linspace(y - r, y + r, 5)
    return all(b.signed_distance(xs, ys, 1.0).max() < -margin for b in blobs)


def make_scene(path: Path, width: int, height: int, um: float, seed: int, tumour_boxes: Sequence[Box],
               tumour_tiles: int, pen_marks: bool, specks: bool, lymphoid_aggregates: int = 0,
               stain: tuple = (1.0, 1.0), hard: HardCases | None = None) -> Scene:
    """Where everything goes, drawn from ``seed``: one or two main tissue pieces scaled to the slide, up to
    three small fragments on the glass, tumour, pen arcs along the main pieces' rims, specks and smudges, then
    lymphoid aggregates and the ``hard`` cases, each from its own random stream, so asking for none of them
    leaves the rest of the slide as it was."""
    rng = np.random.default_rng([seed, 0x5EED])
    seeds = iter(rng.integers(1, 2 ** 31, size=1000).tolist())
    short = min(width, height)

    main: list[_Blob] = []
    n_main = 1 if short < 3000 or rng.random() < 0.4 else 2
    for k in range(n_main):
        if n_main == 1:
            cx, cy = width * rng.uniform(0.42, 0.58), height * rng.uniform(0.42, 0.58)
            rx, ry = width * rng.uniform(0.24, 0.30), height * rng.uniform(0.24, 0.30)
        else:
            cx = width * (0.3 + 0.4 * k + rng.uniform(-0.04, 0.04))
            cy = height * rng.uniform(0.42, 0.58)
            rx, ry = width * rng.uniform(0.14, 0.18), height * rng.uniform(0.25, 0.30)
        main.append(_Blob(cx, cy, rx, ry, rng.uniform(-0.4, 0.4), wobble=0.18, power=2, inward=False,
                          seed=next(seeds)))

    fragments: list[_Blob] = []  # small biopsy fragments (110-190 um), clear of the main pieces and each other
    for _ in range(60):
        r = rng.uniform(110, 190) / um
        if len(fragments) == 3 or short < 6 * r:
            break
        cx, cy = rng.uniform(1.6 * r, width - 1.6 * r), rng.uniform(1.6 * r, height - 1.6 * r)
        if _clear_of(main + fragments, cx, cy, 1.5 * r, 0.04 * short):
            fragments.append(_Blob(cx, cy, r * rng.uniform(1.0, 1.4), r, rng.uniform(0, math.pi), wobble=0.15,
                                   power=2, inward=False, seed=next(seeds)))

    tumours = [_Blob((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2, 0.0, wobble=0.12, power=4,
                     inward=True, seed=next(seeds)) for x0, y0, x1, y1 in tumour_boxes]
    for _ in range(tumour_tiles):  # foci of about one 256-px tile at 0.5 um/px, well inside a main piece
        for _attempt in range(200):
            half = rng.uniform(60, 80) / um
            cx, cy = rng.uniform(half, width - half), rng.uniform(half, height - half)
            inside = any(b.signed_distance(np.array([cx]), np.array([cy]), 1.0)[0, 0] > 1.3 * half for b in main)
            if inside and all(math.hypot(cx - t.cx, cy - t.cy) > 2.5 * half for t in tumours):
                tumours.append(_Blob(cx, cy, half * rng.uniform(0.9, 1.1), half * rng.uniform(0.9, 1.1), 0.0,
                                     wobble=0.15, power=4, inward=True, seed=next(seeds)))
                break
        else:
            raise ConfigError(path, f"no room for {tumour_tiles} tumour foci in a {width} x {height} slide",
                              "ask for fewer tumour_tiles or a larger slide")

    strokes: list[PenStroke] = []
    if pen_marks:  # arcs along the main pieces' rims, the way pathologists circle a region
        for k, colour in enumerate(PEN_INKS):
            blob = main[k % len(main)]
            start = 2 * math.pi * (k // len(main)) / math.ceil(len(PEN_INKS) / len(main)) + rng.uniform(0, 1)
            angles = start + np.linspace(0, rng.uniform(0.8, 1.3), 40)  # strokes on one piece spread round it
            scale = rng.uniform(1.02, 1.22) * (1 + 0.03 * np.sin(np.linspace(0, rng.uniform(3, 9), 40)))
            c, s = math.cos(blob.angle), math.sin(blob.angle)
            ex, ey = blob.rx * scale * np.cos(angles), blob.ry * scale * np.sin(angles)
            pts = np.stack([blob.cx + ex * c - ey * s, blob.cy + ex * s + ey * c], 1)
            pts = np.clip(pts, 0.02 * short, [width - 0.02 * short, height - 0.02 * short])
            strokes.append(PenStroke(tuple(map(tuple, pts.round(1).tolist())), max(6.0, 0.02 * short), colour,
                                   next(seeds)))

    dirt: list[Speck] = []
    if specks:  # smudges first (they need the room), then specks; all on glass, apart from each other
        for smudge, count in ((True, 3), (False, 14)):
            placed = 0
            for _ in range(400):
                if placed == count:
                    break
                r = min(rng.uniform(120, 250) / um, short / 10) if smudge else rng.uniform(3, 22) / um
                x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
                apart = all(math.hypot(x - o.cx, y - o.cy) > r + o.radius + 60 / um for o in dirt)
                if apart and _clear_of(main + fragments, x, y, r, 60 / um):
                    dirt.append(Speck(x, y, r, SPECK_TS[int(rng.integers(len(SPECK_TS)))], smudge, next(seeds)))
                    placed += 1
    place = _BlobPlacer(path, width, height, um, main)
    # lymphoid aggregates: round, 70-150 um radius (one to a few tiles), inside the main pieces, apart from tumour
    lymphoid = place("lymphoid aggregates", np.random.default_rng([seed, 0x1A6]), lymphoid_aggregates, (70, 150),
                     depth=(1.0, math.inf), avoid=tumours, wobble=0.2, inward=True)
    scene = Scene(width, height, um, seed, tuple(main + fragments), len(main), tuple(tumours), tuple(strokes),
                   tuple(dirt), tuple(lymphoid), tuple(float(v) for v in stain))
    return scene if hard is None else _hard_cases(scene, hard, place)


@dataclass(frozen=True)
class _BlobPlacer:
    """Places round blobs relative to a slide's main tissue pieces."""

    path: Path
    width: int
    height: int
    um: float
    main: Sequence[_Blob]

    def __call__(self, what: str, rng: np.random.Generator, count: int, radius_um: tuple, *, depth: tuple,
                 avoid: Sequence[_Blob] = (), wobble: float, inward: bool, max_radius: float = math.inf
                 ) -> list[_Blob]:
        """``count`` blobs of ``radius_um`` (min, max; at most ``max_radius`` px) whose centres lie between
        ``depth`` (lo, hi) radii inside a main piece's outline (negative: outside it), apart from ``avoid``
        and each other."""
        placed: list[_Blob] = []
        for _ in range(count):
            for _attempt in range(300):
                r = min(rng.uniform(*radius_um) / self.um, max_radius)
                cx, cy = rng.uniform(r, self.width - r), rng.uniform(r, self.height - r)
                inside = max(b.signed_distance(np.array([cx]), np.array([cy]), 1.0)[0, 0] for b in self.main) / r
                if depth[0] < inside < depth[1] and all(
                        math.hypot(cx - o.cx, cy - o.cy) > r + max(o.rx, o.ry) + 60 / self.um
                        for o in (*avoid, *placed)):
                    placed.append(_Blob(cx, cy, r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15),
                                        rng.uniform(0, math.pi), wobble=wobble, power=2, inward=inward,
                                        seed=int(rng.integers(1, 2 ** 31))))
                    break
            else:
                raise ConfigError(self.path, f"no room for {count} {what} in a {self.width} x {self.height} slide",
                                  f"ask for fewer {what} or a larger slide")
        return placed


@dataclass(frozen=True)
class SiteProfile:
    """How one institution's slides look: its lab's stain vectors (optical density per unit stain, R, G, B: the
    hue of its haematoxylin and eosin) and strengths, its scanner's colour cast (gain per RGB channel) and JPEG
    quality. Labs differ in hue and strength (dye lots, staining times, section thickness) and scanners in white
    balance and compression: the site signature a model can learn as a shortcut."""

    name: str
    haem_od: tuple = tuple(HAEM_OD.tolist())
    eosin_od: tuple = tuple(EOSIN_OD.tolist())
    stain: tuple = (1.0, 1.0)
    cast: tuple = (1.0, 1.0, 1.0)
    jpeg_quality: int = 85


# Four sites as different as real ones: a purple lab with a neutral scanner, a pale lab whose scanner casts
# yellow, an orange-eosin lab with a blue cast and heavy compression, and a dark blue-haematoxylin lab.
SITE_PROFILES = {p.name: p for p in (
    SiteProfile("A", haem_od=(0.60, 0.85, 0.24), stain=(1.35, 0.9), cast=(1.0, 0.98, 1.0), jpeg_quality=90),
    SiteProfile("B", haem_od=(0.55, 0.70, 0.30), eosin_od=(0.04, 0.55, 0.28), stain=(0.8, 1.1),
                cast=(1.0, 0.98, 0.92), jpeg_quality=80),
    SiteProfile("C", eosin_od=(0.03, 0.45, 0.35), stain=(1.0, 1.25), cast=(0.94, 0.97, 1.0), jpeg_quality=65),
    SiteProfile("D", haem_od=(0.75, 0.72, 0.22), eosin_od=(0.07, 0.62, 0.18), stain=(1.2, 0.8),
                cast=(0.96, 1.0, 0.95), jpeg_quality=85),
)}


@dataclass(frozen=True)
class HardCases:
    """What a lab's slides show that easy synthetic slides do not (see :func:`write_synthetic_slide`)."""

    solid_tumours: int = 0  # solid sheets of high-grade tumour, as dark and blue as real dense tumour
    haemorrhage: int = 0  # pools of blood, as red as red marker ink, at a piece's rim
    mucin: int = 0  # pale blue-grey mucin pools, at a piece's rim or inside
    pen_over_tissue: bool = False  # a blue and a red marker stroke drawn across a main piece
    scanner_padding: bool = False  # stitched grey fields with brightness steps, white padding outside them
    glass_rgb: tuple | None = None  # the scanned glass's colour (None: GLASS_RGB)
    pen_off_edge: int = 0  # marker strokes that run off the slide's edge (half with a halo), dust specks beside each
    ink_halos: int = 0  # dense marker blots on a main piece's rim that fade into a halo on the glass


def _hard_cases(scene: Scene, hard: HardCases, place: _BlobPlacer) -> Scene:
    """``scene`` with ``hard`` added, each from its own random stream."""
    um, main = scene.um, place.main
    biggest = max(main, key=lambda b: min(b.rx, b.ry))
    taken = (*scene.tumours, *scene.lymphoid)
    solid = place("solid tumours", np.random.default_rng([scene.seed, 0x50D]), hard.solid_tumours, (300, 700),
                  depth=(0.3, math.inf), avoid=taken, wobble=0.25, inward=False,
                  max_radius=0.6 * min(biggest.rx, biggest.ry))
    blood = place("haemorrhages", np.random.default_rng([scene.seed, 0xB100D]), hard.haemorrhage, (100, 300),
                  depth=(-0.3, 0.3), avoid=(*taken, *solid), wobble=0.3, inward=False)
    mucin = place("mucin pools", np.random.default_rng([scene.seed, 0x3C1]), hard.mucin, (150, 400),
                  depth=(-0.2, math.inf), avoid=(*taken, *solid, *blood), wobble=0.25, inward=False,
                  max_radius=0.5 * min(biggest.rx, biggest.ry))
    strokes = scene.strokes
    if hard.pen_over_tissue:  # straight-ish strokes right across the first main piece, as when a case is marked
        rng = np.random.default_rng([scene.seed, 0x1C4])
        blob, short = main[0], min(scene.width, scene.height)
        crossing = []
        for colour in ("blue", "red"):
            angle = rng.uniform(0, math.pi)
            t = np.linspace(-1.2, 1.2, 24)
            bend = 0.08 * max(blob.rx, blob.ry) * np.sin(np.pi * t / 1.2 + rng.uniform(0, math.pi))
            ex, ey = t * blob.rx * math.cos(angle), t * blob.ry * math.sin(angle)
            pts = np.stack([blob.cx + ex - bend * math.sin(angle), blob.cy + ey + bend * math.cos(angle)], 1)
            pts = np.clip(pts, 0.02 * short, [scene.width - 0.02 * short, scene.height - 0.02 * short])
            crossing.append(PenStroke(tuple(map(tuple, pts.round(1).tolist())), max(6.0, 0.015 * short), colour,
                                    int(rng.integers(1, 2 ** 31))))
        strokes = strokes + tuple(crossing)
    edge_strokes, dust = _off_edge_strokes(scene, hard.pen_off_edge, np.random.default_rng([scene.seed, 0xED6E]))
    blots = _halo_blots(scene, main, hard.ink_halos, np.random.default_rng([scene.seed, 0x4A10]))
    scene = dataclasses.replace(scene, solid=tuple(solid), blood=tuple(blood), mucin=tuple(mucin),
                                strokes=strokes + edge_strokes + blots, specks=scene.specks + dust,
                                glass_rgb=tuple(hard.glass_rgb or scene.glass_rgb))
    if hard.scanner_padding:  # the fields near anything drawn were scanned; the rest is padding
        rng = np.random.default_rng([scene.seed, 0x5CA7])
        field = (SCANNER_FIELD_UM[0] / um, SCANNER_FIELD_UM[1] / um)
        cols, rows = math.ceil(scene.width / field[0]), math.ceil(scene.height / field[1])
        scanned = np.zeros((rows, cols), bool)
        margin = 100 / um
        for x0, y0, x1, y1 in (o.box() for o in scene.objects()):
            scanned[max(0, int((y0 - margin) // field[1])):int((y1 + margin) // field[1]) + 1,
                    max(0, int((x0 - margin) // field[0])):int((x1 + margin) // field[0]) + 1] = True
        gain = 1 + rng.uniform(-0.009, 0.009, scanned.shape)  # about +-2 levels from field to field
        scene = dataclasses.replace(scene, scan=_ScanArea(field, tuple(map(tuple, scanned.tolist())),
                                                          tuple(map(tuple, gain.tolist()))))
    return scene


def _off_edge_strokes(scene: Scene, count: int, rng: np.random.Generator) -> tuple[tuple, tuple]:
    """``count`` marker strokes, each from a point in the slide's middle part (on glass or tissue) out past one of
    its edges, every other one with a halo, and two dust specks on the glass beside each: (strokes, specks)."""
    width, height, um = scene.width, scene.height, scene.um
    short = min(width, height)
    strokes, dust = [], []
    for k in range(count):
        start = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
        side = int(rng.integers(4))  # left, right, top, bottom; the stroke ends 3-10% of the short side past it
        past = rng.uniform(0.03, 0.1) * short
        along = rng.uniform(0.1, 0.9)
        end = np.array([(-past, along * height), (width + past, along * height), (along * width, -past),
                        (along * width, height + past)][side])
        t = np.linspace(0, 1, 24)[:, None]
        normal = np.array([-(end - start)[1], (end - start)[0]]) / np.hypot(*(end - start))
        bend = rng.uniform(-0.06, 0.06) * np.hypot(*(end - start)) * np.sin(np.pi * t)
        pts = start + t * (end - start) + bend * normal
        half_width = rng.uniform(0.012, 0.025) * short / 2 + 6
        halo = (rng.uniform(30, 120) / um, rng.uniform(0.1, 0.3)) if k % 2 else (0.0, 0.0)
        strokes.append(PenStroke(tuple(map(tuple, pts.round(1).tolist())), half_width,
                               list(PEN_INKS)[int(rng.integers(len(PEN_INKS)))], int(rng.integers(1, 2 ** 31)),
                               *halo))
        for _ in range(2):  # dust beside the stroke, on the glass
            for _attempt in range(50):
                i = int(rng.integers(len(pts)))
                r = rng.uniform(8, 30) / um
                off = half_width + halo[0] * 2 + rng.uniform(40, 150) / um + r
                x, y = pts[i] + rng.choice((-1, 1)) * off * normal
                if r <= x <= width - r and r <= y <= height - r and _clear_of(scene.tissue, x, y, r, 60 / um):
                    dust.append(Speck(x, y, r, SPECK_TS[int(rng.integers(len(SPECK_TS)))], False,
                                       int(rng.integers(1, 2 ** 31))))
                    break
    return tuple(strokes), tuple(dust)


def _halo_blots(scene: Scene, main: Sequence[_Blob], count: int, rng: np.random.Generator) -> tuple:
    """``count`` dense marker blots (short, wide strokes, 150-350 um half-wide) centred on a main piece's rim,
    each fading into a halo of 100-300 um on the glass, at 0.15-0.4 of the ink's density at its edge."""
    blots = []
    for _ in range(count):
        blob = main[int(rng.integers(len(main)))]
        angle = rng.uniform(0, 2 * math.pi)
        c, s = math.cos(blob.angle), math.sin(blob.angle)
        ex, ey = blob.rx * math.cos(angle), blob.ry * math.sin(angle)
        centre = np.array([blob.cx + ex * c - ey * s, blob.cy + ex * s + ey * c])
        direction = rng.uniform(0, math.pi)
        length = rng.uniform(200, 800) / scene.um
        offsets = np.linspace(-0.5, 0.5, 3)[:, None] * length * np.array([math.cos(direction), math.sin(direction)])
        blots.append(PenStroke(tuple(map(tuple, (centre + offsets).round(1).tolist())),
                             rng.uniform(150, 350) / scene.um, list(PEN_INKS)[int(rng.integers(len(PEN_INKS)))],
                             int(rng.integers(1, 2 ** 31)), rng.uniform(100, 300) / scene.um, rng.uniform(0.15, 0.4)))
    return tuple(blots)


# ----------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class SyntheticSlide:
    """A slide written by :func:`write_synthetic_slide` and the level-0 boxes (x0, y0, x1, y1) of what it shows.

    ``tissue_boxes`` bound each tissue piece (main pieces first, then small fragments), ``tumour_boxes`` each tumour
    region (the given boxes first, then the foci, then solid sheets), ``pen_boxes`` each pen stroke (one per ink, in
    :data:`PEN_INKS` order: blue, green, black, red; then the strokes across tissue), ``speck_boxes`` each
    dust/debris speck and smudge, ``lymphoid_boxes`` each lymphoid aggregate, all clipped to the slide. Boxes
    bound their objects (a focus fills about 80% of its box); :meth:`truth_masks` gives the exact pixels and
    :meth:`render_level` the exact colours. ``scene`` is the drawing's private description.
    """

    path: Path
    width: int
    height: int
    mpp: float | None
    tumour_boxes: tuple[Box, ...]
    tissue_boxes: tuple[Box, ...]
    pen_boxes: tuple[Box, ...]
    speck_boxes: tuple[Box, ...]
    lymphoid_boxes: tuple[Box, ...]
    scene: Scene = field(repr=False, compare=False)

    def render_level(self, downsample: float, col: int, row: int, width: int, height: int) -> np.ndarray:
        """The RGB pixels (height, width, 3) the writer JPEG-encoded for the level with this ``downsample``,
        from level pixel (col, row): ground truth for pixel reads (level pixel i covers level-0
        [i * downsample, (i + 1) * downsample))."""
        return render_region(self.scene, downsample, col, row, width, height)

    def truth_masks(self, downsample: float) -> dict[str, np.ndarray]:
        """Ground truth on the grid of ``ceil(h / downsample) x ceil(w / downsample)`` pixels (sampled at their
        centres): boolean ``tissue`` (blood and mucin included), ``tumour`` (solid sheets included), ``lymphoid``,
        ``fat``, ``blood``, ``mucin``, ``pen`` (marker ink, and its halo where at least ``INK_VISIBLE_DENSITY`` of
        the full ink's density), ``halo`` (that halo alone: what lies under it shows through), ``speck`` (specks
        and smudges) and ``padding`` (never scanned); with defects also ``blur_um`` (float: the blur sigma or disk
        radius in um, 0 where sharp), ``fold`` and ``bubble`` (:func:`wsi_synth.defects.truth`)."""
        w, h = math.ceil(self.width / downsample), math.ceil(self.height / downsample)
        kinds = ("tissue", "tumour", "lymphoid", "fat", "blood", "mucin", "pen", "halo", "speck", "padding")
        out = {k: np.zeros((h, w), bool) for k in kinds}
        step = 512
        for r in range(0, h, step):
            ys = (np.arange(r, min(h, r + step)) + 0.5) * downsample
            xs = (np.arange(w) + 0.5) * downsample
            lay = _layers(self.scene, xs, ys, downsample)
            rows = slice(r, r + ys.size)
            out["tissue"][rows] = lay.tissue > 0.5
            out["tumour"][rows] = lay.tumour + lay.solid > 0.5
            out["lymphoid"][rows] = lay.lymphoid > 0.5
            out["fat"][rows] = (lay.fat > 0.5) & (lay.tissue > 0.5)
            out["blood"][rows] = lay.blood > 0.5
            out["mucin"][rows] = lay.mucin > 0.5
            if self.scene.scan is not None:
                out["padding"][rows] = self.scene.scan.padding(xs, ys)
            for kind, where in _marks_truth(lay.pens, lay.specks, (ys.size, xs.size)).items():
                out[kind][rows] = where
            if self.scene.defects:
                found = demo_defects.truth(self.scene.defects, xs, ys,
                                           lambda gx, gy: _layers(self.scene, gx, gy, downsample).tissue, downsample)
                out.setdefault("blur_um", np.zeros((h, w), np.float32))[rows] = found["blur_sigma"] * self.scene.um
                for kind in ("fold", "bubble"):
                    out.setdefault(kind, np.zeros((h, w), bool))[rows] = found[kind]
        return out
