"""The layered ray caster: every front-to-back surface crossing of every pixel's ray.

An engine (Open3D's multi-threaded ``list_intersections`` by default, or embreex) proposes candidate
(ray, face) hits; ``_kernels.resolve_layers`` then decides each candidate exactly and sorts them (its module
docstring gives the rule that removes duplicate reports at shared edges and keeps grazes even). Geometry is
held in float32, as the engines hold it, and the exact test runs on those float32 coordinates in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import trimesh

from ..camera import Camera
from ..inputs.meshes import MeshError, mesh_problem
from .cutout import apply_cutouts, check_cutouts
from .kernels import count_candidates, pinhole_rays, resolve_layers

# A hit whose barycentric coordinate is below this is near its triangle's border: the faces around its
# vertices become candidates too, in case the engine reported a crossing at a shared edge on another face
# (or dropped it). Float32 engines place hits to about 1e-7; the margin costs little.
NEAR_BORDER = 1e-4
CHUNK_RAYS = 1 << 18  # rays per engine call: bounds the memory of the raw hit lists
MAX_GEOMETRIES = 4096  # engine geometries per scene (see _body_groups)


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
    """World-space float32 vertices and int64 faces of one instance, or a MeshError saying what is wrong."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces)
    problem = mesh_problem(v, f)
    if problem:
        raise MeshError(f"mesh '{name}': {problem}")
    v = trimesh.transform_points(v, transform) if not np.array_equal(transform, np.eye(4)) else v
    v32 = v.astype(np.float32)
    if not np.isfinite(v32).all():
        raise MeshError(f"mesh '{name}': vertex coordinates overflow float32")
    return v32, f.astype(np.int64)


