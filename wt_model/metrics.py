"""Evaluation protocol for layered pointmaps, and `wt-model eval`.

Per view, with predicted points P (K,H,W,3), mask Mp (K,H,W) and ground truth G, Mg:
1. Alignment (the prediction is up to scale). ``scale`` (default): s = argmin sum ||s P0 - G0||^2 over pixels
   valid in both layer-0 masks (closed form s = <P0, G0> / <P0, P0>), applied to every layer.
   ``scale-zshift`` (LaRI's protocol): s and a shift tz along the optical axis minimising
   sum ||s P + (0, 0, tz) - G||^2 over the pixels and layers valid in both, applied to every layer.
2. Layer-0 depth: AbsRel = mean |z_p - z_g| / z_g and delta1 = fraction with max(ratio, 1/ratio) < 1.25, over
   pixels valid in both layer-0 masks.
3. Point clouds: Chamfer = the mean of the two directions' mean nearest-neighbour Euclidean distances (not
   squared), divided by the scene scale (the median ground-truth layer-0 depth), so 0.01 is 1 % of the scene
   depth. F-score at tau = ``FSCORE_TAU`` x scene scale: harmonic mean of precision (predicted points within
   tau of the ground truth) and recall (ground truth within tau of the prediction). For the visible surface
   (layer 0), all layers together, and each layer k on its own (layer k of P against layer k of G).
4. Valid-mask IoU over all K layers and pixels, and per layer.

Empty predictions, so no figure is ever NaN or infinite: a cloud scored against a non-empty other cloud while
itself empty (or the other way round, for a layer) scores Chamfer ``CAP`` (1.0 = the whole scene depth) and
F-score 0 and is counted apart (``empty_visible``, ``empty_all``); every Chamfer is capped at ``CAP``. No pixel
valid in both layer-0 masks: AbsRel ``CAP``, delta1 0, counted in ``no_overlap``. A layer empty in both is not
scored for that view. Non-finite predicted points are never valid. Views average with equal weight; the
medians are printed next to the means; per-layer means cover the views where the layer is scored.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from wt_model.checkpoint import load_model
from wt_model.data import Normalisation, eval_loader, expand_shards, probe_shards
from wt_model.postprocess import FlyingPointFilter
from wt_model.sampler import postprocess, sample

FSCORE_TAU = 0.05  # F-score threshold, relative to the scene scale (median visible depth)
CAP = 1.0  # Chamfer (relative to the scene scale) and AbsRel of an empty prediction; every Chamfer is capped here
ALIGNMENTS = ("scale", "scale-zshift")
SCALARS = ("abs_rel", "delta1", "chamfer_visible", "fscore_visible", "chamfer_all", "fscore_all", "iou")


@dataclass
class Scores:
    """One view's scores, or the mean / median over views (counts then summed). Per-layer tuples hold NaN
    where the layer was not scored (internal; printed as '-')."""

    abs_rel: float
    delta1: float
    chamfer_visible: float
    fscore_visible: float
    chamfer_all: float
    fscore_all: float
    iou: float
    layer_chamfer: tuple = ()
    layer_fscore: tuple = ()
    layer_iou: tuple = ()
    empty_visible: int = 0
    empty_all: int = 0
    no_overlap: int = 0
    views: int = 1


def scale_align(pred: np.ndarray, gt: np.ndarray, both: np.ndarray) -> float:
    """Least-squares scale s minimising ||s pred - gt||^2 over the points selected by ``both``."""
    p, g = pred[both].astype(np.float64), gt[both].astype(np.float64)
    denom = float((p * p).sum())
    return float((p * g).sum()) / denom if denom > 0 else 1.0


def scale_zshift_align(pred: np.ndarray, gt: np.ndarray, both: np.ndarray) -> tuple[float, float]:
    """Least-squares (s, tz) minimising ||s pred + (0, 0, tz) - gt||^2 over the points selected by ``both``
    (the 2x2 normal equations); scale alone when they are singular."""
    p, g = pred[both].astype(np.float64), gt[both].astype(np.float64)
    n = len(p)
    A = np.array([[(p * p).sum(), p[:, 2].sum()], [p[:, 2].sum(), n]])
    b = np.array([(p * g).sum(), g[:, 2].sum()])
    if n < 2 or abs(np.linalg.det(A)) < 1e-12 * max(A[0, 0] * n, 1e-300):
        return scale_align(pred, gt, both), 0.0
    s, tz = np.linalg.solve(A, b)
    return float(s), float(tz)


def chamfer_fscore(pred: np.ndarray, gt: np.ndarray, tau: float) -> tuple[float, float]:
    """(Chamfer: mean of the two directions' mean NN distances, F-score at tau) of clouds (N,3), (M,3).
    Either cloud empty: (inf, 0) (callers score that at ``CAP``)."""
    if len(pred) == 0 or len(gt) == 0:
        return float("inf"), 0.0
    d_pg = cKDTree(gt).query(pred)[0]  # (N,) each predicted point to the ground truth
    d_gp = cKDTree(pred).query(gt)[0]  # (M,)
    precision, recall = (d_pg < tau).mean(), (d_gp < tau).mean()
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(0.5 * (d_pg.mean() + d_gp.mean())), float(f)


def _cloud_scores(pred: np.ndarray, gt: np.ndarray, scene: float) -> tuple[float, float, bool]:
    """(Chamfer / scene capped at CAP, F-score, one side empty) of two clouds."""
    ch, f = chamfer_fscore(pred, gt, FSCORE_TAU * scene)
    return min(ch / scene, CAP), f, (len(pred) == 0) != (len(gt) == 0)


def score_view(pred: np.ndarray, pred_valid: np.ndarray, gt: np.ndarray, gt_valid: np.ndarray,
               align: str = "scale") -> Scores:
    """Scores of one view: points (K,H,W,3) and masks (K,H,W) as in the module docstring."""
    pred_valid = pred_valid & np.isfinite(pred).all(axis=-1)
    pred = np.where(pred_valid[..., None], pred, 0.0).astype(np.float64)
    both0 = pred_valid[0] & gt_valid[0]
    if align == "scale":
        pred = pred * scale_align(pred[0], gt[0], both0)
    elif align == "scale-zshift":
        s, tz = scale_zshift_align(pred, gt, pred_valid & gt_valid)
        pred = pred * s + np.array([0.0, 0.0, tz])
    else:
        raise ValueError(f"eval: alignment must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    scene = float(np.median(gt[0, ..., 2][gt_valid[0]])) if gt_valid[0].any() else 1.0
    if both0.any():
        ratio = pred[0, ..., 2][both0] / gt[0, ..., 2][both0]
        abs_rel = min(float(np.abs(ratio - 1).mean()), CAP)
        delta1 = float((np.maximum(ratio, 1 / np.maximum(ratio, 1e-12)) < 1.25).mean())
    else:
        abs_rel, delta1 = CAP, 0.0
    ch_v, f_v, empty_v = _cloud_scores(pred[0][pred_valid[0]], gt[0][gt_valid[0]], scene)
    ch_a, f_a, empty_a = _cloud_scores(pred[pred_valid], gt[gt_valid], scene)
    union = (pred_valid | gt_valid).sum()
    iou = float((pred_valid & gt_valid).sum() / union) if union else 1.0
    layer_ch, layer_f, layer_iou = [], [], []
    for k in range(len(gt)):
        if not (pred_valid[k].any() or gt_valid[k].any()):
            layer_ch.append(np.nan), layer_f.append(np.nan), layer_iou.append(np.nan)
            continue
        ch_k, f_k, _ = _cloud_scores(pred[k][pred_valid[k]], gt[k][gt_valid[k]], scene)
        layer_ch.append(ch_k), layer_f.append(f_k)
        layer_iou.append(float((pred_valid[k] & gt_valid[k]).sum() / (pred_valid[k] | gt_valid[k]).sum()))
    return Scores(abs_rel, delta1, ch_v, f_v, ch_a, f_a, iou, tuple(layer_ch), tuple(layer_f), tuple(layer_iou),
                  int(empty_v), int(empty_a), int(not both0.any()))


def _combine(scores: list[Scores], reduce) -> Scores:
    scalars = [reduce(np.array([getattr(s, n) for s in scores])) for n in SCALARS]
    per_layer = []
    for name in ("layer_chamfer", "layer_fscore", "layer_iou"):
        arr = np.array([getattr(s, name) for s in scores], dtype=np.float64)  # (views, K)
        scored = np.isfinite(arr).any(axis=0)
        per_layer.append(tuple(float(reduce(arr[np.isfinite(arr[:, k]), k])) if scored[k] else float("nan")
                               for k in range(arr.shape[1])))
    counts = [sum(getattr(s, n) for s in scores) for n in ("empty_visible", "empty_all", "no_overlap", "views")]
    return Scores(*[float(v) for v in scalars], *per_layer, *counts)


def mean_scores(scores: list[Scores]) -> Scores:
    """The mean over views (per-layer means over the views where the layer is scored); counts summed."""
    return _combine(scores, np.mean)


def median_scores(scores: list[Scores]) -> Scores:
    return _combine(scores, np.median)


@dataclass
class Report:
    """What ``evaluate`` returns: the mean and median scores over ``views`` views."""

    mean: Scores
    median: Scores
    views: int = field(default=0)


def score_batches(model, flow_cfg, norm: Normalisation, batches, steps: int = 20,
                  generator: torch.Generator | None = None, align: str = "scale",
                  flying: FlyingPointFilter | None = None) -> list[Scores]:
    """Sample every view of ``batches`` (dicts of tensors from the data loaders) and score it."""
    scores, device = [], next(model.parameters()).device
    for b in batches:
        points, prob = sample(model, b["rgb"].to(device), flow_cfg, steps, generator)
        points, prob = points.float().cpu(), prob.float().cpu()
        for i in range(len(points)):
            pred, pred_valid = postprocess(points[i].numpy(), prob[i].numpy(), norm, flying)
            gt = norm.inverse(b["points"][i].numpy().transpose(0, 2, 3, 1).astype(np.float64), b["scale"][i].item())
            scores.append(score_view(pred, pred_valid, gt, b["valid"][i].numpy(), align))
    return scores


def evaluate(checkpoint: str, shards: str, batch: int = 8, steps: int = 20, limit: int | None = None,
             seed: int = 0, align: str = "scale", encoder_weights: str | None = None,
             flying: FlyingPointFilter | None = None) -> Report:
    """Sample every layered view of ``shards`` (up to ``limit``) and score it."""
    model, flow_cfg, ckpt = load_model(checkpoint, encoder_weights=encoder_weights)
    norm = Normalisation.from_dict(ckpt.get("norm"))
    urls = expand_shards(shards)
    if probe_shards(urls, model.cfg.image_size).resized:
        print(f"note: shards are resized to the model's {model.cfg.image_size}x{model.cfg.image_size}")
    gen = torch.Generator().manual_seed(seed)
    batches = eval_loader(urls, batch, model.cfg.image_size, model.cfg.num_layers, limit, norm)
    scores = score_batches(model, flow_cfg, norm, batches, steps, gen, align, flying)
    return Report(mean_scores(scores), median_scores(scores), len(scores))


def format_report(report: Report, align: str = "scale") -> list[str]:
    """Printable lines: every figure finite, '-' where nothing was scored."""
    m, md = report.mean, report.median
    lines = [f"views: {report.views}   (aligned: {align}; Chamfer / scene depth, capped at {CAP}; F-score at "
             f"{FSCORE_TAU} x scene)", f"  {'':16s} {'mean':>8s} {'median':>8s}"]
    lines += [f"  {n:16s} {getattr(m, n):8.4f} {getattr(md, n):8.4f}" for n in SCALARS]

    def cell(v: float) -> str:
        return f"{v:8.4f}" if np.isfinite(v) else f"{'-':>8s}"

    lines.append(f"  {'layer':16s} {'chamfer':>8s} {'fscore':>8s} {'iou':>8s}   (means over views where scored)")
    for k in range(len(m.layer_chamfer)):
        lines.append(f"  {k:<16d} {cell(m.layer_chamfer[k])} {cell(m.layer_fscore[k])} {cell(m.layer_iou[k])}")
    lines.append(f"  empty predictions: visible {m.empty_visible}, all layers {m.empty_all}; no layer-0 overlap "
                 f"{m.no_overlap} (scored at the cap)")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True, help="brace pattern or glob of .tar shards")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many views")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--align", default="scale", choices=ALIGNMENTS, help="scale (ours) or scale-zshift (LaRI)")
    p.add_argument("--filter", action="store_true", help="drop flying points before scoring")
    p.add_argument("--encoder-weights", default=None, help="the image encoder's weights file (when it has one)")


def run(args: argparse.Namespace) -> int:
    report = evaluate(args.checkpoint, args.shards, args.batch, args.steps, args.limit, args.seed, args.align,
                      args.encoder_weights, FlyingPointFilter() if args.filter else None)
    print("\n".join(format_report(report, args.align)))
    return 0

