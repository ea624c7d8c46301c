"""The layered caster against analytic geometry, exact per-face intersections and a second engine."""

import os

import numpy as np
import pytest
import trimesh

from wt_datagen import Camera, LayeredRaycaster, MeshError

BACKENDS = ["open3d", "embree"]


def exact_face_depth(rc: LayeredRaycaster, cam: Camera, hits) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ray/plane intersection with each hit's own face, independent of the caster's kernel."""
    valid = hits.valid
    k, v, u = np.nonzero(valid)
    inst, face = hits.instance_id[valid], hits.face_id[valid]
    tri = rc._verts[rc._faces[rc.face_offset[inst] + face]]  # float64 copy of the geometry
    d = cam.pixel_rays()[v, u] @ cam.rotation
    o = cam.center
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    t = np.einsum("ij,ij->i", n, tri[:, 0] - o) / np.einsum("ij,ij->i", n, d)
    return t, hits.depth[valid].astype(np.float64)


def assert_layers_wellformed(hits):
    K = hits.num_layers
    assert (hits.valid[1:] <= hits.valid[:-1]).all(), "validity must be monotone"
    assert np.array_equal(hits.valid.sum(0), np.minimum(hits.num_hits, K))
    assert (np.diff(hits.depth, axis=0)[hits.valid[1:]] >= 0).all(), "depth must be non-decreasing"
    assert (hits.face_id[~hits.valid] == -1).all() and (hits.instance_id[~hits.valid] == -1).all()
    n = np.linalg.norm(hits.normal[hits.valid], axis=-1)
    np.testing.assert_allclose(n, 1, atol=1e-5)
    # xyz = depth * K^-1 (u + .5, v + .5, 1): z is the depth itself.
    assert np.array_equal(hits.xyz[..., 2], hits.depth)


def uv_sphere_cam(res=96):
    return Camera.look_at((0.3, 0.2, -3.0), (0, 0, 0), width=res, height=res - 16, fov_y_deg=50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_spheres_counts_depths_and_order(backend):
    radii = [1.0, 0.6, 0.3]
    meshes = [trimesh.creation.icosphere(subdivisions=4, radius=r) for r in radii]
    rc = LayeredRaycaster(meshes, backend=backend)
    cam = uv_sphere_cam()
    hits = rc.cast(cam, num_layers=8)
    assert_layers_wellformed(hits)
    # Analytic count from the ray's distance to the centre, away from the tessellated silhouettes.
    d = cam.pixel_rays() @ cam.rotation
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    c = -cam.center
    dist = np.linalg.norm(c - (d @ c)[..., None] * d, axis=-1)
    expected = sum(2 * (dist < r) for r in radii)
    clear = np.all([np.abs(dist - r) > 0.01 * r for r in radii], axis=0)
    assert np.array_equal(hits.num_hits[clear], expected[clear])
    assert {4, 6} <= set(np.unique(hits.num_hits))
    # Each hit lies on its own face's plane (float64 oracle) and near the analytic sphere.
    t_exact, t = exact_face_depth(rc, cam, hits)
    np.testing.assert_allclose(t, t_exact, rtol=1e-5)
    r_hit = np.linalg.norm(hits.xyz[hits.valid] - cam.world_to_camera(np.zeros(3)), axis=-1)
    r_true = np.array(radii)[hits.instance_id[hits.valid]]
    assert np.all(np.abs(r_hit - r_true) < 2e-3 * r_true)  # icosphere chord sag at subdivision 4
    # Entering then exiting: the front half of each ray's crossings face the camera.
    n = hits.num_hits
    for k in range(6):
        sel = hits.valid[k]
        assert np.array_equal(hits.front_facing[k][sel], (k < n[sel] // 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_depth_is_exact(backend):
    box = trimesh.creation.box(extents=(2.0, 1.0, 1.5))
    cam = Camera.look_at((2.5, 1.7, -3.1), (0.1, 0, 0), width=80, height=60, fov_y_deg=45)
    rc = LayeredRaycaster(box, backend=backend)
    hits = rc.cast(cam, num_layers=4)
    assert_layers_wellformed(hits)
    assert set(np.unique(hits.num_hits)) == {0, 2}
    t_exact, t = exact_face_depth(rc, cam, hits)
    np.testing.assert_allclose(t, t_exact, rtol=1e-6)
    # Analytic slab test: entry and exit distances of each ray through the box.
    d = (cam.pixel_rays() @ cam.rotation)[hits.num_hits == 2]
    o = cam.center
    lo, hi = (-box.extents / 2 - o) / d, (box.extents / 2 - o) / d
    t_in, t_out = np.minimum(lo, hi).max(-1), np.maximum(lo, hi).min(-1)
    np.testing.assert_allclose(hits.depth[0][hits.num_hits == 2], t_in, rtol=1e-5)
    np.testing.assert_allclose(hits.depth[1][hits.num_hits == 2], t_out, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torus_edge_on_has_four_crossings(backend):
    R, r = 1.0, 0.35
    torus = trimesh.creation.torus(major_radius=R, minor_radius=r, major_sections=128, minor_sections=48)
    # Torus axis is z; look along x from the side, in the torus plane.
    cam = Camera.look_at((-4.0, 0, 0), (0, 0, 0), up=(0, 0, 1), width=129, height=33, fov_y_deg=30)
    hits = LayeredRaycaster(torus, backend=backend).cast(cam, num_layers=6)
    assert_layers_wellformed(hits)
    assert hits.num_hits.max() == 4
    # The central ray crosses at x = -R-r, -R+r, R-r, R+r.
    v, u = cam.height // 2, cam.width // 2
    assert hits.num_hits[v, u] == 4
    np.testing.assert_allclose(hits.depth[:4, v, u], 4.0 + np.array([-R - r, -R + r, R - r, R + r]), rtol=2e-3)
    assert (hits.num_hits % 2 == 0).all()


def head_on_camera(eye, R, f=20.0, size=65):
    """A camera whose pixel centres land on x, y = k / 2 at depth 2 in front of it (cx = cy = 32.5)."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ np.asarray(eye, float)
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])
    return Camera(K, T, size, size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["head_on", "from_above", "diagonal"])
