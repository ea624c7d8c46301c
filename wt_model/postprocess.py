"""Post-processing of predicted layered pointmaps: monotone masks, the flying-point filter, intrinsics.

Flying points (the reference's kind of filter, applied to every layer on its own; parameters in
:class:`FlyingPointFilter`, the reference's defaults):
1. Depth-edge test: a valid pixel whose depth z differs from the median depth of the valid pixels in the
   ``window`` x ``window`` window around it by more than ``rel_depth`` x that median is dropped (edge halos
   and depth spikes).
2. k-nearest-neighbour outlier test: for the remaining points of the layer, the mean distance to their ``k``
   nearest neighbours; a point whose mean distance exceeds median + ``n_mad`` x MAD (median absolute
   deviation, x 1.4826 to match a standard deviation) over the layer, and (ours, not the reference's) also
   ``min_ratio`` x the median, is dropped (isolated points). The second bound keeps the rim of an evenly
   sampled surface, whose spread of neighbour distances is tiny (the reference drops 5-15 % of the points).
Masks are made monotone along K again afterwards.

Intrinsics: a pinhole with pixel centres at (u + 0.5, v + 0.5) (README conventions) projects a camera-space
point to u + 0.5 = fx x / z + cx and v + 0.5 = fy y / z + cy; two independent least-squares line fits over the
valid layer-0 pixels recover (fx, cx) and (fy, cy), whatever the points' scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.spatial import cKDTree


def monotone(valid: np.ndarray) -> np.ndarray:
    """(K,H,W) bool -> a layer exists only behind an existing one."""
    return np.logical_and.accumulate(valid, axis=0)


@dataclass(frozen=True)
class FlyingPointFilter:
    window: int = 5  # odd side of the median window (pixels)
    rel_depth: float = 0.02  # depth-edge threshold, relative to the local median depth
    k: int = 8  # neighbours of the outlier test
    n_mad: float = 2.5  # outlier threshold in scaled MADs above the median mean-neighbour distance
    min_ratio: float = 2.0  # ... and at least this multiple of the median mean-neighbour distance


def local_median_depth(z: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """(H,W) median of the valid depths in the window around each valid pixel (NaN elsewhere)."""
    r = window // 2
    zz = np.pad(np.where(valid, z, np.nan).astype(np.float64), r, constant_values=np.nan)
    win = np.sort(sliding_window_view(zz, (window, window)).reshape(*z.shape, -1)[valid], axis=-1)  # NaN last
    n = np.isfinite(win).sum(axis=-1)  # >= 1: the pixel itself
    rows = np.arange(len(win))
    out = np.full(z.shape, np.nan)
    out[valid] = 0.5 * (win[rows, (n - 1) // 2] + win[rows, n // 2])
    return out


def flying_points(points: np.ndarray, valid: np.ndarray, f: FlyingPointFilter = FlyingPointFilter()) -> np.ndarray:
    """The pixels to drop (K,H,W) bool of points (K,H,W,3) with masks (K,H,W), per the module docstring."""
    drop = np.zeros_like(valid)
    for k in range(len(points)):
        v = valid[k] & np.isfinite(points[k]).all(axis=-1)
        if not v.any():
            continue
        z = points[k, ..., 2]
        med = local_median_depth(z, v, f.window)
        edge = v & (np.abs(np.where(v, z, 0) - np.nan_to_num(med)) > f.rel_depth * np.abs(np.nan_to_num(med)))
        keep = v & ~edge
        idx = np.flatnonzero(keep)
        if len(idx) > f.k:
            pts = points[k].reshape(-1, 3)[idx].astype(np.float64)
            dist = cKDTree(pts).query(pts, k=f.k + 1)[0][:, 1:].mean(axis=1)  # self excluded
            mid = np.median(dist)
            mad = 1.4826 * np.median(np.abs(dist - mid))
            outlier = np.zeros(keep.size, bool)
            outlier[idx[dist > max(mid + f.n_mad * mad, f.min_ratio * mid)]] = True
            edge |= outlier.reshape(keep.shape)
        drop[k] = edge | (valid[k] & ~v)
    return drop


def filter_flying_points(points: np.ndarray, valid: np.ndarray,
                         f: FlyingPointFilter = FlyingPointFilter()) -> np.ndarray:
    """Masks (K,H,W) without the flying points, monotone along K."""
    return monotone(valid & ~flying_points(points, valid, f))


def intrinsics_from_points(points: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """The 3x3 K that best projects the layer-0 points (H,W,3) (valid (H,W)) to their pixel centres, or None
    with fewer than 2 distinct valid columns or rows."""
    H, W = valid.shape
    v, u = np.nonzero(valid & (points[..., 2] > 0) & np.isfinite(points).all(axis=-1))
    if len(np.unique(u)) < 2 or len(np.unique(v)) < 2:
        return None
    p = points[v, u].astype(np.float64)
    a, b = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
    fx, cx = np.linalg.lstsq(np.stack([a, np.ones_like(a)], 1), u + 0.5, rcond=None)[0]
    fy, cy = np.linalg.lstsq(np.stack([b, np.ones_like(b)], 1), v + 0.5, rcond=None)[0]
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
