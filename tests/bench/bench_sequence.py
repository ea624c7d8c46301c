"""Sequence speed: a 48-frame clip at 256x256, K=8, with tracks, against casting the same frames statically.

Run: `make bench` (or `.venv/bin/python -m tests.bench sequence`). Two sequences: a deforming mesh (frames
read from .ply files, as the renderer does) and a rigid scene.json with two moving objects. "static" is the
per-frame work of a static render's caster (build the caster on the frame's meshes, cast K layers); "clip"
is ClipTracker end to end (frame loading, caster, cast, tracks). Target: tracks cost <= 0.5 x the casting.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

from wt_datagen import LayeredRaycaster
from wt_datagen.geometry.tracks import ClipTracker
from wt_datagen.inputs.sequences import find_sequences, load_sequence
from wt_datagen.pipeline.cameras import make_clip
from wt_datagen.pipeline.config import SequenceConfig

T, RES, K, REPEATS = 48, 256, 8, 3


def write_assets(root: Path) -> None:
    """A wobbling sphere (20k faces) as 48 frame files, and a scene.json: a torus knot orbiting a box."""
    sphere = trimesh.creation.icosphere(subdivisions=5)
    v = sphere.vertices
    (root / "wobble").mkdir()
    for t in range(T):
        wave = 1 + 0.15 * np.sin(3 * v[:, 1:2] + 0.3 * t) * np.cos(2 * v[:, :1])
        trimesh.Trimesh(v * wave, sphere.faces, process=False).export(root / "wobble" / f"frame_{t:04d}.ply")
    (root / "orbit").mkdir()
    trimesh.creation.box(extents=(1.5, 1.0, 1.5)).export(root / "orbit" / "box.ply")
    knot = trimesh.creation.torus(0.5, 0.15, major_sections=128, minor_sections=48)
    knot.export(root / "orbit" / "knot.ply")
    poses = []
    for t in range(T):
        a = 2 * np.pi * t / T
        p = trimesh.transformations.rotation_matrix(a, (0, 1, 0))
        p[:3, 3] = (1.6 * np.cos(a), 0.2, 1.6 * np.sin(a))
        poses.append(p.tolist())
    spec = {"fps": 24, "num_frames": T, "objects": [{"name": "box", "mesh": "box.ply"},
                                                    {"name": "knot", "mesh": "knot.ply", "poses": poses}]}
    (root / "orbit" / "scene.json").write_text(json.dumps(spec))


def bench_one(seq, cfg: SequenceConfig) -> dict:
    clip = make_clip(seq, 0, cfg, seed=0, width=RES, height=RES)
    frames = [seq.meshes(int(f)) for f in clip.frame_indices]  # preloaded: "static" times the caster only

    def static() -> float:
        t0 = time.perf_counter()
        for meshes, cam in zip(frames, clip.cameras):
            LayeredRaycaster(meshes).cast(cam, K)
        return time.perf_counter() - t0

    def tracked() -> tuple[float, dict, int]:
        tracker = ClipTracker(seq, clip, K, cfg.query_stride, cfg.query_frame)
        t0 = time.perf_counter()
        for _ in tracker.frames():
            pass
        return time.perf_counter() - t0, tracker.seconds, len(tracker.queries)

    static()  # warm-up (numba compilation)
    runs_static, runs_clip = [], []
    for _ in range(REPEATS):  # interleaved, so both see the same machine load
        runs_static.append(static())
        runs_clip.append(tracked())
    wall = float(np.median([r[0] for r in runs_clip]))
    cast = float(np.median([r[1]["cast"] for r in runs_clip]))
    tracks = float(np.median([r[1]["tracks"] for r in runs_clip]))
    return {"static_fps": T / float(np.median(runs_static)), "clip_fps": T / wall, "cast_ms": 1e3 * cast / T,
            "tracks_ms": 1e3 * tracks / T, "ratio": tracks / cast, "tracks": runs_clip[0][2],
            "faces": sum(len(m.faces) for m in frames[0])}


def main() -> None:
    cfg = SequenceConfig(clip_length=T, trajectory="orbit", query_stride=8)
    print(f"\nsequence: {T}-frame clip, {RES}x{RES}, K={K}, query stride {cfg.query_stride}, "
          f"median of {REPEATS} (per frame: ms; target tracks/cast <= 0.5)")
    print(f"{'sequence':<10} {'faces':>7} {'tracks':>7} {'static fps':>11} {'clip fps':>9} {'cast ms':>8} "
          f"{'tracks ms':>10} {'tracks/cast':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_assets(root)
        for source in find_sequences(root):
            seq = load_sequence(source, root)
            r = bench_one(seq, cfg)
            verdict = "ok" if r["ratio"] <= 0.5 else "OVER"
            print(f"{seq.sequence_id:<10} {r['faces']:>7} {r['tracks']:>7} {r['static_fps']:>11.1f} "
                  f"{r['clip_fps']:>9.1f} {r['cast_ms']:>8.1f} {r['tracks_ms']:>10.1f} "
                  f"{r['ratio']:>8.2f} {verdict}")


if __name__ == "__main__":
    main()
