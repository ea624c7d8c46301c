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

import hashlib
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import secrets
import signal
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from .config import RenderConfig
from .items import ItemResult, ProgressFn, WorkItem
from .plan import render_item
from .shards import ItemStatus, ShardSet, ShardWriter, WrittenShard

# -- local executor ------------------------------------------------------------------------------------


class Attempts(Protocol):
    """The item history an executor keeps (:class:`~wt_datagen.pipeline.shards.ShardSet` is one)."""

    def started(self, path: str, pid: int) -> None: ...
    def died(self, path: str, reason: str) -> int: ...
    def suspect(self, path: str) -> bool: ...


class _NoHistory:
    """Attempts kept in memory only (executors called without a journal)."""

    def __init__(self) -> None:
        self.deaths: Counter = Counter()

    def started(self, path: str, pid: int) -> None:
        pass

    def died(self, path: str, reason: str) -> int:
        self.deaths[path] += 1
        return self.deaths[path]

    def suspect(self, path: str) -> bool:
        return False


def death_reason(exitcode: int | None) -> str:
    """What ended a worker process, from its exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def crash_result(item: WorkItem, deaths: int, reason: str) -> ItemResult:
    reason = f"killed its worker process {deaths} times (last: {reason}); not retried"
    return ItemResult(ItemStatus(item.rel_path, item.kind, item.item_id, status="failed", reason=reason))


def _worker_main(conn, cfg: RenderConfig, asset_dir: str) -> None:
    """A worker process: render the items the parent sends, one at a time, until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the workers

    def progress(path: str, n: int) -> None:
        conn.send(("progress", path, n))

    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(("result", render_item(item, cfg, asset_dir, progress)))


class _Worker:
    """One worker process and its pipe; ``job`` is the (plan index, item) it is rendering."""

    def __init__(self, ctx, cfg: RenderConfig, asset_dir: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, cfg, asset_dir), daemon=True)
        self.process.start()
        child.close()
        self.job: tuple[int, WorkItem] | None = None

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def execute_local(
    items: list[WorkItem],
    cfg: RenderConfig,
    asset_dir: str,
    workers: int,
    on_result: Callable[[ItemResult], None],
    progress: ProgressFn,
    attempts: Attempts | None = None,
) -> None:
    """Render ``items``; ``on_result`` gets the results in plan order.

    With ``workers`` 1 items render in this process, except *suspects* (started by an earlier run and never
    ended: perhaps they killed it), which render in a worker process. Otherwise in ``workers`` processes
    ('spawn': the caster's thread pools do not survive fork), at most 2 x workers items in flight or waiting,
    which bounds memory. Every item is journaled (``attempts.started``, with the worker's pid) before it runs.
    A worker that dies takes only its own item down: the death is journaled against that item, the worker is
    replaced, and the item runs again until it has killed ``cfg.max_crashes`` workers (over all runs); it is
    then failed (not retried) and the run goes on.
    """
    attempts = attempts or _NoHistory()
    if workers > 1:
        _Pool(items, cfg, asset_dir, workers, on_result, progress, attempts).run()
        return
    for item in items:
        if attempts.suspect(item.rel_path):  # isolated: if it kills its process, this run survives
            _Pool([item], cfg, asset_dir, 1, on_result, progress, attempts).run()
        else:
            attempts.started(item.rel_path, os.getpid())
            on_result(render_item(item, cfg, asset_dir, progress))


