"""Before/after check for refactors: run the demo into a folder with one checkout, again with another, and compare.

``python bench/diff_outputs.py run DIR [--repo CHECKOUT]`` runs, with ``CHECKOUT``'s code on ``PYTHONPATH``
(default: this one):

1. the README's demo (``snakemake --configfile configs/demo.yaml``: the synthetic cohort, tile, extract, train,
   predict, heatmaps, report) into ``DIR/demo``;
2. high-res heatmaps of two of its slides, whose finer grid of tiles is read from the slide files themselves, into
   ``DIR/demo/out/heatmaps/<run>/<slide>/high_res``: ``wsi extract --high-res``, ``wsi predict`` and
   ``wsi heatmap --high-res`` where the checkout has ``wsi/features/fine_grid.py`` (the stages meet in the store),
   ``wsi heatmap --high-res`` alone before that.

``python bench/diff_outputs.py compare BEFORE AFTER`` compares every file under the two folders and prints one
line per difference; exit status 1 when there is any. The same code on the same machine gives no difference:
tiling, extraction, training (seeded, single-threaded folds) and painting are deterministic on the CPU.

What it compares, and what it ignores (each ignored item legitimately differs between two runs of one code):

* **files present**: the same relative paths on both sides, except Snakemake's and the workflow's bookkeeping
  (``.snakemake/``, ``out/logs/``, ``out/.wsi/``: job files named by a digest of the config, which holds the
  folder's absolute path, ``*.lock``).
* **Zarr stores**: every chunk file byte for byte (tiles, coordinates, masks, features, scores); each
  ``zarr.json`` as JSON, without the provenance keys below.
* **JSON files** (status, ``run.json``, ``heatmap.json``, ``metrics.json``...): as JSON, without the
  provenance keys below; a status file's ``items`` sorted by slide id (extraction lists slides in the order
  their Dask tasks finish).
* **safetensors weights**: every tensor's bytes and the metadata as a mapping (its key order in the header
  varies from run to run).
* **CSV files**: as text, with ``failures.csv``'s ``time`` column dropped.
* **HDF5 exports**: every dataset's values and every attribute.
* **TIFF files**: every page's pixels (tags such as ``DateTime`` and ``Software`` are not compared).
* **PNG files**: the decoded pixels.
* **report.html**: as text, with dates and times replaced by a placeholder.
* **everything else** (the synthetic slides, DICOM files...): byte for byte.

Provenance keys, dropped from JSON wherever they appear: ``time``, ``started``, ``finished``, ``seconds`` and
any key ending in ``_seconds`` (wall-clock timings), ``created``, ``source_mtime`` (a file's modification time),
``wsi_version``; and in every text compared, the run folder's own absolute path is replaced by ``<DIR>``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IGNORED_DIRS = (".snakemake", "demo/out/logs", "demo/out/.wsi")
PROVENANCE_KEYS = {"time", "started", "finished", "seconds", "created", "source_mtime", "wsi_version"}
HIGH_RES_SLIDES = 2
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?(\.\d+)?")


# --------------------------------------------------------------------------------------------------- run
def run(folder: Path, repo: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    config = repo / "configs" / "demo.yaml"
    # started in ``folder``: ``python -m`` puts its working folder ahead of PYTHONPATH, so from a checkout's root the
    # Snakefile would import that checkout's wsi, not ``repo``'s
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(folder),
                    "--cores", "2", "--configfile", str(config)], env=env, check=True, cwd=folder)
    out = folder / "demo" / "out"
    runs = sorted(p.name for p in (out / "models").iterdir() if not p.name.startswith("."))
    slides = sorted(p.name[:-len(".zarr")] for p in (out / "stores").glob("*.zarr"))[:HIGH_RES_SLIDES]
    common = ["--out", str(out), "--config", str(config), "--no-progress"]
    if (repo / "wsi" / "features" / "fine_grid.py").exists():
        subprocess.run([sys.executable, "-m", "wsi.cli", "extract", *common, "--high-res", *slides], env=env,
                       check=True, cwd=folder)
        subprocess.run([sys.executable, "-m", "wsi.cli", "predict", *common, "--model", str(out / "models" / runs[0])],
                       env=env, check=True, cwd=folder)
    subprocess.run([sys.executable, "-m", "wsi.cli", "heatmap", *common, "--model-run", runs[0], "--high-res",
                    *slides], env=env, check=True, cwd=folder)


# ----------------------------------------------------------------------------------------------- compare
def _files(folder: Path) -> set[str]:
    files = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not path.name.endswith(".lock") \
                and not any(rel == d or rel.startswith(d + "/") for d in IGNORED_DIRS):
            files.add(rel)
    return files


def _strip(value, root: str):
    """JSON without provenance keys, with the run folder's path replaced by ``<DIR>``."""
    if isinstance(value, dict):
        return {k: _strip(v, root) for k, v in value.items()
                if k not in PROVENANCE_KEYS and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_strip(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<DIR>")
    return value


def _json_diff(a, b, where: str = "") -> str | None:
    """The first key path where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}/{k}: only in {'after' if k not in a else 'before'}"
            d = _json_diff(a[k], b[k], f"{where}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _json_diff(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {str(a)[:80]} != {str(b)[:80]}"


def _json(path: Path, rel: str):
    doc = json.loads(path.read_text())
    if rel.startswith("demo/out/status/") and isinstance(doc.get("items"), list):
        doc["items"] = sorted(doc["items"], key=lambda item: str(item.get("slide_id")))
    return doc


def _text(path: Path, root: str) -> str:
    return path.read_text(errors="replace").replace(root, "<DIR>")


def _csv_rows(path: Path, root: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(_text(path, root))))
    return [{k: v for k, v in r.items() if not (path.name == "failures.csv" and k == "time")} for r in rows]


def _h5_diff(a: Path, b: Path) -> str | None:
    import h5py

    with h5py.File(a) as fa, h5py.File(b) as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)  # append returns None, so the visit goes on to every object
        fb.visit(names_b.append)
        if sorted(names_a) != sorted(names_b):
            return f"objects {sorted(names_a)} != {sorted(names_b)}"
        for name in [""] + sorted(names_a):
            oa, ob = (fa[name], fb[name]) if name else (fa, fb)
            attrs_a = {k: np.asarray(v).tolist() for k, v in oa.attrs.items()}
            attrs_b = {k: np.asarray(v).tolist() for k, v in ob.attrs.items()}
            if attrs_a != attrs_b:
                return f"{name or '/'} attrs differ"
            if isinstance(oa, h5py.Dataset) and not np.array_equal(oa[()], ob[()]):
                return f"{name} values differ"
    return None


def _tiff_diff(a: Path, b: Path) -> str | None:
    import tifffile

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        pages_a = [p for s in ta.series for level in s.levels for p in level.pages]
        pages_b = [p for s in tb.series for level in s.levels for p in level.pages]
        if len(pages_a) != len(pages_b):
            return f"{len(pages_a)} != {len(pages_b)} pages"
        for i, (pa, pb) in enumerate(zip(pages_a, pages_b)):
            if not np.array_equal(pa.asarray(), pb.asarray()):
                return f"page {i} pixels differ"
    return None


def _safetensors_diff(a: Path, b: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(a, "numpy") as fa, safe_open(b, "numpy") as fb:
        if fa.metadata() != fb.metadata():
            return "metadata differs"
        if sorted(fa.keys()) != sorted(fb.keys()):
            return "tensor names differ"
        differing = [k for k in fa.keys() if not np.array_equal(fa.get_tensor(k), fb.get_tensor(k))]
    return f"tensors differ: {differing[:5]}" if differing else None


def _png_diff(a: Path, b: Path) -> str | None:
    from PIL import Image

    return None if np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) else "pixels differ"


def file_diff(rel: str, before: Path, after: Path) -> str | None:
    """Why ``rel`` differs between the two folders, or None."""
    a, b = before / rel, after / rel
    name = Path(rel).name
    if name.endswith(".json"):
        return _json_diff(*(_strip(_json(path, rel), str(root)) for path, root in ((a, before), (b, after))))
    if name.endswith(".csv"):
        return None if _csv_rows(a, str(before)) == _csv_rows(b, str(after)) else "rows differ"
    if name.endswith(".h5"):
        return _h5_diff(a, b)
    if name.endswith((".tif", ".tiff")) and "/slides/" not in f"/{rel}":
        return _tiff_diff(a, b)
    if name.endswith(".safetensors"):
        return _safetensors_diff(a, b)
    if name.endswith(".png"):
        return _png_diff(a, b)
    if name.endswith(".html"):
        return None if _DATE.sub("<DATE>", _text(a, str(before))) == _DATE.sub("<DATE>", _text(b, str(after))) \
            else "text differs (dates and the run folder aside)"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def compare(before: Path, after: Path) -> list[str]:
    files_a, files_b = _files(before), _files(after)
    lines = [f"only before: {rel}" for rel in sorted(files_a - files_b)]
    lines += [f"only after: {rel}" for rel in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        why = file_diff(rel, before, after)
        if why:
            lines.append(f"differs: {rel}: {why}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the demo and high-res heatmaps into DIR")
    p.add_argument("folder", type=Path)
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose code runs (default: this one)")
    p = sub.add_parser("compare", help="compare two run folders")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.folder.resolve(), args.repo.resolve())
        return 0
    lines = compare(args.before.resolve(), args.after.resolve())
    print("\n".join(lines) if lines else "no differences")
    files = len(_files(args.before.resolve()))
    print(f"compared {files} files: {len(lines)} difference(s)", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
