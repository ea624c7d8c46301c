"""The caster on the meshes users have: every closed mesh of pybullet_data in a face range, at extreme scales
and far from the origin, against parity and an independent float64 brute force over every face.

Oracles: a closed surface (every edge, by exact vertex position, used once each way) is crossed an even number
of times by every ray; a ray's crossings counted by testing every face in float64 (Moller-Trumbore, written
here, no acceleration structure), on rays that pass no edge closer than a tiny distance; boxes touching face
to face, whose crossings follow from the slab test.
"""

import glob
import os
import re

import numpy as np
import pytest
import trimesh

from wt_datagen import Camera, LayeredRaycaster

FACE_RANGE = (1000, 5000)  # faces recorded in the file (OBJ f lines, STL facets)
VARIANTS = {  # (scale, offset): the mesh scaled about the origin, then moved; cameras move with it
    "scaled 1e-3": (1e-3, np.zeros(3)),
    "scaled 1e3": (1e3, np.zeros(3)),
    "moved 1e3": (1.0, np.array([1e3, -7e2, 3e2])),
    "moved 1e5": (1.0, np.array([1e5, 3e4, -6e4])),
}


def data_path() -> str:
    import pybullet_data

    return pybullet_data.getDataPath()


def file_faces(path: str) -> int:
    data = open(path, "rb").read()
    if path.lower().endswith(".stl"):
        n = int.from_bytes(data[80:84], "little")
        return n if 84 + 50 * n == len(data) else data.count(b"facet normal")
    return len(re.findall(rb"(?m)^f ", data))


def exactly_closed(mesh: trimesh.Trimesh) -> bool:
    """Every edge, by exact vertex position, is used by two faces, once in each direction (no tolerance:
    trimesh's is_watertight merges positions closer than 1e-8, which leaves real cracks in)."""
    _, vid = np.unique(mesh.vertices, axis=0, return_inverse=True)
    f = vid.ravel()[mesh.faces]
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    if (e[:, 0] == e[:, 1]).any():
        return False
    _, inv, count = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True, return_counts=True)
    forward = np.bincount(inv.ravel(), weights=e[:, 0] < e[:, 1])
    return bool((count == 2).all() and (forward == 1).all())


@pytest.fixture(scope="module")
def closed_corpus() -> list[tuple[str, trimesh.Trimesh]]:
    root = data_path()
    paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if p.lower().endswith((".obj", ".stl")))
    out = []
    for p in paths:
        if FACE_RANGE[0] <= file_faces(p) <= FACE_RANGE[1]:
            mesh = trimesh.load(p, force="mesh")
            if isinstance(mesh, trimesh.Trimesh) and exactly_closed(mesh):
                out.append((os.path.relpath(p, root), mesh))
    return out


def views(mesh: trimesh.Trimesh, res: int, seed: int) -> list[Camera]:
    """Two random perspective views, and three axis-aligned ones whose central pixel ray runs exactly
    through a vertex (odd size, principal point on the central pixel centre): their central row and column
    lie in the axis planes through that vertex."""
    c, ext = mesh.bounds.mean(axis=0), np.linalg.norm(mesh.extents)
    cams = []
    for eye in np.random.default_rng(seed).normal(size=(2, 3)):
        cams.append(Camera.look_at(c + eye / np.linalg.norm(eye) * 1.5 * ext, c, width=res, height=res))
    v = mesh.vertices[np.argmin(np.linalg.norm(mesh.vertices - c, axis=1))]
    for axis in range(3):
        R = np.roll(np.eye(3), axis, axis=0)  # rows: the camera's x, y, z axes, world axes
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = -R @ (v - R[2] * 1.5 * ext)
        f = 1.2 * res
        K = np.array([[f, 0, (res + 1) / 2], [0, f, (res + 1) / 2], [0, 0, 1]])
        cams.append(Camera(K, T, res + 1, res + 1))
    return cams


