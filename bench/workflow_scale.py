"""Workflow scale benchmark: how long `snakemake -n` takes to plan a cohort of 1,000 to 10,000 slides.

    python bench/workflow_scale.py [--sizes 1000 5000 10000] [--baseline /work/main --baseline-sizes 250 500]

Makes (under bench/out/scale/, reused) one small synthetic slide and, per size, a folder of that many hard
links to it plus a labels table naming every slide, then times a dry run of the whole workflow (mode train,
the default profile) in a fresh Snakemake process: wall seconds, CPU seconds of the process, jobs planned.
At the largest size it also dry-runs with the SLURM profile and prints the job count per rule (what a site's
scheduler would receive). ``--baseline`` times another checkout's Snakefile on the same folders, so a before /
after ratio comes from one run. The planning must grow linearly with slides: the seconds per 1,000 slides
should stay flat across sizes.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def cohort(root: Path, n: int) -> Path:
    """``root/<n>/`` with ``slides/`` (n hard links to one slide), ``labels.csv`` and ``config.yaml``."""
    from wsi_synth import write_synthetic_slide

    source = root / "source.svs"
    if not source.exists():
        write_synthetic_slide(source, width=2048, height=1536, mpp=0.5, seed=0, tumour_tiles=1)
    folder = root / str(n)
    slides = folder / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i:06d}" for i in range(n)]
    for slide_id in ids:
        link = slides / f"{slide_id}.svs"
        if not link.exists():
            os.link(source, link)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["slide_id", "label"])
        writer.writerows([s, "tumour" if i % 2 else "normal"] for i, s in enumerate(ids))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "slides_dir": str(slides), "labels": str(folder / "labels.csv"), "out_dir": str(folder / "out")}))
    return folder


def dry_run(snakefile: Path, folder: Path, *extra: str) -> tuple[float, float, dict[str, int]]:
    """(wall s, CPU s, jobs per rule) of one `snakemake -n` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--snakefile", str(snakefile),
                           "--directory", str(folder), "--configfile", str(folder / "config.yaml"), *extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(snakefile.parent)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed in {folder}:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), job_counts(proc.stdout)


def job_counts(text: str) -> dict[str, int]:
    """Rule -> jobs from the 'Job stats' table of a dry run."""
    counts, in_table = {}, False
    for line in text.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
            if parts[0] == "total":
                break
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--baseline", type=Path, help="another checkout whose Snakefile to time as well")
    parser.add_argument("--baseline-sizes", type=int, nargs="+", default=[250, 500])
    parser.add_argument("--root", type=Path, default=HERE / "out" / "scale")
    args = parser.parse_args()

    print(f"{'snakefile':<10} {'slides':>7} {'wall s':>8} {'CPU s':>8} {'CPU s / 1,000 slides':>21} {'jobs':>6}")
    rows = []
    for label, snakefile, sizes in [("this", REPO / "Snakefile", args.sizes),
                                    *([("baseline", args.baseline / "Snakefile", args.baseline_sizes)]
                                      if args.baseline else [])]:
        for n in sizes:
            wall, cpu, jobs = dry_run(snakefile, cohort(args.root, n))
            rows.append((label, n, cpu))
            print(f"{label:<10} {n:>7,} {wall:>8.1f} {cpu:>8.1f} {1000 * cpu / n:>21.2f} {jobs.get('total', 0):>6}",
                  flush=True)
    ours = [(n, cpu) for label, n, cpu in rows if label == "this"]
    if len(ours) > 1:
        (n0, c0), (n1, c1) = ours[0], ours[-1]
        print(f"linearity: CPU x{c1 / c0:.2f} for slides x{n1 / n0:.0f}")

    largest = cohort(args.root, max(args.sizes))
    _, _, jobs = dry_run(REPO / "Snakefile", largest, "--profile", str(REPO / "configs" / "slurm"))
    print(f"SLURM profile, {max(args.sizes):,} slides: " + ", ".join(f"{k} {v}" for k, v in jobs.items()))


if __name__ == "__main__":
    main()
