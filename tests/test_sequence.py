"""Sequences and tracks against closed-form motion and occlusion.

Oracles: the analytic motion of each material point (translation + scale, rotation about a known axis, a
known displacement field), the crossing count of a segment with convex bodies (front/back facing of the
point's own face, slab test for an axis-aligned box), and trimesh's own barycentric code.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from wt_datagen.camera import Camera
from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.geometry.tracks import Clip, ClipTracker, cameras_json, layer_index, material_points, pick_queries
from wt_datagen.inputs.builtin import make_builtin_sequences
from wt_datagen.inputs.sequences import SequenceError, find_sequences, interpolate_poses, load_sequence, static_files
from wt_datagen.pipeline.cameras import make_clip
from wt_datagen.pipeline.config import SequenceConfig

RES, LAYERS, STRIDE = 48, 6, 3


def write_frames(folder: Path, vertex_frames: list[np.ndarray], faces: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, v in enumerate(vertex_frames):
        trimesh.Trimesh(v, faces, process=False).export(folder / f"frame_{t:04d}.ply")


def only_sequence(asset_dir: Path):
    (source,) = find_sequences(asset_dir)
    return load_sequence(source, asset_dir)


def run_clip(seq, cameras, query_frame=0, num_layers=LAYERS):
    T = len(cameras)
    frames = np.arange(T)
    clip = Clip(seq.sequence_id, 0, frames, frames / seq.fps, list(cameras), "static")
    tracker = ClipTracker(seq, clip, num_layers, STRIDE, query_frame)
    produced = list(tracker.frames())
    assert [f.frame_index for f in produced] == list(range(T))
    return tracker.arrays(), produced


def static_cameras(T, eye=(0.0, 0.0, 5.0), fov=50.0):
    return [Camera.look_at(eye, (0, 0, 0), width=RES, height=RES, fov_y_deg=fov)] * T


def check_projection(tr, cameras):
    """cam_xyz and uv follow from world_xyz through each frame's camera; each track's query frame reprojects
    the query onto its own pixel centre and puts it on its own layer."""
    for t, cam in enumerate(cameras):
        np.testing.assert_allclose(tr["cam_xyz"][t], cam.world_to_camera(tr["world_xyz"][t]), atol=1e-5)
        inside = tr["layer_index"][t] >= 0
        np.testing.assert_allclose(tr["uv"][t][inside], cam.project(tr["cam_xyz"][t][inside]), atol=1e-3)
    q, n = tr["query_frame"], np.arange(len(tr["query_frame"]))
    np.testing.assert_allclose(tr["uv"][q, n], tr["query_pixel"] + 0.5, atol=1e-3)
    assert np.array_equal(tr["layer_index"][q, n], tr["query_layer"])


def convex_layer(meshes, tr, t, cam):
    """Analytic layer index on convex closed bodies seen from outside: a point on a face turned away from the
    camera lies behind exactly one crossing of its own body. Returns (expected, well-posed mask)."""
    inst, face = tr["query_instance"], tr["query_face"]
    normals = np.zeros((len(face), 3))
    for i, m in enumerate(meshes):
        normals[inst == i] = m.face_normals[face[inst == i]]
    to_point = tr["world_xyz"][t] - cam.center
    cos = np.einsum("nd,nd->n", normals, to_point) / np.linalg.norm(to_point, axis=1)
    expected = (cos > 0).astype(np.int8)
    uv = tr["uv"][t]
    margin = 1e-3
    outside = ~((uv >= -margin) & (uv < RES + margin)).all(1) | (tr["cam_xyz"][t][:, 2] <= 0)
    well_posed = (np.abs(cos) > 1e-3) & ~(((np.abs(uv) < margin) | (np.abs(uv - RES) < margin)).any(1))
    expected[outside] = -1
    return expected, well_posed


def test_sphere_translating_and_scaling(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=3)
    centres = [np.array([0.15 * t, -0.1 * t, 0.05 * t]) for t in range(5)]
    scales = [1.0 + 0.1 * t for t in range(5)]
    write_frames(tmp_path / "ball", [c + s * sphere.vertices for c, s in zip(centres, scales)], sphere.faces)
    seq = only_sequence(tmp_path)
    assert seq.num_frames == 5 and seq.instance_names == ["ball"]
    cams = static_cameras(5)
    tr, frames = run_clip(seq, cams)
    assert tr["world_xyz"].shape[0] == 5 and len(tr["query_layer"]) > 40
    assert set(np.unique(tr["query_layer"])) == {0, 1}  # near and far side of the sphere
    p0 = tr["world_xyz"][0].astype(np.float64)
    for t in range(5):
        expected = centres[t] + scales[t] * (p0 - centres[0]) / scales[0]
        np.testing.assert_allclose(tr["world_xyz"][t], expected, rtol=1e-5, atol=1e-5 * scales[t])
        layer, ok = convex_layer(frames[t].meshes, tr, t, cams[t])
        assert ok.mean() > 0.95
        assert np.array_equal(tr["layer_index"][t][ok], layer[ok])
    check_projection(tr, cams)


def test_cube_rotating_about_known_axis(tmp_path):
    centre, axis, angle, T = np.array([0.2, -0.1, 0.0]), np.array([1.0, 2.0, 0.5]), np.radians(150), 9
    axis /= np.linalg.norm(axis)
    end = np.eye(4)
    end[:3, :3] = Rotation.from_rotvec(angle * axis).as_matrix()
    end[:3, 3] = centre
    start = np.eye(4)
    start[:3, 3] = centre
    folder = tmp_path / "spin"
    folder.mkdir()
    trimesh.creation.box(extents=(1.2, 1.0, 0.8)).export(folder / "cube.ply")
    spec = {"fps": 12, "num_frames": T, "objects": [{"name": "cube", "mesh": "cube.ply", "keyframes": [
        {"frame": 0, "pose": start.tolist()}, {"frame": T - 1, "pose": end.tolist()}]}]}
    (folder / "scene.json").write_text(json.dumps(spec))
    seq = only_sequence(tmp_path)
    assert seq.sequence_id == "spin" and seq.fps == 12 and seq.instance_names == ["cube"]
    cams = static_cameras(T, eye=(0.5, 1.0, 4.0))
    tr, frames = run_clip(seq, cams, query_frame=3)
    p3 = tr["world_xyz"][3].astype(np.float64)
    for t in range(T):
        # slerp between two keyframes turns at a constant rate about the one axis
        R = Rotation.from_rotvec(angle * (t - 3) / (T - 1) * axis).as_matrix()
        np.testing.assert_allclose(tr["world_xyz"][t], centre + (p3 - centre) @ R.T, rtol=1e-5, atol=1e-5)
        layer, ok = convex_layer(frames[t].meshes, tr, t, cams[t])
        assert ok.mean() > 0.9
        assert np.array_equal(tr["layer_index"][t][ok], layer[ok])
    check_projection(tr, cams)


def segment_box_crossings(origin, points, lo, hi):
    """Crossings of segments origin -> points (N,3) with the surface of the box [lo, hi] (slab test), and
    whether the answer is robust to growing or shrinking the box by 1e-6 (else the case is degenerate)."""

    def count(lo, hi):
        d = points - origin
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (lo - origin) / d, (hi - origin) / d
        t_in = np.nanmax(np.minimum(t1, t2), axis=1)
        t_out = np.nanmin(np.maximum(t1, t2), axis=1)
        return ((t_in < t_out) & (t_in > 0) & (t_out < 1)).astype(int) * 2

    n = count(lo, hi)
    return n, (count(lo - 1e-6, hi + 1e-6) == n) & (count(lo + 1e-6, hi - 1e-6) == n)


def test_two_objects_passing_in_front_of_each_other(tmp_path):
    T = 11
    folder = tmp_path / "pass"
    folder.mkdir()
    wall_half, mover_half = np.array([1.5, 1.5, 0.25]), np.array([0.3, 0.3, 0.3])
    trimesh.creation.box(extents=2 * wall_half).export(folder / "wall.ply")
    trimesh.creation.box(extents=2 * mover_half).export(folder / "mover.ply")
    xs = np.linspace(-1.6, 1.6, T)
    poses = []
    for x in xs:
        p = np.eye(4)
        p[:3, 3] = (x, 0.1, 1.5)
        poses.append(p.tolist())
    spec = {"fps": 10, "num_frames": T, "objects": [
        {"name": "wall", "mesh": "wall.ply"},
        {"name": "mover", "mesh": "mover.ply", "poses": poses}]}
    (folder / "scene.json").write_text(json.dumps(spec))
    seq = only_sequence(tmp_path)
    cams = static_cameras(T, eye=(0.0, 0.0, 6.0), fov=40.0)
    tr, frames = run_clip(seq, cams)
    on_wall = tr["query_instance"] == 0
    assert on_wall.any() and (~on_wall).any()
    # the mover enters the view: tracks seeded on it then are checked below on every frame, before their
    # query frame too (back-filled)
    assert ((tr["query_frame"] > 0) & ~on_wall).sum() > 5
    p0 = tr["world_xyz"][0].astype(np.float64)
    for t in range(T):
        shift = np.where(on_wall[:, None], 0.0, [xs[t] - xs[0], 0.0, 0.0])
        np.testing.assert_allclose(tr["world_xyz"][t], p0 + shift, rtol=1e-5, atol=1e-5)
        own, ok = convex_layer(frames[t].meshes, tr, t, cams[t])
        centre = np.array([xs[t], 0.1, 1.5])
        by_mover, robust = segment_box_crossings(cams[t].center, tr["world_xyz"][t].astype(np.float64),
                                                 centre - mover_half, centre + mover_half)
        expected = np.where(own < 0, -1, own + np.where(on_wall, by_mover, 0))
        ok &= robust
        assert ok.mean() > 0.9
        assert np.array_equal(tr["layer_index"][t][ok], expected[ok])
    # occlusion events happen: wall points visible, then hidden behind both faces of the mover, then visible
    front_wall = on_wall & (tr["query_layer"] == 0)
    history = tr["layer_index"][:, front_wall]
    assert ((history == 2).any(0) & (history[0] == 0) & (history[-1] == 0)).sum() > 10
    check_projection(tr, cams)
    # a count truncated at one layer is completed by casting those rays again with every layer
    caster = LayeredRaycaster(frames[5].meshes)
    queries = pick_queries(frames[0].hits, STRIDE)
    world = material_points(frames[5].meshes, queries)
    full = layer_index(caster, cams[5], world, queries, num_layers=16)
    assert np.array_equal(layer_index(caster, cams[5], world, queries, num_layers=1), full)
    assert full.max() >= 3


def test_deforming_sphere_with_known_displacement(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v0 = sphere.vertices

    def linear(t):  # shear and stretch: an affine field, so points inside faces follow it exactly
        return v0 + t * np.column_stack([0.1 * v0[:, 1], 0.05 * v0[:, 1], 0.08 * v0[:, 0]])

    def bulge(t):  # non-linear: only the vertices follow it; points inside faces move with their face
        return v0 * (1 + 0.1 * t * np.sin(2 * v0[:, :1]))

    for name, field in (("shear", linear), ("bulge", bulge)):
        write_frames(tmp_path / name / "frames", [field(t) for t in range(4)], sphere.faces)
    sources = find_sequences(tmp_path)
    assert [s.kind for s in sources] == ["mesh_sequence", "mesh_sequence"]
    cams = static_cameras(4, eye=(1.0, 1.5, 4.5))
    for source in sources:
        seq = load_sequence(source, tmp_path)
        tr, frames = run_clip(seq, cams)
        p0 = tr["world_xyz"][0].astype(np.float64)
        if seq.sequence_id == "shear__frames":
            for t in range(4):
                disp = t * np.column_stack([0.1 * p0[:, 1], 0.05 * p0[:, 1], 0.08 * p0[:, 0]])
                np.testing.assert_allclose(tr["world_xyz"][t], p0 + disp, rtol=1e-5, atol=1e-5)
                layer, ok = convex_layer(frames[t].meshes, tr, t, cams[t])  # an affine image stays convex
                assert np.array_equal(tr["layer_index"][t][ok], layer[ok])
        else:
            # independent oracle: locate each point on frame 0 with trimesh, carry its barycentrics along
            ref = frames[0].meshes[0]
            _, _, tri = trimesh.proximity.closest_point(ref, p0)
            bary = trimesh.triangles.points_to_barycentric(ref.triangles[tri], p0)
            for t in range(4):
                corners = frames[t].meshes[0].vertices[sphere.faces[tri]]
                np.testing.assert_allclose(tr["world_xyz"][t], np.einsum("nc,ncd->nd", bary, corners),
                                           rtol=1e-5, atol=1e-5)
            moved = np.linalg.norm(tr["world_xyz"][3] - tr["world_xyz"][0], axis=1)
            assert moved.max() > 0.1
        check_projection(tr, cams)


def test_keyframe_interpolation_holds_ends_and_slerps():
    a, b = np.eye(4), np.eye(4)
    b[:3, :3] = Rotation.from_rotvec([0, 0, np.pi / 2]).as_matrix()
    b[:3, 3] = (4, 0, 0)
    poses = interpolate_poses(np.array([2, 6]), np.stack([a, b]), 9)
    assert np.allclose(poses[:3], a) and np.allclose(poses[6:], b)
    np.testing.assert_allclose(poses[4, :3, 3], (2, 0, 0))
    quarter = Rotation.from_rotvec([0, 0, np.pi / 4]).as_matrix()
    np.testing.assert_allclose(poses[4, :3, :3], quarter, atol=1e-12)


def test_trajectories_are_deterministic_and_look_at_the_sequence(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    write_frames(tmp_path / "s", [sphere.vertices + (0.1 * t, 0, 0) for t in range(20)], sphere.faces)
    seq = only_sequence(tmp_path)
    for kind in ("static", "orbit", "dolly", "random"):
        cfg = SequenceConfig(clip_length=8, frame_stride=2, trajectory=kind)
        clip = make_clip(seq, 1, cfg, seed=3, width=32, height=24)
        again = make_clip(seq, 1, cfg, seed=3, width=32, height=24)
        other = make_clip(seq, 2, cfg, seed=3, width=32, height=24)
        assert clip.trajectory == kind and len(clip.cameras) == 8
        assert np.array_equal(clip.frame_indices, again.frame_indices)
        assert np.diff(clip.frame_indices).tolist() == [2] * 7 and clip.frame_indices[-1] < 20
        np.testing.assert_array_equal(clip.timestamps, clip.frame_indices / seq.fps)
        same = [np.array_equal(c.world_to_cam, d.world_to_cam) for c, d in zip(clip.cameras, again.cameras)]
        assert all(same)
        assert not np.allclose(clip.cameras[0].world_to_cam, other.cameras[0].world_to_cam)
        bounds = seq.world_bounds()
        centre, radius = bounds.mean(0), np.linalg.norm(bounds[1] - bounds[0]) / 2
        eyes = np.stack([c.center for c in clip.cameras])
        assert (np.linalg.norm(eyes - centre, axis=1) > radius).all()
        uv = np.stack([c.project(c.world_to_camera(centre)) for c in clip.cameras])
        assert ((uv > 0) & (uv < (32, 24))).all()  # the sequence stays in view
        steps = np.linalg.norm(np.diff(eyes, axis=0), axis=1)
        if kind == "static":
            assert steps.max() == 0
        else:
            assert steps.min() > 0 and steps.max() < 3 * np.median(steps) + 1e-9  # smooth, no jumps
    js = cameras_json(clip, seq.fps)
    assert len(js["cameras"]) == 8 and js["frame_index"] == clip.frame_indices.tolist()


def test_frames_are_streamed(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    write_frames(tmp_path / "s", [sphere.vertices * (1 + 0.1 * t) for t in range(6)], sphere.faces)
    seq = only_sequence(tmp_path)
    built = []

    def counting(meshes):
        built.append(1)
        return LayeredRaycaster(meshes)

    clip = Clip(seq.sequence_id, 0, np.arange(6), np.arange(6) / 24, static_cameras(6), "static")
    tracker = ClipTracker(seq, clip, 4, 8, make_raycaster=counting)
    it = tracker.frames()
    next(it)
    assert len(built) == 1  # one frame cast, not the whole clip
    with pytest.raises(RuntimeError):
        tracker.arrays()
    for _ in it:
        pass
    assert len(built) == 6 and tracker.arrays()["world_xyz"].shape[0] == 6


# ---- bad input: one clear line each --------------------------------------------------------------------

def bad_scene(tmp_path, objects, **top):
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    trimesh.creation.box().export(folder / "box.ply")
    (folder / "scene.json").write_text(json.dumps({"fps": 10, "num_frames": 2, "objects": objects, **top}))
    return find_sequences(tmp_path)[0]


@pytest.mark.parametrize("objects, top, message", [
    ([{"mesh": "nope.obj"}], {}, "mesh file nope.obj does not exist"),
    ([{"mesh": "box.ply", "poses": [np.diag([2, 1, 1, 1]).tolist()] * 2}], {}, "frame 0: non-rigid pose"),
    ([{"mesh": "box.ply", "poses": [np.eye(4).tolist()]}], {}, "one 4x4 matrix per frame (2), got 1"),
    ([{"mesh": "box.ply", "keyframes": [{"frame": 5, "pose": np.eye(4).tolist()}]}], {}, "integer in 0..1"),
    ([{"mesh": "box.ply", "colour": "red"}], {}, "unknown key(s) colour"),
    ([{"mesh": "box.ply"}], {"num_frames": 0}, "num_frames must be a positive integer"),
])
def test_bad_scene_json(tmp_path, objects, top, message):
    source = bad_scene(tmp_path, objects, **top)
    with pytest.raises(SequenceError, match="^bad: ") as e:
        load_sequence(source, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_mesh_sequences(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    gap = tmp_path / "gap"
    write_frames(gap, [sphere.vertices] * 4, sphere.faces)
    (gap / "frame_0002.ply").unlink()
    topo = tmp_path / "topo"
    write_frames(topo, [sphere.vertices] * 3, sphere.faces)
    trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False).export(topo / "frame_0001.ply")
    (topo / "sequence.json").write_text("{}")  # marked: else these files are static assets (other faces)
    broken = tmp_path / "broken"
    write_frames(broken, [sphere.vertices] * 2, sphere.faces)
    (broken / "frame_0001.ply").write_bytes(b"ply\nformat nonsense\n")
    (broken / "sequence.json").write_text('{"fps": 12}')
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "scene.json").write_text("{not json")
    errors = {}
    for source in find_sequences(tmp_path):
        with pytest.raises(SequenceError) as e:
            load_sequence(source, tmp_path)
        errors[source.path.name] = str(e.value)
    assert "missing frames 2" in errors["gap"]
    assert "frame_0001.ply has different faces from frame_0000.ply" in errors["topo"]
    assert errors["broken"].startswith("broken: cannot read frame_0001.ply")
    assert errors["scene.json"].startswith("json: cannot parse scene.json")
    assert all("\n" not in m for m in errors.values())


def test_static_assets_are_not_sequences(tmp_path):
    (tmp_path / "objs").mkdir()
    for name in ("chair.obj", "table2.obj", "lamp_01.ply"):
        trimesh.creation.box().export(tmp_path / "objs" / name)
    (tmp_path / "one").mkdir()
    trimesh.creation.box().export(tmp_path / "one" / "frame_0000.obj")
    assert find_sequences(tmp_path) == []
    write_frames(tmp_path / "seq", [trimesh.creation.box().vertices] * 2, trimesh.creation.box().faces)
    (tmp_path / "scene").mkdir()
    (tmp_path / "scene" / "scene.json").write_text("{}")
    trimesh.creation.box().export(tmp_path / "scene" / "a.ply")
    sources = find_sequences(tmp_path)
    assert [s.kind for s in sources] == ["rigid_scene", "mesh_sequence"]
    meshes = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".obj", ".ply"))
    assert [p.relative_to(tmp_path).as_posix() for p in static_files(meshes, sources)] == [
        "objs/chair.obj", "objs/lamp_01.ply", "objs/table2.obj", "one/frame_0000.obj"]


# ---- through `wt-datagen render` ------------------------------------------------------------------------

def test_render_cli_writes_frames_and_tracks(tmp_path, capsys):
    import webdataset as wds

    from wt_datagen.cli import main

    assets = tmp_path / "assets"
    sphere = trimesh.creation.icosphere(subdivisions=2)
    write_frames(assets / "blob", [sphere.vertices * (1 + 0.05 * t) for t in range(6)], sphere.faces)
    write_frames(assets / "gap", [sphere.vertices] * 3, sphere.faces)
    (assets / "gap" / "frame_0001.ply").unlink()
    (assets / "spin").mkdir()
    trimesh.creation.box().export(assets / "spin" / "cube.ply")
    keys = [{"frame": 0, "pose": np.eye(4).tolist()},
            {"frame": 4, "pose": np.block([[Rotation.from_rotvec([0, 1.0, 0]).as_matrix(), np.zeros((3, 1))],
                                           [np.zeros((1, 3)), np.ones((1, 1))]]).tolist()}]
    (assets / "spin" / "scene.json").write_text(json.dumps(
        {"fps": 5, "num_frames": 5, "objects": [{"name": "cube", "mesh": "cube.ply", "keyframes": keys}]}))
    trimesh.creation.box().export(assets / "static_box.ply")
    config = tmp_path / "tiny.yaml"
    config.write_text("views: 2\nresolution: 32\nlayers: 4\nimage: {renderer: raytrace}\n"
                      "sequences: {clips: 2, clip_length: 4, query_stride: 2, trajectory: orbit}\n")
    out = tmp_path / "out"
    assert main(["render", str(assets), "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "missing frames 1" in printed.out + printed.err
    # progress off a terminal: plain lines, no carriage returns, in views whose total is known at planning:
    # 2 static views + 2 sequences x 2 clips x 4 frames + the skipped gap folder's 2 x 2 planned frames
    progress = re.findall(r"render: (\d+)/(\d+) view", printed.err)
    assert "\r" not in printed.err and progress and all(int(t) == 22 for _, t in progress)
    assert progress[-1] == ("22", "22")

    shards = sorted(map(str, out.glob("*.tar")))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode()}
    frames = {k: s for k, s in samples.items() if "_c0" in k and not k.endswith("_tracks")}
    assert len([k for k in samples if k.startswith("static_box")]) == 2
    assert len(frames) == 2 * 2 * 4 and len([k for k in samples if k.endswith("_tracks")]) == 4
    static = samples["static_box_ply_v0000"]
    for key, s in frames.items():
        assert set(s) - {"__url__", "__local_path__"} == set(static) - {"__url__", "__local_path__"}
        assert set(s["layers.npz"]) == set(static["layers.npz"]) | {"dynamic"}  # scene_flow is off
        meta = s["meta.json"]
        assert {"sequence_id", "clip_index", "frame_index", "timestamp"} <= set(meta)
        assert set(static["meta.json"]) <= set(meta)
        assert key == f"{meta['sequence_id']}_c{meta['clip_index']:03d}_f{meta['frame_index']:04d}"
    for key in [k for k in samples if k.endswith("_tracks")]:
        s = samples[key]
        tr, cams = s["tracks.npz"], s["cameras.json"]
        T, N = tr["layer_index"].shape
        assert T == 4 and N > 0 and tr["world_xyz"].shape == (T, N, 3) and tr["layer_index"].dtype == np.int8
        assert tr["query_pixel"].shape == (N, 2) and set(s["meta.json"]) >= {"sequence_id", "clip_index"}
        prefix = key.removesuffix("_tracks")
        # on its query frame each track is its query: that frame's layered point at that pixel and layer
        for q in np.unique(tr["query_frame"]):
            n = tr["query_frame"] == q
            ref = samples[f"{prefix}_f{tr['frame_index'][q]:04d}"]
            (u, v), k = tr["query_pixel"][n].T, tr["query_layer"][n]
            rays = Camera.from_json(cams["cameras"][q]).pixel_rays()[v, u]
            np.testing.assert_allclose(tr["cam_xyz"][q][n], ref["layers.npz"]["depth"][k, v, u, None] * rays,
                                       rtol=1e-5, atol=1e-5)
            assert np.array_equal(tr["layer_index"][q][n], k)
        for t, (frame, cam) in enumerate(zip(tr["frame_index"], cams["cameras"])):
            frame_sample = samples[f"{prefix}_f{frame:04d}"]
            assert frame_sample["camera.json"] == cam
            camera = Camera.from_json(cam)
            cam_xyz = camera.world_to_camera(tr["world_xyz"][t])
            np.testing.assert_allclose(tr["cam_xyz"][t], cam_xyz, atol=1e-5)
            # a visible point in a pixel whose layer 0 is on the same face lies in that point's plane
            vis = tr["layer_index"][t] == 0
            u, v = np.floor(tr["uv"][t][vis]).astype(int).T
            layers = frame_sample["layers.npz"]
            same = ((layers["face_id"][0][v, u] == tr["query_face"][vis])
                    & (layers["instance_id"][0][v, u] == tr["query_instance"][vis]))
            pixel_xyz = layers["depth"][0][v, u, None] * camera.pixel_rays()[v, u]
            normal = layers["normal"][0][v, u].astype(np.float64)
            off_plane = np.einsum("nd,nd->n", normal, cam_xyz[vis] - pixel_xyz)[same]
            assert (np.abs(off_plane) < 1e-2 * cam_xyz[vis, 2][same]).all()
            manifest = json.loads((out / "manifest.json").read_text())
    status = {k: v["status"] for k, v in manifest["assets"].items()}
    assert status == {"blob": "rendered", "gap": "skipped", "spin/scene.json": "rendered",
                      "static_box.ply": "rendered"}


def test_builtin_sequences_load_and_move(tmp_path):
    make_builtin_sequences(tmp_path, num_frames=8)
    sources = find_sequences(tmp_path)
    assert sorted(s.kind for s in sources) == ["mesh_sequence", "rigid_scene"]
    for source in sources:
        seq = load_sequence(source, tmp_path)
        assert seq.num_frames == 8
        first, last = seq.meshes(0), seq.meshes(7)
        for a, b in zip(first, last):
            assert np.array_equal(a.faces, b.faces)  # one topology: material points can be followed
        moved = max(np.abs(a.vertices - b.vertices).max() for a, b in zip(first, last))
        assert moved > 0.05
