"""Sample layered pointmaps from images with a trained WT-DiT (Euler, 20 steps by default).

    wt-model sample --checkpoint runs/NAME/last.pt --image photo.png --out pred/ [--encoder-weights FILE]

Writes, per image, ``NAME.npz`` (``points`` (K,H,W,3) float32 camera-space points, in units of the median
visible depth (median-log normalisation) or in scene units (zscore), ``valid`` (K,H,W) bool after the
flying-point filter (``--no-filter`` keeps every point the validity head accepts), ``valid_prob`` (K,H,W)
float32, and with ``--intrinsics`` ``K`` (3,3) recovered from the layer-0 points) and ``NAME.ply`` (the
valid points of all layers, coloured by the image for layer 0 and by layer index behind it).

    wt-model sample --checkpoint runs/clips/last.pt --video clip.mp4 --out pred/     # or a folder of frames

writes the same two files per frame (``{stem}_f{i:04d}`` for a video file, the image's stem for a folder;
:mod:`wt_model.frames`). A clip model (trained with ``--clips``) generates windows of its clip length T that
overlap by one frame; every window after the first is scaled to agree with the one before on their shared
frame (least squares on the layer-0 points valid in both), so the whole video comes out in the first window's
units. An image model generates frame by frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wt_model.checkpoint import load_model
from wt_model.data import DataError, Normalisation, resize_rgb
from wt_model.flow import FlowConfig, euler_step, layer_times, predict
from wt_model.frames import iter_frames
from wt_model.models import WTDiT
from wt_model.postprocess import FlyingPointFilter, filter_flying_points, intrinsics_from_points, monotone

LAYER_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                          [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


@torch.no_grad()
def sample(model: WTDiT, rgb: torch.Tensor, cfg: FlowConfig, steps: int = 20,
           generator: torch.Generator | None = None, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration of the flow from s = 1 (noise) to s = 0 with the flow's clocks (see flow.py); the
    image tokens are computed once. The last step lands exactly on the network's x0 prediction for every
    layer (:func:`wt_model.flow.euler_step`).

    rgb (B,3,H,W) in [-1, 1], H and W multiples of the patch -> (normalised points (B,K,3,H,W), validity
    probabilities (B,K,H,W) of the last step, where the sample is nearly clean). ``frames``: B holds clips of
    this many frames, frame-major, generated together (one clock for the whole clip)."""
    B, K, (H, W) = rgb.shape[0], model.cfg.num_layers, rgb.shape[-2:]
    x = torch.randn((B, K, 3, H, W), generator=generator).to(rgb.device)
    image_tokens = model.encode(rgb)
    s_grid = torch.linspace(1.0, 0.0, steps + 1, device=rgb.device)
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        t = layer_times(s.expand(B), K, cfg)  # (B,K)
        t_next = layer_times(s_next.expand(B), K, cfg)
        x0_hat, v_hat, valid_logits = predict(model, x, t, rgb, cfg, image_tokens, frames)
        x = euler_step(x, x0_hat, v_hat, t, t_next, cfg)
    return x, torch.sigmoid(valid_logits)


def postprocess(points: np.ndarray, valid_prob: np.ndarray, norm: Normalisation | None = None,
                flying: FlyingPointFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (K,3,H,W) and probabilities (K,H,W) -> camera-space points (K,H,W,3) (module docstring for
    the units) and a validity mask made monotone along K (a layer exists only behind an existing one), without
    flying points when ``flying`` is given. Non-finite points are never valid."""
    pts = (norm or Normalisation()).inverse(points.transpose(0, 2, 3, 1).astype(np.float64))
    valid = monotone((valid_prob > 0.5) & np.isfinite(pts).all(axis=-1))
    if flying is not None:
        valid = filter_flying_points(pts, valid, flying)
    return pts.astype(np.float32), valid


def load_image(path: str | Path, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """An image file -> ((1,3,size,size) in [-1, 1], the (size,size,3) uint8 pixels); resizes and says so."""
    try:
        img = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError):
        raise DataError(f"image {path}: not a readable image file") from None
    if img.shape[:2] != (size, size):
        print(f"note: image {path} is {img.shape[1]}x{img.shape[0]}, the model takes {size}x{size}: resizing")
        img = resize_rgb(img, size)
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None], img


def write_ply(path: str | Path, points: np.ndarray, valid: np.ndarray, img: np.ndarray) -> None:
    """Valid points of every layer (K,H,W,3): layer 0 in image colours, hidden layers in layer colours."""
    colours = np.broadcast_to(LAYER_COLOURS[np.arange(len(points)) % len(LAYER_COLOURS), None, None],
                              valid.shape + (3,)).copy()
    colours[0] = img
    import trimesh  # only here: importing the model code needs no mesh library

    trimesh.PointCloud(points[valid], colors=colours[valid]).export(str(path))


def to_model_input(img: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(H,W,3) uint8 -> ((3,size,size) in [-1, 1], the (size,size,3) uint8 pixels), resized when needed."""
    if img.shape[:2] != (size, size):
        img = resize_rgb(img, size)
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1), img


