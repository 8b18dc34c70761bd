"""GPU extraction check and benchmark: one short script to run as is on a machine with NVIDIA GPUs.

    python bench/gpu_extract.py [--tiles 32768] [--batch-size 256]

1. Checks the CUDA path of ``wsi.features``: bf16 autocast chosen by ``precision=auto``, model weights in
   channels_last, batches in pinned host memory, float32 finite output close to the fp32 model's (cosine), and a
   local Dask cluster with one worker per GPU, each seeing only its own device and advertising ``GPU=1``.
2. For ``resnet50`` and ``vit_large_patch16_224`` (random weights from a local file, 224 px tiles, bf16):
   * model: bare forward throughput of ready-made normalised batches already on the GPU (the GPU's limit);
   * pipeline: ``extract_cohort`` end to end (encoder loading on the worker included; cluster start-up not)
     over ``--tiles`` tiles in lossless and in JPEG q90 stores, with GPU utilisation sampled every 200 ms by
     ``nvidia-smi``;
   and prints tiles/s, pipeline / model, and mean GPU utilisation during the pipeline. When the pipeline is
   near the model's throughput and the GPU near 100 % busy, the GPU (not data loading) is the limit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODELS = ("resnet50", "vit_large_patch16_224")


def random_checkpoint(folder: Path, name: str) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def check_cuda_path(ckpt: Path) -> None:
    import torch

    from wsi.features import load_encoder

    enc = load_encoder("resnet50", ckpt, device="cuda")
    assert enc.precision == "bf16", f"precision auto on CUDA gave {enc.precision}"
    conv = enc.model.conv1.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last), "weights not channels_last"
    tiles = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    assert enc.prepare(tiles).is_pinned(), "host batch is not in pinned memory"
    bf16 = enc.embed(tiles, batch_size=32)
    fp32 = load_encoder("resnet50", ckpt, device="cuda", precision="fp32").embed(tiles, batch_size=32)
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all(), "bf16 features not finite float32"
    print(f"ok  bf16 autocast, channels_last weights, pinned batches; bf16 vs fp32 cosine min {cos.min():.4f}")
    del enc
    torch.cuda.empty_cache()


def _visible_devices() -> tuple:
    import os

    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()


def check_cluster(client) -> None:
    import torch

    from wsi.cluster import gpu_resources

    n_gpus = torch.cuda.device_count()
    workers = client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == n_gpus, f"{len(workers)} workers for {n_gpus} GPUs"
    assert gpu_resources(client) == {"GPU": 1}
    seen = client.run(_visible_devices)
    assert len({v[0] for v in seen.values()}) == n_gpus, f"workers share devices: {seen}"
    assert all(v[1] == 1 for v in seen.values()), f"a worker sees more than one GPU: {seen}"
    print(f"ok  {n_gpus} GPU worker(s), one device each, resources GPU=1: {sorted(seen.values())}")


def model_throughput(name: str, ckpt: Path, batch_size: int, seconds: float = 5.0) -> float:
    import torch

    from wsi.features import load_encoder

    enc = load_encoder(name, ckpt, device="cuda")
    x = torch.randn(batch_size, *enc.input_size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            enc.model(x)
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            enc.model(x)
            n += batch_size
        torch.cuda.synchronize()
        tps = n / (time.perf_counter() - start)
    del enc, x
    torch.cuda.empty_cache()
    return tps


def write_slide(out: Path, s: int, n_tiles: int, codec: str) -> None:
    """Store ``s{s}`` of ``n_tiles`` H&E-coloured 224 px tiles (64 distinct textures, repeated)."""
    from wsi.store import SlideAttrs, TileStoreWriter, TilingAttrs, store_path

    rng = np.random.default_rng(s)
    yy, xx = np.mgrid[0:224, 0:224]
    texture = (20 * np.sin(xx[None, :, :, None] / (3 + rng.random((64, 1, 1, 3)) * 9))
               * np.cos(yy[None, :, :, None] / (3 + rng.random((64, 1, 1, 3)) * 9)))
    distinct = np.clip(rng.integers(120, 230, (64, 1, 1, 3)) + texture + rng.normal(0, 6, (64, 224, 224, 3)),
                       0, 255).astype(np.uint8)
    slide = SlideAttrs(source_path=f"s{s}.svs", source_size=1, source_mtime=0.0, backend="openslide", vendor=None,
                       width=n_tiles * 448, height=448, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                       objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=224, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=448.0, stride_px_level0=448.0, effective_mpp=0.5, min_tissue_fraction=0.25,
                         store_pixels=True, codec=codec, quality=90, chunk_tiles=32, tissue={}, wsi_version="bench")
    coords = np.stack([np.arange(n_tiles) * 448, np.zeros(n_tiles, int)], axis=1)
    w = TileStoreWriter.create(store_path(out, f"s{s}"), f"s{s}", slide, tiling, coords=coords,
                               tissue_fraction=np.ones(n_tiles))
    for lo in range(0, n_tiles, 32):
        w.write_tiles(lo, distinct[lo % 64:][:32])
    w.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
    w.commit()


def write_cohort(out: Path, n_tiles: int, codec: str, n_slides: int = 8) -> None:
    """``n_tiles`` tiles over ``n_slides`` stores, written in parallel processes (the tile codec is serial)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    per_slide = n_tiles // n_slides // 32 * 32
    with ProcessPoolExecutor(n_slides, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(write_slide, [out] * n_slides, range(n_slides), [per_slide] * n_slides,
                      [codec] * n_slides))


