"""Executors of `wt-datagen render`: worker processes on this machine, Ray tasks, and parts of a plan for
independent jobs.

Parts (``--shard-index I --num-shards N``): an item belongs to part ``sha256(rel_path) mod N``, stable across
machines and Python runs and independent of the other items, so N jobs with no shared scheduler (a SLURM
array) render disjoint sets that together make the whole plan. Part I of N writes
``shard-pIIIIIofNNNNN-NNNNNN.tar`` and ``journal-pIIIIIofNNNNN.jsonl`` into a shared or its own ``--out``.

Ray (``--executor ray``, the ``ray`` extra; ``ray`` is imported only here, only when asked for): items go to
Ray tasks (one CPU each, one casting thread) in chunks of consecutive plan items of about one shard's worth.
A task renders its chunk with :func:`wt_datagen.pipeline.plan.render_item` and writes the rendered items into
shards of its own, ``{prefix}-r{run}-t{chunk:05d}a{attempt}-NNNNNN.tar`` (``prefix`` the job's, ``run`` random
per driver run), in ``--out``, which every node must see (a shared filesystem). The driver journals each
shard the task hands back (:meth:`wt_datagen.pipeline.shards.ShardSet.adopt`), so the one manifest holds every item. A
task that died (its worker, its node, or an error writing) runs again under new names, up to ``max_retries``
times; what a dead attempt left is removed by :meth:`~wt_datagen.pipeline.shards.ShardSet.close` or the next open.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing as mp
import os
import queue
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .config import RenderConfig
from .items import ItemResult, ProgressFn, WorkItem
from .plan import render_item
from .shards import ItemStatus, ShardSet, ShardWriter, WrittenShard

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


# -- scale-out ----------------------------------------------------------------------------------------


class ExecutorError(ValueError):
    """Scale-out settings that cannot be used: the message names the flag and the problem."""


def part_name(index: int, count: int) -> str:
    """The part's name in file names (``-p00001of00004``), ``""`` for the whole dataset (``count`` 1)."""
    if count < 1 or count > 99999:
        raise ExecutorError(f"--num-shards must be in 1..99999, got {count}")
    if not 0 <= index < count:
        raise ExecutorError(f"--shard-index must be in 0..{count - 1} (--num-shards {count}), got {index}")
    return "" if count == 1 else f"-p{index:05d}of{count:05d}"


def select_part(items: list[WorkItem], index: int, count: int) -> list[WorkItem]:
    """The items of part ``index`` of ``count`` (in plan order): those whose ``rel_path`` hashes to it."""
    part_name(index, count)  # validates
    return [it for it in items
            if int.from_bytes(hashlib.sha256(it.rel_path.encode()).digest()[:8], "big") % count == index]


def ray_executor(shards: ShardSet, address: str | None, max_retries: int) -> RayExecutor:
    """The Ray executor, or ExecutorError if Ray is not installed or a setting is wrong."""
    if max_retries < 0:
        raise ExecutorError(f"--max-retries must be at least 0, got {max_retries}")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ExecutorError("--executor ray needs Ray, an optional extra: pip install 'world-tracing[ray]'") from None
    if address:
        try:
            _check_reachable(address)
        except OSError as e:
            raise ExecutorError(f"--ray-address {address}: cannot reach the Ray cluster ({e})") from None
    return RayExecutor(shards, address, max_retries)


