"""What the viewer reads from OUT, read-only: the cohort table and each slide's store, scores and thumbnail.

Slides are known by id only; an id is served when it is one of the run's slides (a store under ``stores/``,
a row of ``predictions/<run>/predictions.csv`` or ``models/<run>/cv_predictions.csv``, or a row of
``failures.csv``). Paths are built from ids through :class:`wsi.layout.Layout` and from the store's own
attrs, never from a request.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import WsiError
from ..keys import qc_flag_bits
from ..layout import Layout
from ..store import SlideStore
from .tiles import TILE_PX, SlideTiles

THUMB_PX = 192  # the cohort table's thumbnails, longest side


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def newest_run(layout: Layout) -> str | None:
    """The run whose predictions.csv was written last, or None before any prediction."""
    runs = sorted(layout.predictions_csvs(), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.name if runs else None


def tumour_class(classes) -> str:
    """The class the heatmap paints: ``tumour`` when the run has one, else the last (the positive) class."""
    classes = [str(c) for c in classes]
    return "tumour" if "tumour" in classes else classes[-1]


def _call(row: dict, classes: list[str]) -> tuple[str, float | None]:
    """(predicted class, its probability) of a predictions row; cv_predictions.csv has no ``predicted``
    column: its most probable class."""
    try:
        probabilities = {c: float(row[f"prob_{c}"]) for c in classes}
    except (KeyError, ValueError):
        return row.get("predicted", ""), None
    predicted = row.get("predicted") or max(probabilities, key=probabilities.get)
    return predicted, probabilities.get(predicted)


class Outputs:
    """The cohort of one model run under OUT; stores open on first use and stay open."""

    def __init__(self, out_dir, run: str | None = None):
        self.layout = Layout(Path(out_dir).resolve())
        self.run = run or newest_run(self.layout)
        self._stores: dict[str, SlideStore | WsiError] = {}
        self._tiles: dict[str, SlideTiles] = {}
        self._lock = threading.Lock()
        self.rows = self._cohort_rows()
        self._rows_by_id = {r["slide_id"]: r for r in self.rows}
        self.ids = frozenset(self._rows_by_id)

    # ---------------------------------------------------------------- the cohort table
    def _cohort_rows(self) -> list[dict]:
        layout, run = self.layout, self.run
        final = {r["slide_id"]: r for r in _read_csv(layout.predictions_csv(run))} if run else {}
        oof = {r["slide_id"]: r for r in _read_csv(layout.run_dir(run) / "cv_predictions.csv")} if run else {}
        run_info = json.loads((layout.run_dir(run) / "run.json").read_text()) \
            if run and (layout.run_dir(run) / "run.json").is_file() else {}
        labels = {r["slide_id"]: r for r in _read_csv(Path(run_info["labels"]))} if run_info.get("labels") else {}
        classes = [str(c) for c in run_info.get("classes", [])] or [
            k[len("prob_"):] for k in next(iter(final.values()), {}) if k.startswith("prob_")]
        failures: dict[str, list[str]] = {}
        for f in _read_csv(layout.failures):
            failures.setdefault(f["slide_id"], []).append(f"{f['stage']}: {f['cause']}")
        stores = set(layout.store_ids())
        rows = []
        for sid in sorted(stores | set(final) | set(oof) | set(failures)):
            # a slide of the training cohort is shown with its out-of-fold call: the final model trained on it
            call_row, source = (oof[sid], "out-of-fold") if sid in oof else (final.get(sid), "final")
            predicted, probability = _call(call_row, classes) if call_row else ("", None)
            label = (labels.get(sid) or oof.get(sid) or {}).get("label", "")
            flagged = (final.get(sid) or {}).get("ood", "")
            rows.append({
                "slide_id": sid, "label": label, "predicted": predicted, "probability": probability,
                "source": source if call_row else "", "wrong": bool(label and predicted and label != predicted),
                "site": (labels.get(sid) or {}).get("site", ""), "failures": "; ".join(failures.get(sid, [])),
                "ood": flagged == "True" if flagged else None, "has_store": sid in stores,
            })
        return rows

    def cohort_json(self) -> bytes:
        has_ood = any(r["ood"] is not None for r in self.rows)
        return json.dumps({"run": self.run, "has_ood": has_ood, "rows": self.rows}).encode()

    # ---------------------------------------------------------------- one slide
    def store(self, slide_id: str) -> SlideStore:
        """The slide's store; a WsiError (kept for later requests) when it cannot be opened."""
        with self._lock:
            if slide_id not in self._stores:
                try:
                    self._stores[slide_id] = SlideStore.open(self.layout.store(slide_id))
                except WsiError as e:
                    self._stores[slide_id] = e
            found = self._stores[slide_id]
        if isinstance(found, WsiError):
            raise found
        return found

    def tiles(self, slide_id: str) -> SlideTiles:
        store = self.store(slide_id)
        with self._lock:
            return self._tiles.setdefault(slide_id, SlideTiles(store))

    def slide_json(self, slide_id: str) -> bytes:
        """The slide page's data: geometry and MPP, the cohort row, whether the slide opens (its error if not)
        and, when the run scored it, every tile's coordinates and scores."""
        row = self._rows_by_id[slide_id]
        doc: dict = {"slide_id": slide_id, "run": self.run, "row": row, "error": None, "scores": None}
        try:
            store = self.store(slide_id)
            tiles = self.tiles(slide_id)
            tiles.slide()  # opened here so the page can say at once that the slide cannot be shown
        except WsiError as e:
            doc["error"] = str(e)
            return json.dumps(doc).encode()
        doc.update(width=store.slide.width, height=store.slide.height, mpp=store.slide.mpp_x,
                   max_level=tiles.zoom.max_level, tile_px=TILE_PX)
        if self.run and store.has_scores(self.run):
            doc["scores"] = self._scores(store)
        doc["qc"] = self._qc(store)
        return json.dumps(doc).encode()

    @staticmethod
    def _qc(store: SlideStore) -> dict | None:
        """Slide QC's flagged tiles (:mod:`wsi.qc`): level-0 x, y and flag bits (1 blur, 2 fold, 4 bubble) of
        the stored tiles flagged and of those ``tiling.qc: exclude`` left out; None when QC did not run."""
        flags = store.qc_flags()
        if flags is None:
            return None
        bits = qc_flag_bits(flags)
        hit = np.flatnonzero(bits)
        coords, kinds = store.coords[hit], bits[hit]
        extra, extra_kinds = store.qc_excluded()
        excluded = len(extra)
        coords = np.concatenate([coords, extra])
        kinds = np.concatenate([kinds, extra_kinds.astype(np.int64)])
        q = store.qc
        return {"tile_px_level0": float(store.tiling.tile_px_level0), "coords": coords.ravel().tolist(),
                "flags": kinds.astype(int).tolist(), "excluded": excluded, "mode": q.mode,
                "blur_pct": q.blur_pct, "fold_pct": q.fold_pct, "bubble_pct": q.bubble_pct}

    def _scores(self, store: SlideStore) -> dict:
        attrs = store.scores(self.run)[2]
        out_of_fold = attrs.oof_folds is not None  # the heatmap of a training slide shows its held-out scores
        attention, class_scores, _ = store.scores(self.run, out_of_fold=out_of_fold)
        classes = [str(c) for c in attrs.classes]
        tumour = classes.index(tumour_class(classes))
        probabilities = attrs.oof_probabilities if out_of_fold else attrs.probabilities
        return {
            "source": "out-of-fold" if out_of_fold else "final", "classes": classes, "tumour_class": classes[tumour],
            "slide_probability": float(probabilities[tumour]), "predicted": attrs.oof_predicted if out_of_fold
            else attrs.predicted, "tile_px_level0": float(store.tiling.tile_px_level0),
            "stride_px_level0": float(store.tiling.stride_px_level0),
            "coords": store.coords.ravel().tolist(),
            "attention": np.round(attention, 7).tolist(),
            "tumour": np.round(class_scores[:, tumour], 4).tolist(),
        }

    def thumbnail(self, slide_id: str) -> bytes:
        """The store's thumbnail as a small JPEG."""
        _, thumb, _ = self.store(slide_id).mask()
        image = Image.fromarray(thumb)
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        return buf.getvalue()

    def tile_image(self, slide_id: str, index: int) -> bytes:
        """Tile ``index`` as the store holds it (what the model saw), as JPEG; a StoreError for a coordinates-only
        store, IndexError past the last tile."""
        store = self.store(slide_id)
        if not 0 <= index < store.n_tiles:
            raise IndexError(index)
        buf = io.BytesIO()
        Image.fromarray(store.read_tiles(index, index + 1)[0]).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def close(self) -> None:
        for tiles in self._tiles.values():
            tiles.close()
