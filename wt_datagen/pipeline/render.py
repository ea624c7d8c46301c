"""`wt-datagen render`: an asset folder into sharded WebDataset layered targets.

:func:`run` plans the items (:mod:`.plan`), drops those the journal has finished, and hands the rest to an
executor (:mod:`.executors`: local worker processes or Ray tasks) whose results reach the single shard writer
(:class:`.shards.ShardSet`) in plan order, which makes the shards the same whatever the workers.
``--shard-index/--num-shards`` renders one part of the plan for independent jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..console import Progress
from ..inputs.assets import AssetError
from .config import ConfigError, RenderConfig, load_config
from .executors import ExecutorError, execute_local, part_name, ray_executor, select_part
from .items import ItemResult, WorkItem, check_image_setup
from .plan import content_hash, content_stamp, plan_items, planned_views
from .shards import ItemStatus, ResumeError, ShardSet, WrittenShard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("asset_dir", type=Path, help="folder of mesh files (searched recursively)")
    parser.add_argument("--config", type=Path, default=Path("render_configs/objects.yaml"),
                        help="render config YAML (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest")
    parser.add_argument("--views", type=int, help="views per asset (overrides the config)")
    parser.add_argument("--resolution", type=int, help="image width and height in pixels")
    parser.add_argument("--layers", type=int, help="number of layers K")
    parser.add_argument("--seed", type=int, help="seed of the camera sampling")
    parser.add_argument("--workers", type=int, help="worker processes")
    parser.add_argument("--limit", type=int, help="render only the first N assets (sorted by path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove earlier shards in --out and start afresh")
    parser.add_argument("--keep-going", action="store_true",
                        help="resume although the package version or rendered assets changed since: keep the "
                             "samples already written and render the rest")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero if any asset was skipped or failed")
    # scale-out (executors.py)
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: --workers processes here; ray: Ray tasks (the ray extra) (default: %(default)s)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="Ray cluster to run on; default: a local Ray instance with --workers CPUs")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="ray: runs again of a task whose worker died (default: %(default)s)")
    parser.add_argument("--shard-index", type=int, default=0, metavar="I",
                        help="render only part I (from 0) of --num-shards, a fixed split of the assets")
    parser.add_argument("--num-shards", type=int, default=1, metavar="N",
                        help="number of independent jobs sharing the assets, each with its own shards")


def run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("views", "resolution", "layers", "seed", "workers")}
    shards = None
    try:
        try:
            cfg = load_config(args.config, overrides)
            image = check_image_setup(cfg)  # Mitsuba, environment images: fail now, not half-way
            if args.limit is not None and args.limit < 1:
                raise ConfigError(f"--limit must be at least 1, got {args.limit}")
            items = plan_items(args.asset_dir, args.limit, cfg.sequences.detect)
            if not items:
                raise AssetError(f"{args.asset_dir}: no mesh files found")
            mine = select_part(items, args.shard_index, args.num_shards)  # this job's part
            shards = ShardSet(
                args.out,
                cfg.shards.max_samples,
                int(cfg.shards.max_megabytes * 1e6),
                header={"config_hash": cfg.hash},
                manifest_info={"version": __version__, "asset_dir": str(args.asset_dir), "config_hash": cfg.hash,
                               "config": cfg.to_dict()},
                part=part_name(args.shard_index, args.num_shards),
                version=__version__,
            )
            execute = execute_local if args.executor == "local" else ray_executor(shards, args.ray_address,
                                                                                    args.max_retries)
            done = shards.open(overwrite=args.overwrite, keep_going=args.keep_going)
            done = _check_changes(mine, done, shards, args.keep_going)
        except (ConfigError, AssetError, ResumeError, ExecutorError) as e:
            print(f"render: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"render: {e.filename}: {e.strerror}", file=sys.stderr)
            return 2
        final = {it.rel_path for it in mine if it.rel_path not in done and _crashed(shards, it.rel_path, cfg)}
        todo = [it for it in mine if it.rel_path not in done and it.rel_path not in final]
        if len(todo) < len(mine):
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} assets already done in {args.out}"
                  + (f" ({len(final)} failed for good: they killed their worker {cfg.max_crashes} times)"
                     if final else ""))
        try:
            stats = run_items(todo, cfg, str(args.asset_dir), shards, execute)
        except KeyboardInterrupt:
            shards.write_manifest(complete=False)
            print(f"\ninterrupted: {len(shards.statuses)} assets done; the same command resumes", file=sys.stderr)
            return 130
        except ExecutorError as e:
            print(f"render: {e}", file=sys.stderr)
            return 2
        final = {it.rel_path for it in items if it.rel_path not in shards.statuses and _crashed(shards, it.rel_path,
                                                                                               cfg)}
        shards.close([it.rel_path for it in items], final)
        if not mine:  # more parts than assets
            print(f"part {args.shard_index} of {args.num_shards}: no assets fall in it")
            return 0
        return _summary(mine, shards, stats, strict=args.strict, image=image)
    finally:
        if shards is not None:
            shards.release()


def _crashed(shards: ShardSet, path: str, cfg: RenderConfig) -> bool:
    """Whether ``path`` has killed its worker ``cfg.max_crashes`` times: failed for good."""
    return len(shards.deaths.get(path, [])) >= cfg.max_crashes


def _check_changes(items: list[WorkItem], done: dict[str, ItemStatus], shards: ShardSet,
                   keep_going: bool) -> dict[str, ItemStatus]:
    """The finished items whose files are as they were (sizes and times, else the content hash). A changed
    skipped item is rendered again (it has no samples); a changed rendered one stops the run with a one-line
    ResumeError, unless ``keep_going`` keeps its samples."""
    done = dict(done)
    changed = []
    for it in items:
        st = done.get(it.rel_path)
        if st is None or not (st.stamp or st.sha256):
            continue  # not done, or journaled before stamps were kept
        stamp = content_stamp(it)
        if stamp == st.stamp:
            continue
        sha = content_hash(it)
        if sha == st.sha256:
            shards.accept(st, sha, stamp)  # only touched: remember the new times
        elif st.status != "rendered":
            del done[it.rel_path]
        else:
            changed.append((it, st, sha, stamp))
    if changed and not keep_going:
        first = ", ".join(it.rel_path for it, *_ in changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise ResumeError(f"{shards.out_dir}: {len(changed)} asset(s) changed since they were rendered ({first}): "
                          "--overwrite starts afresh, --keep-going keeps their samples and renders the rest")
    for _, st, sha, stamp in changed:
        shards.accept(st, sha, stamp)
    return done


def run_items(todo: list[WorkItem], cfg: RenderConfig, asset_dir: str, shards: ShardSet,
              execute: Callable = execute_local) -> dict:
    """Render ``todo`` through ``execute`` (same signature as :func:`execute_local`) into ``shards``, which
    also keeps the items' history (starts, worker deaths), with progress in views (a clip's frames count as
    views; the total is exact from the start, and an item that ends early counts its remaining views as
    done); returns this run's timing totals. The caller closes ``shards``."""
    stats = {"seconds": Counter(), "samples": 0, "wall": 0.0}
    ticks = Counter()
    planned = {it.rel_path: planned_views(it, cfg) for it in todo}
    bar = Progress(sum(planned.values()), unit="view", desc="render")

    def progress(path: str, n: int) -> None:
        ticks[path] += n
        bar.update(n)

    def tally(st: ItemStatus) -> None:
        left = planned.get(st.path, 0) - ticks.pop(st.path, 0)
        if left > 0:
            bar.update(left)
        if st.status == "rendered":
            stats["samples"] += st.samples
            stats["seconds"].update(st.seconds)
        else:
            bar.write(f"{st.status} {st.path}: {st.reason}")
        for w in st.warnings:
            bar.write(f"warning {st.path}: {w}")

    def on_result(result: ItemResult | WrittenShard) -> None:
        # a shard a remote task wrote itself is journaled here
        if isinstance(result, WrittenShard):
            shards.adopt(result)
            for st in result.statuses:
                tally(st)
            return
        if result.status.status == "rendered":
            shards.add(result.status, result.samples)
        else:
            shards.record(result.status, result.traceback)
        tally(result.status)

    t0 = time.perf_counter()
    try:
        execute(todo, cfg, asset_dir, cfg.workers, on_result, progress, shards)
    finally:
        bar.close()
    stats["wall"] = time.perf_counter() - t0
    return stats


