"""Tiling benchmark: time and peak memory of `tile` against the JPEG decode floor, measured in one run.

    python bench/tiling.py [--width 40000 --height 30000] [--threads N] [--seed S] [--rounds R]

Makes (once, cached under bench/out/) a pyramidal JPEG Aperio-like slide at 0.25 um/px with levels 1, 4, 16
(no 2x level, so 0.5 um/px tiles are read at level 0 and area-averaged; ``--seed`` draws another scene, a
held-out slide), then measures in this one run:

* floor: decoding, with imagecodecs in a thread pool of the same size as the tiler's, every level-0 JPEG tile
  of the file that lies under a kept tile (raw tile bytes read with tifffile); nothing else;
* tile with the default reader (``backend: auto``: OpenSlide metadata, JPEG tiles decoded directly) storing
  pixels lossless / JPEG q90 or coordinates only, and with the openslide and tiffslide backends for the
  pixels, each in a fresh subprocess so its peak RSS is its own;
* tile the same scene written as a DICOM WSI folder (same tiles, JPEG baseline frames) with ``backend: auto``,
  whose frames are decoded directly as well;

and prints seconds, ratio to the floor, tiles/s, bytes per stored tile and peak memory; then the wall time of a
whole ``wsi tile`` process on the SVS (interpreter start, imports, tissue mask, tiles, store), as a SLURM job
that tiles one slide per process pays it, and the start-up alone. Machines here are noisy: compare ratios from
one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_slide(path: Path, width: int, height: int, kind: str = "aperio", seed: int = 1) -> None:
    """The benchmark scene as an SVS file or (``kind="dicom"``) a DICOM folder; written once, then reused."""
    from wsi_synth import write_synthetic_slide

    if path.exists():
        return
    t = time.perf_counter()
    tmp = path.with_name(f".{path.name}-partial")  # no suffix: a DICOM slide is a folder
    shutil.rmtree(tmp, ignore_errors=True)
    write_synthetic_slide(tmp, width=width, height=height, mpp=0.25, downsamples=(1, 4, 16), seed=seed, kind=kind,
                          tumour_boxes=[(width // 3, height // 3, width // 3 + 3000, height // 3 + 2000)])
    os.replace(tmp, path)
    print(f"made {path.name} ({width} x {height}) in {time.perf_counter() - t:.1f} s")


def run_python(code: str) -> float:
    """Wall seconds of a fresh interpreter running ``code``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def decode_floor(slide_path: Path, coords: np.ndarray, footprint: float, threads: int) -> tuple[float, int]:
    """Seconds to decode the level-0 JPEG tiles under the kept tiles' footprints, and how many there were."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        needed = set()
        for x, y in coords:
            for ty in range(int(y // th), int((y + footprint - 1) // th) + 1):
                for tx in range(int(x // tw), int((x + footprint - 1) // tw) + 1):
                    needed.add(ty * across + tx)
        tables = page.jpegtables
        fh = tif.filehandle
        blobs = []
        for i in sorted(needed):
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
        colorspace = "YCBCR" if page.photometric == 6 else None

    def decode(blob):
        return imagecodecs.jpeg_decode(blob, tables=tables, colorspace=colorspace, outcolorspace="RGB")

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(decode, blobs):
            pass
    return time.perf_counter() - start, len(blobs)


def run_tiling(slide: Path, out: Path, sets: list[str]) -> dict:
    """`tile_slides` in a fresh process; returns seconds, tiles and that process's peak RSS."""
    code = (
        "import json, sys, time, resource\n"
        "from wsi.config import load_config\nfrom wsi.tiling import TileConfig, tile_slides\n"
        f"cfg = load_config(sets={sets!r})\n"
        "t = time.perf_counter()\n"
        f"[r] = tile_slides({str(out)!r}, TileConfig.from_config(cfg), [{str(slide)!r}], progress=False).items()\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': dt, 'tiles': r['n_tiles'], 'error': r['cause'],"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(slide: Path, out: Path) -> float:
    """Wall seconds of a whole ``wsi tile`` process (interpreter start and imports included), as a SLURM job
    tiling one slide per process pays them."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsi.cli", "tile", str(slide), "--out", str(out), "--no-progress"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def whole_process_rounds(slide: Path, out: Path, rounds: int, threads: int) -> None:
    """A whole ``wsi tile`` process and the decode floor, alternated ``rounds`` times, each process against the
    floor measured right after it: on a loaded machine both move, their ratio within a round less. Also the
    CPU seconds (user + system) of each, which load moves least."""
    from wsi.store import SlideStore

    rows = []
    for i in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        process_s = run_cli(slide, out)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        process_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if i == 0:
            store = SlideStore.open(out / "stores" / f"{slide.stem}.zarr")
            coords, footprint, n_tiles = store.coords, store.tiling.tile_px_level0, len(store.coords)
        cpu = time.process_time()
        floor_s, n_jpeg = decode_floor(slide, coords, footprint, threads)
        floor_cpu = time.process_time() - cpu  # includes reading the JPEG bytes, a few ms
        rows.append((process_s, floor_s, process_cpu, floor_cpu))
        print(f"round {i + 1}: process {process_s:.2f} s ({process_cpu:.2f} CPU-s), floor {floor_s:.2f} s "
              f"({floor_cpu:.2f} CPU-s): {process_s / floor_s:.2f}x wall, {process_cpu / floor_cpu:.2f}x CPU",
              flush=True)
    wall = sorted(p / f for p, f, _, _ in rows)
    cpu = sorted(p / f for _, _, p, f in rows)
    print(f"\nwhole `wsi tile` process, {n_tiles} tissue tiles, {n_jpeg} level-0 JPEG tiles under them, {threads} "
          f"threads, {rounds} rounds: wall ratio median {float(np.median(wall)):.2f}x (min {wall[0]:.2f}, max "
          f"{wall[-1]:.2f}); CPU ratio median {float(np.median(cpu)):.2f}x (min {cpu[0]:.2f}, max {cpu[-1]:.2f})")
    shutil.rmtree(out, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=1, help="the scene's seed (another one: a held-out slide)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="only the whole `wsi tile` process against the floor, alternated this many rounds")
    args = parser.parse_args()

    work = HERE / "out"
    work.mkdir(exist_ok=True)
    name = f"bench_{args.width}x{args.height}" + (f"_seed{args.seed}" if args.seed != 1 else "")
    slide = work / f"{name}.svs"
    make_slide(slide, args.width, args.height, seed=args.seed)
    if args.rounds:
        return whole_process_rounds(slide, work / "tiling_run", args.rounds, args.threads)
    dicom = work / f"{name}_dicom"
    make_slide(dicom, args.width, args.height, kind="dicom", seed=args.seed)

    cases = [
        ("auto (direct JPEG), lossless", []),
        ("auto, jpeg q90", ["tiling.codec=jpeg"]),
        ("auto, coords only", ["tiling.store_pixels=false"]),
        ("openslide, lossless", ["slide.backend=openslide"]),
        ("tiffslide, lossless", ["slide.backend=tiffslide"]),
        ("DICOM folder (auto), lossless", []),
    ]
    results = []
    for name, sets in cases:
        out = work / "tiling_run"
        source = dicom if name.startswith("DICOM") else slide
        r = run_tiling(source, out, sets)
        if r["error"]:
            raise SystemExit(f"{name}: {r['error']}")
        store = out / "stores" / f"{source.stem}.zarr"
        tiles_dir = store / "tiles"
        r["bytes_per_tile"] = dir_bytes(tiles_dir) / r["tiles"] if tiles_dir.exists() else 0
        results.append((name, r))
        if name.startswith("auto (direct JPEG)"):
            from wsi.store import SlideStore

            s = SlideStore.open(store)
            coords, footprint = s.coords, s.tiling.tile_px_level0
    floor_s, n_jpeg = decode_floor(slide, coords, footprint, args.threads)
    floor_1, _ = decode_floor(slide, coords, footprint, 1)
    process_s = run_cli(slide, work / "tiling_run")
    imports_s = min(run_python("import wsi.cli, wsi.tiling") for _ in range(3))

    print(f"\nslide {args.width} x {args.height} px at 0.25 um/px -> 0.5 um/px 256 px tiles; "
          f"{os.cpu_count()} cores, {args.threads} threads")
    print(f"decode floor: {n_jpeg} level-0 JPEG tiles under tissue in {floor_s:.2f} s with {args.threads} "
          f"threads ({floor_1:.2f} s in one thread)")
    print(f"{'case':30s} {'seconds':>8s} {'x floor':>8s} {'tiles':>7s} {'tiles/s':>8s} {'KB/tile':>8s} "
          f"{'peak MB':>8s}")
    for name, r in results:
        print(f"{name:30s} {r['seconds']:8.2f} {r['seconds'] / floor_s:8.2f} {r['tiles']:7d} "
              f"{r['tiles'] / r['seconds']:8.0f} {r['bytes_per_tile'] / 1024:8.1f} {r['peak_mb']:8.0f}")
    print(f"{'whole wsi tile process':30s} {process_s:8.2f} {process_s / floor_s:8.2f}   (interpreter start + "
          f"imports of the tile path: {imports_s:.2f} s = {imports_s / floor_s:.2f} x floor)")
    shutil.rmtree(work / "tiling_run", ignore_errors=True)
    print(f"(this process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
