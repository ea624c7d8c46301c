"""World-centric 3D tracks of surface points on every layer, visible or hidden.

Query points are the layered hits of a reference frame on a pixel stride, over all K layers. Each becomes a
material point (instance, face, barycentric), which is carried to any frame by re-evaluating that face's
vertices there: exact under deformation and rigid motion alike, since face arrays never change. In every
frame the point's layer is counted exactly, by casting the segment from the camera centre to the point and
counting the surface crossings before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import trimesh

from ..camera import Camera
from ..inputs.sequences import Sequence
from ..schema import cameras_record
from .cast import Hits, LayeredRaycaster

# When a point lies on an edge of its own face, the segment to it may cross the neighbour across that edge
# instead (the exact test gives an edge to one face): the crossing of the same instance, facing the same
# way, within this fraction of the point's distance then stands in for the point. It only identifies the
# point's crossing; the order of crossings is the caster's (kernels._before), nothing else.
_STAND_IN_RTOL = 1e-4


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
    """Material points picked on a reference frame, one per (stride-grid pixel, valid layer).

    Attributes:
        frame: clip-relative index of the reference frame.
        layer: (N,) int32 layer of the hit in the reference frame.
        pixel: (N, 2) int32 pixel (u, v) = (column, row).
        instance: (N,) int32 instance id.
        face: (N,) int64 face id in the instance's face array.
        bary: (N, 2) float64 (u, v): point = (1 - u - v) v0 + u v1 + v v2.
    """

    frame: int
    layer: np.ndarray
    pixel: np.ndarray
    instance: np.ndarray
    face: np.ndarray
    bary: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)


def pick_queries(hits: Hits, stride: int, frame: int = 0) -> Queries:
    """Every valid layer at pixels ``(stride // 2 + i * stride, stride // 2 + j * stride)``.

    ``hits`` is a camera cast (arrays (K, H, W, ...)); queries are ordered by layer, then row, then column.
    """
    if stride < 1:
        raise ValueError(f"query stride must be >= 1, got {stride}")
    K, H, W = hits.valid.shape
    rows = np.arange(stride // 2, H, stride)
    cols = np.arange(stride // 2, W, stride)
    grid = np.ix_(np.arange(K), rows, cols)
    k, i, j = np.nonzero(hits.valid[grid])
    v, u = rows[i], cols[j]
    return Queries(
        frame=int(frame),
        layer=k.astype(np.int32),
        pixel=np.stack([u, v], axis=-1).astype(np.int32),
        instance=hits.instance_id[k, v, u].astype(np.int32),
        face=hits.face_id[k, v, u].astype(np.int64),
        bary=hits.bary[k, v, u].astype(np.float64),
    )


def material_points(meshes: list[trimesh.Trimesh], queries: Queries) -> np.ndarray:
    """(N, 3) float64 world positions of the query points on ``meshes`` (one frame's instances)."""
    out = np.empty((len(queries), 3))
    weights = np.column_stack([1.0 - queries.bary.sum(1), queries.bary])
    for idx, mesh in enumerate(meshes):  # a loop over instances, not over points
        sel = queries.instance == idx
        if sel.any():
            corners = np.asarray(mesh.vertices, dtype=np.float64)[mesh.faces[queries.face[sel]]]  # (n, 3, 3)
            out[sel] = np.einsum("nc,ncd->nd", weights[sel], corners)
    return out


def layer_index(raycaster: LayeredRaycaster, camera: Camera, world_xyz: np.ndarray, queries: Queries,
                num_layers: int = 8) -> np.ndarray:
    """(N,) int8 layer each point occupies in this frame's layered pointmap.

    0 visible, k > 0 behind k surface crossings, -1 outside the image or not in front of the camera. The
    segment from the camera centre to the point (t = 1 at the point) is cast, and the point's layer is the
    place of its own crossing (its face, or a stand-in, see ``_STAND_IN_RTOL``) among the segment's
    crossings in the caster's own order: the rule that orders the layers (equal float32 depth: exits before
    entries, then face) is the rule that places the point, so a point on a face touching another sits where
    the layers put it. Rays whose crossings were truncated before the point's own are cast again with every
    layer.
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
    instance, face = queries.instance[idx], queries.face[idx]
    normals = raycaster.face_normals(instance, face)
    front = np.einsum("nd,nd->n", normals, directions) < 0  # how the point's own face meets the segment
    hits = raycaster.cast_rays(origins, directions, num_layers=num_layers)
    layers, own = _own_layer(hits, instance, face, front)
    again = np.nonzero(~own & (hits.num_hits > hits.num_layers))[0]
    if len(again):
        more = raycaster.cast_rays(origins[again], directions[again], num_layers=int(hits.num_hits[again].max()))
        layers[again] = _own_layer(more, instance[again], face[again], front[again])[0]
    out[idx] = np.minimum(layers, np.iinfo(np.int8).max)
    return out


def _own_layer(hits: Hits, instance: np.ndarray, face: np.ndarray, front: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layer of each ray's own crossing (t = 1 at the point), and whether that was its own face's crossing.

    Without the own face among the layers: a stand-in (same instance and facing, nearest t = 1 within
    ``_STAND_IN_RTOL``), else the number of crossings before t = 1."""
    t = hits.depth.astype(np.float64)  # (L, n) ray parameters
    own = hits.valid & (hits.instance_id == instance) & (hits.face_id == face)
    gap = np.where(hits.valid & (hits.instance_id == instance) & (hits.front_facing == front), np.abs(t - 1.0),
                   np.inf)
    stand_in = gap.min(0) <= _STAND_IN_RTOL
    before = (hits.valid & (t < 1.0)).sum(0)
    layer = np.where(own.any(0), own.argmax(0), np.where(stand_in, gap.argmin(0), before))
    return layer, own.any(0)


@dataclass
class ClipFrame:
    """One frame of a clip, cast and ready to become a sample.

    Attributes:
        t: clip-relative index; ``frame_index`` the sequence frame; ``timestamp`` seconds.
        camera: this frame's camera (sequence world frame).
        meshes: the world-space instance meshes (visuals kept, for the image).
        hits: the layered cast, arrays (K, H, W, ...).
    """

    t: int
    frame_index: int
    timestamp: float
    camera: Camera
    meshes: list[trimesh.Trimesh]
    hits: Hits


class ClipTracker:
    """Streams the frames of a clip and records the tracks of its query points on the way.

    Frames are produced one at a time (memory bounded in T); only the (T, N) track arrays grow with T.
    Usage: ``for frame in tracker.frames(): write(frame)`` then ``tracker.arrays()`` for ``tracks.npz``.
    ``query_frame`` is clamped to the clip; ``seconds`` accumulates wall time per stage (load: the frame's
    meshes, cast: caster build and layered cast, tracks: everything for the tracks).
    """

    def __init__(self, seq: Sequence, clip: Clip, num_layers: int, query_stride: int, query_frame: int = 0,
                 make_raycaster: Callable[[list[trimesh.Trimesh]], LayeredRaycaster] = LayeredRaycaster):
        T = len(clip.frame_indices)
        self.seq, self.clip, self.num_layers = seq, clip, num_layers
        self.query_stride, self.query_frame = query_stride, min(max(query_frame, 0), T - 1)
        self.make_raycaster = make_raycaster
        self.queries: Queries | None = None
        self.seconds = {"load": 0.0, "cast": 0.0, "tracks": 0.0}
        self._done = np.zeros(T, dtype=bool)

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now

    def _cast(self, t: int) -> tuple[ClipFrame, LayeredRaycaster]:
        start = time.perf_counter()
        frame = int(self.clip.frame_indices[t])
        meshes = self.seq.meshes(frame)
        start = self._lap("load", start)
        raycaster = self.make_raycaster(meshes)
        camera = self.clip.cameras[t]
        hits = raycaster.cast(camera, num_layers=self.num_layers)
        self._lap("cast", start)
        return ClipFrame(t, frame, float(self.clip.timestamps[t]), camera, meshes, hits), raycaster

    def frames(self) -> Iterator[ClipFrame]:
        """Every frame of the clip in order, each cast once (the reference frame first when it is not 0)."""
        T = len(self.clip.frame_indices)
        ref = self._cast(self.query_frame)
        self._start(ref[0].hits, T)
        for t in range(T):
            frame, raycaster = ref if t == self.query_frame else self._cast(t)
            if t == self.query_frame:
                ref = None  # hold at most one frame besides the current one
            self._record(frame, raycaster)
            yield frame

    def _start(self, ref_hits: Hits, T: int) -> None:
        start = time.perf_counter()
        self.queries = pick_queries(ref_hits, self.query_stride, self.query_frame)
        N = len(self.queries)
        self.world_xyz = np.zeros((T, N, 3), dtype=np.float32)
        self.cam_xyz = np.zeros((T, N, 3), dtype=np.float32)
        self.uv = np.zeros((T, N, 2), dtype=np.float32)
        self.layer_index = np.full((T, N), -1, dtype=np.int8)
        self._lap("tracks", start)

    def _record(self, frame: ClipFrame, raycaster: LayeredRaycaster) -> None:
        start = time.perf_counter()
        world = material_points(frame.meshes, self.queries)
        cam = frame.camera.world_to_camera(world)
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = frame.camera.project(cam)
        t = frame.t
        self.world_xyz[t], self.cam_xyz[t], self.uv[t] = world, cam, uv
        self.layer_index[t] = layer_index(raycaster, frame.camera, world, self.queries, self.num_layers)
        self._done[t] = True
        self._lap("tracks", start)

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``tracks.npz`` arrays (all frames must have been produced)."""
        if not self._done.all():
            raise RuntimeError("ClipTracker.arrays() called before every frame was produced")
        q = self.queries
        return {
            "query_frame": np.full(len(q), q.frame, dtype=np.int32),
            "query_layer": q.layer.astype(np.int32),
            "query_pixel": q.pixel,
            "query_instance": q.instance,
            "query_face": q.face,
            "query_bary": q.bary.astype(np.float32),
            "world_xyz": self.world_xyz,
            "cam_xyz": self.cam_xyz,
            "uv": self.uv,
            "layer_index": self.layer_index,
            "frame_index": np.asarray(self.clip.frame_indices, dtype=np.int64),
            "timestamp": np.asarray(self.clip.timestamps, dtype=np.float64),
        }


def cameras_json(clip: Clip, fps: float) -> dict:
    """The ``cameras.json`` record of a clip (:func:`wt_datagen.schema.cameras_record`)."""
    return cameras_record(clip.sequence_id, clip.clip_index, clip.trajectory, fps, clip.frame_indices,
                          clip.timestamps, clip.cameras)
