"""`wt-datagen inspect`: summarise, validate, picture and export WebDataset shards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..console import Progress
from ..reader import Problem, ShardError, expand_shards
from .export import export_ply
from .pictures import contact_sheet, first_frame_rgb
from .summary import format_summary, scan
from .viewer import COLOURINGS, ViewerUnavailable, require_rerun, write_rrd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "shards",
        nargs="+",
        metavar="SHARDS",
        help="shard files, folders, globs or brace patterns (out/shard-{000000..000009}.tar)",
    )
    parser.add_argument("--validate", action="store_true", help="check every sample against the schema")
    parser.add_argument(
        "--show",
        nargs="+",
        metavar="N|KEY",
        help="samples to picture/export: a count N (the first N) or sample keys",
    )
    parser.add_argument(
        "--out", default="inspect_out", help="folder for contact sheets (default: inspect_out)"
    )
    parser.add_argument(
        "--export-ply",
        metavar="DIR",
        help="write the chosen samples' layered points as PLY (default choice: the first sample)",
    )
    parser.add_argument("--ply-frame", choices=("camera", "world"), default="camera")
    parser.add_argument("--ply-colour", choices=("layer", "image"), default="layer")
    parser.add_argument(
        "--rerun",
        metavar="FILE.rrd",
        help="log the chosen samples (default: the first) to a Rerun recording; open it with `rerun FILE.rrd` "
        "(needs the extra `rerun`)",
    )
    parser.add_argument(
        "--rerun-colour",
        choices=COLOURINGS,
        default="layer",
        help="colour of the points in --rerun: layer index, camera-space normal, entering/exiting, image",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _chooser(show: list[str] | None, export: bool):
    """keep(index, sample) for --show: a single integer N picks the first N samples, otherwise keys."""
    if not show:
        return (lambda i, s: i == 0) if export else None
    if len(show) == 1 and show[0].isdigit():
        n = int(show[0])
        return lambda i, s: i < n
    keys = set(show)
    return lambda i, s: s.key in keys


def run(args: argparse.Namespace) -> int:
    try:
        paths = expand_shards(args.shards)
        if args.rerun:
            require_rerun()  # before the scan, so a missing extra costs nothing
    except (ShardError, ViewerUnavailable) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    with Progress(len(paths), unit="shard", desc="inspect") as progress:
        summary, problems, kept = scan(
            paths, validate=args.validate, keep=_chooser(args.show, bool(args.export_ply or args.rerun)),
            progress=progress,
        )
    if args.show and not (len(args.show) == 1 and args.show[0].isdigit()):
        for missing in sorted(set(args.show) - {s.key for s in kept}):
            print(f"inspect: --show: no sample with key {missing}", file=sys.stderr)
            problems.append(Problem("-", missing, "--show", "no such sample"))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        for p in problems:
            print(p)
    for s in kept:
        if args.show:
            bg = first_frame_rgb(paths, s) if s.is_clip else None
            print(f"contact sheet: {contact_sheet(s, Path(args.out) / f'{s.key}.png', bg)}", file=sys.stderr)
        if args.export_ply:
            out = Path(args.export_ply) / f"{s.key}.ply"
            try:
                n = export_ply(s, out, args.ply_frame, args.ply_colour)
                print(f"ply: {out} ({n} points)", file=sys.stderr)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                print(f"inspect: {s.shard}: {s.key}: export skipped ({e})", file=sys.stderr)
    if args.rerun and kept:
        rec = write_rrd(kept, args.rerun, colour=args.rerun_colour,
                        on_skip=lambda line: print(f"inspect: {line}", file=sys.stderr))
        frames = sum(rec.frames.values())
        print(f"rerun: {rec.path} ({len(rec.keys)} samples, {sum(rec.points.values())} points"
              + (f", {frames} clip frames" if rec.frames else "") + f"); open it with: rerun {rec.path}",
              file=sys.stderr)
    return 1 if problems else 0
