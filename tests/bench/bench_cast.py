"""Caster speed and memory: the raw Open3D call (the reference), this caster end to end with its default engine
and with the Open3D one, and trimesh multiple_hits, on the same rays.

Run: `make bench` (or `.venv/bin/python -m tests.bench cast`). Timings are medians of interleaved repeats; the
ratios are taken within one run, so that the load of a shared machine falls on both sides alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import trimesh

from wt_datagen import Camera, LayeredRaycaster

RES, K, REPEATS = 512, 8, 5


def big_scene() -> trimesh.Scene:
    """About 330k triangles: nested icospheres and tori scattered on a floor (up to ~12 layers deep)."""
    rng = np.random.default_rng(0)
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=(8, 0.1, 8)), node_name="floor")
    for i in range(4):
        for r in (1.0, 0.7):
            s = trimesh.creation.icosphere(subdivisions=5, radius=r * 0.6)  # 20480 faces
            T = np.eye(4)
            T[:3, 3] = (-2.5 + 1.7 * i, 0.7, -1.0)
            scene.add_geometry(s, node_name=f"shell{i}_{r}", transform=T)
    for i in range(6):
        t = trimesh.creation.torus(0.5, 0.15, major_sections=160, minor_sections=80)  # 25600 faces
        T = trimesh.transformations.rotation_matrix(rng.uniform(0, np.pi), rng.normal(size=3))
        T[:3, 3] = (-2.5 + 1.0 * i, 0.6, 1.2)
        scene.add_geometry(t, node_name=f"torus{i}", transform=T)
    return scene


def monastery() -> trimesh.Scene:
    import pybullet_data

    return trimesh.load(os.path.join(pybullet_data.getDataPath(), "samurai_monastry.obj"), force="scene")


def camera_for(rc: LayeredRaycaster, res: int, view=(0.7, 0.6, 0.9)) -> Camera:
    """Looking at the scene's centre from ``centre + extents * view``."""
    lo, hi = rc.bounds
    c = (lo + hi) / 2
    return Camera.look_at(c + (hi - lo) * np.asarray(view), c, up=(0, 1, 0), width=res, height=res, fov_y_deg=55)


def median_ms(fn, repeats=REPEATS) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def deep_scene(plates: int = 150) -> trimesh.Scene:
    """A stack of thin square plates seen face on: every ray of ``deep_camera`` crosses 2 x plates surfaces."""
    scene = trimesh.Scene()
    for i in range(plates):
        p = trimesh.creation.box(extents=(6.0, 6.0, 0.004))
        p.apply_translation((0.0, 0.0, 0.01 * i))
        scene.add_geometry(p, node_name=f"plate{i}")
    return scene


def deep_camera(res: int) -> Camera:
    return Camera.look_at((0.0, 0.0, -1.5), (0.0, 0.0, 1.0), up=(0, 1, 0), width=res, height=res, fov_y_deg=50)


def plain_open3d(rc: LayeredRaycaster):
    """Open3D as one would use it: one geometry per instance."""
    import open3d as o3d

    plain = o3d.t.geometry.RaycastingScene()
    for s, e in zip(rc.face_offset[:-1], rc.face_offset[1:]):
        f = rc._faces[s:e]
        used, local = np.unique(f, return_inverse=True)
        plain.add_triangles(o3d.core.Tensor(rc._verts[used].astype(np.float32)),
                            o3d.core.Tensor(local.reshape(-1, 3).astype(np.uint32)))
    return plain


