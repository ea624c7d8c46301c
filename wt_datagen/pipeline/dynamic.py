"""Rendering a sequence work item: every frame of every clip as a static-schema sample, plus a tracks sample.

A sequence item (``WorkItem.kind == "sequence"``, planned by ``plan.plan_items``) yields, per clip,
``{id}_c{clip:03d}_f{frame:04d}`` samples (rgb.png, layers.npz, camera.json, meta.json with the sequence
fields) and one ``{id}_c{clip:03d}_tracks`` sample (tracks.npz, cameras.json, meta.json). Samples are spilled
to a temporary tar as they are made (:class:`SampleSpool`), so memory stays bounded however long the clip;
the shard writer copies them from there.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from functools import partial
from pathlib import Path

import trimesh

from .. import __version__
from ..geometry.cast import LayeredRaycaster
from ..geometry.cutout import cutouts_for
from ..geometry.tracks import ClipTracker, cameras_json
from ..inputs.assets import asset_to_world
from ..inputs.sequences import SequenceSource, load_sequence, mesh_sequence_source, source_at
from ..schema import (
    SCHEMA_VERSION,
    encode_json,
    encode_npz,
    encode_sample,
    frame_key,
    meta_record,
    tracks_key,
)
from .cameras import make_clip
from .config import RenderConfig
from .items import Clock, ItemResult, ProgressFn, WorkItem, caster_threads, item_lighting, item_materials, view_outputs
from .shards import ItemStatus


class SampleSpool:
    """Samples (dicts of bytes with ``__key__``) written to a temporary tar as they come, read back in
    order. Sized and iterable like a list, so ``ShardSet.add`` takes it as is; pickles as its path.

    The file belongs to the last process that received the spool: pickling hands it over (the sending
    copy stops owning it), and the owner removes it when the spool is garbage-collected.
    """

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="wt-spool-", suffix=".tar")
        self._tar = tarfile.open(fileobj=os.fdopen(fd, "wb"), mode="w")
        self._count = 0
        self._owner = True

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for name, data in sample.items():
            if name != "__key__":
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        """Finish writing (required before reading or pickling)."""
        if self._tar is not None:
            fileobj = self._tar.fileobj
            self._tar.close()
            fileobj.close()
            self._tar = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        with tarfile.open(self.path, mode="r") as tar:
            sample: dict = {}
            for member in tar:
                key, name = member.name.split(".", 1)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[name] = tar.extractfile(member).read()
            if sample:
                yield sample

    def __getstate__(self) -> dict:
        self.close()
        state = {**self.__dict__, "_tar": None}
        self._owner = False  # the receiver owns the file now
        return state

    def __del__(self) -> None:
        self.close()
        if self._owner:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def sequence_source(item: WorkItem) -> SequenceSource:
    """The sequence a planned item names: its frame files (``frames``, a mesh sequence) or its path."""
    if item.frames:
        last = item.rel_path.rsplit("/", 1)[-1]
        return mesh_sequence_source(Path(item.path), item.frames, last if "*" in last else "")
    return source_at(Path(item.path))


def render_sequence(item: WorkItem, cfg: RenderConfig, asset_dir: str, progress: ProgressFn) -> ItemResult:
    """All clips of one sequence; frames are cast, imaged, encoded and spooled one at a time."""
    clock = Clock()
    q = cfg.sequences
    seq = load_sequence(sequence_source(item), asset_dir, fps=q.fps, max_faces=cfg.assets.max_faces)
    if cfg.assets.normalise:  # one transform for the whole sequence: its box over all frames
        box = trimesh.PointCloud(trimesh.bounds.corners(seq.local_bounds))
        seq.asset_to_world = asset_to_world([box])
    clock.lap("load")
    meta = meta_record(asset_id=seq.sequence_id, asset_path=item.rel_path, asset_sha256=seq.sha256,
                       asset_to_world=seq.asset_to_world, config_name=cfg.name, config_hash=cfg.hash, seed=cfg.seed,
                       num_layers=cfg.layers, instance_names=seq.instance_names, version=__version__,
                       sequence_id=seq.sequence_id)
    spool, image_mode = SampleSpool(), ""
    seconds = dict.fromkeys(("load", "cast", "tracks", "motion"), 0.0)
    for c in range(q.clips):
        clip = make_clip(seq, c, q, cfg.seed, cfg.resolution, cfg.resolution)
        tracker = ClipTracker(seq, clip, cfg.layers, q.query_stride, q.query_frame,
                              make_raycaster=partial(_raycaster, backend=cfg.backend, num_threads=caster_threads(cfg)),
                              query_every=q.query_every, scene_flow=q.scene_flow, dynamic_rtol=q.dynamic_rtol,
                              backfill_bytes=q.backfill_memory_mb << 20)
        # one lighting per clip (a video does not flicker), drawn with its first camera and its bounds
        lighting = item_lighting(cfg, seq.sequence_id, c, clip.cameras[0], seq.world_bounds())
        clock.lap("load")
        for frame in tracker.frames():
            clock.lap("frames")
            materials = item_materials(frame.meshes, cfg, seq.sequence_id)
            key = frame_key(seq.sequence_id, c, frame.frame_index)
            rgb, image_mode, image_meta, extra = view_outputs(frame.meshes, materials, frame.camera, frame.hits,
                                                              lighting, cfg, key)
            clock.lap("image")
            frame_meta = {**meta, "view_index": frame.t, "clip_index": c, "frame_index": frame.frame_index,
                          "timestamp": frame.timestamp, "next_frame_index": frame.next_frame_index,
                          "dynamic_tolerance": tracker.tolerance, "query_stride": q.query_stride, "image": image_meta}
            spool.write(encode_sample(key, rgb, frame.hits, frame.camera, frame_meta, cfg.encoding.png_level,
                                      cfg.encoding.npz_level, {**frame.extra_layers(), **extra}))
            clock.lap("encode")
            progress(item.rel_path, 1)
        spool.write(tracks_sample(tracker, meta, cfg.encoding.npz_level))
        clock.lap("encode")
        seconds = {k: v + tracker.seconds[k] for k, v in seconds.items()}
    spool.close()
    # time spent inside the tracker ("frames") is reported as its own split: load, cast, tracks
    times = {k: v for k, v in clock.seconds.items() if k != "frames"}
    times.update({k: times.get(k, 0.0) + v for k, v in seconds.items()})
    status = ItemStatus(item.rel_path, item.kind, seq.sequence_id, "rendered", samples=len(spool),
                        image=image_mode, seconds=times, sha256=seq.sha256)
    return ItemResult(status, spool)


def _raycaster(meshes, backend: str, num_threads: int) -> LayeredRaycaster:
    """A frame's caster, alpha cutouts of the meshes' materials applied."""
    return LayeredRaycaster(meshes, backend=backend, num_threads=num_threads, cutouts=cutouts_for(meshes))


def tracks_sample(tracker: ClipTracker, meta: dict, npz_level: int = 1) -> dict[str, bytes]:
    """The tracks sample of a finished clip (:func:`wt_datagen.schema.tracks_key`): tracks.npz, cameras.json,
    meta.json."""
    clip = tracker.clip
    arrays = tracker.arrays()
    clip_meta = {"schema_version": SCHEMA_VERSION, **meta, "clip_index": clip.clip_index,
                 "num_frames": len(clip.frame_indices), "num_tracks": int(len(arrays["query_layer"])),
                 "query_stride": tracker.query_stride, "query_frame": tracker.query_frame,
                 "query_every": tracker.query_every, "trajectory": clip.trajectory,
                 "scene_size": tracker.scene_size, "dynamic_tolerance": tracker.tolerance,
                 "scene_flow": tracker.scene_flow}
    return {
        "__key__": tracks_key(clip.sequence_id, clip.clip_index),
        "tracks.npz": encode_npz(arrays, npz_level),
        "cameras.json": encode_json(cameras_json(clip, tracker.seq.fps)),
        "meta.json": encode_json(clip_meta),
    }

