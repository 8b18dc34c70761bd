"""GPU benchmark of feature extraction and MIL training in the steady state, per GPU: one short script that a
session with a GPU runs once (about 4 minutes on one H100/H200, at most ``--budget-s``), printing a short table
last; the exit status is 1 when a check failed.

    python bench/gpu_extract.py                # on a machine with NVIDIA GPUs
    python bench/gpu_extract.py --cpu-smoke    # tiny models and cohorts on CPU: proves the script runs

The ``device`` machine lacks some of our dependencies; carry them as wheels (``bench/gpu_wheels.txt``, pinned to
the versions we test with). Here, once, in the repository root (``.whl/`` must be git-ignored, e.g. listed in
``.git/info/exclude``)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        --platform manylinux1_x86_64 -d .whl -r bench/gpu_wheels.txt

then one ``run`` with ``carry: [".whl"]``, ``timeout_s: 540`` and the command::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 bench/gpu_extract.py 2>&1 | tee $OUT/gpu.log

What it does, in this order:

1. Checks: ``precision: auto`` gives bf16 on compute capability 8 or more (fp16 below); per model, bf16 against
   fp32 features of the same H&E-like 256 px tiles through the shipped preprocessing (resized to 224 on the
   GPU) have a cosine of at least 0.99 for every tile; a local cluster has one worker per GPU, each seeing only
   its own device and advertising ``GPU=1``.
2. Model, per GPU: bare forward passes of a ready batch (``extract.gpu_batch_size`` normalised 224 px tiles,
   already on the GPU, in the chosen precision), after warm-up: the GPU's own limit.
3. Pipeline: ``extract_cohort`` with the shipped ``extract`` defaults (256 px tiles resized to 224 on the GPU,
   ``gpu_batch_size``, ``tasks_per_gpu``, ``tiles_per_task``, ``pinned_mb``, the h5 export) over lossless and
   JPEG q90 stores, on that cluster. Steady state: the clock starts once every GPU worker has finished its first
   range task (plugin registered, model loaded, first batches done) and stops at the last; each task's tiles
   count pro rata to the part of it inside that window (task start and stop from Dask's task stream). Per GPU:
   the cohort's rate divided by the GPUs. Ratio: per-GPU pipeline over per-GPU model rate.
4. GPU utilisation: ``nvidia-smi`` samples every 200 ms for each GPU index, averaged over the same window.
5. MIL: ``wsi.mil.train`` (ABMIL, 3 folds, on the same cluster) on synthetic feature stores (``bench/mil.py``'s
   ``make_stores``): training bags/s over the epochs after each fold's first (from the folds' histories), and GPU
   utilisation during the training run.

Targets (issue 16): per H100, ResNet-50 >= 5,000 and ViT-L/16 >= 1,500 tiles/s end to end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MIN_COSINE = 0.99


@dataclass
class Setup:
    """Sizes for a GPU run and for the CPU smoke run."""

    models: tuple[str, ...]
    slides: int
    tiles_per_slide: int
    tiles_per_task: int | None     # None: the shipped default
    model_seconds: float
    mil_bags: int
    mil_tiles: int
    mil_dim: int
    mil_epochs: int


GPU = Setup(models=("resnet50", "vit_large_patch16_224"), slides=8, tiles_per_slide=4096, tiles_per_task=None,
            model_seconds=4.0, mil_bags=48, mil_tiles=8000, mil_dim=1024, mil_epochs=4)
CPU_SMOKE = Setup(models=("test_resnet", "test_vit"), slides=2, tiles_per_slide=96, tiles_per_task=32,
                  model_seconds=0.5, mil_bags=12, mil_tiles=300, mil_dim=64, mil_epochs=2)


@dataclass
class Report:
    """What the table prints; ``failed`` holds every failed check."""

    rows: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        (self.notes if ok else self.failed).append(("ok   " if ok else "FAIL ") + what)
        print(("ok   " if ok else "FAIL ") + what, flush=True)


# ------------------------------------------------------------------------------------------ inputs
def random_checkpoint(folder: Path, name: str) -> Path:
    """Random weights of timm's ``name`` in a safetensors file, loaded as a user's checkpoint would be."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def he_tiles(n: int, tile_px: int, seed: int) -> np.ndarray:
    """``n`` H&E-coloured tiles: 64 distinct textures (pink and purple waves plus noise), repeated."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile_px, 0:tile_px]
    texture = (20 * np.sin(xx[None, :, :, None] / (3 + rng.random((64, 1, 1, 3)) * 9))
               * np.cos(yy[None, :, :, None] / (3 + rng.random((64, 1, 1, 3)) * 9)))
    distinct = np.clip(rng.integers(120, 230, (64, 1, 1, 3)) + texture
                       + rng.normal(0, 6, (64, tile_px, tile_px, 3)), 0, 255).astype(np.uint8)
    return distinct[np.arange(n) % 64]


def write_slide(out: Path, s: int, n_tiles: int, codec: str) -> None:
    """Store ``s{s}`` of ``n_tiles`` H&E-like tiles at the shipped tiling defaults (tile size, chunking)."""
    from wsi.config import load_config
    from wsi.store import SlideAttrs, TileStoreWriter, TilingAttrs, store_path

    cfg = load_config()["tiling"]
    t, chunk = int(cfg["tile_px"]), int(cfg["chunk_tiles"])
    tiles = he_tiles(64, t, s)
    slide = SlideAttrs(source_path=f"s{s}.svs", source_size=1, source_mtime=0.0, backend="openslide", vendor=None,
                       width=n_tiles * 2 * t, height=2 * t, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                       objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=t, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=2.0 * t, stride_px_level0=2.0 * t, effective_mpp=0.5, min_tissue_fraction=0.25,
                         store_pixels=True, codec=codec, quality=90, chunk_tiles=chunk, tissue={}, wsi_version="bench")
    coords = np.stack([np.arange(n_tiles) * 2 * t, np.zeros(n_tiles, int)], axis=1)
    w = TileStoreWriter.create(store_path(out, f"s{s}"), f"s{s}", slide, tiling, coords=coords,
                               tissue_fraction=np.ones(n_tiles))
    for lo in range(0, n_tiles, chunk):
        w.write_tiles(lo, np.roll(tiles, -lo, axis=0)[:min(chunk, n_tiles - lo)])
    w.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
    w.commit()


def write_cohort(out: Path, setup: Setup, codec: str) -> None:
    """The cohort's stores, written in parallel processes (a store's tile codec runs in one thread)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(setup.slides, 16), mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(write_slide, [out] * setup.slides, range(setup.slides), [setup.tiles_per_slide] * setup.slides,
                      [codec] * setup.slides))


