"""Tiling slides into per-slide stores: geometry, pixels, codecs, bad input, interrupted runs, Snakemake."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi.cli import main as wsi_main
from wsi.config import load_config
from wsi.slide import TileSource, open_slide
from wsi.store import SlideStore, is_complete, store_path
from wsi.tiling import TileConfig, tile_slides
from wsi.tissue import QC_OUTLINE_RGB, QC_REJECTED_RGB
from wsi_synth import write_synthetic_slide

REAL_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"
REPO = Path(__file__).resolve().parents[1]


def write_glass_slide(path, ink: bool = False):
    """An Aperio-style slide of bare glass: tiles, levels and MPP are fine, there is no tissue; with ``ink``, thick
    blue and black marker strokes cover a third of it."""
    import tifffile

    description = ("Aperio Image Library v12.0.0\n2048x2048 [0,0 2048x2048] (256x256) JPEG/RGB Q=85|AppMag = 20|"
                   "MPP = 0.5")
    glass = np.random.default_rng(0).normal(238, 3, (2048, 2048, 3)).clip(0, 255)
    if ink:
        yy, xx = np.mgrid[:2048, :2048]
        glass[np.abs(yy - xx) < 250] *= (0.2, 0.34, 0.76)
        glass[np.abs(yy + xx - 2048) < 120] *= 0.16
    glass = glass.astype(np.uint8)
    tifffile.imwrite(path, glass, tile=(256, 256), compression="jpeg", photometric="rgb", description=description,
                     metadata=None)


def tile(paths, out, *sets):
    return tile_slides(out, TileConfig.from_config(load_config(sets=list(sets))), paths, progress=False).items()


@pytest.fixture(scope="module")
def slide_025(tmp_path_factory):
    """A 0.25 um/px slide with levels 1, 4, 16 and a tumour box: 0.5 um/px tiles need 2x area averaging."""
    folder = tmp_path_factory.mktemp("s025")
    return write_synthetic_slide(folder / "s025.svs", width=4096, height=3072, mpp=0.25, seed=3,
                                 tumour_boxes=[(1024, 1024, 2048, 2048)])


def test_tiles_are_cut_at_the_target_mpp_with_level0_coords(slide_025, tmp_path):
    [result] = tile([slide_025.path], tmp_path)
    assert result["cause"] is None and result["n_tiles"] > 0
    store = SlideStore.open(store_path(tmp_path, "s025"))
    t = store.tiling
    assert (t.read_level, t.tile_px, t.tile_px_level0, t.stride_px_level0) == (0, 256, 512.0, 512.0)
    assert t.effective_mpp == pytest.approx(0.5)
    coords = store.coords
    assert (coords % 512 == 0).all() and (coords[:, 0] + 512 <= 4096).all() and (coords[:, 1] + 512 <= 3072).all()
    assert (store.tissue_fraction >= t.min_tissue_fraction).all()
    assert store.slide.mpp_x == 0.25 and store.slide.mpp_source == "file"
    # each stored tile is the 2x2 area average of its level-0 footprint
    with open_slide(slide_025.path) as slide:
        x, y = coords[len(coords) // 2]
        level0 = slide.read_region(int(x), int(y), 0, 512, 512).astype(np.float64)
    expected = level0.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    got = store.read_tiles(len(coords) // 2, len(coords) // 2 + 1)[0].astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0


def test_tiles_cover_the_tissue_and_skip_glass(slide_025, tmp_path):
    tile([slide_025.path], tmp_path)
    store = SlideStore.open(store_path(tmp_path, "s025"))
    centres = store.coords + 256
    x0, y0, x1, y1 = slide_025.tumour_boxes[0]
    inside_tumour = ((centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1))
    assert inside_tumour.sum() >= 3  # the tumour region is tiled
    tiles = store.read_tiles(0, store.n_tiles)
    assert (tiles.reshape(len(tiles), -1).mean(axis=1) < 235).all()  # no tile is bare glass


def test_tiling_leaves_the_callers_opencv_thread_count_as_it_was(slide_025, tmp_path):
    """The stage runs OpenCV single-threaded while tiles stream (its own threads fill the cores then); a notebook's
    or another stage's OpenCV keeps the thread count it had."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        tile([slide_025.path], tmp_path)
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


@pytest.mark.parametrize("path_kind", ["real", "synthetic"])
def test_both_backends_give_the_same_tiles(path_kind, slide_025, tmp_path):
    path = REAL_SLIDE if path_kind == "real" else slide_025.path
    tile([path], tmp_path / "o", "slide.backend=openslide")
    tile([path], tmp_path / "t", "slide.backend=tiffslide")
    a, b = (SlideStore.open(store_path(tmp_path / d, Path(path).stem)) for d in ("o", "t"))
    assert a.slide.backend == "openslide" and b.slide.backend == "tiffslide"
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.read_tiles(0, a.n_tiles), b.read_tiles(0, b.n_tiles))


