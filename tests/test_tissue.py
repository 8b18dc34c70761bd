"""wsi.tissue on thumbnails read from real files: synthetic slides whose ground truth is known (tissue, fat,
fragments, pen strokes of each colour, specks, smudges; and the hard cases: solid dark tumour, blood, mucin, ink
across tissue, stitched grey glass beside white padding), drawn images of single cases, glass-only images, a
real Aperio slide and two real H&E thumbnails (a needle core with blue marker on grey stitched glass, and a
tissue microarray with dense dark cores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.tissue import QC_OUTLINE_RGB, QC_REJECTED_RGB, TissueParams, qc_image, tissue_masks
from wsi_synth import PEN_INKS, HardCases, PenStroke, composite_marks

PARAMS = TissueParams.default()
DATA = Path(__file__).parent / "data"


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
    mask = tissue_masks(rgb, mpp, PARAMS).tissue
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
    fine = tissue_masks(fine_rgb, fine_mpp, PARAMS).tissue
    coarse = np.asarray(Image.fromarray(tissue_masks(coarse_rgb, coarse_mpp, PARAMS).tissue).resize(
        fine.shape[::-1], Image.Resampling.NEAREST))
    assert (fine & coarse).sum() / (fine | coarse).sum() >= 0.93


def test_scanner_colour_cast_does_not_change_the_mask(artefact_case):
    slide, rgb, mask, truth = artefact_case
    mpp = slide.mpp * slide.width / rgb.shape[1]
    yellowish = (rgb * np.array([0.97, 0.95, 0.84])).astype(np.uint8)
    cast = tissue_masks(yellowish, mpp, PARAMS).tissue
    assert (cast & mask).sum() / (cast | mask).sum() > 0.99
    # a field of view inside stroma, with no glass to balance on, keeps its tissue
    depth = ndimage.distance_transform_edt(truth["tissue"] & ~truth["fat"] & ~truth["pen"])
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    half = int(depth.max() / 1.5)
    inner = rgb[y - half:y + half, x - half:x + half]
    assert inner.shape[0] >= 10 and tissue_masks(inner, mpp, PARAMS).tissue.all()


def test_all_glass_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    glass = rng.normal((232, 228, 210), 2.5, (300, 400, 3))  # a yellowish scanner cast
    yy, xx = np.mgrid[:300, :400]
    glass *= 1 - 0.08 * np.exp(-((xx - 120) ** 2 + (yy - 150) ** 2) / 2000)[..., None]  # a faint smudge
    for cy, cx, r in ((40, 300, 3), (250, 60, 2), (200, 330, 4)):  # dark dust
        glass[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (70, 65, 60)
    glass[100:104, 200:260] = (120, 95, 70)  # a brown fibre
    mask = tissue_masks(glass.clip(0, 255).astype(np.uint8), 8.0, PARAMS).tissue
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
    mask = tissue_masks(rgb, mpp, PARAMS).tissue
    assert mask[fragment].mean() > 0.95 and not mask[fleck].any()


def test_holes_are_filled_only_when_small_and_asked():
    rgb = np.full((120, 120, 3), 240, np.uint8)
    rgb[10:110, 10:110] = (215, 140, 185)
    rgb[25:30, 25:30] = 240  # a 1,600 um2 hole at 8 um/px
    rgb[50:95, 50:95] = 240  # a 129,600 um2 lumen
    filled = tissue_masks(rgb, 8.0, PARAMS).tissue
    assert filled[25:30, 25:30].all() and not filled[55:90, 55:90].any()
    kept = tissue_masks(rgb, 8.0, dataclasses.replace(PARAMS, fill_holes=False, close_um=0)).tissue
    assert not kept[25:30, 25:30].any()


def test_real_slide_mask(real_slide_path):
    masks = {}
    for mpp in (4.0, 8.0):
        rgb, exact, _ = thumbnail(real_slide_path, mpp)
        masks[mpp] = tissue_masks(rgb, exact, PARAMS).tissue
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
        tissue_masks(np.zeros((10, 10), np.uint8), 8.0, PARAMS)


# ------------------------------------------------------------------------------------------- hard cases
@pytest.fixture(scope="module")
def hard_case(make_slide):
    """A slide with every hard case (yellowish glass cast), its 8 um/px thumbnail, masks and truth."""
    slide = make_slide("hard.svs", width=4096, height=3072, mpp=0.5, seed=12, tumour_tiles=1, pen_marks=True,
                       specks=True, hard=HardCases(solid_tumours=1, haemorrhage=1, mucin=1, pen_over_tissue=True,
                                                   scanner_padding=True, glass_rgb=(236.0, 232.0, 214.0)))
    rgb, mpp, downsample = thumbnail(slide.path, 8.0)
    masks = tissue_masks(rgb, mpp, PARAMS)
    return slide, rgb, masks, truth_on(slide, downsample, masks.tissue.shape)


def test_hard_slide_keeps_dense_tumour_blood_mucin_fat_and_stroma(hard_case):
    _, _, masks, truth = hard_case
    free = ~ndimage.binary_dilation(truth["pen"], iterations=1)  # tissue not under ink
    stroma = truth["tissue"] & ~np.logical_or.reduce([truth[k] for k in ("tumour", "fat", "blood", "mucin",
                                                                          "lymphoid")])
    recall = {k: masks.tissue[where & free].mean() for k, where in
              (("tumour", truth["tumour"]), ("blood", truth["blood"]), ("mucin", truth["mucin"]),
               ("fat", truth["fat"]), ("stroma", stroma))}
    assert all((where & free).sum() > 200 for where in (truth["tumour"], truth["blood"], truth["mucin"]))
    assert recall["tumour"] >= 0.99 and recall["stroma"] >= 0.99, recall
    assert recall["blood"] >= 0.95 and recall["mucin"] >= 0.95 and recall["fat"] >= 0.95, recall


def test_hard_slide_leaves_out_padding_grey_glass_and_ink(hard_case):
    _, _, masks, truth = hard_case
    assert truth["padding"].sum() > 100 and not (masks.tissue & truth["padding"]).any()
    # the stitched grey glass around the tissue stays out (bar a stray pixel where a smeared fringe meets it)
    assert (masks.tissue & ~ndimage.binary_dilation(truth["tissue"], iterations=3)).sum() <= 8
    ink_on_glass = truth["pen"] & ~ndimage.binary_dilation(truth["tissue"], iterations=2)
    assert ink_on_glass.sum() > 500
    assert masks.ink[ink_on_glass].mean() >= 0.9 and masks.tissue[ink_on_glass].mean() <= 0.05
    # the blue stroke drawn across tissue goes where it lies over tissue; the tissue beside it stays
    inked_tissue = truth["pen"] & truth["tissue"] & ~truth["blood"]
    assert inked_tissue.sum() > 100 and masks.tissue[inked_tissue].mean() <= 0.35


def _drawn(size=(160, 220)) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """A grey-glass thumbnail (8 um/px) with a pink tissue piece; returns (rgb float, tissue truth, rng)."""
    rng = np.random.default_rng(5)
    h, w = size
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = (243, 242, 245)
    yy, xx = np.mgrid[:h, :w]
    tissue = (yy - h / 2) ** 2 / (0.35 * h) ** 2 + (xx - w / 2) ** 2 / (0.3 * w) ** 2 <= 1
    rgb[tissue] = (222, 158, 205)
    return rgb, tissue, rng


def _finish(rgb: np.ndarray, rng) -> np.ndarray:
    return (rgb + rng.normal(0, 2.5, rgb.shape)).clip(0, 255).astype(np.uint8)


def test_dense_dark_blue_tumour_stays_when_blue_ink_crosses_it():
    """Solid high-grade tumour is as dark and blue as a real dense core (median (108, 82, 150), red/blue 0.72,
    some pixels down to 0.5); a blue marker stroke runs from the glass across it: only the stroke goes."""
    rgb, tissue, rng = _drawn()
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    tumour = tissue & ((yy - 80) ** 2 + (xx - 110) ** 2 <= 40 ** 2)
    shade = rng.normal(1, 0.12, tumour.sum())[:, None]  # nuclear texture, with some pixels far bluer
    rgb[tumour] = np.array([108, 82, 150]) * shade * np.where(rng.random((tumour.sum(), 1)) < 0.04,
                                                              [0.72, 0.8, 1.0], 1)
    stroke = np.abs((yy - 10) - 0.9 * (xx - 20)) <= 5  # a 10 px (80 um) wide stroke
    rgb[stroke] *= np.array([0.20, 0.34, 0.76])
    masks = tissue_masks(_finish(rgb, rng), 8.0, PARAMS)
    clear = tumour & ~ndimage.binary_dilation(stroke, iterations=2)
    assert masks.tissue[clear].mean() >= 0.995
    assert not masks.ink[clear].any()
    assert masks.ink[stroke].mean() >= 0.95 and not (masks.tissue & stroke).any()


@pytest.mark.parametrize("keep_blood", [True, False])
def test_blood_is_told_from_red_ink_by_shape(keep_blood):
    """A pool of blood at the tissue's rim is as red as a red marker stroke beside it; the stroke is long for its
    width, the pool is not: with keep_blood the pool stays and the stroke goes; without, both go."""
    rgb, tissue, rng = _drawn()
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    pool = ((yy - 80) ** 2 + (xx - 40) ** 2 <= 22 ** 2) & (rng.random((h, w)) < 0.97)
    rgb[pool] = (189, 53, 66)
    stroke = (np.abs(yy - 140) <= 4) & (xx >= 30) & (xx <= 190)
    rgb[stroke] = rgb[stroke] * np.array([0.80, 0.17, 0.22])
    masks = tissue_masks(_finish(rgb, rng), 8.0, dataclasses.replace(PARAMS, keep_blood=keep_blood))
    assert masks.ink[stroke].mean() >= 0.95 and not (masks.tissue & stroke).any()
    inner_pool = ndimage.binary_erosion(pool, iterations=2)
    if keep_blood:
        assert masks.tissue[inner_pool].mean() >= 0.97 and not masks.ink[inner_pool].any()
    else:
        assert masks.ink[inner_pool].mean() >= 0.95


def test_red_ink_is_followed_across_dark_tumour_a_pool_of_blood_and_a_crossing_stroke():
    """A red stroke runs from the glass over dense dark-blue tumour (where the mix is a purple H&E also shows),
    through a pool of blood (a darker red inside a wide red region) and out onto the glass again, where a blue
    stroke crossing it cuts off a short red stub. All of the red stroke goes; the tumour and the blood beside it
    stay."""
    rgb, tissue, rng = _drawn((200, 260))
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    tumour = tissue & ((yy - 100) ** 2 + (xx - 85) ** 2 <= 30 ** 2)
    rgb[tumour] = np.array([108, 82, 150]) * rng.normal(1, 0.12, tumour.sum())[:, None]
    pool = tissue & ((yy - 100) ** 2 + (xx - 170) ** 2 <= 24 ** 2)
    rgb[pool] = (189, 53, 66)
    red = (np.abs(yy - 100) <= 5) & (xx >= 5) & (xx <= 252)
    blue = (np.abs(xx - 236) <= 5) & (yy >= 20) & (yy <= 180)
    rgb[red] *= np.array([0.80, 0.17, 0.22])
    rgb[blue] = rgb[blue] / rgb[blue].max(axis=1, keepdims=True) * 242 * np.array([0.20, 0.34, 0.76])
    masks = tissue_masks(_finish(rgb, rng), 8.0, PARAMS)
    for part in (tumour, pool, red & (xx > 241)):  # over tumour, over blood, the stub beyond the blue stroke
        assert masks.ink[red & part].mean() >= 0.9 and masks.tissue[red & part].mean() <= 0.05
    away = ~ndimage.binary_dilation(red, iterations=3)
    assert masks.tissue[tumour & away].mean() >= 0.995
    assert masks.tissue[ndimage.binary_erosion(pool, iterations=2) & away].mean() >= 0.97


def test_a_red_stroke_ending_just_past_a_pool_of_blood_goes_with_its_rounded_end():
    """A red stroke comes down the glass, crosses a pool of blood beside the tissue and stops just past the
    pool, its rounded end on the glass. That end is blood's colour and joined to the pool, too short to pass as
    a stroke alone; it is ink with the rest of the stroke, and the pool beside the stroke stays."""
    rgb, tissue, rng = _drawn((220, 300))
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    pool = (yy - 130) ** 2 + (xx - 40) ** 2 <= 30 ** 2
    rgb[pool] = (189, 53, 66)
    red = ((np.abs(xx - 40) <= 9) & (yy >= 2) & (yy <= 162)) | ((yy - 162) ** 2 + (xx - 40) ** 2 <= 9 ** 2)
    rgb[red] *= np.array([0.80, 0.17, 0.22])
    rgb[red & ~pool & ~tissue] = (198, 56, 69)  # on the glass, red ink is as red as blood
    masks = tissue_masks(_finish(rgb, rng), 8.0, PARAMS)
    past = red & ~pool & (yy > 130)  # the end, beyond the pool
    assert past.sum() > 100 and masks.ink[past].mean() >= 0.9 and not masks.tissue[past].any()
    beside = pool & ~ndimage.binary_dilation(red, iterations=3)
    assert masks.tissue[ndimage.binary_erosion(beside, iterations=2)].mean() >= 0.97


def test_the_outline_sits_where_a_blurred_edge_is_half_tissue():
    """A thumbnail blurs the tissue's edge over a few pixels of faint pink; the mask's outline stays within a
    pixel of the true edge rather than taking in the whole halo."""
    rgb, tissue, rng = _drawn()
    blurred = cv2.GaussianBlur(rgb, (0, 0), 1.0)
    masks = tissue_masks(_finish(blurred, rng), 8.0, PARAMS)
    grown = ndimage.binary_dilation(tissue, iterations=1)
    rim = grown & ~tissue  # the ring of pixels just outside the true edge
    assert masks.tissue[ndimage.binary_erosion(tissue, iterations=1)].all()
    assert (masks.tissue & ~grown).sum() <= 0.1 * rim.sum()  # next to nothing beyond that ring


def test_grey_stitched_glass_beside_white_padding_is_not_tissue():
    """A scanner imaged fields of light-grey glass (241-247, a step at each seam) and wrote pure white
    padding elsewhere; read against the padding, the grey glass would pass for faint stain."""
    rgb, tissue, rng = _drawn((200, 300))
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    field = (yy // 50) * 7 + xx // 60
    gain = 1 + 0.012 * np.sin(field * 2.3)  # about +-3 levels from field to field
    rgb *= gain[..., None]
    padding = (xx < 45) | (yy > 175) | ((yy < 30) & (xx > 200))
    rgb = _finish(rgb, rng)
    rgb[padding & ~tissue] = 255
    masks = tissue_masks(rgb, 8.0, PARAMS)
    assert masks.tissue[ndimage.binary_erosion(tissue, iterations=2)].all()
    assert not (masks.tissue & ~ndimage.binary_dilation(tissue, iterations=2)).any()


def test_a_stroke_running_off_the_edge_is_ink_all_the_way_to_the_edge():
    """A blue marker stroke from beside the tissue out past the thumbnail's left edge, bleeding into the glass
    beside it (a halo 4 px = 32 um deep, at 0.3 of the ink's density at its edge): the stroke and its halo are
    ink up to the edge, and no glass is kept."""
    rgb, tissue, rng = _drawn()
    stroke = PenStroke(((60.0, 40.0), (30.0, 60.0), (-15.0, 90.0)), 5.0, "blue", 1, halo=4.0, halo_density=0.3)
    inked, truth = composite_marks(rgb, [stroke])
    masks = tissue_masks(_finish(inked.astype(np.float32), rng), 8.0, PARAMS)
    assert not (masks.tissue & ~ndimage.binary_dilation(tissue, iterations=2)).any()
    core = truth["pen"] & ~truth["halo"]
    assert masks.ink[core].mean() >= 0.98 and masks.ink[:, :3][core[:, :3]].all()  # to the edge
    assert masks.tissue[ndimage.binary_erosion(tissue, iterations=2)].all()


def test_a_halo_on_glass_is_glass_and_tissue_under_it_stays():
    """A dense blue blot on the tissue's rim fades into a halo of 6 px (48 um) over the glass and the tissue
    around it: the tinted glass is not tissue, the tinted tissue is."""
    rgb, tissue, rng = _drawn()
    blot = PenStroke(((30.0, 70.0), (45.0, 80.0)), 12.0, "blue", 2, halo=6.0, halo_density=0.35)
    inked, truth = composite_marks(rgb, [blot])
    masks = tissue_masks(_finish(inked.astype(np.float32), rng), 8.0, PARAMS)
    halo_on_glass = truth["halo"] & ~ndimage.binary_dilation(tissue, iterations=2)
    assert halo_on_glass.sum() > 300 and masks.tissue[halo_on_glass].mean() <= 0.01
    halo_on_tissue = truth["halo"] & ndimage.binary_erosion(tissue, iterations=2)
    assert halo_on_tissue.sum() > 100 and masks.tissue[halo_on_tissue].mean() >= 0.99


def test_a_stroke_across_fat_keeps_the_fat_cells_beside_it():
    """Fat in a thumbnail is white cells (70 um, 9 px) in a net of faint pink septa; a blue stroke across it
    opens the cells beside it onto the ink, which hole filling alone would leave out."""
    rgb, tissue, rng = _drawn()
    h, w = tissue.shape
    yy, xx = np.mgrid[:h, :w]
    fat = tissue & ((yy - 80) ** 2 / 45 ** 2 + (xx - 110) ** 2 / 55 ** 2 <= 1)
    septa = (yy % 9 == 0) | (xx % 9 == 0)
    rgb[fat & ~septa] = (240, 238, 243)
    rgb[fat & septa] = (226, 190, 215)
    stroke = np.abs((yy - 80) - 0.3 * (xx - 110)) <= 4
    rgb[stroke] *= np.array([0.20, 0.34, 0.76])
    masks = tissue_masks(_finish(rgb, rng), 8.0, PARAMS)
    beside = fat & ~ndimage.binary_dilation(stroke, iterations=2)
    assert masks.tissue[beside].mean() >= 0.95  # be551c4: 0.93 (the cells beside the stroke left out)
    assert not (masks.tissue & stroke).any()


# ------------------------------------------------------------------------------------- real thumbnails
def _real(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


@pytest.mark.slow
def test_real_needle_core_on_grey_stitched_glass_with_blue_marker():
    rgb = _real("slide_with_ink.jpeg")
    masks = tissue_masks(rgb, 8.0, PARAMS)
    px = rgb.astype(np.int16)
    # empty grey glass: neutral, light, not padding, and more than 3 px from anything else
    glass = ndimage.binary_erosion((px.min(2) >= 232) & (np.ptp(px, axis=2) <= 8) & (px.min(2) < 253),
                                   iterations=3)
    assert masks.tissue.mean() > 0.2
    assert (masks.tissue & glass).sum() <= 0.01 * masks.tissue.sum()  # the previous mask: 23% glass
    marker = (px[..., 2] > 1.6 * px[..., 0]) & (px.mean(2) < 140)  # the dense blue blot
    assert marker.sum() > 2000
    # tissue that shows through the blot's thinner rim stays (its red/blue, 0.5-0.6, is dense tumour's too)
    assert masks.ink[marker].mean() >= 0.9 and masks.tissue[marker].mean() <= 0.1
    stained = (np.ptp(px, axis=2) >= 50) & (px.mean(2) < 210) & ~ndimage.binary_dilation(masks.ink, iterations=3)
    assert masks.tissue[stained].mean() >= 0.98


def test_real_tissue_microarray_keeps_its_dense_dark_cores():
    rgb = _real("tma_spots.jpeg")
    masks = tissue_masks(rgb, 8.0, PARAMS)
    px = rgb.astype(np.float32)
    dark = (px[..., 0] < 0.8 * px[..., 2]) & (px.mean(2) < 140)  # the darkest core: dense tumour
    assert dark.sum() > 2000
    assert masks.tissue[dark].mean() >= 0.995 and not masks.ink.any()
    stained = (np.ptp(px, axis=2) >= 40) & (px.mean(2) < 210)
    assert masks.tissue[stained].mean() >= 0.99


def test_qc_image_outlines_rejected_ink_in_its_own_colour():
    rgb = np.full((50, 60, 3), 200, np.uint8)
    tissue = np.zeros((50, 60), bool)
    tissue[10:40, 5:25] = True
    ink = np.zeros_like(tissue)
    ink[10:40, 35:55] = True
    qc = qc_image(rgb, tissue, ink)
    assert (qc[10, 10] == QC_OUTLINE_RGB).all() and (qc[10, 40] == QC_REJECTED_RGB).all()
    assert (qc[25, 15] == 200).all() and (qc[25, 45] == 200).all()


def test_ink_crossing_real_tissue_leaves_the_tissue_and_its_halo_on_glass_goes():
    """A blue marker stroke with a halo drawn across the real needle core (its ink's density added to the
    tissue's): the tissue beside the stroke stays as the clean image's mask has it, the stroke goes, and the
    glass its halo tints is not tissue."""
    clean = _real("slide_with_ink.jpeg")[:, 1200:2200]  # a stretch of the core away from its own blot
    before = tissue_masks(clean, 8.0, PARAMS).tissue
    stroke = PenStroke(((100.0, -20.0), (500.0, 500.0), (900.0, 1020.0)), 8.0, "blue", 3, halo=10.0,
                       halo_density=0.25)
    inked, truth = composite_marks(clean.astype(np.float32), [stroke])
    padding = clean.min(axis=2) >= 253  # never imaged: no ink shows there
    inked[padding] = clean[padding]
    masks = tissue_masks(inked, 8.0, PARAMS)
    core = truth["pen"] & ~truth["halo"] & ~padding
    beside = before & ~ndimage.binary_dilation(core, iterations=2)
    assert masks.tissue[beside].mean() >= 0.99
    assert masks.ink[core].mean() >= 0.95 and masks.tissue[core].mean() <= 0.01
    halo_on_glass = truth["halo"] & ~padding & ~ndimage.binary_dilation(before, iterations=2)
    assert halo_on_glass.sum() > 1000 and masks.tissue[halo_on_glass].mean() <= 0.01


def _tma_core() -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The tissue microarray cropped around its largest dense dark core: (rgb, the dense core's pixels (red
    under 0.8 of blue, mean under 140), the core's centre (x, y))."""
    rgb = _real("tma_spots.jpeg")
    px = rgb.astype(np.float32)
    dark = (px[..., 0] < 0.8 * px[..., 2]) & (px.mean(2) < 140)
    labels, n = ndimage.label(dark)
    largest = 1 + int(np.argmax(ndimage.sum(dark, labels, range(1, n + 1))))
    cy, cx = (int(v) for v in ndimage.center_of_mass(labels == largest))
    box = (slice(max(cy - 200, 0), cy + 200), slice(max(cx - 200, 0), cx + 200))
    return rgb[box], (labels == largest)[box], (float(cx - box[1].start), float(cy - box[0].start))


def test_a_fold_over_dense_tumour_is_tissue_not_ink():
    """A fold doubles the tissue's density: over the real microarray's dense dark core it is as dark as black
    ink and its red/blue as low as blue ink's, but the density it adds is H&E's (green absorbed most), so the
    doubled tumour stays tissue (the mask before the fix, branch inkfold4, called 0.2 of the core ink)."""
    from wsi_synth import defects as dd

    rgb, core, (cx, cy) = _tma_core()
    assert core.sum() > 2000
    fold = dd.Fold(cx, cy, 1.2, 40.0, 10.0, line_width=1.0, line_density=1.5)  # 320 um long, 80 um wide
    folded = dd.composite(rgb, [fold])
    doubled = dd.composite_truth(core, [fold])["fold"] & core
    assert doubled.sum() > 300
    masks = tissue_masks(folded, 8.0, PARAMS)
    assert not masks.ink[core].any()
    assert masks.tissue[core].mean() >= 0.995 and masks.tissue[doubled].all()


def test_a_fold_over_the_real_slides_epidermis_is_tissue_not_ink():
    """A fold across the real Aperio slide's epidermis, drawn at full resolution and seen on a 16x thumbnail as
    tiling sees it: the doubled epidermis is as blue as blue ink, and its haematoxylin is bluer than the
    generator's (blue 0.6 of green, 1.0 of red), but the density it adds points along the tissue's own, so it
    stays tissue and nothing is called ink (the mask before this fix, branch hue, called 0.4 of it ink and kept
    0.86 of the clean mask)."""
    from wsi.slide import open_slide
    from wsi_synth import defects as dd

    with open_slide(DATA / "cmu_small_region.svs") as slide:
        rgb, um = slide.read_region(0, 0, 0, slide.width, slide.height), slide.mpp_x
    h, w = rgb.shape[:2]
    fold = dd.Fold(1207.0, 748.0, 1.365, 1012.0, 255.0, line_width=6.9, line_density=1.38)  # 130 um wide, 1 mm long
    on_thumbnail = dataclasses.replace(fold, x=fold.x / 16, y=fold.y / 16, length=fold.length / 16,
                                       width=fold.width / 16, line_width=1.0)

    def thumbnail(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, (w // 16, h // 16), interpolation=cv2.INTER_AREA)

    clean = tissue_masks(thumbnail(rgb), 16 * um, PARAMS).tissue
    masks = tissue_masks(thumbnail(dd.composite(rgb, [fold])), 16 * um, PARAMS)
    doubled = dd.composite_truth(clean, [on_thumbnail])["fold"]
    assert doubled.sum() > 800
    assert not masks.ink.any()
    assert masks.tissue[doubled].mean() >= 0.98 and masks.tissue[clean].mean() >= 0.99


@pytest.mark.parametrize("colour", ["black", "blue"])
def test_ink_over_dense_tumour_still_goes(colour):
    """A black or blue marker stroke across the real microarray's dense dark core (its density added to the
    core's), with a fold over the core beside it: the stroke is ink, over the core and off it, and the core and
    the doubled core beside it stay tissue."""
    from wsi_synth import defects as dd

    rgb, core, (cx, cy) = _tma_core()
    fold = dd.Fold(cx - 5, cy + 25, 0.1, 30.0, 8.0, line_width=1.0, line_density=1.5)
    stroke = PenStroke(((cx - 120, cy - 60), (cx, cy), (cx + 120, cy + 60)), 7.0, colour, 11)
    inked, truth = composite_marks(dd.composite(rgb, [fold]).astype(np.float32), [stroke])
    masks = tissue_masks(inked, 8.0, PARAMS)
    pen = truth["pen"] & ~truth["halo"]
    assert (pen & core).sum() > 100
    # the mask before: 0.94 and 0.02 (black)
    assert masks.ink[pen & core].mean() >= 0.9 and masks.tissue[pen].mean() <= 0.03
    beside = core & ~ndimage.binary_dilation(pen, iterations=2)
    assert masks.tissue[beside].mean() >= 0.99 and not masks.ink[beside].any()


def test_euclidean_distances_are_exact_so_every_process_gets_the_same_mask():
    """OpenCV's precise distance transform (IPP's) rounds small images' distances differently from one process
    to the next (some 500 pixels of these 50 masks are off exact, a different number each process), which
    flipped a mask; the mask's distances are the exact ones, SciPy's exact transform's, to the bit."""
    from wsi.tissue import _euclidean_distance

    rng = np.random.default_rng(3)
    for _ in range(50):
        h, w = rng.integers(15, 40, 2)
        blobs = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 3) > 0.45
        zero_at = cv2.copyMakeBorder(blobs.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        exact = ndimage.distance_transform_edt(zero_at).astype(np.float32)
        np.testing.assert_array_equal(_euclidean_distance(zero_at), exact)