class LayeredRaycaster:
    """Casts rays through a fixed set of mesh instances; the acceleration structure is built once.

    Args:
        meshes: a trimesh.Trimesh, a list of them (one instance each), or a trimesh.Scene (one instance per
            geometry node, its transform applied).
        backend: "open3d" (multi-threaded, default) or "embree" (embreex, one thread).
        num_threads: threads for casting, 0 for all cores (use 1 in each of several worker processes).
        cutouts: None, or one ``geometry.cutout.Cutout`` (alphaMode MASK) or None per instance: crossings
            where the surface is cut out are no crossings (``geometry/cutout.py``).
    """

    def __init__(self, meshes, backend: str = "open3d", num_threads: int = 0, cutouts=None):
        self.num_threads = int(num_threads)
        inst = _instances(meshes)
        arrays = [_checked_arrays(name, mesh, T) for name, mesh, T in inst]
        self.cutouts = check_cutouts(cutouts, [len(f) for _, f in arrays])
        self.instance_names = [name for name, _, _ in inst]
        nv = np.array([len(v) for v, _ in arrays])
        nf = np.array([len(f) for _, f in arrays])
        self.vertex_offset = np.concatenate([[0], np.cumsum(nv)])
        self.face_offset = np.concatenate([[0], np.cumsum(nf)])
        verts32 = np.concatenate([v for v, _ in arrays])
        self._verts = verts32.astype(np.float64)
        self._faces = np.concatenate([f + o for (_, f), o in zip(arrays, self.vertex_offset[:-1])])
        self._face_inst = np.repeat(np.arange(len(arrays), dtype=np.int32), nf)
        self._face_local = (np.arange(len(self._faces)) - self.face_offset[self._face_inst]).astype(np.int32)
        self._tri = tri = self._verts[self._faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        self._face_normal = np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)
        # Vertex stars over merged positions (split vertices at UV seams, touching instances), for candidates.
        _, self._vmerge = np.unique(verts32, axis=0, return_inverse=True)
        self._vmerge = self._vmerge.ravel().astype(np.int64)
        corner_vertex = self._vmerge[self._faces].ravel()
        order = np.argsort(corner_vertex, kind="stable")
        self._star_idx = (order // 3).astype(np.int64)
        self._star_ptr = np.concatenate([[0], np.cumsum(np.bincount(corner_vertex, minlength=self._vmerge.max() + 1))])
        if backend == "open3d":
            self._engine = _Open3DEngine(verts32, self._faces, self._body_groups(self._vmerge), self.num_threads)
        elif backend == "embree":
            self._engine = _EmbreeEngine(verts32, self._faces, self.face_offset)
        else:
            raise ValueError(f"backend: unknown '{backend}', expected 'open3d' or 'embree'")
        self.backend = backend

    def _body_groups(self, vmerge: np.ndarray) -> np.ndarray:
        """(F,) engine geometry of each face: one per connected body of each instance (merged positions).

        Open3D's hit filter drops a hit of one geometry at a bit-identical distance to the previous one, which
        loses a crossing where two bodies touch face to face (assemblies, convex decompositions). Faces at one
        point of a single body share a vertex and are recovered as candidates; separate bodies must be separate
        geometries. Past MAX_GEOMETRIES bodies, bodies share geometries round-robin.
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

    def cast(self, camera: Camera, num_layers: int) -> Hits:
        """Layered crossings of every pixel's ray, front to back, arrays shaped (K, H, W, ...)."""
        n = camera.width * camera.height
        cam_dirs, world_dirs, rays32 = np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 6), np.float32)
        pinhole_rays(camera.K, camera.rotation, camera.center, camera.width, camera.height,
                     cam_dirs, world_dirs, rays32)
        hits = self._cast(camera.center[None], world_dirs, rays32, camera.rotation, num_layers)
        H, W = camera.height, camera.width
        return Hits(**{k: _to_image(v, k, H, W) for k, v in hits.items()},
                    ray_origins=np.zeros((1, 3)), ray_dirs=cam_dirs.reshape(H, W, 3))

    def cast_rays(self, origins: np.ndarray, directions: np.ndarray, num_layers: int) -> Hits:
        """Layered crossings of arbitrary world rays; ``depth`` is t with point = origin + t * direction.

        origins: (N, 3) or (3,) float; directions: (N, 3) float, non-zero (need not be unit). Arrays (K, N, ...).
        """
        d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
        o = np.asarray(origins, dtype=np.float64).reshape(-1, 3)
        if len(o) not in (1, len(d)):
            raise ValueError(f"cast_rays: {len(o)} origins for {len(d)} directions")
        if not (np.isfinite(o).all() and np.isfinite(d).all()) or (np.abs(d).max(axis=1) == 0).any():
            raise ValueError("cast_rays: origins and directions must be finite and directions non-zero")
        rays32 = np.empty((len(d), 6), np.float32)
        rays32[:, :3] = o
        rays32[:, 3:] = d
        return Hits(**self._cast(o, d, rays32, np.eye(3), num_layers), ray_origins=o, ray_dirs=d)

    def _cast(self, origins, dirs, rays32, out_rot, num_layers: int) -> dict:
        """Engine hits for ``rays32`` (R, 6) float32, resolved exactly on the float64 rays (origins, dirs);
        normals rotated by ``out_rot`` into the output frame."""
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        K, R = int(num_layers), len(dirs)
        threads = numba.get_num_threads()
        numba.set_num_threads(self.num_threads or numba.config.NUMBA_NUM_THREADS)
        try:
            out = self._cast_chunks(origins, dirs, rays32, out_rot, K, R)
            # ---- cutouts (alphaMode MASK; geometry/cutout.py): drop cut crossings before num_hits and K ----
            if self.cutouts is not None:
                out = apply_cutouts(out, self.cutouts, K, lambda sel, k: self._cast_chunks(
                    origins if len(origins) == 1 else origins[sel], dirs[sel], rays32[sel], out_rot, k, len(sel)))
        finally:
            numba.set_num_threads(threads)
        out["valid"] = np.arange(K)[:, None] < out["num_hits"][None]
        return out

    def _cast_chunks(self, origins, dirs, rays32, out_rot, K: int, R: int) -> dict:
        ids = np.full((2, K, R), -1, np.int32)  # one fill for both id arrays
        out = {  # invalid slots keep these fill values; the kernel writes valid ones only
            "depth": np.zeros((K, R), np.float32),
            "normal": np.zeros((K, R, 3), np.float32), "front_facing": np.zeros((K, R), np.bool_),
            "face_id": ids[0], "instance_id": ids[1],
            "bary": np.zeros((K, R, 2), np.float32), "num_hits": np.empty(R, np.int32),
        }
        for s in range(0, R, CHUNK_RAYS):
            e = min(s + CHUNK_RAYS, R)
            o = origins if len(origins) == 1 else origins[s:e]
            splits, geom, prim, uv = self._engine.hits(rays32[s:e])
            counts = np.empty(e - s, np.int64)
            eng = self._engine
            count_candidates(splits, geom, prim, uv, eng.geom_face_offset, eng.geom_faces, self._faces,
                             self._vmerge, self._star_ptr, NEAR_BORDER, counts)
            cand_ptr = np.concatenate([[0], np.cumsum(counts)])
            C = int(cand_ptr[-1])
            resolve_layers(
                splits, geom, prim, uv, eng.geom_face_offset, eng.geom_faces, cand_ptr,
                self._tri, self._faces, self._vmerge, self._star_ptr, self._star_idx,
                self._face_inst, self._face_local, self._face_normal,
                o, dirs[s:e], out_rot, NEAR_BORDER, K,
                np.empty(C, np.int64), np.empty(C, np.float64), np.empty(C, np.float64),
                np.empty(C, np.float64), np.empty(C, np.bool_),
                out["depth"][:, s:e], out["normal"][:, s:e], out["front_facing"][:, s:e],
                out["face_id"][:, s:e], out["instance_id"][:, s:e], out["bary"][:, s:e], out["num_hits"][s:e],
            )
        return out


