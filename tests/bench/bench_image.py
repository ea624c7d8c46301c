"""Seconds per 512x512 view of the image renderers beside casting the same view (issue 14).

pyrender with the seeded lighting (lights with shadow maps, environment as ambient + directional light) and
with the old head light, Mitsuba 3 at the default samples per pixel on one and on all cores, and the caster's
K=8 cast of the same camera; every view of every asset runs each in turn (interleaved, so that load from
other processes hits all alike), and the table gives medians. Target: Mitsuba's default under 4 s per core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.image import mitsuba
from wt_datagen.image.materials import material_of
from wt_datagen.image.rgb import render_rgb
from wt_datagen.inputs.assets import asset_to_world, load_asset
from wt_datagen.inputs.builtin import make_builtin_assets
from wt_datagen.pipeline.cameras import view_camera
from wt_datagen.pipeline.config import RenderConfig
from wt_datagen.pipeline.items import item_lighting

RES, K, VIEWS = 512, 8, 3


def _assets(tmp: Path) -> list[tuple[Path, Path]]:
    import pybullet_data

    make_builtin_assets(tmp)
    pb = Path(pybullet_data.getDataPath())
    return [(tmp / "mug" / "mug.obj", tmp), (tmp / "table" / "table.glb", tmp),
            (pb / "duck.obj", pb), (pb / "soccerball.obj", pb)]


def main() -> None:
    cfg = RenderConfig(resolution=RES, layers=K)
    spp = cfg.image.spp
    cores = os.cpu_count() or 1
    rows: dict[str, list[float]] = {"cast K=8": [], "pyrender, seeded lighting + shadows": [],
                                    "pyrender, head light (before)": [], f"mitsuba {spp} spp, 1 thread": [],
                                    f"mitsuba {spp} spp, {cores} threads": []}
    keys = list(rows)
    cpu: dict[str, list[float]] = {k: [] for k in keys}  # CPU seconds (all threads): robust to other load
    with TemporaryDirectory() as tmp:
        for path, root in _assets(Path(tmp)):
            asset = load_asset(path, root)
            T = asset_to_world(asset.meshes)
            meshes = [m.apply_transform(T) for m in asset.meshes]
            materials = [material_of(m) for m in meshes]
            caster = LayeredRaycaster(meshes)
            scene = mitsuba.scene_for(meshes, materials)
            for view in range(VIEWS + 1):  # view 0 warms up (GL context, shaders, numba, Mitsuba's first render)
                camera = view_camera(cfg.cameras, cfg.seed, asset.asset_id, view, caster.bounds, RES)
                lighting = item_lighting(cfg, asset.asset_id, view, camera, caster.bounds)
                hits = None
                for step, key in enumerate(keys):
                    w0, c0 = time.perf_counter(), time.process_time()
                    if step == 0:
                        hits = caster.cast(camera, K)
                    elif step in (1, 2):
                        render_rgb(meshes, camera, lighting=lighting if step == 1 else None, hits=hits)
                    else:
                        mitsuba.set_threads(1 if step == 3 else 0)
                        scene.render(camera, lighting, spp, view, cfg.image.max_depth)
                    if view:
                        rows[key].append(float(time.perf_counter() - w0))
                        cpu[key].append(float(time.process_time() - c0))
    cast = np.median(rows[keys[0]])
    print(f"\nimage renderers: {RES}x{RES}, {len(rows[keys[0]])} views of mug, table, duck, soccer ball; "
          f"Mitsuba variant {mitsuba.variant()}, max_depth {cfg.image.max_depth}")
    print(f"{'':<40} {'wall s':>7} {'max':>6} {'x cast':>7} {'CPU s':>7} {'max':>6}")
    for key, times in rows.items():
        print(f"{key:<40} {np.median(times):>7.3f} {np.max(times):>6.2f} {np.median(times) / cast:>7.1f} "
              f"{np.median(cpu[key]):>7.3f} {np.max(cpu[key]):>6.2f}")
    per_core = np.median(cpu[keys[3]])
    print(f"target: Mitsuba at the default {spp} spp under 4 s per 512x512 view per core (CPU s, one thread): "
          f"median {per_core:.2f} s, max {np.max(cpu[keys[3]]):.2f} s")


if __name__ == "__main__":
    main()