def test_non_integer_level_is_read_and_resampled(tmp_path):
    slide = write_synthetic_slide(tmp_path / "odd.svs", width=3600, height=2700, mpp=0.25, downsamples=(1, 3, 9))
    [result] = tile([slide.path], tmp_path, "tiling.target_mpp=1.0", "tiling.tile_px=128")
    assert result["cause"] is None
    store = SlideStore.open(store_path(tmp_path, "odd"))
    t = store.tiling
    assert t.read_level == 1 and t.read_downsample == pytest.approx(3.0, rel=1e-3)
    assert t.effective_mpp == pytest.approx(1.0, rel=0.01)
    assert t.tile_px_level0 == pytest.approx(128 * 4, rel=0.01)
    assert store.read_tiles(0, 2).shape == (2, 128, 128, 3)


def test_coordinates_only_store_and_read_tiles_give_the_stored_pixels(slide_025, tmp_path):
    tile([slide_025.path], tmp_path / "px")
    tile([slide_025.path], tmp_path / "co", "tiling.store_pixels=false")
    with_pixels = SlideStore.open(store_path(tmp_path / "px", "s025"))
    coords_only = SlideStore.open(store_path(tmp_path / "co", "s025"))
    assert not coords_only.has_pixels
    np.testing.assert_array_equal(with_pixels.coords, coords_only.coords)
    pick = np.array([0, 3, 4, 5, len(with_pixels.coords) - 1])
    with open_slide(slide_025.path) as slide:
        reread = TileSource(slide, coords_only.tiling).read_tiles(coords_only.coords[pick])
    np.testing.assert_array_equal(reread, with_pixels.read_tiles(0, with_pixels.n_tiles)[pick])


@pytest.mark.parametrize("codec", ["jpeg", "jpegxl"])
def test_lossy_codecs_are_close_to_lossless_and_smaller(codec, slide_025, tmp_path):
    tile([slide_025.path], tmp_path / "lossless")
    tile([slide_025.path], tmp_path / codec, f"tiling.codec={codec}", "tiling.quality=90")
    a, b = (SlideStore.open(store_path(tmp_path / d, "s025")) for d in ("lossless", codec))
    diff = np.abs(a.read_tiles(0, a.n_tiles).astype(int) - b.read_tiles(0, b.n_tiles).astype(int))
    assert diff.mean() < 3.0

    def size(store):
        return sum(f.stat().st_size for f in (store.path / "tiles").rglob("*") if f.is_file())

    assert size(b) < 0.6 * size(a)


def test_pen_marks_and_specks_are_not_tiled(tmp_path):
    slide = write_synthetic_slide(tmp_path / "pen.svs", width=4096, height=3072, mpp=0.5, seed=5,
                                  pen_marks=True, specks=True)
    tile([slide.path], tmp_path)
    store = SlideStore.open(store_path(tmp_path, "pen"))
    fp = store.tiling.tile_px_level0

    def overlaps(box):
        x0, y0, x1, y1 = box
        c = store.coords
        return (c[:, 0] < x1) & (c[:, 0] + fp > x0) & (c[:, 1] < y1) & (c[:, 1] + fp > y0)

    on_tissue = np.zeros(store.n_tiles, bool)
    for box in slide.tissue_boxes:
        on_tissue |= overlaps(box)
    assert on_tissue.all(), "every kept tile touches tissue; none sits on pen ink or specks on glass alone"
    # the store keeps the ink it found beside the tissue mask, and the QC image outlines it apart
    tissue, _, _ = store.mask()
    ink = store.ink_mask()
    assert ink is not None and ink.shape == tissue.shape and ink.sum() > 50 and not (ink & tissue).any()
    qc = np.asarray(Image.open(tmp_path / "qc" / "pen.png").convert("RGB"))
    assert (qc == QC_REJECTED_RGB).all(axis=2).sum() > 50 and (qc == QC_OUTLINE_RGB).all(axis=2).sum() > 50


def test_real_slide_tiles_and_inspect(tmp_path, capsys):
    assert wsi_main(["tile", str(REAL_SLIDE), "--out", str(tmp_path), "--no-progress"]) == 0
    store = SlideStore.open(store_path(tmp_path, "cmu_small_region"))
    assert store.n_tiles > 20
    assert (tmp_path / "qc" / "cmu_small_region.png").exists()
    assert f"wsi tile: cmu_small_region: {store.n_tiles} tiles, slide 0.499 um/px, " in capsys.readouterr().out
    assert wsi_main(["inspect", str(store.path)]) == 0
    summary = capsys.readouterr().out
    assert "0.499" in summary and f"tiles      {store.n_tiles}" in summary and "complete   yes" in summary


