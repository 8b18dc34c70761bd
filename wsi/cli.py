"""``wsi <stage> ...``: parse the arguments, call one library function, report. No work happens at import.

Every subcommand takes ``--config FILE`` (YAML over ``configs/default.yaml``) and ``--set key=value``
(dotted keys, repeatable); options such as ``--encoder`` are shorthands for the matching ``--set``.
Exit status: 0 when every slide succeeded, 1 when some failed (listed in ``OUT/failures.csv``), 2 on a
usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser, out_required: bool = True, per_slide: bool = True) -> None:
    p.add_argument("--out", required=out_required, type=Path, help="output folder (stores, features, models...)")
    p.add_argument("--config", dest="config_file", type=Path, help="YAML config over configs/default.yaml")
    p.add_argument("--config-json", help="JSON config mapping merged after --config (the Snakefile passes its "
                   "config this way, so a changed parameter re-runs the stage)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set tiling.tile_px=224 (repeatable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    if per_slide:
        p.add_argument("--status", type=Path, help="write the outcome per slide as JSON here and exit 0 even "
                       "when slides failed (they are in OUT/failures.csv); for workflow jobs that must not stop "
                       "the cohort")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"wsi {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tile", help="tissue mask + tiles of each slide into OUT/stores/<slide_id>.zarr")
    p.add_argument("slides", nargs="+", type=Path, help="slide files (or folders of slides)")
    _common(p)

    p = sub.add_parser("inspect", help="print a store's summary")
    p.add_argument("stores", nargs="+", type=Path)

    p = sub.add_parser("demo-data", help="write a small synthetic H&E-like cohort with a labels CSV")
    p.add_argument("outdir", type=Path)
    p.add_argument("--n-slides", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--field-mm", type=float, nargs=2, metavar=("WIDTH", "HEIGHT"),
                   help="glass area of each slide in mm (default: make_demo_cohort's; smaller = faster demo)")

    p = sub.add_parser("extract", help="features of every store's tiles with an encoder, on a Dask cluster")
    _common(p)
    p.add_argument("--encoder", help="registry name (timm name, resnet50_trunc, hf-hub:org/name)")
    p.add_argument("--checkpoint", type=Path, help="local weights file for the encoder")
    p.add_argument("--cluster", help="local | slurm | a scheduler address (tcp://host:8786)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("slide_ids", nargs="*", help="only these slides (default: every complete store)")

    p = sub.add_parser("train", help="cross-validated attention-MIL training on a labels table")
    _common(p, per_slide=False)
    p.add_argument("--labels", type=Path, help="CSV slide_id,label[,patient_id,split]")
    p.add_argument("--model", help="abmil | clam_sb | clam_mb | transmil")
    p.add_argument("--encoder", help="which features to train on")
    p.add_argument("--run-name", help="folder name under OUT/models")
    p.add_argument("--cluster", help="local | slurm | a scheduler address")

    p = sub.add_parser("predict", help="apply a trained run to stores: predictions.csv + per-tile scores")
    _common(p)
    p.add_argument("--model", dest="model_dir", type=Path, required=True, help="OUT/models/<run>")
    p.add_argument("slide_ids", nargs="*", help="only these slides (default: every store with features)")

    p = sub.add_parser("heatmap", help="PNG overlay, QuPath GeoJSON and pyramidal TIFF per slide")
    _common(p)
    p.add_argument("--model-run", required=True, help="the run whose scores to paint (OUT/models/<run>)")
    p.add_argument("--high-res", action="store_true",
                   help="re-score a finer, overlapping grid from the slide (needs the model)")
    p.add_argument("slide_ids", nargs="*", help="only these slides (default: all with scores)")

    sub.add_parser("workflow", help='print the installed Snakefile\'s path: snakemake -s "$(wsi workflow)"; its '
                   "folder holds configs/ (demo.yaml, the slurm profile)")

    p = sub.add_parser("report", help="self-contained OUT/report.html")
    _common(p, per_slide=False)
    p.add_argument("--model-run", help="the run to report (default: the newest)")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _config(args, overrides: dict | None = None) -> dict:
    import json

    from .config import deep_merge, load_config

    merged = json.loads(args.config_json) if getattr(args, "config_json", None) else {}
    return load_config(args.config_file, args.sets, overrides=deep_merge(merged, overrides or {}))


def _drop_none(d: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items()
            if v is not None and not (isinstance(v, dict) and not _drop_none(v))}


def _cluster_override(value: str | None) -> dict:
    if value is None:
        return {}
    if value in ("local", "slurm"):
        return {"kind": value}
    return {"kind": "address", "address": value}


def _items(summary, *fields) -> list[dict]:
    return [{"slide_id": slide_id, "status": field} for field in fields for slide_id in getattr(summary, field)]


def _finish(args, config: dict, items: list[dict]) -> int:
    """Report the per-slide outcome; exit 1 when a slide failed, unless a workflow job asked for --status."""
    failed = [i for i in items if i["status"] == "failed"]
    print(f"wsi {args.command}: {len(items) - len(failed)} of {len(items)} slides ok"
          + (f"; {len(failed)} failed (see {args.out / 'failures.csv'})" if failed else ""))
    if args.status:
        from .provenance import write_status

        write_status(args.status, args.command, items, config)
        return 0
    return 1 if failed else 0


def run(args) -> int:
    if args.command == "tile":
        from .slide import expand_slide_paths
        from .tiling import tile_slides

        config = _config(args)
        results = tile_slides(expand_slide_paths(args.slides), args.out, config, progress=args.progress)
        return _finish(args, config, [{"slide_id": r.slide_id, "source": str(r.source),
                                       "status": "failed" if r.error else "done", "cause": r.error,
                                       "n_tiles": r.n_tiles} for r in results])

    if args.command == "inspect":
        from .store import SlideStore, describe

        status = 0
        for path in args.stores:
            try:
                print(describe(SlideStore.open(path)))
            except Exception as e:  # report every store, then fail
                print(f"error: {e}", file=sys.stderr)
                status = 1
        return status

    if args.command == "demo-data":
        from .demo import make_demo_cohort

        field = {"field_mm": tuple(args.field_mm)} if args.field_mm else {}
        labels = make_demo_cohort(args.outdir, n_slides=args.n_slides, seed=args.seed, **field)
        print(f"wrote {args.n_slides} slides and {labels}")
        return 0

    if args.command == "extract":
        from .features import extract_cohort

        overrides = _drop_none({"extract": {"encoder": args.encoder, "batch_size": args.batch_size,
                                            "checkpoint": str(args.checkpoint) if args.checkpoint else None},
                                "cluster": _cluster_override(args.cluster)})
        config = _config(args, overrides)
        summary = extract_cohort(args.out, config, slide_ids=args.slide_ids or None, progress=args.progress)
        return _finish(args, config, _items(summary, "done", "skipped", "failed"))

    if args.command == "train":
        from .mil import train

        overrides = _drop_none({"labels": str(args.labels) if args.labels else None,
                                "mil": {"model": args.model, "run_name": args.run_name},
                                "extract": {"encoder": args.encoder}, "cluster": _cluster_override(args.cluster)})
        run_dir = train(args.out, _config(args, overrides), progress=args.progress)
        print(f"model run: {run_dir}")
        return 0

    if args.command == "predict":
        from .mil import predict

        config = _config(args)
        summary = predict(args.out, args.model_dir, config, slide_ids=args.slide_ids or None)
        print(f"predictions: {summary.predictions_csv}")
        return _finish(args, config, _items(summary, "done", "failed"))

    if args.command == "heatmap":
        from .heatmap import heatmaps

        config = _config(args)
        summary = heatmaps(args.out, args.model_run, config, slide_ids=args.slide_ids or None,
                           high_res=args.high_res, progress=args.progress)
        return _finish(args, config, _items(summary, "done", "failed"))

    if args.command == "workflow":
        from .config import workflow_snakefile

        print(workflow_snakefile())
        return 0

    if args.command == "report":
        from .report import write_report

        print(write_report(args.out, _config(args), run=args.model_run))
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import WsiError

    try:
        return run(args)
    except WsiError as e:
        print(f"wsi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output folder, disk full: nothing was taken as complete
        where = f"{e.filename}: " if e.filename else ""
        print(f"wsi {args.command}: error: {where}{e.strerror or e} (check the output folder is writable and "
              "has free space)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