def vertex_rays(mesh: trimesh.Trimesh, per_axis: int, seed: int):
    """Rays along each axis exactly through vertices (the ray's other two coordinates are the vertex's)."""
    rng = np.random.default_rng(seed)
    ext = np.linalg.norm(mesh.extents)
    for axis in range(3):
        v = mesh.vertices[rng.permutation(len(mesh.vertices))[:per_axis]]
        o = v.copy()
        o[:, axis] = mesh.bounds[1, axis] + 0.5 * ext
        d = np.zeros_like(o)
        d[:, axis] = -1
        yield o, d


def odd_rays(rc: LayeredRaycaster, mesh: trimesh.Trimesh, res: int, per_axis: int, seed: int) -> list[str]:
    out = []
    for i, cam in enumerate(views(mesh, res, seed)):
        n = rc.cast(cam, 4).num_hits
        if (n % 2).any():
            out.append(f"view {i}: {int((n % 2).sum())} odd")
    for axis, (o, d) in enumerate(vertex_rays(mesh, per_axis, seed)):
        n = rc.cast_rays(o, d, 4).num_hits
        if (n % 2).any():
            out.append(f"vertex rays along axis {axis}: {int((n % 2).sum())} odd")
    return out


def test_every_closed_mesh_in_the_range_crosses_evenly(closed_corpus):
    """Every exactly closed mesh of pybullet_data with 1000-5000 faces in its file (76 meshes, most of them
    several bodies: convex decompositions, CAD assemblies, gears) from five views, two of them at 24x24 and
    three axis-aligned 25x25 through a vertex, and 3 x 200 rays exactly through vertices along the axes."""
    assert len(closed_corpus) >= 60
    assert sum(m.body_count > 1 for _, m in closed_corpus) >= 20
    problems = []
    for i, (name, mesh) in enumerate(closed_corpus):
        rc = LayeredRaycaster(mesh)
        problems += [f"{name}: {p}" for p in odd_rays(rc, mesh, 24, 200, i)]
    assert not problems, problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_closed_meshes_far_from_the_origin_and_at_extreme_scales(closed_corpus, variant):
    """The same meshes scaled by 1e-3 and 1e3 and moved 1e3 and 1e5 units away, cameras with them."""
    scale, offset = VARIANTS[variant]
    problems = []
    for i, (name, mesh) in enumerate(closed_corpus):
        m = mesh.copy()
        m.apply_scale(scale)
        m.apply_translation(offset)
        rc = LayeredRaycaster(m)
        problems += [f"{name}: {p}" for p in odd_rays(rc, m, 16, 60, i)]
    assert not problems, problems


def brute_force_counts(tri: np.ndarray, origins: np.ndarray, dirs: np.ndarray, eps: float, block: int = 32):
    """Per ray, the number of faces it crosses at t > 0 (float64 Moller-Trumbore over every face), and
    whether its line passes within ``eps`` of any edge of any face (then the count is no well-posed oracle)."""
    origins = np.broadcast_to(origins, dirs.shape)
    v0, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    counts, near = np.zeros(len(dirs), int), np.zeros(len(dirs), bool)
    for s in range(0, len(dirs), block):
        o, d = origins[s:s + block, None, :], dirs[s:s + block, None, :]  # (n, 1, 3) against faces (F, 3)
        p = np.cross(d, e2)
        det = np.einsum("nfk,fk->nf", p, e1)
        w = o - v0
        q = np.cross(w, e1)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.einsum("nfk,nfk->nf", w, p) / det
            v = np.einsum("nfk,nk->nf", q, d[:, 0]) / det
            t = np.einsum("nfk,fk->nf", q, e2) / det
            counts[s:s + block] = ((u > 0) & (v > 0) & (u + v < 1) & (t > 0)).sum(axis=1)
        dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
        for a, b in ((tri[:, 0], tri[:, 1]), (tri[:, 1], tri[:, 2]), (tri[:, 2], tri[:, 0])):
            e = b - a  # segment a + lam e against the line o + s dn
            w = a - o
            ee, ed = np.einsum("fk,fk->f", e, e), np.einsum("fk,nk->nf", e, dn[:, 0])
            we, wd = np.einsum("nfk,fk->nf", w, e), np.einsum("nfk,nk->nf", w, dn[:, 0])
            den = ee - ed * ed
            with np.errstate(divide="ignore", invalid="ignore"):
                lam = np.clip(np.where(den > 1e-300, (ed * wd - we) / den, 0.0), 0.0, 1.0)
            pt = w + lam[..., None] * e
            dist2 = np.einsum("nfk,nfk->nf", pt, pt) - np.einsum("nfk,nk->nf", pt, dn[:, 0]) ** 2
            near[s:s + block] |= (dist2 < eps * eps).any(axis=1)
    return counts, near


