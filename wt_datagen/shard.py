"""Shards of one output folder: atomic tar writing, a journal for resumption, the manifest and status file.

``OUT_DIR`` holds ``{prefix}-NNNNNN.tar`` shards, ``journal.jsonl``, ``manifest.json`` and ``status.tsv``.
A shard is written as ``{name}.tmp`` and renamed once complete (after fsync), so a reader never sees a
half-written tar. An item (all samples of one asset) goes whole into one shard and counts as done only when
that shard's journal line is on disk, one line per shard, appended after the rename with fsync. After a crash
(SIGKILL included), :meth:`ShardSet.open` removes temporary shards and complete shards the journal never
recorded, so every journaled item is in exactly one shard and every other item is rendered again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

JOURNAL = "journal.jsonl"
MANIFEST = "manifest.json"
STATUS = "status.tsv"
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


class ShardSet:
    """The single writer of an output folder's shards (one per folder and prefix at a time).

    Args:
        out_dir: the folder (created).
        max_samples, max_bytes: a shard is closed once it holds this many samples or bytes; the next item
            then starts a new one, and an item is never split (one bigger than the limits gets its own shard).
        header: settings that must match to resume (e.g. the config hash); stored in the journal.
        manifest_info: extra top-level entries of ``manifest.json`` (resolved config, asset folder...).
        prefix: shard names are ``{prefix}-NNNNNN.tar``; independent writers in one folder use distinct
            prefixes and journals.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_samples: int,
        max_bytes: int,
        header: dict,
        manifest_info: dict | None = None,
        prefix: str = "shard",
        journal: str = JOURNAL,
    ):
        self.out_dir = Path(out_dir)
        self.max_samples, self.max_bytes = int(max_samples), int(max_bytes)
        self.header, self.manifest_info = header, manifest_info or {}
        self.prefix = prefix
        self.journal_path = self.out_dir / journal
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar(\.tmp)?$")
        self.shards: list[ShardInfo] = []
        self.statuses: dict[str, ItemStatus] = {}  # finished items (journaled), by path
        self.failed: dict[str, ItemStatus] = {}  # this run's unexpected failures, by path
        self._next_index = 0
        self._writer = None  # webdataset.TarWriter of the open shard
        self._file = None
        self._open: ShardInfo | None = None
        self._open_statuses: list[ItemStatus] = []

    # -- opening and recovery --------------------------------------------------------------------------

    def open(self, overwrite: bool = False) -> dict[str, ItemStatus]:
        """Start afresh (``overwrite``: this writer's shards, journal, manifest and status file removed) or
        recover a previous run. Returns the finished items (rendered or skipped), by path.

        Raises ResumeError if the journal was written with a different header.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in self._own_files():
                p.unlink()
            for name in (self.journal_path.name, MANIFEST, STATUS):
                (self.out_dir / name).unlink(missing_ok=True)
        records = self._read_journal()
        if records and records[0].get("header") != self.header:
            raise ResumeError(
                f"{self.out_dir}: holds a render with other settings ({records[0].get('header')} != "
                f"{self.header}); use --overwrite to start afresh or another --out"
            )
        if not records:
            if any(not p.name.endswith(".tmp") for p in self._own_files()):
                raise ResumeError(f"{self.out_dir}: holds shards but no {self.journal_path.name} to resume from; "
                                  "use --overwrite to start afresh or another --out")
            self._append([{"header": self.header}])
            records = self._read_journal()
        on_disk = {p.name for p in self._own_files() if not p.name.endswith(".tmp")}
        for rec in records[1:]:
            if "shard" in rec:
                info = ShardInfo(**rec["shard"])
                self._next_index = max(self._next_index, self._index(info.name) + 1)
                if info.name not in on_disk:
                    continue  # deleted by hand since: its items are rendered again
                self.shards.append(info)
            for st in rec["items"]:
                self.statuses[st["path"]] = ItemStatus(**st)
        known = {s.name for s in self.shards}
        for st in list(self.statuses.values()):
            if st.shard is not None and st.shard not in known:
                del self.statuses[st.path]
        for p in self._own_files():
            if p.name not in known:  # a temporary shard, or one renamed but never journaled
                if not p.name.endswith(".tmp"):  # a reader may have seen that name: never reuse it
                    self._next_index = max(self._next_index, self._index(p.name) + 1)
                p.unlink()
        return dict(self.statuses)

    def _own_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if self._pattern.match(p.name))

    def _index(self, name: str) -> int:
        return int(self._pattern.match(name).group(1))

    def _read_journal(self) -> list[dict]:
        """Journal records; a torn last line (killed mid-write) is cut off the file."""
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

    def record(self, status: ItemStatus) -> None:
        """Note an item without samples: a skipped one is journaled at once (not retried on resume), a
        failed one only listed in this run's manifest (retried on resume)."""
        if status.status == "failed":
            self.failed[status.path] = status
            return
        self._append([{"items": [asdict(status)]}])
        self.statuses[status.path] = status

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
        self._append([{"shard": asdict(info), "items": [asdict(s) for s in self._open_statuses]}])
        self.shards.append(info)
        for s in self._open_statuses:
            self.statuses[s.path] = s
        self._open, self._writer, self._file, self._open_statuses = None, None, None, []
        self.write_manifest(complete=False)

    def close(self, planned: list[str]) -> bool:
        """Finalise the open shard and write the manifest; returns whether every planned item (by path) is
        finished (rendered or skipped), which the manifest records as ``complete``."""
        if self._open is not None:
            self._finalise()
        complete = all(p in self.statuses for p in planned)
        self.write_manifest(complete)
        return complete

    # -- manifest --------------------------------------------------------------------------------------

    def write_manifest(self, complete: bool) -> None:
        """``manifest.json`` (shards, totals, settings, per-item status) and ``status.tsv``, both atomic."""
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
