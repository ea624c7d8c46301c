"""`wt-model`: train, sample and evaluate WT-DiT models (thin dispatch, like `wt-datagen`).

Each subcommand lives in the module that does the work; that module exposes ``add_arguments(parser)`` and
``run(args) -> int``. Bad input (data, images, checkpoints, encoder weights, options) ends with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import sys

from wt_datagen.console import run_command
from wt_model.checkpoint import CheckpointError
from wt_model.data import DataError
from wt_model.encoder import EncoderError

COMMANDS = {
    "train": ("wt_model.train", "train a WT-DiT on layered shards (also under torchrun)"),
    "sample": ("wt_model.sampler", "sample layered pointmaps from images or a video: npz + PLY"),
    "eval": ("wt_model.clip_metrics", "score a checkpoint on shards (scale-aligned depth, Chamfer, F-score, IoU; "
             "--clips: temporal consistency on tracks)"),
    "stats": ("wt_model.stats", "dataset statistics (per-axis mean, std of the points) for --norm zscore"),
}


def main(argv: list[str] | None = None) -> int:
    return run_command("wt-model", __doc__.splitlines()[0], COMMANDS, argv,
                       errors=(DataError, CheckpointError, EncoderError))


if __name__ == "__main__":
    sys.exit(main())