def test_cube_edges_on_pixel_centres_cross_evenly(backend, view):
    cube = trimesh.creation.box(extents=(2, 2, 2))  # edges and vertices at +-1
    if view == "head_on":
        cam = head_on_camera((0, 0, -3), np.eye(3))  # front face at depth 2: edges at u - 32.5 = +-10
    elif view == "from_above":
        R = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)  # looking down -y, image y along +z
        cam = head_on_camera((0, 3, 0), R)
    else:
        cam = Camera.look_at((3, 3, 3), (0, 0, 0), up=(0, 1, 0), width=97, height=97, fov_y_deg=40)
    hits = LayeredRaycaster(cube, backend=backend).cast(cam, num_layers=4)
    assert_layers_wellformed(hits)
    assert (hits.num_hits % 2 == 0).all(), np.unique(hits.num_hits, return_counts=True)
    if view != "diagonal":
        # Rays exactly through the front face's border: the edge pixels hit; the inside is a solid square.
        inside = np.zeros((65, 65), bool)
        inside[22:43, 22:43] = True  # u + .5 in [22.5, 42.5] <=> |x| <= 1 at depth 2
        assert np.array_equal(hits.num_hits > 0, inside) or np.array_equal(hits.num_hits[23:42, 23:42] > 0,
                                                                               inside[23:42, 23:42])
        assert (hits.num_hits[23:42, 23:42] == 2).all()
        np.testing.assert_allclose(hits.depth[0][23:42, 23:42], 2.0, rtol=1e-6)


