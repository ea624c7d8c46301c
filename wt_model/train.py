"""Train a WT-DiT on layered shards; reads top to bottom.

    wt-model train --shards 'out/shard-{000000..000031}.tar' --preset tiny --steps 2000 --out runs/tiny
    torchrun --nproc_per_node 2 -m wt_model.train --shards ... --preset tiny --steps 2000 --out runs/tiny

Under torchrun the model runs in DistributedDataParallel (gloo on CPU, nccl on GPU), the shards are split
by node and worker, losses are averaged over ranks and only rank 0 writes checkpoints, logs and evaluations.

Settings (model, encoder, objective, normalisation, optimisation, data order: :data:`SETTINGS`) are stored in
the checkpoint. ``--resume`` continues ``OUT/last.pt`` exactly: weights, optimizer, EMA, step, the data
position (the data order is a function of seed, epoch, rank and worker; the partial epoch is skipped before
decoding, undecodable samples included) and the settings: a setting left out is taken from the checkpoint,
one given with another value is refused with one line. ``--steps``, ``--workers``, logging, evaluation and
checkpoint cadence, ``--compile`` and ``--tensorboard`` may change. Run with the same workers and world size
for a bit-identical continuation.

Each optimizer step accumulates ``--accum`` micro-batches of ``--batch`` samples per rank. The learning rate
warms up linearly for ``--warmup`` steps, then follows a cosine to ``--min-lr-ratio`` x lr at
``--decay-steps`` (default: this run's ``--steps``; ``--schedule constant`` keeps it flat). bf16 autocast on
GPUs that support it. Losses stay on the device between log steps (one host sync per log step).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from wt_datagen.console import Progress
from wt_model.checkpoint import CheckpointError, check_encoder_weights, read_checkpoint, save_checkpoint
from wt_model.clip_metrics import score_clip_batches
from wt_model.clips import ClipConfig, clip_train_loader, heldout_windows, probe_clips, window_batches
from wt_model.data import (
    NORMALISATIONS,
    LoaderConfig,
    Normalisation,
    collect_heldout,
    eval_batches,
    expand_shards,
    probe_shards,
    read_stats,
    train_loader,
)
from wt_model.encoder import ENCODERS, EncoderError, load_encoder
from wt_model.flow import CLOCKS, FILLS, FlowConfig, flow_loss
from wt_model.metrics import mean_scores, score_batches
from wt_model.models import PRESETS, WTDiT, configure

# Settings kept by --resume (a conflicting flag is refused), with their defaults.
SETTINGS = {
    "preset": "tiny", "image_encoder": "none", "norm": "median-log", "prediction": "x0", "clock": "shared",
    "fill": "repeat", "p_uniform": 0.3, "logit_mean": -0.4, "logit_std": 1.0, "layer0_gamma": 1.5,
    "batch": 8, "accum": 1, "lr": 3e-4, "schedule": "cosine", "warmup": 100, "decay_steps": None,
    "min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0, "ema": 0.999, "seed": 0,
    "epoch_samples": 10_000, "shuffle_buffer": 256, "val_fraction": 0.0,
    "clips": False, "clip_length": 4, "frame_stride": 1, "window_stride": 0, "single_frame": 0.25,
}
DATA_ORDER_NOTES = ("workers", "world_size")  # may change on resume; the data order then differs


class TrainError(ValueError):
    """A training option that cannot work; ``run`` prints it as one line and exits 2 (like the errors
    ``wt-model`` itself catches)."""


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern or glob of .tar shards")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    p.add_argument("--out", required=True, help="run folder: last.pt, log.csv, eval.csv, tb/")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt with its settings")
    s = SETTINGS  # defaults are applied after --resume is resolved: None means "not given"
    p.add_argument("--preset", choices=list(PRESETS), help=f"model size ({s['preset']})")
    p.add_argument("--image-encoder", choices=["none", *ENCODERS],
                   help="frozen DINOv2 image encoder (none); needs --encoder-weights")
    p.add_argument("--encoder-weights", default=None, help="local weights file of the image encoder")
    p.add_argument("--norm", choices=NORMALISATIONS, help="point normalisation (median-log)")
    p.add_argument("--norm-stats", default=None, help="wt-model stats JSON for --norm zscore")
    p.add_argument("--prediction", choices=["x0", "velocity"], help="what the network predicts (x0)")
    p.add_argument("--clock", choices=CLOCKS, help="one t per sample (shared) or per-layer clocks (layered)")
    p.add_argument("--fill", choices=FILLS, help="missing layers in x_t: repeat the last point or fresh noise")
    for key in ("p_uniform", "logit_mean", "logit_std", "layer0_gamma", "lr", "min_lr_ratio", "weight_decay",
                "grad_clip", "ema", "val_fraction", "single_frame"):
        p.add_argument(flag(key), type=float, help=f"({s[key]})")
    p.add_argument("--clips", action="store_const", const=True,
                   help="train the clip model on sequence clips: windows of --clip-length frames, a temporal block "
                        "after every global block (--batch and --epoch-samples count windows)")
    for key in ("batch", "accum", "warmup", "decay_steps", "seed", "epoch_samples", "shuffle_buffer", "clip_length",
                "frame_stride", "window_stride"):
        p.add_argument(flag(key), type=int, help=f"({s[key] if s[key] is not None else '--steps'})")
    p.add_argument("--schedule", choices=["cosine", "constant"], help="learning rate after warm-up (cosine)")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this checkpoint's EMA weights (an image model starts a clip model: its "
                        "temporal blocks start as the identity)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (0: main process)")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate the held-out views every N steps")
    p.add_argument("--eval-views", type=int, default=32, help="held-out views per evaluation")
    p.add_argument("--eval-steps", type=int, default=10, help="Euler steps per evaluation sample")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPUs")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard event files to OUT/tb")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


# ----------------------------------------------------------------------------- settings and schedule


def resolve_settings(args: argparse.Namespace, kept: dict | None, path: Path) -> dict:
    """The run's settings: the checkpoint's (``kept``) on --resume, refusing a flag that says otherwise;
    else the flags, defaults for those not given."""
    out = {}
    for key, default in SETTINGS.items():
        given = getattr(args, key)
        if kept is not None and key in kept:
            if given is not None and given != kept[key]:
                raise CheckpointError(f"{flag(key)} {given} conflicts with {kept[key]!r} in {path}: --resume keeps "
                                      "the checkpoint's settings (drop the flag, or start a new --out)")
            out[key] = kept[key]
        else:
            out[key] = given if given is not None else default
    if out["decay_steps"] is None:
        out["decay_steps"] = args.steps
    if out["batch"] < 1 or out["accum"] < 1:
        raise TrainError(f"--batch {out['batch']} and --accum {out['accum']} must be at least 1")
    return out


def learning_rate(step: int, s: dict) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio`` x lr at ``decay_steps`` (flat
    after), or constant."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    if s["schedule"] == "constant":
        return s["lr"]
    progress = min(1.0, (step - s["warmup"]) / max(s["decay_steps"] - s["warmup"], 1))
    return s["lr"] * (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_from(model: WTDiT, path: str, norm: Normalisation, say) -> None:
    """Load a checkpoint's EMA weights into a new run's model of the same architecture, with or without temporal
    blocks: blocks the checkpoint lacks keep their initialisation (the identity), blocks the model lacks are
    dropped. Another architecture or normalisation is refused with one line."""
    src = read_checkpoint(path)
    mine = {k: v for k, v in model.cfg.to_dict().items() if k not in ("temporal", "preset")}
    theirs = {k: v for k, v in src["config"].items() if k not in ("temporal", "preset")}
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        raise CheckpointError(f"--init-from {path}: another architecture ({', '.join(differ)} differ)")
    if Normalisation.from_dict(src.get("norm")) != norm:
        raise CheckpointError(f"--init-from {path}: trained with another point normalisation")
    state = {k: v for k, v in src.get("ema", src["model"]).items()
             if model.temporal is not None or not k.startswith("temporal.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if not k.startswith(("temporal.", "encoder."))] + list(unexpected)
    if wrong:
        raise CheckpointError(f"--init-from {path}: weights do not match ({wrong[0]})")
    new = "; its temporal blocks start as the identity" if any(k.startswith("temporal.") for k in missing) else ""
    say(f"starting from the weights of {path} (step {src['step']}){new}")


def noise_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """The noise of a micro-batch depends only on (seed, rank, step, micro), so a resumed run draws the same."""
    return hash((seed, rank, step, micro)) & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def update_ema(ema: WTDiT, model: WTDiT, decay: float) -> None:
    for e, p in zip(ema.denoiser_parameters(), model.denoiser_parameters()):
        e.lerp_(p, 1.0 - decay)


# ----------------------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> int:
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
    except TrainError as e:
        print(f"wt-model train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> int:
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out = Path(args.out)
    ckpt = None
    if args.resume:
        ckpt = read_checkpoint(out / "last.pt")
    elif (out / "last.pt").exists():
        raise CheckpointError(f"run folder {out}: last.pt exists; pass --resume or choose another --out")
    s = resolve_settings(args, ckpt["train"] if ckpt else None, out / "last.pt")

    # ------------------------------------------------------------------ model config, encoder, normalisation
    try:
        cfg, note = configure(s["preset"], s["image_encoder"])
    except ValueError as e:
        raise TrainError(str(e)) from None
    if note:
        say(note)
    clips = None
    if s["clips"]:
        clips = ClipConfig(s["clip_length"], s["frame_stride"], s["window_stride"])
        cfg = replace(cfg, temporal=True)
    encoder = None
    if ckpt is not None:
        check_encoder_weights(ckpt, out / "last.pt", args.encoder_weights)
    if cfg.encoder != "none":
        if args.encoder_weights is None:
            raise EncoderError(f"image encoder {cfg.encoder}: pass its weights file with --encoder-weights "
                               "(nothing is downloaded)")
        encoder = load_encoder(cfg.encoder, args.encoder_weights)
    elif args.encoder_weights is not None:
        raise EncoderError(f"encoder weights {args.encoder_weights} given without --image-encoder")
    if ckpt is not None:
        norm = Normalisation.from_dict(ckpt.get("norm"))
        if args.norm_stats is not None and read_stats(args.norm_stats) != norm:
            raise CheckpointError(f"--norm-stats {args.norm_stats} differs from the statistics in "
                                  f"{out / 'last.pt'}: --resume keeps the checkpoint's settings")
    elif s["norm"] == "zscore":
        if args.norm_stats is None:
            raise TrainError("--norm zscore needs --norm-stats FILE (from `wt-model stats`)")
        norm = read_stats(args.norm_stats)
    else:
        if args.norm_stats is not None:
            raise TrainError("--norm-stats is for --norm zscore")
        norm = Normalisation()
    flow_cfg = FlowConfig(s["prediction"], s["p_uniform"], s["logit_mean"], s["logit_std"], s["layer0_gamma"],
                          clock=s["clock"], fill=s["fill"], single_frame=s["single_frame"] if clips else 0.0)

    # ------------------------------------------------------------------ data (fails early on bad input)
    urls = expand_shards(args.shards)
    info = probe_clips(urls, cfg.image_size, clips) if clips else probe_shards(urls, cfg.image_size)
    if info.resized:
        say(f"note: shards are {info.width}x{info.height}, the model trains at {cfg.image_size}x"
            f"{cfg.image_size}: resizing (rgb bilinear, points nearest)")
    if info.num_layers != cfg.num_layers:
        say(f"note: shards hold {info.num_layers} layers, preset {s['preset']} uses {cfg.num_layers} "
            f"({'first ones kept' if info.num_layers > cfg.num_layers else 'padding as missing'})")
    loader_cfg = LoaderConfig(s["batch"], cfg.image_size, cfg.num_layers, args.workers, s["shuffle_buffer"],
                              s["epoch_samples"], s["seed"], world_size, norm, s["val_fraction"])
    bpe, W = loader_cfg.batches_per_epoch, loader_cfg.workers
    if not master:
        heldout, bad_heldout = [], 0
    elif clips:
        heldout, bad_heldout = heldout_windows(urls, clips, s["val_fraction"], max(1, args.eval_views // clips.length))
    else:
        heldout, bad_heldout = collect_heldout(urls, s["val_fraction"], args.eval_views)
    if master and s["val_fraction"] > 0:
        say(f"held-out split: {len(heldout)} {'windows' if clips else 'views'} of held-out assets (fraction "
            f"{s['val_fraction']}, by asset)"
            + (f"; {bad_heldout} undecodable held-out view{'s' * (bad_heldout > 1)} skipped" if bad_heldout else "")
            if heldout else f"note: no held-out asset among the shards at --val-fraction {s['val_fraction']}")

    # ------------------------------------------------------------------ model, EMA, optimizer
    torch.manual_seed(s["seed"])  # identical initial weights on every rank
    model = WTDiT(cfg, encoder).to(device)
    if args.init_from is not None and ckpt is None:
        init_from(model, args.init_from, norm, say)
    ema = WTDiT(cfg, model.encoder).to(device)  # shares the frozen encoder
    ema.load_denoiser_state_dict(model.denoiser_state_dict())
    ema.requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.denoiser_parameters(), lr=s["lr"], betas=(0.9, 0.95),
                            weight_decay=s["weight_decay"])
    step, bad_in_epoch = 0, [0] * W
    if ckpt is not None:
        model.load_denoiser_state_dict(ckpt["model"])
        ema.load_denoiser_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        data = ckpt.get("data", {})
        rows = data.get("bad_in_epoch", [])
        if data.get("workers") == W and rank < len(rows):
            bad_in_epoch = [int(v) for v in rows[rank]]
        changed = [k for k in DATA_ORDER_NOTES if ckpt["train"].get(k) != {"workers": args.workers,
                                                                          "world_size": world_size}[k]]
        if changed:
            say(f"note: resuming with other {', '.join(changed)} than the checkpoint: the data order differs")
        say(f"resuming {out / 'last.pt'} at step {step}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
    raw_model = model
    if world_size > 1:
        # clip runs: a frame-by-frame step leaves the temporal blocks out of the graph
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=clips is not None)
    if args.compile:
        model = torch.compile(model)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and not args.no_bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    record = {**s, "workers": args.workers, "world_size": world_size}
    enc_record = ({"name": "none", "file": None, "sha256": None} if encoder is None
                  else {"name": cfg.encoder, **encoder.weights})

    # ------------------------------------------------------------------ logging
    log_file = eval_file = writer = progress = None
    if master:
        new_log = not (args.resume and (out / "log.csv").exists())
        log_file = open(out / "log.csv", "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "epoch", "loss", "loss_flow", "loss_valid", "lr", "grad_norm", "samples_per_s",
                          "bad_samples"])
        if heldout:
            new_eval = not (args.resume and (out / "eval.csv").exists())
            eval_file = open(out / "eval.csv", "w" if new_eval else "a", newline="")
            eval_log = csv.writer(eval_file)
            if new_eval:
                eval_log.writerow(["step", "val_loss", "chamfer_all", "fscore_all", "iou", "abs_rel", "views"]
                                  + (["track_epe"] if clips else []))
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            writer = SummaryWriter(str(out / "tb"))
        if not args.no_progress:
            progress = Progress(args.steps, unit="step", desc="train", initial=step)

    def save(path: Path, micro: int) -> None:
        rows = torch.zeros(world_size, W, dtype=torch.float64)
        rows[rank] = torch.tensor(bad_in_epoch if micro % bpe else [0] * W, dtype=torch.float64)
        if world_size > 1:  # every rank's count of undecodable samples, for its exact resume
            rows_dev = rows.to(device)
            dist.all_reduce(rows_dev)
            rows = rows_dev.cpu()
        if master:
            save_checkpoint(path, {
                "model": raw_model.denoiser_state_dict(), "ema": ema.denoiser_state_dict(),
                "optimizer": opt.state_dict(), "step": step, "config": cfg.to_dict(), "flow": flow_cfg.to_dict(),
                "norm": norm.to_dict(), "encoder": enc_record, "train": record,
                "data": {"workers": W, "bad_in_epoch": rows.long().tolist()}})
        if world_size > 1:
            dist.barrier()

    def evaluate_heldout() -> None:
        gen = torch.Generator().manual_seed(s["seed"])
        losses = []

        def batches():
            if clips:
                return window_batches(heldout, s["batch"], cfg.image_size, cfg.num_layers, norm)
            return eval_batches(heldout, s["batch"], cfg.image_size, cfg.num_layers, norm)

        with torch.no_grad(), autocast:
            for b in batches():
                b = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
                losses.append(flow_loss(ema, b, flow_cfg, gen)[0].float().item())
        extra = []
        with autocast:
            if clips:  # the clip run only: its per-frame figures and the motion error on the tracks
                scores, video = score_clip_batches(ema, flow_cfg, norm, batches(), args.eval_steps, gen,
                                                   baseline=False)[:2]
                extra = [video.clip.epe]
            else:
                scores = score_batches(ema, flow_cfg, norm, batches(), args.eval_steps, gen)
            m = mean_scores(scores)
        row = [step, float(np.mean(losses)), m.chamfer_all, m.fscore_all, m.iou, m.abs_rel, m.views]
        eval_log.writerow([row[0], *[f"{v:.6g}" for v in row[1:6]], m.views, *[f"{v:.6g}" for v in extra]])
        eval_file.flush()
        if writer is not None:
            for name, v in zip(("loss", "chamfer_all", "fscore_all", "iou", "abs_rel"), row[1:6]):
                writer.add_scalar(f"val/{name}", v, step)
        text = (f"eval step {step}: val loss {row[1]:.4f}, chamfer {m.chamfer_all:.4f}, fscore "
                f"{m.fscore_all:.3f}, iou {m.iou:.3f}, abs_rel {m.abs_rel:.4f} ({m.views} held-out views"
                + (f"; track motion error {extra[0]:.4f})" if extra else ")"))
        if progress is not None:
            progress.write(text)
        else:
            say(text)

    # ------------------------------------------------------------------ training loop
    def micro_batches(micro: int):
        """(index in epoch, batch) from micro-batch ``micro`` on, across epochs."""
        nonlocal bad_in_epoch
        while True:
            epoch, skip = divmod(micro, bpe)
            if skip == 0:
                bad_in_epoch = [0] * W
            loader = (clip_train_loader(urls, loader_cfg, clips, epoch, skip, tuple(bad_in_epoch)) if clips
                      else train_loader(urls, loader_cfg, epoch, skip, tuple(bad_in_epoch)))
            for batch in loader:
                yield epoch, micro % bpe, batch
                micro += 1
                if micro % bpe == 0:
                    break

    gen = torch.Generator()
    sums = torch.zeros(4, device=device)  # loss, loss_flow, loss_valid, grad_norm summed since the last log
    logged_steps, bad_total, bad_since_log = 0, 0, 0  # undecodable samples, this session, all ranks
    t_log = time.perf_counter()
    model.train()
    stream = micro_batches(step * s["accum"])
    try:
        while step < args.steps:
            lr = learning_rate(step, s)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            for i in range(s["accum"]):
                epoch, index, batch = next(stream)
                bad, bad_tar = int(batch.pop("bad").sum()), int(batch.pop("bad_tar").sum())
                bad_in_epoch[index % W] += bad
                bad_since_log += bad + bad_tar
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
                gen.manual_seed(noise_seed(s["seed"], rank, step, i))
                sync = nullcontext() if world_size == 1 or i == s["accum"] - 1 else raw_model_no_sync(model)
                with sync:
                    with autocast:
                        loss, parts = flow_loss(model, batch, flow_cfg, gen)
                    (loss / s["accum"]).backward()
                sums[:3] += torch.stack([loss.detach(), parts["loss_flow"], parts["loss_valid"]]).float() / s["accum"]
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.denoiser_parameters(), s["grad_clip"])
            opt.step()
            update_ema(ema, raw_model, min(s["ema"], (1 + step) / (10 + step)))
            step += 1
            sums[3] += grad_norm.detach().float()
            logged_steps += 1

            if step % args.log_every == 0 or step == args.steps:
                totals = torch.cat([sums, torch.tensor([bad_since_log], dtype=sums.dtype, device=device)])
                if world_size > 1:  # average over ranks (gloo and nccl both reduce CPU/GPU tensors)
                    dist.all_reduce(totals)
                    totals[:4] /= world_size
                values = totals.tolist()  # the one host sync of a log step
                values, bad_total = [v / logged_steps for v in values[:4]], bad_total + int(values[4])
                bad_since_log = 0
                rate = logged_steps * s["batch"] * s["accum"] * world_size / (time.perf_counter() - t_log)
                if master:
                    log.writerow([step, epoch, *[f"{v:.6g}" for v in values[:3]], f"{lr:.3g}",
                                  f"{values[3]:.4g}", f"{rate:.2f}", bad_total])
                    log_file.flush()
                    if writer is not None:
                        for name, v in zip(("loss", "loss_flow", "loss_valid", "grad_norm"), values):
                            writer.add_scalar(f"train/{name}", v, step)
                        writer.add_scalar("train/lr", lr, step)
                        writer.add_scalar("train/samples_per_s", rate, step)
                    if progress is not None:
                        progress.extra = (f"loss {values[0]:.4f}, {rate:.1f} samples/s"
                                          + (f", {bad_total} bad samples skipped" if bad_total else ""))
                sums.zero_()
                logged_steps, t_log = 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(out / "last.pt", step * s["accum"])
            if heldout and (step % args.eval_every == 0 or step == args.steps):
                evaluate_heldout()
            if world_size > 1 and s["val_fraction"] > 0 and (step % args.eval_every == 0 or step == args.steps):
                dist.barrier()
    finally:
        stream.close()
        if progress is not None:
            progress.close()
        for f in (log_file, eval_file):
            if f is not None:
                f.close()
        if writer is not None:
            writer.close()
    say(f"done: {step} steps, checkpoint {out / 'last.pt'}" + (f", {bad_total} bad samples skipped" if bad_total
                                                                 else ""))
    return 0


def raw_model_no_sync(model):
    """DDP's ``no_sync`` (no gradient all-reduce) for the micro-batches before the last of an accumulation."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    return inner.no_sync()


if __name__ == "__main__":
    from wt_model.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
