"""The GPU check: the GPU paths compared with the CPU, then timed, in one run that a session lent a GPU machine (one
H100) makes once, sized for under 8 minutes (not yet run on a GPU: none has been lent). ``--cpu`` runs the same
checks with CPU workers and tiny models on any machine in about a minute (CI runs it, ``.ci/run``). Run it through
``bench/gpu_check.sh``, which installs the wheels the GPU machine lacks and says how to fetch them. The exit status
is 1 when a check failed.

    bash bench/gpu_check.sh          # on the GPU machine
    bash bench/gpu_check.sh --cpu    # any machine: CPU workers against the CPU fp32 reference

Checks
------
1. Extraction: ``extract_cohort`` on a local Dask cluster (one worker per GPU, two tasks sharing it) over three
   small stores whose lengths leave ragged last batches (``gpu_batch_size`` 32, tasks of 64 tiles): ResNet-50
   raw, with Macenko, with Reinhard, and a ViT-S/16, in the precision ``auto`` picks (bf16 from compute
   capability 8; ``--cpu``: bf16 asked for), and ResNet-50 raw and the ViT again in fp32. Every feature row is
   compared with its own tile embedded alone on the CPU in fp32 (same weights, same stain fit, same
   preprocessing): a cosine of at least 0.99 (bf16) or 0.999 (fp32) for every row, so a fault in the GPU-side
   preprocessing or stain shows; and each row's nearest reference (after subtracting the references' mean) is
   its own tile's, so a row written from another tile's buffer shows.
2. MIL: one ABMIL fold trained in fp32 (no dropout, no subsampling: their masks are drawn on the device) on the
   device and on the CPU from the same initial weights: the test slides' probabilities agree within 1e-3, and so
   do the scores (probabilities, attention, tile scores) of every bag by the fold's weights on either device.

Timing (figures; the targets are printed beside them, not checked)
------------------------------------------------------------------
3. Per model (ResNet-50, ViT-L/16; ``--cpu``: timm's tiny test models): forward passes only (a ready batch of
   ``extract.gpu_batch_size`` normalised tiles on the GPU) and ``extract_cohort`` end to end with the shipped
   defaults over lossless and JPEG q90 stores, in the steady state (from the moment every worker has finished a
   task to the last; each task's tiles counted pro rata inside that window), with the GPU's utilisation
   (``nvidia-smi`` every 200 ms). Targets (issue 16): per H100, ResNet-50 >= 5,000 and ViT-L/16 >= 1,500 tiles/s
   end to end, at >= 0.85 of forward-only.
4. MIL: ``wsi.mil.train`` (ABMIL, 3 folds) on synthetic feature stores (``bench/mil.py``): training bags/s over the
   epochs after each fold's first.

Every figure and check goes to ``$OUT/gpu_check.json`` (``--out``) as soon as it is known, so a run cut short
still leaves what it measured; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MIN_COSINE = {"fp32": 0.999, "bf16": 0.99, "fp16": 0.99}
MIL_TOLERANCE = 1e-3
TARGETS = {"resnet50": 5000.0, "vit_large_patch16_224": 1500.0}  # tiles/s end to end per H100 (issue 16)
TARGET_RATIO = 0.85  # end to end over forward-only


@dataclass(frozen=True)
class Setup:
    """Sizes of a GPU run and of the CPU run."""

    check_models: tuple[str, str]      # (a ResNet, a ViT) for the extraction checks
    check_tile_px: int
    check_lengths: tuple[int, ...]     # tiles per check store: ragged against the batches and tasks
    reduced: str                       # the precision under test besides fp32
    timed_models: tuple[str, ...]
    slides: int                        # per timed cohort
    tiles_per_slide: int
    tiles_per_task: int | None         # None: the shipped default
    model_seconds: float
    mil_bags: int
    mil_tiles: int
    mil_dim: int
    mil_epochs: int


GPU = Setup(check_models=("resnet50", "vit_small_patch16_224"), check_tile_px=256, check_lengths=(150, 97, 61),
            reduced="auto", timed_models=("resnet50", "vit_large_patch16_224"), slides=6, tiles_per_slide=4096,
            tiles_per_task=None, model_seconds=4.0, mil_bags=48, mil_tiles=8000, mil_dim=1024, mil_epochs=4)
CPU = Setup(check_models=("test_resnet", "test_vit"), check_tile_px=64, check_lengths=(70, 37, 9), reduced="bf16",
            timed_models=("test_resnet",), slides=2, tiles_per_slide=64, tiles_per_task=32, model_seconds=0.5,
            mil_bags=8, mil_tiles=200, mil_dim=32, mil_epochs=2)
CHECK_BATCH, CHECK_TASK = 32, 64  # extraction checks: tiles per forward pass and per task


class Results:
    """Checks and figures, written to ``path`` (JSON) after each one."""

    def __init__(self, path: Path, header: str):
        self.path = path
        self.data = {"header": header, "checks": [], "timings": [], "seconds": 0.0}
        self.started = time.perf_counter()
        self.save()

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.data["checks"] if not c["ok"]]

    def check(self, ok: bool, what: str, **figures) -> None:
        self.data["checks"].append({"ok": bool(ok), "what": what, **figures, "at_s": self.elapsed()})
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        self.save()

    def timing(self, **row) -> None:
        self.data["timings"].append({**row, "at_s": self.elapsed()})
        print("     " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
        self.save()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def save(self) -> None:
        self.data["seconds"] = self.elapsed()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------ inputs
def random_checkpoint(folder: Path, name: str) -> Path:
    """Random weights of timm's ``name`` in a safetensors file, loaded as a user's checkpoint would be."""
    import timm
    import torch
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def he_tiles(n: int, tile_px: int, seed: int) -> np.ndarray:
    """``n`` distinct H&E-coloured tiles: pink and purple waves of random frequencies plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile_px, 0:tile_px]
    texture = (20 * np.sin(xx[None, :, :, None] / (3 + rng.random((n, 1, 1, 3)) * 9))
               * np.cos(yy[None, :, :, None] / (3 + rng.random((n, 1, 1, 3)) * 9)))
    return np.clip(rng.integers(120, 230, (n, 1, 1, 3)) + texture + rng.normal(0, 6, (n, tile_px, tile_px, 3)),
                   0, 255).astype(np.uint8)


