"""Material points and how they move: positions from (instance, face, barycentric), and for every layered
crossing of a frame whether its point moves before the next frame (the ``dynamic`` mask) and where it is
then (scene flow).

A material point is ``(1 - b0 - b1) v0 + b0 v1 + b1 v2`` of its face's vertices; a sequence keeps its face
arrays over time, so evaluating the same face and barycentric on another frame's vertices gives the same
point there. Its displacement between two frames is the same combination of its vertices' displacements,
and a convex combination never exceeds its largest term: a face whose three vertices each move at most the
tolerance holds no moving point, so only faces with a vertex moving further are evaluated point by point.
A vertex that does not move (bit-identical coordinates) gives exactly zero: static geometry is static
exactly, whatever the camera does.
"""

from __future__ import annotations

import numpy as np

# A point is dynamic when it moves more than this fraction of the scene size (the diagonal of the sequence's
# world bounding box over all frames): 1e-5 of a 2 m scene is 20 um, far above float64 rounding of static
# geometry (exactly 0) and of slerped held poses (~1e-16), far below any visible motion.
DYNAMIC_RTOL = 1e-5


def scene_size(bounds: np.ndarray) -> float:
    """The diagonal of (2, 3) bounds (min, max): the length the dynamic tolerance is relative to."""
    bounds = np.asarray(bounds, dtype=np.float64)
    return float(np.linalg.norm(bounds[1] - bounds[0]))


def by_instance(instance: np.ndarray, count: int) -> list[np.ndarray]:
    """For each of ``count`` instances, the indices of the entries of ``instance`` (N,) that belong to it
    (one sort, not one pass per instance)."""
    if count < 2:
        return [np.arange(len(instance))] if count else []
    key = instance.astype(np.int16) if count < (1 << 15) else instance  # a stable int16 sort is a radix sort
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(count + 1))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _combine(vertices: np.ndarray, faces: np.ndarray, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(n, 3) float64 ``(1 - b0 - b1) v0 + b0 v1 + b1 v2`` of rows ``face`` of ``faces`` over ``vertices``."""
    corners = np.asarray(vertices, dtype=np.float64)[faces[face]]  # (n, 3, 3)
    bary = np.asarray(bary, dtype=np.float64)
    weights = np.column_stack([1.0 - bary.sum(1), bary])
    return np.einsum("nc,ncd->nd", weights, corners)


def vertex_points(vertices: list[np.ndarray], faces: list[np.ndarray], instance: np.ndarray, face: np.ndarray,
                  bary: np.ndarray) -> np.ndarray:
    """(N, 3) float64 positions of material points on one frame's instances.

    Args:
        vertices, faces: per instance, (V, 3) coordinates of this frame and (F, 3) vertex indices.
        instance, face: (N,) instance and face of each point; bary: (N, 2) barycentrics on that face.
    """
    out = np.empty((len(instance), 3))
    for i, idx in enumerate(by_instance(np.asarray(instance), len(vertices))):  # instances, not points
        if len(idx):
            out[idx] = _combine(vertices[i], faces[i], face[idx], bary[idx])
    return out


def crossing_motion(valid: np.ndarray, instance: np.ndarray, face: np.ndarray, bary: np.ndarray,
                    faces: list[np.ndarray], now: list[np.ndarray], later: list[np.ndarray], tolerance: float,
                    flow: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Motion of the material point of every layered crossing of a frame.

    Args:
        valid: (K, H, W) bool; instance, face: (K, H, W) int ids; bary: (K, H, W, 2): the frame's cast.
        faces: per instance (F, 3) vertex indices; now, later: per instance (V, 3) vertices at this frame and
            at the next one.
        tolerance: world distance above which a point moves.
        flow: also return each point's world position at the next frame.

    Returns:
        dynamic: (K, H, W) bool, the point moves more than ``tolerance``; False where invalid.
        next_world_xyz: (K, H, W, 3) float32 world position at the next frame, 0 where invalid (None unless
            ``flow``).
    """
    inst, fid = instance[valid], face[valid].astype(np.int64)
    b = bary[valid]
    moving = np.zeros(len(inst), dtype=bool)
    after = np.zeros((len(inst), 3)) if flow else None
    for i, idx in enumerate(by_instance(inst, len(faces))):
        if not len(idx):
            continue
        f, a, c = faces[i], now[i], later[i]
        if flow:
            after[idx] = _combine(c, f, fid[idx], b[idx])
        if a is c or np.array_equal(a, c):
            continue  # nothing of this instance moves: every point is exactly where it was
        step = np.asarray(c, dtype=np.float64) - np.asarray(a, dtype=np.float64)
        reach = np.sqrt((step ** 2).sum(1))[f[fid[idx]]].max(1)  # bound on the motion of any point of the face
        maybe = idx[reach > tolerance]
        if len(maybe):
            d = _combine(step, f, fid[maybe], b[maybe])
            moving[maybe] = np.sqrt((d ** 2).sum(1)) > tolerance
    dynamic = np.zeros(valid.shape, dtype=bool)
    dynamic[valid] = moving
    if not flow:
        return dynamic, None
    next_world = np.zeros(valid.shape + (3,), dtype=np.float32)
    next_world[valid] = after
    return dynamic, next_world
