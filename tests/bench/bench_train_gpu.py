"""Training speed of the ``base`` preset with a real image encoder on a GPU, and the data loader alone.

    python -m tests.bench train_gpu
    WT_ENCODER=dinov2_vitl14 WT_ENCODER_WEIGHTS=/path/dinov2_vitl14.safetensors python -m tests.bench train_gpu

Training: median time of optimizer steps (bf16 autocast where supported, forward with the frozen encoder,
backward, clip, AdamW) on decoded batches held on the GPU; optionally ``torch.compile`` (WT_COMPILE=1).
Loader: samples per second out of ``train_loader`` (WT_WORKERS workers, 8 by default) on 504x504 sphere shards.
Without ``WT_ENCODER_WEIGHTS`` the encoder has random weights (the same speed; said in the output). Without a
GPU it prints one line and returns.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tests.bench.bench_train import loader_rate
from tests.model_shards import write_sphere_shards
from wt_model.data import LoaderConfig, expand_shards
from wt_model.encoder import ImageEncoder, load_encoder
from wt_model.flow import FlowConfig, flow_loss
from wt_model.models import WTDiT, configure


def main() -> None:
    if not torch.cuda.is_available():
        print("\nbench_train_gpu: no CUDA device here; run it on a GPU machine (see its docstring)")
        return
    name = os.environ.get("WT_ENCODER", "dinov2_vitl14")
    weights = os.environ.get("WT_ENCODER_WEIGHTS")
    batch_size, steps = int(os.environ.get("WT_BATCH", 4)), int(os.environ.get("WT_STEPS", 10))
    workers = int(os.environ.get("WT_WORKERS", 8))
    cfg = configure("base", name)[0]
    device = torch.device("cuda")
    encoder = load_encoder(name, weights) if weights else ImageEncoder(name)
    torch.manual_seed(0)
    model = WTDiT(cfg, encoder).to(device)
    if os.environ.get("WT_COMPILE") == "1":
        model = torch.compile(model)
    print(f"\nbench_train_gpu: {torch.cuda.get_device_name()}, preset base + {name} "
          f"({'weights ' + Path(weights).name if weights else 'random weights'}), {cfg.image_size}x{cfg.image_size}, "
          f"batch {batch_size}, bf16 {torch.cuda.is_bf16_supported()}")
    with tempfile.TemporaryDirectory() as tmp:
        write_sphere_shards(tmp, views=64, shards=8, size=cfg.image_size, num_layers=cfg.num_layers)
        lcfg = LoaderConfig(batch_size, cfg.image_size, cfg.num_layers, num_workers=workers, shuffle_buffer=16,
                            epoch_samples=100_000)
        load, batch = loader_rate(expand_shards(str(Path(tmp) / "*.tar")), lcfg, batches=max(8, 64 // batch_size))
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_bf16_supported() else nullcontext()
    gen, times = torch.Generator().manual_seed(0), []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss, _ = flow_loss(model, batch, FlowConfig(), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch.cuda.synchronize()
        if i >= 2:  # allocation and (with compile) compilation
            times.append(time.perf_counter() - t0)
    train = batch_size / statistics.median(times)
    print(f"train {train:.2f} samples/s, loader ({workers} workers) {load:.1f} samples/s, loader/train "
          f"{load / train:.1f}x, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
