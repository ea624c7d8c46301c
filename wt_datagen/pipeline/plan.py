"""The plan of a render: which items an asset folder holds, and the one entry point that renders any item."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..inputs.assets import AssetError, discover_assets
from ..inputs.sequences import find_sequences, frame_count, source_at, static_files
from .cameras import clip_length
from .config import RenderConfig
from .dynamic import render_sequence
from .items import ItemResult, ProgressFn, WorkItem
from .shards import ItemStatus
from .static import render_asset

# Work kinds and their render functions: (item, cfg, asset_dir, progress) -> ItemResult.
RENDERERS: dict[str, Callable[..., ItemResult]] = {"asset": render_asset, "sequence": render_sequence}


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


def planned_views(item: WorkItem, cfg: RenderConfig) -> int:
    """The views an item will render: ``cfg.views`` for an asset, every clip's frames for a sequence (known
    from file names or ``scene.json`` without loading a mesh; 0 for a sequence that cannot be read)."""
    if item.kind != "sequence":
        return cfg.views
    try:
        frames = frame_count(source_at(Path(item.path)))
    except ValueError:
        return 0
    return cfg.sequences.clips * clip_length(frames, cfg.sequences)
