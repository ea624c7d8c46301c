"""Sequence speed: a 48-frame clip at 256x256, K=8, with tracks, against casting the same frames statically.

Run: `make bench` (or `.venv/bin/python -m tests.bench sequence`). Two sequences: a deforming mesh (frames
read from .ply files, as the renderer does) and a rigid scene.json with two moving objects. "static" is the
per-frame work of a static render's caster (build the caster on the frame's meshes, cast K layers); "clip"
is ClipTracker end to end (frame loading, caster, cast, tracks, motion labels). Variants, run interleaved:
``single`` seeds on the first frame only (``query_every: 0``, the former behaviour); ``dense`` seeds on every
frame (the default); ``dense+flow`` also stores scene flow; ``rebuild`` is dense with no casters kept for the
back-fill (``backfill_memory_mb: 0``: memory-bounded, every earlier frame's caster built again). tracks/cast
is the tracks' time (seeding, following, back-fill, coverage) over the casting's (caster build and cast) in
the same run; motion/cast the same for the per-crossing labels. Target: tracks <= 0.5 x the casting.
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


VARIANTS = {"single": {"query_every": 0}, "dense": {}, "dense+flow": {"scene_flow": True},
            "rebuild": {"backfill_bytes": 0}}


def bench_one(seq, cfg: SequenceConfig) -> dict:
    clip = make_clip(seq, 0, cfg, seed=0, width=RES, height=RES)
    frames = [seq.meshes(int(f)) for f in clip.frame_indices]  # preloaded: "static" times the caster only

    def static() -> float:
        t0 = time.perf_counter()
        for meshes, cam in zip(frames, clip.cameras):
            LayeredRaycaster(meshes).cast(cam, K)
        return time.perf_counter() - t0

    def tracked(kw: dict) -> dict:
        tracker = ClipTracker(seq, clip, K, cfg.query_stride, cfg.query_frame, **kw)
        t0 = time.perf_counter()
        for _ in tracker.frames():
            pass
        a = tracker.arrays()
        return {"wall": time.perf_counter() - t0, **tracker.seconds, "tracks_n": len(a["query_layer"]),
                "later": int((a["query_frame"] > 0).sum()), "cov0": float(np.nanmin(a["coverage"][:, 0]))}

    static()  # warm-up (numba compilation)
    runs = {"static": []} | {name: [] for name in VARIANTS}
    for _ in range(REPEATS):  # interleaved, so every variant sees the same machine load
        runs["static"].append(static())
        for name, kw in VARIANTS.items():
            runs[name].append(tracked(kw))
    out = {"static_fps": T / float(np.median(runs["static"])), "faces": sum(len(m.faces) for m in frames[0])}
    for name in VARIANTS:
        r = runs[name]
        med = {k: float(np.median([x[k] for x in r])) for k in ("wall", "cast", "tracks", "motion")}
        out[name] = {"clip_fps": T / med["wall"], "cast_ms": 1e3 * med["cast"] / T,
                     "tracks_ms": 1e3 * med["tracks"] / T, "ratio": med["tracks"] / med["cast"],
                     "motion": med["motion"] / med["cast"], "tracks": r[0]["tracks_n"], "later": r[0]["later"],
                     "cov0": r[0]["cov0"]}
    return out


def main() -> None:
    cfg = SequenceConfig(clip_length=T, trajectory="orbit", query_stride=8)
    print(f"\nsequence: {T}-frame clip, {RES}x{RES}, K={K}, query stride {cfg.query_stride}, "
          f"median of {REPEATS} (per frame: ms; target tracks/cast <= 0.5)")
    print(f"{'sequence':<8} {'faces':>6} {'variant':<10} {'tracks':>6} {'later':>6} {'cov0 min':>8} "
          f"{'static fps':>10} {'clip fps':>8} {'cast ms':>7} {'tracks ms':>9} {'tracks/cast':>11} "
          f"{'motion/cast':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_assets(root)
        for source in find_sequences(root):
            seq = load_sequence(source, root)
            r = bench_one(seq, cfg)
            for name in VARIANTS:
                v = r[name]
                verdict = "ok" if v["ratio"] <= 0.5 else "OVER"
                print(f"{seq.sequence_id:<8} {r['faces']:>6} {name:<10} {v['tracks']:>6} {v['later']:>6} "
                      f"{100 * v['cov0']:>7.1f}% {r['static_fps']:>10.1f} {v['clip_fps']:>8.1f} {v['cast_ms']:>7.1f} "
                      f"{v['tracks_ms']:>9.1f} {v['ratio']:>7.2f} {verdict:<4} {v['motion']:>10.2f}")


if __name__ == "__main__":
    main()