def _summary(items: list[WorkItem], shards: ShardSet, stats: dict, strict: bool, image: str = "") -> int:
    statuses = {**shards.failed, **shards.statuses}
    by = Counter(statuses[it.rel_path].status for it in items if it.rel_path in statuses)
    wall, n = stats["wall"], stats["samples"]
    sec = stats["seconds"]
    work = sum(sec.values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / work:.0f}%" for k, v in sorted(sec.items()))
    print(f"this run: {n} samples in {wall:.1f} s, {n / max(wall, 1e-9):.2f} samples/s"
          + (f" (worker time: {shares})" if sec else ""))
    made = Counter(statuses[it.rel_path].image for it in items if it.rel_path in statuses
                   and statuses[it.rel_path].image)
    if made:
        print(f"images: {image or '?'} asked; made by " + ", ".join(f"{k.replace('/', ' ')} ({v} items)"
                                                                  for k, v in sorted(made.items())))
    total_samples = sum(s.samples for s in shards.shards)
    print(f"dataset: {by['rendered']} assets rendered, {by['skipped']} skipped, {by['failed']} failed, "
          f"{len(items) - sum(by.values())} not done; {total_samples} samples in {len(shards.shards)} shards "
          f"({sum(s.bytes for s in shards.shards) / 1e6:.1f} MB) in {shards.out_dir}")
    reasons = Counter(s.reason for s in statuses.values() if s.status != "rendered")
    for reason, count in reasons.most_common(20):
        print(f"  {count} x {reason}")
    warned = [s for s in statuses.values() if s.warnings]
    if warned:
        print(f"{len(warned)} assets rendered with warnings:")
        for warning, count in Counter(w for s in warned for w in s.warnings).most_common(10):
            print(f"  {count} x {warning}")
    if by["skipped"] or by["failed"] or warned:
        print(f"  (per asset: {shards.out_dir / 'status.tsv'})")
    failures = sorted(shards.out_dir.glob("failures*.log"))
    if by["failed"] and failures:
        print(f"  (tracebacks of failures: {', '.join(str(p) for p in failures)})")
    if by["rendered"] == 0:
        return 1
    if strict and (by["skipped"] or by["failed"]):
        return 3
    return 0

