"""Shards of one output folder: atomic tar writing, journals for resumption, the manifest and status file.

``OUT_DIR`` holds ``shard-*.tar`` shards, ``journal*.jsonl``, ``manifest.json`` and ``status.tsv``.
A shard is written as ``{name}.tmp`` and renamed once complete (after fsync), so a reader never sees a
half-written tar. An item (all samples of one asset) goes whole into one shard and counts as done only when
that shard's journal line is on disk, one line per shard, appended after the rename with fsync. After a crash
(SIGKILL included), :meth:`ShardSet.open` removes temporary shards and complete shards no journal recorded, so
every journaled item is in exactly one shard and every other item is rendered again.

Several writers may share a folder: the whole-dataset writer (``part=""``: ``shard-NNNNNN.tar``,
``journal.jsonl``) and part writers (``part="-p00001of00004"``: ``shard-p00001of00004-NNNNNN.tar``,
``journal-p00001of00004.jsonl``). Each also journals shards written for it by remote tasks
(:class:`ShardWriter` in another process, names ``{its prefix}-{task}-NNNNNN.tar``; :meth:`ShardSet.adopt`).
Every writer reads every journal, so an item done by any of them is done for all. A writer cleans only its
own files (its prefix's): a part writer its part's, the whole-dataset writer every shard file, so it must not
run beside other writers of the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

JOURNAL = "journal.jsonl"  # the whole-dataset writer's; a part's is journal{part}.jsonl
MANIFEST = "manifest.json"
STATUS = "status.tsv"
LOCK = ".manifest.lock"  # serialises manifest writes of the writers sharing a folder
_TAR_MTIME = 0.0  # fixed member timestamps: the same samples in the same order give the same tar bytes


class ResumeError(ValueError):
    """``OUT_DIR`` holds a render that cannot be continued with these settings."""


@dataclass
class ItemStatus:
    """What became of one work item (``path`` relative to ASSET_DIR is its key).

    status: "rendered", "skipped" (bad input, journaled: not retried) or "failed" (unexpected, retried on
    resume). ``seconds`` maps a stage (load, cast, image, encode) to the time spent in it.
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
    ):
        super().__init__(out_dir, max_samples, max_bytes, prefix=f"shard{part}")
        self.header, self.manifest_info = header, manifest_info or {}
        self.part = part
        self.journal_path = self.out_dir / f"journal{part}.jsonl"
        self._pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d{{6}})\.tar(\.tmp)?$")  # this writer's names
        # its files, its remote tasks' included (the whole-dataset writer: every writer's)
        self._scope = re.compile(rf"^{re.escape(self.prefix)}-.+\.tar(\.tmp)?$")
        self.shards: list[ShardInfo] = []  # journaled shards on disk, every writer's
        self.statuses: dict[str, ItemStatus] = {}  # finished items (journaled by any writer), by path
        self.failed: dict[str, ItemStatus] = {}  # this run's unexpected failures, by path
        self._read_upto: dict[str, int] = {}  # other writers' journals: bytes read so far, by name

    # -- opening and recovery --------------------------------------------------------------------------

    def open(self, overwrite: bool = False) -> dict[str, ItemStatus]:
        """Start afresh (``overwrite``: this writer's shards and journal removed; the whole-dataset writer's
        ``overwrite`` removes every writer's, the manifest and the status file) or recover a previous run.
        Returns the finished items (rendered or skipped, by any writer of the folder), by path.

        Raises ResumeError if a journal was written with a different header.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in self._scope_files():
                p.unlink()
            for p in self._journals():
                if p.name.startswith(self.journal_path.stem):  # journal.jsonl's stem starts every journal
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
            self._append([{"header": self.header}])
            records = self._read_journal()
        self._absorb(records[1:])
        self._absorb_others()
        self._sweep()
        return dict(self.statuses)

    def _scope_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if self._scope.match(p.name))

    def _journals(self) -> list[Path]:
        return sorted(self.out_dir.glob("journal*.jsonl"))

    def _absorb(self, records: list[dict]) -> None:
        """Take journal records (shards and item statuses) into the folder's view."""
        for rec in records:
            if "shard" in rec:
                info = ShardInfo(**rec["shard"])
                if m := self._pattern.match(info.name):
                    self._next_index = max(self._next_index, int(m.group(1)) + 1)
                if not (self.out_dir / info.name).exists():
                    continue  # deleted by hand since: its items are rendered again
                self.shards.append(info)
            for st in rec.get("items", []):
                self.statuses[st["path"]] = ItemStatus(**st)

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
            self._absorb([r for r in records if "header" not in r])

    def _sweep(self) -> None:
        """Remove this writer's files no journal knows: temporary shards, and complete ones a dead writer or
        task never got journaled."""
        known = {s.name for s in self.shards}
        for p in self._scope_files():
            if p.name not in known:
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

    def record(self, status: ItemStatus) -> None:
        """Note an item without samples: a skipped one is journaled at once (not retried on resume), a
        failed one only listed in this run's manifest (retried on resume)."""
        if status.status == "failed":
            self.failed[status.path] = status
            return
        self._append([{"items": [asdict(status)]}])
        self.statuses[status.path] = status

    def adopt(self, shard: WrittenShard) -> None:
        """Journal a shard another process wrote for this writer (named ``{self.prefix}-...``)."""
        self._commit(shard)

    def _commit(self, shard: WrittenShard) -> None:
        self._append([{"shard": asdict(shard.info), "items": [asdict(s) for s in shard.statuses]}])
        self.shards.append(shard.info)
        for s in shard.statuses:
            self.statuses[s.path] = s
        self.write_manifest(complete=False)

    def close(self, planned: list[str]) -> bool:
        """Finalise the open shard, remove files of dead tasks, and write the manifest; returns whether every
        planned item (by path) is finished (rendered or skipped) by any writer, which the manifest records as
        ``complete``."""
        self.flush()
        self._absorb_others()  # the whole-dataset writer sweeps every writer's files: know them all first
        self._sweep()
        complete = all(p in self.statuses for p in planned)
        self.write_manifest(complete)
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
            },
            "shards": [asdict(s) for s in sorted(self.shards, key=lambda s: s.name)],
            "assets": {s.path: asdict(s) for s in statuses},
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        lines = ["path\tstatus\tsamples\tshard\treason"]
        for s in statuses:
            reason = " ".join(s.reason.split())
            lines.append(f"{s.path}\t{s.status}\t{s.samples}\t{s.shard or ''}\t{reason}")
        tmp = self.out_dir / (STATUS + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.out_dir / STATUS)
