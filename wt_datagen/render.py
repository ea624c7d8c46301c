"""`wt-datagen render`: an asset folder into sharded WebDataset layered targets.

The unit of work is a :class:`WorkItem` (one asset: all its views). :func:`render_item` is a pure function of
the item and the resolved config, returning an :class:`ItemResult` (encoded samples, or why there are none),
so any executor can run it; :func:`execute_local` runs items in W worker processes and hands results back in
plan order to the single shard writer (:class:`wt_datagen.shard.ShardSet`), which makes the shards the same
whatever W is. Resumption: finished items are read back from the journal and not planned again.
Scale-out (:mod:`wt_datagen.executors`): the Ray executor plugs into :func:`run_items` the same way,
and ``--shard-index/--num-shards`` renders one part of the plan for independent jobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import queue
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .assets import AssetError, asset_to_world, discover_assets, load_asset
from .cast import LayeredRaycaster
from .config import ConfigError, RenderConfig, load_config
from .sample import encode_sample, sample_key
from .sequence import find_sequences, static_files
from .shard import ItemStatus, ResumeError, ShardSet, WrittenShard
from .views import view_camera


@dataclass(frozen=True)
class WorkItem:
    """One unit of work. ``kind`` selects the function that renders it (:data:`RENDERERS`);
    ``rel_path`` (relative to ASSET_DIR, POSIX) identifies it in the journal and the manifest."""

    kind: str
    path: str
    rel_path: str


@dataclass
class ItemResult:
    """A rendered item's samples (dicts of bytes, webdataset-ready) and its status."""

    status: ItemStatus
    samples: list[dict] = field(default_factory=list)


ProgressFn = Callable[[str, int], None]  # (rel_path, views done since the last call)


def plan_items(asset_dir: str | Path, limit: int | None = None) -> list[WorkItem]:
    """The static assets and sequences under ``asset_dir`` in a stable order, the first ``limit`` of them."""
    root = Path(asset_dir)
    sequences = find_sequences(root) if root.is_dir() else []
    items = [WorkItem("asset", str(p), p.relative_to(root).as_posix())  # a sequence's files are not assets
             for p in static_files(discover_assets(root), sequences)]
    items += [WorkItem("sequence", str(s.path), s.path.relative_to(root).as_posix()) for s in sequences]
    items.sort(key=lambda it: it.rel_path)
    return items[:limit] if limit is not None else items


def render_item(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn | None = None):
    """Render one item; a bad input (any ValueError: AssetError, MeshError...) gives a "skipped" status with
    a one-line reason, an unexpected error a "failed" one. Never raises for a per-item problem."""
    t0 = time.perf_counter()
    try:
        return RENDERERS[item.kind](item, cfg, asset_dir, progress or (lambda path, n: None))
    except Exception as e:  # one item's problem must not end the run
        status = "skipped" if isinstance(e, ValueError) else "failed"
        msg = str(e).splitlines()[0] if str(e) else ""
        # AssetError names the file first; the status has the path already
        if isinstance(e, AssetError):
            reason = msg.removeprefix(f"{item.rel_path}: ")
        else:
            reason = f"{type(e).__name__}: {msg}"
        seconds = {"total": time.perf_counter() - t0}
        return ItemResult(ItemStatus(item.rel_path, item.kind, status=status, reason=reason, seconds=seconds))


def caster_threads(cfg: RenderConfig) -> int:
    """Casting threads per worker: all cores for one worker, one each for several (no oversubscription)."""
    return 1 if cfg.workers > 1 else 0


