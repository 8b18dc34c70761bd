"""Stain and scanner augmentation at extraction (``extract.augment: K``): K augmented feature views per tile.

A model trained at three sites learns their stain and scanner along with the tissue; on a fourth site's slides
its scale slips. Augmented views show it each training tile as other labs and scanners might have made it, so
that what it learns does not hinge on one lab's colours. Each view of a tile goes through, in this order (the
order a slide is made: stained, scanned, focused, compressed):

* **HED jitter**: the tile's optical density unmixed into haematoxylin, eosin and DAB with Ruifrok and
  Johnston's stain vectors, each stain's density scaled by ``1 + a`` (``a`` uniform in +-:data:`HED_SCALE`) and
  shifted by ``b`` (uniform in +-:data:`HED_SHIFT`), then mixed back (a stronger or weaker lab stain);
* **brightness, contrast, gamma** (a scanner's exposure and tone curve): ``+-``:data:`BRIGHTNESS`, a contrast
  factor in ``1 +-`` :data:`CONTRAST` around the tile's mean, a gamma log-uniform in ``[1/GAMMA, GAMMA]``;
* **blur**: a Gaussian of sigma uniform in ``[0, BLUR_SIGMA]`` px at tile resolution (slight defocus);
* **JPEG re-encoding** at a quality uniform in :data:`JPEG_QUALITY` (another scanner's compression).

The strengths were fixed before any benchmark ran (bench/RESULTS.md, "Sites") and are not tuned on one. Each
tile's draws come from its own seed: (the slide's seed, the view, the tile's row), so a view is the same however
the tiles are batched, on any device, and a re-run writes the same features. The augmentation runs on the host, on
the uint8 tiles as read, before the batch is staged for the device; stain normalisation (``extract.stain``) then
applies to the views as it does to the raw tiles.

Views are stored beside the raw features as ``features/<feature set>+augment`` (K, N, D); MIL training draws one
of the raw features and the K views per bag per epoch (``mil``'s training loop); validation, out-of-fold scores
and predict use the raw features only. Extraction costs K + 1 times the raw extraction.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

HED_SCALE = 0.15        # each stain's density x (1 +- this)
HED_SHIFT = 0.03        # each stain's density +- this (optical density units)
BRIGHTNESS = 0.06       # added to every channel (intensity in [0, 1])
CONTRAST = 0.10         # (x - mean) x (1 +- this) + mean
GAMMA = 1.18            # x ** g with g log-uniform in [1 / GAMMA, GAMMA]
BLUR_SIGMA = 1.0        # Gaussian sigma in px, uniform in [0, this]; below MIN_BLUR_SIGMA the tile is left sharp
MIN_BLUR_SIGMA = 0.3
JPEG_QUALITY = (60, 95)  # re-encoding quality, uniform over this range (inclusive)
AUGMENTATIONS = ("hed", "brightness", "contrast", "gamma", "blur", "jpeg")

# Ruifrok & Johnston's stain vectors (optical density per RGB channel) of haematoxylin, eosin and DAB
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def settings() -> dict:
    """The strengths, as recorded in the views' feature attrs (``FeatureAttrs.augment``)."""
    return {"hed_scale": HED_SCALE, "hed_shift": HED_SHIFT, "brightness": BRIGHTNESS, "contrast": CONTRAST,
            "gamma": GAMMA, "blur_sigma": BLUR_SIGMA, "jpeg_quality": list(JPEG_QUALITY)}


def slide_seed(slide_id: str) -> int:
    """A slide's augmentation seed: stable across runs and machines (not Python's salted ``hash``)."""
    return zlib.crc32(slide_id.encode())


def _draws(seed: int, view: int, first_row: int, n: int) -> dict[str, np.ndarray]:
    """Every tile's parameters, each tile from its own generator (seed, view, row)."""
    rows = [np.random.default_rng([seed, view, first_row + i]) for i in range(n)]
    u = np.array([rng.uniform(-1.0, 1.0, size=9) for rng in rows]).reshape(n, 9)
    return {"hed_scale": 1 + HED_SCALE * u[:, 0:3], "hed_shift": HED_SHIFT * u[:, 3:6],
            "brightness": BRIGHTNESS * u[:, 6], "contrast": 1 + CONTRAST * u[:, 7],
            "gamma": GAMMA ** u[:, 8],
            "blur": np.array([rng.uniform(0.0, BLUR_SIGMA) for rng in rows]),
            "jpeg": np.array([rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1) for rng in rows])}


def _gaussian_blur(x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Each tile (n, 3, h, w) blurred by its own sigma (0: unchanged), as one grouped separable convolution."""
    radius = int(np.ceil(3 * BLUR_SIGMA))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    sigma = torch.as_tensor(np.maximum(sigmas, 1e-3), dtype=x.dtype)[:, None]
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel[sigmas < MIN_BLUR_SIGMA] = (offsets == 0).to(x.dtype)  # a delta: the tile stays as it was
    n, c, h, w = x.shape
    per_channel = kernel.repeat_interleave(c, dim=0)  # (n * c, k)
    flat = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = torch.nn.functional.conv2d(flat, per_channel[:, None, None, :], groups=n * c)
    flat = torch.nn.functional.conv2d(flat, per_channel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment_tiles(tiles: np.ndarray, seed: int, view: int, first_row: int) -> np.ndarray:
    """View ``view`` (1..K) of uint8 tiles (n, T, T, 3) whose first is row ``first_row`` of its slide (see the
    module docstring); uint8 (n, T, T, 3)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    n = len(tiles)
    if n == 0:
        return tiles
    p = _draws(seed, view, first_row, n)
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).to(torch.float32)
    # HED jitter in optical density (the +1 keeps black pixels finite)
    od = -torch.log10((x + 1) / 256)
    hed = torch.einsum("kc,nchw->nkhw", torch.as_tensor(_HED_FROM_RGB.T, dtype=x.dtype), od)
    hed = hed * torch.as_tensor(p["hed_scale"], dtype=x.dtype)[:, :, None, None] \
        + torch.as_tensor(p["hed_shift"], dtype=x.dtype)[:, :, None, None]
    od = torch.einsum("ck,nkhw->nchw", torch.as_tensor(_RGB_FROM_HED.T, dtype=x.dtype), hed)
    x = (256 * torch.pow(10.0, -od) - 1).clamp_(0, 255) / 255
    # scanner: brightness, contrast around the tile's mean, gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * torch.as_tensor(p["contrast"], dtype=x.dtype)[:, None, None, None] + mean
    x = (x + torch.as_tensor(p["brightness"], dtype=x.dtype)[:, None, None, None]).clamp_(0, 1)
    x = x ** torch.as_tensor(p["gamma"], dtype=x.dtype)[:, None, None, None]
    x = _gaussian_blur(x, p["blur"])
    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    out = [decode_jpeg(encode_jpeg(tile, quality=int(q))) for tile, q in zip(u8, p["jpeg"])]
    return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


def augmented_parts(parts: Iterable[np.ndarray], seed: int, view: int, first_row: int) -> Iterator[np.ndarray]:
    """``parts`` (ordered uint8 tile arrays starting at row ``first_row``) as view ``view``."""
    row = first_row
    for part in parts:
        yield augment_tiles(part, seed, view, row)
        row += len(part)
