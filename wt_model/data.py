"""Shards -> training batches: WebDataset streaming, decoding, and the pointmap normalisation.

A decoded sample (numpy, one view):
    rgb     (3,H,W) float32 in [-1, 1]
    points  (K,3,H,W) float32, normalised camera-space points, missing layers filled (see ``fill_missing``)
    valid   (K,H,W) bool, monotone along K
    scale   () float32, the median layer-0 depth (scene units) the points were divided by
Batches stack these along a leading B axis.

Normalisation (exactly invertible, see ``denormalise``): camera-space points are divided by the median depth
of the visible layer, then log-compressed, z' = log z and x', y' = sign(.) log1p(|.|); points behind the
camera cannot occur (the caster only keeps crossings with z > 0).

Missing layers (rays with fewer than K crossings) are masked out of the loss and filled by repeating the
ray's last valid point; rays with no crossing at all (background) are filled with the point of the pixel's
ray at the median depth. Both keep the network's inputs geometric and smooth across the image, so the
missing entries never look like outliers; the paper fills them with fresh noise instead.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from wt_datagen import reader
from wt_datagen.camera import Camera
from wt_datagen.schema import SchemaError, decode_files


class DataError(ValueError):
    """Bad training or evaluation data (shards, images); the message is one line."""


def expand_shards(pattern: str) -> list[str]:
    """Local shard paths from a brace pattern ('out/shard-{000000..000031}.tar'), a glob ('out/*.tar'), a file
    or a folder (:func:`wt_datagen.reader.expand_shards`)."""
    try:
        return [str(p) for p in reader.expand_shards(pattern)]
    except reader.ShardError as e:
        raise DataError(f"shards {e}") from None


# ----------------------------------------------------------------------------- normalisation


def normalise(points: np.ndarray, scale: float) -> np.ndarray:
    """Camera-space points (...,3) with z > 0, scene units -> normalised points (...,3)."""
    p = points / scale
    return np.concatenate([np.sign(p[..., :2]) * np.log1p(np.abs(p[..., :2])), np.log(p[..., 2:])], axis=-1)


def denormalise(points: np.ndarray, scale: float | np.ndarray = 1.0) -> np.ndarray:
    """The exact inverse of ``normalise``: normalised (...,3) -> camera-space points (...,3) times ``scale``."""
    xy = np.sign(points[..., :2]) * np.expm1(np.abs(points[..., :2]))
    return np.concatenate([xy, np.exp(points[..., 2:])], axis=-1) * np.asarray(scale)[..., None]


def fill_missing(xyz: np.ndarray, valid: np.ndarray, rays: np.ndarray, scale: float) -> np.ndarray:
    """Fill invalid entries of xyz (K,H,W,3): repeat each ray's last valid point; background rays get the
    point at depth ``scale`` on their pixel ray ``rays`` (H,W,3). ``valid`` (K,H,W) is monotone along K."""
    xyz = xyz.copy()
    xyz[0][~valid[0]] = rays[~valid[0]] * scale
    last = np.maximum(valid.sum(axis=0) - 1, 0)  # (H,W) index of the last valid layer
    fill = np.take_along_axis(xyz, last[None, :, :, None], axis=0)  # (1,H,W,3)
    return np.where(valid[..., None], xyz, fill)


# ----------------------------------------------------------------------------- decoding


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of a nearest-neighbour resize along one axis (pixel centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H,W,3) uint8 -> (size,size,3) uint8, bilinear."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


@dataclass
class View:
    """One decoded view at the model's resolution, before normalisation (scene units, camera space).

    rgb (S,S,3) uint8; xyz (K,S,S,3) float64 points (0 where invalid); valid (K,S,S) bool; rays (S,S,3) pixel
    rays with z = 1; camera the view's ``Camera`` with intrinsics rescaled to S x S (pixel centres kept)."""

    rgb: np.ndarray
    xyz: np.ndarray
    valid: np.ndarray
    rays: np.ndarray
    camera: Camera