def write_slide(out: Path, s: int, n_tiles: int, codec: str, tile_px: int, distinct: bool) -> None:
    """Store ``s{s}`` of ``n_tiles`` H&E-like tiles (each one different, or 64 repeated: a timing cohort's
    pixels need not all be held at once) at the shipped chunking."""
    from wsi.config import load_config
    from wsi.store import SlideAttrs, TileStoreWriter, TilingAttrs, store_path

    chunk = int(load_config()["tiling"]["chunk_tiles"])
    tiles = he_tiles(n_tiles if distinct else 64, tile_px, s)
    slide = SlideAttrs(source_path=f"s{s}.svs", source_size=1, source_mtime=0.0, backend="openslide", vendor=None,
                       width=n_tiles * 2 * tile_px, height=2 * tile_px, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                       objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=tile_px, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=2.0 * tile_px, stride_px_level0=2.0 * tile_px, effective_mpp=0.5,
                         min_tissue_fraction=0.25, store_pixels=True, codec=codec, quality=90, chunk_tiles=chunk,
                         tissue={}, wsi_version="bench")
    coords = np.stack([np.arange(n_tiles) * 2 * tile_px, np.zeros(n_tiles, int)], axis=1)
    w = TileStoreWriter.create(store_path(out, f"s{s}"), f"s{s}", slide, tiling, coords=coords,
                               tissue_fraction=np.ones(n_tiles))
    for lo in range(0, n_tiles, chunk):
        run = tiles[lo:lo + chunk] if distinct else np.roll(tiles, -lo, axis=0)[:min(chunk, n_tiles - lo)]
        w.write_tiles(lo, run)
    w.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
    w.commit()