@pytest.mark.parametrize("name", [
    "duck.obj", "teddy2_VHACD_CHs.obj", "differential/diff_carrier.stl", "xarm/xarm_gripper/meshes/left_finger.STL",
    "kuka_iiwa/meshes/link_3.obj", "franka_panda/meshes/visual/hand.obj", "husky/meshes/user_rail.stl",
    "laikago/chassis_vhacd_mod.obj",
])
def test_counts_equal_a_float64_brute_force_over_every_face(name):
    """Closed and open real meshes (kuka, franka, husky and the laikago decomposition are open): 2 x 300 rays
    of two views, the caster's count equal to the brute force's on every ray that passes no edge closer than
    1e-7 of the mesh's size."""
    mesh = trimesh.load(os.path.join(data_path(), name), force="mesh")
    rc = LayeredRaycaster(mesh)
    c, ext = mesh.bounds.mean(axis=0), np.linalg.norm(mesh.extents)
    rng = np.random.default_rng(3)
    checked = 0
    for eye in rng.normal(size=(2, 3)):
        cam = Camera.look_at(c + eye / np.linalg.norm(eye) * 1.2 * ext, c, width=40, height=40, fov_y_deg=40)
        d = (cam.pixel_rays() @ cam.rotation).reshape(-1, 3)
        pick = rng.choice(len(d), 300, replace=False)
        o = np.broadcast_to(cam.center, (300, 3))
        counts, near = brute_force_counts(mesh.triangles, o, d[pick], 1e-7 * ext)
        got = rc.cast_rays(o, d[pick], 4).num_hits
        assert np.array_equal(got[~near], counts[~near]), (name, np.flatnonzero((got != counts) & ~near))
        assert near.mean() < 0.05
        checked += int((~near).sum())
    assert checked > 550


def test_the_diff_ring_ray_of_the_issue_has_six_crossings():
    """Faces 3158 and 3159 are crossed at float32-identical t; Open3D's filter keeps only one of them."""
    mesh = trimesh.load(os.path.join(data_path(), "differential/diff_ring.stl"), force="mesh")
    mesh.apply_translation(-mesh.bounds.mean(0))
    mesh.apply_scale(1 / mesh.extents.max())
    o = np.array([0.2053169955175982, 0.7056256762136123, 1.0458078678853213])
    d = np.array([-0.2750344593388108, -0.7201299497851783, -0.6823254647301272])
    counts, near = brute_force_counts(mesh.triangles, o[None], d[None], 1e-9)
    assert counts[0] == 6 and not near[0]
    h = LayeredRaycaster(mesh).cast_rays(o, d[None], 8)
    assert h.num_hits[0] == 6
    assert {3158, 3159} <= set(h.face_id[:6, 0].tolist())


def stacked_boxes_one_mesh(n: int) -> trimesh.Trimesh:
    """n unit boxes side by side along x in ONE mesh, each with its own vertices, neighbours sharing the face
    planes x = 1, 2, ... (as CAD assemblies and voxel meshes are)."""
    parts = []
    for i in range(n):
        b = trimesh.creation.box(extents=(1, 1, 1))
        b.apply_translation((i + 0.5, 0.5, 0.5))
        parts.append(b)
    return trimesh.util.concatenate(parts)