class GpuSampler:
    """``nvidia-smi`` utilisation samples (percent, every 200 ms) while the ``with`` block runs."""

    def __enter__(self):
        self.samples: list[float] = []
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "200"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip():
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()

    def mean(self) -> float:
        # the first and last samples straddle start-up (model loading) and completion
        inner = self.samples[2:-2] or self.samples
        return statistics.fmean(inner) if inner else float("nan")


def pipeline(name: str, ckpt: Path, cohort: Path, batch_size: int, address: str) -> tuple[float, float]:
    """End-to-end tiles/s on the running cluster (the encoder loads on the workers inside the timing)."""
    from wsi.config import load_config
    from wsi.features import extract_cohort

    cfg = load_config()
    cfg["cluster"].update({"kind": "address", "address": address})
    cfg["extract"].update({"encoder": name, "checkpoint": str(ckpt), "batch_size": batch_size,
                           "tiles_per_task": 2048, "export_h5": False})
    for features in cohort.glob("stores/*.zarr/features"):
        shutil.rmtree(features)
    with GpuSampler() as gpu:
        t = time.perf_counter()
        summary = extract_cohort(cohort, cfg, progress=False)
        elapsed = time.perf_counter() - t
    assert not summary.failed, summary.causes
    return summary.n_tiles / elapsed, gpu.mean()


def main() -> None:
    import torch

    from wsi.cluster import dask_client

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=32768, help="tiles per cohort (8 stores)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="wsi-gpu-bench-"))
    try:
        ckpts = {name: random_checkpoint(work, name) for name in MODELS}
        check_cuda_path(ckpts["resnet50"])
        t = time.perf_counter()
        cohorts = {codec: work / codec for codec in ("lossless", "jpeg")}
        for codec, folder in cohorts.items():
            write_cohort(folder, args.tiles, codec)
        print(f"wrote 2 x {args.tiles} tiles in {time.perf_counter() - t:.0f} s")
        with dask_client({"kind": "local", "dashboard_address": ":0"}) as client:
            check_cluster(client)
            address = client.scheduler_info()["address"]
            print(f"\n{'model':24s} {'model tiles/s':>13s} {'store':>9s} {'pipeline tiles/s':>16s} {'ratio':>6s} "
                  f"{'GPU util %':>10s}")
            for name, ckpt in ckpts.items():
                model_tps = model_throughput(name, ckpt, args.batch_size)
                for codec, folder in cohorts.items():
                    tps, util = pipeline(name, ckpt, folder, args.batch_size, address)
                    print(f"{name:24s} {model_tps:13.0f} {codec:>9s} {tps:16.0f} {tps / model_tps:6.2f} "
                          f"{util:10.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
