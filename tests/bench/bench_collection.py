"""A real collection end to end: every mesh file of pybullet_data (about 1,200: obj with mtl and textures, stl;
z-up) through `wt-datagen render` with a small config, as a new user would point it at a download.

Reports assets rendered, skipped (by reason) and failed, samples per second, and the peak memory of the whole
process tree (parent and workers, summed, sampled every 50 ms). Target: zero failures that are our fault.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

CONFIG = {"views": 2, "resolution": 64, "layers": 4, "assets": {"up_axis": "z"}, "shards": {"max_samples": 1000}}
WORKERS = 2


def render(asset_dir: Path, out: Path, config: Path) -> tuple[float, float, int]:
    """(wall seconds, peak summed RSS in GB, exit code) of one render in a child process."""
    cmd = [sys.executable, "-m", "wt_datagen.cli", "render", str(asset_dir), "--config", str(config), "--out",
           str(out), "--workers", str(WORKERS)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return time.perf_counter() - t0, peak / 2**30, proc.returncode


def main() -> None:
    import pybullet_data

    src = Path(pybullet_data.getDataPath())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "collection.yaml"
        config.write_text(json.dumps(CONFIG))
        wall, peak, code = render(src, tmp / "out", config)
        manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    statuses = manifest["assets"].values()
    by = Counter(s["status"] for s in statuses)
    kinds = Counter(Path(p).suffix.lower() for p in manifest["assets"])
    samples = manifest["totals"]["samples"]
    busy = Counter()
    for s in statuses:
        busy.update(s["seconds"])
    work = sum(v for k, v in busy.items() if k != "total") or 1.0
    print(f"\npybullet_data end to end ({src}): {len(manifest['assets'])} items "
          f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), config {json.dumps(CONFIG)}, "
          f"--workers {WORKERS}, exit code {code}")
    print(f"rendered {by['rendered']}, skipped {by['skipped']}, failed {by['failed']}; {samples} samples in "
          f"{wall:.0f} s wall (process start-up included): {samples / wall:.2f} samples/s; "
          f"{manifest['totals']['bytes'] / 1e6:.0f} MB; peak RSS {peak:.2f} GB over all processes")
    print("worker time: " + ", ".join(f"{k} {100 * v / work:.0f}%" for k, v in sorted(busy.items()) if k != "total"))
    for (status, reason), n in Counter((s["status"], s["reason"]) for s in statuses
                                       if s["status"] != "rendered").most_common():
        print(f"  {status} x{n}: {reason}")
    warned = Counter(w for s in statuses for w in s["warnings"])
    print(f"rendered with warnings: {sum(bool(s['warnings']) for s in statuses)} assets")
    for w, n in warned.most_common(12):
        print(f"  x{n}: {w}")


if __name__ == "__main__":
    main()