@pytest.mark.parametrize("view", ["along x", "oblique", "along x through edges"])
def test_bodies_touching_face_to_face_inside_one_mesh(view):
    n = 3
    mesh = stacked_boxes_one_mesh(n)
    assert mesh.body_count == n and len(mesh.vertices) == 8 * n
    rc = LayeredRaycaster(mesh)
    if view == "oblique":
        cam = Camera.look_at((-2.0, 1.3, 0.8), (1.5, 0.5, 0.5), width=64, height=64, fov_y_deg=40)
    else:
        # Looking along +x from x = -20. With f = 400, pixel centres land on y, z = 0.5 + k / 20 at x = 0,
        # so the rays of 4 rows and columns run exactly through the boxes' edges there.
        f, size = (300.0, 33) if view == "along x" else (400.0, 33)
        R = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], float)  # camera x = +z, y = -y, z = +x
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = -R @ np.array([-20.0, 0.5, 0.5])
        cam = Camera(np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]]), T, size, size)
    h = rc.cast(cam, 2 * n + 2)
    assert (h.num_hits % 2 == 0).all()
    # slab test for the union's inside along each ray, then per box: a ray through k boxes crosses 2k times
    d = (cam.pixel_rays() @ cam.rotation).reshape(-1, 3)
    expected = np.zeros(len(d), int)
    robust = np.ones(len(d), bool)
    for i in range(n):
        for grow in (0.0, 1e-6, -1e-6):
            lo, hi = np.array([i, 0, 0]) - grow, np.array([i + 1, 1, 1]) + grow
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (lo - cam.center) / d, (hi - cam.center) / d
            t_in = np.nanmax(np.minimum(t1, t2), axis=1)
            t_out = np.nanmin(np.maximum(t1, t2), axis=1)
            hit = (t_in < t_out) & (t_out > 0)
            if grow == 0:
                expected += 2 * hit
                exact_hit = hit
            else:
                robust &= hit == exact_hit
    got = h.num_hits.ravel()
    assert np.array_equal(got[robust], expected[robust])
    assert (expected[robust] == 2 * n).sum() > 50
    # where two boxes touch, the ray leaves one before it enters the next, at one depth
    k, v, u = np.nonzero(h.valid[1:-1] & h.valid[2:])
    inner = (h.depth[1:-1] == h.depth[2:])[k, v, u]
    assert inner.any()
    assert not h.front_facing[1:-1][k, v, u][inner].any() and h.front_facing[2:][k, v, u][inner].all()


def test_keep_filter_removes_crossings_before_counting_and_truncation():
    """keep() rejecting one instance gives exactly the cast of the scene without it (ids renumbered)."""
    spheres = [trimesh.creation.icosphere(3, radius=r) for r in (1.0, 0.7, 0.4)]
    cam = Camera.look_at((0.1, 0.05, -3), (0, 0, 0), width=40, height=40, fov_y_deg=45)
    seen = []

    def drop_middle(instance_id, face_id, bary):
        seen.append((instance_id.dtype, face_id.dtype, bary.dtype, bary.shape[1:]))
        return instance_id != 1

    kept = LayeredRaycaster(spheres, keep=drop_middle).cast(cam, 3)
    without = LayeredRaycaster([spheres[0], spheres[2]]).cast(cam, 3)
    assert seen and seen[0] == (np.int32, np.int32, np.float32, (2,))
    assert np.array_equal(kept.num_hits, without.num_hits) and kept.num_hits.max() == 4
    assert np.array_equal(kept.depth, without.depth)
    assert np.array_equal(kept.face_id, without.face_id)
    assert np.array_equal(kept.instance_id, np.where(without.instance_id == 1, 2, without.instance_id))
