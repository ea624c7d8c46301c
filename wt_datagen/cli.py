"""`wt-datagen`: a thin command line over functions you can also import.

Each subcommand lives in the module that does the work; that module exposes ``add_arguments(parser)``
and ``run(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "make-assets": ("wt_datagen.assets", "write the built-in procedural assets to a folder"),
    "render": ("wt_datagen.render", "render an asset folder into sharded WebDataset layered targets"),
    "inspect": ("wt_datagen.inspect", "summarise, validate, picture and export shards"),
}


def build_parser(prog: str, description: str, commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """A parser with one subcommand per ``commands`` entry (name -> (module, help)); the chosen module's
    name is left in ``args._module``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser("wt-datagen", __doc__.splitlines()[0], COMMANDS).parse_args(argv)
    return int(importlib.import_module(args._module).run(args))


if __name__ == "__main__":
    sys.exit(main())
