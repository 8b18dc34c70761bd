"""The demo's cohort: a few labelled synthetic SVS slides with patients, written in seconds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from wsi.errors import ConfigError

from .writers import write_synthetic_slide


def make_demo_cohort(outdir, *, n_slides: int = 8, seed: int = 0,
                     field_mm: tuple[float, float] = (2.8, 2.2)) -> Path:
    """Write ``outdir/slides/<slide_id>.svs`` and ``outdir/labels.csv`` (``slide_id,label,patient_id``).

    Labels are balanced ``normal``/``tumour``; tumour slides carry 3-6 small foci of about one tile each (few
    positives among many tiles, like lymph-node metastases). Each slide shows ``field_mm`` (width, height) of glass;
    the default gives about 100-130 tissue tiles of 256 px at 0.5 um/px (2 x 1.6 mm is the smallest that always has
    room for 6 foci). Scanners are mixed as in a real cohort: every fourth slide from the second on is 0.25 um/px
    (40x, so tiling at 0.5 um/px area-averages), the rest 0.5 um/px (20x); all have levels 1, 4, 16. The default 8
    slides take about 30 s of CPU to write. From 3 slides on, slides 1 and 2 belong to one patient (and from 7 on,
    slides 5 and 6 to another), so patient-grouped cross-validation matters. Deterministic for a ``seed``; returns
    the labels path.
    """
    outdir = Path(outdir)
    if n_slides < 2:
        raise ConfigError(outdir, f"a demo cohort needs at least 2 slides (one per label), got {n_slides}")
    rng = np.random.default_rng([seed, 0xC0407])
    labels = ["tumour"] * (n_slides // 2) + ["normal"] * (n_slides - n_slides // 2)
    labels = [labels[i] for i in rng.permutation(n_slides)]
    patients = _patients(n_slides)
    rows = []
    for i in range(n_slides):
        slide_id = f"demo_{i + 1:03d}"
        mpp = 0.25 if i % 4 == 1 else 0.5
        write_synthetic_slide(outdir / "slides" / f"{slide_id}.svs", width=round(field_mm[0] * 1000 / mpp),
                              height=round(field_mm[1] * 1000 / mpp), mpp=mpp, downsamples=(1, 4, 16),
                              seed=int(rng.integers(2 ** 31)),
                              tumour_tiles=int(rng.integers(3, 7)) if labels[i] == "tumour" else 0,
                              pen_marks=bool(rng.random() < 0.4), specks=bool(rng.random() < 0.5))
        rows.append({"slide_id": slide_id, "label": labels[i], "patient_id": patients[i]})
    labels_path = outdir / "labels.csv"
    with open(labels_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label", "patient_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return labels_path


def _patients(n_slides: int) -> list[str]:
    """Patient ids in slide order: slides 1+2 share one from 3 slides on, slides 5+6 from 7 on."""
    shared = ({1: 0} if n_slides >= 3 else {}) | ({5: 4} if n_slides >= 7 else {})
    owner: list[int] = []
    for i in range(n_slides):
        owner.append(owner[shared[i]] if i in shared else len(set(owner)))
    return [f"P{o + 1:03d}" for o in owner]
