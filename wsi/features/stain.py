"""Stain normalisation at extraction (``extract.stain: none | macenko | reinhard``), fitted with torchstain.

A slide's colours depend on its lab's staining and its scanner as much as on its tissue; a model trained on one
site's colours can learn the site instead of the tissue. Normalising maps every slide's stain onto one
reference's before the encoder sees the tiles.

Fitting (on the CPU, with torchstain's ``TorchMacenkoNormalizer.fit`` / ``TorchReinhardNormalizer.fit``, on the
stained pixels only: optical density at least :data:`BETA` in some channel, so pale pink stroma counts and glass
does not; Macenko's fit keeps, as torchstain does, only the pixels dense in every channel to find the stain
vectors, while Reinhard's statistics need the stroma: fitted on nuclei alone, they map stroma far out of gamut):

* the **reference** (``extract.stain_reference``): ``cohort`` (:data:`COHORT_SAMPLE_TILES` tiles from each of up
  to :data:`COHORT_SAMPLE_SLIDES` of the cohort's stores, pooled, fitted once:
  a slide added later reuses the reference its cohort's features were made with), a folder of tile images
  (PNG/JPEG/TIFF), one slide of the cohort (its id, its file or its store), or a trained model run folder
  (``OUT/models/<run>``: the reference its features were normalised to, which is what external validation of
  the run needs);
* each **slide**: its own stain, from :data:`SLIDE_SAMPLE_TILES` tiles spread over it. One estimate per slide,
  not per tile: a tile of nuclei alone or of stroma alone has no second stain to estimate, and per-tile
  statistics would wash out the very differences between tiles the model should see.

Applying it is per pixel, so it runs batched on the extraction device (:meth:`.Encoder.prepare`, outside the
lock the forward passes take turns under): Macenko maps each pixel's optical density through the slide's stain
matrix to H and E concentrations, scales them to the reference's 99th percentiles and recomposes them with the
reference's stain matrix; Reinhard shifts and scales each CIE Lab channel from the slide's mean and standard
deviation to the reference's. Its colour conversions (:func:`rgb_to_lab`, :func:`lab_to_rgb`) are torchstain's
formulas written as batched torch ops on the tiles' device (tested equal to torchstain's): torchstain 1.4.1 keeps
its constants on the CPU, so its own conversions would send every batch to the host and back.

What was fitted goes into the features' attrs (``FeatureAttrs.stain``: method, reference, the reference's and
the slide's fitted values), so extraction is reproducible, and the features are stored under
``features/<encoder>+<method>``, beside the raw ones (:func:`wsi.store.feature_set`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, StoreError
from ..keys import feature_set
from ..slide import TileSource, slide_id_from_path
from ..store import SlideStore, is_complete, same_stain_target, store_path

STAIN_METHODS = ("none", "macenko", "reinhard")
IO = 240                      # transmitted light intensity: the brightness of glass (torchstain's default)
BETA = 0.15                   # optical density below which a channel is unstained (torchstain's default)
MIN_STAINED_PIXELS = 2000     # fewer stained pixels than this cannot give a stain estimate
MAX_FIT_PIXELS = 1_000_000    # stained pixels a fit uses at most (a seeded random subset beyond)
SLIDE_SAMPLE_TILES = 64       # tiles spread over a slide to estimate its own stain
COHORT_SAMPLE_TILES = 16      # tiles per store pooled for extract.stain_reference: cohort
COHORT_SAMPLE_SLIDES = 256    # stores pooled at most (spread over the cohort): 4,096 tiles describe its stain
REFERENCE_SAMPLE_TILES = 256  # tiles of the one slide given as the reference
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------ fitting
def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """The (P, 3) uint8 pixels of ``rgb`` (any shape ending in 3) that are stained (in some channel), not glass."""
    flat = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    od = -np.log((flat.astype(np.float32) + 1) / IO)
    return flat[(od >= BETA).any(axis=1)]


def fit_stain(method: str, rgb: np.ndarray, source, what: str) -> dict:
    """torchstain's fit of ``method`` on the stained pixels of ``rgb``: ``{"stain_matrix", "max_concentrations"}``
    (Macenko) or ``{"means", "stds"}`` (Reinhard, CIE L*a*b*). Too few stained pixels is a ConfigError naming
    ``source`` (``what`` says what it is)."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

    pixels = stained_pixels(rgb)
    total = int(np.asarray(rgb).size // 3)
    if len(pixels) < MIN_STAINED_PIXELS:
        raise ConfigError(source, f"{what} has no tissue to fit {method} stain normalisation on ({len(pixels)} "
                                  f"stained pixels of {total}, {MIN_STAINED_PIXELS} needed)",
                          "give tiles or a slide with H&E-stained tissue")
    if len(pixels) > MAX_FIT_PIXELS:
        pixels = pixels[np.sort(np.random.default_rng(0).choice(len(pixels), MAX_FIT_PIXELS, replace=False))]
    image = torch.from_numpy(np.ascontiguousarray(pixels.T)).reshape(3, 1, -1)  # torchstain's [C, H, W]
    if method == "macenko":
        normalizer = TorchMacenkoNormalizer()
        normalizer.fit(image, Io=IO, beta=BETA)
        return {"stain_matrix": normalizer.HERef.tolist(), "max_concentrations": normalizer.maxCRef.tolist()}
    if method == "reinhard":
        normalizer = TorchReinhardNormalizer()
        normalizer.fit(image)
        return {"means": normalizer.target_means.tolist(), "stds": normalizer.target_stds.tolist()}
    raise ConfigError(None, f"extract.stain {method!r} is not one of {'/'.join(STAIN_METHODS)}")


def sample_tiles(store: SlideStore, n: int, slide_cfg: dict) -> np.ndarray:
    """Up to ``n`` tiles spread evenly over the store's slide, uint8 (k, T, T, 3): from its pixels, or from the
    slide for a coordinates-only store."""
    index = np.unique(np.linspace(0, store.n_tiles - 1, num=min(n, store.n_tiles)).round().astype(int))
    if store.has_pixels:
        return np.concatenate([store.read_tiles(i, i + 1) for i in index])
    with TileSource.open(store.slide.source_path, store.tiling, **slide_cfg) as tiles:
        return tiles.read_tiles(store.coords[index])


def fit_slide(path: str, method: str, slide_cfg: dict) -> dict:
    """The slide's own stain (fitted on :data:`SLIDE_SAMPLE_TILES` of its tiles); runs as a Dask task."""
    store = SlideStore.open(path)
    return fit_stain(method, sample_tiles(store, SLIDE_SAMPLE_TILES, slide_cfg), store.path,
                     f"slide {store.slide_id}")


def _read_images(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(folder, "extract.stain_reference folder holds no tile images",
                          f"put tiles ({', '.join(IMAGE_SUFFIXES)}) in it, or use cohort or a slide id")
    return np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3) for p in files])


