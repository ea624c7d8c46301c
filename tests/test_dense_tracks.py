"""Dense seeding over the whole clip, motion labels and scene flow, against independent oracles.

Oracles: instance membership (a static table and a moving ball: which points move is known exactly), the
closed-form motion of each test scene (translation + scale, rotation about a known axis, an affine field),
a brute-force nearest-track search (scipy's KD-tree in the max norm) for the coverage, and a brute-force
pairwise check of the "no track within half a stride" seeding rule.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from tests.test_sequence import only_sequence, write_frames
from wt_datagen.camera import Camera
from wt_datagen.geometry.tracks import Clip, ClipTracker
from wt_datagen.inputs.assets import asset_to_world
from wt_datagen.inputs.builtin import make_builtin_sequences
from wt_datagen.inputs.sequences import find_sequences, load_sequence
from wt_datagen.pipeline.cameras import make_clip
from wt_datagen.pipeline.config import SequenceConfig

RES, LAYERS, STRIDE = 48, 6, 3


def run(seq, cameras, frames=None, **kw):
    """Track a clip of ``frames`` (default 0..T-1) seen by ``cameras``; returns (arrays, frames, tracker)."""
    frames = np.arange(len(cameras)) if frames is None else np.asarray(frames)
    clip = Clip(seq.sequence_id, 0, frames, frames / seq.fps, list(cameras), "static")
    tracker = ClipTracker(seq, clip, kw.pop("num_layers", LAYERS), kw.pop("stride", STRIDE), **kw)
    out = list(tracker.frames())
    assert [f.t for f in out] == list(range(len(frames)))
    return tracker.arrays(), out, tracker


def world_points(frame):
    """(M, 3) float64 world positions of a frame's valid crossings, from the stored depth (not from faces)."""
    return frame.camera.camera_to_world(frame.hits.xyz[frame.hits.valid].astype(np.float64))


def table_and_ball(tmp_path: Path, T: int):
    """A static table (top and four legs, one mesh, no pose) and a ball that rolls over it (a pose per frame:
    translation and spin)."""
    folder = tmp_path / "room"
    folder.mkdir()
    parts = [trimesh.creation.box(extents=(2.0, 0.1, 1.2), transform=trimesh.transformations.translation_matrix(
        (0, -0.3, 0)))]
    for x in (-0.9, 0.9):
        for z in (-0.5, 0.5):
            parts.append(trimesh.creation.box(extents=(0.1, 0.8, 0.1),
                                              transform=trimesh.transformations.translation_matrix((x, -0.75, z))))
    trimesh.util.concatenate(parts).export(folder / "table.ply")
    trimesh.creation.icosphere(subdivisions=2, radius=0.25).export(folder / "ball.ply")
    poses = []
    for t in range(T):
        p = np.eye(4)
        p[:3, :3] = Rotation.from_rotvec([0, 0.3 * t, 0.2 * t]).as_matrix()
        p[:3, 3] = (-0.8 + 0.2 * t, 0.0 + 0.05 * np.sin(t), 0.1)
        poses.append(p.tolist())
    spec = {"fps": 10, "num_frames": T, "objects": [{"name": "table", "mesh": "table.ply"},
                                                    {"name": "ball", "mesh": "ball.ply", "poses": poses}]}
    (folder / "scene.json").write_text(json.dumps(spec))
    return only_sequence(tmp_path)


@pytest.mark.parametrize("kind", ["static", "orbit", "dolly", "random"])
def test_static_table_and_moving_ball_are_labelled_exactly(tmp_path, kind):
    seq = table_and_ball(tmp_path, T=9)
    cfg = SequenceConfig(clip_length=8, trajectory=kind, distance=(1.6, 2.0))
    clip = make_clip(seq, 0, cfg, seed=5, width=RES, height=RES)
    tracker = ClipTracker(seq, clip, LAYERS, STRIDE, scene_flow=kind == "orbit")
    frames = list(tracker.frames())
    tr = tracker.arrays()
    ball = tr["query_instance"] == seq.instance_names.index("ball")
    assert ball.any() and (~ball).any()
    assert np.array_equal(tr["dynamic"], ball)  # exactly the ball's tracks, wherever they were seeded
    assert (tr["world_displacement"][~ball] == 0).all() and tr["world_displacement"][ball].min() > 0.1
    for f in frames:
        moves = f.next_frame_index != f.frame_index  # the clip's last frame may be the sequence's last
        on_ball = f.hits.valid & (f.hits.instance_id == seq.instance_names.index("ball"))
        assert np.array_equal(f.dynamic, on_ball & moves)
        if f.next_world_xyz is not None:  # the table's points stay where they are, to float32 rounding
            nxt, now = f.next_world_xyz[f.hits.valid], world_points(f)
            table = ~on_ball[f.hits.valid]
            np.testing.assert_allclose(nxt[table], now[table], rtol=0, atol=1e-5)