def bench_scene(name: str, scene: trimesh.Scene, view=(0.7, 0.6, 0.9)) -> dict:
    import open3d as o3d

    n_faces = sum(len(g.faces) for g in scene.geometry.values())
    t = time.perf_counter()
    rc = LayeredRaycaster(scene)
    build_ms = 1e3 * (time.perf_counter() - t)
    rc_o3d = LayeredRaycaster(scene, backend="open3d")
    cam = camera_for(rc, RES, view)
    d = cam.pixel_rays().reshape(-1, 3) @ cam.rotation
    rays = o3d.core.Tensor(np.concatenate([np.broadcast_to(cam.center, d.shape), d], 1).astype(np.float32))
    plain = plain_open3d(rc)
    rc.cast(cam, K), rc_o3d.cast(cam, K)  # compile / warm up
    hits = rc.cast(cam, K)
    row = {"scene": name, "faces": n_faces, "build_ms": build_ms,
           "mean_hits": float(hits.num_hits.mean()), "max_hits": int(hits.num_hits.max())}
    mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    origins = np.broadcast_to(cam.center, d.shape)
    # trimesh builds its BVH on the first query: timed apart (the first call), as ``build`` is for ours
    row["trimesh_first_ms"] = median_ms(lambda: mesh.ray.intersects_location(origins, d, multiple_hits=True), 1)
    raw, ours, ours_o3d, tm = [], [], [], []
    for _ in range(REPEATS):  # interleaved, so that machine noise hits all alike
        raw.append(median_ms(lambda: plain.list_intersections(rays), 1))
        ours.append(median_ms(lambda: rc.cast(cam, K), 1))
        ours_o3d.append(median_ms(lambda: rc_o3d.cast(cam, K), 1))
        tm.append(median_ms(lambda: mesh.ray.intersects_location(origins, d, multiple_hits=True), 1))
    row["raw_ms"], row["caster_ms"] = float(np.median(raw)), float(np.median(ours))
    row["caster_o3d_ms"], row["trimesh_ms"] = float(np.median(ours_o3d)), float(np.median(tm))
    # One thread each: CPU cost, steadier than wall time on a shared machine.
    rc1 = LayeredRaycaster(scene, num_threads=1)
    rc1.cast(cam, K)
    raw1, ours1 = [], []
    for _ in range(REPEATS):
        raw1.append(median_ms(lambda: plain.list_intersections(rays, nthreads=1), 1))
        ours1.append(median_ms(lambda: rc1.cast(cam, K), 1))
    row["raw_1t_ms"], row["caster_1t_ms"] = float(np.median(raw1)), float(np.median(ours1))
    return row


def peak_memory_mb(scene: str, res: int = 1024) -> dict:
    """Peak resident memory of a fresh process that builds a scene and casts it at res x res, K=8."""
    make, cam = {"synthetic": ("big_scene()", f"camera_for(rc, {res})"),
                 "deep": ("deep_scene()", f"deep_camera({res})")}[scene]
    code = (
        "import json, time;"
        "from tests.bench.bench_cast import big_scene, deep_scene, camera_for, deep_camera;"
        f"from wt_datagen import LayeredRaycaster; rc = LayeredRaycaster({make});"
        # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
        "rss = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024; base = rss();"
        f"t = time.perf_counter(); h = rc.cast({cam}, {K}); s = time.perf_counter() - t;"
        "print(json.dumps([base, rss(), float(h.num_hits.mean()), int(h.num_hits.max()), s]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, mean, top, secs = json.loads(out.stdout.strip().splitlines()[-1])
    return {"scene": scene, "res": res, "before_cast_mb": base, "peak_mb": peak, "mean_hits": mean,
            "max_hits": top, "cast_s": secs}


def main() -> None:
    print(f"\n## caster: {RES}x{RES} rays, K={K}, median of {REPEATS} interleaved runs")
    print("| scene | faces | mean/max hits | build ms | raw list_intersections ms | caster ms | caster/raw "
          "| caster, Open3D engine ms | 1-thread raw ms | 1-thread caster ms | 1-thread ratio "
          "| trimesh multiple_hits ms | trimesh/caster | trimesh first call ms | first call / (build + caster) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    scenes = [("spheres+tori (synthetic)", big_scene(), (0.7, 0.6, 0.9)),
              ("samurai_monastry (pybullet_data)", monastery(), (0.7, 0.6, 0.9)),
              ("samurai_monastry, camera near its centre", monastery(), (0.1, 0.05, 0.1))]
    for name, scene, view in scenes:
        r = bench_scene(name, scene, view)
        print(f"| {r['scene']} | {r['faces']} | {r['mean_hits']:.2f}/{r['max_hits']} | {r['build_ms']:.0f} "
              f"| {r['raw_ms']:.1f} | {r['caster_ms']:.1f} | {r['caster_ms'] / r['raw_ms']:.2f} "
              f"| {r['caster_o3d_ms']:.1f} | {r['raw_1t_ms']:.1f} | {r['caster_1t_ms']:.1f} "
              f"| {r['caster_1t_ms'] / r['raw_1t_ms']:.2f} | {r['trimesh_ms']:.0f} "
              f"| {r['trimesh_ms'] / r['caster_ms']:.1f} | {r['trimesh_first_ms']:.0f} "
              f"| {r['trimesh_first_ms'] / (r['build_ms'] + r['caster_ms']):.1f} |")
    for scene in ("synthetic", "deep"):
        m = peak_memory_mb(scene)
        print(f"\npeak memory, {m['res']}x{m['res']} K={K}, {scene} scene ({m['mean_hits']:.0f} crossings per ray "
              f"on average, {m['max_hits']} at most; cast {m['cast_s']:.1f} s): {m['peak_mb']:.0f} MB "
              f"({m['before_cast_mb']:.0f} MB before the cast: interpreter, libraries, the scene and its engine)")


if __name__ == "__main__":
    main()
