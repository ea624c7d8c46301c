"""Cameras: each static view a pure function of (seed, item id, view index), the config and the asset's bounds;
each clip (its frames and camera trajectory) a pure function of (seed, sequence id, clip index).

Nothing here depends on the order in which views or assets are rendered or on the process rendering them,
so any number of workers gives the same cameras, bit for bit. World y is up.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy.interpolate import PchipInterpolator

from ..camera import Camera
from ..geometry.tracks import Clip
from ..inputs.sequences import Sequence
from .config import CameraConfig, SequenceConfig

TRAJECTORIES = ("static", "orbit", "dolly", "random")  # "mixed" in the config picks one per clip


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
        eye = rng.uniform(*cfg.radius) * _random_direction(rng, cfg.elevation_deg)
        target = rng.uniform(-cfg.target_jitter, cfg.target_jitter, 3)
    else:
        bounds = np.asarray(bounds, dtype=np.float64)
        lo, hi = bounds
        centre, half_diag = (lo + hi) / 2, np.linalg.norm(hi - lo) / 2
        if rng.random() < cfg.inside_fraction:
            # inside: away from the walls, at a chosen height, looking out horizontally (plus pitch)
            frac = np.array([rng.uniform(0.1, 0.9), rng.uniform(*cfg.eye_height), rng.uniform(0.1, 0.9)])
            eye = lo + frac * (hi - lo)
            target = eye + _random_direction(rng, cfg.pitch_deg, sin_uniform=False)
        else:
            eye = centre + rng.uniform(*cfg.radius_scale) * half_diag * _random_direction(rng, cfg.elevation_deg)
            target = centre + cfg.target_jitter * half_diag * rng.uniform(-1, 1, 3)
    return Camera.look_at(eye, target, up=(0, 1, 0), width=resolution, height=resolution, fov_y_deg=fov)


def _random_direction(rng: np.random.Generator, elevation_deg: tuple[float, float], sin_uniform: bool = True):
    """A unit vector at a uniform azimuth about y and an elevation in the range; ``sin_uniform`` samples the
    elevation uniform in area on the sphere rather than uniform in angle."""
    azimuth = rng.uniform(0, 2 * np.pi)
    lo, hi = np.radians(elevation_deg)
    elevation = np.arcsin(rng.uniform(np.sin(lo), np.sin(hi))) if sin_uniform else rng.uniform(lo, hi)
    return direction(azimuth, elevation)


def clip_length(num_frames: int, cfg: SequenceConfig) -> int:
    """Frames in each clip of a ``num_frames`` sequence: ``cfg.clip_length`` (0: all) every ``frame_stride``."""
    available = (num_frames - 1) // cfg.frame_stride + 1 if num_frames > 0 else 0
    return available if cfg.clip_length == 0 else min(cfg.clip_length, available)


def make_clip(seq: Sequence, clip_index: int, cfg: SequenceConfig, seed: int, width: int,
              height: int) -> Clip:
    """Frames and cameras of one clip, a pure function of (seed, sequence id, clip index) and the config:
    ``cfg.clip_length`` frames (0: as many as the sequence holds) every ``cfg.frame_stride`` frames, from a
    random start, seen along a ``cfg.trajectory`` path (``mixed``: one kind drawn per clip)."""
    rng = view_rng(seed, seq.sequence_id, clip_index)
    length = clip_length(seq.num_frames, cfg)
    span = (length - 1) * cfg.frame_stride + 1
    start = int(rng.integers(0, seq.num_frames - span + 1))
    frames = start + cfg.frame_stride * np.arange(length)
    kind = str(rng.choice(TRAJECTORIES)) if cfg.trajectory == "mixed" else cfg.trajectory
    bounds = seq.world_bounds()
    cameras = camera_path(kind, rng, cfg, bounds.mean(0), 0.5 * np.linalg.norm(bounds[1] - bounds[0]),
                          length, width, height)
    return Clip(seq.sequence_id, clip_index, frames, frames / seq.fps, cameras, kind)


def camera_path(kind: str, rng: np.random.Generator, cfg: SequenceConfig, centre: np.ndarray,
                radius: float, length: int, width: int, height: int) -> list[Camera]:
    """``length`` cameras along a trajectory around a bounding sphere (``centre`` (3,), ``radius``); the
    ranges come from ``cfg`` (distances in radii, angles in degrees)."""
    radius = max(float(radius), 1e-6)
    s = np.linspace(0.0, 1.0, length)
    azimuth0 = rng.uniform(0, 2 * np.pi)
    elevation = np.radians(rng.uniform(*cfg.elevation_deg))
    distance = rng.uniform(*cfg.distance)
    fov = rng.uniform(*cfg.fov_deg)
    target = np.broadcast_to(centre, (length, 3))
    if kind == "static":
        az, el, dist = np.full(length, azimuth0), np.full(length, elevation), np.full(length, distance)
    elif kind == "orbit":
        sweep = np.radians(rng.uniform(*cfg.orbit_deg)) * rng.choice([-1.0, 1.0])
        az, el, dist = azimuth0 + sweep * s, np.full(length, elevation), np.full(length, distance)
    elif kind == "dolly":
        # Move along the straight line between two eyes while looking at the centre.
        end = distance * rng.uniform(*cfg.dolly_factor)
        start_eye = centre + radius * distance * direction(azimuth0, elevation)
        end_eye = centre + radius * end * direction(azimuth0 + rng.uniform(-0.2, 0.2), elevation)
        eyes = start_eye + s[:, None] * (end_eye - start_eye)
        return [Camera.look_at(e, centre, width=width, height=height, fov_y_deg=fov) for e in eyes]
    elif kind == "random":
        # PCHIP through random control points never overshoots them, so the path stays within the ranges.
        n = cfg.random_keypoints
        knots = np.linspace(0.0, 1.0, n)
        az = PchipInterpolator(knots, azimuth0 + np.cumsum(rng.uniform(-np.pi / 4, np.pi / 4, n)))(s)
        el = PchipInterpolator(knots, np.radians(rng.uniform(*cfg.elevation_deg, n)))(s)
        dist = PchipInterpolator(knots, rng.uniform(*cfg.distance, n))(s)
        jitter = PchipInterpolator(knots, rng.uniform(-0.1, 0.1, (n, 3)), axis=0)(s)
        target = centre + radius * jitter
    else:
        raise ValueError(f"unknown trajectory kind {kind!r}; expected one of {TRAJECTORIES}")
    eyes = centre + radius * dist[:, None] * direction(az, el)
    return [Camera.look_at(e, t, width=width, height=height, fov_y_deg=fov) for e, t in zip(eyes, target)]


def direction(azimuth, elevation) -> np.ndarray:
    """(..., 3) unit vectors, world +y up: azimuth about y from +z, elevation above the xz plane."""
    azimuth, elevation = np.asarray(azimuth), np.asarray(elevation)
    return np.stack([np.cos(elevation) * np.sin(azimuth), np.sin(elevation),
                     np.cos(elevation) * np.cos(azimuth)], axis=-1)