def voxel_part(occupancy: np.ndarray, pitch: float = 0.25) -> trimesh.Trimesh:
    """A closed axis-aligned 'CAD' part: the boundary quads of a voxel set, consistently oriented."""
    occ = np.pad(occupancy, 1)
    quads = []
    for axis in range(3):
        diff = np.diff(occ.astype(np.int8), axis=axis)  # +1: empty -> full along +axis (face looks -axis)
        for sign in (1, -1):
            idx = np.argwhere(diff == sign)
            base = idx.astype(float)
            base[:, axis] += 1
            a1, a2 = [(axis + 1) % 3, (axis + 2) % 3]
            e1, e2 = np.eye(3)[a1], np.eye(3)[a2]
            corners = np.stack([base, base + e1, base + e1 + e2, base + e2], axis=1)
            if sign == 1:
                corners = corners[:, ::-1]
            quads.append(corners)
    q = np.concatenate(quads) * pitch
    tris = np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]])
    mesh = trimesh.Trimesh(tris.reshape(-1, 3), np.arange(len(tris) * 3).reshape(-1, 3))
    mesh.merge_vertices()
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    return mesh


@pytest.mark.parametrize("backend", BACKENDS)
def test_cad_like_part_even_crossings_from_many_views(backend):
    occ = np.zeros((6, 5, 4), bool)
    occ[:, :2, :] = True
    occ[:2, :, :] = True
    occ[3:5, 3:, 1:3] = True
    occ[2, 2, 0] = False
    part = voxel_part(occ)
    assert part.is_watertight and part.is_winding_consistent
    rc = LayeredRaycaster(part, backend=backend)
    rng = np.random.default_rng(0)
    eyes = [(0, 0, -3), (0, 3, 0.0001), (3, 3, 3), (-2.5, 1.0, 2.0)] + list(rng.normal(size=(4, 3)) * 3)
    deepest = 0
    for eye in eyes:
        if np.allclose(eye, (0, 0, -3)):
            cam = head_on_camera(eye, np.eye(3), f=16.0, size=81)  # voxel edges on pixel centres
        else:
            cam = Camera.look_at(eye, (0, 0, 0), up=(0, 1, 0), width=64, height=64, fov_y_deg=50)
        hits = rc.cast(cam, num_layers=8)
        assert_layers_wellformed(hits)
        assert (hits.num_hits % 2 == 0).all(), (eye, np.unique(hits.num_hits, return_counts=True))
        deepest = max(deepest, hits.num_hits.max())
    assert deepest >= 4


@pytest.mark.parametrize(
    "name",
    ["duck.obj", "soccerball.obj", "teddy2_VHACD_CHs.obj", "duck_vhacd.obj", "toys/concave_box.obj",
     "laikago/chassis_zup_lores.obj"],
)
def test_real_closed_meshes_from_pybullet_data_cross_evenly(name):
    """Textured meshes keep split vertices at UV seams; convex decompositions hold bodies touching face to face."""
    import pybullet_data

    mesh = trimesh.load(os.path.join(pybullet_data.getDataPath(), name), force="mesh")
    merged = mesh.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    assert merged.is_watertight  # closed surfaces: every ray must cross an even number of times
    rc = LayeredRaycaster(mesh)
    c, ext = mesh.bounds.mean(axis=0), np.linalg.norm(mesh.extents)
    rng = np.random.default_rng(len(name))
    for eye in [(2, 1, 3), (-1, -2, 0.5), (0, 0, 3)] + list(rng.normal(size=(3, 3))):
        eye = np.array(eye) / np.linalg.norm(eye) * 1.5 * ext
        cam = Camera.look_at(c + eye, c, width=96, height=96, fov_y_deg=45)
        hits = rc.cast(cam, num_layers=8)
        assert (hits.num_hits % 2 == 0).all(), (name, eye, np.unique(hits.num_hits, return_counts=True))
        assert hits.num_hits.max() >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_features_and_touching_instances_survive(backend):
    # A plate 0.2 mm thick at unit scale: both of its faces are separate crossings.
    plate = trimesh.creation.box(extents=(1.0, 1.0, 2e-4))
    # Two cubes touching face to face at z = 0.5: four crossings, the middle two at one depth.
    a = trimesh.creation.box(extents=(1, 1, 1))
    b = trimesh.creation.box(extents=(1, 1, 1))
    b.apply_translation((0, 0, 1.0))
    cam = Camera.look_at((0.05, 0.03, -3), (0.05, 0.03, 0), width=32, height=32, fov_y_deg=10)
    h = LayeredRaycaster(plate, backend=backend).cast(cam, num_layers=4)
    assert (h.num_hits == 2).all()
    np.testing.assert_allclose(h.depth[1] - h.depth[0], 2e-4, rtol=1e-2)
    h = LayeredRaycaster([a, b], backend=backend).cast(cam, num_layers=6)
    assert (h.num_hits == 4).all()
    assert np.array_equal(h.instance_id[:, 16, 16][:4], [0, 0, 1, 1])
    np.testing.assert_allclose(h.depth[1], h.depth[2], rtol=1e-6)
    assert not h.front_facing[1].any() and h.front_facing[2].all()


