"""Clip shards for the model tests.

``write_clip_shards``: hand-laid tars of clip frames (analytic sphere views, ``tests.model_shards``), tracks
samples and static views, in any order and split the test asks for, written with plain ``webdataset.TarWriter``
and ``np.savez`` in the README schema (no project encoder). ``render_builtin_clips``: the built-in dynamic
assets rendered by the real pipeline (``wt-datagen make-assets --sequences`` and ``wt-datagen render``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from tests.model_shards import sphere_view


def view_files(rng: np.random.Generator, key: str, size: int = 16, num_layers: int = 3,
               schema_version: int = 1) -> dict:
    """One layered view (a static view or a clip's frame, by its key) with an identity camera."""
    rgb, depth, valid, num_hits, K = sphere_view(rng, size, num_layers)
    png, npz = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    np.savez(npz, depth=depth, valid=valid, normal=np.zeros(depth.shape + (3,), np.float16), front_facing=valid,
             face_id=np.where(valid, 0, -1).astype(np.int32), instance_id=np.where(valid, 0, -1).astype(np.int32),
             num_hits=num_hits)
    cam = {"K": K.tolist(), "world_to_cam": np.eye(4).tolist(), "width": size, "height": size}
    meta = {"schema_version": schema_version, "asset_id": key.split("_")[0], "num_layers": num_layers}
    return {"__key__": key, "rgb.png": png.getvalue(), "layers.npz": npz.getvalue(),
            "camera.json": json.dumps(cam).encode(), "meta.json": json.dumps(meta).encode()}


def tracks_files(key: str, frames: list[int], size: int = 16, tracks: int = 5, seed: int = 0) -> dict:
    """A clip's tracks sample listing ``frames`` (random tracks; only the layout matters here)."""
    rng = np.random.default_rng(seed)
    T = len(frames)
    arrays = {"query_frame": np.zeros(tracks, np.int32), "query_layer": np.zeros(tracks, np.int32),
              "query_pixel": rng.integers(0, size, (tracks, 2)).astype(np.int32),
              "world_xyz": rng.normal(size=(T, tracks, 3)).astype(np.float32),
              "cam_xyz": rng.normal(size=(T, tracks, 3)).astype(np.float32),
              "uv": rng.uniform(0, size, (T, tracks, 2)).astype(np.float32),
              "layer_index": rng.integers(-1, 2, (T, tracks)).astype(np.int8),
              "frame_index": np.asarray(frames, np.int64)}
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    cam = {"K": [[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], "world_to_cam": np.eye(4).tolist(),
           "width": size, "height": size}
    cameras = {"sequence_id": key.rsplit("_c", 1)[0], "clip_index": 0, "trajectory": "static", "fps": 24,
               "frame_index": list(frames), "timestamp": [f / 24 for f in frames], "cameras": [cam] * T}
    return {"__key__": key, "tracks.npz": npz.getvalue(), "cameras.json": json.dumps(cameras).encode(),
            "meta.json": json.dumps({"schema_version": 1}).encode()}


def clip_files(rng: np.random.Generator, prefix: str, frames: list[int], size: int = 16, num_layers: int = 3,
               listed: list[int] | None = None) -> list[dict]:
    """A clip as the renderer writes it: its frames in order, then its tracks sample (listing ``listed``,
    by default the frames written)."""
    out = [view_files(rng, f"{prefix}_f{f:04d}", size, num_layers) for f in frames]
    return out + [tracks_files(f"{prefix}_tracks", frames if listed is None else listed, size)]


def write_clip_shards(out: str | Path, shards: list[list[dict]]) -> list[str]:
    """Each inner list of samples into its own tar ``shard-NNNNNN.tar``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, samples in enumerate(shards):
        path = out / f"shard-{i:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for s in samples:
                w.write(s)
        paths.append(str(path))
    return paths


def render_builtin_clips(tmp: Path, resolution: int = 64, clips: int = 2, clip_length: int = 8,
                         query_stride: int = 4, views: int = 1) -> str:
    """The built-in sequences (and ``views`` views of each static built-in) rendered by ``wt-datagen`` at
    ``resolution``, K = 4, ``clips`` clips of ``clip_length`` frames per sequence; returns the shard glob."""
    from wt_datagen.cli import main as datagen

    assert datagen(["make-assets", str(tmp / "assets"), "--sequences"]) == 0
    config = tmp / "clips.yaml"
    config.write_text(f"views: {views}\nresolution: {resolution}\nlayers: 4\nseed: 0\n"
                      "cameras: {mode: object, fov_deg: [40, 50], radius: [2.0, 2.6], elevation_deg: [-10, 45]}\n"
                      "shards: {max_samples: 16, max_megabytes: 64}\n"
                      f"sequences: {{clips: {clips}, clip_length: {clip_length}, query_stride: {query_stride}}}\n")
    assert datagen(["render", str(tmp / "assets"), "--config", str(config), "--out", str(tmp / "shards"),
                    "--workers", "1"]) == 0
    return str(tmp / "shards" / "*.tar")