def _to_image(a: np.ndarray, key: str, H: int, W: int) -> np.ndarray:
    """(K, R, ...) -> (K, H, W, ...); num_hits (R,) -> (H, W)."""
    if key == "num_hits":
        return a.reshape(H, W)
    return a.reshape((a.shape[0], H, W) + a.shape[2:])


class _Open3DEngine:
    """All hits per ray from Open3D's ``list_intersections``; faces are split into geometries by ``group``."""

    def __init__(self, verts32: np.ndarray, faces: np.ndarray, group: np.ndarray, num_threads: int = 0):
        import open3d as o3d

        self._o3c = o3d.core
        self.num_threads = num_threads
        self._scene = o3d.t.geometry.RaycastingScene()
        # geom_faces[geom_face_offset[g] + prim] is the global face of primitive prim of geometry g.
        self.geom_faces = np.argsort(group, kind="stable")
        counts = np.bincount(group)
        starts = np.concatenate([[0], np.cumsum(counts)])
        self.geom_face_offset = np.zeros(len(counts), np.int64)
        for g in np.flatnonzero(counts):
            gf = faces[self.geom_faces[starts[g]:starts[g + 1]]]
            used, local = np.unique(gf, return_inverse=True)
            gid = self._scene.add_triangles(o3d.core.Tensor(verts32[used]),
                                            o3d.core.Tensor(local.reshape(-1, 3).astype(np.uint32)))
            if gid >= len(self.geom_face_offset):
                self.geom_face_offset = np.resize(self.geom_face_offset, gid + 1)
            self.geom_face_offset[gid] = starts[g]

    def hits(self, rays32: np.ndarray):
        """CSR ray splits (R+1,), geometry and primitive ids (M,), all uint32, barycentrics (M, 2) float32."""
        res = self._scene.list_intersections(self._o3c.Tensor(rays32), nthreads=self.num_threads)
        return (res["ray_splits"].numpy(), res["geometry_ids"].numpy(), res["primitive_ids"].numpy(),
                res["primitive_uvs"].numpy())


class _EmbreeEngine:
    """All hits per ray from embreex, which returns the first hit only: rays are re-cast from just past each
    hit, 1e-6 of the scene's size on, so surfaces closer together than that along a ray may be reported as
    one. Each instance is its own embree scene, so instances touching face to face keep both crossings
    (bodies touching inside one instance do not: use the Open3D engine for those). The exact resolution
    afterwards is shared with the Open3D engine."""

    MAX_ROUNDS = 100_000

    def __init__(self, verts32: np.ndarray, faces: np.ndarray, face_offset: np.ndarray):
        from embreex import rtcore_scene
        from embreex.mesh_construction import TriangleMesh

        self._scenes = []
        for s, e in zip(face_offset[:-1], face_offset[1:]):
            scene = rtcore_scene.EmbreeScene()
            TriangleMesh(scene, verts32[faces[s:e]])
            self._scenes.append(scene)
        self.geom_face_offset = face_offset[:-1].astype(np.int64)  # geometry g = instance g, faces in order
        self.geom_faces = np.arange(len(faces))
        self._step = 1e-6 * float(np.linalg.norm(verts32.max(0).astype(np.float64) - verts32.min(0)))

    def hits(self, rays32: np.ndarray):
        R = len(rays32)
        origins, dirs = rays32[:, :3].astype(np.float64), rays32[:, 3:].astype(np.float64)
        unit = np.linalg.norm(dirs, axis=1)
        rid, geom, prim, uv = [], [], [], []
        for g, scene in enumerate(self._scenes):
            org = origins.copy()
            active = np.arange(R)
            for _ in range(self.MAX_ROUNDS):
                if not len(active):
                    break
                res = scene.run(org[active].astype(np.float32), dirs[active].astype(np.float32), output=1)
                hit = res["primID"] >= 0
                active = active[hit]
                rid.append(active)
                geom.append(np.full(len(active), g, np.uint32))
                prim.append(res["primID"][hit].astype(np.uint32))
                uv.append(np.stack([res["u"][hit], res["v"][hit]], axis=1).astype(np.float32))
                t = res["tfar"][hit].astype(np.float64) + self._step / unit[active]
                org[active] += t[:, None] * dirs[active]
        rid = np.concatenate(rid)
        order = np.argsort(rid, kind="stable")
        splits = np.concatenate([[0], np.cumsum(np.bincount(rid, minlength=R))]).astype(np.uint32)
        return splits, np.concatenate(geom)[order], np.concatenate(prim)[order], np.concatenate(uv)[order]
