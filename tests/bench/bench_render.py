"""End-to-end render throughput at 512x512, K=8, beside the raw casting time, bytes per sample, and the peak
memory of a `--workers 2` run.

Targets (issue 3): everything other than casting (image, encoding, writing) costs no more than the casting
itself; at most 4 MB per sample with lossless float32 depth; a `--workers 2` run stays under 4 GB.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from wt_datagen.cli import main as cli_main
from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.inputs.assets import asset_to_world, load_asset
from wt_datagen.inputs.builtin import make_builtin_assets
from wt_datagen.pipeline.cameras import view_camera
from wt_datagen.pipeline.config import RenderConfig
from wt_datagen.pipeline.plan import plan_items
from wt_datagen.schema import encode_npz, encode_png, layer_arrays

RES, K, VIEWS = 512, 8, 4
# Real textured meshes that ship with pybullet (obj + mtl + texture).
PYBULLET_OBJS = ["duck.obj", "soccerball.obj", "torus/torus_textured.obj", "table/table.obj",
                 "tray/tray_textured.obj", "jenga/jenga.obj"]


def _pybullet_assets(dst: Path) -> Path:
    import pybullet_data

    src = Path(pybullet_data.getDataPath())
    for rel in PYBULLET_OBJS:
        obj = src / rel
        folder = dst / obj.stem
        folder.mkdir(parents=True)
        shutil.copy(obj, folder)
        for line in obj.read_text(errors="replace").splitlines():
            if line.startswith("mtllib"):
                mtl = obj.parent / line.split(maxsplit=1)[1].strip()
                shutil.copy(mtl, folder)
                for ml in mtl.read_text(errors="replace").splitlines():
                    if ml.split()[:1] == ["map_Kd"]:  # keep the relative path (e.g. ../cube.png)
                        tex = ml.split()[-1]
                        (folder / tex).resolve().parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(mtl.parent / tex, (folder / tex).resolve())
    return dst


def _config(path: Path, workers: int = 1) -> Path:
    path.write_text(json.dumps({"views": VIEWS, "resolution": RES, "layers": K, "workers": workers}))
    return path


def _raw_cast_seconds(asset_dir: Path, cfg: RenderConfig) -> float:
    """Casting alone (caster built, every view cast) for the same assets and cameras as the render."""
    total = 0.0
    for item in plan_items(asset_dir):
        asset = load_asset(item.path, asset_dir)
        T = asset_to_world(asset.meshes)
        meshes = [m.apply_transform(T) for m in asset.meshes]
        t0 = time.perf_counter()
        rc = LayeredRaycaster(meshes, backend=cfg.backend)
        for v in range(cfg.views):
            cam = view_camera(cfg.cameras, cfg.seed, asset.asset_id, v, rc.bounds, cfg.resolution)
            rc.cast(cam, cfg.layers)
        total += time.perf_counter() - t0
    return total


def _render(asset_dir: Path, out: Path, config: Path, *flags: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = null
        try:
            code = cli_main(["render", str(asset_dir), "--config", str(config), "--out", str(out), *flags])
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    wall = time.perf_counter() - t0
    assert code == 0, f"render of {asset_dir} failed"
    return wall, json.loads((out / "manifest.json").read_text())


def _peak_rss_workers2(asset_dir: Path, out: Path, config: Path) -> tuple[float, float]:
    """Peak summed RSS (parent + workers) of a `--workers 2` render, every 50 ms; and its wall time."""
    cmd = [sys.executable, "-m", "wt_datagen.cli", "render", str(asset_dir), "--config", str(config),
           "--out", str(out), "--workers", "2"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    assert proc.returncode == 0
    return peak / 2**30, time.perf_counter() - t0


def _encoding_table(asset_dir: Path, cfg: RenderConfig) -> list[tuple]:
    """One sample's layers.npz and rgb.png: ours (ISA-L level 1, PNG level 1) against numpy's
    savez_compressed (zlib level 6) and PNG level 6."""
    item = plan_items(asset_dir)[0]
    asset = load_asset(item.path, asset_dir)
    meshes = [m.apply_transform(asset_to_world(asset.meshes)) for m in asset.meshes]
    rc = LayeredRaycaster(meshes)
    hits = rc.cast(view_camera(cfg.cameras, cfg.seed, asset.asset_id, 0, rc.bounds, RES), K)
    arrays = layer_arrays(hits)
    rgb = (np.clip(hits.normal[0] * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    rows = []

    def timed(name, fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            data = fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, 1000 * float(np.median(times)), len(data) / 1e6))

    def savez():
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    timed("layers.npz ISA-L 1 (ours)", lambda: encode_npz(arrays, 1))
    timed("layers.npz savez_compressed (6)", savez)
    timed("rgb.png level 1 (ours)", lambda: encode_png(rgb, 1))
    timed("rgb.png level 6", lambda: encode_png(rgb, 6))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {"built-in": tmp / "builtin", "pybullet_data": tmp / "pybullet"}
        make_builtin_assets(sets["built-in"])
        _pybullet_assets(sets["pybullet_data"])
        config = _config(tmp / "bench.yaml")
        cfg = RenderConfig(views=VIEWS, resolution=RES, layers=K)
        # one-off start-up (numba kernels from cache, the GL context) is not per-sample work: warm up first
        warm = tmp / "warm.yaml"
        warm.write_text(json.dumps({"views": 1, "resolution": 32, "layers": 2}))
        _render(sets["built-in"], tmp / "warm", warm, "--limit", "1")
        print(f"\nrender end to end: {RES}x{RES}, K={K}, {VIEWS} views per asset, --workers 1, warm process")
        print(f"{'assets':<14} {'samples':>7} {'samples/s':>9} {'wall s':>7} {'raw cast s':>10} {'other s':>8} "
              f"{'other/cast':>10} | in render: {'load':>5} {'cast':>5} {'image':>5} {'encode':>6} {'write':>5} "
              f"{'MB/sample':>9}")
        for name, asset_dir in sets.items():
            wall, manifest = _render(asset_dir, tmp / f"out_{name}", config)
            raw = _raw_cast_seconds(asset_dir, cfg)
            n = manifest["totals"]["samples"]
            sec = dict.fromkeys(["load", "cast", "image", "encode"], 0.0)
            for st in manifest["assets"].values():
                for k, v in st["seconds"].items():
                    sec[k] = sec.get(k, 0.0) + v
            write = wall - sum(sec.values())  # shard writing, journal, manifest, progress bar
            # other = everything but the render's own casting; against the same run's casting, so that load
            # from other processes on the machine between the two passes does not bias the ratio
            other = wall - sec["cast"]
            ratio = other / sec["cast"]
            print(f"{name:<14} {n:>7} {n / wall:>9.2f} {wall:>7.2f} {raw:>10.2f} {other:>8.2f} {ratio:>10.2f} "
                  f"| {'':>11}{sec['load']:>5.2f} {sec['cast']:>5.2f} {sec['image']:>5.2f} {sec['encode']:>6.2f} "
                  f"{write:>5.2f} {manifest['totals']['bytes'] / n / 1e6:>9.2f}")
        print("target: other/cast <= 1 (other = wall - cast in render: load, image, encode, write); "
              "MB/sample <= 4")
        peak, wall2 = _peak_rss_workers2(sets["built-in"], tmp / "out_w2", config)
        print(f"--workers 2 render of the built-in assets: peak RSS {peak:.2f} GB (target < 4), "
              f"{wall2:.1f} s wall incl. process start-up")
        print(f"\n{'encoding one 512x512 K=8 sample':<34} {'ms':>7} {'MB':>6}")
        for row in _encoding_table(sets["built-in"], cfg):
            print(f"{row[0]:<34} {row[1]:>7.1f} {row[2]:>6.2f}")


if __name__ == "__main__":
    main()
