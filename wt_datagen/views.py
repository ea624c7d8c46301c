"""Camera poses: each view a pure function of (seed, item id, view index), the config and the asset's bounds.

Nothing here depends on the order in which views or assets are rendered or on the process rendering them,
so any number of workers gives the same cameras, bit for bit. World y is up.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .camera import Camera
from .config import CameraConfig


def view_rng(seed: int, item_id: str, view_index: int) -> np.random.Generator:
    """A generator seeded by a hash of ``(seed, item_id, view_index)`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}/{item_id}/{view_index}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def view_camera(
    cfg: CameraConfig,
    seed: int,
    item_id: str,
    view_index: int,
    bounds: np.ndarray,
    resolution: int,
) -> Camera:
    """The camera of one view.

    Args:
        bounds: (2, 3) world-space axis-aligned bounds of the asset (min, max); used by ``mode: scene``
            (``mode: object`` assumes the asset was normalised into the unit box around the origin).
        resolution: image width and height in pixels.
    """
    rng = view_rng(seed, item_id, view_index)
    fov = rng.uniform(*cfg.fov_deg)
    if cfg.mode == "object":
        eye = rng.uniform(*cfg.radius) * _direction(rng, cfg.elevation_deg)
        target = rng.uniform(-cfg.target_jitter, cfg.target_jitter, 3)
    else:
        bounds = np.asarray(bounds, dtype=np.float64)
        lo, hi = bounds
        centre, half_diag = (lo + hi) / 2, np.linalg.norm(hi - lo) / 2
        if rng.random() < cfg.inside_fraction:
            # inside: away from the walls, at a chosen height, looking out horizontally (plus pitch)
            frac = np.array([rng.uniform(0.1, 0.9), rng.uniform(*cfg.eye_height), rng.uniform(0.1, 0.9)])
            eye = lo + frac * (hi - lo)
            target = eye + _direction(rng, cfg.pitch_deg, sin_uniform=False)
        else:
            eye = centre + rng.uniform(*cfg.radius_scale) * half_diag * _direction(rng, cfg.elevation_deg)
            target = centre + cfg.target_jitter * half_diag * rng.uniform(-1, 1, 3)
    return Camera.look_at(eye, target, up=(0, 1, 0), width=resolution, height=resolution, fov_y_deg=fov)


def _direction(rng: np.random.Generator, elevation_deg: tuple[float, float], sin_uniform: bool = True):
    """A unit vector at a uniform azimuth about y and an elevation in the range; ``sin_uniform`` samples the
    elevation uniform in area on the sphere rather than uniform in angle."""
    azimuth = rng.uniform(0, 2 * np.pi)
    lo, hi = np.radians(elevation_deg)
    elevation = np.arcsin(rng.uniform(np.sin(lo), np.sin(hi))) if sin_uniform else rng.uniform(lo, hi)
    c = np.cos(elevation)
    return np.array([c * np.sin(azimuth), np.sin(elevation), c * np.cos(azimuth)])
