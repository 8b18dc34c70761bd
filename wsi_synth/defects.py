"""Scanning and mounting defects for synthetic slides and real images, with their truth by construction.

Slide quality control (:mod:`wsi.qc`) is measured on these (``bench/qc.py``, the tests): each defect is drawn
the way the optics or the section makes it, and its truth is the region it was drawn in.

* :class:`BlurRegion`: a region out of the focal plane: a wobbly ellipse whose specimen is blurred by a kernel of
  known size ``sigma`` (``gaussian``; ``disk``: a defocused lens's pillbox, of radius 2 sigma so that its
  standard deviation is sigma too), fading in over
  ``ramp`` level-0 px at its rim.
* :class:`FocusStripe`: a scanner stripe (a vertical band of the slide, as line and tile scanners image it)
  whose focus drifts along it: the blur sigma rises linearly from ``sigma_top`` at the top of the slide to
  ``sigma_bottom`` at its bottom.
* :class:`Fold`: a strip of tissue doubled over itself: on one side of the fold line, for ``width`` level-0 px,
  the tissue shows through the flap folded over it (the mirror image of the tissue across the line), so its
  optical density doubles where both layers are tissue; the bend at the strip's far edge is a sharp, denser
  line.
* :class:`Bubble`: an air bubble under the coverslip: a round, dark, neutral outline (light refracted away at
  the air's edge) with a thin bright ring inside it; the tissue under it, folds and blur included, is seen
  through air instead of mountant: magnified a little, smeared (blurred) and paler.

Sizes are level-0 px of the slide they are drawn on (or pixels of a real image). Blur is applied to the
specimen's transmittance, before the light and the scanner's noise (sensor noise comes after the optics), so a
blurred region of a synthetic slide keeps the glass noise of the rest. On a real image (:func:`composite`), the
image itself is the specimen: its transmittance is the image over its glass colour.

The synthetic slide generator (:mod:`wsi_synth`) calls :func:`transmittance` for the regions a defect touches
and :func:`truth` for its truth masks; :func:`draw_defects` places random defects over a slide's tissue.

numpy and OpenCV only (OpenCV's Gaussian and pillbox filters and its bilinear remap).

>>> import numpy as np
>>> flat = np.full((64, 64, 3), 0.5, np.float32)
>>> flat[:, 32:] = 0.9                                                # an edge
>>> out = apply([BlurRegion(32, 32, 40, 40, 0.0, sigma=4.0, ramp=0.0)], lambda xs, ys: flat[
...     np.clip(ys.astype(int), 0, 63)][:, np.clip(xs.astype(int), 0, 63)], np.arange(64) + 0.5,
...     np.arange(64) + 0.5, 1.0)
>>> bool(out[32, 31, 0] > 0.55), bool(abs(out[32, 0, 0] - 0.5) < 1e-3)  # the edge is smeared, far from it flat
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]
Render = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (xs, ys) pixel centres, level-0 px -> (h, w, 3)
KERNELS = ("gaussian", "disk")
SIGMA_STEP = 0.25  # blur of a region that varies (a stripe, a rim) is drawn at sigmas this far apart (level px)
_MIN_SIGMA_PX = 0.3  # blur narrower than this (in the level's pixels) is left out: area averaging hides it


# ---------------------------------------------------------------------------------------------- defects
@dataclass(frozen=True)
class BlurRegion:
    """A region out of focus: a wobbly ellipse (centre, semi-axes, angle in radians) blurred by ``kernel`` of
    standard deviation ``sigma`` (level-0 px), fading in over ``ramp`` px inside its outline."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    sigma: float
    kernel: str = "gaussian"
    ramp: float = 20.0
    wobble: float = 0.15
    seed: int = 0

    def box(self) -> Box:
        r = max(self.rx, self.ry) * (1 + self.wobble) + 4 * self.sigma
        return (math.floor(self.cx - r), math.floor(self.cy - r), math.ceil(self.cx + r), math.ceil(self.cy + r))

    def sigma_map(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs[None, :] - self.cx, ys[:, None] - self.cy
        u, v = (dx * c + dy * s) / self.rx, (dy * c - dx * s) / self.ry
        theta = np.arctan2(v, u)
        wob = 1 + self.wobble * (0.6 * np.sin(3 * theta + self.seed % 7) + 0.4 * np.sin(5 * theta + self.seed % 11))
        inside = (wob - np.hypot(u, v)) * min(self.rx, self.ry)  # ~ px inside the outline
        alpha = np.clip(inside / self.ramp, 0, 1) if self.ramp > 0 else (inside >= 0).astype(np.float32)
        return (self.sigma * alpha).astype(np.float32)


@dataclass(frozen=True)
class FocusStripe:
    """A vertical scanner stripe ``x0 <= x < x1`` over the slide's whole height whose blur sigma drifts linearly
    from ``sigma_top`` (y = 0) to ``sigma_bottom`` (y = ``height``)."""

    x0: float
    x1: float
    height: float
    sigma_top: float
    sigma_bottom: float
    kernel: str = "gaussian"

    def box(self) -> Box:
        pad = 4 * max(self.sigma_top, self.sigma_bottom)
        return (math.floor(self.x0 - pad), 0, math.ceil(self.x1 + pad), math.ceil(self.height))

    def sigma_map(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        t = np.clip(ys / max(self.height, 1.0), 0, 1)[:, None]
        inside = ((xs >= self.x0) & (xs < self.x1))[None, :]
        return (inside * (self.sigma_top + (self.sigma_bottom - self.sigma_top) * t)).astype(np.float32)


@dataclass(frozen=True)
class Fold:
    """A strip of tissue doubled over itself. The fold line runs through (``x``, ``y``) along ``angle``
    (radians) for ``length`` px each way; for ``width`` px on its left side (the side of the normal
    (-sin, cos)) the mirror image of the tissue across the line lies over the tissue, and the bend, at that
    far edge, is a line ``line_width`` px wide with ``line_density`` times the tissue's optical density added."""

    x: float
    y: float
    angle: float
    length: float
    width: float
    line_width: float = 3.0
    line_density: float = 1.5

    def _frame(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(along the line, across it towards the flap) of the grid's pixel centres."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs[None, :] - self.x, ys[:, None] - self.y
        return dx * c + dy * s, dy * c - dx * s

    def box(self) -> Box:
        c, s = math.cos(self.angle), math.sin(self.angle)
        pts = [(self.x + a * c - d * s, self.y + a * s + d * c) for a in (-self.length, self.length)
               for d in (-self.width - 2 * self.line_width, self.width + 2 * self.line_width)]
        xs, ys = zip(*pts)
        return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))

    def band(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Where the flap lies (before the tissue under it is known)."""
        along, across = self._frame(xs, ys)
        return (np.abs(along) <= self.length) & (across >= 0) & (across <= self.width)

    def mirror(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The level-0 (x, y) across the line from each grid pixel (the flap's origin)."""
        _, across = self._frame(xs, ys)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return xs[None, :] + 2 * across * s, ys[:, None] - 2 * across * c

    def line(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Coverage (0..1) of the bend line at the flap's far edge."""
        along, across = self._frame(xs, ys)
        return (np.abs(along) <= self.length) * np.exp(-0.5 * ((across - self.width) / (self.line_width / 2)) ** 2)


@dataclass(frozen=True)
class Bubble:
    """An air bubble: centre, ``radius`` (px), an outline ``rim`` px wide that lets ``1 - rim_density`` of the
    light through at its darkest, and inside it the tissue magnified ``magnify`` times about the centre, blurred
    by ``sigma`` px and its contrast scaled by ``contrast``."""

    cx: float
    cy: float
    radius: float
    rim: float = 16.0
    rim_density: float = 0.6
    magnify: float = 1.08
    sigma: float = 4.0
    contrast: float = 0.75

    def box(self) -> Box:
        r = self.radius + 3 * self.rim + 4 * self.sigma
        return (math.floor(self.cx - r), math.floor(self.cy - r), math.ceil(self.cx + r), math.ceil(self.cy + r))

    def distance(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return np.hypot(xs[None, :] - self.cx, ys[:, None] - self.cy)


Defect = BlurRegion | FocusStripe | Fold | Bubble


# ---------------------------------------------------------------------------------------------- drawing
def _intersects(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _region_box(xs: np.ndarray, ys: np.ndarray, pixel: float) -> Box:
    return (math.floor(xs[0] - pixel), math.floor(ys[0] - pixel), math.ceil(xs[-1] + pixel) + 1,
            math.ceil(ys[-1] + pixel) + 1)


def touching(defects: Sequence[Defect], xs: np.ndarray, ys: np.ndarray, pixel: float) -> list[Defect]:
    """The defects whose box meets the grid's region."""
    region = _region_box(xs, ys, pixel)
    return [d for d in defects if _intersects(d.box(), region)]


def _extended(xs: np.ndarray, ys: np.ndarray, pixel: float, margin: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(-margin, 0) * pixel
    return (np.concatenate([xs[0] + steps, xs, xs[-1] - steps[::-1]]),
            np.concatenate([ys[0] + steps, ys, ys[-1] - steps[::-1]]))


def _sample(render: Render, px: np.ndarray, py: np.ndarray, pixel: float) -> np.ndarray:
    """``render``'s values at arbitrary level-0 points (px, py) (h, w), interpolated bilinearly from a grid of
    the same pixel size around them."""
    x0, x1, y0, y1 = float(px.min()), float(px.max()), float(py.min()), float(py.max())
    gx = x0 - pixel + pixel * np.arange(int(math.ceil((x1 - x0) / pixel)) + 3)
    gy = y0 - pixel + pixel * np.arange(int(math.ceil((y1 - y0) / pixel)) + 3)
    grid = np.ascontiguousarray(render(gx, gy), np.float32)
    map_x = ((px - gx[0]) / pixel).astype(np.float32)
    map_y = ((py - gy[0]) / pixel).astype(np.float32)
    return cv2.remap(grid, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _kernel_filter(image: np.ndarray, size: float, kernel: str) -> np.ndarray:
    """``image`` (h, w, 3) filtered by a Gaussian of sigma ``size`` or a pillbox of standard deviation ``size``
    (radius ``2 * size``) (px)."""
    if kernel == "gaussian":
        k = int(math.ceil(4 * size)) * 2 + 1
        return cv2.GaussianBlur(image, (k, k), size, borderType=cv2.BORDER_REFLECT)
    if kernel == "disk":
        radius = 2 * size  # a uniform disc of radius R has a standard deviation of R / 2 along each axis
        r = int(math.ceil(radius))
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        # anti-aliased disc: coverage of each kernel pixel by the circle
        disc = np.clip(radius + 0.5 - np.hypot(x, y), 0, 1).astype(np.float32)
        return cv2.filter2D(image, -1, disc / disc.sum(), borderType=cv2.BORDER_REFLECT)
    raise ValueError(f"unknown blur kernel {kernel!r}; use one of {KERNELS}")


def _varying_blur(image: np.ndarray, sigma: np.ndarray, kernel: str) -> np.ndarray:
    """``image`` blurred by a per-pixel ``sigma`` (px): filtered at sigmas ``SIGMA_STEP`` apart and blended
    linearly between the two nearest."""
    top = float(sigma.max())
    if top < _MIN_SIGMA_PX:
        return image
    levels = np.arange(0, top + SIGMA_STEP, SIGMA_STEP)
    pos = np.clip(sigma / SIGMA_STEP, 0, len(levels) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(levels) - 1)
    frac = (pos - lo).astype(np.float32)
    out = np.zeros_like(image)
    for i in np.union1d(np.unique(lo), np.unique(hi)):
        weight = np.where(lo == i, 1 - frac, 0) + np.where(hi == i, frac, 0)
        if not weight.any():
            continue
        filtered = image if levels[i] < _MIN_SIGMA_PX else _kernel_filter(image, float(levels[i]), kernel)
        out += weight[..., None].astype(np.float32) * filtered
    return out


def apply(defects: Sequence[Defect], render: Render, xs: np.ndarray, ys: np.ndarray, pixel: float) -> np.ndarray:
    """The specimen's transmittance (h, w, 3) on the grid ``ys x xs`` (pixel centres, level-0 px; pixels
    ``pixel`` level-0 px wide) with ``defects`` drawn: folds first (the section), then blur (the focus), then
    bubbles (the mounting), each refracting the specimen as it is imaged there, its folds and blur included.
    ``render(xs, ys)`` is the clean transmittance on any grid of this pixel size."""
    specimen = [d for d in defects if not isinstance(d, Bubble)]
    bubbles = [d for d in touching(defects, xs, ys, pixel) if isinstance(d, Bubble)]
    image = _imaged(specimen, render, xs, ys, pixel)
    if bubbles:
        # a bubble lies between the coverslip and the section: what it magnifies and smears is the section with
        # its folds, out of focus where the rest is (the whole defect list: its view reaches past this grid)
        def imaged(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
            return _imaged(specimen, render, gx, gy, pixel)

        image = np.array(image, np.float32)
        for bubble in bubbles:
            image = _draw_bubble(image, bubble, imaged, xs, ys, pixel)
    return image


def _imaged(specimen: Sequence[Defect], render: Render, xs: np.ndarray, ys: np.ndarray, pixel: float) -> np.ndarray:
    """:func:`apply` without bubbles: the section's folds, then the focus's blur."""
    defects = touching(specimen, xs, ys, pixel)
    if not defects:
        return render(xs, ys)
    blurs = [d for d in defects if isinstance(d, BlurRegion | FocusStripe)]
    reach = max([4 * d.sigma for d in blurs if isinstance(d, BlurRegion)]
                + [4 * max(d.sigma_top, d.sigma_bottom) for d in blurs if isinstance(d, FocusStripe)] + [0.0])
    margin = int(math.ceil(reach / pixel)) + 1
    ex, ey = _extended(xs, ys, pixel, margin)
    image = np.asarray(render(ex, ey), np.float32).copy()
    for fold in (d for d in defects if isinstance(d, Fold)):
        image = _draw_fold(image, fold, render, ex, ey, pixel)
    for kernel in KERNELS:
        mine = [d for d in blurs if d.kernel == kernel]
        if mine:
            sigma = np.sqrt(sum(d.sigma_map(ex, ey) ** 2 for d in mine)) / pixel
            image = _varying_blur(image, sigma, kernel)
    return image[margin:margin + ys.size, margin:margin + xs.size]


def _draw_fold(image: np.ndarray, fold: Fold, render: Render, xs, ys, pixel: float) -> np.ndarray:
    band = fold.band(xs, ys)
    line = fold.line(xs, ys).astype(np.float32)
    if band.any():
        mx, my = fold.mirror(xs, ys)
        rows, cols = np.nonzero(band)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        flap = _sample(render, mx[r0:r1, c0:c1], my[r0:r1, c0:c1], pixel)
        inside = band[r0:r1, c0:c1, None]
        image[r0:r1, c0:c1] = np.where(inside, image[r0:r1, c0:c1] * flap, image[r0:r1, c0:c1])
    if line.max() > 0.01:  # the bend: the tissue's own density again, along the flap's far edge
        od = -np.log(np.clip(image, 1e-4, 1))
        image = np.exp(-od * (1 + fold.line_density * line[..., None])).astype(np.float32)
    return image


def _draw_bubble(image: np.ndarray, bubble: Bubble, render: Render, xs, ys, pixel: float) -> np.ndarray:
    r = bubble.distance(xs, ys)
    inside = r < bubble.radius
    if inside.any():
        rows, cols = np.nonzero(inside)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        margin = int(math.ceil(4 * bubble.sigma / pixel)) + 1
        ex, ey = _extended(xs[c0:c1], ys[r0:r1], pixel, margin)
        px = bubble.cx + (ex[None, :] - bubble.cx) / bubble.magnify + 0 * ey[:, None]
        py = bubble.cy + (ey[:, None] - bubble.cy) / bubble.magnify + 0 * ex[None, :]
        seen = _sample(render, px, py, pixel)
        if bubble.sigma / pixel >= _MIN_SIGMA_PX:
            seen = _kernel_filter(seen, bubble.sigma / pixel, "gaussian")
        seen = 1 - bubble.contrast * (1 - seen[margin:margin + r1 - r0, margin:margin + c1 - c0])
        part = inside[r0:r1, c0:c1, None]
        image[r0:r1, c0:c1] = np.where(part, seen, image[r0:r1, c0:c1])
    # the outline, centred just inside the radius, and a thin bright ring inside it; both neutral
    half = bubble.rim / 2
    dark = bubble.rim_density * _band(r, bubble.radius - half, half, pixel)
    bright = 0.08 * _band(r, bubble.radius - bubble.rim - half / 2, half / 2, pixel)
    return np.clip(image * ((1 - dark) * (1 + bright))[..., None], 0, 1).astype(np.float32)


def _band(r: np.ndarray, centre: float, half: float, pixel: float) -> np.ndarray:
    """Coverage (0..1) of the ring ``centre +- half`` (px) over pixels ``pixel`` wide."""
    return np.clip(np.minimum(r + pixel / 2, centre + half) - np.maximum(r - pixel / 2, centre - half), 0,
                   None) / pixel


# ---------------------------------------------------------------------------------------------- truth
def truth(defects: Sequence[Defect], xs: np.ndarray, ys: np.ndarray, tissue: Callable,
          pixel: float = 1.0) -> dict[str, np.ndarray]:
    """Truth on the grid ``ys x xs`` (pixel centres, level-0 px, pixels ``pixel`` wide): ``blur_sigma`` (float32,
    level-0 px: the blur the specimen got there, 0 where sharp; a bubble's smear is not counted), ``fold`` (bool:
    both layers of the doubled strip are tissue), ``bubble`` (bool: inside a bubble's outline). ``tissue(gx, gy)``
    gives the tissue coverage (0..1, (h, w)) on any grid of this pixel size."""
    shape = (ys.size, xs.size)
    sigma_sq = np.zeros(shape, np.float32)
    fold = np.zeros(shape, bool)
    bubble = np.zeros(shape, bool)
    here = None
    for d in defects:
        if isinstance(d, BlurRegion | FocusStripe):
            sigma_sq += d.sigma_map(xs, ys) ** 2
        elif isinstance(d, Fold):
            band = d.band(xs, ys)
            if band.any():
                here = tissue(xs, ys) if here is None else here
                mx, my = d.mirror(xs, ys)
                flap = _sample(lambda gx, gy: tissue(gx, gy)[..., None].astype(np.float32), mx, my, pixel)
                fold |= band & (here > 0.5) & (np.asarray(flap).reshape(shape) > 0.5)
        elif isinstance(d, Bubble):
            bubble |= d.distance(xs, ys) < d.radius
    return {"blur_sigma": np.sqrt(sigma_sq), "fold": fold, "bubble": bubble}


# ---------------------------------------------------------------------------------------------- real images
def composite(rgb: np.ndarray, defects: Sequence[Defect], glass: Sequence[float] | None = None) -> np.ndarray:
    """``defects`` (in the image's pixels) drawn over a real RGB image, as over a slide: the image over its glass
    colour (``glass``; default the 99th percentile of each channel) is the specimen's transmittance. Returns
    uint8 (h, w, 3)."""
    rgb = np.asarray(rgb)[..., :3]
    h, w = rgb.shape[:2]
    glass = np.asarray(glass if glass is not None else np.percentile(rgb.reshape(-1, 3), 99, axis=0), np.float32)
    trans = np.clip(rgb.astype(np.float32) / np.maximum(glass, 1), 0, 1)

    def render(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:  # the image, edges repeated beyond it
        cols = np.clip(np.floor(gx).astype(np.int64), 0, w - 1)
        rows = np.clip(np.floor(gy).astype(np.int64), 0, h - 1)
        return trans[rows[:, None], cols[None, :]]

    out = apply(defects, render, np.arange(w) + 0.5, np.arange(h) + 0.5, 1.0)
    return np.clip(out * glass + 0.5, 0, 255).astype(np.uint8)


def composite_truth(tissue_mask: np.ndarray, defects: Sequence[Defect]) -> dict[str, np.ndarray]:
    """:func:`truth` for an image whose tissue mask (bool (h, w)) is ``tissue_mask``."""
    h, w = tissue_mask.shape

    def tissue(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        rows = np.clip(np.floor(gy).astype(np.int64), 0, h - 1)
        cols = np.clip(np.floor(gx).astype(np.int64), 0, w - 1)
        return tissue_mask[rows[:, None], cols[None, :]].astype(np.float32)

    return truth(defects, np.arange(w) + 0.5, np.arange(h) + 0.5, tissue)


# ---------------------------------------------------------------------------------------------- placing
def draw_defects(tissue_boxes: Sequence[Box], width: int, height: int, um: float, rng: np.random.Generator, *,
                 blur: int = 0, stripes: int = 0, folds: int = 0, bubbles: int = 0,
                 sigma_um: tuple[float, float] = (1.5, 3.0), kernels: Sequence[str] = KERNELS) -> list[Defect]:
    """Random defects over the first tissue boxes (the main pieces), sized in microns (``um``: microns per
    level-0 px): ``blur`` regions of 250-600 um semi-axes blurred by a sigma (or disk radius) drawn from
    ``sigma_um``; ``stripes`` scanner stripes 600-1200 um wide whose sigma drifts from 0 at the top to
    3 um at the bottom (or back); ``folds`` of 80-250 um width and 400-1,200 um half-length through a piece;
    ``bubbles`` of 120-350 um radius with a 10-20 um outline centred inside a piece."""
    boxes = [b for b in tissue_boxes[:2] if b[2] > b[0] and b[3] > b[1]] or [(0, 0, width, height)]
    px = 1.0 / um
    out: list[Defect] = []

    def inside(box: Box, shrink: float = 0.2) -> tuple[float, float]:
        x0, y0, x1, y1 = box
        return (rng.uniform(x0 + shrink * (x1 - x0), x1 - shrink * (x1 - x0)),
                rng.uniform(y0 + shrink * (y1 - y0), y1 - shrink * (y1 - y0)))

    for _ in range(blur):
        cx, cy = inside(boxes[int(rng.integers(len(boxes)))])
        out.append(BlurRegion(cx, cy, rng.uniform(250, 600) * px, rng.uniform(250, 600) * px,
                              rng.uniform(0, math.pi), rng.uniform(*sigma_um) * px,
                              kernel=str(kernels[int(rng.integers(len(kernels)))]), ramp=20 * px,
                              seed=int(rng.integers(1, 2 ** 31))))
    for _ in range(stripes):
        x0 = rng.uniform(0.1, 0.7) * width
        w = rng.uniform(600, 1200) * px
        top, bottom = (0.0, 3.0 * px) if rng.random() < 0.5 else (3.0 * px, 0.0)
        out.append(FocusStripe(x0, x0 + w, height, top, bottom))
    for _ in range(folds):
        cx, cy = inside(boxes[int(rng.integers(len(boxes)))], 0.3)
        out.append(Fold(cx, cy, rng.uniform(0, math.pi), rng.uniform(400, 1200) * px, rng.uniform(80, 250) * px,
                        line_width=rng.uniform(2, 4) * px, line_density=rng.uniform(1.0, 2.0)))
    for _ in range(bubbles):
        cx, cy = inside(boxes[int(rng.integers(len(boxes)))], 0.25)
        out.append(Bubble(cx, cy, rng.uniform(120, 350) * px, rim=rng.uniform(10, 20) * px,
                          rim_density=rng.uniform(0.45, 0.7), magnify=rng.uniform(1.03, 1.12),
                          sigma=rng.uniform(1.5, 4) * px, contrast=rng.uniform(0.6, 0.85)))
    return out