def test_truncation_keeps_num_hits():
    meshes = [trimesh.creation.icosphere(3, radius=r) for r in (1.0, 0.7, 0.4)]
    cam = Camera.look_at((0, 0, -3), (0, 0, 0), width=16, height=16, fov_y_deg=8)
    rc = LayeredRaycaster(meshes)
    full = rc.cast(cam, num_layers=6)
    short = rc.cast(cam, num_layers=2)
    assert (short.num_hits == 6).all() and short.valid.all()
    assert np.array_equal(short.depth, full.depth[:2])
    assert np.array_equal(short.face_id, full.face_id[:2])


def test_scene_instances_transforms_and_bary():
    scene = trimesh.Scene()
    box = trimesh.creation.box(extents=(1, 1, 1))
    T = trimesh.transformations.rotation_matrix(0.4, (0, 1, 0))
    T[:3, 3] = (0.2, 0, 0.5)
    scene.add_geometry(box, node_name="left", transform=np.eye(4))
    scene.add_geometry(box, node_name="moved", transform=T)
    rc = LayeredRaycaster(scene)
    assert rc.instance_names == ["left", "moved"]
    cam = Camera.look_at((0.1, 0.2, -3), (0.1, 0, 0), width=48, height=40, fov_y_deg=40)
    h = rc.cast(cam, num_layers=6)
    assert_layers_wellformed(h)
    # The barycentric point on the instance's own (transformed) face is the hit point.
    k, v, u = np.nonzero(h.valid)
    inst, face, bary = h.instance_id[k, v, u], h.face_id[k, v, u], h.bary[k, v, u].astype(np.float64)
    local = box.vertices[box.faces[face]]
    world = np.where(inst[:, None, None] == 1, trimesh.transform_points(local.reshape(-1, 3), T).reshape(-1, 3, 3),
                     local)
    p = (1 - bary.sum(1))[:, None] * world[:, 0] + bary[:, :1] * world[:, 1] + bary[:, 1:] * world[:, 2]
    np.testing.assert_allclose(cam.world_to_camera(p), h.xyz[k, v, u], atol=1e-5)


def test_layer0_matches_open3d_first_hit():
    import open3d as o3d

    mesh = trimesh.creation.torus(1.0, 0.3)
    T = np.eye(4)
    T[:3, :3] = trimesh.transformations.rotation_matrix(0.7, (1, 2, 0.5))[:3, :3]
    mesh.apply_transform(T)
    cam = Camera.look_at((0.5, 0.4, -3), (0, 0, 0), width=64, height=64)
    h = LayeredRaycaster(mesh).cast(cam, num_layers=4)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                        o3d.core.Tensor(mesh.faces.astype(np.uint32)))
    d = cam.pixel_rays() @ cam.rotation
    rays = np.concatenate([np.broadcast_to(cam.center, d.shape), d], -1).astype(np.float32)
    t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    hit = np.isfinite(t)
    assert np.array_equal(hit, h.valid[0])
    np.testing.assert_allclose(h.depth[0][hit], t[hit], rtol=1e-5)