def fit_reference(method: str, reference: str, out_dir, slide_ids: list[str], slide_cfg: dict,
                  encoder: str) -> dict:
    """``{"method", "reference", "target"}``: what every slide's stain is mapped onto (see the module docstring
    for the kinds of ``reference``); ``slide_ids`` are the cohort's stores."""
    out_dir = Path(out_dir)
    key = feature_set(encoder, method)
    if reference == "cohort":
        for slide_id in slide_ids:  # a cohort keeps the reference its first features were made with
            path = store_path(out_dir, slide_id)
            if is_complete(path) and (store := SlideStore.open(path)).has_features(key):
                stain = store.feature_attrs(key).stain
                return {k: stain[k] for k in ("method", "reference", "target")}
        complete = [s for s in slide_ids if is_complete(store_path(out_dir, s))]
        spread = [complete[i] for i in np.unique(np.linspace(0, len(complete) - 1, COHORT_SAMPLE_SLIDES).round()
                                                 .astype(int))] if complete else []
        pooled = [sample_tiles(SlideStore.open(store_path(out_dir, s)), COHORT_SAMPLE_TILES, slide_cfg).reshape(-1, 3)
                  for s in spread]
        if not pooled:
            raise ConfigError(out_dir / "stores", "extract.stain_reference is cohort, and the cohort has no complete "
                                                  "stores to fit it on", "run `wsi tile` first")
        target = fit_stain(method, np.concatenate(pooled), out_dir / "stores", "the cohort's tiles")
        return {"method": method, "reference": f"cohort ({len(pooled)} of {len(complete)} slides in "
                                               f"{out_dir / 'stores'})",
                "target": target}
    path = Path(reference)
    if (path / "run.json").is_file():
        return _run_reference(method, path)
    if path.is_dir() and path.suffix != ".zarr":
        return {"method": method, "reference": str(path.resolve()),
                "target": fit_stain(method, _read_images(path), path, "extract.stain_reference")}
    store = path if path.suffix == ".zarr" else None
    if store is None:
        store = store_path(out_dir, slide_id_from_path(path) if path.exists() else reference)
    if not is_complete(store):
        raise ConfigError(reference, "extract.stain_reference is not cohort, a folder of tile images, a model run "
                                     "or a tiled slide of this cohort",
                          "give one of those (a slide must be tiled first, e.g. with the cohort)")
    tiles = sample_tiles(SlideStore.open(store), REFERENCE_SAMPLE_TILES, slide_cfg)
    return {"method": method, "reference": str(Path(store).resolve()),
            "target": fit_stain(method, tiles, reference, "extract.stain_reference")}


