"""Clips from shards: grouping frames into windows, the layout checks, shared normalisation, tracks; the
temporal-consistency metric by hand; video and frame-folder input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds

from tests.clip_shards import clip_files, view_files, write_clip_shards
from wt_datagen.camera import Camera
from wt_model.clips import (
    ClipConfig,
    clip_eval_loader,
    decode_window,
    group_clips,
    probe_clips,
    window_samples,
)
from wt_model.consistency import motion_errors
from wt_model.data import DataError, decode_sample, denormalise
from wt_model.frames import iter_frames


def raw(paths):
    return wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples())


def windows_of(paths, cfg):
    return list(window_samples(cfg)(iter(raw(paths))))


# ----------------------------------------------------------------------------- grouping and windows


def test_windows_follow_length_and_strides(tmp_path):
    rng = np.random.default_rng(0)
    shard = ([view_files(rng, "mug_v0000")] + clip_files(rng, "wob_c000", list(range(3, 9)))
             + [view_files(rng, "mug_v0001")] + clip_files(rng, "pass_c001", list(range(5))))
    paths = write_clip_shards(tmp_path, [shard])
    # length 3 every 2nd frame: a window spans 5 frames; 6 frames give starts 0, 1; 5 frames give 0
    got = windows_of(paths, ClipConfig(length=3, frame_stride=2, window_stride=1))
    assert [w["__key__"] for w in got] == ["wob_c000_w0000", "wob_c000_w0001", "pass_c001_w0000"]
    assert [[f["__key__"] for f in w["frames"]] for w in got] == [
        ["wob_c000_f0003", "wob_c000_f0005", "wob_c000_f0007"], ["wob_c000_f0004", "wob_c000_f0006",
                                                                 "wob_c000_f0008"],
        ["pass_c001_f0000", "pass_c001_f0002", "pass_c001_f0004"]]
    assert [w["tracks"]["__key__"] for w in got] == ["wob_c000_tracks"] * 2 + ["pass_c001_tracks"]
    # defaults: 4 frames side by side (6 frames: one window; 5: one)
    assert [list(w["positions"]) for w in windows_of(paths, ClipConfig())] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert [w["__key__"] for w in windows_of(paths, ClipConfig(length=2))] == [
        "wob_c000_w0000", "wob_c000_w0002", "wob_c000_w0004", "pass_c001_w0000", "pass_c001_w0002"]
    assert windows_of(paths, ClipConfig(length=7)) == []  # too short: no window
    with pytest.raises(DataError, match="length must be at least 1"):
        ClipConfig(length=0)


def test_grouping_streams_one_clip_at_a_time(tmp_path):
    rng = np.random.default_rng(1)
    first = clip_files(rng, "a_c000", [0, 1, 2])
    paths = write_clip_shards(tmp_path, [first + clip_files(rng, "a_c001", [0, 1, 2])])
    consumed = []

    def counting():
        for s in raw(paths):
            consumed.append(s["__key__"])
            yield s

    clips = group_clips(counting())
    clip = next(clips)
    assert clip.prefix == "a_c000" and clip.frame_index == [0, 1, 2]
    assert consumed == [s["__key__"] for s in first]  # nothing of the next clip was read yet
    assert next(clips).prefix == "a_c001"


@pytest.mark.parametrize("case, message", [
    ("split", "shard .*shard-000000.tar: clip s_c000: 2 frames \\(f0000..f0001\\) and no tracks sample before the "
              "shard ends"),
    ("missing", "clip s_c000: cameras.json lists 4 frames, the shard holds 3 frames .*: frames f0002 are missing"),
    ("no_frames", "clip s_c000: tracks sample s_c000_tracks with no frames before it"),
    ("interrupted", "clip s_c000: 2 frames \\(f0000..f0001\\) followed by mug_v0000 instead of its tracks sample"),
    ("order", "clip s_c000: frame f0001 after f0002: frames must be in increasing order"),
    ("again", "clip s_c000: 1 frame \\(f0007..f0007\\) and no tracks sample before the data ends"),
    ("end", "clip s_c000: 3 frames \\(f0000..f0002\\) and no tracks sample before the data ends"),
])
def test_split_or_incomplete_clips_fail_with_one_line(tmp_path, case, message):
    rng = np.random.default_rng(2)
    full = clip_files(rng, "s_c000", [0, 1, 2, 3])
    frames, tracks = full[:4], full[4]
    shards = {
        "split": [frames[:2], frames[2:] + [tracks]],
        "missing": [frames[:2] + frames[3:] + [tracks]],
        "no_frames": [[view_files(rng, "mug_v0000"), tracks]],
        "interrupted": [frames[:2] + [view_files(rng, "mug_v0000")] + frames[2:] + [tracks]],
        "order": [[frames[0], frames[2], frames[1], frames[3], tracks]],
        "again": [full + [view_files(rng, "s_c000_f0007")]],
        "end": [frames[:3]],
    }[case]
    paths = write_clip_shards(tmp_path, shards)
    with pytest.raises(DataError, match=message) as e:
        windows_of(paths, ClipConfig(length=2))
    assert "\n" not in str(e.value) and ("split or incomplete clip" in str(e.value) or case == "order")


def test_probe_names_missing_or_short_clips(tmp_path):
    rng = np.random.default_rng(3)
    views = write_clip_shards(tmp_path / "views", [[view_files(rng, f"mug_v{i:04d}") for i in range(3)]])
    with pytest.raises(DataError, match="no clip"):
        probe_clips(views, 16, ClipConfig())
    short = write_clip_shards(tmp_path / "short", [clip_files(rng, "s_c000", [0, 1, 2]),
                                                   clip_files(rng, "s_c001", [0, 1, 2, 3])])
    with pytest.raises(DataError, match="none of the 2 clips has the 7 frames a window needs"):
        probe_clips(short, 16, ClipConfig(length=4, frame_stride=2))
    info = probe_clips(short, 8, ClipConfig(length=4))
    assert (info.width, info.height, info.num_layers, info.resized) == (16, 16, 3, True)


# ----------------------------------------------------------------------------- decoding


def test_window_shares_one_normalisation_and_t1_is_the_single_view(tmp_path):
    rng = np.random.default_rng(4)
    paths = write_clip_shards(tmp_path, [clip_files(rng, "s_c000", [0, 1, 2], size=16)])
    (win,) = windows_of(paths, ClipConfig(length=3))
    d = decode_window(win, 16, 3)
    depth, valid, rays = [], [], []
    for f in win["frames"]:  # plain numpy reading of what was written
        with np.load(io.BytesIO(f["layers.npz"]), allow_pickle=False) as z:
            depth.append(z["depth"])
            valid.append(z["valid"])
        rays.append(Camera(np.array(json.loads(f["camera.json"])["K"]), np.eye(4), 16, 16).pixel_rays())
    depth, valid = np.stack(depth), np.stack(valid)  # (T,K,H,W)
    shared = np.median(depth[:, 0][valid[:, 0]])
    assert np.isclose(d["scale"], shared)
    per_frame = [np.median(z[0][v[0]]) for z, v in zip(depth, valid)]
    assert not np.allclose(per_frame, shared)  # the frames' own medians differ: the test can tell
    xyz = depth[..., None] * np.stack(rays)[:, None]
    back = denormalise(d["points"].transpose(0, 1, 3, 4, 2), d["scale"])
    assert np.allclose(back[valid], xyz[valid], rtol=1e-5)
    assert d["rgb"].shape == (3, 3, 16, 16) and d["valid"].shape == (3, 3, 16, 16)
    assert d["intrinsics"].shape == (3, 3, 3) and np.array_equal(d["world_to_cam"], np.tile(np.eye(4), (3, 1, 1)))

    (one,) = windows_of(paths, ClipConfig(length=1, window_stride=3))
    single, static = decode_window(one, 16, 3), decode_sample(one["frames"][0], 16, 3)
    for k in ("rgb", "points", "valid", "scale"):
        assert np.array_equal(single[k][0] if k != "scale" else single[k], static[k]), k


def test_rendered_clips_decode_with_tracks_that_match_cameras_and_points(builtin_clips):
    """On the real pipeline's shards, at the stored size and resized to 32: tracks project through the
    decoded cameras onto their uv, and visible tracks lie on the layer-0 points of their pixels."""
    from wt_model.data import expand_shards

    urls = expand_shards(builtin_clips)
    cfg = ClipConfig(length=4, window_stride=4)
    for size in (64, 32):
        windows = [w for b in clip_eval_loader(urls, 2, size, 4, cfg) for w in _unbatch(b)]
        assert len(windows) == 2 * 2 * 2  # 2 sequences x 2 clips x 2 windows of 4
        assert {w["__key__"].split("_c")[0] for w in windows} == {"wobble", "passing"}
        near = []
        for w in windows:
            tr = w["tracks"]
            cams = [Camera(K, E, size, size) for K, E in zip(w["intrinsics"], w["world_to_cam"])]
            for t, cam in enumerate(cams):
                inside = tr["layer_index"][t] >= 0
                uv = cam.project(cam.world_to_camera(tr["world_xyz"][t].astype(np.float64)))
                assert np.allclose(uv[inside], tr["uv"][t][inside], atol=2e-3)
                vis = tr["layer_index"][t] == 0
                u, v = np.floor(tr["uv"][t][vis]).astype(int).T
                pts = denormalise(w["points"][t, 0].transpose(1, 2, 0), w["scale"])[v, u]
                gap = np.linalg.norm(pts - cam.world_to_camera(tr["world_xyz"][t][vis].astype(np.float64)), axis=-1)
                near.append(gap / cam.world_to_camera(tr["world_xyz"][t][vis].astype(np.float64))[:, 2])
        near = np.concatenate(near)
        assert len(near) > 200 and np.median(near) < (0.02 if size == 64 else 0.04)


def _unbatch(batch: dict) -> list[dict]:
    n = len(batch["__key__"])
    out = [{k: v[i] if k == "__key__" else v[i].numpy() for k, v in batch.items() if k != "tracks"} for i in range(n)]
    for w, tr in zip(out, batch.get("tracks", [{}] * n)):
        w["tracks"] = {k: np.asarray(v) for k, v in tr.items()}
    return out


# ----------------------------------------------------------------------------- temporal consistency by hand


def plane_pointmap(K: np.ndarray, size: int, z: float) -> np.ndarray:
    """(H,W,3) camera points of the fronto-parallel plane at depth z."""
    return z * Camera(K, np.eye(4), size, size).pixel_rays()


def test_motion_error_by_hand_static_camera():
    """A static camera and static plane; frame 1 predicted 10% too far: with one scale for the clip the
    fitted s = (0.5 + 0.55) / (0.25 + 0.3025) and the motion error is s * 0.05 * |X| / scene per track; with a
    scale per frame it vanishes."""
    size = 8
    K = np.array([[10.0, 0, 4], [0, 10, 4], [0, 0, 1]])
    gt = np.stack([plane_pointmap(K, size, 2.0)] * 2)  # (T,H,W,3)
    valid = np.ones((2, size, size), bool)
    pix = np.array([[0, 0], [3, 5], [7, 2]])  # (N,2) u, v
    uv = np.broadcast_to(pix + 0.5, (2, 3, 2))
    world = np.broadcast_to(gt[0][pix[:, 1], pix[:, 0]], (2, 3, 3))  # static points on the pixel centres
    E = np.tile(np.eye(4), (2, 1, 1))
    layer = np.zeros((2, 3), np.int8)
    pred = gt * np.array([0.5, 0.55])[:, None, None, None]
    s = (0.5 + 0.55) / (0.25 + 0.3025)
    expect = np.mean(s * 0.05 * np.linalg.norm(world[0], axis=-1)) / 2.0
    clip = motion_errors(pred, valid, gt, valid, E, uv, layer, world)
    assert clip.pairs == 3 and np.isclose(clip.epe, expect) and clip.motion == 0
    frame = motion_errors(pred, valid, gt, valid, E, uv, layer, world, align="frame")
    assert frame.epe < 1e-12
    # a track hidden in frame 1 is not a pair, whatever it does
    hidden = layer.copy()
    hidden[1, 2] = 1
    moved = world.copy()
    moved[1, 2] += 5.0
    part = motion_errors(pred, valid, gt, valid, E, uv, hidden, moved)
    assert part.pairs == 2 and np.isclose(part.epe, np.mean(s * 0.05 * np.linalg.norm(world[0, :2], axis=-1)) / 2.0)


def test_motion_error_is_zero_for_exact_points_under_camera_motion():
    """Tracks moving anyhow, seen by a camera that turns and moves, on pixel centres of every frame: a
    prediction holding each track's true camera point at its pixel, at any one scale, moves exactly like the
    tracks (EPE 0); one whose world points are off by d_t moves off by d_{t+1} - d_t. A track
    whose pixel sees another surface (its point 10% nearer than the pixel's) is not a pair."""
    size, T, N = 16, 3, 6
    K = np.array([[12.0, 0, 8], [0, 12, 8], [0, 0, 1]])
    cams = [Camera.look_at(eye=(3 * np.sin(0.5 * t), 0.5 + 0.2 * t, 3 * np.cos(0.5 * t)), target=(0, 0, 0),
                           up=(0, 1, 0), width=size, height=size, fov_y_deg=60) for t in range(T)]
    cams = [Camera(K, c.world_to_cam, size, size) for c in cams]
    rng = np.random.default_rng(0)
    gt = np.stack([plane_pointmap(K, size, 3.0)] * T)  # (T,H,W,3)
    pix = np.stack([rng.choice(size * size, N, replace=False) for _ in range(T)])  # (T,N) distinct pixels
    u, v = pix % size, pix // size
    uv = np.stack([u, v], -1) + 0.5
    world = np.zeros((T, N, 3))
    for t in range(T):
        gt[t, v[t], u[t]] = rng.uniform(2.0, 4.0, (N, 1)) * cams[t].pixel_rays()[v[t], u[t]]
        world[t] = cams[t].camera_to_world(gt[t, v[t], u[t]])
    valid = np.ones((T, size, size), bool)
    E = np.stack([c.world_to_cam for c in cams])
    layer = np.zeros((T, N), np.int8)
    exact = motion_errors(0.7 * gt, valid, gt, valid, E, uv, layer, world)
    assert exact.pairs == (T - 1) * N and exact.epe < 1e-9 and exact.motion > 0.05
    # predicted world points off by d_t (a vector per frame): the motion is off by d_{t+1} - d_t exactly
    # (the offset pixels are left out of the scale fit through the predicted mask, so s = 1)
    d = np.array([[0.0, 0.0, 0.0], [0.1, -0.05, 0.2], [0.1, 0.15, -0.1]])
    pred, pred_valid = gt.copy(), valid.copy()
    for t in range(T):
        pred[t, v[t], u[t]] = cams[t].world_to_camera(world[t] + d[t])
        pred_valid[t, v[t], u[t]] = False
    off = motion_errors(pred, pred_valid, gt, valid, E, uv, layer, world)
    assert np.isclose(off.epe, np.linalg.norm(d[1:] - d[:-1], axis=-1).mean() / 3.0, rtol=1e-9)
    elsewhere = world.copy()
    elsewhere[1, 0] = cams[1].camera_to_world(0.9 * gt[1, v[1, 0], u[1, 0]][None])[0]
    assert motion_errors(0.7 * gt, valid, gt, valid, E, uv, layer, elsewhere).pairs == (T - 1) * N - 2


def test_ground_truth_pointmaps_score_a_small_floor_on_rendered_clips(builtin_clips):
    """The pixel's point is not exactly the tracked point: on real clips the ground-truth pointmaps score
    above zero, but far below the motion itself and a prediction that ignores the motion (frame 0 repeated)."""
    from wt_model.data import expand_shards

    errs, still, motion = 0.0, 0.0, 0.0
    n = 0
    for b in clip_eval_loader(expand_shards(builtin_clips), 4, 64, 4, ClipConfig(length=4)):
        for w in _unbatch(b):
            gt = denormalise(w["points"][:, 0].transpose(0, 2, 3, 1), w["scale"])
            v, tr = w["valid"][:, 0], w["tracks"]
            args = (w["world_to_cam"], tr["uv"], tr["layer_index"], tr["world_xyz"])
            m = motion_errors(gt, v, gt, v, *args)
            frozen = np.broadcast_to(gt[:1], gt.shape)
            s = motion_errors(frozen, v, gt, v, *args)
            errs, still, motion, n = errs + m.error_sum, still + s.error_sum, motion + m.motion_sum, n + m.pairs
    assert n > 300
    assert errs < 0.25 * motion and errs < 0.25 * still


# ----------------------------------------------------------------------------- frames and video input


def test_frames_from_a_folder_in_natural_order_and_from_a_video(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    imgs = {i: rng.integers(0, 255, (12, 10, 3), dtype=np.uint8) for i in (1, 2, 10)}
    for i, img in imgs.items():
        Image.fromarray(img).save(folder / f"f{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"")
    got = list(iter_frames(folder))
    assert [n for n, _ in got] == ["f1", "f2", "f10"]
    assert all(np.array_equal(f, imgs[int(n[1:])]) for n, f in got)

    gif = tmp_path / "clip.gif"
    Image.fromarray(imgs[1]).save(gif, save_all=True, append_images=[Image.fromarray(imgs[2])], duration=100)
    frames = list(iter_frames(gif))
    assert [n for n, _ in frames] == ["clip_f0000", "clip_f0001"] and frames[0][1].shape == (12, 10, 3)

    import imageio.v3 as iio

    pytest.importorskip("imageio_ffmpeg")
    video = rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    video[:] = np.linspace(0, 250, 5).astype(np.uint8)[:, None, None, None]  # flat frames survive the codec
    iio.imwrite(tmp_path / "v.mp4", video, fps=10)
    frames = list(iter_frames(tmp_path / "v.mp4"))
    assert len(frames) == 5 and frames[0][1].shape == (32, 48, 3)
    assert np.allclose([f.mean() for _, f in frames], video.mean(axis=(1, 2, 3)), atol=3)


def test_bad_frames_and_videos_fail_with_one_line(tmp_path):
    from PIL import Image

    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_frames(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list(iter_frames(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(DataError, match="frame b is 6x8, the first frame is 8x8"):
        list(iter_frames(tmp_path / "mixed"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="junk.mp4: cannot be read") as e:
        list(iter_frames(tmp_path / "junk.mp4"))
    assert "\n" not in str(e.value)