def test_bad_slides_fail_alone_with_one_line_each(slide_025, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    good = slides / "good.svs"
    shutil.copy(slide_025.path, good)
    (slides / "notaslide.svs").write_text("plain text, not a slide")
    data = slide_025.path.read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    write_synthetic_slide(slides / "nompp.tif", width=1024, height=1024, mpp=None, kind="generic")
    write_glass_slide(slides / "glass.svs")
    write_glass_slide(slides / "inked.svs", ink=True)
    (slides / "dup").mkdir()
    shutil.copy(slide_025.path, slides / "dup" / "twin.svs")
    shutil.copy(slide_025.path, slides / "twin.svs")
    out = tmp_path / "out"

    code = wsi_main(["tile", str(slides), str(slides / "dup" / "twin.svs"), "--out", str(out), "--no-progress"])
    assert code == 1
    assert SlideStore.open(store_path(out, "good")).n_tiles > 0
    with open(out / "failures.csv") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"notaslide", "truncated", "nompp", "glass", "inked", "twin"}
    assert "not a readable slide" in rows["notaslide"]["cause"]
    assert "mpp_overrides" in rows["nompp"]["cause"]
    assert "no tissue" in rows["glass"]["cause"]
    assert "no tissue" in rows["inked"]["cause"] and "marker ink" in rows["inked"]["cause"]
    assert "also the id of" in rows["twin"]["cause"]
    assert all(r["stage"] == "tile" and "\n" not in r["cause"] for r in rows.values())
    for slide_id in rows:
        assert not is_complete(store_path(out, slide_id))


@pytest.fixture(scope="module")
def svs_and_dicom(tmp_path_factory):
    """One scene written twice into one folder: ``scene.svs`` and the DICOM folder ``scene_dcm/``."""
    slides = tmp_path_factory.mktemp("svs_dicom") / "slides"
    args = {"width": 2048, "height": 1536, "mpp": 0.5, "downsamples": (1, 4, 16), "seed": 6, "tumour_tiles": 1}
    write_synthetic_slide(slides / "scene.svs", **args)
    write_synthetic_slide(slides / "scene_dcm", kind="dicom", **args)
    return slides


def test_a_dicom_folder_tiles_like_the_same_scene_as_svs_and_reruns_only_when_it_changes(svs_and_dicom, tmp_path):
    out = tmp_path / "out"
    assert wsi_main(["tile", str(svs_and_dicom), "--out", str(out), "--no-progress"]) == 0
    svs, dcm = (SlideStore.open(store_path(out, name)) for name in ("scene", "scene_dcm"))
    assert dcm.slide.vendor == "dicom" and dcm.slide.mpp_x == 0.5 and dcm.slide.mpp_source == "file"
    assert dcm.slide.source_path == str((svs_and_dicom / "scene_dcm").resolve())
    assert dcm.slide.source_size == sum(f.stat().st_size for f in (svs_and_dicom / "scene_dcm").iterdir())
    assert dcm.tiling == svs.tiling and dcm.n_tiles == svs.n_tiles > 0
    np.testing.assert_array_equal(dcm.coords, svs.coords)
    # both are JPEG of the same rendering (SVS 4:2:0, DICOM 4:2:2 chroma): equal within JPEG's error
    diff = np.abs(dcm.read_tiles(0, dcm.n_tiles).astype(int) - svs.read_tiles(0, svs.n_tiles).astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 99) < 30

    stamp = (store_path(out, "scene_dcm") / "zarr.json").stat().st_mtime_ns
    assert wsi_main(["tile", str(svs_and_dicom), "--out", str(out), "--no-progress"]) == 0
    assert (store_path(out, "scene_dcm") / "zarr.json").stat().st_mtime_ns == stamp  # nothing new: idle
    level1 = svs_and_dicom / "scene_dcm" / "level-1.dcm"
    mtime = level1.stat().st_mtime
    try:
        os.utime(level1, (mtime + 10, mtime + 10))  # one file of the folder changed: the slide is re-tiled
        [result] = tile([svs_and_dicom / "scene_dcm"], out)
        assert result["cause"] is None
        assert (store_path(out, "scene_dcm") / "zarr.json").stat().st_mtime_ns != stamp
    finally:
        os.utime(level1, (mtime, mtime))


