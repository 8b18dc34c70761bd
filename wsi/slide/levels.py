"""Pyramid levels: which one to read for a target MPP, where a level pixel sits at level 0, and never trusting a
level blindly: compare it with level 0 before the tiler uses it.

:func:`choose_level` picks the coarsest level not coarser than the target (within a tolerance), as DESIGN.md
says; :func:`level0_position` is the level-0 coordinate every backend maps back to a given level pixel.

Scanners and converters sometimes write coarse levels that are damaged or tagged with the wrong colour space, and
a reader may decode a level other than as the file means it (OpenSlide 4.0.1 fails on the levels wsidicomizer
adds to a DICOM conversion of an SVS). The tissue mask is read from a coarse level, so a bad level would give a
silently wrong mask; tiles read from a bad level would be wrong pixels.

:class:`LevelCheck` judges each level the tiler wants (for the mask, :func:`wsi.tiling.read_thumbnail`, and for
tiles, :func:`wsi.slide.tiles.tile_grid`) once, before it is used. Level 0 is the reference. At a grid of
``SPOTS_PER_SIDE`` x ``SPOTS_PER_SIDE`` spots spread over the slide, a box of the level (``SPOT_PX`` pixels a
side, covering about ``SPOT_LEVEL0_PX`` level-0 pixels) is read with its level-0 footprint, area-averaged to
the same size. The level agrees when, pooled over the spots,

* the mean colour differs by at most ``COLOUR_TOLERANCE`` grey levels in every channel (JPEG re-encoding and
  another resampling filter move it by 1-3; a wrong colour transform by tens), and
* the structure matches where level 0 has any (grey-level standard deviation within the spots at least
  ``FLAT_STD``): the grey levels correlate by at least ``MIN_CORRELATION`` and the contrast ratio lies in
  ``CONTRAST_RANGE`` (a level of noise, scrambled tiles or a blank level fail); where level 0 is flat glass
  at every spot, the level must be nearly flat too.

A level that cannot be read at a spot, or later while the thumbnail is read, is rejected with the reader's
error. The tiler then reads the next finer level that agrees, down to level 0 (the thumbnail is then read from
level 0 in strips, never a whole level at once). Level 0 that cannot be read at the spots is an error naming
the file and the level. What was checked and found is recorded in the store (:class:`wsi.store.LevelCheckAttrs`,
attrs ``levels``) and marked on the QC image (:func:`mark_qc`).

The check reads 16 small boxes of the level and their level-0 footprints (about 1 megapixel of level 0 per
checked level, up to 4 on levels coarser than 32x, whatever the slide's size); ``bench/levels.py`` measures
what it costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..errors import SlideError
from .slide import Slide

SPOTS_PER_SIDE = 4        # the spots form a 4 x 4 grid over the slide
SPOT_LEVEL0_PX = 256      # a spot covers about this many level-0 pixels a side ...
SPOT_PX = (8, 32)         # ... as this many pixels of the checked level (at least, at most)
COLOUR_TOLERANCE = 10.0   # grey levels, per channel, of the spots' mean colour
FLAT_STD = 3.0            # level 0 at least this varied (grey std within spots) has structure to compare
MIN_CORRELATION = 0.5     # grey levels of the level against level 0, within spots
CONTRAST_RANGE = (0.5, 2.0)  # the level's grey std within spots over level 0's
FLAT_EXTRA_STD = 6.0      # where level 0 is flat everywhere, the level may be this much more varied


# ------------------------------------------------------------------------------------------ geometry
def level0_position(level_px: int, downsample: float) -> int:
    """The level-0 coordinate that every backend maps back to ``level_px`` on a level of ``downsample``.

    Backends take level-0 locations and truncate ``location / downsample``; rounding up (by at most one level-0
    pixel, which is less than one level pixel) keeps that exact when the downsample is not an integer."""
    return int(np.ceil(level_px * downsample - 1e-6))


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
    :mod:`wsi.slide.levels`).

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


# ------------------------------------------------------------------------------------------ the check
@dataclass(frozen=True)
class LevelVerdict:
    """What the check found for one level; ``cause`` says why it disagrees (empty when it agrees)."""

    level: int
    agrees: bool
    cause: str = ""
    colour_difference: float | None = None
    correlation: float | None = None
    contrast_ratio: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _spots(slide: Slide, level: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corners (level pixels) of the spot boxes on ``level``, and their edge in level pixels."""
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    lo, hi = SPOT_PX
    edge = int(np.clip(round(SPOT_LEVEL0_PX / ds), lo, hi))
    edge = max(1, min(edge, lw // SPOTS_PER_SIDE, lh // SPOTS_PER_SIDE))
    centres = [(i + 0.5) / SPOTS_PER_SIDE for i in range(SPOTS_PER_SIDE)]
    return [(int(fx * lw) - edge // 2, int(fy * lh) - edge // 2) for fy in centres for fx in centres], edge


def _level0_box(slide: Slide, x: int, y: int, level: int, edge: int) -> np.ndarray:
    """Level 0 under the level box at level pixel (x, y), area-averaged to ``edge`` x ``edge``."""
    ds = slide.level_downsamples[level]
    x0, y0 = level0_position(x, ds), level0_position(y, ds)
    size = max(edge, int(round(edge * ds)))
    try:
        region = slide.read_region(x0, y0, 0, size, size)
    except SlideError as e:
        raise SlideError(slide.path, f"no level decodes sensibly: {e.cause}",
                         "the file may be truncated or corrupt, or the reader unable to decode it: "
                         "try another slide.backend") from e
    return cv2.resize(region, (edge, edge), interpolation=cv2.INTER_AREA)


def compare_with_level0(slide: Slide, level: int) -> LevelVerdict:
    """Compare ``level`` with level 0 at the spots (see the module docstring). Level 0 that cannot be read is
    a :class:`SlideError` naming the file and level 0."""
    spots, edge = _spots(slide, level)
    ds = slide.level_downsamples[level]
    tests, refs = [], []
    for x, y in spots:
        refs.append(_level0_box(slide, x, y, level, edge))
        try:
            tests.append(slide.read_region(level0_position(x, ds), level0_position(y, ds), level, edge, edge))
        except SlideError as e:
            return LevelVerdict(level, False, f"cannot be read: {e.cause}")
    test = np.stack(tests).astype(np.float64)  # (spots, edge, edge, 3)
    ref = np.stack(refs).astype(np.float64)
    colour = float(np.abs(test.mean(axis=(0, 1, 2)) - ref.mean(axis=(0, 1, 2))).max())
    # grey levels centred within each spot: structure inside the spots, not the colour between them
    t = test.mean(axis=3) - test.mean(axis=(1, 2, 3))[:, None, None]
    r = ref.mean(axis=3) - ref.mean(axis=(1, 2, 3))[:, None, None]
    t_std, r_std = float(np.sqrt((t ** 2).mean())), float(np.sqrt((r ** 2).mean()))
    correlation = contrast = None
    causes = []
    if colour > COLOUR_TOLERANCE:
        causes.append(f"mean colour differs from level 0's by {colour:.0f} grey levels")
    if r_std >= FLAT_STD:
        correlation = float((t * r).mean() / max(t_std * r_std, 1e-9))
        contrast = t_std / r_std
        if correlation < MIN_CORRELATION:
            causes.append(f"structure does not match level 0's (correlation {correlation:.2f})")
        elif not CONTRAST_RANGE[0] <= contrast <= CONTRAST_RANGE[1]:
            causes.append(f"contrast is {contrast:.2f} times level 0's")
    elif t_std > r_std + FLAT_EXTRA_STD:
        contrast = t_std / max(r_std, 1e-9)
        causes.append(f"varies (grey std {t_std:.0f}) where level 0 is flat (std {r_std:.1f})")
    return LevelVerdict(level, not causes, "; ".join(causes), round(colour, 2),
                        None if correlation is None else round(correlation, 3),
                        None if contrast is None else round(contrast, 3))


class LevelCheck:
    """The verdicts on one open slide's levels, each level judged once when first asked, and which level each
    purpose (``mask``, ``tiles``) wanted and got."""

    def __init__(self, slide: Slide):
        self.slide = slide
        self.verdicts: dict[int, LevelVerdict] = {}
        self.chosen: dict[str, tuple[int, int]] = {}  # purpose -> (wanted level, level used)

    def agrees(self, level: int) -> bool:
        if level == 0:
            return True
        if level not in self.verdicts:
            self.verdicts[level] = compare_with_level0(self.slide, level)
        return self.verdicts[level].agrees

    def reject(self, level: int, cause: str) -> None:
        """A level that passed the check but failed when read whole (a damaged tile off the spots)."""
        self.verdicts[level] = LevelVerdict(level, False, cause)

    def plan(self, target_mpp: float, tolerance: float, purpose: str) -> ReadPlan:
        """:func:`choose_level` among the levels that agree with level 0: the level the resolution
        asks for, else the next finer one that agrees."""
        allowed = list(range(self.slide.level_count))
        wanted = choose_level(self.slide, target_mpp, tolerance).level
        while True:
            plan = choose_level(self.slide, target_mpp, tolerance, levels=allowed)
            if self.agrees(plan.level):
                self.chosen[purpose] = (wanted, plan.level)
                return plan
            allowed.remove(plan.level)

    @property
    def rejected(self) -> list[LevelVerdict]:
        return [v for _, v in sorted(self.verdicts.items()) if not v.agrees]

    def summary(self) -> str:
        """One line for people: what was rejected and where the mask and tiles were read."""
        parts = [f"level {v.level} rejected ({v.cause})" for v in self.rejected]
        for purpose, (wanted, used) in sorted(self.chosen.items()):
            if wanted != used:
                parts.append(f"{purpose} from level {used} instead of {wanted}")
        return "; ".join(parts)


def mark_qc(rgb: np.ndarray, check: LevelCheck) -> np.ndarray:
    """The QC image with a level-check warning when a level was rejected: an orange frame and a line of text
    saying which level and where the mask was read instead. Unchanged when every checked level agreed."""
    import textwrap

    from PIL import Image, ImageDraw

    text = check.summary()
    if not text:
        return rgb
    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    w, h = image.size
    frame = max(2, min(w, h) // 100)
    draw.rectangle([0, 0, w - 1, h - 1], outline=(255, 140, 0), width=frame)
    lines = "\n".join(textwrap.wrap(text, max(20, (w - 4 * frame) // 6)))  # ~6 px per character
    box = draw.multiline_textbbox((0, 0), lines)
    draw.rectangle([frame, frame, frame + box[2] + 6, frame + box[3] + 6], fill=(255, 140, 0))
    draw.multiline_text((frame + 3, frame + 3), lines, fill=(0, 0, 0))
    return np.asarray(image)