def render_asset(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn) -> ItemResult:
    """All views of one static asset: load, normalise, build the caster, then per view camera, cast, image,
    encode."""
    clock = _Clock()
    asset = load_asset(item.path, asset_dir, max_faces=cfg.assets.max_faces)
    to_world = asset_to_world(asset.meshes, cfg.assets.up_axis, cfg.assets.normalise)
    for m in asset.meshes:  # ours: loaded just now
        m.apply_transform(to_world)
    clock.lap("load")
    caster = LayeredRaycaster(asset.meshes, backend=cfg.backend, num_threads=caster_threads(cfg))
    bounds = caster.bounds
    clock.lap("cast")
    meta = {
        "asset_id": asset.asset_id,
        "asset_path": asset.rel_path,
        "asset_sha256": asset.sha256,
        "asset_to_world": to_world.tolist(),
        "config_name": cfg.name,
        "config_hash": cfg.hash,
        "seed": cfg.seed,
        "num_layers": cfg.layers,
        "instance_names": asset.names,
        "version": __version__,
    }
    samples, image_mode = [], ""
    # Encoding (numpy conversions, deflate, PNG: mostly outside the GIL) of view i runs in a thread while
    # view i + 1 is cast and imaged; one view in flight bounds the memory.
    with cf.ThreadPoolExecutor(1) as encoder:
        pending = None
        for view in range(cfg.views):
            camera = view_camera(cfg.cameras, cfg.seed, asset.asset_id, view, bounds, cfg.resolution)
            hits = caster.cast(camera, cfg.layers)
            clock.lap("cast")
            rgb, image_mode = _image(asset.meshes, camera, hits, cfg)
            clock.lap("image")
            if pending is not None:
                samples.append(pending.result())
                progress(item.rel_path, 1)
            pending = encoder.submit(encode_sample, sample_key(asset.asset_id, view), rgb, hits, camera,
                                     {**meta, "view_index": view}, cfg.encoding.png_level, cfg.encoding.npz_level)
            clock.lap("encode")
        samples.append(pending.result())
        clock.lap("encode")
        progress(item.rel_path, 1)
    status = ItemStatus(item.rel_path, item.kind, asset.asset_id, "rendered", samples=len(samples),
                        image=image_mode, seconds=clock.seconds)
    return ItemResult(status, samples)


def _render_sequence(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn) -> ItemResult:
    """Issue 4: wt_datagen/sequence_render.py (imported late: it imports this module)."""
    from .sequence_render import render_sequence

    return render_sequence(item, cfg, asset_dir, progress)


# Work kinds and their render functions: (item, cfg, asset_dir, progress) -> ItemResult.
RENDERERS: dict[str, Callable[..., ItemResult]] = {"asset": render_asset, "sequence": _render_sequence}

_GL_FAILED = False  # this process found OpenGL unusable once: go straight to the fallback afterwards


def _image(meshes, camera, hits, cfg: RenderConfig) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 image and the renderer that made it, falling back to ray tracing where configured."""
    global _GL_FAILED
    from .image import GLUnavailable, render_rgb  # imported late: it pulls in pyrender/OpenGL

    bg = cfg.image.background
    if cfg.image.renderer == "pyrender" and not _GL_FAILED:
        try:
            return render_rgb(meshes, camera, background=bg, mode="pyrender", hits=hits), "pyrender"
        except GLUnavailable as e:
            if cfg.image.fallback == "none":
                raise ValueError(f"OpenGL unavailable and image.fallback is none ({e})") from None
            _GL_FAILED = True
    return render_rgb(meshes, camera, background=bg, mode="raytrace", hits=hits), "raytrace"


class _Clock:
    """Accumulates wall time per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


# -- local executor ------------------------------------------------------------------------------------

_progress_queue = None  # set in each worker process


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _worker_render(item: WorkItem, cfg: RenderConfig, asset_dir: str) -> ItemResult:
    return render_item(item, cfg, asset_dir, lambda path, n: _progress_queue.put((path, n)))