def write_cohort(out: Path, lengths: list[int], codec: str, tile_px: int, distinct: bool) -> None:
    """Stores ``s0``, ``s1``... of ``lengths`` tiles: a store's codec runs in one thread, so large cohorts are
    written in parallel processes (each of which takes seconds to start), small ones here."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    args = ([out] * len(lengths), range(len(lengths)), lengths, [codec] * len(lengths), [tile_px] * len(lengths),
            [distinct] * len(lengths))
    if sum(lengths) * tile_px ** 2 < 1024 * 256 ** 2:
        list(map(write_slide, *args))
        return
    with ProcessPoolExecutor(min(len(lengths), 16), mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(write_slide, *args))


def cluster_config(address: str, **extract) -> dict:
    from wsi.config import load_config

    cfg = load_config()
    cfg["cluster"].update({"kind": "address", "address": address})
    cfg["extract"].update({"export_h5": False, **extract})
    return cfg


# ------------------------------------------------------------------------------------------ 1. extraction
def reference_rows(store, key: str, name: str, ckpt: Path, encoders: dict) -> np.ndarray:
    """Each tile of ``store`` embedded alone on the CPU in fp32, stain-normalised with the fit stored beside the
    features ``key`` (if any)."""
    import torch

    from wsi.features import load_encoder
    from wsi.features.stain import StainTransform

    if name not in encoders:
        encoders[name] = load_encoder(name, ckpt, device="cpu", precision="fp32")
    encoder = encoders[name]
    stain = store.feature_attrs(key).stain
    transform = StainTransform(stain, torch.device("cpu")) if stain else None
    tiles = store.read_tiles(0, store.n_tiles)
    with torch.inference_mode():
        return np.concatenate([encoder.features(torch.from_numpy(tile[None]), transform).numpy() for tile in tiles])


def compare_rows(rows: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """(least cosine of a row with its own reference, rows whose nearest reference after centring is another
    tile's)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cosine = float((unit(rows) * unit(reference)).sum(axis=1).min())
    centre = reference.mean(axis=0)
    nearest = (unit(rows - centre) @ unit(reference - centre).T).argmax(axis=1)
    return cosine, int((nearest != np.arange(len(rows))).sum())


def extraction_checks(results: Results, address: str, work: Path, setup: Setup) -> None:
    from wsi.features import ExtractConfig, extract_cohort
    from wsi.keys import feature_set
    from wsi.store import SlideStore, store_path

    cohort = work / "check"
    write_cohort(cohort, list(setup.check_lengths), "lossless", setup.check_tile_px, distinct=True)
    resnet, vit = setup.check_models
    ckpts = {name: random_checkpoint(work, name) for name in setup.check_models}
    runs = [(resnet, "none", setup.reduced), (resnet, "macenko", setup.reduced), (resnet, "reinhard", setup.reduced),
            (vit, "none", setup.reduced), (resnet, "none", "fp32"), (vit, "none", "fp32")]
    encoders, references = {}, {}
    for name, stain, precision in runs:
        key = feature_set(name, stain)
        what = f"extraction {key} ({precision})"
        for path in cohort.glob(f"stores/*.zarr/features/{key}"):
            shutil.rmtree(path)  # the reduced run's features, before the fp32 run of the same set
        cfg = cluster_config(address, encoder=name, checkpoint=str(ckpts[name]), stain=stain, precision=precision,
                             batch_size=CHECK_BATCH, gpu_batch_size=CHECK_BATCH, tiles_per_task=CHECK_TASK)
        started = time.perf_counter()
        try:
            summary = extract_cohort(cohort, ExtractConfig.from_config(cfg), progress=False)
        except Exception as e:  # the other runs still give their figures
            results.check(False, f"{what}: raised {type(e).__name__}: {e}")
            continue
        if summary.failed:
            results.check(False, f"{what}: failed slides {summary.failed}")
            continue
        seconds = time.perf_counter() - started
        cosines, misplaced, ran_in = [], 0, None
        for s in range(len(setup.check_lengths)):
            store = SlideStore.open(store_path(cohort, f"s{s}"))
            ran_in = store.feature_attrs(key).precision
            if (key, s) not in references:
                references[key, s] = reference_rows(store, key, name, ckpts[name], encoders)
            cosine, wrong = compare_rows(store.features(key), references[key, s])
            cosines.append(cosine)
            misplaced += wrong
        need = MIN_COSINE[ran_in]
        results.check(min(cosines) >= need and misplaced == 0,
                      f"{what}: ran in {ran_in}, least row cosine with its own tile alone on the CPU in fp32 "
                      f"{min(cosines):.5f} (>= {need}), rows nearer another tile {misplaced} of "
                      f"{sum(setup.check_lengths)}", model=name, stain=stain, precision=ran_in,
                      min_cosine=min(cosines), misplaced_rows=misplaced, seconds=round(seconds, 1))


# ------------------------------------------------------------------------------------------ 2. MIL
def mil_checks(results: Results, work: Path, device: str) -> None:
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE))
    from mil import ENCODER, make_stores  # bench/mil.py: synthetic feature stores and labels

    from wsi.config import load_config
    from wsi.mil import create_model, load_cohort, make_folds, train_fold
    from wsi.mil.models import model_config
    from wsi.mil.predict import Ensemble
    from wsi.mil.training import FoldTask, TrainParams
    from wsi.store import SlideStore

    out = work / "mil-check"
    labels = make_stores(out, 12, 150, 64)
    mil = load_config(overrides={"mil": {"hidden_dim": 32, "dropout": 0.0, "max_train_tiles": 10_000,
                                         "precision": "fp32", "epochs": 3, "folds": 3, "validation": "never"}})["mil"]
    cohort = load_cohort(out, labels, ENCODER)
    fold = make_folds(cohort, mil["folds"], mil["seed"], validation=mil["validation"])[0]
    by_id = {b.slide_id: b for b in cohort.bags}
    model = model_config("abmil", cohort.in_dim, len(cohort.classes), mil)
    test = {}
    for where in (device, "cpu"):
        run_dir = out / f"run-{where}"
        run_dir.mkdir(exist_ok=True)
        task = FoldTask(str(run_dir), 0, ENCODER, model, TrainParams.from_config(mil),
                        *(tuple(by_id[s] for s in ids) for ids in (fold.train, fold.val, fold.test)))
        test[where] = (run_dir, train_fold(task, device=where)["test"])
    gap = max(abs(a - b) for s in test["cpu"][1] for a, b in zip(test[device][1][s], test["cpu"][1][s]))
    results.check(gap <= MIL_TOLERANCE, f"MIL training on {device} vs CPU (fp32, same initial weights): test "
                                        f"probabilities differ by at most {gap:.2e} (<= {MIL_TOLERANCE})",
                  max_difference=gap)

    weights = load_file(test["cpu"][0] / "fold_0.safetensors")
    scores = {}
    for where in (device, "cpu"):
        net = create_model(**model)
        net.load_state_dict(weights)
        ensemble = Ensemble("check", "abmil", ENCODER, list(cohort.classes), cohort.in_dim, out, {},
                            [net.to(where).eval()], torch.device(where), "fp32")
        scores[where] = [ensemble.score_bag(SlideStore.open(b.store).features(ENCODER)) for b in cohort.bags]
    gap = max(float(np.abs(a - b).max()) for bag_a, bag_b in zip(scores[device], scores["cpu"])
              for a, b in zip(bag_a, bag_b))
    results.check(gap <= MIL_TOLERANCE, f"MIL prediction on {device} vs CPU (fp32): probabilities, attention and "
                                        f"tile scores of {len(cohort.bags)} bags differ by at most {gap:.2e}",
                  max_difference=gap)


