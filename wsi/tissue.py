"""Tissue mask and artefact rejection, from a low-resolution RGB thumbnail.

:func:`tissue_mask` keeps every stained tissue piece (pale stroma, fat, small biopsy fragments) and rejects
glass, marker ink (blue, green, black, red), dust/debris specks and faint smudges. Sizes in
:class:`TissueParams` are in microns, so the same parameters give the same mask from a thumbnail at any
resolution (within a pixel of its outline).

Steps (``rgb`` in, boolean mask out; ``mpp`` is the thumbnail's pixel size):

1. **Glass white balance.** The glass colour is estimated as the median of the brightest tenth of pixels and
   divided out, so scanners with a grey, yellow or blue cast behave like white glass. When that estimate is
   not near-neutral and bright (a thumbnail filled with tissue), plain white is used.
2. **Pen ink** (``pen_filter``), found first so ink never counts as stain. Ink is told from stain by colour:
   green (green the strongest channel, never so in H&E), blue (blue strongest with little red; haematoxylin
   keeps much more red), red (blue barely above green, where eosin's pink has blue well above green), black
   (dark grey, or darker than the densest nuclei). Faint ink at stroke edges, with the same hue but little
   saturation, is ink where it touches firm ink; then ink grows by two pixels (a thumbnail blurs stroke
   edges over about a pixel, and JPEG rings around strong edges). Red blood cells are as red as red ink:
   with ``pen_filter`` a haemorrhage is lost with the ink.
3. **Stain.** H&E absorbs unevenly across R, G, B; glass, smudges and dust absorb evenly. A pixel is
   *stained* when its saturation ``(max - min) / max`` reaches ``saturation_min`` and its brightness (mean of
   R, G, B relative to the glass) is at most ``brightness_max``. *Faint* pixels (darker than
   ``brightness_max``, or tinted as stain tints, green the darkest, with half of ``saturation_min``) count too
   where they touch stained ones: fat shows in a thumbnail only as a faint pink net of septa around white
   vacuoles, which hole filling then closes.
4. **Clean-up.** Closing by a disc of ``close_um`` joins tissue split by thin gaps; holes smaller than
   ``min_hole_um2`` (fat vacuoles, small lumens) are filled when ``fill_holes``; pieces smaller than
   ``min_fragment_um2`` (dust, debris, leftover ink fringes) are dropped.

Only numpy and scipy.ndimage.

>>> import numpy as np
>>> thumb = np.full((64, 64, 3), 240, np.uint8)
>>> thumb[16:48, 16:48] = (225, 150, 190)            # a pink piece of 256 x 256 um at 8 um/px
>>> mask = tissue_mask(thumb, 8.0, TissueParams.default())
>>> int(mask.sum()), bool(mask[32, 32]), bool(mask[2, 2])
(1024, True, False)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import ConfigError

QC_OUTLINE_RGB = (0, 220, 0)  # mask outline colour in QC images


@dataclass(frozen=True)
class TissueParams:
    """The ``tissue:`` section of the config (see ``configs/default.yaml`` for each key's meaning)."""

    mask_mpp: float
    saturation_min: float
    brightness_max: float
    pen_filter: bool
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
        from .config import load_config

        return cls.from_dict(load_config()["tissue"])


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """Boolean (h, w) tissue mask of an RGB uint8 thumbnail (h, w, 3) whose pixels are ``mpp`` um wide."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs an RGB uint8 image (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if not mpp > 0:
        raise ValueError(f"tissue_mask needs the thumbnail's positive um per pixel, got {mpp!r}")
    r, g, b = _white_balanced(rgb[..., :3])
    hi = np.maximum(np.maximum(r, g), b)
    saturation = (hi - np.minimum(np.minimum(r, g), b)) / np.maximum(hi, 1e-6)
    brightness = (r + g + b) / 3
    if params.pen_filter:  # ink first, so its colour neither counts as stain nor tints the faint test
        ink = _pen(r, g, b, hi, saturation, params.saturation_min)
        saturation[ink] = 0
    stained = (brightness <= params.brightness_max) & (saturation >= params.saturation_min)
    # faintly tinted the way stain tints (green absorbed most), not JPEG's colour fringes next to strong edges
    stain_tint = (saturation >= params.saturation_min / 2) & (g <= np.minimum(r, b))
    faint = (brightness <= params.brightness_max) | stain_tint
    tissue = stained | (faint & _touching(faint, stained))
    if params.pen_filter:
        tissue &= ~ink

    radius = params.close_um / mpp
    if radius >= 0.5:
        tissue = _close(tissue, radius)
    px_area = mpp * mpp
    if params.fill_holes and params.min_hole_um2 > 0:
        tissue = _fill_small_holes(tissue, params.min_hole_um2 / px_area)
    return _drop_small(tissue, params.min_fragment_um2 / px_area)


def qc_image(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of the thumbnail with the mask's outline drawn in green (2 px), for a per-slide QC PNG."""
    rgb = np.asarray(rgb)[..., :3]
    mask = np.asarray(mask, bool)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"qc_image: thumbnail {rgb.shape[:2]} and mask {mask.shape} differ in size")
    inner = ndimage.binary_erosion(mask, iterations=2, border_value=0)
    out = rgb.astype(np.uint8, copy=True)
    out[mask & ~inner] = QC_OUTLINE_RGB
    return out


