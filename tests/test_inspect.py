"""`wt-datagen inspect`: summary figures against the raw caster arrays, validation of damaged shards,
contact sheets and PLY export. Shards are built from real caster output with the project's one writer
(``wt_datagen.schema.encode_sample`` + ``webdataset.TarWriter``)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds
from PIL import Image

from wt_datagen import Camera, LayeredRaycaster, depth_to_xyz
from wt_datagen import inspect as wi
from wt_datagen.cli import main
from wt_datagen.schema import encode_npz, encode_sample, layer_arrays

W, H, K = 40, 32, 3  # non-square on purpose; K=3 truncates the box-in-box rays (4 crossings)


def _asset_meshes() -> dict[str, list[trimesh.Trimesh]]:
    outer = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    inner = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    torus = trimesh.creation.torus(major_radius=0.8, minor_radius=0.25)
    return {"nested": [outer, inner], "torus": [torus]}


def _meta(asset_id: str, view: int, names: list[str]) -> dict:
    return {
        "asset_id": asset_id,
        "asset_path": f"{asset_id}.obj",
        "asset_sha256": "0" * 64,
        "asset_to_world": np.eye(4).tolist(),
        "config_name": "test",
        "config_hash": "abc",
        "seed": 0,
        "view_index": view,
        "num_layers": K,
        "instance_names": names,
        "version": "0.1.0",
    }


def _shade(hits) -> np.ndarray:
    """(H, W, 3) uint8 stand-in image: layer-0 normals, black background."""
    return np.where(hits.valid[0][..., None], (hits.normal[0] + 1) * 127.5, 0).astype(np.uint8)


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards (one per asset, 3 views each) and the raw arrays they were written from."""
    root = tmp_path_factory.mktemp("shards")
    raw, shards = {}, []
    for i, (asset, meshes) in enumerate(_asset_meshes().items()):
        rc = LayeredRaycaster(meshes)
        samples = []
        for v in range(3):
            a = 2 * np.pi * v / 3
            cam = Camera.look_at(
                (3.5 * np.sin(a), 1.0 + 0.3 * v, 3.5 * np.cos(a)), (0, 0, 0), width=W, height=H, fov_y_deg=50
            )
            hits = rc.cast(cam, num_layers=K)
            key = f"{asset}_v{v:04d}"
            rgb = _shade(hits)
            samples.append(encode_sample(key, rgb, hits, cam, _meta(asset, v, rc.instance_names)))
            raw[key] = {"hits": hits, "camera": cam, "rgb": rgb, "asset": asset, "files": samples[-1]}
        shards.append(_write(root / f"shard-{i:06d}.tar", samples))
    return {"root": root, "shards": shards, "raw": raw}


def _sample(data, key: str) -> wi.Sample:
    files = {k: v for k, v in data["raw"][key]["files"].items() if k != "__key__"}
    return wi.decode(wi.Sample("x.tar", key, files))


# --------------------------------------------------------------------------------------------- summary


def test_summary_matches_raw_arrays(data):
    d = wi.summarise([str(data["root"] / "shard-{000000..000001}.tar")])
    raw = list(data["raw"].values())
    valid = np.stack([r["hits"].valid for r in raw])  # (S, K, H, W)
    depth = np.stack([r["hits"].depth for r in raw])
    count = valid.sum(1)
    assert d["shards"] == 2 and d["samples"] == 6 and d["views"] == 6 and d["clips"] == 0
    assert d["shard_bytes"] == sum(p.stat().st_size for p in data["shards"])
    assert d["samples_per_asset"] == {"nested": 3, "torus": 3}
    assert d["resolution_and_K"] == {f"{W}x{H} K={K}": 6}
    assert d["schema_versions"] == {"1": 6}
    assert d["pixels"] == 6 * H * W
    for k in range(1, K + 1):
        assert d["fraction_at_least_k_layers"][str(k)] == pytest.approx(np.mean(count >= k))
    for k in range(K):
        layer = depth[:, k][valid[:, k]]
        assert d["depth_range_per_layer"][k] == pytest.approx([layer.min(), layer.max()])
    nh = np.stack([r["hits"].num_hits for r in raw])
    assert d["truncated_ray_fraction"] == pytest.approx(np.mean(nh > K))
    assert d["truncated_ray_fraction"] > 0  # the box-in-box views really do truncate at K=3
    assert d["problems"] == []


