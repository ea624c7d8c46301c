"""Evaluation protocol for layered pointmaps, and `wt-model eval`.

Per view, with predicted points P (K,H,W,3), mask Mp (K,H,W) and ground truth G, Mg:
1. Scale alignment: the prediction is up to scale, so s = argmin sum ||s P0 - G0||^2 over pixels valid in both
   layer-0 masks (closed form s = <P0, G0> / <P0, P0>), applied to every layer.
2. Layer-0 depth: AbsRel = mean |s z_p - z_g| / z_g and delta1 = fraction with max(ratio, 1/ratio) < 1.25, over
   pixels valid in both layer-0 masks.
3. Point clouds: Chamfer = the mean of the two directions' mean nearest-neighbour Euclidean distances (not
   squared), divided by the scene scale (the median ground-truth layer-0 depth), so 0.01 is 1 % of the scene
   depth. F-score at tau = ``FSCORE_TAU`` x scene scale: harmonic mean of precision (predicted points within
   tau of the ground truth) and recall (ground truth within tau of the prediction). Both for the visible
   surface (layer 0) and for all layers together.
4. Valid-mask IoU over all K layers and pixels.
Views average with equal weight. An empty predicted cloud scores Chamfer inf and F-score 0.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from wt_model.checkpoint import load_model
from wt_model.data import denormalise, eval_loader, expand_shards, probe_shards
from wt_model.sampler import postprocess, sample

FSCORE_TAU = 0.05  # F-score threshold, relative to the scene scale (median visible depth)


@dataclass
class Scores:
    abs_rel: float
    delta1: float
    chamfer_visible: float
    fscore_visible: float
    chamfer_all: float
    fscore_all: float
    iou: float


def scale_align(pred: np.ndarray, gt: np.ndarray, both: np.ndarray) -> float:
    """Least-squares scale s minimising ||s pred - gt||^2 over the points selected by ``both``."""
    p, g = pred[both].astype(np.float64), gt[both].astype(np.float64)
    denom = float((p * p).sum())
    return float((p * g).sum()) / denom if denom > 0 else 1.0


def chamfer_fscore(pred: np.ndarray, gt: np.ndarray, tau: float) -> tuple[float, float]:
    """(Chamfer: mean of the two directions' mean NN distances, F-score at tau) of clouds (N,3), (M,3)."""
    if len(pred) == 0 or len(gt) == 0:
        return float("inf"), 0.0
    d_pg = cKDTree(gt).query(pred)[0]  # (N,) each predicted point to the ground truth
    d_gp = cKDTree(pred).query(gt)[0]  # (M,)
    precision, recall = (d_pg < tau).mean(), (d_gp < tau).mean()
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(0.5 * (d_pg.mean() + d_gp.mean())), float(f)


def score_view(pred: np.ndarray, pred_valid: np.ndarray, gt: np.ndarray, gt_valid: np.ndarray) -> Scores:
    """Scores of one view: points (K,H,W,3) and masks (K,H,W) as in the module docstring."""
    both0 = pred_valid[0] & gt_valid[0]
    pred = pred * scale_align(pred[0], gt[0], both0)
    scene = float(np.median(gt[0, ..., 2][gt_valid[0]])) if gt_valid[0].any() else 1.0
    zp, zg = pred[0, ..., 2][both0], gt[0, ..., 2][both0]
    ratio = zp / zg
    abs_rel = float(np.abs(ratio - 1).mean()) if both0.any() else float("nan")
    delta1 = float((np.maximum(ratio, 1 / np.maximum(ratio, 1e-12)) < 1.25).mean()) if both0.any() else 0.0
    tau = FSCORE_TAU * scene
    ch_v, f_v = chamfer_fscore(pred[0][pred_valid[0]], gt[0][gt_valid[0]], tau)
    ch_a, f_a = chamfer_fscore(pred[pred_valid], gt[gt_valid], tau)
    union = (pred_valid | gt_valid).sum()
    iou = float((pred_valid & gt_valid).sum() / union) if union else 1.0
    return Scores(abs_rel, delta1, ch_v / scene, f_v, ch_a / scene, f_a, iou)


def mean_scores(scores: list[Scores]) -> Scores:
    return Scores(*np.mean([list(asdict(s).values()) for s in scores], axis=0).tolist())


def evaluate(checkpoint: str, shards: str, batch: int = 8, steps: int = 20, limit: int | None = None,
             seed: int = 0) -> tuple[Scores, int]:
    """Sample every layered view of ``shards`` (up to ``limit``) and score it: (mean scores, views)."""
    model, flow_cfg, _ = load_model(checkpoint)
    urls = expand_shards(shards)
    if probe_shards(urls, model.cfg.image_size).resized:
        print(f"note: shards are resized to the model's {model.cfg.image_size}x{model.cfg.image_size}")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for b in eval_loader(urls, batch, model.cfg.image_size, model.cfg.num_layers, limit):
        points, prob = sample(model, b["rgb"], flow_cfg, steps, gen)
        for i in range(len(points)):
            pred, pred_valid = postprocess(points[i].numpy(), prob[i].numpy())
            gt = denormalise(b["points"][i].numpy().transpose(0, 2, 3, 1), b["scale"][i].item())
            scores.append(score_view(pred, pred_valid, gt, b["valid"][i].numpy()))
    return mean_scores(scores), len(scores)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True, help="brace pattern or glob of .tar shards")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many views")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    scores, n = evaluate(args.checkpoint, args.shards, args.batch, args.steps, args.limit, args.seed)
    print(f"views: {n}   (scale aligned on layer 0; Chamfer / scene depth; F-score at {FSCORE_TAU} x scene)")
    for name, v in asdict(scores).items():
        print(f"  {name:16s} {v:.4f}")
    return 0
