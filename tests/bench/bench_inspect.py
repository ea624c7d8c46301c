"""`make bench` line for `wt-datagen inspect`: validated samples per second at 512x512, K=8, beside the cost
of generating those samples, measured in the same run (target: validating costs well under a tenth of
generating). Generation is the render CLI on the built-in assets, timed on a second, warm run (the first
pays for imports, the GL context and loading compiled kernels once per process)."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from wt_datagen import Camera, LayeredRaycaster
from wt_datagen.inspect import expand_shards, iter_raw, scan

RES, K, VIEWS, ASSETS, REPEATS = 512, 8, 2, 6, 3
CONFIG = Path(__file__).resolve().parents[2] / "render_configs" / "objects.yaml"


def _render(tmp: Path) -> tuple[Path, float, dict[str, list]]:
    """Built-in assets rendered by the CLI: (shard folder, seconds, {asset_id: meshes in world frame})."""
    from wt_datagen.cli import main as cli
    from wt_datagen.inputs.assets import asset_to_world, load_asset
    from wt_datagen.inputs.builtin import make_builtin_assets

    assets = tmp / "assets"
    make_builtin_assets(assets)
    for out in (tmp / "warm-up", tmp / "out"):
        args = ["render", str(assets), "--config", str(CONFIG), "--out", str(out), "--resolution", str(RES),
                "--layers", str(K), "--views", str(VIEWS), "--limit", str(ASSETS), "--workers", "1"]
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
        out, gen_seconds, meshes = _render(tmp)
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
    print(f"\ninspect: {n} samples at {RES}x{RES}, K={K} (render CLI, built-in assets), {per_sample:.2f} MB per sample")
    print(f"  {'stage':<26}{'s/sample':>10}{'samples/s':>11}  ratio")
    gen = gen_seconds / n
    print(f"  {'generate (render CLI, warm)':<26}{gen:>10.3f}{1 / gen:>11.2f}  1")
    print(f"  {'raw cast (caster only)':<26}{cast:>10.3f}{1 / cast:>11.2f}")
    for name, t in (("validate", val), ("summary only", summ)):
        print(f"  {name:<26}{t:>10.3f}{1 / t:>11.2f}  {t / gen:.3f} of generation, {t / cast:.2f}x raw cast")
    print(f"  target validate < 0.1 of generation: {'met' if val < 0.1 * gen else 'NOT met'}")

if __name__ == "__main__":
    main()
