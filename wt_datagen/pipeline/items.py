"""The unit of work of `wt-datagen render` and what every renderer of one shares.

A :class:`WorkItem` is one asset or one sequence (all its views or clips); rendering it is a pure function of
the item and the resolved config, returning an :class:`ItemResult` (encoded samples, or why there are none),
so any executor can run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..image.rgb import view_image
from .config import RenderConfig
from .shards import ItemStatus


@dataclass(frozen=True)
class WorkItem:
    """One unit of work. ``kind`` selects the function that renders it (:data:`RENDERERS`);
    ``rel_path`` (relative to ASSET_DIR, POSIX) identifies it in the journal and the manifest; ``item_id`` is
    the key its samples start with; ``frames`` names a mesh sequence's frame files in its folder ``path``."""

    kind: str
    path: str
    rel_path: str
    item_id: str = ""
    frames: tuple[str, ...] = ()


@dataclass
class ItemResult:
    """A rendered item's samples (dicts of bytes, webdataset-ready) and its status; ``traceback`` of an
    unexpected failure (written to the output folder's failure log, not to the manifest)."""

    status: ItemStatus
    samples: list[dict] = field(default_factory=list)
    traceback: str = ""


ProgressFn = Callable[[str, int], None]  # (rel_path, views done since the last call)


def caster_threads(cfg: RenderConfig) -> int:
    """Casting threads per worker: all cores for one worker, one each for several (no oversubscription)."""
    return 1 if cfg.workers > 1 else 0


def item_image(meshes, camera, hits, cfg: RenderConfig) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 image of a view and the renderer that made it, as ``cfg.image`` asks."""
    return view_image(meshes, camera, hits, cfg.image.renderer, cfg.image.fallback, cfg.image.background)


class Clock:
    """Accumulates wall time per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now
