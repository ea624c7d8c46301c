"""The learning benchmark: the reference's options against ours, on the proof-that-it-learns set-up.

One 64x64 view of each of the 6 built-in assets (the real render pipeline), the tiny preset overfit for
400 steps (batch 6, lr 1e-3, warm-up 20, cosine), scored on those views (20 Euler steps, scale-aligned),
for each option set, each over ``WT_SEEDS`` seeds (2 by default; the runs of one seed are interleaved with
the other seed's). Reports the mean of the all-layer Chamfer, F-score and mask IoU, and of layer 0's Chamfer.

    python -m tests.bench learn
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.learning import mean_pointmap_scores, render_builtin, train_and_score

OPTIONS = {  # every flag explicit, so the rows do not move with the defaults
    "layered clock, repeat fill (ours before)": ("--clock", "layered", "--fill", "repeat"),
    "shared clock, repeat fill (the default)": ("--clock", "shared", "--fill", "repeat"),
    "layered clock, noise fill": ("--clock", "layered", "--fill", "noise"),
    "shared clock, noise fill (the reference)": ("--clock", "shared", "--fill", "noise"),
}


def main() -> None:
    seeds = int(os.environ.get("WT_SEEDS", 2))
    steps = int(os.environ.get("WT_LEARN_STEPS", 400))
    print(f"\nbench_learn: tiny, 6 built-in views at 64x64, {steps} steps, {seeds} seed(s); lower Chamfer is better",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = render_builtin(Path(tmp), subprocess=True)
        base = mean_pointmap_scores(pattern)
        results: dict[str, list] = {name: [] for name in OPTIONS}
        t0 = time.perf_counter()
        for seed in range(seeds):
            for name, extra in OPTIONS.items():
                run = Path(tmp) / f"run-{list(OPTIONS).index(name)}-{seed}"
                t1 = time.perf_counter()
                r = train_and_score(pattern, run, steps, extra, seed=seed).mean
                results[name].append(r)
                print(f"  seed {seed} {name:42s} chamfer_all {r.chamfer_all:.4f} fscore_all {r.fscore_all:.3f} "
                      f"iou {r.iou:.3f} chamfer_l0 {r.chamfer_visible:.4f} ({time.perf_counter() - t1:.0f} s)",
                      flush=True)
        print(f"{'options':42s} {'chamfer_all':>11s} {'fscore_all':>10s} {'iou':>6s} {'chamfer_l0':>10s}  per seed "
              f"chamfer_all")
        print(f"{'mean pointmap (baseline)':42s} {base.chamfer_all:11.4f} {base.fscore_all:10.3f} {base.iou:6.3f} "
              f"{base.chamfer_visible:10.4f}")
        for name, rs in results.items():
            m = [statistics.mean(getattr(r, k) for r in rs)
                 for k in ("chamfer_all", "fscore_all", "iou", "chamfer_visible")]
            per = ", ".join(f"{r.chamfer_all:.4f}" for r in rs)
            print(f"{name:42s} {m[0]:11.4f} {m[1]:10.3f} {m[2]:6.3f} {m[3]:10.4f}  {per}")
        print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