# ------------------------------------------------------------------------------------------ measuring
class GpuSampler:
    """``nvidia-smi`` utilisation samples, (time, GPU index, percent) every 200 ms, while the ``with`` block
    runs; without nvidia-smi (CPU smoke run) it records nothing."""

    def __enter__(self):
        self.samples: list[tuple[float, int, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            index, _, util = line.partition(",")
            if util.strip():
                self.samples.append((time.time(), int(index), float(util)))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def per_gpu(self, t0: float, t1: float) -> str:
        """Mean utilisation of each GPU index over [t0, t1], e.g. ``0:97 1:95``; ``-`` without samples."""
        by_gpu: dict[int, list[float]] = {}
        for t, index, util in self.samples:
            if t0 <= t <= t1:
                by_gpu.setdefault(index, []).append(util)
        return " ".join(f"{i}:{statistics.fmean(u):.0f}" for i, u in sorted(by_gpu.items())) or "-"


def steady_rate(records: list[dict], tiles_per_range: int) -> tuple[float, float, float, int]:
    """(tiles/s, t0, t1, range tasks) of the range tasks in a Dask task stream, from the moment every worker
    finished its first range task (warm) to the last stop; each task's tiles counted pro rata to its part
    of the window."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if "embed_tile_range" in str(r["key"]):
            compute = [s for s in r["startstops"] if s["action"] == "compute"]
            spans.setdefault(r["worker"], []).append((compute[0]["start"], compute[-1]["stop"]))
    t0 = max(min(stop for _, stop in s) for s in spans.values())
    t1 = max(stop for s in spans.values() for _, stop in s)
    tiles = sum(tiles_per_range * max(0.0, min(b, t1) - max(a, t0)) / (b - a)
                for s in spans.values() for a, b in s if b > a)
    n = sum(len(s) for s in spans.values())
    return (tiles / (t1 - t0) if t1 > t0 else float("nan")), t0, t1, n


def model_rate(name: str, ckpt: Path, device: str, batch_size: int, seconds: float) -> float:
    """Tiles/s of bare forward passes of one ready normalised batch on ``device`` (the GPU's own limit)."""
    import torch

    from wsi.features import load_encoder

    enc = load_encoder(name, ckpt, device=device)
    x = torch.randn(batch_size, *enc.input_size, device=device).to(enc.dtype, memory_format=enc.memory_format)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):  # cuDNN picks its kernels here
            enc.model(x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            enc.model(x)
            n += batch_size
        sync()
        rate = n / (time.perf_counter() - start)
    del enc, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


# ------------------------------------------------------------------------------------------ sections
def check_precision_and_cosine(report: Report, name: str, ckpt: Path, device: str) -> None:
    import torch

    from wsi.features import load_encoder

    tiles = he_tiles(128, 256, seed=99)
    reduced = load_encoder(name, ckpt, device=device, precision="auto" if device == "cuda" else "bf16")
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability()
        expected = "bf16" if major >= 8 else "fp16"
        report.check(reduced.precision == expected, f"{name}: precision auto on compute capability {major}.x is "
                                                     f"{reduced.precision} (expected {expected})")
    low = reduced.embed(tiles, batch_size=64)
    del reduced
    fp32 = load_encoder(name, ckpt, device=device, precision="fp32").embed(tiles, batch_size=64)
    cos = (low * fp32).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(fp32, axis=1)
    report.check(bool(np.isfinite(low).all() and cos.min() >= MIN_COSINE),
                 f"{name}: reduced precision vs fp32 feature cosine min {cos.min():.4f} (>= {MIN_COSINE})")


def _visible_devices() -> tuple:
    import os

    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()


def check_cluster(report: Report, client, n_gpus: int) -> None:
    from wsi.cluster import gpu_resources

    seen = client.run(_visible_devices)
    if n_gpus:
        report.check(len(seen) == n_gpus and gpu_resources(client) is not None
                     and len({v[0] for v in seen.values()}) == n_gpus and all(v[1] == 1 for v in seen.values()),
                     f"{len(seen)} worker(s) for {n_gpus} GPU(s), one device each, GPU=1: {sorted(seen.values())}")
    else:
        report.check(gpu_resources(client) is None, f"{len(seen)} CPU worker(s), no GPU resource")


def pipeline(report: Report, client, address: str, name: str, ckpt: Path, cohort: Path, codec: str,
             setup: Setup, n_gpus: int, model_tps: float) -> None:
    from distributed import get_task_stream

    from wsi.config import load_config
    from wsi.features import extract_cohort

    cfg = load_config()
    cfg["cluster"].update({"kind": "address", "address": address})
    cfg["extract"].update({"encoder": name, "checkpoint": str(ckpt)})
    if setup.tiles_per_task:
        cfg["extract"]["tiles_per_task"] = setup.tiles_per_task
    per_task = int(cfg["extract"]["tiles_per_task"])
    for done in [*cohort.glob("stores/*.zarr/features"), cohort / "features"]:
        shutil.rmtree(done, ignore_errors=True)
    with GpuSampler() as gpu, get_task_stream(client) as stream:
        summary = extract_cohort(cohort, cfg, progress=False)
    report.check(not summary.failed and summary.n_tiles == setup.slides * setup.tiles_per_slide,
                 f"{name} {codec}: {summary.n_tiles} tiles extracted, failed: {summary.causes or 'none'}")
    rate, t0, t1, n_tasks = steady_rate(stream.data, per_task)
    per_gpu = rate / max(n_gpus, 1)
    report.rows.append((name, codec, f"{model_tps:,.0f}", f"{per_gpu:,.0f}", f"{per_gpu / model_tps:.2f}",
                        gpu.per_gpu(t0, t1), f"{t1 - t0:.1f} s, {n_tasks} tasks"))
    print(f"{name} {codec}: {per_gpu:,.0f} tiles/s per GPU in the steady state", flush=True)


def mil_training(report: Report, address: str, work: Path, setup: Setup, n_gpus: int, n_workers: int) -> None:
    import json

    sys.path.insert(0, str(HERE))
    from mil import ENCODER, make_stores  # bench/mil.py: synthetic feature stores and labels

    from wsi.config import load_config
    from wsi.mil import train

    out = work / "mil"
    labels = make_stores(out, setup.mil_bags, setup.mil_tiles, setup.mil_dim)
    cfg = load_config(overrides={
        "labels": str(labels), "extract": {"encoder": ENCODER},
        "cluster": {"kind": "address", "address": address},
        "mil": {"model": "abmil", "run_name": "bench_gpu", "folds": 3, "epochs": setup.mil_epochs, "min_epochs": 1,
                "patience": setup.mil_epochs, "bootstrap": 100}})
    with GpuSampler() as gpu:
        t0 = time.time()
        run_dir = train(out, cfg, progress=False)
        t1 = time.time()
    folds = [json.loads(p.read_text()) for p in sorted(run_dir.glob("fold_*.json"))]
    bags = sum(f["n_train"] * (len(f["history"]) - 1) for f in folds)
    seconds = sum(e["train_seconds"] for f in folds for e in f["history"][1:])
    report.rows.append(("abmil training", f"{setup.mil_tiles} x {setup.mil_dim}", "-",
                        f"{bags / seconds:,.1f} bags/s", "-", gpu.per_gpu(t0, t1),
                        f"{t1 - t0:.1f} s, {len(folds)} folds on {n_workers} worker(s)"))
    report.check(all(f.get("device", "").startswith("cuda") == bool(n_gpus) for f in folds),
                 f"MIL folds ran on {sorted({f.get('device') for f in folds})}, autocast "
                 f"{sorted({f.get('autocast') for f in folds})}")


def print_table(report: Report, header: str) -> None:
    cols = ("model", "store", "model tiles/s/GPU", "pipeline /GPU", "ratio", "GPU util % (index:mean)", "window")
    rows = [cols, *report.rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    print(f"\n{header}")
    for r in rows:
        print("  ".join(str(v).rjust(w) if i >= 2 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    for line in report.failed:
        print(line)
    print(f"{len(report.notes)} checks passed, {len(report.failed)} failed")


def main() -> int:
    import psutil
    import torch

    from wsi.cluster import dask_client
    from wsi.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models and cohorts on CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this")
    args = parser.parse_args()
    started = time.perf_counter()
    setup = CPU_SMOKE if args.cpu_smoke else GPU
    n_gpus = 0 if args.cpu_smoke else torch.cuda.device_count()
    if not args.cpu_smoke and not n_gpus:
        print("no CUDA device: run this on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    device = "cuda" if n_gpus else "cpu"
    header = (f"{n_gpus} x {torch.cuda.get_device_name(0)}" if n_gpus else "CPU smoke run (figures meaningless)")
    header += f", torch {torch.__version__}, extract defaults: " + ", ".join(
        f"{k} {load_config()['extract'][k]}" for k in ("gpu_batch_size", "tasks_per_gpu", "tiles_per_task",
                                                       "pinned_mb", "precision"))
    print(header, flush=True)
    batch = int(load_config()["extract"]["gpu_batch_size"] if n_gpus else load_config()["extract"]["batch_size"])
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="wsi-gpu-bench-"))
    try:
        ckpts = {name: random_checkpoint(work, name) for name in setup.models}
        for name, ckpt in ckpts.items():
            check_precision_and_cosine(report, name, ckpt, device)
        model_tps = {name: model_rate(name, ckpt, device, batch, setup.model_seconds) for name, ckpt in ckpts.items()}
        cohorts = {codec: work / codec for codec in ("lossless", "jpeg")}
        t = time.perf_counter()
        for codec, folder in cohorts.items():
            write_cohort(folder, setup, codec)
        print(f"wrote 2 x {setup.slides * setup.tiles_per_slide} tiles in {time.perf_counter() - t:.0f} s", flush=True)
        cluster_cfg = {**load_config()["cluster"], "dashboard_address": ":0"}
        if n_gpus and psutil.virtual_memory().total < 64 << 30:
            # a microVM's memory grows as it is used, but Dask sizes its workers from what it reports at start
            cluster_cfg["memory_limit"] = 0
            print(f"memory reported {psutil.virtual_memory().total >> 30} GiB: workers run without a Dask memory "
                  "limit", flush=True)
        with dask_client(cluster_cfg) as client:
            check_cluster(report, client, n_gpus)
            address = client.scheduler_info()["address"]
            for name, ckpt in ckpts.items():
                for codec, folder in cohorts.items():
                    if time.perf_counter() - started > args.budget_s:
                        report.check(False, f"{name} {codec}: skipped, over the {args.budget_s:.0f} s budget")
                        continue
                    pipeline(report, client, address, name, ckpt, folder, codec, setup, n_gpus, model_tps[name])
            if time.perf_counter() - started > args.budget_s:
                report.check(False, f"MIL training: skipped, over the {args.budget_s:.0f} s budget")
            else:
                try:
                    mil_training(report, address, work, setup, n_gpus, len(client.scheduler_info()["workers"]))
                except Exception as e:  # the extraction figures above still print
                    report.check(False, f"MIL training raised {type(e).__name__}: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(report, f"{header}; {time.perf_counter() - started:.0f} s in all")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