def test_cli_json_equals_summarise_and_inputs_expand(data, capsys):
    folder, glob = str(data["root"]), str(data["root"] / "shard-*.tar")
    assert main(["inspect", folder, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == wi.summarise([glob])
    assert main(["inspect", str(data["shards"][0])]) == 0
    out = capsys.readouterr().out
    assert "nested" in out and "torus" not in out and f"{W}x{H} K={K}: 3" in out


def test_no_match_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing-{0..3}.tar")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shard matches" in err[0]


# ------------------------------------------------------------------------------------------ validation


def test_clean_shards_validate(data, capsys):
    assert wi.validate([data["root"]]) == []
    assert main(["inspect", str(data["root"]), "--validate"]) == 0


def _damaged(data, tmp_path, key: str, change) -> Path:
    """A one-sample shard holding ``key`` after ``change(files)``, followed by an intact sample."""
    files = dict(data["raw"][key]["files"])
    change(files)
    ok = dict(data["raw"]["torus_v0001"]["files"])
    return _write(tmp_path / "damaged.tar", [files, ok])


def _layers_with(data, key: str, edit) -> bytes:
    arrays = {k: v.copy() for k, v in layer_arrays(data["raw"][key]["hits"]).items()}  # raw hits stay intact
    edit(arrays)
    return encode_npz(arrays)


def _only(problems, field: str) -> list[str]:
    return [p.message for p in problems if p.field == field]


def test_truncated_tar_keeps_earlier_samples_and_other_shards(data, tmp_path):
    good = data["shards"][0].read_bytes()
    bad = tmp_path / "cut.tar"
    bad.write_bytes(good[: len(good) * 2 // 3])  # cut inside the last sample's data
    problems = wi.validate([bad, data["shards"][1]])
    assert len(problems) == 1, problems
    p = problems[0]
    assert (p.shard, p.field) == (str(bad), "tar") and "truncated or corrupt tar" in p.message
    summary = wi.summarise([bad, data["shards"][1]])
    assert 3 < summary["samples"] < 6  # the samples before the cut, and all of the other shard


def test_tar_cut_at_a_member_boundary_is_caught(data, tmp_path):
    with wds.TarWriter(str(tmp_path / "one.tar")) as w:
        w.write(data["raw"]["nested_v0000"]["files"])
    whole = (tmp_path / "one.tar").read_bytes()
    end = len(whole.rstrip(b"\0"))
    end += -end % 512  # just after the last member: tarfile alone would read this as a clean end
    cut = tmp_path / "boundary.tar"
    cut.write_bytes(whole[:end])
    problems = wi.validate([cut])
    assert [(p.field, "no end-of-archive marker" in p.message) for p in problems] == [("tar", True)]


def test_flipped_bytes_in_npz(data, tmp_path):
    def flip(files):
        b = bytearray(files["layers.npz"])
        info = zipfile.ZipFile(io.BytesIO(bytes(b))).getinfo("depth.npy")
        start = info.header_offset + 30 + len(info.filename)
        mid = start + info.compress_size // 2
        b[mid : mid + 8] = bytes(x ^ 0xFF for x in b[mid : mid + 8])
        files["layers.npz"] = bytes(b)

    problems = wi.validate([_damaged(data, tmp_path, "nested_v0000", flip)])
    assert all(p.key == "nested_v0000" for p in problems)
    msgs = _only(problems, "layers.npz:depth")
    assert len(msgs) == 1 and msgs[0].startswith("corrupt array")


def test_missing_field_and_missing_file(data, tmp_path):
    def drop(files):
        files["layers.npz"] = _layers_with(data, "nested_v0001", lambda a: a.pop("num_hits"))
        del files["camera.json"]

    problems = wi.validate([_damaged(data, tmp_path, "nested_v0001", drop)])
    assert {(p.key, p.field, p.message) for p in problems} == {
        ("nested_v0001", "layers.npz:num_hits", "missing field"),
        ("nested_v0001", "camera.json", "missing file"),
    }


def _first_multi_layer_pixel(data, key):
    v, u = np.argwhere(data["raw"][key]["hits"].valid[1])[0]
    return v, u


def test_non_monotone_mask(data, tmp_path):
    v, u = _first_multi_layer_pixel(data, "nested_v0002")

    def edit(a):
        a["valid"][0, v, u] = False

    def change(files):
        files["layers.npz"] = _layers_with(data, "nested_v0002", edit)

    problems = wi.validate([_damaged(data, tmp_path, "nested_v0002", change)])
    where = f"at 1 entries (first: layer 0 pixel (u={u}, v={v}))"
    monotone = "non-monotone validity (valid after an invalid layer)"
    assert _only(problems, "layers.npz:valid") == [f"{monotone} {where}"]


def test_nan_depth(data, tmp_path):
    v, u = _first_multi_layer_pixel(data, "nested_v0000")

    def nan(a):
        a["depth"][1, v, u] = np.nan

    def change(files):
        files["layers.npz"] = _layers_with(data, "nested_v0000", nan)

    problems = wi.validate([_damaged(data, tmp_path, "nested_v0000", change)])
    where = f"at 1 entries (first: layer 1 pixel (u={u}, v={v}))"
    assert [(p.field, p.message) for p in problems] == [
        ("layers.npz:depth", f"non-finite depth where valid {where}")
    ]


def test_decreasing_depth_corrupt_png_bad_camera_duplicate_key(data, tmp_path):
    v, u = _first_multi_layer_pixel(data, "nested_v0000")

    def change(files):
        def swap(a):
            a["depth"][[0, 1], v, u] = a["depth"][[1, 0], v, u]

        files["layers.npz"] = _layers_with(data, "nested_v0000", swap)
        png = bytearray(files["rgb.png"])
        png[40:60] = b"\0" * 20
        files["rgb.png"] = bytes(png)
        cam = json.loads(files["camera.json"])
        cam["world_to_cam"][0][0] *= 2
        files["camera.json"] = json.dumps(cam).encode()

    damaged = _damaged(data, tmp_path, "nested_v0000", change)
    problems = wi.validate([damaged, data["shards"][0]])
    mine = [p for p in problems if p.shard == str(damaged)]
    assert _only(mine, "layers.npz:depth") == [
        f"depth decreasing across layers at 1 entries (first: layer 0 pixel (u={u}, v={v}))"
    ]
    assert [m.split(" (")[0] for m in _only(mine, "rgb.png")] == ["corrupt png"]
    rotation = "world_to_cam rotation is not a proper rotation (orthonormal, det +1)"
    assert _only(mine, "camera.json") == [rotation]
    dup = [p for p in problems if p.field == "-"]  # the intact torus sample is not in shard 0
    assert [(p.shard, p.key, p.message) for p in dup] == [
        (str(data["shards"][0]), "nested_v0000", f"duplicate sample key (first in {damaged})")
    ]


def test_cli_validate_prints_one_line_per_problem(data, tmp_path, capsys):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    assert main(["inspect", str(bad), str(data["shards"][1]), "--validate"]) == 1
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(str(bad))]
    assert len(lines) == 1 and ": tar: " in lines[0] and "Traceback" not in "".join(out)


# --------------------------------------------------------------------------- clip track samples


@pytest.fixture(scope="module")
def clip(data):
    """A clip track sample from the project's tracker (``wt_datagen.geometry.tracks``): a sphere moving inside a box,
    queries on every layer of frame 0, an orbiting camera; written next to the clip's first frame."""
    from wt_datagen.geometry.tracks import Clip, ClipTracker, cameras_json
    from wt_datagen.inputs.sequences import RigidScene

    T = 4
    box, ball = _asset_meshes()["nested"]
    poses = np.stack([np.eye(4)] * T)
    moving = poses.copy()
    moving[:, 0, 3] = np.linspace(0, 0.3, T)
    scene = RigidScene(
        sequence_id="nested",
        source=None,
        num_frames=T,
        fps=24.0,
        instance_names=["box", "ball"],
        local_bounds=np.array([[-1.0] * 3, [1.0] * 3]),
        sha256="0" * 64,
        object_meshes=[box, ball],
        poses=np.stack([poses, moving]),
    )
    cams = [
        Camera.look_at((3.5 * np.sin(a), 0.8, 3.5 * np.cos(a)), (0, 0, 0), width=W, height=H, fov_y_deg=50)
        for a in np.linspace(0, 0.6, T)
    ]
    clip = Clip("nested", 0, np.arange(T), np.arange(T) / 24.0, cams, "orbit")
    tracker = ClipTracker(scene, clip, num_layers=K, query_stride=4, scene_flow=True)
    frames = [f for f in tracker.frames()]
    tracks = tracker.arrays()
    clip_meta = {"sequence_id": "nested", "clip_index": 0, "query_stride": 4, "num_layers": K,
                 "dynamic_tolerance": tracker.tolerance}
    files = {
        "__key__": "nested_c0000_tracks",
        "tracks.npz": encode_npz(tracks),
        "cameras.json": json.dumps(cameras_json(clip, 24.0)).encode(),
        "meta.json": json.dumps({"schema_version": 1, **clip_meta}).encode(),
    }
    frame_files = [
        encode_sample(
            f"nested_c0000_f{f.t:04d}",
            _shade(f.hits),
            f.hits,
            f.camera,
            {**_meta("nested", f.t, ["box", "ball"]), **clip_meta, "frame_index": f.frame_index,
             "timestamp": f.timestamp, "next_frame_index": f.next_frame_index},
            extra_layers=f.extra_layers(),
        )
        for f in frames
    ]
    # the whole clip, as the renderer writes it: every frame, then the tracks sample
    path = _write(data["root"].parent / "clip.tar", frame_files + [files])
    return {"path": path, "full_path": path, "tracks": tracks, "files": files, "frames": frames,
            "frame_files": frame_files, "T": T}


def test_clip_sample_validates_and_is_summarised(clip):
    assert wi.validate([clip["path"]]) == []  # the cross-checks of the frames and the tracks included
    d = wi.summarise([clip["path"]])
    assert (d["views"], d["clips"], d["tracks"]) == (clip["T"], 1, len(clip["tracks"]["query_layer"]))
    assert (clip["tracks"]["layer_index"] > 0).any()  # hidden layers are really tracked
    assert d["dynamic_tracks"] == int(clip["tracks"]["dynamic"].sum()) > 0  # the ball moves, the box does not
    cov = clip["tracks"]["coverage"]
    assert d["track_coverage"]["0"]["min"] == pytest.approx(float(np.nanmin(cov[:, 0])))
    assert "track coverage" in wi.format_summary(d) and "dynamic tracks" in wi.format_summary(d)


def _npz_with(data: bytes, **changes) -> bytes:
    arrays = dict(np.load(io.BytesIO(data), allow_pickle=False))
    for name, change in changes.items():
        arrays[name] = change(arrays[name].copy())
    return encode_npz(arrays)


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


@pytest.mark.parametrize(
    "where, field, change, problem",
    [
        ("tracks", "dynamic", np.logical_not, ("tracks.npz:dynamic", "disagrees with the displacement")),
        ("tracks", "world_displacement", lambda a: a + 0.01, ("tracks.npz:world_displacement", "disagrees")),
        ("tracks", "coverage", _set((1, 0), 0.5), ("tracks.npz:coverage", "disagrees with the frames")),
        ("frame", "next_world_xyz", lambda a: a + np.float32(0.01) * (a != 0),
         ("tracks.npz:world_xyz", "at the next frame != the query crossing's next_world_xyz")),
        ("frame", "dynamic", np.ones_like, ("layers.npz:dynamic", "dynamic where invalid")),
    ],
)
def test_clip_motion_and_coverage_claims_are_checked(clip, tmp_path, where, field, change, problem):
    frames = [dict(f) for f in clip["frame_files"]]
    tracks = dict(clip["files"])
    if where == "tracks":
        tracks["tracks.npz"] = _npz_with(tracks["tracks.npz"], **{field: change})
    else:
        frames[0]["layers.npz"] = _npz_with(frames[0]["layers.npz"], **{field: change})
    problems = wi.validate([_write(tmp_path / "c.tar", frames + [tracks])])
    assert any(p.field == problem[0] and p.message.startswith(problem[1]) for p in problems), problems


def test_frame_dynamic_mask_disagreeing_with_its_flow_is_named(clip, tmp_path):
    frames = [dict(f) for f in clip["frame_files"]]
    layers = np.load(io.BytesIO(frames[0]["layers.npz"]))
    assert layers["dynamic"].any() and (~layers["dynamic"] & layers["valid"]).any()  # the ball, the box
    frames[0]["layers.npz"] = _npz_with(frames[0]["layers.npz"], dynamic=np.zeros_like)
    problems = wi.validate([_write(tmp_path / "c.tar", frames + [clip["files"]])])
    # against its own next_world_xyz, and against the tracks seeded on that frame
    assert any(p.field == "layers.npz:dynamic" and "next_world_xyz" in p.message for p in problems)
    assert any(p.message.startswith("step to the next frame disagrees") for p in problems)


def test_clip_with_wrong_layer_index_is_named(clip, tmp_path):
    files = dict(clip["files"])
    tr = dict(clip["tracks"])
    tr["layer_index"] = tr["layer_index"].copy()
    tr["layer_index"][0, 0] += 1
    files["tracks.npz"] = encode_npz(tr)
    problems = wi.validate([_write(tmp_path / "c.tar", [files])])
    assert [(p.field, p.message.split(" at ")[0]) for p in problems] == [
        ("tracks.npz:layer_index", "at the query frame != query_layer")
    ]


# --------------------------------------------------------------------------------- pictures and PLY


def test_contact_sheets(data, clip, tmp_path, capsys):
    out = tmp_path / "sheets"
    assert main(["inspect", str(data["root"]), "--show", "2", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == ["nested_v0000", "nested_v0001"]
    panels = 1 + K + 4  # rgb, K depths, normals, entering, exiting, layer count: 2 rows of 4 at 80 dpi
    with Image.open(pngs[0]) as im:
        assert im.size == (4 * 3.2 * 80, -(-panels // 4) * 3.0 * 80)
        assert np.asarray(im.convert("L")).std() > 10  # something was drawn
    assert main(["inspect", str(clip["path"]), "--show", "nested_c0000_tracks", "--out", str(out)]) == 0
    with Image.open(out / "nested_c0000_tracks.png") as im:  # tracks by layer, layer shares, motion, coverage
        assert im.size == (4 * 3.2 * 80, 3.0 * 80)
    assert main(["inspect", str(clip["path"]), "--show", "no_such_key", "--out", str(out)]) == 1
    assert "no sample with key no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize("frame,colour", [("camera", "layer"), ("world", "image")])
def test_export_ply_reads_back_in_open3d(data, tmp_path, frame, colour):
    import open3d as o3d

    key = "nested_v0001"
    r = data["raw"][key]
    n = wi.export_ply(_sample(data, key), tmp_path / "p.ply", frame=frame, colour=colour)
    pc = o3d.io.read_point_cloud(str(tmp_path / "p.ply"))
    hits = r["hits"]
    assert n == len(pc.points) == int(hits.valid.sum())
    k, v, u = np.nonzero(hits.valid)
    want = hits.xyz[k, v, u].astype(np.float64)
    if frame == "world":
        want = want @ r["camera"].cam_to_world[:3, :3].T + r["camera"].cam_to_world[:3, 3]
    np.testing.assert_allclose(np.asarray(pc.points), want, atol=1e-5)
    colours = np.round(np.asarray(pc.colors) * 255).astype(int)
    if colour == "image":
        np.testing.assert_array_equal(colours, r["rgb"][v, u])
    else:
        assert len(np.unique(colours, axis=0)) == len(np.unique(k))  # one colour per layer


def test_cli_export_ply_and_clip_points(data, clip, tmp_path):
    out = tmp_path / "ply"
    assert main(["inspect", str(data["shards"][1]), "--export-ply", str(out), "--ply-frame", "world"]) == 0
    assert [p.name for p in out.iterdir()] == ["torus_v0000.ply"]
    s = next(x for x in wi.read_samples([clip["path"]]) if x.is_clip)
    assert wi.export_ply(s, out / "clip.ply", frame="world") == len(clip["tracks"]["query_layer"])
    xyz, _ = wi.layered_points(_sample(data, "torus_v0000"))
    np.testing.assert_allclose(
        xyz,
        depth_to_xyz(data["raw"]["torus_v0000"]["hits"].depth, data["raw"]["torus_v0000"]["camera"].K)[
            data["raw"]["torus_v0000"]["hits"].valid
        ],
    )


# ----------------------------------------------------------------------------------- 3D viewer (Rerun)


def _rrd_rows(path: Path) -> dict[str, dict]:
    """A .rrd file read back with rerun's own chunk reader: entity path -> {frame (None: static) -> {component
    (e.g. ``Points3D:positions``) -> value}}, one entry per logged row."""
    from rerun.chunk import RrdReader

    rows: dict[str, dict] = {}
    for chunk in RrdReader(path).stream():
        batch = chunk.to_record_batch()
        cols = {c: batch.column(c).to_pylist() for c in batch.schema.names if ":" in c or c == "frame"}
        frames = cols.pop("frame", [None] * chunk.num_rows)
        for i in range(chunk.num_rows):
            rows.setdefault(chunk.entity_path, {})[frames[i]] = {c: v[i] for c, v in cols.items() if ":" in c}
    return rows


def _view_entities(root: str, k: int) -> set[str]:
    return {root, f"{root}/meta", f"{root}/camera", f"{root}/camera/image", f"{root}/camera/image/rgb",
            *(f"{root}/camera/layers/{i}" for i in range(k))}


def _check_logged_view(row: dict, layers: dict, cam: Camera, hits, rgb: np.ndarray) -> None:
    """One logged view (static or one frame of a clip) against the caster's own arrays."""
    from rerun.encodings import ViewDir

    tf, pin = row["camera"], row["camera/image"]
    np.testing.assert_allclose(np.reshape(tf["Transform3D:mat3x3"], (3, 3)).T, cam.cam_to_world[:3, :3], atol=1e-6)
    np.testing.assert_allclose(tf["Transform3D:translation"][0], cam.center, atol=1e-6)
    np.testing.assert_allclose(np.reshape(pin["Pinhole:image_from_camera"], (3, 3)).T, cam.K, rtol=1e-6)
    assert pin["Pinhole:resolution"] == [[W, H]]
    assert [ViewDir(x).name for x in pin["Pinhole:camera_xyz"][0]] == ["Right", "Down", "Forward"]  # OpenCV
    np.testing.assert_array_equal(np.frombuffer(bytes(row["camera/image/rgb"]["Image:buffer"][0]), np.uint8),
                                  rgb.ravel())
    colours = set()
    for k in range(K):
        got = np.asarray(layers[k]["Points3D:positions"], np.float64).reshape(-1, 3)
        assert len(got) == int(hits.valid[k].sum())  # every hit of layer k, nothing else
        np.testing.assert_allclose(got, hits.xyz[k][hits.valid[k]], atol=1e-5)
        colours |= set(layers[k]["Points3D:colors"])
    assert len(colours) == K  # one colour per layer


def test_rerun_recording_reads_back(data, clip, tmp_path, capsys):
    """A view and a clip with its frames, written by the CLI and read back with rerun's chunk reader: the
    entities, every layer's points against the caster's arrays, cameras, images and the track lines."""
    from wt_datagen.inspect.viewer import TRAIL_FRAMES

    out = tmp_path / "v.rrd"
    argv = ["inspect", str(data["shards"][0]), str(clip["full_path"]), "--show", "nested_v0001",
            "nested_c0000_tracks", "--out", str(tmp_path / "sheets"), "--rerun", str(out)]
    assert main(argv) == 0
    assert f"open it with: rerun {out}" in capsys.readouterr().err
    rows = _rrd_rows(out)
    view, tr = "/nested_v0001", "/nested_c0000_tracks"
    tracks_entities = {f"{tr}/tracks/{n}" for n in ("visible", "hidden", "outside", "points")}
    assert set(rows) - {"/__properties"} == _view_entities(view, K) | _view_entities(tr, K) | tracks_entities

    # the static view: logged once, static
    r = data["raw"]["nested_v0001"]
    assert all(set(rows[e]) == {None} for e in _view_entities(view, K))
    _check_logged_view({e[len(view) + 1:]: rows[e][None] for e in _view_entities(view, K) if e != view},
                       {k: rows[f"{view}/camera/layers/{k}"][None] for k in range(K)}, r["camera"], r["hits"], r["rgb"])

    # the clip: every frame on the frame timeline
    frames, tracks = clip["frames"], clip["tracks"]
    T = len(frames)
    for e in _view_entities(tr, K) - {tr, f"{tr}/meta"} | tracks_entities:
        assert set(rows[e]) == set(range(T)), e
    for f in frames:
        t = f.t
        _check_logged_view({e[len(tr) + 1:]: rows[e][t] for e in _view_entities(tr, K) if e not in (tr, f"{tr}/meta")},
                           {k: rows[f"{tr}/camera/layers/{k}"][t] for k in range(K)}, f.camera, f.hits, _shade(f.hits))
        steps = np.arange(max(1, t - TRAIL_FRAMES + 1), t + 1)  # segments ending at these frames
        li, wx = tracks["layer_index"], tracks["world_xyz"].astype(np.float64)
        for name, state in (("visible", li[steps] == 0), ("hidden", li[steps] > 0), ("outside", li[steps] < 0)):
            strips = np.asarray(rows[f"{tr}/tracks/{name}"][t]["LineStrips3D:strips"], np.float64).reshape(-1, 2, 3)
            s, n = np.nonzero(state)
            assert len(strips) == len(s)
            np.testing.assert_allclose(strips[:, 0], wx[steps[s] - 1, n], atol=1e-6)
            np.testing.assert_allclose(strips[:, 1], wx[steps[s], n], atol=1e-6)
        heads = rows[f"{tr}/tracks/points"][t]
        np.testing.assert_allclose(np.reshape(heads["Points3D:positions"], (-1, 3)), wx[t], atol=1e-6)
        assert len(set(heads["Points3D:colors"])) == len(np.unique(np.sign(li[t])))  # one colour per state
    assert (tracks["layer_index"][1:] > 0).any() and (tracks["layer_index"][1:] == 0).any()  # both drawn
    from rerun.chunk import RrdReader  # the "time" timeline: each frame's timestamp, in nanoseconds

    times = {}
    for chunk in RrdReader(out).stream():
        if chunk.entity_path == f"{tr}/tracks/points":
            b = chunk.to_record_batch()
            times.update(zip(b.column("frame").to_pylist(), b.column("time").cast("int64").to_pylist()))
    assert times == {f.t: round(f.timestamp * 1e9) for f in frames}


@pytest.mark.parametrize("colour", ["facing", "normal"])
def test_rerun_colours(data, tmp_path, colour):
    from wt_datagen.inspect.viewer import ENTERING, EXITING, write_rrd

    key = "nested_v0002"
    hits = data["raw"][key]["hits"]
    rec = write_rrd([_sample(data, key)], tmp_path / "c.rrd", colour=colour)
    assert rec.keys == [key] and rec.points == {key: int(hits.valid.sum())} and rec.skipped == []
    rows = _rrd_rows(tmp_path / "c.rrd")
    for k in range(K):
        rgba = np.asarray(rows[f"/{key}/camera/layers/{k}"][None]["Points3D:colors"], np.uint32)
        rgb = np.stack([(rgba >> 24) & 255, (rgba >> 16) & 255, (rgba >> 8) & 255], -1)  # packed RGBA
        if colour == "facing":
            entering = hits.front_facing[k][hits.valid[k]]
            assert (rgb == ENTERING).all(-1).sum() == entering.sum()
            assert (rgb == EXITING).all(-1).sum() == (~entering).sum()
        else:
            want = (hits.normal[k][hits.valid[k]].astype(np.float64) + 1) * 127.5
            assert np.abs(rgb - want).max() <= 0.5 + 127.5 * 2.0**-11  # rounded; float16 storage


def test_rerun_missing_is_one_line_before_any_work(data, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rerun", None)  # as if rerun-sdk were not installed: import fails
    out = tmp_path / "v.rrd"
    assert main(["inspect", str(data["root"]), "--rerun", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and not out.exists()
    assert len(cap.err.strip().splitlines()) == 1 and "world-tracing[rerun]" in cap.err


# ------------------------------------------------------------------------------------------- progress


def test_progress_is_plain_lines_off_a_terminal(data):
    """stderr piped (not a terminal): progress as plain lines, no carriage return; stdout the JSON only."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "wt_datagen.cli", "inspect", *map(str, data["shards"]), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "inspect: 2/2 shard (100%)" in proc.stderr
    assert json.loads(proc.stdout) == wi.summarise(data["shards"])
