"""Viewer benchmark: tile latency under 16 concurrent clients, time to a full slide view, overlay redraws and the
10,000-slide cohort page, measured against a real ``wsi view`` server process and Debian's chromium.

    python bench/viewer.py [--width 40000] [--height 30000] [--clients 16] [--tiles 640] [--cohort 10000] [--views 5]

Builds under bench/out/viewer/ (reused by later runs): a synthetic Aperio-like slide of ``--width`` x ``--height``
px at 0.25 um/px (levels 1/4/16/64, few objects so it writes in minutes), and an OUT whose store of that slide
holds a 512-px tile grid over its tissue with made-up scores of run ``bench_run`` (tumour tiles high), 99
copies of that store, and a ``predictions.csv`` of ``--cohort`` slides. Then, against ``wsi view`` in its own
process:

* **tiles**: ``--tiles`` distinct deep-zoom tiles inside the tissue at the three finest levels, fetched by
  ``--clients`` threads on keep-alive connections (as a browser's parallel image loads), once with an empty tile
  cache (cold: each tile read from the slide and encoded; the slide file is in the OS page cache) and again
  (warm); latency p50/p95 per request;
* **slide page**: ``--views`` times, a fresh server and a fresh browser profile; milliseconds from navigation to
  the first moment every tile of the first view is drawn (OpenSeadragon's fully-loaded), median and range;
* **overlay**: 20 threshold and opacity changes; the canvas redraw's own time and the time to the next painted
  frame, and the count of network requests they made (must be 0);
* **cohort page**: milliseconds from navigation to the table's first page rendered (``cohort-ready`` mark) and to
  its thumbnails loaded;
* **memory**: the server's RSS after start and its peak after the runs.

The machine is shared: note the load average printed with the figures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "out" / "viewer"
RUN = "bench_run"
TILE0 = 256          # the score grid's cells at level 0 (0.25 um/px): every cell of the slide, glass included,
                     # so the overlay draws ~18,000 tiles, as many as a 20x slide of 100,000 x 75,000 px holds
BIG = "case00000"


def make_slide(width: int, height: int):
    from wsi_synth import write_synthetic_slide

    path = WORK / f"slide_{width}x{height}.svs"
    kwargs = dict(width=width, height=height, mpp=0.25, seed=7, downsamples=(1, 4, 16, 64), tumour_tiles=4)
    if not path.exists():  # written under another name first: a killed run leaves no half slide to reuse
        write_synthetic_slide(path.with_suffix(".partial.svs"), **kwargs).path.rename(path)
    return dataclasses.replace(write_synthetic_slide(path, write=False, **kwargs), path=path)


def make_out(drawn, cohort: int) -> Path:
    from wsi.slide import open_slide
    from wsi.store import ScoreAttrs, SlideAttrs, SlideStore, TileStoreWriter, TilingAttrs, store_path

    out = WORK / f"out_{drawn.width}x{drawn.height}_{cohort}"
    if (out / "predictions" / RUN / "predictions.csv").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    with open_slide(drawn.path) as slide:
        level = slide.level_count - 1
        ds = slide.level_downsamples[level]
        w, h = slide.level_dimensions[level]
        thumb = slide.read_region(0, 0, level, w, h)
        attrs = SlideAttrs(source_path=str(drawn.path), source_size=drawn.path.stat().st_size, source_mtime=0.0,
                           backend="openslide", vendor="aperio", width=slide.width, height=slide.height,
                           mpp_x=0.25, mpp_y=0.25, mpp_source="file", objective_power=40.0,
                           level_count=slide.level_count, level_downsamples=slide.level_downsamples)
    tissue = thumb.mean(axis=2) < 220
    rows, cols = np.mgrid[0:drawn.height // TILE0, 0:drawn.width // TILE0]
    coords = np.stack([cols.ravel() * TILE0, rows.ravel() * TILE0], axis=1).astype(np.int64)
    tiling = TilingAttrs(target_mpp=0.25, tile_px=256, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=float(TILE0), stride_px_level0=float(TILE0), effective_mpp=0.25,
                         min_tissue_fraction=0.25, store_pixels=False, codec="lossless", quality=90, chunk_tiles=64,
                         tissue={}, wsi_version="bench")
    writer = TileStoreWriter.create(store_path(out, BIG), BIG, attrs, tiling, coords=coords,
                                    tissue_fraction=np.ones(len(coords)))
    writer.write_mask(tissue, thumb, downsample=ds, mpp=ds * 0.25)
    store = writer.commit()
    inside = np.zeros(len(coords), bool)
    for x0, y0, x1, y1 in drawn.tumour_boxes:
        inside |= (coords[:, 0] + TILE0 > x0) & (coords[:, 0] < x1) & (coords[:, 1] + TILE0 > y0) & (coords[:, 1] < y1)
    rng = np.random.default_rng(0)
    p = np.where(inside, rng.uniform(0.7, 1.0, len(coords)), rng.uniform(0.0, 0.3, len(coords))).astype(np.float32)
    attention = np.where(inside, 5.0, 1.0) * rng.uniform(0.5, 1.5, len(coords))
    store.write_scores(RUN, (attention / attention.sum()).astype(np.float32), np.stack([1 - p, p], 1),
                       ScoreAttrs(run=RUN, model="abmil", encoder="enc", classes=("normal", "tumour"),
                                  probabilities=(0.1, 0.9), predicted="tumour"))
    for i in range(1, 100):  # the first page of the cohort table has thumbnails to load
        shutil.copytree(store.path, store_path(out, f"case{i:05d}"))
        group = SlideStore.open(store_path(out, f"case{i:05d}")).group
        group.attrs["slide_id"] = f"case{i:05d}"
    (out / "predictions" / RUN).mkdir(parents=True)
    with open(out / "predictions" / RUN / "predictions.csv", "w", newline="") as f:
        writer_csv = csv.writer(f, lineterminator="\n")
        writer_csv.writerow(["slide_id", "prob_normal", "prob_tumour", "predicted", "ood_score", "ood"])
        for i, q in enumerate(rng.uniform(0, 1, cohort)):
            writer_csv.writerow([f"case{i:05d}", f"{1 - q:.4f}", f"{q:.4f}", "tumour" if q > 0.5 else "normal",
                                 f"{rng.uniform(0, 2):.3f}", str(bool(q > 0.97))])
    return out


class Server:
    """``wsi view`` in its own process (so its RSS is its own)."""

    def __init__(self, out: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-m", "wsi.cli", "view", str(out), "--run", RUN, "--port",
                                      str(self.port)], env=env, stdout=subprocess.PIPE, text=True)
        started = time.perf_counter()
        self.proc.stdout.readline()  # "wsi view: ... open http://..."
        self.start_s = time.perf_counter() - started
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_mb(self, key: str = "VmRSS") -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def tile_addresses(out: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct deep-zoom tiles over the tissue at the three finest levels (a pathologist's reading)."""
    from wsi.store import SlideStore, store_path
    from wsi.viewer.tiles import TILE_PX, DeepZoom

    store = SlideStore.open(store_path(out, BIG))
    zoom = DeepZoom(store.slide.width, store.slide.height)
    rng = np.random.default_rng(seed)
    seen, addresses = set(), []
    tissue, _, ds = store.mask()
    centres = ((store.coords + TILE0 // 2) / ds).astype(int)
    coords = store.coords[tissue[centres[:, 1], centres[:, 0]]]
    while len(addresses) < n:
        level = zoom.max_level - int(rng.integers(0, 3))
        x, y = coords[rng.integers(len(coords))] + rng.integers(0, TILE0, 2)
        span = TILE_PX * zoom.downsample(level)
        key = (level, int(x // span), int(y // span))
        if key not in seen:
            seen.add(key)
            addresses.append(f"/tiles/{BIG}/{key[0]}/{key[1]}_{key[2]}.jpg")
    return addresses


def fetch_all(port: int, addresses: list[str], clients: int) -> list[float]:
    """Latency (ms) of every request, ``clients`` threads with one keep-alive connection each."""
    latencies, lock, queue = [], threading.Lock(), list(reversed(addresses))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if not queue:
                    break
                path = queue.pop()
            t = time.perf_counter()
            conn.request("GET", path)
            answer = conn.getresponse()
            answer.read()
            elapsed = (time.perf_counter() - t) * 1000
            assert answer.status == 200, (path, answer.status)
            with lock:
                latencies.append(elapsed)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def percentiles(values: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(values, 50)), 1), "p95_ms": round(float(np.percentile(values, 95)), 1),
            "n": len(values)}


def browser(profile: str):
    """Chromium with a fresh profile (an empty HTTP cache)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def wait(driver, script: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(script)


def slide_page(out: Path) -> dict:
    """First full view on a fresh server and browser, then overlay redraws."""
    from wsi.store import SlideStore, store_path

    server, profile = Server(out), tempfile.TemporaryDirectory()
    driver = browser(profile.name)
    try:
        driver.get(f"{server.url}/slide?id={BIG}")
        first = wait(driver, "return window.wsiView && wsiView.firstFullView")
        n_tiles = driver.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.name.includes('/tiles/')).length")
        before = driver.execute_script("return performance.getEntriesByType('resource').length")
        redraw, painted = [], []
        for k in range(20):
            control, value = ("threshold", k / 20) if k % 2 == 0 else ("opacity", 0.2 + k / 40)
            painted.append(driver.execute_async_script("""
                const [id, value, done] = arguments, t = performance.now(), e = document.getElementById(id);
                e.value = value; e.dispatchEvent(new Event('input'));
                requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t)));""",
                                                       control, str(value)))
            redraw.append(driver.execute_script("return wsiView.lastRedrawMs"))
        after = driver.execute_script("return performance.getEntriesByType('resource').length")
        return {"first_full_view_ms": round(first), "first_view_tiles": n_tiles,
                "server_start_s": round(server.start_s, 2),
                "redraw_ms_median": round(statistics.median(redraw), 2), "redraw_ms_max": round(max(redraw), 2),
                "to_painted_frame_ms_median": round(statistics.median(painted), 1),
                "to_painted_frame_ms_max": round(max(painted), 1), "requests_during_redraws": after - before,
                "scored_tiles": SlideStore.open(store_path(out, BIG)).n_tiles}
    finally:
        driver.quit()
        server.stop()
        profile.cleanup()


def cohort_page(out: Path) -> dict:
    server, profile = Server(out), tempfile.TemporaryDirectory()
    driver = browser(profile.name)
    try:
        driver.get(server.url + "/")
        wait(driver, "return document.body.dataset.state === 'ready'")
        ready = driver.execute_script("return performance.getEntriesByName('cohort-ready')[0].startTime")
        thumbs = wait(driver, """const imgs = [...document.querySelectorAll('td.thumb img')];
            const visible = imgs.filter(i => i.getBoundingClientRect().top < innerHeight);
            return visible.length && visible.every(i => i.complete) && performance.now();""")
        rows = driver.execute_script("return document.getElementById('count').textContent")
        return {"cohort_ready_ms": round(ready), "visible_thumbnails_loaded_ms": round(thumbs), "rows": rows,
                "server_start_s": round(server.start_s, 2)}
    finally:
        driver.quit()
        server.stop()
        profile.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=40000)
    parser.add_argument("--height", type=int, default=30000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tiles", type=int, default=640)
    parser.add_argument("--cohort", type=int, default=10000)
    parser.add_argument("--views", type=int, default=5, help="fresh server + browser starts of the slide page")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    drawn = make_slide(args.width, args.height)
    out = make_out(drawn, args.cohort)
    print(f"setup {time.perf_counter() - t:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)

    results = {"slide": f"{args.width} x {args.height}", "load_average_start": round(os.getloadavg()[0], 1)}
    server = Server(out)
    try:
        results["rss_after_start_mb"] = round(server.rss_mb())
        addresses = tile_addresses(out, args.tiles)
        fetch_all(server.port, [f"/api/slide/{BIG}"], 1)  # as the slide page does first: the slide opens here
        results["tiles_cold"] = percentiles(fetch_all(server.port, addresses, args.clients))
        results["tiles_warm"] = percentiles(fetch_all(server.port, addresses, args.clients))
        results["rss_after_tiles_mb"] = round(server.rss_mb())
        results["rss_peak_mb"] = round(server.rss_mb("VmHWM"))
    finally:
        server.stop()
    print(json.dumps(results), flush=True)
    pages = [slide_page(out) for _ in range(args.views)]  # the shared machine's load swings: several fresh starts
    for key in ("first_full_view_ms", "redraw_ms_median", "to_painted_frame_ms_median"):
        values = [p[key] for p in pages]
        results[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    results["slide_page"] = pages
    print(json.dumps({k: results[k] for k in ("first_full_view_ms", "redraw_ms_median")}), flush=True)
    results["cohort_page"] = cohort_page(out)
    results["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
