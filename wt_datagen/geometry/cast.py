"""The layered ray caster: every front-to-back surface crossing of every pixel's ray.

An engine proposes candidate (ray, face) pairs: by default ``embree_engine`` (our Embree 3 extension: every hit of
Embree's watertight float32 test in one traversal, nothing filtered), or Open3D's ``list_intersections``.
The kernels of ``kernels.py`` then decide every candidate exactly in float64 and order the crossings (their
module docstring gives the rules). Geometry is recentred on its bounding box before it becomes float32, so
float32 resolves it relative to the scene's size wherever the scene sits; the exact test runs on the very
float32 vertices and rays the engine traced, read as float64, with a near-border margin relative to the
magnitudes the engine's float32 arithmetic worked with.

Memory: rays are processed a chunk at a time, and the candidates of a chunk are held in buffers of fixed size
(the engine stops at the first block of rays that does not fit), so a cast needs the (K, rays) outputs plus
a constant, however many surfaces a ray crosses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import trimesh

from ..camera import Camera
from ..inputs.meshes import MeshError, mesh_problem
from .cutout import check_cutouts, keep_mask
from .kernels import mark_candidates, order_layers, pinhole_rays, resolve_crossings

# Near-border margin of the candidate rule (kernels._near_border), relative to the largest coordinate the
# engine's float32 test works with: 64 float32 unit roundoffs. Embree's test rounds each of its handful of
# operations to one unit (its tilted re-traces move 8); tests/test_cast_real.py checks parity on every ray of
# real closed meshes at scales 1e-3 to 1e3 and 1e5 units from the origin, which a too-small margin would break.
NEAR_MARGIN = 64 * 2.0**-24
CHUNK_RAYS = 1 << 18  # rays per engine call
CANDIDATE_BUDGET = 1 << 21  # engine candidates held at once (an engine call stops when they fill it)
SCRATCH_BUDGET = 1 << 21  # candidates tested at once (with the vertex stars of near-border ones)
MAX_GEOMETRIES = 4096  # Open3D engine geometries per scene (see _body_groups)

# keep(instance_id (n,) int32, face_id (n,) int32, bary (n, 2) float32) -> (n,) bool: crossings it rejects are
# no surface (an alpha cutout, say), removed before the crossings are ordered, counted and truncated to K.
KeepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Hits:
    """Layered crossings. Leading dims are (K, H, W) for a camera, (K, N) for ``cast_rays``.

    depth: float32 camera z (ray parameter t for ``cast_rays``), 0 where invalid.
    valid: bool, monotone along K (layer k valid implies k-1 valid).
    normal: (..., 3) float32 unit geometric face normals, camera space (world for ``cast_rays``), 0 where invalid.
    front_facing: bool, the ray enters the surface (normal against the ray).
    face_id, instance_id: int32 face index in the instance's own face array, instance index; -1 where invalid.
    bary: (..., 2) float32 (u, v): the point is (1-u-v) v0 + u v1 + v v2 of the face's vertices.
    num_hits: int32 (H, W) or (N,): crossings along the ray before truncation to K.
    ray_origins, ray_dirs: float64 rays the points lie on, (1, 3) and (H, W, 3) camera-space ``K^-1 (u + .5,
        v + .5, 1)`` for a camera, (N or 1, 3) and (N, 3) world for ``cast_rays``; ``xyz`` derives from them.
    """

    depth: np.ndarray
    valid: np.ndarray
    normal: np.ndarray
    front_facing: np.ndarray
    face_id: np.ndarray
    instance_id: np.ndarray
    bary: np.ndarray
    num_hits: np.ndarray
    ray_origins: np.ndarray
    ray_dirs: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.depth.shape[0]

    @cached_property
    def xyz(self) -> np.ndarray:
        """(..., 3) float32 points, 0 where invalid: camera space ``depth * K^-1 (u + .5, v + .5, 1)`` (so
        ``xyz[..., 2] == depth``), world ``origin + depth * direction`` for ``cast_rays``."""
        d = self.depth.astype(np.float64)[..., None]
        return np.where(self.valid[..., None], self.ray_origins + d * self.ray_dirs, 0).astype(np.float32)


def _instances(meshes) -> list[tuple[str, trimesh.Trimesh, np.ndarray]]:
    """(name, mesh, 4x4 transform) for each instance of a Trimesh, a list of them, or a Scene."""
    if isinstance(meshes, trimesh.Scene):
        out = []
        for node in meshes.graph.nodes_geometry:
            transform, geom_name = meshes.graph[node]
            geom = meshes.geometry[geom_name]
            if isinstance(geom, trimesh.Trimesh):
                out.append((str(node), geom, np.asarray(transform, dtype=np.float64)))
        if not out:
            raise MeshError("scene: holds no triangle meshes")
        return out
    if isinstance(meshes, trimesh.Trimesh):
        meshes = [meshes]
    out = []
    for i, m in enumerate(meshes):
        if not isinstance(m, trimesh.Trimesh):
            raise MeshError(f"mesh {i}: expected trimesh.Trimesh, got {type(m).__name__}")
        out.append((str(m.metadata.get("name", f"mesh_{i}")), m, np.eye(4)))
    if not out:
        raise MeshError("meshes: the list is empty")
    return out


def _checked_arrays(name: str, mesh: trimesh.Trimesh, transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space float64 vertices and int64 faces of one instance, or a MeshError saying what is wrong."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces)
    problem = mesh_problem(v, f)
    if problem:
        raise MeshError(f"mesh '{name}': {problem}")
    v = trimesh.transform_points(v, transform) if not np.array_equal(transform, np.eye(4)) else v
    return v, f.astype(np.int64)


class LayeredRaycaster:
    """Casts rays through a fixed set of mesh instances; the acceleration structure is built once.

    Args:
        meshes: a trimesh.Trimesh, a list of them (one instance each), or a trimesh.Scene (one instance per
            geometry node, its transform applied).
        backend: "embree" (default: every candidate in one traversal, multi-threaded, memory bounded) or
            "open3d" (Open3D's ``list_intersections``, a second engine for cross-checks; its own filter drops a
            hit of one geometry at a bit-identical float32 distance to the previous one, so it can lose a
            crossing where two faces of one body tie).
        num_threads: threads for casting, 0 for all cores (use 1 in each of several worker processes).
        keep: optional per-crossing filter (``KeepFn``): crossings it rejects are no surface; they are removed
            before ordering, ``num_hits`` and truncation to K.
        cutouts: None, or one ``geometry.cutout.Cutout`` (alphaMode MASK) or None per instance: crossings
            where the surface is cut out are no crossings (``geometry/cutout.py``); applied with ``keep``.

    A caster is used by one thread at a time.
    """

    def __init__(self, meshes, backend: str = "embree", num_threads: int = 0, keep: KeepFn | None = None,
                 cutouts=None):
        if backend not in ("embree", "open3d"):
            raise ValueError(f"backend: unknown '{backend}', expected 'embree' or 'open3d'")
        self.backend = backend
        self.num_threads = int(num_threads)
        self.keep = keep
        inst = _instances(meshes)
        arrays = [_checked_arrays(name, mesh, T) for name, mesh, T in inst]
        self.cutouts = check_cutouts(cutouts, [len(f) for _, f in arrays])
        self.instance_names = [name for name, _, _ in inst]
        nv = np.array([len(v) for v, _ in arrays])
        nf = np.array([len(f) for _, f in arrays])
        self.vertex_offset = np.concatenate([[0], np.cumsum(nv)])
        self.face_offset = np.concatenate([[0], np.cumsum(nf)])
        self._verts = np.concatenate([v for v, _ in arrays])  # float64 world, as given
        self._faces = np.concatenate([f + o for (_, f), o in zip(arrays, self.vertex_offset[:-1])])
        # Recentre before float32: coordinates then carry float32's relative precision of the scene's size,
        # wherever the scene sits. + 0.0 turns -0.0 into 0.0, so that equal positions have equal bytes.
        self.centre = (self._verts.min(axis=0) + self._verts.max(axis=0)) / 2
        with np.errstate(over="ignore"):
            verts32 = (self._verts - self.centre).astype(np.float32) + np.float32(0)
        finite = np.isfinite(verts32).all(axis=1)
        if not finite.all():
            bad = int(np.searchsorted(self.vertex_offset, np.argmin(finite), side="right")) - 1
            raise MeshError(f"mesh '{self.instance_names[bad]}': vertex coordinates overflow float32")
        self._face_inst = np.repeat(np.arange(len(arrays), dtype=np.int32), nf)
        self._face_local = (np.arange(len(self._faces)) - self.face_offset[self._face_inst]).astype(np.int32)
        # The engines' geometry, and the exact test's: float32 corners in the recentred frame, read as float64.
        self._tri = tri = verts32.astype(np.float64)[self._faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        self._face_normal = np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)
        # Vertex stars over merged positions (split vertices at UV seams, touching bodies and instances).
        self._vmerge = _merged_positions(verts32)
        corner_vertex = self._vmerge[self._faces].ravel()
        order = np.argsort(corner_vertex, kind="stable")
        self._star_idx = (order // 3).astype(np.int64)
        self._star_ptr = np.concatenate([[0], np.cumsum(np.bincount(corner_vertex, minlength=self._vmerge.max() + 1))])
        if backend == "embree":
            self._engine = _EmbreeEngine(verts32, self._faces, self.num_threads)
        else:
            self._engine = _Open3DEngine(verts32, self._faces, self._body_groups(self._vmerge), self.num_threads)

    def _body_groups(self, vmerge: np.ndarray) -> np.ndarray:
        """(F,) Open3D geometry of each face: one per connected body of each instance (merged positions).

        Open3D's hit filter drops a hit of one geometry at a bit-identical distance to the previous one, which
        loses a crossing where two bodies touch face to face (assemblies, convex decompositions). Bodies that
        share no vertex position go to separate geometries; past MAX_GEOMETRIES bodies, they share geometries
        round-robin.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        f = vmerge[self._faces]
        n = int(vmerge.max()) + 1
        edges = coo_matrix((np.ones(2 * len(f)), (np.r_[f[:, 0], f[:, 1]], np.r_[f[:, 1], f[:, 2]])), shape=(n, n))
        _, comp = connected_components(edges, directed=False)
        # Bodies never span instances: key by (instance, component), numbered in order of first face.
        _, body = np.unique(self._face_inst.astype(np.int64) * n + comp[f[:, 0]], return_inverse=True)
        return body.ravel() % MAX_GEOMETRIES

    @property
    def bounds(self) -> np.ndarray:
        """(2, 3) world-space bounding box of all instances."""
        return np.stack([self._verts.min(axis=0), self._verts.max(axis=0)])

    def face_normals(self, instance_id: np.ndarray, face_id: np.ndarray) -> np.ndarray:
        """(n, 3) float64 unit geometric normals (world) of the faces ``face_id`` of instances ``instance_id``,
        as the caster holds them (0 for zero-area faces)."""
        return self._face_normal[self.face_offset[np.asarray(instance_id)] + np.asarray(face_id)]

    def cast(self, camera: Camera, num_layers: int) -> Hits:
        """Layered crossings of every pixel's ray, front to back, arrays shaped (K, H, W, ...)."""
        H, W = camera.height, camera.width
        cam_dirs, rays32 = np.empty((H * W, 3)), np.empty((H * W, 6), np.float32)
        pinhole_rays(camera.K, camera.rotation, camera.center - self.centre, W, H, cam_dirs, rays32)
        hits = self._cast(rays32, camera.rotation, num_layers)
        return Hits(**{k: _to_image(v, k, H, W) for k, v in hits.items()},
                    ray_origins=np.zeros((1, 3)), ray_dirs=cam_dirs.reshape(H, W, 3))

    def cast_rays(self, origins: np.ndarray, directions: np.ndarray, num_layers: int) -> Hits:
        """Layered crossings of arbitrary world rays; ``depth`` is t with point = origin + t * direction.

        origins: (N, 3) or (3,) float; directions: (N, 3) float, non-zero (need not be unit). Arrays (K, N, ...).
        Like pixel rays, each ray is decided as the engine traces it: its origin (relative to ``centre``) and
        direction rounded to float32, so t holds to float32 precision of the ray given.
        """
        d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
        o = np.asarray(origins, dtype=np.float64).reshape(-1, 3)
        if len(o) not in (1, len(d)):
            raise ValueError(f"cast_rays: {len(o)} origins for {len(d)} directions")
        rays32 = np.empty((len(d), 6), np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            rays32[:, :3] = o - self.centre
            rays32[:, 3:] = d
        if not np.isfinite(rays32).all() or (np.abs(rays32[:, 3:]).max(axis=1, initial=0) == 0).any():
            raise ValueError("cast_rays: origins and directions must be finite and directions non-zero "
                             "(in float32)")
        return Hits(**self._cast(rays32, np.eye(3), num_layers), ray_origins=o, ray_dirs=d)

    def _cast(self, rays32: np.ndarray, out_rot: np.ndarray, num_layers: int) -> dict:
        """Layered crossings of ``rays32`` (R, 6) float32 (origin relative to ``centre``, direction), normals
        rotated by ``out_rot`` into the output frame; arrays (K, R, ...)."""
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        K, R = int(num_layers), len(rays32)
        ids = np.full((2, K, R), -1, np.int32)  # one fill for both id arrays
        out = {  # invalid slots keep these fill values; the kernel writes valid ones only
            "depth": np.zeros((K, R), np.float32),
            "normal": np.zeros((K, R, 3), np.float32), "front_facing": np.zeros((K, R), np.bool_),
            "face_id": ids[0], "instance_id": ids[1],
            "bary": np.zeros((K, R, 2), np.float32), "num_hits": np.zeros(R, np.int32),
        }
        threads = numba.get_num_threads()
        n_threads = self.num_threads or numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(n_threads)
        try:
            scratch = _Scratch()
            s = 0
            while s < R:
                e, off, cnt, cand = self._engine.candidates(rays32, s, min(R, s + CHUNK_RAYS), n_threads)
                self._resolve(rays32[s:e], off[:e - s], cnt[:e - s], cand, np.arange(s, e), scratch, out_rot, K,
                              out)
                s = e
        finally:
            numba.set_num_threads(threads)
        out["valid"] = np.arange(K)[:, None] < out["num_hits"][None]
        return out

    def _resolve(self, rays32, off, cnt, cand, out_ray, scratch, out_rot, K, out) -> None:
        """Exact crossings of ``rays32`` from their proposed faces (ray i's: ``cand[off[i]:off[i] + cnt[i]]``),
        ordered and truncated into ``out`` at rays ``out_ray``, a run of rays whose candidates fit
        SCRATCH_BUDGET at a time. Rays along a chain of edges are resolved again with all their candidates as
        proposals, until no candidate is near its border at a corner whose faces are not in yet."""
        while len(cnt):
            n = len(cnt)
            near = np.empty(int((off + cnt).max(initial=0)), np.uint8)
            corners = np.empty(3 * len(near), np.int64)
            counts = np.empty(n, np.int64)
            mark_candidates(off, cnt, cand, rays32, self._tri, self._faces, self._vmerge, self._star_ptr,
                            NEAR_MARGIN, near, counts)
            ptr = np.zeros(n + 1, np.int64)
            np.cumsum(counts, out=ptr[1:])
            res_nc, res_n, again = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.bool_)
            rounds = []
            i0 = 0
            while i0 < n:
                i1 = min(n, max(i0 + 1, int(np.searchsorted(ptr, ptr[i0] + SCRATCH_BUDGET, side="right")) - 1))
                res_c, *res = scratch.get(int(ptr[i1] - ptr[i0]))
                resolve_crossings(i0, i1, off, cnt, cand, near, ptr, rays32, self._tri, self._faces, self._vmerge,
                                  self._star_ptr, self._star_idx, NEAR_MARGIN, corners, res_c, *res, res_nc, res_n,
                                  again)
                filtered = self.keep is not None or self.cutouts is not None
                keep = self._kept(ptr, i0, i1, res_n, res) if filtered else _KEEP_ALL
                order_layers(i0, i1, ptr, res_n, *res, keep, out_ray, self._face_inst, self._face_local,
                             self._face_normal, out_rot, K, out["depth"], out["normal"], out["front_facing"],
                             out["face_id"], out["instance_id"], out["bary"], out["num_hits"])
                todo = np.flatnonzero(again[i0:i1]) + i0
                if len(todo):  # their candidates, to propose in the next round
                    rounds.append((todo, _gather(res_c, ptr[todo] - ptr[i0], res_nc[todo])))
                i0 = i1
            if not rounds:
                return
            todo = np.concatenate([t for t, _ in rounds])
            cand = np.concatenate([c for _, c in rounds])
            cnt = res_nc[todo]
            off = np.concatenate([[0], np.cumsum(cnt[:-1], dtype=np.int64)])
            rays32, out_ray = rays32[todo], out_ray[todo]

    def _kept(self, ptr, i0, i1, res_n, res) -> np.ndarray:
        """The ``keep`` filter and the cutouts over the resolved crossings of rays [i0, i1), laid out like the
        scratch arrays."""
        res_f, _, res_u, res_v, _ = res
        idx = _slots(ptr[i0:i1] - ptr[i0], res_n[i0:i1])
        f = res_f[idx]
        inst, local = self._face_inst[f], self._face_local[f]
        bary = np.stack([res_u[idx], res_v[idx]], axis=1).astype(np.float32)
        mask = np.ones(len(idx), np.bool_)
        if self.keep is not None:
            mask = np.asarray(self.keep(inst, local, bary))
            if mask.shape != (len(idx),) or mask.dtype != np.bool_:
                raise ValueError(f"keep: returned {mask.dtype} {mask.shape}, expected bool ({len(idx)},)")
        if self.cutouts is not None:
            mask = mask & keep_mask(self.cutouts, inst, local, bary)
        keep = np.zeros(int(ptr[i1] - ptr[i0]), np.bool_)
        keep[idx] = mask
        return keep


