"""The plan of a render: which items an asset folder holds, and the one entry point that renders any item."""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from ..inputs.assets import AssetError, asset_id_for, discover_assets, file_sha256
from ..inputs.meshes import InputError
from ..inputs.sequences import (
    SCENE_FILE,
    SEQUENCE_FILE,
    files_digest,
    find_sequences,
    frame_count,
    sequence_id,
    static_files,
)
from .cameras import clip_length
from .config import RenderConfig
from .dynamic import render_sequence, sequence_source
from .items import ItemResult, ProgressFn, WorkItem
from .shards import ItemStatus
from .static import render_asset

# Work kinds and their render functions: (item, cfg, asset_dir, progress) -> ItemResult.
RENDERERS: dict[str, Callable[..., ItemResult]] = {"asset": render_asset, "sequence": render_sequence}


class PlanError(AssetError):
    """A plan that cannot be rendered as asked (two items with one key)."""


def plan_items(asset_dir: str | Path, limit: int | None = None, detect: str = "auto") -> list[WorkItem]:
    """The static assets and sequences under ``asset_dir`` in a stable order (by relative path), the first
    ``limit`` of them. ``detect``: how mesh sequences are found (``inputs.sequences.find_sequences``).

    Raises :class:`PlanError` (one line) if two items would write samples under one key.
    """
    root = Path(asset_dir)
    sequences = find_sequences(root, detect) if root.is_dir() else []
    items = []
    for p in static_files(discover_assets(root), sequences):  # a sequence's files are not assets
        rel = p.relative_to(root).as_posix()
        items.append(WorkItem("asset", str(p), rel, asset_id_for(rel)))
    for s in sequences:
        frames = tuple(f.name for f in s.files) if s.kind == "mesh_sequence" else ()
        items.append(WorkItem("sequence", str(s.path), s.rel_path(root), sequence_id(s, root), frames))
    items.sort(key=lambda it: it.rel_path)
    owners: dict[str, str] = {}
    for it in items:  # the last guard: ids are unique by construction (inputs.assets.asset_id_for)
        other = owners.setdefault(it.item_id, it.rel_path)
        if other != it.rel_path:
            raise PlanError(f"{root}: {other} and {it.rel_path} would write samples under one key "
                            f"{it.item_id!r}; rename one of them")
    return items[:limit] if limit is not None else items


def item_files(item: WorkItem) -> list[Path]:
    """The files an item's samples are made from, in the order its content hash reads them: the asset
    file; a mesh sequence's frames; a scene.json and the meshes it names."""
    path = Path(item.path)
    if item.kind == "asset":
        return [path]
    if item.frames:
        return [path / f for f in item.frames]
    files = [path]
    if path.name == SCENE_FILE:
        try:
            objects = json.loads(path.read_text()).get("objects", [])
            files += [path.parent / o["mesh"] for o in objects
                      if isinstance(o, dict) and isinstance(o.get("mesh"), str)]
        except (OSError, ValueError, AttributeError):
            pass
    return files


def content_stamp(item: WorkItem) -> str:
    """A digest of the sizes and modification times of an item's files (missing files count too): equal
    stamps mean unchanged files, a cheap test before :func:`content_hash`."""
    files = item_files(item)
    if item.frames and (Path(item.path) / SEQUENCE_FILE).is_file():
        files.append(Path(item.path) / SEQUENCE_FILE)
    parts = []
    for f in files:
        try:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{f.name}:missing")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def content_hash(item: WorkItem) -> str:
    """The content hash an item's samples record (meta.json ``asset_sha256``): the asset file's SHA-256, or
    the sequence's digest over its files; "" when a file cannot be read."""
    try:
        if item.kind == "asset":
            return file_sha256(Path(item.path))
        return files_digest(item_files(item))
    except OSError:
        return ""


def render_item(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn | None = None):
    """Render one item. A known bad input (:class:`~wt_datagen.inputs.meshes.InputError`: AssetError,
    SequenceError, MeshError) gives a "skipped" status with its one-line reason; any other exception a
    "failed" one (retried by the next run) with its traceback. Never raises for a per-item problem."""
    t0 = time.perf_counter()
    stamp = content_stamp(item)
    try:
        result = RENDERERS[item.kind](item, cfg, asset_dir, progress or (lambda path, n: None))
        result.status.stamp = stamp
        return result
    except Exception as e:  # one item's problem must not end the run
        status = "skipped" if isinstance(e, InputError) else "failed"
        msg = str(e).splitlines()[0] if str(e) else ""
        # AssetError names the file first; the status has the path already
        if isinstance(e, AssetError):
            reason = msg.removeprefix(f"{item.rel_path}: ")
        elif isinstance(e, InputError):
            reason = msg
        else:
            reason = f"{type(e).__name__}: {msg}"[:500]
        seconds = {"total": time.perf_counter() - t0}
        st = ItemStatus(item.rel_path, item.kind, item.item_id, status=status, reason=reason, seconds=seconds,
                        sha256=content_hash(item) if status == "skipped" else "", stamp=stamp)
        return ItemResult(st, traceback=traceback.format_exc() if status == "failed" else "")


def planned_views(item: WorkItem, cfg: RenderConfig) -> int:
    """The views an item will render: ``cfg.views`` for an asset, every clip's frames for a sequence (known
    from file names or ``scene.json`` without loading a mesh; 0 for a sequence that cannot be read)."""
    if item.kind != "sequence":
        return cfg.views
    try:
        frames = len(item.frames) if item.frames else frame_count(sequence_source(item))
    except ValueError:
        return 0
    return cfg.sequences.clips * clip_length(frames, cfg.sequences)
