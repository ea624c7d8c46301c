"""Train a WT-DiT on layered shards; reads top to bottom.

    wt-model train --shards 'out/shard-{000000..000031}.tar' --preset tiny --steps 2000 --out runs/tiny
    torchrun --nproc_per_node 2 -m wt_model.train --shards ... --preset tiny --steps 2000 --out runs/tiny

Under torchrun the model runs in DistributedDataParallel (gloo on CPU, nccl on GPU), the shards are split
by node and worker, losses are averaged over ranks and only rank 0 writes checkpoints and logs.
``--resume`` continues ``OUT/last.pt`` exactly: weights, optimizer, EMA, step, and the data position (the
data order is a function of seed, epoch, rank and worker; the partial epoch is skipped before decoding).
Run with the same batch size, workers, world size and epoch length for a bit-identical continuation.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from wt_model.checkpoint import CheckpointError, check_preset, read_checkpoint, save_checkpoint
from wt_model.data import LoaderConfig, expand_shards, probe_shards, train_loader
from wt_model.flow import FlowConfig, flow_loss
from wt_model.models import PRESETS, build_model

DATA_ORDER_KEYS = ("seed", "batch", "workers", "epoch_samples", "shuffle_buffer", "world_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern or glob of .tar shards")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="run folder: last.pt, log.csv")
    p.add_argument("--batch", type=int, default=8, help="samples per step per rank")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up as (1+n)/(10+n))")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (0: main process)")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--epoch-samples", type=int, default=10_000, help="samples per epoch over all ranks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    f = FlowConfig()
    p.add_argument("--prediction", default=f.prediction, choices=["x0", "velocity"])
    p.add_argument("--p-uniform", type=float, default=f.p_uniform)
    p.add_argument("--logit-mean", type=float, default=f.logit_mean)
    p.add_argument("--logit-std", type=float, default=f.logit_std)
    p.add_argument("--layer0-gamma", type=float, default=f.layer0_gamma)


def noise_seed(seed: int, rank: int, step: int) -> int:
    """The noise of a step depends only on (seed, rank, step), so a resumed run draws the same noise."""
    return hash((seed, rank, step)) & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def run(args: argparse.Namespace) -> int:
    # ------------------------------------------------------------------ distributed set-up
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    ddp = world_size > 1
    if ddp:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return train(args, device, rank, world_size)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> int:
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out = Path(args.out)
    cfg = PRESETS[args.preset]
    flow_cfg = FlowConfig(args.prediction, args.p_uniform, args.logit_mean, args.logit_std, args.layer0_gamma)

    # ------------------------------------------------------------------ data (fails early on bad input)
    urls = expand_shards(args.shards)
    info = probe_shards(urls, cfg.image_size)
    if info.resized:
        say(f"note: shards are {info.width}x{info.height}, preset {args.preset} is {cfg.image_size}x"
            f"{cfg.image_size}: resizing (rgb bilinear, points nearest)")
    if info.num_layers != cfg.num_layers:
        say(f"note: shards hold {info.num_layers} layers, preset {args.preset} uses {cfg.num_layers} "
            f"({'first ones kept' if info.num_layers > cfg.num_layers else 'padding as missing'})")
    loader_cfg = LoaderConfig(args.batch, cfg.image_size, cfg.num_layers, args.workers, args.shuffle_buffer,
                              args.epoch_samples, args.seed, world_size)
    order = {"seed": args.seed, "batch": args.batch, "workers": args.workers,
             "epoch_samples": args.epoch_samples, "shuffle_buffer": args.shuffle_buffer,
             "world_size": world_size}

    # ------------------------------------------------------------------ model, EMA, optimizer
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    ema = deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    step = 0
    if args.resume:
        ckpt = read_checkpoint(out / "last.pt")
        check_preset(ckpt, out / "last.pt", args.preset)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        changed = [k for k in DATA_ORDER_KEYS if ckpt["train"].get(k) != order[k]]
        if changed:
            say(f"note: resuming with other {', '.join(changed)} than the checkpoint: the data order differs")
        say(f"resuming {out / 'last.pt'} at step {step}")
    elif (out / "last.pt").exists():
        raise CheckpointError(f"run folder {out}: last.pt exists; pass --resume or choose another --out")
    if master:
        out.mkdir(parents=True, exist_ok=True)
    raw_model = model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # ------------------------------------------------------------------ logging
    log_file = writer = None
    if master:
        new_log = not (args.resume and (out / "log.csv").exists())
        log_file = open(out / "log.csv", "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "epoch", "loss", "loss_flow", "loss_valid", "lr", "grad_norm", "samples_per_s"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:  # TensorBoard is optional
            writer = None
    bar = tqdm(total=args.steps, initial=step, disable=not master or args.no_progress, unit="step",
               dynamic_ncols=True)

    def save(path: Path) -> None:
        if master:
            save_checkpoint(path, {"model": raw_model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "step": step, "config": cfg.to_dict(),
                                   "flow": flow_cfg.to_dict(), "train": order})
        if world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ training loop
    gen = torch.Generator()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, loss_flow, loss_valid, steps since the last log
    t_log = time.perf_counter()
    model.train()
    while step < args.steps:
        epoch, skip = divmod(step, loader_cfg.batches_per_epoch)
        for batch in train_loader(urls, loader_cfg, epoch, skip):
            lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            gen.manual_seed(noise_seed(args.seed, rank, step))
            with autocast:
                loss, parts = flow_loss(model, batch, flow_cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            update_ema(ema, raw_model, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            sums += torch.tensor([loss.item(), parts["loss_flow"].item(), parts["loss_valid"].item(), 1.0],
                                 dtype=torch.float64)

            if step % args.log_every == 0 or step == args.steps:
                if world_size > 1:  # average over ranks (gloo and nccl both reduce CPU/GPU tensors)
                    sums_dev = sums.to(device)
                    dist.all_reduce(sums_dev)
                    sums = sums_dev.cpu()
                n = sums[3].item()
                mean = (sums[:3] / n).tolist()
                rate = n * args.batch / (time.perf_counter() - t_log)  # n counts every rank's steps
                if master:
                    log.writerow([step, epoch, *[f"{v:.6g}" for v in mean], f"{lr:.3g}",
                                  f"{grad_norm.item():.4g}", f"{rate:.2f}"])
                    log_file.flush()
                    if writer is not None:
                        for name, v in zip(("loss", "loss_flow", "loss_valid"), mean):
                            writer.add_scalar(f"train/{name}", v, step)
                        writer.add_scalar("train/samples_per_s", rate, step)
                    bar.set_postfix(loss=f"{mean[0]:.4f}", samples_s=f"{rate:.1f}")
                sums.zero_()
                t_log = time.perf_counter()
            bar.update(1)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(out / "last.pt")
            if step == args.steps or step % loader_cfg.batches_per_epoch == 0:
                break
    bar.close()
    if master:
        log_file.close()
        if writer is not None:
            writer.close()
        say(f"done: {step} steps, checkpoint {out / 'last.pt'}")
    return 0


if __name__ == "__main__":
    from wt_model.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
