"""Rendering a static asset: load, normalise, build the caster once, then per view camera, cast, image, encode."""

from __future__ import annotations

import concurrent.futures as cf

from .. import __version__
from ..geometry.cast import LayeredRaycaster
from ..geometry.cutout import cutouts_for
from ..inputs.assets import asset_to_world, load_asset
from ..schema import encode_sample, meta_record, sample_key
from .cameras import view_camera
from .config import RenderConfig
from .items import Clock, ItemResult, ProgressFn, WorkItem, caster_threads, item_lighting, item_materials, view_outputs
from .shards import ItemStatus


def render_asset(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn) -> ItemResult:
    """All views of one static asset: load, normalise, build the caster, then per view camera, cast, image,
    encode."""
    clock = Clock()
    asset = load_asset(item.path, asset_dir, max_faces=cfg.assets.max_faces,
                       missing_texture=cfg.assets.missing_texture)
    to_world = asset_to_world(asset.meshes, cfg.assets.up_axis, cfg.assets.normalise)
    for m in asset.meshes:  # ours: loaded just now
        m.apply_transform(to_world)
    clock.lap("load")
    caster = LayeredRaycaster(asset.meshes, backend=cfg.backend, num_threads=caster_threads(cfg),
                              cutouts=cutouts_for(asset.meshes))
    bounds = caster.bounds
    clock.lap("cast")
    meta = meta_record(asset_id=asset.asset_id, asset_path=asset.rel_path, asset_sha256=asset.sha256,
                       asset_to_world=to_world, config_name=cfg.name, config_hash=cfg.hash, seed=cfg.seed,
                       num_layers=cfg.layers, instance_names=asset.names, version=__version__)
    materials = item_materials(asset.meshes, cfg, asset.asset_id)
    samples, image_mode = [], ""
    # Encoding (numpy conversions, deflate, PNG: mostly outside the GIL) of view i runs in a thread while
    # view i + 1 is cast and imaged; one view in flight bounds the memory.
    with cf.ThreadPoolExecutor(1) as encoder:
        pending = None
        for view in range(cfg.views):
            camera = view_camera(cfg.cameras, cfg.seed, asset.asset_id, view, bounds, cfg.resolution)
            hits = caster.cast(camera, cfg.layers)
            clock.lap("cast")
            lighting = item_lighting(cfg, asset.asset_id, view, camera, bounds)
            key = sample_key(asset.asset_id, view)
            rgb, image_mode, image_meta, extra = view_outputs(asset.meshes, materials, camera, hits, lighting,
                                                              cfg, key)
            clock.lap("image")
            if pending is not None:
                samples.append(pending.result())
                progress(item.rel_path, 1)
            pending = encoder.submit(encode_sample, key, rgb, hits, camera,
                                     {**meta, "view_index": view, "image": image_meta}, cfg.encoding.png_level,
                                     cfg.encoding.npz_level, extra)
            clock.lap("encode")
        samples.append(pending.result())
        clock.lap("encode")
        progress(item.rel_path, 1)
    status = ItemStatus(item.rel_path, item.kind, asset.asset_id, "rendered", samples=len(samples),
                        image=image_mode, seconds=clock.seconds, warnings=asset.warnings, sha256=asset.sha256)
    return ItemResult(status, samples)
