"""Shards of one output folder: atomic tar writing, journals for resumption, the manifest and status file.

``OUT_DIR`` holds ``shard-*.tar`` shards, ``journal*.jsonl``, ``manifest.json``, ``status.tsv`` and, when an
item failed unexpectedly, ``failures*.log`` (its traceback). A shard is written as ``{name}.tmp`` and renamed
once complete (after fsync), so a reader never sees a half-written tar. An item (all samples of one asset)
goes whole into one shard and counts as done only when that shard's journal line is on disk, one line per
shard, appended after the rename with fsync. After a crash (SIGKILL included), :meth:`ShardSet.open` removes
temporary shards and complete shards no journal recorded, so every journaled item is in exactly one shard and
every other item is rendered again.

The journal also records each item's history: ``start`` before it runs (with the worker's pid), ``died`` when
its worker process died under it, ``failed`` (an unexpected error: rendered again by the next run), and
``accept`` (a changed asset whose samples were kept). Its header records the config hash and the package
version.

Several writers may share a folder: the whole-dataset writer (``part=""``: ``shard-NNNNNN.tar``,
``journal.jsonl``) and part writers (``part="-p00001of00004"``: ``shard-p00001of00004-NNNNNN.tar``,
``journal-p00001of00004.jsonl``). Each also journals shards written for it by remote tasks
(:class:`ShardWriter` in another process, names ``{its prefix}-{task}-NNNNNN.tar``; :meth:`ShardSet.adopt`).
Every writer reads every journal, so an item done by any of them is done for all. A running writer holds an
exclusive lock on ``.writer{part}.lock``; writers running side by side must be parts of one split (the same
``--num-shards``). A writer removes every shard file no journal recorded whose writer is not running (its own
included), so leftovers of a dead run are removed whatever split the next run uses.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

JOURNAL = "journal.jsonl"  # the whole-dataset writer's; a part's is journal{part}.jsonl
MANIFEST = "manifest.json"
STATUS = "status.tsv"
LOCK = ".manifest.lock"  # serialises manifest writes of the writers sharing a folder
WRITER_LOCK = ".writer{}.lock"  # held by the running writer of a part ("" for the whole dataset)
FAILURES = "failures{}.log"  # tracebacks of unexpected failures, per part
_OWNER = re.compile(r"^shard(-p\d{5}of\d{5})?-")  # the part a shard file belongs to
_TAR_MTIME = 0.0  # fixed member timestamps: the same samples in the same order give the same tar bytes


class ResumeError(ValueError):
    """``OUT_DIR`` holds a render that cannot be continued with these settings."""


class VersionChanged(ResumeError):
    """``OUT_DIR`` holds samples rendered by another version of the package."""


@dataclass
class ItemStatus:
    """What became of one work item (``path`` relative to ASSET_DIR is its key).

    status: "rendered", "skipped" (bad input, journaled: not retried) or "failed" (unexpected, retried on
    resume; or its worker died ``max_crashes`` times: not retried). ``seconds`` maps a stage (load, cast,
    image, encode) to the time spent in it. ``warnings``: what was read differently from the file's intent (a
    missing texture rendered untextured). ``sha256``: the content hash of its files when rendered; ``stamp``:
    a digest of their sizes and modification times then (a cheap first test for a change).
    """

    path: str
    kind: str = "asset"
    item_id: str = ""
    status: str = "rendered"
    reason: str = ""
    samples: int = 0
    shard: str | None = None
    image: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sha256: str = ""
    stamp: str = ""


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    items: list[str]


@dataclass
class WrittenShard:
    """A shard under its final name and its items' statuses (``shard`` set), not journaled yet."""

    info: ShardInfo
    statuses: list[ItemStatus]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (readers see old or new, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """Writes items into ``{prefix}-NNNNNN.tar`` shards in ``out_dir`` (no journal: a remote task's writer).

    Args:
        out_dir: the folder (it exists).
        max_samples, max_bytes: a shard is closed once it holds this many samples or bytes; the next item
            then starts a new one, and an item is never split (one bigger than the limits gets its own shard).
        prefix: shard names are ``{prefix}-NNNNNN.tar``, numbered from 0.

    Each shard, once renamed to its final name, goes to :meth:`_commit`; here it is kept in ``written`` for
    the process that journals it (:meth:`ShardSet.adopt`).
    """

    def __init__(self, out_dir: str | Path, max_samples: int, max_bytes: int, prefix: str):
        self.out_dir = Path(out_dir)
        self.max_samples, self.max_bytes = int(max_samples), int(max_bytes)
        self.prefix = prefix
        self.written: list[WrittenShard] = []
        self._next_index = 0
        self._writer = None  # webdataset.TarWriter of the open shard
        self._file = None
        self._open: ShardInfo | None = None
        self._open_statuses: list[ItemStatus] = []

    def add(self, status: ItemStatus, samples: list[dict]) -> None:
        """Write one rendered item's samples (dicts of bytes with ``__key__``), all into the same shard."""
        size = sum(len(v) for s in samples for k, v in s.items() if k != "__key__")
        cur = self._open
        if cur and (cur.samples + len(samples) > self.max_samples or cur.bytes + size > self.max_bytes):
            self._finalise()
        if self._open is None:
            name = f"{self.prefix}-{self._next_index:06d}.tar"
            self._next_index += 1
            # imported here: webdataset imports torch (~1.5 s, ~300 MB), which only the writing process needs
            from webdataset import TarWriter

            self._file = open(self.out_dir / (name + ".tmp"), "wb")
            self._writer = TarWriter(self._file, encoder=False, mtime=_TAR_MTIME)
            self._open = ShardInfo(name, 0, 0, [])
        for s in samples:
            self._writer.write(s)
        status.shard = self._open.name
        self._open.samples += len(samples)
        self._open.bytes += size
        self._open.items.append(status.path)
        self._open_statuses.append(status)
        if self._open.samples >= self.max_samples or self._open.bytes >= self.max_bytes:
            self._finalise()

    def flush(self) -> None:
        """Finalise the open shard, if any."""
        if self._open is not None:
            self._finalise()

    def _finalise(self) -> None:
        info = self._open
        self._writer.close()  # closes the tar stream, not our file
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp, final = self.out_dir / (info.name + ".tmp"), self.out_dir / info.name
        info.bytes = tmp.stat().st_size  # the tar's size on disk (headers and padding included)
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)
        shard = WrittenShard(info, self._open_statuses)
        self._open, self._writer, self._file, self._open_statuses = None, None, None, []
        self._commit(shard)

    def _commit(self, shard: WrittenShard) -> None:
        self.written.append(shard)


