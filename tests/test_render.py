"""The render pipeline: views, sample encoding, shard journal, and `wt-datagen render` end to end.

The end-to-end checks read the shards back with plain `webdataset` and its default decoders, and check the
geometry against the asset meshes themselves (each valid hit lies on the face it names, and projects back
onto its own pixel centre).
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds

from tests.waiting import wait_while_running
from wt_datagen.camera import Camera
from wt_datagen.cli import main
from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.inputs.assets import load_asset
from wt_datagen.inputs.builtin import make_builtin_assets
from wt_datagen.pipeline.cameras import view_camera
from wt_datagen.pipeline.config import CameraConfig
from wt_datagen.pipeline.shards import JOURNAL, ItemStatus, ResumeError, ShardSet
from wt_datagen.schema import decode_sample, encode_npz, encode_sample, sample_key

ROOT = Path(__file__).resolve().parents[1]
FILES = {"rgb.png", "layers.npz", "camera.json", "meta.json"}
META = {"schema_version", "asset_id", "asset_path", "asset_sha256", "asset_to_world", "config_name",
        "config_hash", "seed", "view_index", "num_layers", "instance_names", "version",
        "image"}  # how the image was made: renderer, lighting (issue 14)
LAYERS = {"depth": np.float32, "valid": np.bool_, "normal": np.float16, "front_facing": np.bool_,
          "face_id": np.int32, "instance_id": np.int32, "num_hits": np.int32}

# -- views ---------------------------------------------------------------------------------------------


def test_views_are_a_pure_function_of_seed_item_and_index():
    cfg = CameraConfig()
    bounds = np.array([[-0.5] * 3, [0.5] * 3])
    a = view_camera(cfg, 3, "mug", 5, bounds, 32)
    assert np.array_equal(a.world_to_cam, view_camera(cfg, 3, "mug", 5, bounds, 32).world_to_cam)
    for other in [(4, "mug", 5), (3, "cup", 5), (3, "mug", 6)]:
        assert not np.allclose(a.world_to_cam, view_camera(cfg, *other, bounds, 32).world_to_cam)


def test_object_cameras_sit_on_the_shell_and_look_at_the_box():
    cfg = CameraConfig(radius=(2.0, 3.0), elevation_deg=(10.0, 50.0), target_jitter=0.05)
    for v in range(50):
        cam = view_camera(cfg, 0, "a", v, np.zeros((2, 3)), 16)
        c = cam.center
        assert 2.0 <= np.linalg.norm(c) <= 3.0
        assert 10 - 1e-9 <= np.degrees(np.arcsin(c[1] / np.linalg.norm(c))) <= 50 + 1e-9
        # the optical axis passes within the jitter box of the origin
        axis = cam.rotation[2]
        assert np.linalg.norm(np.cross(axis, -c)) <= 0.05 * np.sqrt(3) + 1e-9
        fov = 2 * np.degrees(np.arctan(8 / cam.K[1, 1]))
        assert 35 - 1e-6 <= fov <= 55 + 1e-6


def test_scene_cameras_inside_and_around():
    bounds = np.array([[0.0, 0.0, 0.0], [10.0, 3.0, 6.0]])
    inside = CameraConfig(mode="scene", inside_fraction=1.0, eye_height=(0.4, 0.6), pitch_deg=(-5.0, 5.0))
    for v in range(30):
        c = view_camera(inside, 1, "room", v, bounds, 16).center
        assert (c > bounds[0]).all() and (c < bounds[1]).all() and 1.2 - 1e-9 <= c[1] <= 1.8 + 1e-9
    around = CameraConfig(mode="scene", inside_fraction=0.0, radius_scale=(1.2, 1.5))
    half_diag = np.linalg.norm(bounds[1] - bounds[0]) / 2
    for v in range(30):
        d = np.linalg.norm(view_camera(around, 1, "room", v, bounds, 16).center - bounds.mean(0))
        assert 1.2 * half_diag - 1e-9 <= d <= 1.5 * half_diag + 1e-9


# -- samples -------------------------------------------------------------------------------------------


def test_npz_reads_back_with_numpy_and_zipfile():
    rng = np.random.default_rng(0)
    depth = np.where(rng.random((3, 40, 50)) < 0.3, rng.random((3, 40, 50)), 0).astype(np.float32)
    arrays = {"depth": depth, "valid": depth > 0, "face_id": np.where(depth > 0, 7, -1).astype(np.int32),
              "normal": np.zeros((3, 40, 50, 3), np.float16), "empty": np.zeros((0, 2), np.int32),
              "scalar": np.array(3.5)}
    raw = sum(a.nbytes for a in arrays.values())
    for level in (0, 1, 3):
        data = encode_npz(arrays, level)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            assert z.files == list(arrays)
            for k, v in arrays.items():
                assert z[k].dtype == v.dtype and z[k].shape == v.shape and np.array_equal(z[k], v)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert zf.testzip() is None  # every member's CRC checks
        assert encode_npz(arrays, level) == data  # fixed timestamps: same arrays, same bytes
        assert len(data) < raw / 2


def test_sample_round_trip():
    cam = Camera.look_at((0, 0, 3), (0, 0, 0), width=24, height=16)
    hits = LayeredRaycaster(trimesh.creation.icosphere()).cast(cam, 4)
    rgb = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    sample = encode_sample("ico_v0003", rgb, hits, cam, {"view_index": 3})
    assert set(sample) == {"__key__"} | FILES and all(isinstance(v, bytes) for k, v in sample.items() if k != "__key__")
    back = decode_sample(sample)
    assert back["__key__"] == "ico_v0003" and np.array_equal(back["rgb.png"], rgb)
    assert back["meta.json"] == {"schema_version": 1, "view_index": 3}
    assert Camera.from_json(back["camera.json"]).world_to_cam.tolist() == cam.world_to_cam.tolist()
    for name, dtype in LAYERS.items():
        assert np.array_equal(back["layers.npz"][name], getattr(hits, name).astype(dtype))
    assert hits.valid[1].any() and not hits.valid[2].any()  # a sphere: two crossings


def test_decode_refuses_pickled_arrays():
    buf = io.BytesIO()
    np.savez(buf, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        decode_sample({"__key__": "k", "layers.npz": buf.getvalue()})


def test_sample_key_has_no_dots():
    assert sample_key("mug__mug_obj", 7) == "mug__mug_obj_v0007"
    with pytest.raises(ValueError, match="dot"):
        sample_key("mug.obj", 0)


# -- shard journal -------------------------------------------------------------------------------------


def _fake_samples(name: str, n: int) -> list[dict]:
    """``n`` samples of 10 bytes of payload each."""
    return [{"__key__": f"{name}_v{i:04d}", "meta.json": json.dumps({"i": i}).encode().ljust(10)} for i in range(n)]


def _keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return keys


def test_shard_set_recovers_from_every_crash_point(tmp_path):
    out = tmp_path / "out"
    s = ShardSet(out, max_samples=4, max_bytes=10**9, header={"h": 1})
    assert s.open() == {}
    s.add(ItemStatus("a"), _fake_samples("a", 3))
    s.add(ItemStatus("b"), _fake_samples("b", 3))  # rolls: shard 0 holds a only
    s.record(ItemStatus("bad", status="skipped", reason="broken"))
    s.record(ItemStatus("oops", status="failed", reason="bug"))
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000000.tar"]
    assert (out / "shard-000001.tar.tmp").exists()  # b is written but not done
    # a crash now: s is abandoned (its tar stream must not write an end marker when collected) and its
    # writer lock goes with its process
    s._writer.tarstream.fileobj.closed = True
    s.release()
    # also fake a shard renamed but never journaled, and a torn journal line
    (out / "shard-000007.tar").write_bytes(b"orphan")
    with open(out / JOURNAL, "a") as f:
        f.write('{"shard": {"name": "shard-0000')
    s2 = ShardSet(out, max_samples=4, max_bytes=10**9, header={"h": 1})
    done = s2.open()
    assert sorted(done) == ["a", "bad"] and done["a"].shard == "shard-000000.tar"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shard")) == ["shard-000000.tar"]
    s2.add(ItemStatus("b"), _fake_samples("b", 3))
    assert s2.close(["a", "b", "bad"])
    assert _keys(out) == [f"a_v{i:04d}" for i in range(3)] + [f"b_v{i:04d}" for i in range(3)]
    # the journal never reuses a shard name
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000008.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["samples"] == 6
    assert [sh["samples"] for sh in manifest["shards"]] == [3, 3]
    assert all(sh["bytes"] == (out / sh["name"]).stat().st_size for sh in manifest["shards"])
    with pytest.raises(ResumeError, match="--overwrite"):
        ShardSet(out, 4, 10**9, header={"h": 2}).open()
    (out / JOURNAL).rename(out / "journal.bak")  # shards without a journal are never deleted silently
    with pytest.raises(ResumeError, match="no journal.jsonl"):
        ShardSet(out, 4, 10**9, header={"h": 1}).open()
    assert len(list(out.glob("shard-*.tar"))) == 2
    assert ShardSet(out, 4, 10**9, header={"h": 2}).open(overwrite=True) == {}
    assert not list(out.glob("shard-*"))


def test_item_never_spans_shards_and_size_limit_rolls(tmp_path):
    s = ShardSet(tmp_path, max_samples=100, max_bytes=120, header={})
    s.open()
    for name in "abc":
        s.add(ItemStatus(name), _fake_samples(name, 5))  # 50 bytes each
    s.add(ItemStatus("big"), _fake_samples("big", 30))  # over the limit alone: a shard of its own
    s.close([])
    assert [sh.items for sh in s.shards] == [["a", "b"], ["c"], ["big"]]


# -- end to end ----------------------------------------------------------------------------------------

BROKEN = ["broken/corrupt.glb", "broken/nan.obj", "broken/empty.obj", "broken/huge.ply"]
WARNED = "broken/notex/notex.obj"  # a missing texture: rendered untextured, with a warning


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    make_builtin_assets(root)
    bad = root / "broken"
    (bad / "notex").mkdir(parents=True)
    (bad / "corrupt.glb").write_bytes(b"glTF\x02\x00\x00\x00 not really")
    (bad / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (bad / "empty.obj").write_text("# no faces\nv 0 0 0\n")
    (bad / "notex" / "notex.mtl").write_text("newmtl m\nmap_Kd missing.png\n")
    tri = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
    (bad / "notex" / "notex.obj").write_text("mtllib notex.mtl\nusemtl m\n" + tri)
    trimesh.creation.icosphere(subdivisions=6).export(bad / "huge.ply")  # 81920 faces > cap
    return root


@pytest.fixture(scope="module")
def good_assets(assets, tmp_path_factory) -> Path:
    good = tmp_path_factory.mktemp("good")
    shutil.copytree(assets, good, ignore=shutil.ignore_patterns("broken"), dirs_exist_ok=True)
    return good


def _config(tmp_path: Path, **extra) -> Path:
    cfg = {"views": 3, "resolution": 40, "layers": 4, "seed": 7, "assets": {"max_faces": 40000},
           "shards": {"max_samples": 7}, **extra}
    path = tmp_path / "test.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _render(assets: Path, out: Path, config: Path, *flags: str) -> int:
    return main(["render", str(assets), "--config", str(config), "--out", str(out), *flags])


def _read(out: Path) -> dict[str, dict]:
    """Every sample, read with plain webdataset and its default decoders, by key (duplicates fail)."""
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        assert s["__key__"] not in samples, f"duplicate sample {s['__key__']}"
        samples[s["__key__"]] = s
    return samples


@pytest.fixture(scope="module")
def rendered(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    out = tmp / "out"
    code = _render(assets, out, _config(tmp))
    return code, out, _read(out)


def test_render_exit_code_status_and_manifest(rendered, assets):
    code, out, samples = rendered
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    status = manifest["assets"]
    assert sorted(p for p, s in status.items() if s["status"] == "skipped") == sorted(BROKEN)
    assert sum(s["status"] == "rendered" for s in status.values()) == 7
    assert all(status[p]["reason"] for p in BROKEN)
    assert "too many triangles" in status["broken/huge.ply"]["reason"]
    assert status[WARNED]["status"] == "rendered" and "missing.png" in status[WARNED]["warnings"][0]
    assert manifest["totals"]["warnings"] == 1
    assert manifest["complete"] and manifest["config"]["views"] == 3
    tars = sorted(p.name for p in out.glob("shard-*.tar"))
    assert [s["name"] for s in manifest["shards"]] == tars and not list(out.glob("*.tmp"))
    assert manifest["totals"]["samples"] == len(samples) == 21
    for sh in manifest["shards"]:
        assert sh["bytes"] == (out / sh["name"]).stat().st_size
        keys = _keys_of(out / sh["name"])
        assert len(keys) == sh["samples"]
        # shards roll between assets: at most max_samples unless one asset alone is bigger
        assert sh["samples"] <= 7 or len(sh["items"]) == 1
        assert {k.rsplit("_v", 1)[0] for k in keys} == {status[p]["item_id"] for p in sh["items"]}
    tsv = (out / "status.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 11 and all(len(line.split("\t")) == 6 for line in tsv)
    assert any(line.startswith(WARNED) and "missing texture file missing.png" in line.split("\t")[5] for line in tsv)


def _keys_of(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})


def test_every_sample_follows_the_schema(rendered, assets):
    _, out, samples = rendered
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {f"{s['item_id']}_v{v:04d}" for s in manifest["assets"].values() if s["status"] == "rendered"
                for v in range(3)}
    assert set(samples) == expected
    for key, s in samples.items():
        assert "." not in key and set(s) - {"__key__", "__url__", "__local_path__"} == FILES
        meta, cam = s["meta.json"], s["camera.json"]
        assert set(meta) == META and meta["schema_version"] == 1
        assert key == f"{meta['asset_id']}_v{meta['view_index']:04d}"
        assert meta["asset_sha256"] == hashlib.sha256((assets / meta["asset_path"]).read_bytes()).hexdigest()
        assert meta["config_hash"] == manifest["config_hash"]
        assert meta["num_layers"] == 4 and meta["seed"] == 7
        Camera.from_json(cam)  # K upper triangular, world_to_cam rigid
        assert (cam["width"], cam["height"]) == (40, 40)
        rgb, L = s["rgb.png"], s["layers.npz"]
        assert rgb.shape == (40, 40, 3) and rgb.dtype == np.uint8
        assert set(L) == set(LAYERS) and all(L[k].dtype == t for k, t in LAYERS.items())
        valid, depth = L["valid"], L["depth"]
        assert valid.shape == depth.shape == (4, 40, 40) and L["normal"].shape == (4, 40, 40, 3)
        assert L["num_hits"].shape == (40, 40)
        assert not (valid[1:] & ~valid[:-1]).any(), "validity not monotone along K"
        both = valid[1:] & valid[:-1]
        assert (depth[1:][both] >= depth[:-1][both]).all(), "depth decreases along K"
        assert (depth[valid] > 0).all() and (depth[~valid] == 0).all()
        assert (L["face_id"][~valid] == -1).all() and (L["face_id"][valid] >= 0).all()
        assert (L["instance_id"][valid] < len(meta["instance_names"])).all()
        assert np.array_equal(valid.sum(0), np.minimum(L["num_hits"], 4))
        n = np.linalg.norm(L["normal"].astype(np.float32), axis=-1)
        assert np.allclose(n[valid], 1, atol=2e-3) and (n[~valid] == 0).all()
        assert valid[0].any(), f"{key}: the asset is out of view"


def test_hits_lie_on_their_faces_and_reproject_to_pixel_centres(rendered, assets):
    _, _, samples = rendered
    meshes = {}
    for key, s in samples.items():
        meta, L = s["meta.json"], s["layers.npz"]
        cam = Camera.from_json(s["camera.json"])
        if meta["asset_path"] not in meshes:  # the asset, loaded anew and moved by the stored normalisation
            asset = load_asset(assets / meta["asset_path"], assets)
            assert asset.names == meta["instance_names"]
            T = meta["asset_to_world"]
            meshes[meta["asset_path"]] = [m.copy().apply_transform(T) for m in asset.meshes]
        valid = L["valid"]
        k, v, u = np.nonzero(valid)
        pix = np.stack([u + 0.5, v + 0.5, np.ones_like(u, dtype=float)], 1)
        xyz_cam = L["depth"][valid][:, None] * (pix @ np.linalg.inv(cam.K).T)
        xyz = (xyz_cam - cam.world_to_cam[:3, 3]) @ cam.rotation  # to world
        # reprojection through camera.json lands on the pixel centre
        assert np.abs(cam.project(cam.world_to_camera(xyz)) - pix[:, :2]).max() < 1e-3
        # the point lies on the triangle its (instance_id, face_id) names
        inst, face = L["instance_id"][valid], L["face_id"][valid]
        tri = np.empty((len(face), 3, 3))
        for i in np.unique(inst):
            m = meshes[meta["asset_path"]][i]
            tri[inst == i] = m.vertices[m.faces[face[inst == i]]]
        bary = trimesh.triangles.points_to_barycentric(tri, xyz)
        assert (bary > -1e-3).all(), f"{key}: a hit lies outside its face"
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        assert np.abs(np.einsum("ij,ij->i", xyz - tri[:, 0], normal)).max() < 1e-4, f"{key}: off its face"


def test_image_lines_up_with_layer_zero(rendered):
    _, _, samples = rendered
    inter = union = 0
    for s in samples.values():
        fg_img = s["rgb.png"].any(-1)  # black background
        fg_geo = s["layers.npz"]["valid"][0]
        inter += (fg_img & fg_geo).sum()
        union += (fg_img | fg_geo).sum()
    assert inter / union >= 0.99


def test_rerun_is_a_no_op_and_strict_reports_skips(rendered, assets, tmp_path, capsys):
    _, out, _ = rendered
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    config = _config(out.parent)
    assert _render(assets, out, config, "--strict") == 3  # nothing new; strict: there were skips
    assert "11 of 11 assets already done" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before
    # other settings in the same folder: refused with one line, nothing lost
    assert _render(assets, out, config, "--views", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before


def test_no_asset_rendered_exits_non_zero(assets, tmp_path, capsys):
    only_bad = tmp_path / "bad"
    shutil.copytree(assets / "broken", only_bad)
    config = _config(tmp_path, assets={"max_faces": 40000, "missing_texture": "skip"})
    assert _render(only_bad, tmp_path / "out", config) == 1
    assert "0 assets rendered, 5 skipped" in capsys.readouterr().out
    assert _render(tmp_path / "nowhere", tmp_path / "out2", _config(tmp_path)) == 2
    assert "nowhere" in capsys.readouterr().err


def test_overwrite_starts_afresh(assets, tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path)
    assert _render(assets, out, config, "--limit", "2", "--views", "1") == 0
    assert _render(assets, out, config, "--limit", "1", "--views", "2", "--overwrite") == 0
    assert sorted(_read(out)) == ["box_in_box__box_in_box_glb_v0000", "box_in_box__box_in_box_glb_v0001"]


def test_without_opengl_the_image_falls_back_to_ray_tracing(good_assets, tmp_path, monkeypatch):
    import wt_datagen.image.rgb as image

    real = image.render_rgb

    def no_gl(meshes, camera, mode="pyrender", **kw):
        if mode == "pyrender":
            raise image.GLUnavailable("no offscreen OpenGL context (test)")
        return real(meshes, camera, mode=mode, **kw)

    monkeypatch.setattr(image, "render_rgb", no_gl)
    monkeypatch.setattr(image, "_GL_FAILED", False)
    out = tmp_path / "out"
    assert _render(good_assets, out, _config(tmp_path), "--limit", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["image"] for s in manifest["assets"].values()] == ["raytrace", "raytrace"]
    for s in _read(out).values():  # a shading of layer 0: the masks agree exactly
        assert np.array_equal(s["rgb.png"].any(-1), s["layers.npz"]["valid"][0])
    monkeypatch.setattr(image, "_GL_FAILED", False)
    config = _config(tmp_path, image={"fallback": "none"})
    assert _render(good_assets, tmp_path / "none", config, "--limit", "1") == 1
    status = json.loads((tmp_path / "none" / "manifest.json").read_text())["assets"]
    assert "OpenGL unavailable" in next(iter(status.values()))["reason"]


def test_same_samples_bit_for_bit_with_one_or_two_workers(good_assets, tmp_path):
    good = good_assets
    config = _config(tmp_path)
    a, b = tmp_path / "w1", tmp_path / "w2"
    assert _render(good, a, config, "--limit", "4", "--workers", "1") == 0
    assert _render(good, b, config, "--limit", "4", "--workers", "2") == 0
    sa, sb = _read(a), _read(b)
    assert sorted(sa) == sorted(sb) and len(sa) == 12
    for key in sa:
        assert np.array_equal(sa[key]["rgb.png"], sb[key]["rgb.png"])
        assert sa[key]["camera.json"] == sb[key]["camera.json"]
        for name, arr in sa[key]["layers.npz"].items():
            assert np.array_equal(arr, sb[key]["layers.npz"][name]), f"{key}: {name} differs"
    # results are written in plan order, so the shards themselves are identical
    for tar in a.glob("shard-*.tar"):
        assert tar.read_bytes() == (b / tar.name).read_bytes()


def test_resume_after_sigkill_gives_every_sample_exactly_once(assets, good_assets, tmp_path):
    many = tmp_path / "many"
    for i in range(4):  # 24 good assets, a few seconds of work
        shutil.copytree(good_assets, many / f"copy{i}")
    config = _config(tmp_path, shards={"max_samples": 3})  # one asset per shard: many commit points
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wt_datagen.cli", "render", str(many), "--config", str(config),
           "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "osmesa")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_while_running(proc, lambda: len(list(out.glob("shard-*.tar"))) >= 3, limit_s=120)
    assert proc.poll() is None, "the render ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-run
    proc.wait()
    first = len(list(out.glob("shard-*.tar")))
    assert 3 <= first < 24
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout and "0 failed, 0 not done" in done.stdout, done.stdout
    samples = _read(out)  # fails on a duplicate key
    ids = {f"copy{i}__{p.parent.name}__{p.name.replace('.', '_')}" for i in range(4)
           for p in (assets).glob("*/*.*") if p.parent.name != "broken" and p.suffix in (".glb", ".obj")}
    assert set(samples) == {f"{a}_v{v:04d}" for a in ids for v in range(3)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["samples"] == 72 and not list(out.glob("*.tmp"))