# ----------------------------------------------------------------------------------------------- steps
def _white_balanced(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R, G, B planes (float32, 0..1) divided by the glass colour and clipped: the glass turns white."""
    channels = [rgb[..., i] for i in range(3)]
    total = channels[0].astype(np.uint16) + channels[1] + channels[2]
    bright = total >= _histogram_quantile(total, 0.9, 766)
    glass = np.array([_histogram_quantile(c[bright], 0.5, 256) for c in channels], np.float32)
    if not (glass.max() >= 0.6 * 255 and glass.min() >= 0.88 * glass.max()):
        glass[:] = 255  # the brightest tenth is tissue, not near-neutral glass: leave the colours alone
    return tuple(np.minimum(c * np.float32(1 / g), 1, dtype=np.float32) for c, g in zip(channels, glass))


def _histogram_quantile(values: np.ndarray, q: float, bins: int) -> int:
    """The ``q`` quantile of non-negative integers below ``bins``, by counting (no sort)."""
    counts = np.cumsum(np.bincount(values.ravel(), minlength=bins))
    return int(np.searchsorted(counts, q * counts[-1]))


def _pen(r: np.ndarray, g: np.ndarray, b: np.ndarray, hi: np.ndarray, saturation: np.ndarray,
         saturation_min: float) -> np.ndarray:
    """Marker ink: firm ink by colour, plus the faint ink (stroke edges) that touches it, grown by two pixels
    (a thumbnail blurs stroke edges over a pixel, and JPEG rings around them).

    In stained tissue green is always the darkest channel and red the brightest or nearly so; hue runs from
    purple (haematoxylin, blue a little above red) to pink (eosin, blue well above green). Ink leaves that
    range: green (green the brightest), blue (blue the brightest, little red), red (blue barely above green,
    unlike eosin's pink) and black (dark grey, or darker than the densest nuclei).
    """
    greenish = g >= np.maximum(r, b)
    bluish = (b >= np.maximum(r, g)) & (r <= 0.8 * b)
    reddish = (r >= np.maximum(g, b)) & (b - g <= 0.25 * (r - g))
    firm = ((greenish & (saturation >= 0.2)) | (bluish & (r <= 0.55 * b) & (saturation >= 0.3))
            | (reddish & (saturation >= 0.55)) | (hi <= 0.25) | ((hi <= 0.4) & (saturation <= 0.2)))
    if not firm.any():
        return firm
    faint = (((greenish | bluish | reddish) & (saturation >= saturation_min / 2))
             | ((hi <= 0.6) & (saturation <= 0.25)))
    ink = firm | (faint & _touching(faint, firm))
    return ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool), iterations=2)


def _touching(region: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of ``region`` whose connected piece (8-connected) holds a pixel of ``seeds``."""
    labels, n = ndimage.label(region | seeds, structure=np.ones((3, 3), bool))
    hit = np.zeros(n + 1, bool)
    hit[labels[seeds]] = True
    hit[0] = False
    return hit[labels]


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological closing by a disc of ``radius`` px; the erosion treats the outside as tissue, so tissue
    cut by the image border keeps its edge."""
    k = int(np.ceil(radius))
    y, x = np.mgrid[-k:k + 1, -k:k + 1]
    disc = x * x + y * y <= radius * radius
    return ndimage.binary_erosion(ndimage.binary_dilation(mask, disc), disc, border_value=1)


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background pieces that do not touch the border and are smaller than ``max_px`` pixels."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes < max_px
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill[border] = False
    fill[0] = False
    return mask | fill[labels]


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Remove 8-connected pieces smaller than ``min_px`` pixels."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    return keep[labels]