def _analytic_scenes(tmp_path: Path):
    """(name, sequence, cameras, step) for three scenes whose motion from frame t to t + 1 is known:
    step(t, x) maps (M, 3) world points at t to t + 1."""
    out = []
    sphere = trimesh.creation.icosphere(subdivisions=3)
    centres = [np.array([0.15 * t, -0.1 * t, 0.05 * t]) for t in range(5)]
    scales = [1.0 + 0.1 * t for t in range(5)]
    write_frames(tmp_path / "a" / "ball", [c + s * sphere.vertices for c, s in zip(centres, scales)], sphere.faces)
    out.append(("translate+scale", only_sequence(tmp_path / "a"),
                [Camera.look_at((0, 0, 5.0), (0, 0, 0), width=RES, height=RES, fov_y_deg=50)] * 4,
                lambda t, x: centres[t + 1] + scales[t + 1] / scales[t] * (x - centres[t])))

    centre, axis, angle, T = np.array([0.2, -0.1, 0.0]), np.array([1.0, 2.0, 0.5]), np.radians(150), 9
    axis /= np.linalg.norm(axis)
    end, start = np.eye(4), np.eye(4)
    end[:3, :3] = Rotation.from_rotvec(angle * axis).as_matrix()
    end[:3, 3] = start[:3, 3] = centre
    folder = tmp_path / "b" / "spin"
    folder.mkdir(parents=True)
    trimesh.creation.box(extents=(1.2, 1.0, 0.8)).export(folder / "cube.ply")
    (folder / "scene.json").write_text(json.dumps({"fps": 12, "num_frames": T, "objects": [
        {"name": "cube", "mesh": "cube.ply",
         "keyframes": [{"frame": 0, "pose": start.tolist()}, {"frame": T - 1, "pose": end.tolist()}]}]}))
    R = Rotation.from_rotvec(angle / (T - 1) * axis).as_matrix()  # slerp: a constant rate about one axis
    orbit = [Camera.look_at((4 * np.sin(a), 1.0, 4 * np.cos(a)), (0, 0, 0), width=RES, height=RES, fov_y_deg=45)
             for a in np.linspace(0, 0.8, 8)]
    out.append(("rotation", only_sequence(tmp_path / "b"), orbit, lambda t, x: centre + (x - centre) @ R.T))

    A = np.array([[0, 0.1, 0], [0, 0.05, 0], [0.08, 0, 0]])  # v(t) = (I + t A) v0: affine, exact inside faces
    write_frames(tmp_path / "c" / "shear", [sphere.vertices @ (np.eye(3) + t * A).T for t in range(4)],
                 sphere.faces)
    out.append(("affine", only_sequence(tmp_path / "c"),
                [Camera.look_at((1.0, 1.5, 4.5), (0, 0, 0), width=RES, height=RES, fov_y_deg=50)] * 3,
                lambda t, x: x @ ((np.eye(3) + (t + 1) * A) @ np.linalg.inv(np.eye(3) + t * A)).T))
    return out


def test_scene_flow_follows_the_analytic_motion(tmp_path):
    for name, seq, cams, step in _analytic_scenes(tmp_path):
        _, frames, tracker = run(seq, cams, scene_flow=True)
        checked = 0
        for f in frames:
            assert f.next_frame_index == f.frame_index + 1  # every clip here stops before its sequence ends
            now = world_points(f)
            want = step(f.t, now)
            got = f.next_world_xyz[f.hits.valid]
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
            assert (f.next_world_xyz[~f.hits.valid] == 0).all()
            moved = np.linalg.norm(want - now, axis=1)
            clear = np.abs(moved - tracker.tolerance) > 1e-5 * scale  # float32 depth cannot decide closer calls
            assert np.array_equal(f.dynamic[f.hits.valid][clear], (moved > tracker.tolerance)[clear]), name
            checked += len(got)
        assert checked > 1000