class ShardSet(ShardWriter):
    """A writer of an output folder: its shards, its journal, and the folder's manifest.

    Args:
        out_dir: the folder (created).
        max_samples, max_bytes: shard limits (:class:`ShardWriter`).
        header: settings that must match to resume (e.g. the config hash); stored in every journal, and every
            journal in the folder must hold the same.
        manifest_info: extra top-level entries of ``manifest.json`` (resolved config, asset folder...).
        part: ``""`` for the whole dataset, else a part's name (``-p00001of00004``): shards
            ``shard{part}-NNNNNN.tar``, journal ``journal{part}.jsonl``. One writer per part at a time.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_samples: int,
        max_bytes: int,
        header: dict,
        manifest_info: dict | None = None,
        part: str = "",
        version: str = "",
    ):
        super().__init__(out_dir, max_samples, max_bytes, prefix=f"shard{part}")
        self.header, self.manifest_info = header, manifest_info or {}
        self.part, self.version = part, version
        self.journal_path = self.out_dir / f"journal{part}.jsonl"
        self._pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d{{6}})\.tar(\.tmp)?$")  # this writer's names
        # its files, its remote tasks' included (the whole-dataset writer: every writer's)
        self._scope = re.compile(rf"^{re.escape(self.prefix)}-.+\.tar(\.tmp)?$")
        self.shards: list[ShardInfo] = []  # journaled shards on disk, every writer's
        self.statuses: dict[str, ItemStatus] = {}  # finished items (journaled by any writer), by path
        self.failed: dict[str, ItemStatus] = {}  # unexpected failures not rendered since, by path
        self.deaths: dict[str, list[str]] = {}  # reasons of the worker deaths under each item, every run's
        self.versions: dict[str, str] = {}  # the latest package version in each journal's headers
        self._last: dict[str, str] = {}  # each item's latest journal event: start, died or end
        self._read_upto: dict[str, int] = {}  # other writers' journals: bytes read so far, by name
        self._lock_file = None

    # -- opening and recovery --------------------------------------------------------------------------

    def open(self, overwrite: bool = False, keep_going: bool = False) -> dict[str, ItemStatus]:
        """Start afresh (``overwrite``: this writer's shards and journal removed; the whole-dataset writer's
        ``overwrite`` removes every writer's, the manifest and the status file) or recover a previous run.
        Returns the finished items (rendered or skipped, by any writer of the folder), by path.

        Raises ResumeError if a journal was written with a different header or another writer that cannot
        run beside this one is running; VersionChanged if a journal was last written by another package
        version (``keep_going``: go on, recording this version).
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_writer()
        try:
            return self._recover(overwrite, keep_going)
        except BaseException:
            self.release()
            raise

    def _recover(self, overwrite: bool, keep_going: bool) -> dict[str, ItemStatus]:
        if overwrite:
            for p in self._scope_files():
                p.unlink()
            for p in self._journals():
                if p.name.startswith(self.journal_path.stem):  # journal.jsonl's stem starts every journal
                    p.unlink()
            for p in self.out_dir.glob(FAILURES.format("*" if not self.part else self.part)):
                p.unlink()
            if not self.part:
                for name in (MANIFEST, STATUS):
                    (self.out_dir / name).unlink(missing_ok=True)
        records = self._read_journal()
        if records and records[0].get("header") != self.header:
            raise ResumeError(
                f"{self.out_dir}: holds a render with other settings ({records[0].get('header')} != "
                f"{self.header}); use --overwrite to start afresh or another --out"
            )
        if not records:
            others = [p for p in self._journals() if p != self.journal_path]
            if not others and any(not p.name.endswith(".tmp") for p in self._scope_files()):
                raise ResumeError(f"{self.out_dir}: holds shards but no {self.journal_path.name} to resume from; "
                                  "use --overwrite to start afresh or another --out")
            self._append([{"header": self.header, "version": self.version}])
            records = self._read_journal()
        self._absorb(records, self.journal_path.name)
        self._absorb_others()
        old = {name: v for name, v in self.versions.items() if v != self.version}
        if old:
            if not keep_going:
                name, v = sorted(old.items())[0]
                raise VersionChanged(
                    f"{self.out_dir}: holds samples rendered by version {v or 'unknown'} ({name}; this is "
                    f"{self.version}): --overwrite starts afresh, --keep-going keeps them and renders the rest "
                    f"with {self.version}")
            self._append([{"header": self.header, "version": self.version}])
            self.versions[self.journal_path.name] = self.version
            for name in old:  # accepted for this run; other writers' journals keep their record
                self.versions[name] = self.version
        self._sweep()
        return dict(self.statuses)

    def _lock_writer(self) -> None:
        """Hold this part's writer lock; refuse when a writer of another split runs in the folder."""
        if self._lock_file is not None:
            return
        path = self.out_dir / WRITER_LOCK.format(self.part)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise ResumeError(f"{self.out_dir}: another render (pid {pid}) is writing {self._what(self.part)} "
                              "here; wait for it or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        count = self.part.rsplit("of", 1)[-1] if self.part else ""
        for other in self.out_dir.glob(WRITER_LOCK.format("*")):
            part = other.name[len(".writer"):-len(".lock")]
            if part == self.part or not self._running(part):
                continue
            if not part or not count or part.rsplit("of", 1)[-1] != count:
                self.release()
                raise ResumeError(f"{self.out_dir}: another render is writing {self._what(part)} here; jobs "
                                  "running side by side in one folder must be parts of one --num-shards")

    @staticmethod
    def _what(part: str) -> str:
        if not part:
            return "the whole dataset"
        index, count = part[2:].split("of")
        return f"part {int(index)} of {int(count)}"

    def _running(self, part: str) -> bool:
        """Whether the writer of ``part`` holds its lock (this writer counts as running)."""
        if part == self.part and self._lock_file is not None:
            return True
        path = self.out_dir / WRITER_LOCK.format(part)
        try:
            with open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False  # closing the file releases the probe lock
        except OSError:
            return True

    def release(self) -> None:
        """Give up the writer lock (also released when the process ends)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _scope_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if self._scope.match(p.name))

    def _journals(self) -> list[Path]:
        return sorted(self.out_dir.glob("journal*.jsonl"))

    def _absorb(self, records: list[dict], journal: str) -> None:
        """Take journal records (shards, item statuses and histories) into the folder's view."""
        for rec in records:
            if "header" in rec:
                self.versions[journal] = rec.get("version", "")
            if "shard" in rec:
                info = ShardInfo(**rec["shard"])
                if m := self._pattern.match(info.name):
                    self._next_index = max(self._next_index, int(m.group(1)) + 1)
                if not (self.out_dir / info.name).exists():
                    for st in rec.get("items", []):
                        self._last[st["path"]] = "end"
                    continue  # deleted by hand since: its items are rendered again
                self.shards.append(info)
            for st in rec.get("items", []):
                self.statuses[st["path"]] = ItemStatus(**st)
                self.failed.pop(st["path"], None)
                self._last[st["path"]] = "end"
            if "start" in rec:
                self._last[rec["start"]] = "start"
            if "died" in rec:
                self.deaths.setdefault(rec["died"], []).append(rec.get("reason", ""))
                self._last[rec["died"]] = "died"
            if "failed" in rec:
                st = ItemStatus(**rec["failed"])
                self.failed[st.path] = st
                self._last[st.path] = "end"
            if "accept" in rec and rec["accept"] in self.statuses:
                self.statuses[rec["accept"]].sha256 = rec.get("sha256", "")
                self.statuses[rec["accept"]].stamp = rec.get("stamp", "")

    def _absorb_others(self) -> None:
        """Read what the folder's other writers journaled since the last call (their whole lines only: a
        writer may be appending one right now; a torn line of a dead one is cut by its next open)."""
        for path in self._journals():
            if path == self.journal_path:
                continue
            start = self._read_upto.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            data = data[: data.rfind(b"\n") + 1]
            try:
                records = [json.loads(line) for line in data.splitlines()]
            except ValueError:
                raise ResumeError(f"{path}: not a journal (a line is not JSON)") from None
            self._read_upto[path.name] = start + len(data)
            if start == 0 and records and records[0].get("header") != self.header:
                raise ResumeError(f"{path}: written with other settings ({records[0].get('header')} != "
                                  f"{self.header}); use another --out")
            self._absorb(records, path.name)

    def _sweep(self) -> None:
        """Remove shard files no journal knows whose writer is not running (this writer's own included):
        temporary shards, and complete ones a dead writer or task never got journaled."""
        known = {s.name for s in self.shards}
        running: dict[str, bool] = {}
        for p in sorted(self.out_dir.glob("shard*")):
            owner = _OWNER.match(p.name)
            if p.name in known or owner is None or not p.name.endswith((".tar", ".tar.tmp")):
                continue
            part = owner.group(1) or ""
            if part not in running:
                running[part] = part != self.part and self._running(part)
            if running[part]:
                continue  # a live writer's shard, not journaled yet
            m = self._pattern.match(p.name)
            if m and not p.name.endswith(".tmp"):  # a reader may have seen that name: never reuse it
                self._next_index = max(self._next_index, int(m.group(1)) + 1)
            p.unlink(missing_ok=True)

    def _read_journal(self) -> list[dict]:
        """This writer's journal records; a torn last line (killed mid-write) is cut off the file."""
        if not self.journal_path.exists():
            return []
        records, good = [], 0
        data = self.journal_path.read_bytes()
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
        if good < len(data):
            with open(self.journal_path, "r+b") as f:
                f.truncate(good)
        return records

    def _append(self, records: list[dict]) -> None:
        """Append records as lines in one write, then fsync: on disk whole or (torn) cut off on reading."""
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        with open(self.journal_path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    # -- writing ---------------------------------------------------------------------------------------

    def record(self, status: ItemStatus, traceback: str = "") -> None:
        """Note an item without samples: a skipped one is journaled as finished (not retried on resume), a
        failed one as failed (retried on resume, unless its worker died too often); a traceback goes to the
        failure log."""
        if status.status == "failed":
            self._append([{"failed": asdict(status)}])
            self.failed[status.path] = status
            self._last[status.path] = "end"
            if traceback:
                with open(self.out_dir / FAILURES.format(self.part), "a") as f:
                    f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {status.path}: {status.reason}\n"
                            f"{traceback.rstrip()}\n")
            return
        self._append([{"items": [asdict(status)]}])
        self.statuses[status.path] = status
        self.failed.pop(status.path, None)
        self._last[status.path] = "end"

    # -- item history ----------------------------------------------------------------------------------

    def started(self, path: str, pid: int) -> None:
        """Journal that ``path`` is about to run in process ``pid`` (before it runs)."""
        self._append([{"start": path, "pid": pid}])
        self._last[path] = "start"

    def died(self, path: str, reason: str) -> int:
        """Journal that the worker process running ``path`` died; returns the item's deaths so far."""
        self._append([{"died": path, "reason": reason}])
        self.deaths.setdefault(path, []).append(reason)
        self._last[path] = "died"
        return len(self.deaths[path])

    def suspect(self, path: str) -> bool:
        """Whether ``path`` was started and never ended: its run was killed while it rendered (by the user,
        or by the item itself in a run without worker processes)."""
        return self._last.get(path) == "start"

    def accept(self, status: ItemStatus, sha256: str, stamp: str) -> None:
        """Journal that a rendered item's files changed and its samples are kept as they are."""
        self._append([{"accept": status.path, "sha256": sha256, "stamp": stamp}])
        status.sha256, status.stamp = sha256, stamp

    def adopt(self, shard: WrittenShard) -> None:
        """Journal a shard another process wrote for this writer (named ``{self.prefix}-...``)."""
        self._commit(shard)

    def _commit(self, shard: WrittenShard) -> None:
        self._append([{"shard": asdict(shard.info), "items": [asdict(s) for s in shard.statuses]}])
        self.shards.append(shard.info)
        for s in shard.statuses:
            self.statuses[s.path] = s
            self.failed.pop(s.path, None)
            self._last[s.path] = "end"
        self.write_manifest(complete=False)

    def close(self, planned: list[str], final: set[str] = frozenset()) -> bool:
        """Finalise the open shard, remove files of dead tasks, write the manifest and release the writer
        lock; returns whether every planned item (by path) is finished (rendered or skipped by any writer, or
        in ``final``: failed for good), which the manifest records as ``complete``."""
        self.flush()
        self._absorb_others()  # know every writer's shards before sweeping
        self._sweep()
        complete = all(p in self.statuses or p in final for p in planned)
        self.write_manifest(complete)
        self.release()
        return complete

    # -- manifest --------------------------------------------------------------------------------------

    @contextmanager
    def _manifest_lock(self):
        with open(self.out_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released on close
            yield

    def write_manifest(self, complete: bool) -> None:
        """``manifest.json`` (shards, totals, settings, per-item status) and ``status.tsv``, both atomic, over
        every writer's journal (read under a lock, so the last writer to finish writes the whole folder)."""
        with self._manifest_lock():
            self._absorb_others()
            self._write_manifest(complete)

    def _write_manifest(self, complete: bool) -> None:
        statuses = sorted({**self.failed, **self.statuses}.values(), key=lambda s: s.path)
        manifest = {
            **self.manifest_info,
            "complete": complete,
            "totals": {
                "shards": len(self.shards),
                "samples": sum(s.samples for s in self.shards),
                "bytes": sum(s.bytes for s in self.shards),
                "rendered": sum(s.status == "rendered" for s in statuses),
                "skipped": sum(s.status == "skipped" for s in statuses),
                "failed": sum(s.status == "failed" for s in statuses),
                "warnings": sum(bool(s.warnings) for s in statuses),
            },
            "shards": [asdict(s) for s in sorted(self.shards, key=lambda s: s.name)],
            "assets": {s.path: asdict(s) for s in statuses},
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        lines = ["path\tstatus\tsamples\tshard\treason\twarnings"]
        for s in statuses:
            reason = " ".join(s.reason.split())
            warnings = " | ".join(" ".join(w.split()) for w in s.warnings)
            lines.append(f"{s.path}\t{s.status}\t{s.samples}\t{s.shard or ''}\t{reason}\t{warnings}")
        tmp = self.out_dir / (STATUS + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.out_dir / STATUS)