# ------------------------------------------------------------------------------------------ 3, 4. timing
class GpuSampler:
    """``nvidia-smi`` utilisation samples, (time, percent) of GPU 0 every 200 ms, while the ``with`` block runs;
    without nvidia-smi (``--cpu``) it records nothing."""

    def __enter__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip():
                self.samples.append((time.time(), float(line)))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return round(statistics.fmean(inside), 1) if inside else None


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


def forward_rate(name: str, ckpt: Path, device: str, batch_size: int, seconds: float) -> float:
    """Tiles/s of bare forward passes of one ready normalised batch on ``device`` (the model's own limit)."""
    import torch

    from wsi.cluster import cudnn_benchmark
    from wsi.features import load_encoder

    enc = load_encoder(name, ckpt, device=device)
    x = torch.randn(batch_size, *enc.input_size, device=device).to(enc.dtype, memory_format=enc.memory_format)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), cudnn_benchmark(True):
        for _ in range(3):  # cuDNN picks its kernels here
            enc.forward(x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            enc.forward(x)
            n += batch_size
        sync()
        rate = n / (time.perf_counter() - start)
    del enc, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def pipeline_rate(results: Results, client, address: str, name: str, ckpt: Path, cohort: Path, codec: str,
                  setup: Setup, forward: float) -> None:
    from distributed import get_task_stream

    from wsi.features import ExtractConfig, extract_cohort

    cfg = cluster_config(address, encoder=name, checkpoint=str(ckpt))
    if setup.tiles_per_task:
        cfg["extract"]["tiles_per_task"] = setup.tiles_per_task
    for done in cohort.glob("stores/*.zarr/features"):
        shutil.rmtree(done)
    with GpuSampler() as gpu, get_task_stream(client) as stream:
        summary = extract_cohort(cohort, ExtractConfig.from_config(cfg), progress=False)
    tiles = sum(summary.results.values())  # tiles embedded
    if summary.failed or tiles != setup.slides * setup.tiles_per_slide:
        results.check(False, f"timing {name} {codec}: {tiles} tiles extracted, failed {summary.failed}")
        return
    rate, t0, t1, n_tasks = steady_rate(stream.data, int(cfg["extract"]["tiles_per_task"]))
    results.timing(model=name, store=codec, forward_tiles_per_s=round(forward), end_to_end_tiles_per_s=round(rate),
                   ratio=round(rate / forward, 3), gpu_util_percent=gpu.mean(t0, t1),
                   window_s=round(t1 - t0, 1), tasks=n_tasks, target_tiles_per_s=TARGETS.get(name),
                   target_ratio=TARGET_RATIO)


def mil_rate(results: Results, address: str, work: Path, setup: Setup) -> None:
    sys.path.insert(0, str(HERE))
    from mil import ENCODER, make_stores

    from wsi.config import load_config
    from wsi.mil import TrainConfig, train

    out = work / "mil-timing"
    labels = make_stores(out, setup.mil_bags, setup.mil_tiles, setup.mil_dim)
    cfg = load_config(overrides={
        "labels": str(labels), "extract": {"encoder": ENCODER}, "cluster": {"kind": "address", "address": address},
        "mil": {"model": "abmil", "run_name": "gpu_check", "folds": 3, "epochs": setup.mil_epochs, "min_epochs": 1,
                "patience": setup.mil_epochs, "bootstrap": 100}})
    with GpuSampler() as gpu:
        t0 = time.time()
        run_dir = train(out, TrainConfig.from_config(cfg), progress=False).outputs["model run"]
        t1 = time.time()
    folds = [json.loads(p.read_text()) for p in sorted(run_dir.glob("fold_*.json"))]
    bags = sum(f["n_train"] * (len(f["history"]) - 1) for f in folds)
    seconds = sum(e["train_seconds"] for f in folds for e in f["history"][1:])
    results.timing(model="abmil training", store=f"{setup.mil_tiles} x {setup.mil_dim}",
                   bags_per_s=round(bags / seconds, 1), gpu_util_percent=gpu.mean(t0, t1),
                   devices=sorted({f["device"] for f in folds}), autocast=sorted({f["autocast"] for f in folds}))


# ------------------------------------------------------------------------------------------ the run
def main() -> int:
    import psutil
    import torch

    from wsi.cluster import dask_client, gpu_resources
    from wsi.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU workers and tiny models (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."),
                        help="folder of gpu_check.json (default: $OUT)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip timings that would start after this")
    args = parser.parse_args()
    setup = CPU if args.cpu else GPU
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or pass --cpu", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    header = ("CPU workers, tiny models (figures meaningless)" if args.cpu else torch.cuda.get_device_name(0))
    header += f", torch {torch.__version__}"
    print(header, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out / "gpu_check.json", header)
    work = Path(tempfile.mkdtemp(prefix="wsi-gpu-check-"))
    cluster_cfg = {**load_config()["cluster"], "dashboard_address": ":0"}
    if args.cpu:
        cluster_cfg.update({"n_workers": 2, "threads_per_worker": 1})
        # the references here (tiny models, one tile a pass) run fastest on one thread: on a few shared cores,
        # threads waiting for each other made a pass some 40x slower
        torch.set_num_threads(1)
    elif psutil.virtual_memory().total < 64 << 30:
        # a microVM's memory grows as it is used, but Dask sizes its workers from what it reports at start
        cluster_cfg["memory_limit"] = 0
    try:
        # workers forked from a server that imported torch and both stages, as extract's and train's are: CUDA
        # must still start in each worker, on the GPU its CUDA_VISIBLE_DEVICES names
        with dask_client(cluster_cfg, preload=["wsi.features.extract", "wsi.mil.training"]) as client:
            address = client.scheduler_info()["address"]
            on_gpu = gpu_resources(client) is not None
            results.check(on_gpu != args.cpu, f"{len(client.scheduler_info()['workers'])} worker(s), GPU resource: "
                                              f"{on_gpu}")
            extraction_checks(results, address, work, setup)
            mil_checks(results, work, device)
            batch = int(load_config()["extract"]["batch_size" if args.cpu else "gpu_batch_size"])
            cohorts = {codec: work / codec for codec in ("lossless", "jpeg")}
            for codec, folder in cohorts.items():
                write_cohort(folder, [setup.tiles_per_slide] * setup.slides, codec, 256, distinct=False)
            for name in setup.timed_models:
                ckpt = random_checkpoint(work, name)
                forward = forward_rate(name, ckpt, device, batch, setup.model_seconds)
                for codec, folder in cohorts.items():
                    if results.elapsed() > args.budget_s:
                        results.check(False, f"timing {name} {codec}: skipped, over the {args.budget_s:.0f} s budget")
                        continue
                    pipeline_rate(results, client, address, name, ckpt, folder, codec, setup, forward)
            mil_rate(results, address, work, setup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        results.save()
    failed = results.failed
    print(f"\n{header}: {len(results.data['checks']) - len(failed)} checks passed, {len(failed)} failed, "
          f"{results.data['seconds']:.0f} s; figures in {results.path}")
    for check in failed:
        print("FAIL " + check["what"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
