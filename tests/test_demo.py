"""wsi_synth: synthetic slides open in openslide and tiffslide with identical pixels, report the MPP their
format promises, show what their ground truth says, and the demo cohort's labels match its slides."""

from __future__ import annotations

import csv
import doctest

import numpy as np
import openslide
import pytest
import tiffslide
from scipy import ndimage

from wsi.errors import ConfigError
from wsi_synth import PEN_INKS, HardCases, make_demo_cohort, write_synthetic_slide


def read_openslide(path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))


def box_pixels(truth: np.ndarray, box, downsample: float) -> np.ndarray:
    """The part of a truth mask (on a grid of ``downsample``) inside a level-0 box."""
    x0, y0, x1, y1 = (int(v // downsample) for v in box)
    return truth[y0:y1 + 1, x0:x1 + 1]


@pytest.mark.parametrize("kind", ["aperio", "generic"])
def test_both_backends_decode_identical_pixels_close_to_the_rendering(make_slide, kind):
    slide = make_slide(f"pair_{kind}.tif", width=1200, height=900, kind=kind, seed=4, tumour_tiles=1,
                       pen_marks=True)
    with openslide.OpenSlide(str(slide.path)) as o, tiffslide.TiffSlide(slide.path) as t:
        assert o.level_dimensions == t.level_dimensions == ((1200, 900), (300, 225), (75, 57))
        for level, downsample in enumerate((1, 4, 16)):
            size = o.level_dimensions[level]
            a = np.asarray(o.read_region((0, 0), level, size).convert("RGB"))
            b = t.read_region((0, 0), level, size, as_array=True)
            assert np.array_equal(a, b), f"level {level}: openslide and tiffslide decode differently"
            # against what was rendered: the error is JPEG's (quality 85, 2x2 chroma subsampling), and colours
            # are not swapped or shifted (YCbCr read back as RGB would be off by tens of levels)
            err = a.astype(int) - slide.render_level(downsample, 0, 0, *size)
            assert np.abs(err).mean() < 4.0 and np.percentile(np.abs(err), 99) < 30
            assert np.abs(err.mean(axis=(0, 1))).max() < 1.5


@pytest.mark.parametrize(("kind", "mpp", "vendor", "objective"), [
    ("aperio", 0.5, "aperio", "20"),
    ("aperio", 0.25, "aperio", "40"),
    ("aperio", None, "aperio", None),
    ("generic", 0.5, "generic-tiff", None),
    ("generic", None, "generic-tiff", None),
])
def test_each_kind_reports_its_mpp_in_both_backends(tmp_path, kind, mpp, vendor, objective):
    path = write_synthetic_slide(tmp_path / "s.tif", width=512, height=384, mpp=mpp, kind=kind,
                                 downsamples=(1, 4)).path
    with openslide.OpenSlide(str(path)) as o, tiffslide.TiffSlide(path) as t:
        assert o.properties["openslide.vendor"] == vendor
        assert o.properties.get("openslide.objective-power") == objective
        if mpp is None:
            assert "openslide.mpp-x" not in o.properties and t.properties["tiffslide.mpp-x"] is None
        else:
            assert float(o.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
            assert float(o.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
            assert t.properties["tiffslide.mpp-x"] == pytest.approx(mpp, rel=1e-6)
        assert o.level_count == t.level_count == 2


def test_dicom_slide_is_a_folder_openslide_opens_with_its_mpp_and_rendered_pixels(make_slide):
    import pydicom

    slide = make_slide("dicom_small", width=1024, height=768, downsamples=(1, 4), kind="dicom", mpp=0.5, seed=4,
                       tumour_tiles=1)
    files = sorted(slide.path.iterdir())
    assert slide.path.is_dir() and [f.name for f in files] == ["level-0.dcm", "level-1.dcm"]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(h, key) for h in headers}) == 1, f"{key} differs between levels"
    assert [h.NumberOfFrames for h in headers] == [4 * 3, 1]  # 256-px frames, edge frames padded
    assert all(h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6" and h.DimensionOrganizationType == "TILED_FULL"
               for h in headers)
    with openslide.OpenSlide(str(files[1])) as o:  # any one file opens the whole series
        assert o.properties["openslide.vendor"] == "dicom"
        assert o.level_dimensions == ((1024, 768), (256, 192))
        assert float(o.properties["openslide.mpp-x"]) == float(o.properties["openslide.mpp-y"]) == 0.5
        assert o.properties["openslide.objective-power"] == "20"
        for level, downsample in enumerate((1, 4)):
            size = o.level_dimensions[level]
            err = np.asarray(o.read_region((0, 0), level, size).convert("RGB")).astype(int) - slide.render_level(
                downsample, 0, 0, *size)
            assert np.abs(err).mean() < 4.0 and np.percentile(np.abs(err), 99) < 30
            assert np.abs(err.mean(axis=(0, 1))).max() < 1.5


def test_levels_may_be_any_increasing_factors(make_slide):
    slide = make_slide("odd_levels.svs", width=2000, height=1500, downsamples=(1, 3, 9), seed=2)
    with openslide.OpenSlide(str(slide.path)) as o, tiffslide.TiffSlide(slide.path) as t:
        assert o.level_dimensions == ((2000, 1500), (667, 500), (223, 167))
        assert o.level_downsamples == pytest.approx((1, 3, 9), rel=3e-3)
        assert t.level_downsamples == pytest.approx(o.level_downsamples)


@pytest.fixture(scope="module")
def coarse_case(make_slide):
    """A slide with a tumour box, and its level 0 as rendered (1536 x 1152: divisible by 3, 4 and 16)."""
    slide = make_slide("coarse.svs", width=1536, height=1152, seed=2, tumour_boxes=[(600, 400, 1000, 760)],
                       pen_marks=True)
    return slide, slide.render_level(1, 0, 0, 1536, 1152).astype(float)


@pytest.mark.parametrize("downsample", [3, 4, 16])
def test_coarse_levels_look_like_area_averaged_level0(coarse_case, downsample):
    slide, fine = coarse_case
    cols, rows = 1536 // downsample, 1152 // downsample
    averaged = fine.reshape(rows, downsample, cols, downsample, 3).mean(axis=(1, 3))
    diff = slide.render_level(downsample, 0, 0, cols, rows) - averaged
    # per pixel they differ only where nuclei shrink below a pixel and turn into their mean shade
    assert np.abs(diff).mean() < 3.5
    truth = slide.truth_masks(downsample)
    assert np.abs(diff[truth["tissue"]].mean(axis=0)).max() < 2.5  # the same colour on average
    assert np.abs(diff[truth["tumour"]].mean(axis=0)).max() < 8  # dense nuclei: the same shade within 3%


def test_same_seed_same_pixels_other_seed_other_slide(tmp_path):
    def level1(name, seed):
        path = write_synthetic_slide(tmp_path / name, width=1024, height=768, seed=seed, tumour_tiles=1).path
        return read_openslide(path, 1)

    a, b, c = level1("a.svs", 5), level1("b.svs", 5), level1("c.svs", 6)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5


def test_tumour_foci_are_tile_sized_dark_crowded_and_inside_tissue(small_slide):
    slide = small_slide
    truth = slide.truth_masks(1)
    assert len(slide.tumour_boxes) == 2
    dark = read_openslide(slide.path, 0).astype(float).mean(axis=2) < 130  # nuclei
    for box in slide.tumour_boxes:
        x0, y0, x1, y1 = box
        assert 200 <= x1 - x0 <= 360 and 200 <= y1 - y0 <= 360  # ~ one 256-px tile at 0.5 um/px
        assert any(t[0] <= x0 and t[1] <= y0 and x1 <= t[2] and y1 <= t[3] for t in slide.tissue_boxes)
        assert truth["tumour"][y0:y1, x0:x1].mean() > 0.7  # a rounded, ragged square
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        assert dark[cy - 64:cy + 64, cx - 64:cx + 64].mean() > 0.25  # crowded dark nuclei
    stroma = truth["tissue"] & ~truth["tumour"] & ~truth["fat"]
    assert dark[stroma].mean() < 0.12  # sparse nuclei in normal stroma
    assert not (truth["tumour"] & ~truth["tissue"]).any()


@pytest.mark.slow
def test_lymphoid_aggregates_pack_small_dark_nuclei_and_leave_the_rest_unchanged(tmp_path):
    """The mimic: round clusters of small, packed, darker-than-tumour nuclei inside tissue, apart from tumour;
    drawn from their own random stream, so a slide without them is the same slide."""
    common = {"width": 3000, "height": 2200, "seed": 11, "tumour_tiles": 1}
    plain = write_synthetic_slide(tmp_path / "plain.svs", **common)
    slide = write_synthetic_slide(tmp_path / "mimic.svs", lymphoid_aggregates=2, **common)
    assert slide.tumour_boxes == plain.tumour_boxes and slide.tissue_boxes == plain.tissue_boxes
    assert len(slide.lymphoid_boxes) == 2
    truth = slide.truth_masks(1)
    assert not (truth["lymphoid"] & truth["tumour"]).any() and not (truth["lymphoid"] & ~truth["tissue"]).any()
    drawn = [s.render_level(1, 0, 0, s.width, s.height) for s in (plain, slide)]
    elsewhere = ~ndimage.binary_dilation(truth["lymphoid"], iterations=8)  # rim nuclei overhang
    assert np.array_equal(drawn[0][elsewhere], drawn[1][elsewhere])
    pixels = read_openslide(slide.path, 0).astype(float).mean(axis=2)
    dark = pixels < 110
    lymphoid, tumour = truth["lymphoid"], truth["tumour"]
    assert pixels[dark & lymphoid].mean() < pixels[dark & tumour].mean() - 10  # hyperchromatic nuclei
    nuclei_per_px = lambda where: ndimage.label(dark & where)[1] / where.sum()  # noqa: E731
    assert nuclei_per_px(lymphoid) > 1.5 * nuclei_per_px(tumour)  # small and packed
    assert dark[lymphoid].mean() > 0.25  # a dense cluster, not stroma (see the tumour test)


@pytest.mark.slow
def test_hard_cases_look_like_what_labs_see_and_none_leaves_the_slide_as_it_was(tmp_path):
    """Solid high-grade tumour as dark and blue as a real dense core, blood as red as red ink, pale blue-grey
    mucin, and stitched grey glass fields beside white padding; asking for no hard case changes nothing."""
    common = {"width": 4096, "height": 3072, "seed": 12, "tumour_tiles": 1, "pen_marks": True}
    plain = write_synthetic_slide(tmp_path / "plain.svs", **common)
    assert np.array_equal(
        plain.render_level(16, 0, 0, 256, 192),
        write_synthetic_slide(tmp_path / "none.svs", hard=HardCases(), **common).render_level(16, 0, 0, 256, 192))
    hard = write_synthetic_slide(tmp_path / "hard.svs", **common, hard=HardCases(
        solid_tumours=1, haemorrhage=1, mucin=1, pen_over_tissue=True, scanner_padding=True))
    assert len(hard.pen_boxes) == len(plain.pen_boxes) + 2 and len(hard.tumour_boxes) == 2
    rgb = read_openslide(hard.path, 2).astype(float)  # the 8 um/px level, as the tiler reads it
    truth = {k: v[:rgb.shape[0], :rgb.shape[1]] for k, v in hard.truth_masks(16).items()}
    inner = {k: ndimage.binary_erosion(truth[k] & ~truth["pen"], iterations=2) for k in ("tumour", "blood", "mucin")}
    solid = np.median(rgb[inner["tumour"]], axis=0)
    assert solid[0] <= 120 and solid[0] / solid[2] <= 0.75  # real dense core: (108, 82, 150), red/blue 0.72
    blood = np.median(rgb[inner["blood"]], axis=0)
    red_ink = np.array(PEN_INKS["red"]) * 242
    assert np.abs(blood - red_ink).max() <= 40  # colour alone cannot tell blood from red ink
    mucin = np.median(rgb[inner["mucin"]], axis=0)
    assert mucin.mean() > 190 and mucin[2] > mucin[0] > mucin[1]  # pale, blue-grey
    padding = ndimage.binary_erosion(truth["padding"], iterations=2)  # JPEG rings at its edge
    assert padding.sum() > 100 and rgb[padding].min() >= 250 and np.median(rgb[padding]) == 255
    glass = ~ndimage.binary_dilation(truth["tissue"] | truth["pen"] | truth["speck"] | truth["padding"],
                                     iterations=4)
    rows, cols = np.nonzero(glass)
    field = (rows * 16 // 800) * 100 + cols * 16 // 1000  # 400 x 500 um fields at 0.5 um/px
    levels = [rgb[glass][field == f].mean() for f in np.unique(field) if (field == f).sum() > 200]
    assert len(levels) >= 4 and np.ptp(levels) >= 1.5  # a brightness step from field to field


def test_stain_strength_darkens_the_stroma_and_is_checked(tmp_path):
    common = {"width": 1024, "height": 768, "seed": 5}
    pale = write_synthetic_slide(tmp_path / "pale.svs", stain=(0.7, 0.7), **common)
    strong = write_synthetic_slide(tmp_path / "strong.svs", stain=(1.3, 1.3), **common)
    tissue = pale.truth_masks(1)["tissue"]
    assert read_openslide(strong.path, 0)[tissue].mean() < read_openslide(pale.path, 0)[tissue].mean() - 15
    glass = ~strong.truth_masks(1)["tissue"]
    assert abs(read_openslide(strong.path, 0)[glass].mean() - read_openslide(pale.path, 0)[glass].mean()) < 1
    with pytest.raises(ConfigError, match="stain must be two strengths"):
        write_synthetic_slide(tmp_path / "bad.svs", stain=(0, 1), **common)


def test_pen_strokes_have_their_ink_colour_on_glass(artefact_slide):
    slide = artefact_slide
    truth = slide.truth_masks(4)
    level1 = read_openslide(slide.path, 1).astype(int)
    assert len(slide.pen_boxes) == len(PEN_INKS) == 4  # one stroke per ink, in PEN_INKS order
    for colour, box in zip(PEN_INKS, slide.pen_boxes):
        stroke = np.zeros_like(truth["pen"])
        x0, y0, x1, y1 = (v // 4 for v in box)
        stroke[y0:y1 + 1, x0:x1 + 1] = truth["pen"][y0:y1 + 1, x0:x1 + 1]
        core = ndimage.binary_erosion(stroke, iterations=2) & ~truth["tissue"]
        r, g, b = level1[core].mean(axis=0)
        expected = {"blue": b > r + 80 and b > g + 60, "green": g > r + 50 and g > b + 30,
                    "black": max(r, g, b) < 80, "red": r > g + 100 and r > b + 100}
        assert expected[colour], f"{colour} stroke reads as {r:.0f}, {g:.0f}, {b:.0f}"


def test_specks_and_smudges_lie_on_glass(artefact_slide):
    slide = artefact_slide
    truth = slide.truth_masks(8)
    assert len(slide.speck_boxes) >= 10
    assert sum(box_pixels(truth["tissue"], box, 8).sum() for box in slide.speck_boxes) == 0
    assert sum(box_pixels(truth["speck"], box, 8).sum() for box in slide.speck_boxes) == truth["speck"].sum()


def test_fat_is_pale_and_part_of_the_tissue(artefact_slide):
    slide = artefact_slide
    truth = slide.truth_masks(16)
    assert truth["fat"].sum() > 200 and not (truth["fat"] & ~truth["tissue"]).any()
    level2 = read_openslide(slide.path, 2).astype(float).mean(axis=2)
    stroma = truth["tissue"] & ~truth["fat"] & ~truth["tumour"]
    assert level2[truth["fat"]].mean() > level2[stroma].mean() + 30


@pytest.mark.parametrize(("kwargs", "cause"), [
    ({"kind": "hamamatsu"}, "unknown synthetic slide kind"),
    ({"downsamples": (2, 4)}, "downsamples must start at 1"),
    ({"downsamples": (1, 4, 4)}, "downsamples must start at 1"),
    ({"tile": 100}, "tile must be a positive multiple of 16"),
    ({"mpp": -0.5}, "mpp must be a positive number"),
    ({"tumour_boxes": [(0, 0, 5000, 10)]}, "tumour box"),
    ({"tumour_tiles": 50}, "no room for 50 tumour foci"),
    ({"kind": "dicom"}, "a DICOM slide is a folder; the path has a file suffix '.svs'"),
    ({"kind": "dicom", "mpp": None}, "a DICOM slide needs an mpp"),
])
def test_bad_arguments_fail_with_one_line_naming_the_file(tmp_path, kwargs, cause):
    path = tmp_path / "bad.svs"
    with pytest.raises(ConfigError) as err:
        write_synthetic_slide(path, **{"width": 1024, "height": 768, **kwargs})
    message = str(err.value)
    assert message.startswith(str(path)) and cause in message and "\n" not in message
    assert not path.exists()


@pytest.mark.slow
def test_demo_cohort_labels_match_its_slides(tmp_path):
    labels = make_demo_cohort(tmp_path / "demo", n_slides=3, seed=7, field_mm=(2.0, 1.6))
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "label", "patient_id"]
    slides = sorted(p.stem for p in (tmp_path / "demo" / "slides").glob("*.svs"))
    assert [r["slide_id"] for r in rows] == slides == ["demo_001", "demo_002", "demo_003"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumour"]
    assert rows[0]["patient_id"] == rows[1]["patient_id"] != rows[2]["patient_id"]
    for row, mpp in zip(rows, (0.5, 0.25, 0.5)):  # mixed scanners: the second slide is 40x
        with openslide.OpenSlide(str(tmp_path / "demo" / "slides" / f"{row['slide_id']}.svs")) as s:
            assert float(s.properties["openslide.mpp-x"]) == mpp and s.level_count == 3
            assert s.dimensions == (round(2000 / mpp), round(1600 / mpp))


def test_demo_cohort_needs_both_labels(tmp_path):
    with pytest.raises(ConfigError, match="at least 2 slides"):
        make_demo_cohort(tmp_path, n_slides=1)


def test_writers_docstring_example_runs():
    import wsi_synth.writers

    assert doctest.testmod(wsi_synth.writers).failed == 0


@pytest.mark.slow
def test_command_line_writes_the_cohort(tmp_path, capsys):
    from wsi_synth.__main__ import main

    assert main([str(tmp_path / "demo"), "--n-slides", "2", "--field-mm", "2.0", "1.6"]) == 0
    assert sorted(p.name for p in (tmp_path / "demo" / "slides").iterdir()) == ["demo_001.svs", "demo_002.svs"]
    assert "labels.csv" in capsys.readouterr().out
    assert main([str(tmp_path / "one"), "--n-slides", "1"]) == 2
