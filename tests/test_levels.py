"""Pyramid levels are checked against level 0 before the tiler uses them (wsi.slide.levels), and DICOM is read through
wsidicom where OpenSlide fails: real wsidicomizer conversions of the real SVS, and synthetic slides whose
coarse levels a test corrupts. In every case the tiles are the SVS's (the clean slide's), or the error is
clear; the mask is never silently wrong."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from wsi.config import load_config
from wsi.errors import SlideError
from wsi.slide import LevelCheck, compare_with_level0, open_slide
from wsi.store import LevelCheckAttrs, SlideStore, describe, store_path
from wsi.tiling import TileConfig, read_thumbnail, tile_slides

REAL_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"


def tile(path, out, *sets):
    [result] = tile_slides(out, TileConfig.from_config(load_config(sets=list(sets))), [path], progress=False).items()
    return result


def tiles_by_coord(store: SlideStore) -> dict[tuple[int, int], np.ndarray]:
    tiles = store.read_tiles(0, store.n_tiles)
    return {tuple(c): t for c, t in zip(store.coords.tolist(), tiles)}


def assert_same_tiles(store: SlideStore, reference: SlideStore, *, max_edge_tiles=2, max_mean_abs=None):
    """The same tile set up to ``max_edge_tiles`` tiles, all at the tissue edge (under half tissue in the
    store that keeps them), and the common tiles pixel-identical (or, with ``max_mean_abs``, equal within
    that mean absolute difference)."""
    ours, theirs = tiles_by_coord(store), tiles_by_coord(reference)
    for a, b in ((store, ours.keys() - theirs.keys()), (reference, theirs.keys() - ours.keys())):
        fraction = dict(zip(map(tuple, a.coords.tolist()), a.tissue_fraction))
        assert len(b) <= max_edge_tiles and all(fraction[c] < 0.5 for c in b), sorted(b)
    common = sorted(ours.keys() & theirs.keys())
    for c in common:
        if max_mean_abs is None:
            np.testing.assert_array_equal(ours[c], theirs[c], err_msg=str(c))
        else:
            assert np.abs(ours[c].astype(int) - theirs[c]).mean() <= max_mean_abs, c


# ------------------------------------------------------------------------------ wsidicomizer, real slide
@pytest.fixture(scope="session")
def svs_store(tmp_path_factory) -> SlideStore:
    out = tmp_path_factory.mktemp("svs_out")
    assert tile(REAL_SLIDE, out)["cause"] is None
    return SlideStore.open(store_path(out, "cmu_small_region"))


@pytest.fixture(scope="session")
def wsidicomizer_folders(tmp_path_factory) -> dict[bool, Path]:
    """The real SVS converted by wsidicomizer, with and without ``add_missing_levels`` (once per session)."""
    from wsidicomizer import WsiDicomizer

    root = tmp_path_factory.mktemp("wsidicomizer")
    folders = {}
    for add in (False, True):
        folders[add] = root / ("cmu_added_levels" if add else "cmu_plain")
        WsiDicomizer.convert(REAL_SLIDE, folders[add], add_missing_levels=add, workers=1)
    return folders


def test_openslide_fails_or_misreads_the_levels_wsidicomizer_adds_and_auto_reads_them_with_wsidicom(
        wsidicomizer_folders):
    folder = wsidicomizer_folders[True]
    with open_slide(REAL_SLIDE) as svs:
        truth = svs.read_region(0, 0, 0, svs.width, svs.height).reshape(-1, 3).mean(axis=0)
    with open_slide(folder, backend="openslide") as o:
        assert o.level_count == 5
        with pytest.raises(SlideError, match="Dimensional mismatch reading JPEG"):
            o.read_region(0, 0, 2, *o.level_dimensions[2])
    for backend in ("auto", "wsidicom"):
        with open_slide(folder, backend=backend) as s:
            assert s.pixel_backend == "wsidicom"
            assert s.level_dimensions == ((2220, 2967), (1110, 1484), (555, 742), (278, 371), (139, 186))
            assert (s.mpp_x, s.vendor) == (0.499, "dicom")
            coarse = s.read_region(0, 0, 2, *s.level_dimensions[2]).reshape(-1, 3).mean(axis=0)
            assert np.abs(coarse - truth).max() < 2  # (214, 195, 208), as the SVS
            assert all(compare_with_level0(s, level).agrees for level in range(1, 5))


@pytest.mark.parametrize("add_missing_levels", [False, True])
def test_a_wsidicomizer_conversion_tiles_like_the_svs(wsidicomizer_folders, svs_store, tmp_path,
                                                      add_missing_levels):
    folder = wsidicomizer_folders[add_missing_levels]
    assert tile(folder, tmp_path)["cause"] is None
    store = SlideStore.open(store_path(tmp_path, folder.name))
    levels = store.levels
    if add_missing_levels:  # the mask comes from the converter's own 16x level, which agrees with level 0
        assert (levels.pixel_backend, levels.mask_level, levels.mask_level_wanted) == ("wsidicom", 4, 4)
        assert [v["level"] for v in levels.checked] == [4] and levels.checked[0]["agrees"]
    else:  # level 0 only (frames tagged RGB, so not the direct path): OpenSlide reads it right
        assert (levels.pixel_backend, levels.mask_level, levels.checked) == ("openslide", 0, ())
    assert levels.tile_level == 0 and levels.summary == ""
    # The same tiles as the SVS; level 0 holds the SVS's own JPEG tiles, so pixel-identical. The converter's
    # 16x level (four 2x reductions, each re-encoded: 9 grey levels from level 0's area average per pixel)
    # can move a tile near the 0.25 tissue threshold at the edge (46 against 46, one in and one out, since the
    # outline sits where the edge is half tissue; three to four before).
    assert_same_tiles(store, svs_store, max_edge_tiles=2 if add_missing_levels else 0)
    _, thumb, _ = store.mask()
    _, svs_thumb, _ = svs_store.mask()
    assert np.abs(thumb.reshape(-1, 3).mean(0) - svs_thumb.reshape(-1, 3).mean(0)).max() < 2


def test_openslide_named_on_the_converted_folder_is_a_clear_error_or_right_never_a_wrong_mask(
        wsidicomizer_folders, svs_store, tmp_path):
    """OpenSlide misreads level 4 (YCbCr shown as RGB) and fails on others, after which its handle reads
    nothing: the check rejects level 4 and the slide fails with one line naming the folder and a level."""
    folder = wsidicomizer_folders[True]
    result = tile(folder, tmp_path, "slide.backend=openslide")
    if result["cause"] is None:
        assert_same_tiles(SlideStore.open(store_path(tmp_path, folder.name)), svs_store)
    else:
        assert result["cause"].startswith(f"{folder}: no level decodes sensibly: cannot read level 0")
        assert "\n" not in result["cause"]


# ------------------------------------------------------------------------------ corrupted synthetic slides
def corrupt_svs_colours(path: Path, page: int) -> None:
    """Tag a YCbCr JPEG page as RGB: readers that trust the tag decode wrong colours (as OpenSlide does with
    wsidicomizer's added levels)."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        assert tif.pages[page].photometric == 6
        tif.pages[page].tags["PhotometricInterpretation"].overwrite(2)


def scramble_svs_tiles(path: Path, page: int) -> None:
    """Shuffle a page's tiles: right colours, wrong structure."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[page].tags
        offsets, counts = np.asarray(tags["TileOffsets"].value), np.asarray(tags["TileByteCounts"].value)
        order = np.roll(np.arange(len(offsets)), len(offsets) // 2)
        tags["TileOffsets"].overwrite(offsets[order].tolist())
        tags["TileByteCounts"].overwrite(counts[order].tolist())


def rewrite_dicom_frames(path: Path, frame) -> None:
    """Replace every frame of a DICOM level with ``frame(shape) -> bytes``."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    shape = (int(ds.Rows), int(ds.Columns), 3)
    ds.PixelData = encapsulate([frame(shape, i) for i in range(int(ds.NumberOfFrames))], has_bot=True)
    ds.save_as(path, enforce_file_format=True)


def noise_frame(shape, i) -> bytes:
    import imagecodecs

    noise = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
    return imagecodecs.jpeg_encode(noise, level=85)


# a 0.5 um/px slide with levels 4x and 16x: 8 um/px (the mask) is level 2, 0.5 um/px tiles are level 0
LEVELS_SLIDE = dict(width=4096, height=3072, mpp=0.5, downsamples=(1, 4, 16), seed=5, tumour_tiles=1)


@pytest.fixture(scope="module")
def clean(make_slide, tmp_path_factory):
    """The clean SVS and DICOM folder, and their stores."""
    out = tmp_path_factory.mktemp("clean_out")
    slides = {kind: make_slide(f"levels_{kind}" + (".svs" if kind == "aperio" else ""), kind=kind,
                               **LEVELS_SLIDE).path for kind in ("aperio", "dicom")}
    stores = {}
    for kind, path in slides.items():
        assert tile(path, out / kind)["cause"] is None
        stores[kind] = SlideStore.open(store_path(out / kind, path.name.removesuffix(".svs")))
        assert (stores[kind].levels.mask_level, stores[kind].levels.summary) == (2, "")
    return slides, stores


@pytest.mark.parametrize(("case", "kind", "rejected", "mask_level", "cause"), [
    ("wrong colours", "aperio", [2], 1, "mean colour differs"),
    ("level of noise", "dicom", [2], 1, "structure does not match"),
    ("every coarse level bad", "aperio", [1, 2], 0, "structure does not match"),
])
def test_a_corrupted_coarse_level_is_not_used_for_the_mask(clean, tmp_path, case, kind, rejected, mask_level,
                                                          cause):
    slides, stores = clean
    src = slides[kind]
    path = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, path)
    if case == "wrong colours":
        corrupt_svs_colours(path, page=3)  # pages: level 0, thumbnail, level 1, level 2
    elif case == "level of noise":
        rewrite_dicom_frames(path / "level-2.dcm", noise_frame)
    else:
        corrupt_svs_colours(path, page=3)
        scramble_svs_tiles(path, page=2)
    result = tile(path, tmp_path / "out")
    assert result["cause"] is None
    store = SlideStore.open(store_path(tmp_path / "out", path.name.removesuffix(".svs")))
    levels = store.levels
    assert levels.rejected == rejected and (levels.mask_level, levels.mask_level_wanted) == (mask_level, 2)
    assert cause in levels.summary and f"mask from level {mask_level} instead of 2" in levels.summary
    assert f"levels     mask from level {mask_level}" in describe(store) and levels.summary in describe(store)
    # the tiles are the clean slide's: level 0 is untouched, so pixel-identical
    assert_same_tiles(store, stores[kind])
    # and the QC image says so: an orange frame
    qc = np.asarray(Image.open(tmp_path / "out" / "qc" / f"{store.slide_id}.png"))
    assert (qc[0, qc.shape[1] // 2] == (255, 140, 0)).all()


def test_a_rejected_tile_level_gives_way_to_level_0_with_the_same_tiles(make_slide, tmp_path):
    """0.25 um/px with a 2x level: 0.5 um/px tiles are read at level 1; scrambled, they come from level 0,
    area-averaged, equal to the clean slide's within JPEG re-encoding noise."""
    src = make_slide("levels_2x.svs", width=4096, height=3072, mpp=0.25, downsamples=(1, 2, 16), seed=6,
                     tumour_tiles=1).path
    assert tile(src, tmp_path / "clean")["cause"] is None
    clean_store = SlideStore.open(store_path(tmp_path / "clean", "levels_2x"))
    assert clean_store.tiling.read_level == 1
    path = tmp_path / "levels_2x.svs"
    shutil.copy(src, path)
    scramble_svs_tiles(path, page=2)
    assert tile(path, tmp_path / "out")["cause"] is None
    store = SlideStore.open(store_path(tmp_path / "out", "levels_2x"))
    assert (store.levels.tile_level, store.levels.tile_level_wanted, store.tiling.read_level) == (0, 1, 0)
    assert "tiles from level 0 instead of 1" in store.levels.summary
    assert_same_tiles(store, clean_store, max_mean_abs=6.0)


def test_level_0_that_cannot_be_decoded_is_one_line_naming_the_file_and_level(clean, tmp_path):
    slides, _ = clean
    path = tmp_path / "broken"
    shutil.copytree(slides["dicom"], path)
    for name in ("level-0.dcm", "level-1.dcm", "level-2.dcm"):
        rewrite_dicom_frames(path / name, lambda shape, i: b"\xff\xd8 not a JPEG frame \xff\xd9")
    result = tile(path, tmp_path / "out")
    assert result["cause"].startswith(f"{path}: no level decodes sensibly: cannot read level 0 at")
    assert "\n" not in result["cause"]
    assert not store_path(tmp_path / "out", "broken").exists()


def test_the_thumbnail_is_read_from_the_next_finer_level_when_a_level_fails_while_read(clean, tmp_path):
    """A damaged tile away from the checked spots: the level passes the check, fails when read whole, and
    the thumbnail comes from the next finer level (here level 0, in strips)."""
    slides, _ = clean
    path = tmp_path / "l.svs"
    shutil.copy(slides["aperio"], path)
    with tifffile.TiffFile(path, mode="r+b") as tif:  # level 2 is one tile: break it, and level 1 too
        for page in (2, 3):
            counts = np.asarray(tif.pages[page].tags["TileByteCounts"].value)
            counts[-1] = 16  # the last tile's JPEG cut short
            tif.pages[page].tags["TileByteCounts"].overwrite(counts.tolist())
    with open_slide(path) as slide:
        check = LevelCheck(slide)
        thumb, downsample = read_thumbnail(slide, 8.0, check)
        assert downsample == pytest.approx(16) and thumb.shape == (192, 256, 3)
        assert check.chosen["mask"][1] < 2 and 2 in [v.level for v in check.rejected]


def test_level_check_attrs_round_trip():
    attrs = LevelCheckAttrs(pixel_backend="wsidicom", mask_level=1, mask_level_wanted=2, tile_level=0,
                            tile_level_wanted=0,
                            checked=({"level": 2, "agrees": False, "cause": "mean colour differs",
                                      "colour_difference": 60.0, "correlation": 0.9, "contrast_ratio": 0.3},
                                     {"level": 1, "agrees": True, "cause": "", "colour_difference": 0.4,
                                      "correlation": 0.99, "contrast_ratio": 1.0}),
                            summary="level 2 rejected (mean colour differs); mask from level 1 instead of 2")
    assert LevelCheckAttrs.from_dict(attrs.to_dict()) == attrs
    assert attrs.rejected == [2]
    with pytest.raises(ValueError, match="unknown keys"):
        LevelCheckAttrs.from_dict({**attrs.to_dict(), "surprise": 1})
    with pytest.raises(ValueError, match="level, agrees, cause"):
        LevelCheckAttrs.from_dict({**attrs.to_dict(), "checked": [{"level": 2}]})
