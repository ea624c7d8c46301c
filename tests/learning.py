"""The learning benchmark shared by the proof that WT-DiT learns (tests/test_train.py) and the option
comparison (tests/bench/bench_learn.py): one view of each built-in asset rendered by the real pipeline, a
tiny model overfit on them, scored against the trivial mean-pointmap baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from wt_model.cli import main
from wt_model.data import denormalise, eval_loader, expand_shards
from wt_model.encoder import ImageEncoder
from wt_model.metrics import evaluate, mean_scores, score_view

DEBUG_CONFIG = Path(__file__).resolve().parent.parent / "render_configs" / "debug.yaml"


def render_builtin(out: Path, resolution: int = 64, subprocess: bool = False) -> str:
    """The 6 built-in assets, one view each, rendered by ``wt-datagen render``; returns the shard glob.
    ``subprocess``: in a child process (the caster's ``numba.set_num_threads`` also sets the OpenMP thread
    count torch shares, overriding OMP_NUM_THREADS for the rest of the process)."""
    commands = [["make-assets", str(out / "assets")],
                ["render", str(out / "assets"), "--config", str(DEBUG_CONFIG), "--out", str(out / "shards"),
                 "--resolution", str(resolution), "--views", "1", "--workers", "1"]]
    for argv in commands:
        if subprocess:
            import subprocess as sp
            import sys

            sp.run([sys.executable, "-m", "wt_datagen.cli", *argv], check=True, capture_output=True)
        else:
            from wt_datagen.cli import main as datagen

            assert datagen(argv) == 0
    return str(out / "shards" / "*.tar")


def random_encoder_file(path: Path, name: str = "dinov2_vits14", seed: int = 0) -> Path:
    """A randomly initialised DINOv2 backbone written as safetensors (what --encoder-weights reads)."""
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in ImageEncoder(name).backbone.state_dict().items()}, str(path))
    return path


def mean_pointmap_view_scores(pts: np.ndarray, valid: np.ndarray, scale: np.ndarray) -> list[dict]:
    """The trivial baseline, view by view: every view of (N,K,3,H,W) normalised points ``pts`` (masks (N,K,H,W),
    scales (N,)) predicted as their mean pointmap (valid where most views are valid), scored like the model."""
    mean_pts = denormalise(pts.mean(0).transpose(0, 2, 3, 1))
    mean_valid = np.logical_and.accumulate(valid.mean(0) > 0.5, axis=0)
    return [score_view(mean_pts, mean_valid, denormalise(p.transpose(0, 2, 3, 1), s), v)
            for p, v, s in zip(pts, valid, scale)]


def mean_pointmap_scores(pattern: str, size: int = 64, num_layers: int = 4):
    """The mean-pointmap baseline over the views of ``pattern``'s shards, averaged like the model's scores."""
    batches = list(eval_loader(expand_shards(pattern), 64, size, num_layers))
    pts = torch.cat([b["points"] for b in batches]).numpy()  # (N,K,3,H,W)
    valid = torch.cat([b["valid"] for b in batches]).numpy()  # (N,K,H,W)
    scale = torch.cat([b["scale"] for b in batches]).numpy()
    return mean_scores(mean_pointmap_view_scores(pts, valid, scale))


def train_and_score(pattern: str, run: Path, steps: int = 400, extra: tuple[str, ...] = (),
                    encoder_weights: str | None = None, seed: int = 0):
    """Overfit the tiny preset (batch 6, lr 1e-3, warm-up 20) and score it on its training views."""
    args = ["train", "--shards", pattern, "--steps", str(steps), "--out", str(run), "--preset", "tiny",
            "--batch", "6", "--lr", "1e-3", "--warmup", "20", "--workers", "1", "--log-every", "50",
            "--no-progress", "--seed", str(seed), *extra]
    if encoder_weights:
        args += ["--encoder-weights", encoder_weights]
    assert main(args) == 0
    return evaluate(str(run / "last.pt"), pattern, batch=8, encoder_weights=encoder_weights)