def test_seeding_is_dense_redundancy_free_and_backfilled(tmp_path):
    """A box slides in from outside the view past a wall: the box's tracks are seeded when it appears,
    filled before that, and no seed duplicates a track that already lands within half a stride."""
    T = 8
    folder = tmp_path / "enter"
    folder.mkdir()
    trimesh.creation.box(extents=(3.0, 3.0, 0.5)).export(folder / "wall.ply")
    trimesh.creation.box(extents=(1.2, 1.2, 0.6)).export(folder / "mover.ply")
    xs = np.linspace(-3.4, 0.2, T)
    poses = [np.block([[np.eye(3), np.array([[x], [0.1], [1.2]])], [np.zeros((1, 3)), np.ones((1, 1))]]).tolist()
             for x in xs]
    (folder / "scene.json").write_text(json.dumps({"fps": 10, "num_frames": T, "objects": [
        {"name": "wall", "mesh": "wall.ply"}, {"name": "mover", "mesh": "mover.ply", "poses": poses}]}))
    seq = only_sequence(tmp_path)
    cams = [Camera.look_at((0, 0, 6.0), (0, 0, 0), width=RES, height=RES, fov_y_deg=35)] * T
    tr, frames, _ = run(seq, cams)
    qf, mover = tr["query_frame"], tr["query_instance"] == 1
    assert (mover & (qf > 0)).sum() > 10 and not (mover & (qf == 0)).any()  # it enters after frame 0
    # every track is filled on every frame, before its query frame too: the box translates
    n = np.arange(len(qf))
    ref = tr["world_xyz"][qf, n].astype(np.float64)
    for t in range(T):
        shift = np.where(mover[:, None], [xs[t], 0, 0] - np.array([xs, [0] * T, [0] * T]).T[qf], 0.0)
        np.testing.assert_allclose(tr["world_xyz"][t], ref + shift, rtol=1e-5, atol=1e-5)
    assert (tr["layer_index"][0][mover] == -1).all()  # outside the image at frame 0
    # redundancy-free: a seed on frame q has no earlier track of its layer within half a stride there
    for q in range(1, T):
        new, old = qf == q, qf < q
        for k in np.unique(tr["query_layer"][new]):
            old_k = old & (tr["layer_index"][q] == k)
            if old_k.any():
                d, _ = cKDTree(tr["uv"][q][old_k]).query(tr["uv"][q][new & (tr["query_layer"] == k)], p=np.inf)
                assert (d > STRIDE / 2).all()
    # coverage: claimed = brute force, and complete on layer 0 where single-frame seeding is not
    single, _, _ = run(seq, cams, query_every=0)
    for arrays in (tr, single):
        for f in frames:
            for k in range(2):
                on = arrays["layer_index"][f.t] == k
                v, u = np.nonzero(f.hits.valid[k])
                if not on.any() or not len(v):
                    continue
                d, _ = cKDTree(np.floor(arrays["uv"][f.t][on])).query(np.column_stack([u, v]), p=np.inf)
                assert arrays["coverage"][f.t, k] == pytest.approx((d <= STRIDE).mean(), abs=1e-6)
    assert tr["coverage"][:, 0].min() >= 0.95 and single["coverage"][-1, 0] < 0.9, single["coverage"][:, 0]
    # kept casters or casters built again for the back-fill: the same arrays
    again, _, _ = run(seq, cams, backfill_bytes=0)
    assert again.keys() == tr.keys() and all(np.array_equal(again[k], tr[k], equal_nan=True) for k in tr)
    # every other frame, and a reference frame in the middle (processed first)
    sparse, _, _ = run(seq, cams, query_every=2, query_frame=3)
    assert set(np.unique(sparse["query_frame"])) <= {1, 3, 5, 7} and (sparse["query_frame"] == 3).sum() > 0


def test_builtin_sequences_are_covered_on_every_frame(tmp_path):
    make_builtin_sequences(tmp_path, num_frames=12)
    for source in find_sequences(tmp_path):
        seq = load_sequence(source, tmp_path)
        box = trimesh.PointCloud(trimesh.bounds.corners(seq.local_bounds))
        seq.asset_to_world = asset_to_world([box])  # as the renderer does with assets.normalise
        for kind in ("orbit", "dolly"):
            cfg = SequenceConfig(clip_length=12, trajectory=kind, query_stride=4)
            tracker = ClipTracker(seq, make_clip(seq, 0, cfg, 0, 64, 64), 4, 4)
            for _ in tracker.frames():
                pass
            cov = tracker.arrays()["coverage"]
            assert np.nanmin(cov[:, 0]) >= 0.95, (seq.sequence_id, kind)
