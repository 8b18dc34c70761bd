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


def _common(p: argparse.ArgumentParser, out_required: bool = True, per_slide: bool = True,
            status: bool = True) -> None:
    p.add_argument("--out", required=out_required, type=Path, help="output folder (stores, features, models...)")
    p.add_argument("--config", dest="config_file", type=Path, help="YAML config over configs/default.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set tiling.tile_px=224 (repeatable)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--log", type=Path, help="write all output here; only a failure's one-line cause still reaches "
                   "the console (workflow jobs)")
    if status:
        p.add_argument("--status", type=Path, help="write what the job did (per slide: done, skipped, failed) and the "
                       "config it ran with as JSON here"
                       + ("; exit 0 even when slides failed (they are in OUT/failures.csv), so one bad slide never "
                          "fails a workflow job" if per_slide else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi", description=__doc__.split("\n")[0], fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"wsi {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tile", help="tissue mask + tiles of each slide into OUT/stores/<slide_id>.zarr")
    p.add_argument("slides", nargs="+", type=Path, help="slide files (or folders of slides); @FILE reads them "
                   "from FILE, one per line")
    _common(p)

    p = sub.add_parser("inspect", help="print a store's summary")
    p.add_argument("stores", nargs="+", type=Path)

    p = sub.add_parser("extract", help="features of every store's tiles with an encoder, on a Dask cluster")
    _common(p)
    p.add_argument("--encoder", help="registry name (timm name, resnet50_trunc, hf-hub:org/name)")
    p.add_argument("--checkpoint", type=Path, help="local weights file for the encoder")
    p.add_argument("--cluster", help="local | slurm | a scheduler address (tcp://host:8786)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--high-res", action="store_true",
                   help="instead: the finer, overlapping grid of the slides named, for `wsi heatmap --high-res` "
                   "(their features must be extracted first; `wsi predict` then scores the grid)")
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
    p.add_argument("--labels", type=Path, help="CSV slide_id,label[,patient_id,site] of these slides: external "
                   "validation (metrics.json beside predictions.csv)")
    p.add_argument("slide_ids", nargs="*", help="only these slides (default: every store with features)")

    p = sub.add_parser("heatmap", help="PNG overlay, QuPath GeoJSON and pyramidal TIFF per slide")
    _common(p)
    p.add_argument("--model-run", required=True, help="the run whose scores to paint (OUT/models/<run>)")
    p.add_argument("--high-res", action="store_true",
                   help="paint the finer, overlapping grid's scores (`wsi extract --high-res`, then `wsi predict`)")
    p.add_argument("slide_ids", nargs="*", help="only these slides (default: all with scores); @FILE reads them "
                   "from FILE, one per line")

    sub.add_parser("workflow", help='print the installed Snakefile\'s path: snakemake -s "$(wsi workflow)"; its '
                   "folder holds configs/ (demo.yaml, the slurm profile)")

    p = sub.add_parser("report", help="self-contained OUT/report.html")
    _common(p, per_slide=False, status=False)
    p.add_argument("--model-run", help="the run to report (default: the newest)")

    p = sub.add_parser("view", help="browse the slides of a run with their heatmaps in a web browser")
    p.add_argument("out", type=Path, help="output folder of the run")
    p.add_argument("--run", help="the model run to show (default: the newest predictions)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; the report links there)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback prints a link with "
                   "a fresh token, without which nothing is served")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _config(args, overrides: dict | None = None) -> dict:
    from .config import load_config

    config = load_config(args.config_file, args.sets, overrides=overrides)
    cluster = config.get("cluster") or {}
    if cluster.get("kind") == "slurm" and not cluster["slurm"].get("log_directory") and getattr(args, "out", None):
        from .layout import Layout  # SLURM worker jobs log under OUT/logs, not as slurm-<id>.out in the cwd

        cluster["slurm"]["log_directory"] = str(Layout(args.out).worker_logs(args.command))
    return config


def _drop_none(d: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items()
            if v is not None and not (isinstance(v, dict) and not _drop_none(v))}


def _cluster_override(value: str | None) -> dict:
    if value is None:
        return {}
    if value in ("local", "slurm"):
        return {"kind": value}
    return {"kind": "address", "address": value}


def _finish(args, config: dict, summary) -> int:
    """Print what the stage did (:class:`wsi.runner.StageSummary`); exit 1 when a slide failed, unless a
    workflow job asked for --status."""
    from .layout import Layout

    for line in summary.messages:
        print(line)
    for what, path in summary.outputs.items():
        print(f"{what}: {path}")
    for line in summary.warnings:
        print(line, file=sys.stderr)
    items = summary.items()
    if summary.unit == "slide_id":
        print(f"wsi {args.command}: {len(summary.done)} of {len(items)} slides done"
              + (f", {len(summary.skipped)} skipped" if summary.skipped else "")
              + (f"; {len(summary.failed)} failed (see {Layout(args.out).failures})" if summary.failed else ""),
              flush=True)
    if getattr(args, "status", None):
        from .config import stage_config
        from .provenance import write_status

        write_status(args.status, args.command, items, stage_config(config, args.command))
        return 0
    return 1 if summary.failed else 0


def _previous_run_note(args) -> str:
    """After a failed training: where the previous, complete run of the same name is (it was not touched)."""
    try:
        from .config import run_name
        from .layout import Layout

        run_dir = Layout(args.out).run_dir(run_name(_config(args)))
    except Exception:  # the config itself is what failed: no run to name
        return ""
    return f"; the previous model run {run_dir} is unchanged and usable" if (run_dir / "run.json").exists() else ""


def _stage(args):
    """``(config, summary)``: the stage ``args.command`` names, called with its sections of the config."""
    if args.command == "tile":
        from .tiling import TileConfig, tile_slides

        config = _config(args)
        return config, tile_slides(args.out, TileConfig.from_config(config), args.slides, progress=args.progress)

    if args.command == "extract":
        config = _config(args, _drop_none({"extract": {"encoder": args.encoder, "batch_size": args.batch_size,
                                                       "checkpoint": str(args.checkpoint) if args.checkpoint
                                                       else None},
                                           "cluster": _cluster_override(args.cluster)}))
        if args.high_res:
            from .features.fine_grid import FineGridConfig, extract_fine_grids

            return config, extract_fine_grids(args.out, FineGridConfig.from_config(config), args.slide_ids)
        from .features import ExtractConfig, extract_cohort

        return config, extract_cohort(args.out, ExtractConfig.from_config(config), slide_ids=args.slide_ids or None,
                                      progress=args.progress)

    if args.command == "train":
        from .mil import TrainConfig, train

        config = _config(args, _drop_none({"labels": str(args.labels) if args.labels else None,
                                           "mil": {"model": args.model, "run_name": args.run_name},
                                           "extract": {"encoder": args.encoder},
                                           "cluster": _cluster_override(args.cluster)}))
        return config, train(args.out, TrainConfig.from_config(config), progress=args.progress)

    if args.command == "predict":
        from .mil import PredictConfig, predict

        config = _config(args, _drop_none({"labels": str(args.labels) if args.labels else None}))
        return config, predict(args.out, PredictConfig.from_config(config), args.model_dir,
                               slide_ids=args.slide_ids or None)

    if args.command == "heatmap":
        from .heatmap import HeatmapConfig, heatmaps

        config = _config(args)
        return config, heatmaps(args.out, HeatmapConfig.from_config(config), args.model_run,
                                slide_ids=args.slide_ids or None, high_res=args.high_res, progress=args.progress)

    if args.command == "report":
        from .report import ReportConfig, write_report

        config = _config(args)
        return config, write_report(args.out, ReportConfig.from_config(config), run=args.model_run)
    raise AssertionError(args.command)


def run(args) -> int:
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

    if args.command == "workflow":
        from .config import workflow_snakefile

        print(workflow_snakefile())
        return 0

    if args.command == "view":
        from .viewer import serve

        serve(args.out, run=args.run, host=args.host, port=args.port)
        return 0
    return _finish(args, *_stage(args))


def _log_to(path: Path):
    """Send this process's output (and its children's: Dask workers) to ``path``; return the console's stderr,
    where a failure's one-line cause still goes."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Progress bars in a log file: a line every 30 s (tiles/s, ETA), not ten a second.
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    return console


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    # A Dask worker that outlives the cluster's close is killed on purpose; its nanny's warning is noise.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    console = _log_to(args.log) if getattr(args, "log", None) else sys.stderr
    from .errors import WsiError

    def fail(message: str) -> int:
        print(message, file=sys.stderr, flush=True)
        if console is not sys.stderr:
            print(message, file=console, flush=True)
        return 2

    from .stop import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            return run(args)
    except Stopped as e:
        fail(f"wsi {args.command}: error: {e}")
        return e.exit_status
    except WsiError as e:
        note = _previous_run_note(args) if args.command == "train" else ""
        return fail(f"wsi {args.command}: error: {e}{note}")
    except OSError as e:  # unwritable output folder, disk full: nothing was taken as complete
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"wsi {args.command}: error: {where}{e.strerror or e} (check the output folder is writable and "
                    "has free space)")
    except Exception as e:
        if console is sys.stderr:
            raise
        import traceback

        traceback.print_exc()
        note = _previous_run_note(args) if args.command == "train" else ""
        return fail(f"wsi {args.command}: error: {type(e).__name__}: {e} (traceback in {args.log}){note}")


if __name__ == "__main__":
    sys.exit(main())
