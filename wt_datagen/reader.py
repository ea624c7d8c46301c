"""Shards to samples: the one reader of the project's tars, used by the inspector and the model's loader.

Shards are read member by member with the stdlib ``tarfile`` in streaming mode (nothing is extracted to
disk) and decoded by :func:`wt_datagen.schema.decode_files` (numpy ``allow_pickle=False``, PIL, json). Every
defect (a truncated or corrupt tar, a corrupt npz or png, a missing field) becomes one :class:`Problem`
naming shard, sample key and field; reading carries on with the next member, sample or shard.
"""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from .schema import decode_files, is_clip


class ShardError(ValueError):
    """Shard patterns that match nothing; the message is one line naming the pattern."""


@dataclass(frozen=True)
class Problem:
    """One defect: ``shard`` path, sample ``key`` ("-" for the whole shard), ``field`` such as
    ``layers.npz:depth`` or ``camera.json``, and what is wrong."""

    shard: str
    key: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key}: {self.field}: {self.message}"


@dataclass
class Sample:
    """One decoded sample. Arrays keep their stored dtypes; a file or field that failed to decode is absent
    (its problem is in ``problems``).

    Attributes:
        files: raw bytes per file name (``rgb.png``, ``layers.npz``, ...).
        rgb: (H, W, 3) uint8 image or None.
        layers: ``layers.npz`` fields (``depth`` (K, H, W) float32 camera z, ``valid`` (K, H, W) bool, ...).
        tracks: ``tracks.npz`` fields of a clip track sample.
        camera: ``camera.json`` dict; cameras: ``cameras.json`` list (clips); meta: ``meta.json`` dict.
    """

    shard: str
    key: str
    files: dict[str, bytes]
    rgb: np.ndarray | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    tracks: dict[str, np.ndarray] = field(default_factory=dict)
    camera: dict | None = None
    cameras: list | None = None
    meta: dict | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def is_clip(self) -> bool:
        return is_clip(self.files)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def problem(self, field_name: str, message: str) -> Problem:
        p = Problem(self.shard, self.key, field_name, message)
        self.problems.append(p)
        return p


# ---------------------------------------------------------------------------------------------- reading


def expand_shards(specs: str | Iterable[str]) -> list[Path]:
    """Files, folders (their ``*.tar``, recursively), globs and brace patterns (``out/shard-{000000..000009}.tar``)
    to a sorted, de-duplicated list of shard paths. Raises :class:`ShardError` naming a spec that matches
    nothing, or a brace pattern naming files that do not exist."""
    out: dict[Path, None] = {}
    for spec in [specs] if isinstance(specs, str | Path) else specs:
        matched: list[Path] = []
        missing: list[str] = []
        expanded = list(braceexpand(str(spec)))
        for pattern in expanded:
            p = Path(pattern)
            if p.is_dir():
                matched += sorted(p.rglob("*.tar"))
            elif p.is_file():
                matched.append(p)
            elif any(c in pattern for c in "*?["):
                matched += [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
            else:
                missing.append(pattern)
        if missing and len(expanded) > 1:
            head = "no shard matches: " if not matched else ""
            raise ShardError(f"{spec}: {head}{len(missing)} of {len(expanded)} files do not exist "
                             f"(first: {missing[0]})")
        if not matched:
            raise ShardError(f"{spec}: no shard matches (the pattern matches no file or folder)")
        out.update(dict.fromkeys(matched))
    return list(out)


def _end_marker_problem(path: Path, offset: int) -> str | None:
    """A tar that stops at a member boundary, or whose next header is garbage, reads as a clean end in
    ``tarfile``; the end-of-archive marker (two zero blocks) tells them apart."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024:
        return f"truncated tar: no end-of-archive marker at byte {offset}"
    if any(tail):
        return f"corrupt tar: unreadable member header at byte {offset}"
    return None


def iter_raw(paths: Iterable[Path]) -> Iterator[Sample | Problem]:
    """Undecoded samples (``files`` filled) in shard order, and a Problem for each unreadable tar part.

    Members are grouped into samples as webdataset does (consecutive members sharing the basename up to
    the first dot). A sample cut short by a damaged tar is dropped and named in the tar problem.
    """
    for path in paths:
        shard = str(path)
        key, files = None, {}
        try:
            with tarfile.open(path, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base, ext = base_plus_ext(member.name)
                    if base is None:
                        yield Problem(shard, member.name, "-", "tar member without an extension")
                        continue
                    if base != key:
                        if key is not None:
                            yield Sample(shard, key, files)
                        key, files = base, {}
                    files[ext] = tf.extractfile(member).read()
                offset = tf.offset
        except (tarfile.TarError, OSError, EOFError) as e:
            where = f"in sample {key}" if key is not None else "before the first sample"
            yield Problem(
                shard, key or "-", "tar", f"truncated or corrupt tar ({e}) {where}; rest of shard lost"
            )
            continue
        if path.suffix == ".tar":
            bad = _end_marker_problem(path, offset)
            if bad:
                yield Problem(shard, key or "-", "tar", f"{bad}; samples after {key} lost")
                continue
        if key is not None:
            yield Sample(shard, key, files)


def decode(s: Sample) -> Sample:
    """Decode ``s.files`` in place with the schema's decoder; every problem goes to ``s.problems``."""
    d = decode_files(s.files, report=s.problem)
    s.rgb, s.camera, s.cameras, s.meta = d.get("rgb"), d.get("camera"), d.get("cameras"), d.get("meta")
    s.layers, s.tracks = d.get("layers", {}), d.get("tracks", {})
    return s


def read_samples(paths: Iterable[Path]) -> Iterator[Sample | Problem]:
    """Decoded samples and tar-level problems, in shard order. The next sample is decoded in a thread while
    the caller works on this one: inflating and the numpy checks both run mostly outside the GIL."""
    with ThreadPoolExecutor(1) as pool:
        ahead = None
        for item in iter_raw(paths):
            nxt = pool.submit(decode, item) if isinstance(item, Sample) else item
            if ahead is not None:
                yield ahead.result() if isinstance(ahead, Future) else ahead
            ahead = nxt
        if ahead is not None:
            yield ahead.result() if isinstance(ahead, Future) else ahead