def test_backends_agree_on_a_real_multi_part_asset():
    import pybullet_data

    scene = trimesh.load(os.path.join(pybullet_data.getDataPath(), "samurai_monastry.obj"), force="scene")
    a, b = LayeredRaycaster(scene, "open3d"), LayeredRaycaster(scene, "embree")
    lo, hi = a.bounds
    c = (lo + hi) / 2
    cam = Camera.look_at(c + (hi - lo) * (0.9, 0.5, 0.9), c, width=96, height=96)
    ha, hb = a.cast(cam, 8), b.cast(cam, 8)
    same = (ha.num_hits == hb.num_hits)
    # embree re-casts from 1e-6 of the scene size past each hit; allow the rare ray where that differs.
    assert same.mean() > 0.999
    for field in ("depth", "face_id", "instance_id", "front_facing"):
        assert np.array_equal(getattr(ha, field)[:, same], getattr(hb, field)[:, same]), field


def test_cast_rays_counts_and_parameters():
    sphere = trimesh.creation.icosphere(4)
    rc = LayeredRaycaster(sphere)
    o = np.array([[0, 0, -5.0], [0, 0, 0], [3, 3, 3]])
    d = np.array([[0, 0, 2.0], [1, 0, 0], [1, 0, 0]])
    h = rc.cast_rays(o, d, num_layers=3)
    assert h.depth.shape == (3, 3) and h.xyz.shape == (3, 3, 3)
    assert list(h.num_hits) == [2, 1, 0]
    np.testing.assert_allclose(h.depth[:2, 0], [2.0, 3.0], rtol=2e-3)  # t in units of the direction
    np.testing.assert_allclose(h.xyz[0, 0], [0, 0, -1], atol=3e-3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)), "no triangle faces"),
        (lambda: trimesh.Trimesh([[0, 0, 0], [1, 0, np.nan], [0, 1, 0]], [[0, 1, 2]], process=False), "NaN"),
        (lambda: trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 5]], process=False,
                                 validate=False), "outside"),
    ],
)
def test_bad_meshes_raise_a_clear_error(make, message):
    mesh = make()
    mesh.metadata["name"] = "broken_part"
    with pytest.raises(MeshError, match=f"broken_part.*{message}"):
        LayeredRaycaster([trimesh.creation.box(), mesh])


def test_zero_area_faces_are_never_hit():
    box = trimesh.creation.box()
    v = np.vstack([box.vertices, [[0, 0, 0.5], [0.2, 0, 0.5], [0.4, 0, 0.5]]])  # collinear: zero area
    f = np.vstack([box.faces, [[8, 9, 10]]])
    mesh = trimesh.Trimesh(v, f, process=False)
    cam = Camera.look_at((0, 0, -3), (0, 0, 0), width=33, height=33, fov_y_deg=30)
    h = LayeredRaycaster(mesh).cast(cam, 4)
    assert not (h.face_id == 12).any() and (h.num_hits % 2 == 0).all()


@pytest.mark.parametrize(
    "K, T, message",
    [
        (np.array([[0.0, 0, 8], [0, 10, 8], [0, 0, 1]]), np.eye(4), "focal"),
        (np.array([[10.0, 0, 8], [0, -1, 8], [0, 0, 1]]), np.eye(4), "focal"),
        (np.eye(3), np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.eye(3), np.diag([2.0, 1.0, 1.0, 1.0]), "rotation"),
    ],
)
def test_bad_cameras_raise_a_clear_error(K, T, message):
    with pytest.raises(ValueError, match=message):
        Camera(K, T, 16, 16)


def test_look_at_orientation_and_projection():
    cam = Camera.look_at((0, 0, -5), (0, 0, 0), up=(0, 1, 0), width=100, height=80, fov_y_deg=60)
    u, v = cam.project(cam.world_to_camera(np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]]))).T
    assert v[0] < 40 and abs(u[0] - 50) < 1e-9  # world up is image up
    assert u[1] < 50  # world +x is image left when looking along +z with y up (right-handed world)
    assert np.allclose([u[2], v[2]], [50, 40])
    np.testing.assert_allclose(cam.center, (0, 0, -5))
    np.testing.assert_allclose(np.linalg.det(cam.rotation), 1)
