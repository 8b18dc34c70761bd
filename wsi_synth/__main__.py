"""``python -m wsi_synth DIR``: write the demo cohort (``DIR/slides``, ``DIR/labels.csv``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi.errors import WsiError

from .cohort import make_demo_cohort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsi_synth",
                                     description="write a small synthetic H&E-like cohort with a labels CSV")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--field-mm", type=float, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="glass area of each slide in mm (default: make_demo_cohort's; smaller = faster demo)")
    args = parser.parse_args(argv)
    field = {"field_mm": tuple(args.field_mm)} if args.field_mm else {}
    try:
        labels = make_demo_cohort(args.outdir, n_slides=args.n_slides, seed=args.seed, **field)
    except WsiError as e:
        print(f"wsi_synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_slides} slides and {labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
