"""Input checks that run before any job starts, in the workflow (at parse time) and in the CLI.

Each check raises a :class:`~wsi.errors.ConfigError` that prints as one line: the config key or file, what
is wrong, what to do. They read only small files (the slides folder listing, the labels CSV, ``run.json``),
so a wrong input stops a 10,000-slide run in a second instead of after hours of tiling.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from .errors import ConfigError, format_ids
from .slide import SLIDE_SUFFIXES, expand_slide_paths, slide_id_from_path

# A class this small next to a bigger one with a near-identical name is a typo, not a class ("tumor" on 3
# slides beside "tumour" on 200 would silently become a third class, or fail training as a class of one).
TINY_CLASS_SHARE = 0.1
NEAR_MISS_RATIO = 0.8
CV_MODES = ("patient", "site", "leave_one_site_out")  # mil.cv: what the cross-validation folds keep whole


def check_slides_dir(slides_dir, key: str = "slides_dir") -> dict[str, Path]:
    """``{slide_id: path}`` of the slides in ``slides_dir`` (one scan); a missing or slide-less folder is an
    error naming ``key``."""
    folder = Path(slides_dir)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(folder, f"{key} {what}", f"set {key} to the folder that holds your slides")
    slides = {slide_id_from_path(p): p for p in expand_slide_paths([folder])}
    if not slides:
        raise ConfigError(folder, f"{key} holds no slides",
                          f"expected files ending in {', '.join(SLIDE_SUFFIXES)} or DICOM subfolders of .dcm files")
    return slides


def read_label_rows(labels, columns=("slide_id", "label")) -> list[tuple]:
    """The ``columns`` (default slide_id, label) of every row of the labels CSV, None for an optional column the
    table lacks; the full checks are :func:`wsi.mil.read_labels`'s."""
    path = Path(labels)
    if not path.is_file():
        raise ConfigError(path, "labels file does not exist", "set labels to a CSV slide_id,label[,patient_id]")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            fields = [c.strip() for c in reader.fieldnames or []]
            if not {"slide_id", "label"} <= set(fields):
                raise ConfigError(path, f"labels file needs the columns slide_id,label; it has {fields}")
            reader.fieldnames = fields
            return [tuple((r[c] or "").strip() if c in fields else None for c in columns) for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(path, f"labels file is not a readable CSV: {e}") from e


def near_miss_labels(counts: Counter) -> list[str]:
    """One sentence per tiny class whose name is nearly another, bigger class's (``tumor`` vs ``tumour``)."""
    largest = max(counts.values(), default=0)
    found = []
    for name, n in sorted(counts.items(), key=lambda kv: kv[1]):
        if n > max(2, TINY_CLASS_SHARE * largest):
            continue
        for other, m in counts.most_common():
            if other != name and m > n and (other.lower() == name.lower() or difflib.SequenceMatcher(
                    None, name.lower(), other.lower()).ratio() >= NEAR_MISS_RATIO):
                found.append(f"label {name!r} ({n} slide(s)) looks like a typo of {other!r} ({m} slide(s))")
                break
    return found


def check_labels(labels, slide_ids, *, classes=None, skip_missing: bool = False,
                 where: str = "slides_dir") -> list[str]:
    """Check the labels table against the cohort's ``slide_ids``; return the labelled ids not in it when
    ``skip_missing`` lets training go on without them.

    Errors: labelled ids that are not slides (listed, with the nearest slide id as a hint), and near-miss class
    names (unless ``classes`` lists the classes explicitly)."""
    path = Path(labels)
    rows = read_label_rows(path)
    if classes is None:
        typos = near_miss_labels(Counter(label for _, label in rows if label))
        if typos:
            raise ConfigError(path, "; ".join(typos),
                              "correct the label, or list every class in mil.classes if they really differ")
    known = set(slide_ids)
    unknown = [s for s, _ in rows if s and s not in known]
    if unknown and not skip_missing:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f"did you mean {close[0]!r} for {unknown[0]!r}? " if close else ""
        raise ConfigError(path, f"{len(unknown)} labelled slide id(s) are not slides in {where}: "
                                f"{format_ids(unknown)}",
                          f"{hint}fix the ids or add the slides; mil.skip_missing: true trains without them")
    return unknown


def check_sites(labels, sites: list, slide_ids: list, *, cv: str = "patient", calibration: str = "temperature") -> None:
    """The labels table's site column (``sites``, None per slide without one) is usable: no empty value; for
    ``mil.cv`` ``site`` or ``leave_one_site_out`` a site column with at least two sites; for ``mil.calibration:
    site`` a site column."""
    path = Path(labels)
    empty = [s for s, site in zip(slide_ids, sites) if site is not None and not str(site).strip()]
    if empty:
        raise ConfigError(path, f"column site is empty for {len(empty)} slide(s): {format_ids(empty)}",
                          "fill in every slide's site (the institution or scanner it comes from), or drop the "
                          "site column")
    found = sorted({s for s in sites if s is not None})
    if calibration == "site" and not found:
        raise ConfigError(path, "mil.calibration is site, and the labels table has no site column",
                          "add a site column (the institution or scanner of each slide), or set mil.calibration: "
                          "temperature")
    if cv == "patient":
        return
    if not found:
        raise ConfigError(path, f"mil.cv is {cv} and the labels file has no site column",
                          "add a site column (slide_id,label,site), or set mil.cv: patient")
    if len(found) < 2:
        raise ConfigError(path, f"mil.cv is {cv} and column site names one site only ({found[0]!r})",
                          "add slides of other sites, or set mil.cv: patient")


def check_model_dir(model_dir, key: str = "model_dir") -> dict:
    """``run.json`` of a complete model run in ``model_dir``; anything else is an error naming ``key``."""
    folder = Path(model_dir)
    hint = f"set {key} to OUT/models/<run> of a finished training"
    if not folder.is_dir():
        raise ConfigError(folder, f"{key} does not exist" if not folder.exists() else f"{key} is not a folder", hint)
    run_json = folder / "run.json"
    try:
        info = json.loads(run_json.read_text())
    except FileNotFoundError:
        raise ConfigError(folder, f"{key} is not a complete model run (no run.json)", hint) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(run_json, f"run.json is not valid JSON: {e}", "re-run the training") from e
    missing = [f["weights"] for f in info.get("folds", []) if not (folder / f["weights"]).is_file()]
    if info.get("complete") is not True or not info.get("folds") or missing:
        raise ConfigError(folder, f"{key} is an incomplete model run"
                          + (f" (missing {format_ids(missing)})" if missing else ""), "re-run the training")
    return info


def check_out_dir(out_dir, key: str = "out_dir") -> Path:
    """``out_dir``, created if needed; a path that cannot be a writable folder is an error naming ``key``."""
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wsi-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(folder, f"{key} cannot be created or written: {e.strerror or e}",
                          f"set {key} to a writable folder") from None
    return folder


def check_workflow_inputs(config: dict) -> dict[str, Path]:
    """Every check the workflow's mode needs, before Snakemake builds its jobs; returns the slides.

    Every mode: ``out_dir`` and the slides; predict: ``model_dir``; train: the labels table against the slides;
    train and predict: the labels table's site column (and in train, that ``mil.cv`` finds the sites it needs).
    """
    mode = config["mode"]
    check_out_dir(config["out_dir"])
    if mode == "predict":
        if not config.get("model_dir"):
            raise ConfigError(None, "mode predict needs model_dir", "set model_dir to OUT/models/<run>")
        check_model_dir(config["model_dir"])
    if mode == "train" and not config.get("labels"):
        raise ConfigError(None, "mode train needs a labels table", "set labels to a CSV slide_id,label[,patient_id]")
    slides = check_slides_dir(config["slides_dir"])
    if mode == "train":
        mil = config["mil"]
        skipped = check_labels(config["labels"], slides, classes=mil.get("classes"),
                               skip_missing=bool(mil.get("skip_missing")), where=f"slides_dir {config['slides_dir']}")
        if skipped:
            print(f"wsi: {len(skipped)} labelled slide(s) are not in slides_dir and are left out "
                  f"(mil.skip_missing): {format_ids(skipped)}", file=sys.stderr)
    if mode != "features" and config.get("labels"):  # predict: a labels table validates the run externally
        rows = read_label_rows(config["labels"], ("slide_id", "site"))
        check_sites(config["labels"], [site for _, site in rows], [s for s, _ in rows],
                    cv=config["mil"]["cv"] if mode == "train" else "patient",
                    calibration=config["mil"]["calibration"] if mode == "train" else "temperature")
    return slides