@dataclass
class RayExecutor:
    """Runs items in Ray tasks; called like :func:`wt_datagen.render.execute_local`, whose ``on_result`` gets
    a :class:`WrittenShard` per shard a task wrote and an :class:`ItemResult` per item without samples.

    ``address``: a running cluster (``HEAD:6379``); None starts a local instance with ``workers`` CPUs.
    """

    shards: ShardSet
    address: str | None = None
    max_retries: int = 3

    def __call__(self, items: list[WorkItem], cfg: RenderConfig, asset_dir: str, workers: int,
                 on_result: Callable[[ItemResult | WrittenShard], None], progress: ProgressFn) -> None:
        if not items:
            return
        import ray

        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
        except (OSError, RuntimeError, ValueError) as e:  # ConnectionError is an OSError
            what = f"--ray-address {self.address}: cannot join the cluster" if self.address else \
                "--executor ray: cannot start a local Ray instance"
            raise ExecutorError(f"{what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            self._run(ray, items, cfg, asset_dir, on_result, progress)
        finally:
            ray.shutdown()

    def _run(self, ray, items, cfg, asset_dir, on_result, progress) -> None:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # about one shard's worth per task, and at least two tasks per CPU while there are items for them
        size = max(1, min(self.shards.max_samples // cfg.views, -(-len(items) // (2 * cpus))))
        # paths the workers can open whatever their working folder (the relative paths stay as they are)
        items = [replace(it, path=str(Path(it.path).absolute())) for it in items]
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        # tasks run side by side: one casting thread each (render.caster_threads); workers is not in the hash
        task_cfg = ray.put(replace(cfg, workers=max(2, cpus)))
        task = ray.remote(num_cpus=1, max_retries=0)(_render_chunk)  # retried here, under new names
        reporter = ray.remote(num_cpus=0)(_Progress).remote()
        out_dir, root = str(self.shards.out_dir.absolute()), str(Path(asset_dir).absolute())
        limits = (self.shards.max_samples, self.shards.max_bytes)
        gl_platform = os.environ.get("PYOPENGL_PLATFORM", "")
        run = secrets.token_hex(4)
        reported = Counter()  # views reported per item, taken back if its task dies

        def submit(i: int, attempt: int):
            prefix = f"{self.shards.prefix}-r{run}-t{i:05d}a{attempt}"
            ref = task.remote(chunks[i], task_cfg, root, out_dir, prefix, limits, reporter, gl_platform)
            pending[ref] = (i, attempt)

        def drain() -> None:
            for path, n in ray.get(reporter.take.remote()):
                reported[path] += n
                progress(path, n)

        pending: dict = {}
        for i in range(len(chunks)):
            submit(i, 0)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                drain()  # a finished task's reports are in (it waits for them before returning)
                for ref in ready:
                    i, attempt = pending.pop(ref)
                    try:
                        written, others = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        for it in chunks[i]:  # the next attempt reports its views again
                            progress(it.rel_path, -reported.pop(it.rel_path, 0))
                        if attempt < self.max_retries:
                            submit(i, attempt + 1)
                            continue
                        msg = str(e).strip().splitlines()
                        reason = f"ray task died {attempt + 1} times: {type(e).__name__}: {msg[0] if msg else ''}"
                        for it in chunks[i]:
                            on_result(ItemResult(ItemStatus(it.rel_path, it.kind, status="failed", reason=reason)))
                        continue
                    for it in chunks[i]:
                        reported.pop(it.rel_path, None)
                    for shard in written:
                        on_result(shard)
                    for st in others:
                        on_result(ItemResult(st))
        finally:
            for ref in pending:  # interrupted: stop the tasks still running (their files are swept later)
                ray.cancel(ref, force=True)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (``ray.init`` waits minutes before giving up)."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:
        socket.create_connection((host, int(port)), timeout=timeout).close()


class _Progress:
    """A Ray actor: views done, reported by the tasks as they go, taken by the driver for its progress bar."""

    def __init__(self) -> None:
        self._reports: list[tuple[str, int]] = []

    def add(self, path: str, n: int) -> None:
        self._reports.append((path, n))

    def take(self) -> list[tuple[str, int]]:
        reports, self._reports = self._reports, []
        return reports


def _render_chunk(items: list[WorkItem], cfg: RenderConfig, asset_dir: str, out_dir: str, prefix: str,
                  limits: tuple[int, int], reporter, gl_platform: str) -> tuple[list[WrittenShard], list[ItemStatus]]:
    """A Ray task: render ``items`` in order into shards ``{prefix}-NNNNNN.tar`` of ``out_dir``; returns the
    shards written and the statuses of the items without samples (skipped or failed)."""
    import ray

    if gl_platform:  # the driver's OpenGL platform, before pyrender is imported (late, by items.item_image)
        os.environ.setdefault("PYOPENGL_PLATFORM", gl_platform)
    writer = ShardWriter(out_dir, *limits, prefix=prefix)
    others, last = [], None

    def report(path: str, n: int) -> None:
        nonlocal last
        last = reporter.add.remote(path, n)

    for item in items:
        result = render_item(item, cfg, asset_dir, report)
        if result.status.status == "rendered":
            writer.add(result.status, result.samples)
        else:
            others.append(result.status)
    writer.flush()
    if last is not None:
        ray.get(last)  # one caller's actor calls run in order: every report is in before the driver hears
    return writer.written, others