def _run_reference(method: str, run_dir: Path) -> dict:
    """The reference a model run's features were normalised to (``run.json``'s feature attrs)."""
    import json

    stain = (json.loads((run_dir / "run.json").read_text()).get("feature_attrs") or {}).get("stain")
    if not stain or stain.get("method") != method:
        found = stain.get("method") if stain else "none"
        raise ConfigError(run_dir, f"extract.stain_reference is a model run trained on stain {found}, not {method}",
                          f"set extract.stain: {found}, or give another reference")
    return {k: stain[k] for k in ("method", "reference", "target")}


# ------------------------------------------------------------------------------------------ applying
# sRGB (D65) to CIE XYZ and the reference white, as torchstain (and OpenCV) use them
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (L in [0, 100], a and b around 0) of float RGB tiles (n, 3, h, w) in [0, 1], on their device:
    torchstain's ``lab_split(rgb2lab(...))`` for a batch."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("kc,nchw->nkhw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`, clamped to [0, 1]: torchstain's ``lab2rgb(lab_merge(...))``."""
    lightness, a, b = lab.unbind(1)
    fy = (lightness + 16) / 116
    f = torch.stack([a / 500 + fy, fy, fy - b / 200], dim=1)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * white
    matrix = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.device, lab.dtype)
    linear = torch.einsum("ck,nkhw->nchw", matrix, xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp_(0, 1)


class StainTransform:
    """Maps float RGB tiles (n, 3, h, w) in [0, 1] from a slide's fitted stain onto the reference's, on the
    tiles' device (see the module docstring)."""

    def __init__(self, stain: dict, device: torch.device):
        self.method = stain["method"]
        target, source = stain["target"], stain["slide"]
        if self.method == "macenko":
            self.unmix = torch.linalg.pinv(torch.tensor(source["stain_matrix"], dtype=torch.float32)).to(device)
            self.mix = torch.tensor(target["stain_matrix"], dtype=torch.float32, device=device)
            self.scale = (torch.tensor(target["max_concentrations"], dtype=torch.float32)
                          / torch.tensor(source["max_concentrations"], dtype=torch.float32)).to(device)
        elif self.method == "reinhard":  # per Lab channel: (c - mean) / std * target std + target mean
            def channels(values):
                return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)

            self.gain = channels(target["stds"]) / channels(source["stds"])
            self.shift = channels(target["means"]) - channels(source["means"]) * self.gain
        else:
            raise ConfigError(None, f"extract.stain {self.method!r} is not one of {'/'.join(STAIN_METHODS)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "macenko":
            od = -torch.log((x * 255 + 1) / IO)
            concentrations = torch.einsum("kc,nchw->nkhw", self.unmix, od) * self.scale.view(1, 2, 1, 1)
            rgb = IO * torch.exp(-torch.einsum("ck,nkhw->nchw", self.mix, concentrations))
            return rgb.clamp_(0, 255).div_(255)
        return lab_to_rgb(rgb_to_lab(x) * self.gain + self.shift)


def check_stain(method: str, stored: dict | None, reference: dict, path) -> None:
    """Complete features under a normalised key must have been mapped onto ``reference``; else a StoreError."""
    if method == "none" or (stored and same_stain_target(stored["target"], reference["target"])):
        return
    raise StoreError(path, f"its {method}-normalised features were fitted to another reference "
                           f"({(stored or {}).get('reference', 'unknown')}, not {reference['reference']})",
                     "delete its features/<encoder>+" + method + " to re-extract them with this reference")
