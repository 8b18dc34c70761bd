"""wsi.tissue on thumbnails read from real files: synthetic slides whose ground truth is known (tissue, fat,
fragments, pen strokes of each colour, specks, smudges), glass-only images, and a real Aperio slide."""

from __future__ import annotations

import dataclasses

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from wsi.config import load_config
from wsi.demo import PEN_INKS
from wsi.errors import ConfigError
from wsi.tissue import QC_OUTLINE_RGB, TissueParams, qc_image, tissue_mask

PARAMS = TissueParams.default()


def thumbnail(path, mpp: float) -> tuple[np.ndarray, float, float]:
    """(RGB thumbnail at about ``mpp`` um/px, its exact um/px, its downsample), area-averaged from the finest
    level that is not finer than needed, the way a tiler reads one."""
    with openslide.OpenSlide(str(path)) as s:
        slide_mpp = float(s.properties["openslide.mpp-x"])
        downsample = mpp / slide_mpp
        level = s.get_best_level_for_downsample(downsample)
        image = s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB")
        w, h = round(s.dimensions[0] / downsample), round(s.dimensions[1] / downsample)
        exact = s.dimensions[0] / w
    return np.asarray(image.resize((w, h), Image.Resampling.BOX)), exact * slide_mpp, exact


def truth_on(slide, downsample: float, shape) -> dict[str, np.ndarray]:
    return {k: v[: shape[0], : shape[1]] for k, v in slide.truth_masks(downsample).items()}


@pytest.fixture(scope="module", params=[8.0, 16.0], ids=["8um", "16um"])
def artefact_case(request, artefact_slide):
    """The artefact slide's thumbnail at 8 and 16 um/px, its mask and its ground truth on the same grid."""
    rgb, mpp, downsample = thumbnail(artefact_slide.path, request.param)
    mask = tissue_mask(rgb, mpp, PARAMS)
    return artefact_slide, rgb, mask, truth_on(artefact_slide, downsample, mask.shape)


def test_keeps_tissue_fat_and_fragments_and_nothing_far_from_them(artefact_case):
    slide, _, mask, truth = artefact_case
    clean = truth["tissue"] & ~ndimage.binary_dilation(truth["pen"], iterations=2)  # ink on tissue is rejected
    assert mask[clean].mean() >= 0.97
    assert mask[truth["fat"]].mean() >= 0.95  # white vacuoles in pale septa are tissue
    assert mask[truth["tumour"]].mean() >= 0.97
    # every separate piece is kept, small biopsy fragments included
    labels, n = ndimage.label(truth["tissue"])
    assert n == len(slide.tissue_boxes) >= 3
    for piece in range(1, n + 1):
        assert mask[(labels == piece) & clean].mean() >= 0.9
    # what the mask adds is the rim whose colour JPEG's 2x2 chroma subsampling smears, never glass farther out
    # (bar a stray pixel or two where a stroke's smeared fringe meets the tissue)
    assert (mask & ~ndimage.binary_dilation(truth["tissue"], iterations=3)).sum() <= 2
    assert (mask & ~truth["tissue"]).sum() < 0.05 * truth["tissue"].sum()


@pytest.mark.parametrize("colour", list(PEN_INKS))
def test_rejects_pen_ink_of_each_colour(artefact_case, colour):
    slide, _, mask, truth = artefact_case
    box = slide.pen_boxes[list(PEN_INKS).index(colour)]  # one stroke per ink, in PEN_INKS order
    downsample = slide.width / mask.shape[1]
    x0, y0, x1, y1 = (int(v / downsample) for v in box)
    stroke = np.zeros_like(mask)
    stroke[y0:y1 + 1, x0:x1 + 1] = truth["pen"][y0:y1 + 1, x0:x1 + 1]
    ink_on_glass = stroke & ~truth["tissue"]
    assert ink_on_glass.sum() > 20
    assert mask[ink_on_glass].mean() <= 0.05


def test_no_speck_or_smudge_survives(artefact_case):
    slide, _, mask, _ = artefact_case
    downsample = slide.width / mask.shape[1]
    assert len(slide.speck_boxes) >= 10
    for x0, y0, x1, y1 in slide.speck_boxes:
        assert not mask[int(y0 / downsample):int(y1 / downsample) + 1,
                        int(x0 / downsample):int(x1 / downsample) + 1].any()


def test_mask_is_stable_across_thumbnail_resolutions(artefact_slide):
    fine_rgb, fine_mpp, _ = thumbnail(artefact_slide.path, 8.0)
    coarse_rgb, coarse_mpp, _ = thumbnail(artefact_slide.path, 16.0)
    fine = tissue_mask(fine_rgb, fine_mpp, PARAMS)
    coarse = np.asarray(Image.fromarray(tissue_mask(coarse_rgb, coarse_mpp, PARAMS)).resize(
        fine.shape[::-1], Image.Resampling.NEAREST))
    assert (fine & coarse).sum() / (fine | coarse).sum() >= 0.93


