"""Small layered shards for the model tests, from analytic ray-sphere intersections (no caster needed).

Each view looks down +z (identity world_to_cam) at two spheres, one of which may sit inside the other, so
rays cross 0, 2 or 4 surfaces. Written with plain ``webdataset.TarWriter`` in the README schema.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def sphere_view(rng: np.random.Generator, size: int, num_layers: int):
    """(rgb (H,W,3) uint8, depth (K,H,W) float32, valid (K,H,W) bool, num_hits (H,W), K (3,3))."""
    f = size / (2 * np.tan(np.radians(25)))
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    u, v = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # (H,W,3), z = 1
    big_c = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(3.0, 4.0)])
    big_r = rng.uniform(0.8, 1.1)
    small_c = big_c + rng.uniform(-0.3, 0.3, 3)
    small_r = rng.uniform(0.25, 0.4)
    ts, ids = [], []
    for sid, (c, r) in enumerate([(big_c, big_r), (small_c, small_r)]):
        # |t d - c|^2 = r^2  ->  a t^2 - 2 b t + (|c|^2 - r^2) = 0
        a, b = (rays * rays).sum(-1), rays @ c
        disc = b * b - a * (c @ c - r * r)
        root = np.sqrt(np.maximum(disc, 0))
        for sign in (-1, 1):
            ts.append(np.where(disc > 0, (b + sign * root) / a, np.inf))
            ids.append(np.full((size, size), sid))
    t, sid = np.stack(ts), np.stack(ids)  # (4,H,W)
    order = np.argsort(t, axis=0)
    t, sid = np.take_along_axis(t, order, 0), np.take_along_axis(sid, order, 0)
    valid = np.isfinite(t)
    num_hits = valid.sum(0).astype(np.int32)
    depth = np.where(valid, t, 0.0)  # ray z component is 1, so t is the camera z
    pad = max(num_layers - 4, 0)
    depth = np.concatenate([depth, np.zeros((pad, size, size))])[:num_layers].astype(np.float32)
    valid = np.concatenate([valid, np.zeros((pad, size, size), bool)])[:num_layers]
    sid = np.concatenate([sid, np.zeros((pad, size, size), int)])[:num_layers]
    # Shade layer 0 by its normal's z and colour by sphere, on a grey background.
    p0 = depth[0, ..., None] * rays
    c0 = np.where(sid[0, ..., None] == 0, big_c, small_c)
    r0 = np.where(sid[0] == 0, big_r, small_r)[..., None]
    shade = np.clip(-((p0 - c0) / r0)[..., 2], 0.2, 1.0)[..., None]
    colour = np.where(sid[0, ..., None] == 0, [200, 80, 60], [60, 90, 220])
    rgb = np.where(valid[0, ..., None], shade * colour, 40).astype(np.uint8)
    return rgb, depth, valid, num_hits, K


def write_sphere_shards(out: str | Path, views: int = 8, shards: int = 2, size: int = 32, num_layers: int = 4,
                        seed: int = 0, schema_version: int = 1, with_tracks: bool = True, assets: int | None = None,
                        corrupt: tuple[int, ...] = ()) -> list[Path]:
    """Write ``views`` layered samples round-robin into ``shards`` tars (plus one clip-track sample per
    shard when ``with_tracks``, which the loader must skip). View i shows asset ``spheres{i % assets}`` (every
    view its own asset when ``assets`` is None); views in ``corrupt`` get a truncated layers.npz. Returns the
    shard paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [out / f"shard-{i:06d}.tar" for i in range(shards)]
    writers = [wds.TarWriter(str(p)) for p in paths]
    for i in range(views):
        rgb, depth, valid, num_hits, K = sphere_view(rng, size, num_layers)
        png, npz = io.BytesIO(), io.BytesIO()
        Image.fromarray(rgb).save(png, format="PNG")
        normal = np.zeros(depth.shape + (3,), np.float16)
        np.savez_compressed(npz, depth=depth, valid=valid, normal=normal, front_facing=valid,
                            face_id=np.where(valid, 0, -1).astype(np.int32),
                            instance_id=np.where(valid, 0, -1).astype(np.int32), num_hits=num_hits)
        cam = {"K": K.tolist(), "world_to_cam": np.eye(4).tolist(), "width": size, "height": size}
        meta = {"schema_version": schema_version, "asset_id": f"spheres{i % assets if assets else i}",
                "view_index": i, "num_layers": num_layers}
        layers = npz.getvalue()[:100] if i in corrupt else npz.getvalue()
        writers[i % shards].write({"__key__": f"spheres{i:04d}", "rgb.png": png.getvalue(),
                                   "layers.npz": layers, "camera.json": json.dumps(cam).encode(),
                                   "meta.json": json.dumps(meta).encode()})
    for j, w in enumerate(writers):
        if with_tracks:
            w.write({"__key__": f"clip{j:04d}", "tracks.npz": b"not read", "cameras.json": b"[]",
                     "meta.json": json.dumps({"schema_version": schema_version}).encode()})
        w.close()
    return paths
