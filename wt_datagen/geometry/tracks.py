"""World-centric 3D tracks of surface points on every layer, visible or hidden, seeded densely over a clip.

Queries are layered hits on a pixel grid (every ``stride`` pixels), over all K layers. The reference frame
(``query_frame``) seeds every grid crossing; every other seeding frame (all frames, or every
``query_every``-th) seeds only the grid crossings that no existing track of the same layer lands within half
a stride of in that frame, so surfaces that appear later (objects entering the view, disocclusions, stretched
regions) get tracks without duplicating covered ones. A query becomes a material point (instance, face,
barycentric) and is followed on every frame of the clip, before its query frame too, by re-evaluating that
face's vertices there: exact under deformation and rigid motion alike, since face arrays never change. In
every frame the point's layer is counted exactly, by casting the segment from the camera centre to the point
and counting the surface crossings before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import trimesh

from ..camera import Camera
from ..inputs.sequences import Sequence
from ..schema import cameras_record, track_coverage, track_displacement
from .cast import Hits, LayeredRaycaster
from .motion import DYNAMIC_RTOL, crossing_motion, scene_size, vertex_points

# Crossings within this fraction of the point's own distance count as the point itself: a neighbouring face
# sharing the point's edge is hit at the same t up to the float32 rounding of t (6e-8); surfaces further
# apart than this (a 0.2 mm plate seen from 2 m is 1e-4) stay separate crossings.
_SAME_HIT_RTOL = 1e-6
# Memory estimate of a frame kept for back-filling: the caster's arrays and engine per face, the vertices.
_KEPT_BYTES_PER_FACE, _KEPT_BYTES_PER_VERTEX = 256, 24
BACKFILL_BYTES = 512 << 20


@dataclass(frozen=True)
class Clip:
    """A run of frames seen by one camera trajectory.

    Attributes:
        sequence_id, clip_index: identity.
        frame_indices: (T,) int64 sequence frame of each clip frame.
        timestamps: (T,) float64 seconds, ``frame / fps``.
        cameras: T cameras in the sequence's world frame.
        trajectory: the trajectory kind.
    """

    sequence_id: str
    clip_index: int
    frame_indices: np.ndarray
    timestamps: np.ndarray
    cameras: list[Camera]
    trajectory: str


@dataclass(frozen=True)
class Queries:
    """Material points picked on clip frames, one per (stride-grid pixel, valid layer) seeded.

    Attributes:
        frame: (N,) int32 clip-relative index of the frame each query was taken on.
        layer: (N,) int32 layer of the hit in that frame.
        pixel: (N, 2) int32 pixel (u, v) = (column, row).
        instance: (N,) int32 instance id.
        face: (N,) int64 face id in the instance's face array.
        bary: (N, 2) float64 (u, v): point = (1 - u - v) v0 + u v1 + v v2.
    """

    frame: np.ndarray
    layer: np.ndarray
    pixel: np.ndarray
    instance: np.ndarray
    face: np.ndarray
    bary: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)

    def take(self, idx) -> Queries:
        """The queries at ``idx`` (indices or a mask)."""
        return Queries(*(getattr(self, f)[idx] for f in _QUERY_FIELDS))

    @staticmethod
    def concat(parts: list[Queries]) -> Queries:
        return Queries(*(np.concatenate([getattr(p, f) for p in parts]) for f in _QUERY_FIELDS))


_QUERY_FIELDS = ("frame", "layer", "pixel", "instance", "face", "bary")


def query_grid(stride: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the query grid: ``stride // 2 + i * stride`` inside the image."""
    if stride < 1:
        raise ValueError(f"query stride must be >= 1, got {stride}")
    return np.arange(stride // 2, height, stride), np.arange(stride // 2, width, stride)


def pick_queries(hits: Hits, stride: int, frame: int = 0, free: np.ndarray | None = None) -> Queries:
    """Every valid layer at pixels ``(stride // 2 + i * stride, stride // 2 + j * stride)``.

    ``hits`` is a camera cast (arrays (K, H, W, ...)); ``free`` (K, rows, cols) bool, if given, keeps only
    those grid cells (see :func:`occupied_cells`). Queries are ordered by layer, then row, then column.
    """
    K, H, W = hits.valid.shape
    rows, cols = query_grid(stride, H, W)
    grid = np.ix_(np.arange(K), rows, cols)
    take = hits.valid[grid] if free is None else hits.valid[grid] & free
    k, i, j = np.nonzero(take)
    v, u = rows[i], cols[j]
    return Queries(
        frame=np.full(len(k), frame, dtype=np.int32),
        layer=k.astype(np.int32),
        pixel=np.stack([u, v], axis=-1).astype(np.int32),
        instance=hits.instance_id[k, v, u].astype(np.int32),
        face=hits.face_id[k, v, u].astype(np.int64),
        bary=hits.bary[k, v, u].astype(np.float64),
    )


def occupied_cells(uv: np.ndarray, layer: np.ndarray, shape: tuple[int, int, int], stride: int) -> np.ndarray:
    """(K, rows, cols) bool: grid cells (:func:`query_grid`) with a track of the cell's layer within half a
    stride of the cell's pixel centre (in both coordinates), given the tracks' ``uv`` (N, 2) and
    ``layer`` (N,) layer index in this frame."""
    K, H, W = shape
    rows, cols = query_grid(stride, H, W)
    centre = stride // 2 + 0.5
    with np.errstate(invalid="ignore"):
        j = np.rint((uv[:, 0] - centre) / stride)  # the nearest grid column: within stride / 2 of it
        i = np.rint((uv[:, 1] - centre) / stride)
        on = (layer >= 0) & (layer < K) & (i >= 0) & (i < len(rows)) & (j >= 0) & (j < len(cols))
    out = np.zeros((K, len(rows), len(cols)), dtype=bool)
    out[layer[on], i[on].astype(np.int64), j[on].astype(np.int64)] = True
    return out


def _vertices(meshes: list[trimesh.Trimesh]) -> list[np.ndarray]:
    return [np.asarray(m.vertices, dtype=np.float64) for m in meshes]


def material_points(meshes: list[trimesh.Trimesh], queries: Queries) -> np.ndarray:
    """(N, 3) float64 world positions of the query points on ``meshes`` (one frame's instances)."""
    return vertex_points(_vertices(meshes), [m.faces for m in meshes], queries.instance, queries.face,
                         queries.bary)


def layer_index(raycaster: LayeredRaycaster, camera: Camera, world_xyz: np.ndarray, queries: Queries,
                num_layers: int = 8) -> np.ndarray:
    """(N,) int8 layer each point occupies in this frame's layered pointmap.

    0 visible, k > 0 behind k surface crossings, -1 outside the image or not in front of the camera. The
    crossings are cast along the segment from the camera centre to the point (t = 1 at the point); the
    point's own face, and crossings at the point's own t (an edge shared with a neighbour), do not count.
    Rays whose crossings were truncated before reaching the point are cast again with every layer.
    """
    cam_xyz = camera.world_to_camera(world_xyz)
    uv = camera.project(cam_xyz)
    with np.errstate(invalid="ignore"):
        inside = ((cam_xyz[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < camera.width)
                  & (uv[:, 1] >= 0) & (uv[:, 1] < camera.height))
    out = np.full(len(world_xyz), -1, dtype=np.int8)
    idx = np.nonzero(inside)[0]
    if len(idx) == 0:
        return out
    origins = np.broadcast_to(camera.center, (len(idx), 3)).astype(np.float64)
    directions = world_xyz[idx] - camera.center
    hits = raycaster.cast_rays(origins, directions, num_layers=num_layers)
    counts, truncated = _count_before(hits, queries.instance[idx], queries.face[idx])
    if truncated.any():
        sub = np.nonzero(truncated)[0]
        again = raycaster.cast_rays(origins[sub], directions[sub], num_layers=int(hits.num_hits[sub].max()))
        counts[sub] = _count_before(again, queries.instance[idx][sub], queries.face[idx][sub])[0]
    out[idx] = np.minimum(counts, np.iinfo(np.int8).max)
    return out


def _count_before(hits: Hits, instance: np.ndarray, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crossings before each ray's own point (t = 1, or the own face's t when it was hit), and whether the
    count may be incomplete (more hits than layers, the last one returned still before the point)."""
    t = hits.depth.astype(np.float64)  # (L, n) ray parameters
    own = hits.valid & (hits.instance_id == instance) & (hits.face_id == face)
    t_own = np.where(own.any(0), np.where(own, t, np.inf).min(0), 1.0)
    before = hits.valid & ~own & (t < t_own * (1.0 - _SAME_HIT_RTOL))
    truncated = (hits.num_hits > len(t)) & before[-1]
    return before.sum(0), truncated


@dataclass
class ClipFrame:
    """One frame of a clip, cast and ready to become a sample.

    Attributes:
        t: clip-relative index; ``frame_index`` the sequence frame; ``timestamp`` seconds.
        camera: this frame's camera (sequence world frame).
        meshes: the world-space instance meshes (visuals kept, for the image).
        hits: the layered cast, arrays (K, H, W, ...).
        dynamic: (K, H, W) bool, the crossing's material point moves (more than the tracker's tolerance)
            between this frame and ``next_frame_index``.
        next_world_xyz: (K, H, W, 3) float32 world position of that point at ``next_frame_index``, 0 where
            invalid (None unless the tracker was asked for scene flow).
        next_frame_index: the sequence frame the motion refers to: the next clip frame; for the clip's last
            frame the sequence frame one clip step on, or the frame itself at the end of the sequence.
        seeded: tracks seeded on this frame.
    """

    t: int
    frame_index: int
    timestamp: float
    camera: Camera
    meshes: list[trimesh.Trimesh]
    hits: Hits
    dynamic: np.ndarray | None = None
    next_world_xyz: np.ndarray | None = None
    next_frame_index: int = -1
    seeded: int = 0

    def extra_layers(self) -> dict[str, np.ndarray]:
        """The optional ``layers.npz`` fields of this frame (``dynamic``, and ``next_world_xyz`` if made)."""
        extra = {"dynamic": self.dynamic, "next_world_xyz": self.next_world_xyz}
        return {k: v for k, v in extra.items() if v is not None}


@dataclass
class _TrackArrays:
    """The growing (T, N) track arrays and their queries; N grows by doubling capacity."""

    T: int
    n: int = 0
    queries: list[Queries] = field(default_factory=list)
    seed_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # processing step of the seed

    def __post_init__(self):
        self.world_xyz = np.zeros((self.T, 0, 3), np.float32)
        self.cam_xyz = np.zeros((self.T, 0, 3), np.float32)
        self.uv = np.zeros((self.T, 0, 2), np.float32)
        self.layer_index = np.full((self.T, 0), -1, np.int8)

    def add(self, q: Queries, step: int) -> np.ndarray:
        """Append queries; returns their track indices."""
        n = self.n + len(q)
        if n > self.world_xyz.shape[1]:
            cap = max(n, 2 * self.world_xyz.shape[1], 256)
            for name in ("world_xyz", "cam_xyz", "uv", "layer_index"):
                old = getattr(self, name)
                new = np.full((self.T, cap) + old.shape[2:], -1 if name == "layer_index" else 0, old.dtype)
                new[:, : self.n] = old[:, : self.n]
                setattr(self, name, new)
        self.queries.append(q)
        self.seed_step = np.concatenate([self.seed_step, np.full(len(q), step, np.int64)])
        idx = np.arange(self.n, n)
        self.n = n
        return idx

    def all_queries(self) -> Queries:
        if len(self.queries) > 1:
            self.queries = [Queries.concat(self.queries)]
        return self.queries[0] if self.queries else _no_queries()


def _no_queries() -> Queries:
    """No queries."""
    return Queries(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 2), np.int32), np.zeros(0, np.int32),
                   np.zeros(0, np.int64), np.zeros((0, 2)))


class ClipTracker:
    """Streams the frames of a clip, seeds tracks on them and records the tracks on the way.

    Frames are produced one at a time, in clip order (the reference frame is cast first and held). Every
    frame gets its motion labels (``ClipFrame.dynamic``, and ``next_world_xyz`` with ``scene_flow``), which
    need the next frame's meshes, loaded one frame ahead. Tracks seeded on a frame are filled on the frames
    processed before it once the last frame is out ("back-fill"): from kept casters while their estimated
    memory stays within ``backfill_bytes`` (earliest frames first), else by loading and building that
    frame's caster again (same results, slower). Only the (T, N) track arrays and one packed valid mask per
    frame (for the coverage) grow with T.

    Usage: ``for frame in tracker.frames(): write(frame)`` then ``tracker.arrays()`` for ``tracks.npz``.
    ``query_frame`` is clamped to the clip; ``query_every`` seeds every that many frames from it (0: on the
    reference frame only). ``dynamic_rtol`` times the scene size (the diagonal of the sequence's world
    bounds) is ``tolerance``, the distance above which a point is dynamic. ``seconds`` accumulates wall time
    per stage (load: the frames' meshes, cast: caster build and layered cast, tracks: everything for the
    tracks, back-fill included, motion: the per-crossing labels).
    """

    def __init__(self, seq: Sequence, clip: Clip, num_layers: int, query_stride: int, query_frame: int = 0,
                 make_raycaster: Callable[[list[trimesh.Trimesh]], LayeredRaycaster] = LayeredRaycaster, *,
                 query_every: int = 1, scene_flow: bool = False, dynamic_rtol: float = DYNAMIC_RTOL,
                 backfill_bytes: int = BACKFILL_BYTES):
        T = len(clip.frame_indices)
        if query_stride < 1 or query_every < 0:
            raise ValueError(f"query_stride must be >= 1 and query_every >= 0, got {query_stride}, {query_every}")
        self.seq, self.clip, self.num_layers, self.T = seq, clip, num_layers, T
        self.query_stride, self.query_frame = query_stride, min(max(query_frame, 0), T - 1)
        self.query_every, self.scene_flow = query_every, scene_flow
        self.make_raycaster, self.backfill_bytes = make_raycaster, backfill_bytes
        self.scene_size = scene_size(seq.world_bounds())
        self.tolerance = dynamic_rtol * self.scene_size
        ref = self.query_frame
        self.order = [ref] + [t for t in range(T) if t != ref]  # processing order: the reference frame first
        t = np.arange(T)
        self.seeding = (t - ref) % query_every == 0 if query_every else t == ref
        self._last_seed_step = max(i for i, f in enumerate(self.order) if self.seeding[f])
        self.seconds = {"load": 0.0, "cast": 0.0, "tracks": 0.0, "motion": 0.0}
        self._tracks = _TrackArrays(T)
        self._step = np.full(T, -1, np.int64)  # processing step of each frame
        self._faces: list[np.ndarray] | None = None
        self._ahead: dict[int, list[trimesh.Trimesh]] = {}  # meshes loaded ahead, by sequence frame
        self._kept: dict[int, tuple[LayeredRaycaster, list[np.ndarray]]] = {}
        self._kept_bytes = 0
        self._valid_bits: dict[int, tuple[np.ndarray, tuple[int, ...]]] = {}
        self._result: dict[str, np.ndarray] | None = None

    @property
    def queries(self) -> Queries:
        """Every track's query, in track order."""
        return self._tracks.all_queries()

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now

    def _meshes(self, frame: int) -> list[trimesh.Trimesh]:
        meshes = self._ahead.pop(frame, None)
        return meshes if meshes is not None else self.seq.meshes(frame)

    def _cast(self, t: int) -> tuple[ClipFrame, LayeredRaycaster]:
        start = time.perf_counter()
        frame = int(self.clip.frame_indices[t])
        meshes = self._meshes(frame)
        if self._faces is None:
            self._faces = [np.asarray(m.faces) for m in meshes]
        start = self._lap("load", start)
        raycaster = self.make_raycaster(meshes)
        camera = self.clip.cameras[t]
        hits = raycaster.cast(camera, num_layers=self.num_layers)
        self._lap("cast", start)
        return ClipFrame(t, frame, float(self.clip.timestamps[t]), camera, meshes, hits), raycaster

    def frames(self) -> Iterator[ClipFrame]:
        """Every frame of the clip in order, each cast once (the reference frame first when it is not 0).
        Exhausting the iterator finishes the tracks (back-fill, coverage, motion labels)."""
        held = None
        for step, t in enumerate(self.order):
            frame, raycaster = self._cast(t)
            self._track(step, frame, raycaster)
            self._motion(frame)
            self._keep(step, frame, raycaster)
            if step == 0 and t != 0:
                held = frame  # hold at most one frame besides the current one
                continue
            yield frame
            if held is not None and t == held.t - 1:
                yield held
                held = None
        self._finish()

    # ---------------------------------------------------------------------------------------- tracks

    def _fill(self, t: int, idx: np.ndarray, vertices: list[np.ndarray], raycaster: LayeredRaycaster) -> None:
        """Positions and layer indices of tracks ``idx`` on clip frame ``t``."""
        q = self._tracks.all_queries().take(idx)
        camera = self.clip.cameras[t]
        world = vertex_points(vertices, self._faces, q.instance, q.face, q.bary)
        cam = camera.world_to_camera(world)
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = camera.project(cam)
        a = self._tracks
        a.world_xyz[t, idx], a.cam_xyz[t, idx], a.uv[t, idx] = world, cam, uv
        a.layer_index[t, idx] = layer_index(raycaster, camera, world, q, self.num_layers)

    def _track(self, step: int, frame: ClipFrame, raycaster: LayeredRaycaster) -> None:
        """Follow the existing tracks onto this frame, then seed where none lands (a seeding frame)."""
        start = time.perf_counter()
        t, a = frame.t, self._tracks
        vertices = _vertices(frame.meshes)
        if a.n:
            self._fill(t, np.arange(a.n), vertices, raycaster)
        self._step[t] = step
        if self.seeding[t]:
            free = None
            if a.n:
                free = ~occupied_cells(a.uv[t, : a.n], a.layer_index[t, : a.n], frame.hits.valid.shape,
                                       self.query_stride)
            new = pick_queries(frame.hits, self.query_stride, t, free)
            if len(new):
                self._fill(t, a.add(new, step), vertices, raycaster)
            frame.seeded = len(new)
        valid = frame.hits.valid
        self._valid_bits[t] = (np.packbits(valid), valid.shape)
        self._lap("tracks", start)

    def _keep(self, step: int, frame: ClipFrame, raycaster: LayeredRaycaster) -> None:
        """Keep this frame's caster and vertices for back-filling tracks seeded later, within the budget."""
        if step >= self._last_seed_step:
            return  # no seeding frame comes after this one
        size = sum(_KEPT_BYTES_PER_FACE * len(m.faces) + _KEPT_BYTES_PER_VERTEX * len(m.vertices)
                   for m in frame.meshes)
        if self._kept_bytes + size <= self.backfill_bytes:
            self._kept[frame.t] = (raycaster, _vertices(frame.meshes))
            self._kept_bytes += size

    def _finish(self) -> None:
        """Back-fill every frame with the tracks seeded after it was processed; coverage; track labels."""
        start = time.perf_counter()
        a, T = self._tracks, self.T
        for t in range(T):
            late = np.flatnonzero(a.seed_step > self._step[t])
            kept = self._kept.pop(t, None)
            if not len(late):
                continue
            if kept is None:
                meshes = self.seq.meshes(int(self.clip.frame_indices[t]))
                kept = (self.make_raycaster(meshes), _vertices(meshes))
            self._fill(t, late, kept[1], kept[0])
        self._kept_bytes = 0
        n = a.n
        q = a.all_queries()
        world = a.world_xyz[:, :n]
        coverage = np.full((T, self.num_layers), np.nan, np.float32)
        for t in range(T):
            bits, shape = self._valid_bits.pop(t)
            valid = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).view(bool)
            coverage[t, : shape[0]] = track_coverage(valid, a.uv[t, :n], a.layer_index[t, :n], self.query_stride)
        displacement = track_displacement(world, q.frame)
        self._result = {
            "query_frame": q.frame.astype(np.int32),
            "query_layer": q.layer.astype(np.int32),
            "query_pixel": q.pixel.astype(np.int32),
            "query_instance": q.instance.astype(np.int32),
            "query_face": q.face.astype(np.int64),
            "query_bary": q.bary.astype(np.float32),
            "world_xyz": np.ascontiguousarray(world),
            "cam_xyz": np.ascontiguousarray(a.cam_xyz[:, :n]),
            "uv": np.ascontiguousarray(a.uv[:, :n]),
            "layer_index": np.ascontiguousarray(a.layer_index[:, :n]),
            "frame_index": np.asarray(self.clip.frame_indices, dtype=np.int64),
            "timestamp": np.asarray(self.clip.timestamps, dtype=np.float64),
            "world_displacement": displacement.astype(np.float32),
            "dynamic": displacement > self.tolerance,
            "coverage": coverage,
        }
        self._lap("tracks", start)

    # ---------------------------------------------------------------------------------------- motion

    def next_frame_index(self, t: int) -> int:
        """The sequence frame a clip frame's motion refers to (:attr:`ClipFrame.next_frame_index`)."""
        f = self.clip.frame_indices
        if t + 1 < len(f):
            return int(f[t + 1])
        step = int(f[1] - f[0]) if len(f) > 1 else 1
        return int(f[t]) + step if int(f[t]) + step < self.seq.num_frames else int(f[t])

    def _motion(self, frame: ClipFrame) -> None:
        """The frame's per-crossing motion labels, against the next frame's meshes (loaded ahead)."""
        start = time.perf_counter()
        nxt = self.next_frame_index(frame.t)
        if nxt == frame.frame_index:
            later = frame.meshes
        else:
            later = self._ahead.get(nxt)
            if later is None:
                later = self.seq.meshes(nxt)
                if frame.t + 1 < self.T and self._step[frame.t + 1] < 0:
                    self._ahead[nxt] = later  # its cast comes later: load it once
            start = self._lap("load", start)
        h = frame.hits
        frame.dynamic, frame.next_world_xyz = crossing_motion(
            h.valid, h.instance_id, h.face_id, h.bary, self._faces, _vertices(frame.meshes), _vertices(later),
            self.tolerance, self.scene_flow)
        frame.next_frame_index = nxt
        self._lap("motion", start)

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``tracks.npz`` arrays (all frames must have been produced).

        Per track (N): ``query_*`` (``query_frame`` now varies per track), ``world_displacement`` float32 and
        ``dynamic`` bool (:func:`wt_datagen.schema.track_displacement` above :attr:`tolerance`); per frame
        and track (T, N): ``world_xyz``, ``cam_xyz``, ``uv``, ``layer_index``, filled on every frame; per frame
        and layer (T, K): ``coverage`` (:func:`wt_datagen.schema.track_coverage` with radius the stride).
        """
        if self._result is None:
            raise RuntimeError("ClipTracker.arrays() called before every frame was produced")
        return self._result


def cameras_json(clip: Clip, fps: float) -> dict:
    """The ``cameras.json`` record of a clip (:func:`wt_datagen.schema.cameras_record`)."""
    return cameras_record(clip.sequence_id, clip.clip_index, clip.trajectory, fps, clip.frame_indices,
                          clip.timestamps, clip.cameras)