def test_scanner_colour_cast_does_not_change_the_mask(artefact_case):
    slide, rgb, mask, truth = artefact_case
    mpp = slide.mpp * slide.width / rgb.shape[1]
    yellowish = (rgb * np.array([0.97, 0.95, 0.84])).astype(np.uint8)
    cast = tissue_mask(yellowish, mpp, PARAMS)
    assert (cast & mask).sum() / (cast | mask).sum() > 0.99
    # a field of view inside stroma, with no glass to balance on, keeps its tissue
    depth = ndimage.distance_transform_edt(truth["tissue"] & ~truth["fat"] & ~truth["pen"])
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    half = int(depth.max() / 1.5)
    inner = rgb[y - half:y + half, x - half:x + half]
    assert inner.shape[0] >= 10 and tissue_mask(inner, mpp, PARAMS).all()


def test_all_glass_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    glass = rng.normal((232, 228, 210), 2.5, (300, 400, 3))  # a yellowish scanner cast
    yy, xx = np.mgrid[:300, :400]
    glass *= 1 - 0.08 * np.exp(-((xx - 120) ** 2 + (yy - 150) ** 2) / 2000)[..., None]  # a faint smudge
    for cy, cx, r in ((40, 300, 3), (250, 60, 2), (200, 330, 4)):  # dark dust
        glass[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (70, 65, 60)
    glass[100:104, 200:260] = (120, 95, 70)  # a brown fibre
    mask = tissue_mask(glass.clip(0, 255).astype(np.uint8), 8.0, PARAMS)
    assert mask.shape == (300, 400) and not mask.any()


@pytest.mark.parametrize("mpp", [4.0, 8.0, 16.0])
def test_fragment_size_is_in_microns(mpp):
    """A 30,000 um2 biopsy fragment is kept and a 5,000 um2 fleck of the same stain dropped, at any mpp."""
    size = round(1600 / mpp)
    rgb = np.full((size, size, 3), 240, np.uint8)
    yy, xx = (np.mgrid[:size, :size] + 0.5) * mpp  # um
    fragment = (xx - 400) ** 2 + (yy - 400) ** 2 <= 30000 / np.pi
    fleck = (xx - 1200) ** 2 + (yy - 1200) ** 2 <= 5000 / np.pi
    rgb[fragment | fleck] = (215, 140, 185)
    mask = tissue_mask(rgb, mpp, PARAMS)
    assert mask[fragment].mean() > 0.95 and not mask[fleck].any()


def test_holes_are_filled_only_when_small_and_asked():
    rgb = np.full((120, 120, 3), 240, np.uint8)
    rgb[10:110, 10:110] = (215, 140, 185)
    rgb[25:30, 25:30] = 240  # a 1,600 um2 hole at 8 um/px
    rgb[50:95, 50:95] = 240  # a 129,600 um2 lumen
    filled = tissue_mask(rgb, 8.0, PARAMS)
    assert filled[25:30, 25:30].all() and not filled[55:90, 55:90].any()
    kept = tissue_mask(rgb, 8.0, dataclasses.replace(PARAMS, fill_holes=False, close_um=0))
    assert not kept[25:30, 25:30].any()


def test_real_slide_mask(real_slide_path):
    masks = {}
    for mpp in (4.0, 8.0):
        rgb, exact, _ = thumbnail(real_slide_path, mpp)
        masks[mpp] = tissue_mask(rgb, exact, PARAMS)
    fine, coarse = masks[4.0], masks[8.0]
    # the section runs down the middle of the field; glass (with a few debris flecks) on either side
    assert 0.3 < fine.mean() < 0.5 and abs(fine.mean() - coarse.mean()) < 0.02
    h, w = fine.shape
    assert fine[h // 3:2 * h // 3, int(w * 0.45):int(w * 0.55)].mean() > 0.95
    assert not fine[: h // 4, : w // 4].any() and not fine[:, int(w * 0.92):].any()


def test_qc_image_outlines_the_mask_and_leaves_the_rest():
    rgb = np.full((50, 60, 3), 200, np.uint8)
    mask = np.zeros((50, 60), bool)
    mask[10:40, 15:45] = True
    qc = qc_image(rgb, mask)
    outline = (qc == QC_OUTLINE_RGB).all(axis=2)
    assert outline[10, 20] and outline[11, 20] and outline[25, 44] and not outline[25, 30]
    assert not (outline & ~mask).any()
    assert (qc[~outline] == 200).all() and (rgb == 200).all()
    with pytest.raises(ValueError, match="differ in size"):
        qc_image(rgb, mask[:10])


def test_params_round_trip_and_reject_bad_config():
    section = load_config()["tissue"]
    assert PARAMS.to_dict() == section and TissueParams.from_dict(PARAMS.to_dict()) == PARAMS
    with pytest.raises(ConfigError, match="unknown keys \\['sat_min'\\]"):
        TissueParams.from_dict({**section, "sat_min": 0.1})
    with pytest.raises(ConfigError, match="missing keys \\['close_um'\\]"):
        TissueParams.from_dict({k: v for k, v in section.items() if k != "close_um"})
    with pytest.raises(ConfigError, match="tissue.saturation_min: must be within 0..1"):
        dataclasses.replace(PARAMS, saturation_min=7)
    with pytest.raises(ValueError, match="RGB uint8"):
        tissue_mask(np.zeros((10, 10), np.uint8), 8.0, PARAMS)
