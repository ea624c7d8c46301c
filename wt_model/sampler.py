"""Sample layered pointmaps from images with a trained WT-DiT (Euler, 20 steps by default).

    wt-model sample --checkpoint runs/NAME/last.pt --image photo.png --out pred/

Writes, per image, ``NAME.npz`` (``points`` (K,H,W,3) float32 camera-space points in units of the median
visible depth, ``valid`` (K,H,W) bool, ``valid_prob`` (K,H,W) float32) and ``NAME.ply`` (the valid points
of all layers, coloured by the image for layer 0 and by layer index behind it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wt_model.checkpoint import load_model
from wt_model.data import DataError, denormalise, resize_rgb
from wt_model.flow import FlowConfig, layer_times, predict
from wt_model.models import WTDiT

LAYER_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                          [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


@torch.no_grad()
def sample(model: WTDiT, rgb: torch.Tensor, cfg: FlowConfig, steps: int = 20,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration of the flow from s = 1 (noise) to s = 0 with per-layer clocks (see flow.py).

    rgb (B,3,H,W) in [-1, 1] -> (normalised points (B,K,3,H,W), validity probabilities (B,K,H,W) of the
    last step, where the sample is nearly clean)."""
    B, K, S = rgb.shape[0], model.cfg.num_layers, model.cfg.image_size
    x = torch.randn((B, K, 3, S, S), generator=generator).to(rgb.device)
    s_grid = torch.linspace(1.0, 0.0, steps + 1, device=rgb.device)
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        t = layer_times(s.expand(B), K, cfg)  # (B,K)
        t_next = layer_times(s_next.expand(B), K, cfg)
        _, v_hat, valid_logits = predict(model, x, t, rgb, cfg)
        x = x + (t_next - t)[..., None, None, None] * v_hat  # at the last step this lands on x0_hat
    return x, torch.sigmoid(valid_logits)


def postprocess(points: np.ndarray, valid_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (K,3,H,W) and probabilities (K,H,W) -> camera-space points (K,H,W,3) in median-depth
    units and a validity mask made monotone along K (a layer exists only behind an existing one)."""
    pts = denormalise(points.transpose(0, 2, 3, 1))
    return pts.astype(np.float32), np.logical_and.accumulate(valid_prob > 0.5, axis=0)


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--out", required=True, help="output folder for NAME.npz and NAME.ply")
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def run(args: argparse.Namespace) -> int:
    model, flow_cfg, _ = load_model(args.checkpoint, ema=not args.no_ema)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    for path in args.image:
        rgb, img = load_image(path, model.cfg.image_size)
        points, prob = sample(model, rgb, flow_cfg, args.steps, gen)
        pts, valid = postprocess(points[0].numpy(), prob[0].numpy())
        stem = str(out / Path(path).stem)
        np.savez_compressed(stem + ".npz", points=pts, valid=valid, valid_prob=prob[0].numpy())
        write_ply(stem + ".ply", pts, valid, img)
        print(f"{path}: {valid.sum()} points in {int(valid.any(axis=(1, 2)).sum())} layers -> {stem}.npz/.ply")
    return 0
