"""Clip training speed (T = 4 windows) of the tiny and small presets, and the clip loader alone.

Training: median time of optimizer steps (forward, backward, clip, AdamW) of the clip model on decoded windows
held in memory, against the image model on the same frames as views in the same run (interleaved), so the
cost of the temporal blocks reads as a ratio. Loader: windows per second out of ``clip_train_loader``
(2 workers, grouping, decoding and the shared normalisation included) on clip shards at the preset's
resolution, after the first batch (worker start-up excluded).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tests.bench.bench_train import step_time
from tests.clip_shards import clip_files, write_clip_shards
from wt_model.clips import ClipConfig, clip_train_loader
from wt_model.data import LoaderConfig, expand_shards
from wt_model.models import PRESETS, WTDiT

T = 4
RUNS = {"tiny": dict(batch=2, steps=6), "small": dict(batch=1, steps=3)}


def train_rates(preset: str, batch: dict, steps: int) -> tuple[float, float]:
    """(clips/s of the clip model, clips/s of the image model on the same frames as views), interleaved."""
    torch.manual_seed(0)
    clip_model, image_model = WTDiT(replace(PRESETS[preset], temporal=True)), WTDiT(PRESETS[preset])
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (clip_model, image_model)]
    views = {k: v.flatten(0, 1) for k, v in batch.items()}
    gen = torch.Generator().manual_seed(0)
    times = ([], [])
    for i in range(steps + 1):
        a = step_time(clip_model, opts[0], batch, gen)
        b = step_time(image_model, opts[1], views, gen)
        if i:  # the first step pays for allocation
            times[0].append(a)
            times[1].append(b)
    n = len(batch["rgb"])
    return n / statistics.median(times[0]), n / statistics.median(times[1])


def loader_rate(urls: list[str], cfg: LoaderConfig, batches: int) -> tuple[float, dict]:
    """Windows per second of the clip loader alone, and one batch (tensors) for the training bench."""
    it = iter(clip_train_loader(urls, cfg, ClipConfig(length=T, window_stride=1), epoch=0))
    first = next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.batch_size / (time.perf_counter() - t0)
    keep = ("rgb", "points", "valid")
    return rate, {k: first[k] for k in keep}


def main() -> None:
    print(f"\nbench_clips: clips/s of T = {T} frames (CPU, torch threads = {torch.get_num_threads()})")
    print(f"{'preset':8s} {'res':>5s} {'batch':>5s} {'train':>8s} {'as views':>9s} {'temporal cost':>13s} "
          f"{'loader':>8s} {'loader/train':>13s}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for preset, run in RUNS.items():
            cfg = PRESETS[preset]
            shards = [sum((clip_files(rng, f"seq{s}_c{c:03d}", list(range(8)), cfg.image_size, cfg.num_layers)
                           for c in range(2)), []) for s in range(4)]  # 4 shards x 2 clips x 8 frames
            urls = expand_shards(str(Path(write_clip_shards(Path(tmp) / preset, shards)[0]).parent / "*.tar"))
            lcfg = LoaderConfig(run["batch"], cfg.image_size, cfg.num_layers, num_workers=2, shuffle_buffer=8,
                                epoch_samples=10_000)
            load, batch = loader_rate(urls, lcfg, batches=max(6, 24 // run["batch"]))
            clips, views = train_rates(preset, batch, run["steps"])
            print(f"{preset:8s} {cfg.image_size:5d} {run['batch']:5d} {clips:8.2f} {views:9.2f} {views / clips:12.2f}x "
                  f"{load:8.1f} {load / clips:12.1f}x")


if __name__ == "__main__":
    main()