_KEEP_ALL = np.zeros(0, np.bool_)  # order_layers: keep every crossing


def _slots(start: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Indices start[i], ..., start[i] + n[i] - 1 for every i, in order."""
    n = n.astype(np.int64)
    first = np.cumsum(n) - n
    return np.repeat(start - first, n) + np.arange(int(n.sum()))


def _gather(a: np.ndarray, start: np.ndarray, n: np.ndarray) -> np.ndarray:
    """a[start[0]:start[0] + n[0]], a[start[1]:...], ... concatenated."""
    return a[_slots(start, n)]


class _Scratch:
    """The arrays one run of rays is resolved in (candidate faces; crossed face, t, u, v, front), grown when a
    run needs more."""

    def __init__(self):
        self._arrays: tuple = ()

    def get(self, size: int) -> tuple:
        if not self._arrays or len(self._arrays[0]) < size:
            size = max(size, 1)
            self._arrays = (np.empty(size, np.int32), np.empty(size, np.int32), np.empty(size), np.empty(size),
                            np.empty(size), np.empty(size, np.bool_))
        return self._arrays


def _merged_positions(v: np.ndarray) -> np.ndarray:
    """(V,) int64 id of each float32 vertex's position: equal ids for bit-identical positions, numbered in
    sorted order (0.0 and -0.0 must have been made equal before)."""
    bits = v.view(np.uint32)
    order = np.lexsort((bits[:, 2], bits[:, 1], bits[:, 0]))
    new = np.ones(len(v), bool)
    new[1:] = (bits[order[1:]] != bits[order[:-1]]).any(axis=1)
    ids = np.empty(len(v), np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _to_image(a: np.ndarray, key: str, H: int, W: int) -> np.ndarray:
    """(K, R, ...) -> (K, H, W, ...); num_hits (R,) -> (H, W)."""
    if key == "num_hits":
        return a.reshape(H, W)
    return a.reshape((a.shape[0], H, W) + a.shape[2:])


class _EmbreeEngine:
    """Every candidate face of every ray from our Embree 3 extension (``embree_engine.cpp``), into fixed buffers."""

    def __init__(self, verts32: np.ndarray, faces: np.ndarray, num_threads: int = 0):
        try:
            from .embree_engine import Scene
        except ImportError as e:
            raise ImportError(f"backend 'embree': the compiled engine (wt_datagen/geometry/embree_engine.cpp) is not "
                              f"built or cannot load ({e}); build it with `make install`, `pip install -e .` or, in a "
                              f"source tree, `python setup.py build_ext --inplace` (needs Debian libembree-dev, g++ "
                              f"and pybind11)") from e

        self._scene = Scene(verts32, faces.astype(np.uint32), num_threads)

    def candidates(self, rays32: np.ndarray, start: int, stop: int, num_threads: int):
        """(end, off, cnt, faces): rays [start, end) of [start, stop) are done; ray start + i's candidate faces
        are ``faces[off[i]:off[i] + cnt[i]]``, int32 global face ids."""
        off, cnt = np.empty(stop - start, np.int64), np.empty(stop - start, np.int32)
        faces = np.empty(CANDIDATE_BUDGET, np.int32)
        while True:
            end, need = self._scene.candidates(rays32, start, stop, off, cnt, faces, num_threads)
            if end > start:
                return end, off, cnt, faces
            faces = np.empty(max(need, 2 * len(faces)), np.int32)  # one block of rays needs more than the budget


class _Open3DEngine:
    """All hits per ray from Open3D's ``list_intersections``; faces are split into geometries by ``group``."""

    CHUNK = 1 << 16  # rays per call: Open3D lists every hit of its rays at once

    def __init__(self, verts32: np.ndarray, faces: np.ndarray, group: np.ndarray, num_threads: int = 0):
        import open3d as o3d

        self._o3c = o3d.core
        self._scene = o3d.t.geometry.RaycastingScene()
        # geom_faces[geom_face_offset[g] + prim] is the global face of primitive prim of geometry g.
        self._geom_faces = np.argsort(group, kind="stable").astype(np.int32)
        counts = np.bincount(group)
        starts = np.concatenate([[0], np.cumsum(counts)])
        self._geom_face_offset = np.zeros(len(counts), np.int64)
        for g in np.flatnonzero(counts):
            gf = faces[self._geom_faces[starts[g]:starts[g + 1]]]
            used, local = np.unique(gf, return_inverse=True)
            gid = self._scene.add_triangles(o3d.core.Tensor(verts32[used]),
                                            o3d.core.Tensor(local.reshape(-1, 3).astype(np.uint32)))
            if gid >= len(self._geom_face_offset):
                self._geom_face_offset = np.resize(self._geom_face_offset, gid + 1)
            self._geom_face_offset[gid] = starts[g]

    def candidates(self, rays32: np.ndarray, start: int, stop: int, num_threads: int):
        """As ``_EmbreeEngine.candidates``, a fixed number of rays at a time."""
        end = min(stop, start + self.CHUNK)
        res = self._scene.list_intersections(self._o3c.Tensor(rays32[start:end]), nthreads=num_threads)
        splits = res["ray_splits"].numpy().astype(np.int64)
        geom, prim = res["geometry_ids"].numpy(), res["primitive_ids"].numpy()
        faces = self._geom_faces[self._geom_face_offset[geom] + prim]
        return end, splits[:-1], np.diff(splits).astype(np.int32), faces