def decode_view(sample: dict, image_size: int, num_layers: int) -> View:
    """One raw WebDataset sample (bytes per file) -> a :class:`View`.

    Layers beyond ``num_layers`` are dropped and missing ones padded as invalid. Views of another size are
    resized to ``image_size`` (rgb bilinear; points nearest, because interpolating between layers or across
    depth edges invents geometry); the caller says so once (``probe_shards``).
    """
    where = f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"
    try:
        d = decode_files(sample, layer_fields=("depth", "valid"), check_files=False)
        camera = Camera.from_json(d["camera"])
        rgb, depth = d["rgb"], d["layers"]["depth"][:num_layers].astype(np.float64)  # (H,W,3) uint8; (K',H,W)
        valid = d["layers"]["valid"][:num_layers]
    except (SchemaError, KeyError, TypeError, ValueError) as e:  # missing file, corrupt PNG/npz/JSON, version
        what = str(e) if isinstance(e, SchemaError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{where}: unreadable ({what})") from None
    H, W = depth.shape[1:]
    if rgb.shape[:2] != (H, W):
        raise DataError(f"{where}: rgb.png is {rgb.shape[1]}x{rgb.shape[0]} but layers.npz is {W}x{H}")
    if (camera.width, camera.height) != (W, H):
        raise DataError(f"{where}: camera.json is {camera.width}x{camera.height} but layers.npz is {W}x{H}")
    rays = camera.pixel_rays()  # (H,W,3), z = 1
    xyz = depth[..., None] * rays  # (K',H,W,3) README: xyz = depth * K^-1 (u+.5, v+.5, 1)
    if len(depth) < num_layers:
        pad = num_layers - len(depth)
        xyz = np.concatenate([xyz, np.zeros((pad, H, W, 3))])
        valid = np.concatenate([valid, np.zeros((pad, H, W), dtype=bool)])
    if (H, W) != (image_size, image_size):
        iy, ix = _nearest_index(H, image_size), _nearest_index(W, image_size)
        xyz, valid, rays = xyz[:, iy][:, :, ix], valid[:, iy][:, :, ix], rays[iy][:, ix]
        rgb = resize_rgb(rgb, image_size)
        camera = Camera(np.diag([image_size / W, image_size / H, 1.0]) @ camera.K, camera.world_to_cam,
                        image_size, image_size)
    return View(rgb, xyz, valid.astype(bool), rays, camera)


def median_depth(views: list[View]) -> float:
    """The normalisation scale: the median layer-0 depth over the views' valid pixels (1 if none)."""
    z = np.concatenate([v.xyz[0, ..., 2][v.valid[0]] for v in views])
    return float(np.median(z)) if len(z) else 1.0


def view_arrays(view: View, scale: float) -> dict:
    """A view as training arrays (module docstring), normalised by ``scale``."""
    points = normalise(fill_missing(view.xyz, view.valid, view.rays, scale), scale)  # (K,H,W,3)
    return {
        "rgb": (view.rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1),
        "points": points.astype(np.float32).transpose(0, 3, 1, 2),
        "valid": view.valid,
        "scale": np.array(scale, dtype=np.float32),
    }


def decode_sample(sample: dict, image_size: int, num_layers: int) -> dict:
    """One raw WebDataset sample -> the arrays described in the module docstring, normalised by the view's
    own median visible depth (see :func:`decode_view` for resizing and layer counts)."""
    view = decode_view(sample, image_size, num_layers)
    return view_arrays(view, median_depth([view]))


def has_layers(sample: dict) -> bool:
    """Layered views only: clip track samples (sequences) have tracks.npz and no layers.npz."""
    return "layers.npz" in sample


@dataclass(frozen=True)
class ShardInfo:
    """What ``probe_shards`` learnt from the first layered sample."""

    width: int
    height: int
    num_layers: int
    resized: bool


def probe_shards(urls: list[str], image_size: int) -> ShardInfo:
    """Check the first layered sample (schema version, size) before any worker starts, so that bad input
    fails with one line. Scans shards in order until a layered sample appears."""
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        if has_layers(sample):
            decode_sample(sample, image_size, 1)  # raises DataError on another schema version
            with np.load(io.BytesIO(sample["layers.npz"]), allow_pickle=False) as z:
                k, h, w = z["depth"].shape
            return ShardInfo(w, h, k, (h, w) != (image_size, image_size))
    raise DataError(f"shards ({len(urls)} files from {urls[0]}): no sample holds layers.npz")


# ----------------------------------------------------------------------------- streaming


class EpochShards(torch.utils.data.IterableDataset):
    """An endless stream of {"url": ...}: passes over the shard list, each pass shuffled by (seed, epoch, pass).

    Every rank and worker computes the same order, then ``split_by_node`` / ``split_by_worker`` take their
    share; because the stream is endless, fewer shards than ranks x workers still feeds everyone.
    """

    def __init__(self, urls: list[str], seed: int, epoch: int):
        super().__init__()
        self.urls, self.seed, self.epoch = list(urls), seed, epoch

    def __iter__(self):
        for n in count():
            order = list(self.urls)
            random.Random(f"{self.seed}/{self.epoch}/{n}").shuffle(order)
            yield from ({"url": u} for u in order)


@dataclass(frozen=True)
class LoaderConfig:
    """How the training stream is cut: ``epoch_samples`` (over all ranks) per epoch, in batches per rank."""

    batch_size: int
    image_size: int
    num_layers: int
    num_workers: int = 2
    shuffle_buffer: int = 256
    epoch_samples: int = 10_000
    seed: int = 0
    world_size: int = 1

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def worker_batches(self) -> int:
        """Batches each DataLoader worker yields per epoch (OpenCLIP's arithmetic)."""
        return max(1, math.ceil(self.epoch_samples / (self.world_size * self.batch_size * self.workers)))

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank sees per epoch (the trainer's steps per epoch)."""
        return self.worker_batches * self.workers


def _shuffle_and_skip(src, cfg: LoaderConfig, epoch: int, skip_batches: int):
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker); then skip, still undecoded, this worker's
    share of the first ``skip_batches`` batches of the epoch (resume): batch b comes from worker b % workers."""
    rank, _, worker, workers = wds.utils.pytorch_worker_info()
    rng = random.Random(f"{cfg.seed}/{epoch}/{rank}/{worker}")
    stream = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(src)
    skip = max(0, math.ceil((skip_batches - worker) / workers)) * cfg.batch_size
    yield from islice(stream, skip, None)


def _worker_roles(skip_batches: int, workers: int):
    """A DataLoader always starts with worker 0, but after skipping S batches the next one belongs to worker
    S % workers: give worker w the role (w + S) % workers, read by webdataset's ``pytorch_worker_info``."""

    def init(worker_id: int) -> None:
        os.environ["WORKER"] = str((worker_id + skip_batches) % workers)
        os.environ["NUM_WORKERS"] = str(workers)

    return init


def train_loader(urls: list[str], cfg: LoaderConfig, epoch: int, skip_batches: int = 0):
    """The DataLoader of one training epoch, from batch ``skip_batches`` on: dicts of tensors (shapes in the
    module docstring). Decoding runs in the DataLoader workers. Workers stream endlessly; ``with_epoch`` cuts
    each one's share, rounded up, so the caller stops at ``cfg.batches_per_epoch`` (extra batches, if any,
    come last)."""

    def decode(sample):
        return decode_sample(sample, cfg.image_size, cfg.num_layers)

    pipeline = wds.DataPipeline(
        EpochShards(urls, cfg.seed, epoch),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.select(has_layers),
        lambda src: _shuffle_and_skip(src, cfg, epoch, skip_batches),
        wds.map(decode),
        wds.batched(cfg.batch_size, partial=False),
    ).with_epoch(math.ceil((cfg.batches_per_epoch - skip_batches) / cfg.workers))
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=cfg.num_workers,
        worker_init_fn=_worker_roles(skip_batches, cfg.workers) if cfg.num_workers else None,
        prefetch_factor=4 if cfg.num_workers else None)


def eval_loader(urls: list[str], batch_size: int, image_size: int, num_layers: int, limit: int | None = None):
    """Every layered sample once, in shard order (main process): an iterator of batches."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.select(has_layers),
        wds.map(lambda s: decode_sample(s, image_size, num_layers)),
    )
    if limit:
        pipeline = pipeline.compose(wds.slice(limit))
    return torch.utils.data.DataLoader(pipeline.compose(wds.batched(batch_size, partial=True)),
                                       batch_size=None, num_workers=0)
