"""`wt-model stats`: the dataset statistics of the zscore normalisation, computed from shards.

    wt-model stats --shards 'out/*.tar' --out stats.json
    wt-model train ... --norm zscore --norm-stats stats.json

Mean and standard deviation per axis (x, y, z) of the camera-space points (scene units) of every valid
crossing of every layer (up to ``--layers``) of every layered view, at the shards' resolution, accumulated in
float64 per view and merged exactly (Chan et al.'s pairwise update), so the result does not depend on the
order of the views. Written as JSON: ``mean``, ``std`` (population), ``points``, ``views``, ``layers``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from wt_datagen.console import Progress
from wt_model.data import DataError, decode_points, expand_shards, layered_samples


class RunningMoments:
    """Count, mean and sum of squared deviations per axis, merged view by view (Chan's update)."""

    def __init__(self, dims: int = 3):
        self.n, self.mean, self.m2 = 0, np.zeros(dims), np.zeros(dims)

    def add(self, x: np.ndarray) -> None:
        """Add points (N, dims)."""
        if not len(x):
            return
        n_b, mean_b = len(x), x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def compute_stats(shards: str, layers: int | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """The statistics record of the module docstring for ``shards`` (a pattern)."""
    urls = expand_shards(shards)
    moments, views = RunningMoments(), 0
    with Progress(limit or 0, unit="view", desc="stats", bar=None if progress else False) as bar:
        for sample in layered_samples(urls, limit):
            d = decode_points(sample, layers)
            moments.add(d["xyz"][d["valid"]])
            views += 1
            bar.update(1)
    if moments.n == 0:
        raise DataError(f"shards {shards}: no valid point in {views} layered views")
    return {"mean": moments.mean.tolist(), "std": moments.std.tolist(), "points": int(moments.n), "views": views,
            "layers": layers or "all"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern or glob of .tar shards")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--layers", type=int, default=None, help="use the first N layers (default: all)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many views")


def run(args: argparse.Namespace) -> int:
    stats = compute_stats(args.shards, args.layers, args.limit)
    Path(args.out).write_text(json.dumps(stats, indent=1) + "\n")
    mean = ", ".join(f"{v:.4g}" for v in stats["mean"])
    std = ", ".join(f"{v:.4g}" for v in stats["std"])
    print(f"{stats['views']} views, {stats['points']} points: mean ({mean}), std ({std}) -> {args.out}")
    return 0
