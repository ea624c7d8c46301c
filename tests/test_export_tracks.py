"""`wt-datagen export-tracks`: TAPVid-3D and PointOdyssey files read back with plain numpy and checked against
the tracks in the shards (read with plain webdataset), through the relations those formats define
(u = fx X / Z + cx on pixel-centre raster coordinates, world-to-camera extrinsics)."""

from __future__ import annotations

import glob
import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from wt_datagen import inspect as wi
from wt_datagen.cli import main
from wt_datagen.inputs.builtin import make_builtin_sequences

T = 5


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The built-in sequences rendered by `wt-datagen render` (32x32, K=4, one 5-frame clip each, flow on), and
    their samples as plain webdataset decodes them."""
    root = tmp_path_factory.mktemp("export")
    make_builtin_sequences(root / "assets", num_frames=8)
    config = root / "clips.yaml"
    config.write_text("resolution: 32\nlayers: 4\nimage: {renderer: raytrace}\n"
                      f"sequences: {{clip_length: {T}, query_stride: 4, scene_flow: true, trajectory: orbit}}\n")
    assert main(["render", str(root / "assets"), "--config", str(config), "--out", str(root / "shards")]) == 0
    urls = sorted(glob.glob(str(root / "shards" / "*.tar")))
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    clips = {k.removesuffix("_tracks"): s for k, s in samples.items() if k.endswith("_tracks")}
    assert len(clips) == 2
    return {"root": root, "shards": root / "shards", "samples": samples, "clips": clips}


def frames_of(rendered, prefix):
    return sorted((s for k, s in rendered["samples"].items() if k.startswith(prefix + "_f")),
                  key=lambda s: s["meta.json"]["view_index"])


def test_rendered_clips_validate_with_their_motion_fields(rendered):
    assert wi.validate([rendered["shards"]]) == []  # frames against tracks: coverage, flow, dynamic
    for prefix, clip in rendered["clips"].items():
        tr = clip["tracks.npz"]
        assert tr["coverage"].shape == (T, 4) and np.nanmin(tr["coverage"][:, 0]) >= 0.95
        for f in frames_of(rendered, prefix):
            assert {"dynamic", "next_world_xyz"} <= set(f["layers.npz"])


def test_tapvid3d_reads_back_with_plain_numpy(rendered, tmp_path):
    out = tmp_path / "tapvid3d"
    assert main(["export-tracks", str(rendered["shards"]), "--format", "tapvid3d", "--out", str(out)]) == 0
    for prefix, clip in rendered["clips"].items():
        tr, cams = clip["tracks.npz"], clip["cameras.json"]["cameras"]
        with np.load(out / f"{prefix}.npz", allow_pickle=False) as d:  # no object array by default
            assert set(d.files) == {"tracks_XYZ", "visibility", "queries_xyt", "fx_fy_cx_cy", "extrinsics_w2c"}
            xyz, vis, q, (fx, fy, cx, cy), w2c = (d["tracks_XYZ"], d["visibility"], d["queries_xyt"],
                                                   d["fx_fy_cx_cy"], d["extrinsics_w2c"])
        N = tr["query_layer"].shape[0]
        assert xyz.shape == (T, N, 3) and vis.shape == (T, N) and vis.dtype == bool and q.shape == (N, 3)
        np.testing.assert_array_equal(xyz, tr["cam_xyz"])
        np.testing.assert_array_equal(vis, tr["layer_index"] == 0)
        np.testing.assert_array_equal(w2c, np.array([c["world_to_cam"] for c in cams]))
        # TAPVid-3D's pinhole on its raster coordinates lands on our uv; queries sit on their pixel centres
        front = xyz[..., 2] > 0
        u, v = fx * xyz[..., 0] / xyz[..., 2] + cx, fy * xyz[..., 1] / xyz[..., 2] + cy
        np.testing.assert_allclose(np.stack([u, v], -1)[front], tr["uv"][front], atol=1e-3)
        n = np.arange(N)
        np.testing.assert_allclose(q[:, :2], tr["uv"][tr["query_frame"], n], atol=1e-3)
        np.testing.assert_array_equal(q[:, 2], tr["query_frame"])
        world = np.concatenate([tr["world_xyz"], np.ones((T, N, 1))], -1)
        np.testing.assert_allclose(np.einsum("tij,tnj->tni", w2c, world)[..., :3], xyz, atol=1e-5)
        for t, f in enumerate(frames_of(rendered, prefix)):  # frames beside the npz: the rgb.png as written
            assert (out / prefix / f"{t:05d}.png").read_bytes() == f["rgb.png"]


def test_tapvid3d_jpeg_bytes_without_pickle_and_asset_units_undo_the_unit_box(rendered, tmp_path):
    out = tmp_path / "tapvid3d_jpeg"
    assert main(["export-tracks", str(rendered["shards"]), "--format", "tapvid3d", "--out", str(out),
                 "--images-jpeg-bytes", "--units", "asset"]) == 0
    prefix, clip = next(iter(rendered["clips"].items()))
    tr = clip["tracks.npz"]
    with np.load(out / f"{prefix}.npz", allow_pickle=False) as d:
        jpegs, xyz, w2c = d["images_jpeg_bytes"], d["tracks_XYZ"], d["extrinsics_w2c"]
    assert jpegs.shape == (T,) and not (tmp_path / "tapvid3d_jpeg" / prefix / "00000.jpg").exists()
    for t, (frame_bytes, f) in enumerate(zip(jpegs, frames_of(rendered, prefix))):
        # as TAPVid-3D's readers take a frame: its bytes, through np.frombuffer or io.BytesIO
        assert np.frombuffer(frame_bytes, np.uint8)[-2:].tolist() == [0xFF, 0xD9], t  # whole, EOI last
        with Image.open(io.BytesIO(frame_bytes)) as im, Image.open(io.BytesIO(f["rgb.png"])) as png:
            assert im.format == "JPEG" and im.size == (32, 32)
            err = np.abs(np.asarray(im.convert("RGB"), float) - np.asarray(png.convert("RGB"), float))
            assert err.mean() < 4, (t, err.mean())  # quality 95 of this very frame
    A = np.array(clip["meta.json"]["asset_to_world"])
    s = np.cbrt(np.linalg.det(A[:3, :3]))
    assert abs(s - 1) > 0.1  # the sequence really was scaled into the unit box
    np.testing.assert_allclose(xyz * s, tr["cam_xyz"], rtol=1e-5, atol=1e-6)
    asset = np.concatenate([tr["world_xyz"], np.ones(tr["world_xyz"].shape[:2] + (1,))], -1) @ np.linalg.inv(A).T
    np.testing.assert_allclose(np.einsum("tij,tnj->tni", w2c, asset)[..., :3], xyz, atol=1e-5)
    assert np.allclose(w2c[:, :3, :3] @ w2c[:, :3, :3].transpose(0, 2, 1), np.eye(3))  # still rigid


def test_pointodyssey_reads_back_with_plain_numpy(rendered, tmp_path):
    out = tmp_path / "po"
    assert main(["export-tracks", str(rendered["shards"]), "--format", "pointodyssey", "--out", str(out)]) == 0
    for prefix, clip in rendered["clips"].items():
        tr = clip["tracks.npz"]
        with np.load(out / prefix / "anno.npz", allow_pickle=False) as d:
            a = {k: d[k] for k in d.files}
        assert set(a) == {"trajs_2d", "trajs_3d", "visibs", "valids", "intrinsics", "extrinsics"}
        np.testing.assert_array_equal(a["trajs_3d"], tr["world_xyz"])
        np.testing.assert_array_equal(a["visibs"], tr["layer_index"] == 0)
        N = tr["query_layer"].shape[0]
        cam = np.einsum("tij,tnj->tni", a["extrinsics"].astype(np.float64),
                        np.concatenate([a["trajs_3d"], np.ones((T, N, 1))], -1))[..., :3]
        pix = np.einsum("tij,tnj->tni", a["intrinsics"].astype(np.float64), cam)
        ok = a["valids"]
        assert ok.any() and np.array_equal(ok, cam[..., 2] > 0)
        np.testing.assert_allclose((pix[..., :2] / pix[..., 2:])[ok], a["trajs_2d"][ok], atol=1e-3)
        rgbs = sorted((out / prefix / "rgbs").glob("rgb_*.jpg"))
        assert [p.name for p in rgbs] == [f"rgb_{t:05d}.jpg" for t in range(T)]


def test_export_errors_are_one_line_and_lose_nothing_else(rendered, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["export-tracks", str(rendered["shards"]), "--format", "pointodyssey", "--out", out,
                 "--images-jpeg-bytes"]) == 2
    assert main(["export-tracks", str(tmp_path / "none*.tar"), "--format", "tapvid3d", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--images-jpeg-bytes is a TAPVid-3D field" in err and "no shard matches" in err
    # a shard without one clip's frame 2: that clip is named, the other one is exported
    damaged = tmp_path / "damaged.tar"
    lost = next(iter(rendered["clips"])) + "_f"
    with wds.TarWriter(str(damaged)) as w:
        for url in sorted(glob.glob(str(rendered["shards"] / "*.tar"))):
            for s in wds.WebDataset(url, shardshuffle=False):
                frame = s["__key__"].startswith(lost) and b'"view_index": 2' in s["meta.json"]
                if not frame:
                    w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    written, problems = wi.export_tracks([damaged], "tapvid3d", tmp_path / "part")
    assert len(written) == 1 and len(problems) == 1 and "1 of 5 frames missing (first: 2)" in problems[0]
