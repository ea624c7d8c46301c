"""`make bench` line for `wt-datagen inspect`: validated samples per second at 512x512, K=8, beside the cost
of generating those samples, measured in the same run (target: validating costs well under a tenth of
generating). Generation is the render CLI on built-in assets; where it cannot run, the shards are written
from caster output directly and validation is compared with the raw casting time only."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from wt_datagen import Camera, LayeredRaycaster
from wt_datagen.inspect import expand_shards, iter_raw, scan

RES, K, VIEWS, ASSETS, REPEATS = 512, 8, 2, 3, 3
CONFIG = Path(__file__).resolve().parents[2] / "render_configs" / "objects.yaml"


def _render(tmp: Path) -> tuple[Path, float, dict[str, list]]:
    """Built-in assets rendered by the CLI: (shard folder, seconds, {asset_id: meshes in world frame})."""
    from wt_datagen.assets import asset_to_world, load_asset, make_builtin_assets
    from wt_datagen.cli import main as cli

    assets = tmp / "assets"
    make_builtin_assets(assets)
    out = tmp / "out"
    args = [
        "render",
        str(assets),
        "--config",
        str(CONFIG),
        "--out",
        str(out),
        "--resolution",
        str(RES),
        "--layers",
        str(K),
        "--views",
        str(VIEWS),
        "--limit",
        str(ASSETS),
        "--workers",
        "1",
    ]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli(args)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"render exited {rc}")
    meshes = {}
    for path in sorted(p for p in assets.rglob("*") if p.is_file() and p.suffix in (".glb", ".obj", ".ply")):
        try:
            a = load_asset(path, assets)
        except ValueError:
            continue
        T = asset_to_world(a.meshes)
        meshes[a.asset_id] = [m.apply_transform(T) for m in a.meshes]
    return out, seconds, meshes


def _direct(tmp: Path) -> tuple[Path, dict[str, list]]:
    """Fallback shards: caster output on nested primitives, written with the project's sample encoder."""
    import trimesh
    import webdataset as wds

    from wt_datagen.sample import encode_sample

    meshes = {"shells": [trimesh.creation.icosphere(subdivisions=4, radius=r) for r in (0.5, 0.4, 0.3, 0.2)]}
    out = tmp / "out"
    out.mkdir()
    rc = LayeredRaycaster(meshes["shells"])
    with wds.TarWriter(str(out / "shard-000000.tar")) as w:
        for v in range(VIEWS * ASSETS):
            a = 2 * np.pi * v / (VIEWS * ASSETS)
            cam = Camera.look_at((1.6 * np.sin(a), 0.5, 1.6 * np.cos(a)), (0, 0, 0), width=RES, height=RES)
            hits = rc.cast(cam, K)
            rgb = np.where(hits.valid[0][..., None], (hits.normal[0] + 1) * 127.5, 0).astype(np.uint8)
            meta = {
                "asset_id": "shells",
                "asset_path": "-",
                "asset_sha256": "-",
                "asset_to_world": np.eye(4).tolist(),
                "config_name": "bench",
                "config_hash": "-",
                "seed": 0,
                "view_index": v,
                "num_layers": K,
                "instance_names": rc.instance_names,
                "version": "-",
            }
            w.write(encode_sample(f"shells_v{v:04d}", rgb, hits, cam, meta))
    return out, meshes


def _cast_seconds(paths: list[Path], meshes: dict[str, list]) -> list[float]:
    """Raw casting time of every sample's own camera on its own asset."""
    casters, out = {}, []
    for s in iter_raw(paths):
        meta, cam = json.loads(s.files["meta.json"]), Camera.from_json(json.loads(s.files["camera.json"]))
        aid = meta["asset_id"]
        if aid not in meshes:
            continue
        rc = casters.setdefault(aid, LayeredRaycaster(meshes[aid]))
        t0 = time.perf_counter()
        rc.cast(cam, K)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        try:
            out, gen_seconds, meshes = _render(tmp)
            source = "render CLI, built-in assets"
        except Exception as e:  # the render pipeline is optional here: fall back to caster-only shards
            print(f"  (render unavailable: {type(e).__name__}: {e}; using caster-only shards)")
            out, meshes = _direct(tmp)
            gen_seconds, source = None, "caster + encode_sample, nested spheres"
        paths = expand_shards([str(out)])
        n = sum(1 for _ in iter_raw(paths))
        per_sample = sum(p.stat().st_size for p in paths) / max(n, 1) / 1e6
        cast = statistics.median(_cast_seconds(paths, meshes))
        runs = {"validate": [], "summary": []}
        for _ in range(REPEATS):
            for name in runs:
                t0 = time.perf_counter()
                _, problems, _ = scan(paths, validate=name == "validate")
                runs[name].append((time.perf_counter() - t0) / n)
                assert not problems, problems[:3]
    val, summ = statistics.median(runs["validate"]), statistics.median(runs["summary"])
    print(f"\ninspect: {n} samples at {RES}x{RES}, K={K} ({source}), {per_sample:.2f} MB per sample")
    print(f"  {'stage':<26}{'s/sample':>10}{'samples/s':>11}  ratio")
    if gen_seconds is not None:
        gen = gen_seconds / n
        print(f"  {'generate (render CLI)':<26}{gen:>10.3f}{1 / gen:>11.2f}  1")
    print(f"  {'raw cast (caster only)':<26}{cast:>10.3f}{1 / cast:>11.2f}")
    for name, t in (("validate", val), ("summary only", summ)):
        ratio = f"{t / gen:.3f} of generation, " if gen_seconds is not None else ""
        print(f"  {name:<26}{t:>10.3f}{1 / t:>11.2f}  {ratio}{t / cast:.2f}x raw cast")
    if gen_seconds is not None:
        print(f"  target validate < 0.1 of generation: {'met' if val < 0.1 * gen else 'NOT met'}")


if __name__ == "__main__":
    main()