class _Pool:
    """Worker processes rendering a plan, results handed on in plan order (see :func:`execute_local`)."""

    def __init__(self, items, cfg, asset_dir, workers, on_result, progress, attempts: Attempts):
        self.items, self.cfg, self.asset_dir = items, cfg, asset_dir
        self.on_result, self.progress, self.attempts = on_result, progress, attempts
        self.size = workers
        self.ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.done: dict[int, ItemResult] = {}
        self.queue: list[int] = []  # plan indices waiting for a worker, in order
        self.next_index = 0  # next plan index not yet queued
        self.flushed = 0  # results handed on so far

    def run(self) -> None:
        try:
            while self.flushed < len(self.items):
                limit = self.flushed + 2 * self.size
                while self.next_index < min(len(self.items), limit):
                    self.queue.append(self.next_index)
                    self.next_index += 1
                self._assign()
                self._wait()
                while self.flushed in self.done:
                    self.on_result(self.done.pop(self.flushed))
                    self.flushed += 1
        finally:
            for w in self.workers:
                if w.job is not None:  # interrupted mid-item: no point waiting for it
                    w.process.kill()
                w.stop()

    def _assign(self) -> None:
        idle = [w for w in self.workers if w.job is None]
        while self.queue and (idle or len(self.workers) < self.size):
            if not idle:
                self.workers.append(_Worker(self.ctx, self.cfg, self.asset_dir))
                idle.append(self.workers[-1])
            w = idle.pop(0)
            index = self.queue.pop(0)
            item = self.items[index]
            self.attempts.started(item.rel_path, w.process.pid)  # journaled before it runs
            w.job = (index, item)
            try:
                w.conn.send(item)
            except OSError:  # it died already (killed from outside): a death under this item
                w.process.join()
                self._died(w)

    def _wait(self) -> None:
        busy = [w for w in self.workers if w.job is not None]
        if not busy:
            return
        mp_connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
        for w in busy:
            try:
                while w.job is not None and w.conn.poll():
                    kind, *payload = w.conn.recv()
                    if kind == "progress":
                        self.progress(*payload)
                    else:
                        self.done[w.job[0]] = payload[0]
                        w.job = None
            except (EOFError, OSError):
                pass
            if w.job is not None and not w.process.is_alive():
                self._died(w)

    def _died(self, w: _Worker) -> None:
        index, item = w.job
        w.process.join()
        reason = death_reason(w.process.exitcode)
        w.conn.close()
        self.workers.remove(w)
        deaths = self.attempts.died(item.rel_path, reason)
        if deaths >= self.cfg.max_crashes:
            self.done[index] = crash_result(item, deaths, reason)
        else:
            self.queue.insert(0, index)  # again, in a new worker, before the items after it


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
                 on_result: Callable[[ItemResult | WrittenShard], None], progress: ProgressFn,
                 attempts: Attempts | None = None) -> None:
        if not items:
            return
        attempts = attempts or _NoHistory()
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
            self._run(ray, items, cfg, asset_dir, on_result, progress, attempts)
        finally:
            ray.shutdown()

    def _run(self, ray, items, cfg, asset_dir, on_result, progress, attempts: Attempts) -> None:
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
        running: dict[str, str] = {}  # task prefix -> the item it started last (tasks render in order)

        def submit(i: int, attempt: int, retries: int):
            prefix = f"{self.shards.prefix}-r{run}-t{i:05d}a{attempt}"
            ref = task.remote(chunks[i], task_cfg, root, out_dir, prefix, limits, reporter, gl_platform)
            pending[ref] = (i, attempt, retries, prefix)

        def drain() -> None:
            for report in ray.get(reporter.take.remote()):
                if report[0] == "start":  # (start, task prefix, path, pid): journaled before the item runs
                    running[report[1]] = report[2]
                    attempts.started(report[2], report[3])
                else:
                    reported[report[1]] += report[2]
                    progress(report[1], report[2])

        pending: dict = {}
        for i in range(len(chunks)):
            submit(i, 0, 0)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                drain()  # a finished task's reports are in (it waits for them before returning)
                for ref in ready:
                    i, attempt, retries, prefix = pending.pop(ref)
                    try:
                        written, others = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        for it in chunks[i]:  # the next attempt reports its views again
                            progress(it.rel_path, -reported.pop(it.rel_path, 0))
                        msg = str(e).strip().splitlines()
                        reason = f"ray task died: {type(e).__name__}: {msg[0] if msg else ''}"[:300]
                        culprit = next((it for it in chunks[i] if it.rel_path == running.get(prefix)), None)
                        if culprit is not None:  # the item it was rendering: a death of its own
                            if attempts.died(culprit.rel_path, reason) >= cfg.max_crashes:
                                on_result(crash_result(culprit, cfg.max_crashes, reason))
                                chunks[i] = [it for it in chunks[i] if it is not culprit]
                            if chunks[i]:
                                submit(i, attempt + 1, retries)
                            continue
                        if retries < self.max_retries:
                            submit(i, attempt + 1, retries + 1)
                            continue
                        for it in chunks[i]:
                            on_result(ItemResult(ItemStatus(it.rel_path, it.kind, it.item_id, status="failed",
                                                            reason=f"{reason} ({retries + 1} times)")))
                        continue
                    for it in chunks[i]:
                        reported.pop(it.rel_path, None)
                    for shard in written:
                        on_result(shard)
                    for result in others:
                        on_result(result)
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
        self._reports: list[tuple] = []

    def add(self, path: str, n: int) -> None:
        self._reports.append(("progress", path, n))

    def start(self, prefix: str, path: str, pid: int) -> None:
        self._reports.append(("start", prefix, path, pid))

    def take(self) -> list[tuple]:
        reports, self._reports = self._reports, []
        return reports


def _render_chunk(items: list[WorkItem], cfg: RenderConfig, asset_dir: str, out_dir: str, prefix: str,
                  limits: tuple[int, int], reporter, gl_platform: str) -> tuple[list[WrittenShard], list[ItemResult]]:
    """A Ray task: render ``items`` in order into shards ``{prefix}-NNNNNN.tar`` of ``out_dir``, telling the
    driver which item starts before it runs; returns the shards written and the results of the items
    without samples (skipped or failed)."""
    import ray

    if gl_platform:  # the driver's OpenGL platform, before pyrender is imported (late, by items.item_image)
        os.environ.setdefault("PYOPENGL_PLATFORM", gl_platform)
    writer = ShardWriter(out_dir, *limits, prefix=prefix)
    others, last = [], None

    def report(path: str, n: int) -> None:
        nonlocal last
        last = reporter.add.remote(path, n)

    for item in items:
        ray.get(reporter.start.remote(prefix, item.rel_path, os.getpid()))  # the driver knows before it runs
        result = render_item(item, cfg, asset_dir, report)
        if result.status.status == "rendered":
            writer.add(result.status, result.samples)
        else:
            others.append(result)
    writer.flush()
    if last is not None:
        ray.get(last)  # one caller's actor calls run in order: every report is in before the driver hears
    return writer.written, others
