"""Opening slides with both backends, MPP resolution and read-level choice."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi.errors import ConfigError, SlideError
from wsi.slide import choose_level, expand_slide_paths, load_mpp_overrides, open_slide, slide_id_from_path, source_stat
from wsi_synth import write_synthetic_slide

REAL_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_real_aperio_slide_opens_with_its_mpp(backend):
    with open_slide(REAL_SLIDE, backend=backend) as slide:
        assert slide.backend == backend
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp_x == pytest.approx(0.499)
        assert slide.mpp_source == "file"
        assert slide.vendor == "aperio"
        assert slide.objective_power == 20.0
        region = slide.read_region(500, 800, 0, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8


def test_backends_read_identical_pixels_from_the_real_slide():
    with open_slide(REAL_SLIDE, backend="openslide") as a, open_slide(REAL_SLIDE, backend="tiffslide") as b:
        np.testing.assert_array_equal(a.read_region(300, 400, 0, 512, 256), b.read_region(300, 400, 0, 512, 256))


def test_auto_backend_falls_back_to_tiffslide_for_a_tiff_openslide_refuses(tmp_path):
    # A single-page, untiled TIFF: OpenSlide's generic-tiff reader wants tiled images, tiffslide reads it.
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((64, 96, 3), 200, np.uint8))
    with open_slide(path, default_mpp=0.5) as slide:
        assert slide.backend == "tiffslide"
        assert slide.read_region(0, 0, 0, 8, 8).mean() == 200


def test_not_a_slide_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide")
    with pytest.raises(SlideError) as e:
        open_slide(path)
    message = str(e.value)
    assert str(path) in message and "not a readable slide" in message and "\n" not in message


def test_missing_mpp_is_an_error_naming_the_override_unless_overridden_or_defaulted(tmp_path):
    path = write_synthetic_slide(tmp_path / "nompp.tif", width=1024, height=768, mpp=None, kind="generic").path
    with pytest.raises(SlideError, match="mpp_overrides"):
        open_slide(path)
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nnompp,0.5\n")
    with open_slide(path, mpp_overrides=str(table)) as slide:
        assert (slide.mpp_x, slide.mpp_source) == (0.5, "override")
    with open_slide(path, default_mpp=0.25) as slide:
        assert (slide.mpp_x, slide.mpp_source) == (0.25, "default")


def test_implausible_mpp_is_an_error_not_a_guess(tmp_path):
    path = tmp_path / "dpi72.tif"
    # A 72-dpi resolution, as image editors write it, reads as ~353 um/px.
    tifffile.imwrite(path, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256), resolution=(72, 72),
                     resolutionunit="INCH")
    with pytest.raises(SlideError, match="implausible MPP") as e:
        open_slide(path, backend="tiffslide", default_mpp=0.5)
    assert "mpp_overrides" in str(e.value)


def test_override_table_errors_name_the_table(tmp_path):
    table = tmp_path / "mpp.csv"
    table.write_text("slide,microns\na,0.5\n")
    with pytest.raises(ConfigError, match="slide_id,mpp"):
        load_mpp_overrides(table)
    table.write_text("slide_id,mpp\na,half\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_mpp_overrides(table)


def test_level_choice_on_non_integer_downsamples(tmp_path):
    path = write_synthetic_slide(tmp_path / "s.svs", width=2700, height=1800, mpp=0.25,
                                 downsamples=(1, 3, 9)).path
    with open_slide(path) as slide:
        assert [round(d, 1) for d in slide.level_downsamples] == [1.0, 3.0, 9.0]
        # coarsest level not coarser than the target; resample the rest with area averaging
        plan = choose_level(slide, 0.5)
        assert (plan.level, plan.scale) == (0, 2.0)
        plan = choose_level(slide, 1.0)
        assert plan.level == 1 and plan.scale == pytest.approx(1.0 / 0.75, rel=1e-3)
        # within 5% of a level: read it as is and record the effective MPP
        plan = choose_level(slide, 0.77)
        assert (plan.level, plan.scale) == (1, 1.0) and plan.effective_mpp == pytest.approx(0.75, rel=1e-3)
        with pytest.raises(SlideError, match="finer than the slide"):
            choose_level(slide, 0.1)


def test_slide_ids_and_folder_expansion(tmp_path):
    assert slide_id_from_path("a/b/case-01.svs") == "case-01"
    assert slide_id_from_path("x.ome.tiff") == "x"
    for name in ("b.svs", "a.ndpi", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_text("")
    assert [p.name for p in expand_slide_paths([tmp_path])] == ["a.ndpi", "b.svs"]


def test_folder_scan_takes_each_dicom_subfolder_as_one_slide(tmp_path):
    for name in ("b.svs", "case7/x.dcm", "case7/y.dcm", "plain/a.svs", ".hidden/z.dcm", "c.tif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    case7 = tmp_path / "case7"
    assert expand_slide_paths([tmp_path]) == [tmp_path / "b.svs", tmp_path / "c.tif", case7]
    # a DICOM folder, or any of its files, is that one slide, once
    assert expand_slide_paths([case7, case7 / "y.dcm", tmp_path / "b.svs"]) == [case7, tmp_path / "b.svs"]
    assert slide_id_from_path(case7) == slide_id_from_path(case7 / "x.dcm") == "case7"


def test_a_dicom_folder_is_sized_by_its_files_and_dated_by_the_newest(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"x" * 100)
    (tmp_path / "b.dcm").write_bytes(b"x" * 23)
    (tmp_path / ".DS_Store").write_bytes(b"x" * 7)  # hidden files are not part of the slide
    os.utime(tmp_path / "a.dcm", (1_000_000, 1_000_000))
    os.utime(tmp_path / "b.dcm", (2_000_000, 2_000_000))
    assert source_stat(tmp_path) == (123, 2_000_000)
    assert source_stat(tmp_path / "a.dcm") == (100, 1_000_000)


def test_dicom_folder_opens_through_one_of_its_files(make_slide, tmp_path):
    slide = make_slide("dicom_small", width=1024, height=768, downsamples=(1, 4), kind="dicom", mpp=0.5, seed=4,
                       tumour_tiles=1)
    for path in (slide.path, slide.path / "level-1.dcm"):
        with open_slide(path) as s:  # backend auto
            assert (s.path, s.slide_id, s.backend, s.vendor) == (slide.path, "dicom_small", "openslide", "dicom")
            assert s.pixel_backend == "jpeg-tiles"  # JPEG baseline frames, TILED_FULL: decoded directly
            assert (s.mpp_x, s.mpp_y, s.mpp_source, s.objective_power) == (0.5, 0.5, "file", 20.0)
            assert s.level_dimensions == ((1024, 768), (256, 192)) and s.level_downsamples == (1.0, 4.0)
            region = s.read_region(300, 200, 0, 400, 300).astype(int)
            assert np.abs(region - slide.render_level(1, 300, 200, 400, 300)).mean() < 4.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="holds no .dcm files") as e:
        open_slide(empty)
    assert str(e.value).startswith(str(empty)) and "\n" not in str(e.value)


@pytest.mark.parametrize(("victim", "keep", "cause"), [
    ("level-0.dcm", 1 / 3, "pixel data is cut short"),  # the file OpenSlide is handed
    ("level-1.dcm", 0.1, "header is cut short"),  # a file OpenSlide would silently skip
])
def test_damaged_dicom_file_is_a_slide_error_naming_the_folder_and_file(make_slide, tmp_path, victim, keep, cause):
    slide = make_slide("dicom_small", width=1024, height=768, downsamples=(1, 4), kind="dicom", mpp=0.5, seed=4,
                       tumour_tiles=1)
    folder = tmp_path / "broken"
    shutil.copytree(slide.path, folder)
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SlideError) as e:
        open_slide(folder)
    message = str(e.value)
    assert message.startswith(f"{folder}: {victim} is not a whole DICOM file") and cause in message
    assert "\n" not in message


def test_sparse_tiling_without_frame_positions_is_refused_before_openslide_sees_it(make_slide, tmp_path):
    """OpenSlide 4.0.1 would crash the process (and with it every slide of a `wsi tile` run) on this file."""
    import pydicom

    slide = make_slide("dicom_small", width=1024, height=768, downsamples=(1, 4), kind="dicom", mpp=0.5, seed=4,
                       tumour_tiles=1)
    folder = tmp_path / "sparse"
    shutil.copytree(slide.path, folder)
    ds = pydicom.dcmread(folder / "level-1.dcm")
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.save_as(folder / "level-1.dcm")
    with pytest.raises(SlideError, match="level-1.dcm .*TILED_SPARSE without per-frame positions") as e:
        open_slide(folder)
    assert str(e.value).startswith(str(folder)) and "\n" not in str(e.value)


def test_wsidicom_backend_on_a_slide_file_is_a_one_line_error_naming_it():
    with pytest.raises(SlideError) as e:
        open_slide(REAL_SLIDE, backend="wsidicom")
    assert str(e.value).startswith(f"{REAL_SLIDE}: slide.backend wsidicom reads DICOM folders only")
    assert "\n" not in str(e.value)


def test_damaged_tiff_header_is_a_slide_error_from_both_backends(tmp_path):
    path = tmp_path / "damaged.svs"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 16)  # a TIFF signature, then garbage
    with pytest.raises(SlideError, match="not a readable slide") as e:
        open_slide(path)
    assert "openslide" in str(e.value) and "tiffslide" in str(e.value)


@pytest.mark.parametrize(("fragments_per_frame", "has_bot", "pixel_backend"), [
    (1, False, "jpeg-tiles"),  # no Basic Offset Table (as for levels past 4 GiB): the fragments are walked
    (2, True, "openslide"),  # a frame in two fragments: OpenSlide reassembles them, the direct path does not
])
def test_dicom_frames_without_an_offset_table_or_in_several_fragments(make_slide, tmp_path, fragments_per_frame,
                                                                     has_bot, pixel_backend):
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    slide = make_slide("dicom_small", width=1024, height=768, downsamples=(1, 4), kind="dicom", mpp=0.5, seed=4,
                       tumour_tiles=1)
    folder = tmp_path / "re-encapsulated"
    shutil.copytree(slide.path, folder)
    ds = pydicom.dcmread(folder / "level-0.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=has_bot)
    ds.save_as(folder / "level-0.dcm", enforce_file_format=True)
    with open_slide(folder) as s, open_slide(slide.path, backend="openslide") as o:
        assert s.pixel_backend == pixel_backend
        np.testing.assert_array_equal(s.read_region(100, 50, 0, 900, 700), o.read_region(100, 50, 0, 900, 700))


# Every downsample exact (3008 x 2208 / 4 / 16): at a fractional one, OpenSlide paints level-0 locations that
# fall between level pixels with a sub-pixel shift (cairo), off by 1-2 levels from any reader of whole pixels.
# Every level is padded: its edge tiles/frames reach past the image.
@pytest.mark.parametrize("kind", ["aperio", "dicom"])
def test_direct_jpeg_tile_reader_matches_openslide_at_every_level(tmp_path, kind):
    path = write_synthetic_slide(tmp_path / ("p.svs" if kind == "aperio" else "p_dcm"), width=3008, height=2208,
                                 mpp=0.25, downsamples=(1, 4, 16), seed=4, kind=kind).path
    with open_slide(path) as fast, open_slide(path, backend="openslide") as o:
        assert fast.pixel_backend == "jpeg-tiles" and o.pixel_backend == "openslide"
        assert fast.level_dimensions == ((3008, 2208), (752, 552), (188, 138))
        regions = [(0, (100, 37, 700, 300)),  # across tile edges
                   (0, (2600, 1900, 408, 308)),  # the padded right/bottom edge tiles, up to the image's edge
                   (0, (2900, 2100, 200, 200)),  # past the image edge: white, like OpenSlide's transparent pixels
                   (1, (400, 800, 300, 200)), (1, (2000, 1500, 252, 177)),  # lower level, its padded corner
                   (2, (0, 0, 188, 138)), (2, (1008, 336, 200, 150))]  # the smallest level, and past its edges
        for level, (x, y, w, h) in regions:
            region = fast.read_region(x, y, level, w, h)
            np.testing.assert_array_equal(region, o.read_region(x, y, level, w, h), err_msg=f"{level} {x} {y}")
        if kind == "dicom":  # wsidicom decodes the same frames (white past the edges, as the others)
            with open_slide(path, backend="wsidicom") as w:
                assert (w.backend, w.pixel_backend, w.vendor, w.mpp_x) == ("wsidicom", "wsidicom", "dicom", 0.25)
                assert (w.level_dimensions, w.level_downsamples) == (fast.level_dimensions, fast.level_downsamples)
                for level, (x, y, w_, h) in regions:
                    np.testing.assert_array_equal(w.read_region(x, y, level, w_, h),
                                                  fast.read_region(x, y, level, w_, h))
        if kind == "aperio":  # tiffslide reads TIFF only, and leaves what lies past the image black
            with open_slide(path, backend="tiffslide") as t:
                for level, (x, y, w, h) in regions:
                    lw, lh = fast.level_dimensions[level]
                    ds = fast.level_downsamples[level]
                    if x / ds + w <= lw and y / ds + h <= lh:
                        np.testing.assert_array_equal(fast.read_region(x, y, level, w, h),
                                                      t.read_region(x, y, level, w, h))
