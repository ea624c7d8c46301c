"""Evaluation on clips: per-frame layered scores, and temporal consistency on the clips' tracks against a
per-frame baseline; ``wt-model eval`` (with ``--clips``; without, it scores views: :mod:`wt_model.metrics`).

Every window of T frames (``wt_model.clips``) is sampled twice from the same checkpoint: as one clip (the
temporal blocks over its T frames, one normalisation for the clip) and frame by frame (T = 1: the image model,
each frame normalised on its own, which ignores time). Reported:
- per-frame layered figures of the clip run, exactly as ``wt-model eval`` scores views (``metrics.score_view``),
  averaged over frames;
- the temporal consistency (:mod:`wt_model.consistency`): the end-point error of the motion of visible tracks
  between consecutive frames, scale-aligned once per window (``clip``) and, apart, once per frame
  (``frame``), for the clip run and the per-frame run, their ratio (below 1: the clip run moves more like the
  tracks), the ground-truth pointmaps' floor and the mean track motion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wt_model.checkpoint import load_model, read_checkpoint
from wt_model.clips import ClipConfig, clip_eval_loader, probe_clips
from wt_model.consistency import MotionErrors, motion_errors
from wt_model.data import Normalisation, expand_shards
from wt_model.metrics import Report, Scores, format_report, mean_scores, median_scores, score_view
from wt_model.metrics import add_arguments as metrics_add_arguments
from wt_model.metrics import run as metrics_run
from wt_model.postprocess import FlyingPointFilter
from wt_model.sampler import postprocess, sample


@dataclass
class Motion:
    """Motion errors of one way of predicting, with the window scale (``clip``) and per-frame scales."""

    clip: MotionErrors = field(default_factory=MotionErrors)
    frame: MotionErrors = field(default_factory=MotionErrors)


@dataclass
class ClipReport:
    """What :func:`evaluate_clips` returns."""

    mean: Scores  # per-frame layered scores of the clip run, mean over frames
    median: Scores
    video: Motion  # the clip run (temporal blocks over the window)
    per_frame: Motion  # the same checkpoint frame by frame (T = 1)
    floor: Motion  # the ground-truth pointmaps
    windows: int = 0
    frames: int = 0

    @property
    def ratio(self) -> float:
        """Clip-aligned EPE of the clip run over that of the per-frame run (nan without pairs)."""
        b = self.per_frame.clip.epe
        return self.video.clip.epe / b if b > 0 else float("nan")


def _unbatch(batch: dict, i: int) -> dict:
    return {"points": batch["points"][i].numpy(), "valid": batch["valid"][i].numpy(),
            "scale": float(batch["scale"][i]), "world_to_cam": batch["world_to_cam"][i].numpy().astype(np.float64),
            "tracks": {k: np.asarray(v) for k, v in batch["tracks"][i].items()}}


def _predict(model, flow_cfg, norm, rgb: torch.Tensor, frames: int, steps: int, gen, flying):
    """rgb (B,T,3,S,S) -> per window (T,K,H,W,3) points and (T,K,H,W) masks, sampled as clips of ``frames``."""
    B, T = rgb.shape[:2]
    device = next(model.parameters()).device
    points, prob = sample(model, rgb.flatten(0, 1).to(device), flow_cfg, steps, gen, frames=frames)
    points, prob = points.float().cpu().numpy(), prob.float().cpu().numpy()
    out = []
    for b in range(B):
        pp = [postprocess(points[b * T + i], prob[b * T + i], norm, flying) for i in range(T)]
        out.append((np.stack([p for p, _ in pp]), np.stack([v for _, v in pp])))
    return out


def score_clip_batches(model, flow_cfg, norm: Normalisation, batches, steps: int = 20,
                       generator: torch.Generator | None = None, align: str = "scale",
                       flying: FlyingPointFilter | None = None, baseline: bool = True):
    """Sample and score every window of ``batches`` (the clip loaders' batches, with tracks): (per-frame
    Scores of the clip run, Motion of the clip run, of the per-frame run (None without ``baseline``), of the
    ground truth, windows)."""
    scores, video, per_frame, floor, windows = [], Motion(), Motion() if baseline else None, Motion(), 0
    for batch in batches:
        T = batch["rgb"].shape[1]
        runs = [("video", _predict(model, flow_cfg, norm, batch["rgb"], T, steps, generator, flying))]
        if baseline:
            runs.append(("frame", _predict(model, flow_cfg, norm, batch["rgb"], 1, steps, generator, flying)))
        for i in range(len(batch["rgb"])):
            w = _unbatch(batch, i)
            gt = norm.inverse(w["points"].transpose(0, 1, 3, 4, 2).astype(np.float64), w["scale"])  # (T,K,H,W,3)
            tr = w["tracks"]
            args = (w["world_to_cam"], tr["uv"], tr["layer_index"], tr["world_xyz"])
            gv = w["valid"][:, 0]
            floor.clip += motion_errors(gt[:, 0], gv, gt[:, 0], gv, *args)
            floor.frame += motion_errors(gt[:, 0], gv, gt[:, 0], gv, *args, align="frame")
            for name, preds in runs:
                pred, pred_valid = preds[i]
                into = video if name == "video" else per_frame
                into.clip += motion_errors(pred[:, 0], pred_valid[:, 0], gt[:, 0], gv, *args)
                into.frame += motion_errors(pred[:, 0], pred_valid[:, 0], gt[:, 0], gv, *args, align="frame")
                if name == "video":
                    scores += [score_view(pred[t], pred_valid[t], gt[t], w["valid"][t], align) for t in range(T)]
            windows += 1
    return scores, video, per_frame, floor, windows


def evaluate_clips(checkpoint: str, shards: str, clips: ClipConfig | None = None, batch: int = 2,
                   steps: int = 20, limit: int | None = None, seed: int = 0, align: str = "scale",
                   encoder_weights: str | None = None, flying: FlyingPointFilter | None = None) -> ClipReport:
    """Sample every window of the clips of ``shards`` (up to ``limit`` windows) as a clip and frame by frame,
    and score both (module docstring). ``clips``: the windows (default: the checkpoint's training length,
    side by side)."""
    model, flow_cfg, ckpt = load_model(checkpoint, encoder_weights=encoder_weights)
    norm = Normalisation.from_dict(ckpt.get("norm"))
    clips = clips or ClipConfig(length=int(ckpt.get("train", {}).get("clip_length") or 4))
    urls = expand_shards(shards)
    if probe_clips(urls, model.cfg.image_size, clips).resized:
        print(f"note: shards are resized to the model's {model.cfg.image_size}x{model.cfg.image_size}")
    if not model.cfg.temporal:
        print("note: the checkpoint has no temporal blocks (an image model): its clip run is frame by frame too")
    gen = torch.Generator().manual_seed(seed)
    batches = clip_eval_loader(urls, batch, model.cfg.image_size, model.cfg.num_layers, clips, limit, norm)
    scores, video, per_frame, floor, windows = score_clip_batches(model, flow_cfg, norm, batches, steps, gen, align,
                                                                  flying)
    return ClipReport(mean_scores(scores), median_scores(scores), video, per_frame, floor, windows, len(scores))


def format_clip_report(r: ClipReport) -> list[str]:
    """Printable lines of a :class:`ClipReport` (after the per-frame figures of ``metrics.format_report``)."""
    m = r.video.clip

    def row(name: str, x: Motion) -> str:
        return f"  {name:22s} {x.clip.epe:10.4f} {x.frame.epe:10.4f}"

    return [f"temporal consistency: {r.windows} windows, {m.pairs} track pairs visible in consecutive frames, "
            f"mean track motion {m.motion:.4f} (end-point error of the motion / scene depth)",
            f"  {'':22s} {'clip scale':>10s} {'frame scale':>10s}",
            row("clip (temporal)", r.video), row("per frame (T = 1)", r.per_frame),
            row("ground truth (floor)", r.floor),
            f"  ratio clip / per frame  {r.ratio:.3f}"]


def add_arguments(p) -> None:
    """``wt-model eval``: the view flags of :mod:`wt_model.metrics`, plus the clip ones."""
    metrics_add_arguments(p)
    p.add_argument("--clips", action="store_true",
                   help="score clip windows: per-frame figures and temporal consistency on the tracks")
    p.add_argument("--clip-length", type=int, default=None, help="frames per window (the checkpoint's)")
    p.add_argument("--frame-stride", type=int, default=1, help="clip frames between a window's frames")
    p.add_argument("--window-stride", type=int, default=0, help="clip frames between windows (0: side by side)")


def run(args) -> int:
    if not args.clips:
        return metrics_run(args)
    clips = None
    if args.clip_length is not None or args.frame_stride != 1 or args.window_stride:
        length = args.clip_length or int(read_checkpoint(args.checkpoint).get("train", {}).get("clip_length") or 4)
        clips = ClipConfig(length, args.frame_stride, args.window_stride)
    r = evaluate_clips(args.checkpoint, args.shards, clips, args.batch, args.steps, args.limit, args.seed,
                       args.align, args.encoder_weights, FlyingPointFilter() if args.filter else None)
    print("\n".join(format_report(Report(r.mean, r.median, r.frames), args.align)))
    print("\n".join(format_clip_report(r)))
    return 0
