"""What the level check (wsi.slide.levels) costs, measured in one run.

    python bench/levels.py [--slide PATH] [--width 20000 --height 15000]

On an Aperio-like SVS at 0.25 um/px with levels 1, 4, 16 (made once under bench/out/ unless --slide names
one, e.g. bench/tiling.py's), in one process:

* the check of the mask's level (16x, ``compare_with_level0``) and of each other level;
* the thumbnail for the mask (``tissue.mask_mpp`` 8 um/px) read from that level without and with the check,
  and, as when every coarse level is rejected, from level 0 in strips;
* the whole ``tile`` of the slide (coordinates only, the cheapest run, so the check's share is the largest),
  which includes the check;
* opening a wsidicomizer conversion of tests/data/cmu_small_region.svs with ``backend: auto``, which probes
  OpenSlide against wsidicom when the direct JPEG path refuses the folder.

Prints seconds and ratios; the machine is noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL_SLIDE = HERE.parent / "tests" / "data" / "cmu_small_region.svs"


def timed(fn, repeat: int = 3):
    """(best seconds of ``repeat`` calls, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    from tiling import make_slide  # bench/tiling.py's slide maker: the same scene

    from wsi.config import load_config
    from wsi.slide import LevelCheck, compare_with_level0, open_slide
    from wsi.tiling import TileConfig, _read_strips, read_thumbnail, tile_slides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path)
    ap.add_argument("--width", type=int, default=20000)
    ap.add_argument("--height", type=int, default=15000)
    args = ap.parse_args()
    path = args.slide or HERE / "out" / f"bench_{args.width}x{args.height}.svs"
    if args.slide is None:
        path.parent.mkdir(exist_ok=True)
        make_slide(path, args.width, args.height)
    config = load_config(sets=["tiling.store_pixels=false"])
    mask_mpp = config["tissue"]["mask_mpp"]

    with open_slide(path) as slide:
        print(f"slide {path.name}: {slide.width} x {slide.height} px, levels {slide.level_dimensions}, "
              f"reader {slide.pixel_backend}")
        for level in range(1, slide.level_count):
            seconds, verdict = timed(lambda: compare_with_level0(slide, level))
            print(f"check level {level} (downsample {slide.level_downsamples[level]:g}): {seconds * 1000:.0f} ms, "
                  f"agrees {verdict.agrees}, colour {verdict.colour_difference}, "
                  f"correlation {verdict.correlation}, contrast {verdict.contrast_ratio}")
        ds = mask_mpp / slide.mpp_x
        out_w, out_h = round(slide.width / ds), round(slide.height / ds)
        wanted = LevelCheck(slide).plan(mask_mpp, 0.0, "mask").level
        plain, _ = timed(lambda: _read_strips(slide, wanted, out_w, out_h))
        checked, _ = timed(lambda: read_thumbnail(slide, mask_mpp, LevelCheck(slide)))
        level0, _ = timed(lambda: _read_strips(slide, 0, out_w, out_h), repeat=1)
        print(f"mask thumbnail from level {wanted}: {plain:.3f} s unchecked, {checked:.3f} s with the check "
              f"(x{checked / plain:.2f}); from level 0 in strips: {level0:.2f} s (x{level0 / plain:.1f})")

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        [result] = tile_slides(out, TileConfig.from_config(config), [path], progress=False).items()
        whole = time.perf_counter() - t
        assert result["cause"] is None, result["cause"]
        print(f"tile (coordinates only, {result['n_tiles']} tiles): {whole:.2f} s; "
              f"the mask level's check is {checked - plain:.3f} s of it ({(checked - plain) / whole:.1%})")

        from wsidicomizer import WsiDicomizer

        for add in (False, True):
            folder = Path(out) / f"cmu_{'added' if add else 'plain'}"
            WsiDicomizer.convert(REAL_SLIDE, folder, add_missing_levels=add, workers=1)
            opened, reader = timed(lambda: _open_reader(open_slide, folder))
            svs, _ = timed(lambda: _open_reader(open_slide, REAL_SLIDE))
            added = "with" if add else "without"
            print(f"open wsidicomizer DICOM ({added} add_missing_levels): {opened * 1000:.0f} ms, "
                  f"reader {reader}; the SVS: {svs * 1000:.0f} ms")
            shutil.rmtree(folder)


def _open_reader(open_slide, path) -> str:
    with open_slide(path) as slide:
        return slide.pixel_backend


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
