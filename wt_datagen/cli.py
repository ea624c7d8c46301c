"""`wt-datagen`: a thin command line over functions you can also import.

Each subcommand lives in the module that does the work; that module exposes ``add_arguments(parser)``
and ``run(args) -> int`` (the exit code).
"""

from __future__ import annotations

import sys

from .console import run_command

COMMANDS = {
    "make-assets": ("wt_datagen.inputs.builtin", "write the built-in procedural assets to a folder"),
    "render": ("wt_datagen.pipeline.render", "render an asset folder into sharded WebDataset layered targets"),
    "inspect": ("wt_datagen.inspect.cli", "summarise, validate, picture, export and view (Rerun) shards"),
    "export-tracks": ("wt_datagen.inspect.export_tracks",
                      "write clips' tracks as TAPVid-3D or PointOdyssey files for 3D point trackers"),
}


def main(argv: list[str] | None = None) -> int:
    return run_command("wt-datagen", __doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
