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

from ..camera import Camera
from ..image.lighting import (
    Environments,
    Lighting,
    LightingError,
    draw_lighting,
    environment_thumbnail,
    environments,
    sampler_seed,
)
from ..image.materials import Material, albedo_layers, material_of, material_rng, randomised
from ..image.mitsuba import MitsubaUnavailable, finish, load_mitsuba, scene_for, set_threads, variant
from ..image.rgb import view_image
from .config import ConfigError, RenderConfig
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


def check_image_setup(cfg: RenderConfig) -> str:
    """Start-up checks of ``cfg.image`` (in the process that plans the run, before any item): Mitsuba
    importable with a working variant, every environment image readable. Returns the image renderer as the
    summary names it (``mitsuba (scalar_rgb)``); raises :class:`ConfigError` with one line."""
    im = cfg.image
    try:
        if im.environments:
            environments(im.environments).check()
        if im.renderer == "mitsuba":
            load_mitsuba(im.mitsuba_variant)
            return f"mitsuba ({variant()})"
    except (LightingError, MitsubaUnavailable) as e:
        raise ConfigError(str(e)) from None
    return im.renderer


def item_materials(meshes, cfg: RenderConfig, item_id: str) -> list[Material] | None:
    """The meshes' materials (randomised where ``image.materials`` asks and a mesh has none), or None
    where no consumer needs them (pyrender with the assets' own materials)."""
    im = cfg.image
    if im.renderer == "pyrender" and not im.materials.randomise and not cfg.outputs.albedo:
        return None
    return [randomised(material_of(m), im.materials, material_rng(cfg.seed, item_id, i))
            for i, m in enumerate(meshes)]


def item_lighting(cfg: RenderConfig, item_id: str, index: int, camera: Camera, bounds) -> Lighting:
    """The lighting of view (or clip) ``index``: a pure function of (seed, item id, index), the config, the
    camera and the item's world bounds ((2, 3))."""
    lo, hi = np.asarray(bounds, dtype=np.float64)
    envs: Environments | None = environments(cfg.image.environments) if cfg.image.environments else None
    return draw_lighting(cfg.image.lighting, cfg.image.background, cfg.seed, item_id, index, camera,
                         (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2), envs)


def item_image(meshes, materials, camera, hits, lighting: Lighting, cfg: RenderConfig,
               key: str) -> tuple[np.ndarray, str, dict]:
    """The image of a view as ``cfg.image`` asks: (H, W, 3) uint8 ((H, W, 4) with a transparent
    background), the renderer that made it, and the ``meta.json`` record of how (renderer, its settings,
    the lighting, randomised materials), enough to render it again. ``key``: the sample's key (it seeds
    Mitsuba's sampler)."""
    im = cfg.image
    record: dict = {}
    if im.renderer == "mitsuba":
        set_threads(caster_threads(cfg))
        seed = sampler_seed(cfg.seed, key)
        scene = scene_for(meshes, materials, im.mitsuba_variant)
        rgb = finish(scene.render(camera, lighting, im.spp, seed, im.max_depth, im.environments or None),
                             lighting)
        mode = f"mitsuba/{variant()}"
        record = {"variant": variant(), "spp": im.spp, "max_depth": im.max_depth, "sampler_seed": seed}
    else:
        rgb, mode = view_image(meshes, camera, hits, im.renderer, im.fallback, lighting=lighting,
                               materials=materials, folder=im.environments or None)
    thumb = environment_thumbnail(lighting.environment, im.environments or None)
    record = {"renderer": mode.split("/")[0], **record, "lighting": lighting.to_json(),
              "environment_thumbnail": {"height": thumb.shape[0], "width": thumb.shape[1],
                                        "rgb": thumb.tobytes().hex()}}  # sRGB bytes, for contact sheets
    drawn = {str(i): m.record() for i, m in enumerate(materials or []) if m.source == "random"}
    if drawn:
        record["materials"] = drawn
    return rgb, mode, record


def item_layers(meshes, materials, hits, cfg: RenderConfig) -> dict[str, np.ndarray]:
    """The optional ``layers.npz`` fields ``cfg.outputs`` asks for (``albedo``)."""
    if not cfg.outputs.albedo:
        return {}
    return {"albedo": albedo_layers(materials, meshes, hits)}


def view_outputs(meshes, materials, camera, hits, lighting: Lighting, cfg: RenderConfig,
                 key: str) -> tuple[np.ndarray, str, dict, dict[str, np.ndarray]]:
    """Everything of a cast view besides the layers: :func:`item_image` (image, renderer, its meta record)
    and :func:`item_layers` (optional extra layer fields)."""
    rgb, mode, record = item_image(meshes, materials, camera, hits, lighting, cfg, key)
    return rgb, mode, record, item_layers(meshes, materials, hits, cfg)


class Clock:
    """Accumulates wall time per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now