def scale_between(points: np.ndarray, valid: np.ndarray, ref: np.ndarray, ref_valid: np.ndarray) -> float:
    """Least-squares s with s * points ~ ref over the layer-0 points valid in both ((K,H,W,3), (K,H,W))."""
    both = valid[0] & ref_valid[0]
    p, r = points[0][both].astype(np.float64), ref[0][both].astype(np.float64)
    denom = float((p * p).sum())
    return float((p * r).sum()) / denom if denom > 0 else 1.0


def sample_video(model: WTDiT, flow_cfg: FlowConfig, norm: Normalisation, path: str | Path, out: Path,
                 length: int, steps: int = 20, generator: torch.Generator | None = None,
                 flying: FlyingPointFilter | None = None) -> int:
    """Every frame of a folder of images or a video file (module docstring): windows of ``length`` frames
    overlapping by one (``length`` 1: frame by frame), each generated as one clip. Writes NAME.npz and NAME.ply
    per frame into ``out``; returns the number of frames."""
    size, done, prev = model.cfg.image_size, 0, None  # prev: the last written frame's (points, valid)
    frames = iter_frames(path)
    window: list[tuple[str, torch.Tensor, np.ndarray]] = []
    resized = False
    while True:
        for name, img in frames:
            resized |= img.shape[:2] != (size, size)
            window.append((name, *to_model_input(img, size)))
            if len(window) == length:
                break
        fresh = len(window) - (1 if prev is not None else 0)
        if fresh <= 0:
            break
        if resized and done == 0:
            print(f"note: video {path} is not {size}x{size}, the model's size: resizing every frame")
        rgb = torch.stack([w[1] for w in window])
        T = len(window) if model.cfg.temporal else 1
        points, prob = sample(model, rgb, flow_cfg, steps, generator, frames=T)
        preds = [postprocess(points[i].numpy(), prob[i].numpy(), norm, flying) for i in range(len(window))]
        s = scale_between(*preds[0], *prev) if prev is not None else 1.0
        for i, ((name, _, img), (pts, valid)) in enumerate(zip(window, preds)):
            if prev is not None and i == 0:
                continue  # the shared frame, written with the window before
            pts = (pts * s).astype(np.float32)
            stem = str(out / name)
            np.savez_compressed(stem + ".npz", points=pts, valid=valid, valid_prob=prob[i].numpy())
            write_ply(stem + ".ply", pts, valid, img)
            done += 1
        prev = (preds[-1][0] * s, preds[-1][1])
        window = window[-1:] if length > 1 else []
        if length == 1:
            prev = None
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s)")
    src.add_argument("--video", help="a folder of frames (images, in name order) or a video file (imageio)")
    p.add_argument("--clip-length", type=int, default=None,
                   help="frames generated together from --video (default: the checkpoint's clip length)")
    p.add_argument("--out", required=True, help="output folder for NAME.npz and NAME.ply")
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--encoder-weights", default=None, help="the image encoder's weights file (when it has one)")
    p.add_argument("--no-filter", action="store_true", help="keep flying points (no depth-edge / kNN filter)")
    p.add_argument("--intrinsics", action="store_true", help="also write K recovered from the layer-0 points")


def run(args: argparse.Namespace) -> int:
    model, flow_cfg, ckpt = load_model(args.checkpoint, ema=not args.no_ema, encoder_weights=args.encoder_weights)
    norm = Normalisation.from_dict(ckpt.get("norm"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    flying = None if args.no_filter else FlyingPointFilter()
    if args.video is not None:
        length = args.clip_length or (int(ckpt.get("train", {}).get("clip_length") or 1) if model.cfg.temporal
                                      else 1)
        if length < 1:
            raise DataError(f"--clip-length {length}: must be at least 1")
        if not model.cfg.temporal and length > 1:
            print("note: the checkpoint is an image model (no temporal blocks): generating frame by frame")
            length = 1
        n = sample_video(model, flow_cfg, norm, args.video, out, length, args.steps, gen, flying)
        print(f"{args.video}: {n} frames in windows of {length} -> {out}/NAME.npz/.ply")
        return 0
    for path in args.image:
        rgb, img = load_image(path, model.cfg.image_size)
        points, prob = sample(model, rgb, flow_cfg, args.steps, gen)
        pts, valid = postprocess(points[0].numpy(), prob[0].numpy(), norm, flying)
        stem = str(out / Path(path).stem)
        extra = {}
        if args.intrinsics:
            K = intrinsics_from_points(pts[0], valid[0])
            if K is not None:
                extra["K"] = K
            else:
                print(f"note: {path}: too few layer-0 points to recover intrinsics")
        np.savez_compressed(stem + ".npz", points=pts, valid=valid, valid_prob=prob[0].numpy(), **extra)
        write_ply(stem + ".ply", pts, valid, img)
        print(f"{path}: {valid.sum()} points in {int(valid.any(axis=(1, 2)).sum())} layers -> {stem}.npz/.ply")
    return 0
