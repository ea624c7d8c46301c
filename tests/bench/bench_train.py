"""Training speed of the tiny and small presets (no image encoder, and tiny with a random dinov2_vits14), and
the data loader alone (which must be >= 5x faster), on the CPU.

Training: median time of optimizer steps (forward, backward, clip, AdamW) on decoded batches held in memory.
Loader: batches per second out of ``train_loader`` (2 workers, decoding included) on sphere shards at the
model's resolution, after the first batch (worker start-up excluded).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from tests.model_shards import write_sphere_shards
from wt_model.data import LoaderConfig, expand_shards, train_loader
from wt_model.flow import FlowConfig, flow_loss
from wt_model.models import WTDiT, configure

RUNS = [("tiny", "none", dict(batch=8, steps=6)), ("tiny", "dinov2_vits14", dict(batch=8, steps=6)),
        ("small", "none", dict(batch=1, steps=3))]


def step_time(model, opt, batch: dict, gen) -> float:
    """Seconds of one full training step (flow loss, backward, clipped gradients, optimizer step)."""
    t0 = time.perf_counter()
    loss, _ = flow_loss(model, batch, FlowConfig(), gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.denoiser_parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0


def train_rate(cfg, batch: dict, steps: int) -> float:
    """Samples per second of full training steps (median step time)."""
    torch.manual_seed(0)
    model = WTDiT(cfg)
    opt = torch.optim.AdamW(model.denoiser_parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = [step_time(model, opt, batch, gen) for _ in range(steps + 1)][1:]  # the first pays for allocation
    return len(batch["rgb"]) / statistics.median(times)


def loader_rate(urls: list[str], cfg: LoaderConfig, batches: int) -> tuple[float, dict]:
    """Samples per second of the data loader alone, and one batch (tensors) for the training bench."""
    it = iter(train_loader(urls, cfg, epoch=0))
    first = next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.batch_size / (time.perf_counter() - t0)
    return rate, {k: v for k, v in first.items() if torch.is_tensor(v)}


def main() -> None:
    print(f"\nbench_train: samples/s (CPU, torch threads = {torch.get_num_threads()})")
    print(f"{'preset':8s} {'encoder':14s} {'res':>5s} {'batch':>5s} {'train':>10s} {'loader':>10s} "
          f"{'loader/train':>13s}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, encoder, run in RUNS:
            cfg = configure(preset, encoder)[0]
            folder = Path(tmp) / f"{preset}-{cfg.image_size}"
            if not folder.exists():
                write_sphere_shards(folder, views=48, shards=4, size=cfg.image_size, num_layers=cfg.num_layers)
            urls = expand_shards(str(folder / "*.tar"))
            lcfg = LoaderConfig(run["batch"], cfg.image_size, cfg.num_layers, num_workers=2, shuffle_buffer=16,
                                epoch_samples=10_000)
            load, batch = loader_rate(urls, lcfg, batches=max(8, 96 // run["batch"]))
            train = train_rate(cfg, batch, run["steps"])
            verdict = "ok" if load >= 5 * train else "TOO SLOW (< 5x)"
            print(f"{preset:8s} {encoder:14s} {cfg.image_size:5d} {run['batch']:5d} {train:10.2f} {load:10.1f} "
                  f"{load / train:12.1f}x {verdict}")


if __name__ == "__main__":
    main()