def execute_local(
    items: list[WorkItem],
    cfg: RenderConfig,
    asset_dir: str,
    workers: int,
    on_result: Callable[[ItemResult], None],
    progress: ProgressFn,
) -> None:
    """Render ``items`` in ``workers`` processes ('spawn': the caster's thread pools do not survive fork);
    ``on_result`` gets the results in plan order. At most 2 x workers items are in flight or waiting, which
    bounds memory. A worker that dies fails its item and the pool is started again."""
    if workers == 1:
        for item in items:
            on_result(render_item(item, cfg, asset_dir, progress))
        return
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                progress(*progress_queue.get_nowait())
            except queue.Empty:
                return

    def new_pool() -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue,)
        )

    pool, futures = new_pool(), {}
    nxt = 0
    try:
        for i, item in enumerate(items):
            while nxt < len(items) and nxt - i < 2 * workers:
                futures[nxt] = pool.submit(_worker_render, items[nxt], cfg, asset_dir)
                nxt += 1
            while not futures[i].done():
                cf.wait([futures[i]], timeout=0.1)
                drain()
            try:
                result = futures.pop(i).result()
            except Exception as e:  # render_item catches per-item errors: this is the process or the transport
                reason = f"worker: {type(e).__name__}: {e}"
                result = ItemResult(ItemStatus(item.rel_path, item.kind, status="failed", reason=reason))
                if isinstance(e, cf.process.BrokenProcessPool):
                    # a worker died (which item killed it is unknown): fail this one, resubmit the others
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = new_pool()
                    for j in futures:
                        futures[j] = pool.submit(_worker_render, items[j], cfg, asset_dir)
            drain()
            on_result(result)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# -- command line --------------------------------------------------------------------------------------


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
    from .executors import ExecutorError, part_name, ray_executor, select_part  # late: it imports this module

    overrides = {k: getattr(args, k) for k in ("views", "resolution", "layers", "seed", "workers")}
    try:
        cfg = load_config(args.config, overrides)
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {args.limit}")
        items = plan_items(args.asset_dir, args.limit)
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
        )
        execute = execute_local if args.executor == "local" else ray_executor(shards, args.ray_address,
                                                                                args.max_retries)
        done = shards.open(overwrite=args.overwrite)
    except (ConfigError, AssetError, ResumeError, ExecutorError) as e:
        print(f"render: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"render: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    todo = [it for it in mine if it.rel_path not in done]
    if len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} assets already done in {args.out}")
    try:
        stats = run_items(todo, cfg, str(args.asset_dir), shards, execute)
    except KeyboardInterrupt:
        shards.write_manifest(complete=False)
        print(f"\ninterrupted: {len(shards.statuses)} assets done; the same command resumes", file=sys.stderr)
        return 130
    except ExecutorError as e:
        print(f"render: {e}", file=sys.stderr)
        return 2
    shards.close([it.rel_path for it in items])
    if not mine:  # more parts than assets
        print(f"part {args.shard_index} of {args.num_shards}: no assets fall in it")
        return 0
    return _summary(mine, shards, stats, strict=args.strict)


def run_items(todo: list[WorkItem], cfg: RenderConfig, asset_dir: str, shards: ShardSet,
              execute: Callable = execute_local) -> dict:
    """Render ``todo`` through ``execute`` (same signature as :func:`execute_local`) into ``shards``, with a
    progress bar; returns this run's timing totals. The caller closes ``shards``."""
    from tqdm import tqdm

    stats = {"seconds": Counter(), "samples": 0, "wall": 0.0}
    ticks = Counter()
    bar = tqdm(total=len(todo) * cfg.views, unit="view", dynamic_ncols=True, smoothing=0.05)

    def progress(path: str, n: int) -> None:
        ticks[path] += n
        bar.update(n)

    def tally(st: ItemStatus) -> None:
        bar.total += ticks.pop(st.path, 0) - cfg.views  # planned views per item; a skipped one has fewer
        if st.status == "rendered":
            stats["samples"] += st.samples
            stats["seconds"].update(st.seconds)
        else:
            bar.write(f"{st.status} {st.path}: {st.reason}")
        bar.refresh()

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
            shards.record(result.status)
        tally(result.status)

    t0 = time.perf_counter()
    try:
        execute(todo, cfg, asset_dir, cfg.workers, on_result, progress)
    finally:
        bar.close()
    stats["wall"] = time.perf_counter() - t0
    return stats


def _summary(items: list[WorkItem], shards: ShardSet, stats: dict, strict: bool) -> int:
    statuses = {**shards.failed, **shards.statuses}
    by = Counter(statuses[it.rel_path].status for it in items if it.rel_path in statuses)
    wall, n = stats["wall"], stats["samples"]
    sec = stats["seconds"]
    work = sum(sec.values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / work:.0f}%" for k, v in sorted(sec.items()))
    print(f"this run: {n} samples in {wall:.1f} s, {n / max(wall, 1e-9):.2f} samples/s"
          + (f" (worker time: {shares})" if sec else ""))
    total_samples = sum(s.samples for s in shards.shards)
    print(f"dataset: {by['rendered']} assets rendered, {by['skipped']} skipped, {by['failed']} failed, "
          f"{len(items) - sum(by.values())} not done; {total_samples} samples in {len(shards.shards)} shards "
          f"({sum(s.bytes for s in shards.shards) / 1e6:.1f} MB) in {shards.out_dir}")
    reasons = Counter(s.reason for s in statuses.values() if s.status != "rendered")
    for reason, count in reasons.most_common(20):
        print(f"  {count} x {reason}")
    if by["skipped"] or by["failed"]:
        print(f"  (per asset: {shards.out_dir / 'status.tsv'})")
    if by["rendered"] == 0:
        return 1
    if strict and (by["skipped"] or by["failed"]):
        return 3
    return 0