def test_a_dicom_folder_unsafe_for_direct_decoding_is_read_through_openslide_and_still_tiles(svs_and_dicom,
                                                                                            tmp_path):
    import imagecodecs
    import pydicom
    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRLittleEndian

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copytree(svs_and_dicom / "scene_dcm", slides / "native1")
    # level 1 rewritten with native (uncompressed) RGB frames: OpenSlide reads it, the direct JPEG path cannot
    level1 = slides / "native1" / "level-1.dcm"
    ds = pydicom.dcmread(level1)
    frames = [imagecodecs.jpeg_decode(f, colorspace="YCBCR", outcolorspace="RGB")
              for f in generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)]
    ds.PixelData = np.stack(frames).tobytes()
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "RGB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(level1, enforce_file_format=True)

    with open_slide(slides / "native1") as unsafe, open_slide(svs_and_dicom / "scene_dcm") as direct:
        assert (unsafe.pixel_backend, direct.pixel_backend) == ("openslide", "jpeg-tiles")
        assert unsafe.level_dimensions == direct.level_dimensions  # OpenSlide still sees every level
        for level in range(unsafe.level_count):
            np.testing.assert_array_equal(unsafe.read_region(640, 384, level, 300, 200),
                                          direct.read_region(640, 384, level, 300, 200))
    out = tmp_path / "out"
    [result] = tile([slides / "native1"], out)
    assert result["cause"] is None
    [reference] = tile([svs_and_dicom / "scene_dcm"], tmp_path / "reference")  # the direct path
    assert reference["cause"] is None
    unsafe = SlideStore.open(store_path(out, "native1"))
    direct = SlideStore.open(store_path(tmp_path / "reference", "scene_dcm"))
    assert unsafe.n_tiles == direct.n_tiles > 0
    np.testing.assert_array_equal(unsafe.coords, direct.coords)
    np.testing.assert_array_equal(unsafe.read_tiles(0, unsafe.n_tiles), direct.read_tiles(0, direct.n_tiles))


def test_a_corrupt_dicom_folder_fails_alone_with_one_line_naming_it(svs_and_dicom, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(svs_and_dicom / "scene.svs", slides / "good.svs")
    shutil.copytree(svs_and_dicom / "scene_dcm", slides / "broken")
    data = (slides / "broken" / "level-0.dcm").read_bytes()
    (slides / "broken" / "level-0.dcm").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"

    assert wsi_main(["tile", str(slides), "--out", str(out), "--no-progress"]) == 1
    assert SlideStore.open(store_path(out, "good")).n_tiles > 0
    with open(out / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slide_id"], r["stage"]) for r in rows] == [("broken", "tile")]
    assert rows[0]["cause"].startswith(f"{slides / 'broken'}: level-0.dcm is not a whole DICOM file")
    assert "\n" not in rows[0]["cause"]
    assert not is_complete(store_path(out, "broken"))


@pytest.mark.slow
def test_killed_run_leaves_no_complete_store_and_rerun_completes(tmp_path):
    slide = write_synthetic_slide(tmp_path / "big.svs", width=12288, height=8192, mpp=0.25, seed=2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "wsi.cli", "tile", str(slide.path), "--out", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "stores").glob(".big.zarr.partial-*/tiles/c")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((out / "stores").glob(".big.zarr.partial-*")), "the kill landed mid-write"
    assert not is_complete(store_path(out, "big"))
    with pytest.raises(Exception, match="does not exist|incomplete"):
        SlideStore.open(store_path(out, "big"))

    [result] = tile([slide.path], out)
    assert result["cause"] is None
    assert is_complete(store_path(out, "big"))
    assert not list((out / "stores").glob(".big.zarr.partial-*")), "stale partial stores are cleaned up"


def test_rerun_with_nothing_new_does_nothing_and_a_changed_parameter_redoes(slide_025, tmp_path):
    tile([slide_025.path], tmp_path)
    path = store_path(tmp_path, "s025")
    stamp = (path / "zarr.json").stat().st_mtime_ns
    tile([slide_025.path], tmp_path)
    assert (path / "zarr.json").stat().st_mtime_ns == stamp
    tile([slide_025.path], tmp_path, "tiling.tile_px=128")
    assert SlideStore.open(path).tiling.tile_px == 128


@pytest.mark.slow
def test_snakemake_tiles_a_folder_in_one_batch_job_and_reruns_nothing(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        write_synthetic_slide(slides / f"case{i}.svs", width=2048, height=1536, mpp=0.5, seed=i)
    (slides / "broken.svs").write_text("not a slide")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--until", "tile", "--config", f"slides_dir={slides}", f"out_dir={out}",
           "mode=features"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 1, first.stderr[-3000:]  # a slide failed: the run says so in its exit status
    assert "broken [tile]" in first.stderr and "not a readable slide" in first.stderr
    assert is_complete(store_path(out, "case0")) and is_complete(store_path(out, "case1"))
    assert "broken" in (out / "failures.csv").read_text()
    assert first.stderr.count("rule tile:") == 1  # the three slides fit one batch job (slides_per_job: 50)
    stamp = (store_path(out, "case0") / "zarr.json").stat().st_mtime_ns
    second = subprocess.run(cmd + ["allow_failed_slides=True"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "rule tile:" not in second.stderr  # nothing new: no job runs
    assert (store_path(out, "case0") / "zarr.json").stat().st_mtime_ns == stamp
