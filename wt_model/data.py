"""Shards -> training batches: WebDataset streaming, decoding, the pointmap normalisation, the held-out split.

A decoded sample (numpy, one view):
    rgb     (3,H,W) float32 in [-1, 1]
    points  (K,3,H,W) float32, normalised camera-space points, missing layers filled (see ``fill_missing``)
    valid   (K,H,W) bool, monotone along K
    scale   () float32, the median layer-0 depth (scene units)
Training batches stack these along a leading B axis and add ``bad`` (B,) int: the samples that could not be
decoded and were skipped just before each one (counted, never fatal).

Normalisation (:class:`Normalisation`, exactly invertible):
- ``median-log`` (ours, the reference's scenes): camera-space points are divided by the median depth of the
  visible layer, then log-compressed, z' = log z and x', y' = sign(.) log1p(|.|); points behind the camera
  cannot occur (the caster only keeps crossings with z > 0). Predictions come out in units of the median
  visible depth.
- ``zscore`` (the reference's objects): metric camera-space points, (p - mean) / std per axis with dataset
  statistics (``wt-model stats`` computes them from shards, :mod:`wt_model.stats`). Predictions come out in
  scene units.

Missing layers (rays with fewer than K crossings) are masked out of the loss and filled by repeating the
ray's last valid point; rays with no crossing at all (background) are filled with the point of the pixel's
ray at the median depth. Both keep the network's inputs geometric and smooth across the image, so the
missing entries never look like outliers (flow.py's ``fill="noise"`` replaces them by fresh noise instead).

Held-out split: by asset, never by view. A view is held out when a hash of its ``meta.json`` ``asset_id``
falls below ``val_fraction`` (:func:`is_heldout`), so every view of an asset (every frame of a sequence) is on
the same side, on every machine and in every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from wt_datagen import reader
from wt_datagen.camera import Camera
from wt_datagen.schema import SchemaError, decode_files


class DataError(ValueError):
    """Bad training or evaluation data (shards, images, statistics); the message is one line."""


def expand_shards(pattern: str) -> list[str]:
    """Local shard paths from a brace pattern ('out/shard-{000000..000031}.tar'), a glob ('out/*.tar'), a file
    or a folder (:func:`wt_datagen.reader.expand_shards`)."""
    try:
        return [str(p) for p in reader.expand_shards(pattern)]
    except reader.ShardError as e:
        raise DataError(f"shards {e}") from None


# ----------------------------------------------------------------------------- normalisation


def normalise(points: np.ndarray, scale: float) -> np.ndarray:
    """median-log: camera-space points (...,3) with z > 0, scene units -> normalised points (...,3)."""
    p = points / scale
    return np.concatenate([np.sign(p[..., :2]) * np.log1p(np.abs(p[..., :2])), np.log(p[..., 2:])], axis=-1)


def denormalise(points: np.ndarray, scale: float | np.ndarray = 1.0) -> np.ndarray:
    """The exact inverse of ``normalise``: normalised (...,3) -> camera-space points (...,3) times ``scale``."""
    xy = np.sign(points[..., :2]) * np.expm1(np.abs(points[..., :2]))
    return np.concatenate([xy, np.exp(points[..., 2:])], axis=-1) * np.asarray(scale)[..., None]


NORMALISATIONS = ("median-log", "zscore")


@dataclass(frozen=True)
class Normalisation:
    """How camera-space points become the network's space (module docstring). ``mean`` and ``std`` (scene
    units, per axis) are used by ``zscore`` only."""

    kind: str = "median-log"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.kind not in NORMALISATIONS:
            raise DataError(f"normalisation {self.kind!r}: choose {' or '.join(NORMALISATIONS)}")
        if self.kind == "zscore" and not all(np.isfinite(s) and s > 0 for s in self.std):
            raise DataError(f"normalisation zscore: std {self.std} must be finite and positive")

    def forward(self, points: np.ndarray, scale: float) -> np.ndarray:
        """Camera-space points (...,3), scene units, and the view's median visible depth -> normalised."""
        if self.kind == "median-log":
            return normalise(points, scale)
        return (points - np.asarray(self.mean)) / np.asarray(self.std)

    def inverse(self, points: np.ndarray, scale: float | np.ndarray = 1.0) -> np.ndarray:
        """Normalised (...,3) -> camera-space points: times ``scale`` for median-log (1: units of the median
        visible depth), scene units for zscore (``scale`` unused)."""
        if self.kind == "median-log":
            return denormalise(points, scale)
        return points * np.asarray(self.std) + np.asarray(self.mean)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> Normalisation:
        d = d or {}
        return cls(d.get("kind", "median-log"), tuple(d.get("mean", (0.0, 0.0, 0.0))),
                   tuple(d.get("std", (1.0, 1.0, 1.0))))


def read_stats(path: str | Path) -> Normalisation:
    """The zscore normalisation of a ``wt-model stats`` file (JSON with ``mean`` and ``std``, 3 numbers each)."""
    try:
        d = json.loads(Path(path).read_text())
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("need 3 values each")
    except FileNotFoundError:
        raise DataError(f"statistics {path}: no such file") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"statistics {path}: not a wt-model stats file ({type(e).__name__}: {e})") from None
    return Normalisation("zscore", mean, std)


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


def where_of(sample: dict) -> str:
    return f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"


def decode_points(sample: dict, num_layers: int | None = None) -> dict:
    """One raw WebDataset sample -> camera-space layers at the shard's resolution: ``xyz`` (K,H,W,3) float64,
    ``valid`` (K,H,W) bool, ``rgb`` (H,W,3) uint8 (an RGBA image, transparent background, is composited over
    black), ``rays`` (H,W,3) (z = 1), ``meta`` dict. ``num_layers`` keeps the first layers (None: all).
    Raises :class:`DataError` (one line) on an unreadable sample."""
    where = where_of(sample)
    try:
        d = decode_files(sample, layer_fields=("depth", "valid"), check_files=False)
        camera = Camera.from_json(d["camera"])
        rgb, depth = d["rgb"], d["layers"]["depth"][:num_layers].astype(np.float64)  # (H,W,3) uint8; (K',H,W)
        valid = d["layers"]["valid"][:num_layers]
    except (SchemaError, KeyError, TypeError, ValueError) as e:  # missing file, corrupt PNG/npz/JSON, version
        what = str(e) if isinstance(e, SchemaError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{where}: unreadable ({what})") from None
    if depth.ndim != 3 or valid.shape != depth.shape:
        raise DataError(f"{where}: layers.npz depth {depth.shape} and valid {valid.shape} do not match")
    H, W = depth.shape[1:]
    if rgb is None:
        raise DataError(f"{where}: rgb.png is unreadable")
    if rgb.shape[-1] == 4:  # a transparent background: the colour over black (premultiplied by the coverage)
        rgb = (rgb[..., :3].astype(np.float32) * (rgb[..., 3:] / np.float32(255.0)) + 0.5).astype(np.uint8)
    if rgb.shape[:2] != (H, W):
        raise DataError(f"{where}: rgb.png is {rgb.shape[1]}x{rgb.shape[0]} but layers.npz is {W}x{H}")
    if (camera.width, camera.height) != (W, H):
        raise DataError(f"{where}: camera.json is {camera.width}x{camera.height} but layers.npz is {W}x{H}")
    rays = camera.pixel_rays()  # (H,W,3), z = 1
    xyz = depth[..., None] * rays  # (K',H,W,3) README: xyz = depth * K^-1 (u+.5, v+.5, 1)
    if not np.isfinite(xyz[valid]).all():
        raise DataError(f"{where}: layers.npz holds non-finite depth at valid pixels")
    return {"xyz": xyz, "valid": valid.astype(bool), "rgb": rgb, "rays": rays, "meta": d.get("meta") or {}}


def decode_view(sample: dict, image_size: int, num_layers: int) -> dict:
    """One raw WebDataset sample -> ``xyz`` (K,S,S,3) camera-space points (scene units), ``valid``, ``rgb``,
    ``rays`` and ``meta`` as :func:`decode_points` gives them, at the model's size S with K layers: layers
    beyond ``num_layers`` are dropped and missing ones padded as invalid; views of another size are resized
    (rgb bilinear; points nearest, because interpolating between layers or across depth edges invents
    geometry); the caller says so once (``probe_shards``)."""
    d = decode_points(sample, num_layers)
    xyz, valid, rgb, rays = d["xyz"], d["valid"], d["rgb"], d["rays"]
    K, H, W = valid.shape
    if K < num_layers:
        pad = num_layers - K
        xyz = np.concatenate([xyz, np.zeros((pad, H, W, 3))])
        valid = np.concatenate([valid, np.zeros((pad, H, W), dtype=bool)])
    if (H, W) != (image_size, image_size):
        iy, ix = _nearest_index(H, image_size), _nearest_index(W, image_size)
        xyz, valid, rays = xyz[:, iy][:, :, ix], valid[:, iy][:, :, ix], rays[iy][:, ix]
        rgb = resize_rgb(rgb, image_size)
    return {"xyz": xyz, "valid": valid, "rgb": rgb, "rays": rays, "meta": d["meta"]}


def median_depth(views: list[dict]) -> float:
    """The median-log scale of one or more views (:func:`decode_view`): the median layer-0 depth over all
    their valid pixels (1 if none)."""
    z = np.concatenate([v["xyz"][0, ..., 2][v["valid"][0]] for v in views])
    return float(np.median(z)) if len(z) else 1.0


def view_arrays(view: dict, scale: float, norm: Normalisation | None = None) -> dict:
    """A decoded view (:func:`decode_view`) -> the arrays of the module docstring, normalised with ``scale``."""
    xyz, valid, rays = view["xyz"], view["valid"], view["rays"]
    points = (norm or Normalisation()).forward(fill_missing(xyz, valid, rays, scale), scale)  # (K,H,W,3)
    return {
        "rgb": (view["rgb"].astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1),
        "points": points.astype(np.float32).transpose(0, 3, 1, 2),
        "valid": valid.astype(bool),
        "scale": np.array(scale, dtype=np.float32),
    }


def decode_sample(sample: dict, image_size: int, num_layers: int, norm: Normalisation | None = None) -> dict:
    """One raw WebDataset sample (bytes per file) -> the arrays described in the module docstring, the
    median-log scale being the view's own median visible depth (sizes and layers: :func:`decode_view`)."""
    view = decode_view(sample, image_size, num_layers)
    return view_arrays(view, median_depth([view]), norm)


def has_layers(sample: dict) -> bool:
    """Layered views only: clip track samples (sequences) have tracks.npz and no layers.npz."""
    return "layers.npz" in sample


def asset_of(sample: dict) -> str:
    """The sample's ``meta.json`` asset_id (its key when meta.json cannot be read)."""
    try:
        return str(json.loads(sample["meta.json"])["asset_id"])
    except (KeyError, TypeError, ValueError):
        return str(sample.get("__key__", ""))


def is_heldout(asset_id: str, fraction: float) -> bool:
    """Whether an asset belongs to the held-out split: the first 8 bytes of sha1(asset_id) as a fraction of
    2^64, below ``fraction``. Stable across machines, runs and Python versions."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(asset_id.encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


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


def first_heldout(items: Iterable[dict], asset: Callable[[dict], str], check: Callable[[dict], object],
                  fraction: float, limit: int) -> tuple[list[dict], int]:
    """The first ``limit`` items of held-out assets (``asset(item)`` names it) that ``check`` decodes without a
    DataError, in order, and the number skipped as undecodable; none when ``fraction`` or ``limit`` is 0."""
    out, bad = [], 0
    if fraction <= 0 or limit <= 0:
        return out, bad
    for item in items:
        if is_heldout(asset(item), fraction):
            try:
                check(item)
            except DataError:
                bad += 1
                continue
            out.append(item)
            if len(out) >= limit:
                break
    return out, bad


def collect_heldout(urls: list[str], fraction: float, limit: int) -> tuple[list[dict], int]:
    """The raw bytes of the first ``limit`` decodable held-out layered views, in shard order (kept in memory,
    decoded at every evaluation), and the number of undecodable ones skipped."""
    samples = (s for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if has_layers(s))
    return first_heldout(samples, asset_of, lambda s: decode_points(s, 1), fraction, limit)


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
    norm: Normalisation = field(default_factory=Normalisation)
    val_fraction: float = 0.0  # views of held-out assets never enter the training stream

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


def _shuffle_and_skip(src, cfg: LoaderConfig, epoch: int, skip_batches: int, skip_bad: tuple[int, ...]):
    """Sample shuffle buffer seeded per (seed, epoch, rank, worker); then skip, still undecoded, this worker's
    share of the first ``skip_batches`` batches of the epoch (resume): batch b comes from worker b % workers,
    and ``skip_bad[worker]`` undecodable samples were skipped among them."""
    rank, _, worker, workers = wds.utils.pytorch_worker_info()
    rng = random.Random(f"{cfg.seed}/{epoch}/{rank}/{worker}")
    stream = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(src)
    skip = max(0, math.ceil((skip_batches - worker) / workers)) * cfg.batch_size
    skip += skip_bad[worker] if worker < len(skip_bad) else 0
    yield from islice(stream, skip, None)


def _decode_counting(src, cfg: LoaderConfig, tar_errors: list[int], decode=None):
    """Decode each sample (``decode(sample)``, default :func:`decode_sample`); undecodable ones are skipped,
    and the count of those skipped (plus damaged tar members, ``tar_errors``) since the previous good sample
    rides along as ``bad``."""
    bad = 0
    for sample in src:
        try:
            out = (decode(sample) if decode is not None
                   else decode_sample(sample, cfg.image_size, cfg.num_layers, cfg.norm))
        except DataError:
            bad += 1
            continue
        out["__key__"], out["bad"], out["bad_tar"] = sample.get("__key__"), bad, tar_errors[0]
        bad, tar_errors[0] = 0, 0
        yield out


def _worker_roles(skip_batches: int, workers: int):
    """A DataLoader always starts with worker 0, but after skipping S batches the next one belongs to worker
    S % workers: give worker w the role (w + S) % workers, read by webdataset's ``pytorch_worker_info``."""

    def init(worker_id: int) -> None:
        os.environ["WORKER"] = str((worker_id + skip_batches) % workers)
        os.environ["NUM_WORKERS"] = str(workers)

    return init


def train_loader(urls: list[str], cfg: LoaderConfig, epoch: int, skip_batches: int = 0,
                 skip_bad: tuple[int, ...] = (), items=None, decode=None):
    """The DataLoader of one training epoch, from batch ``skip_batches`` on: dicts of tensors (shapes in the
    module docstring). Decoding runs in the DataLoader workers. Workers stream endlessly; ``with_epoch`` cuts
    each one's share, rounded up, so the caller stops at ``cfg.batches_per_epoch`` (extra batches, if any,
    come last). ``skip_bad``: per worker role, the undecodable samples met in the skipped batches (the trainer
    sums ``bad`` by role), so a resumed stream continues exactly where it stopped. A sample that cannot be
    decoded is skipped and counted in ``bad``; a damaged tar member (the rest of that shard is lost) in
    ``bad_tar``. ``items`` (a stage: raw samples in shard order -> training items, undecoded) and ``decode``
    (an item -> arrays) replace the layered views and :func:`decode_sample` (the clip loader's windows,
    :mod:`wt_model.clips`)."""
    tar_errors = [0]

    def on_tar_error(exn: Exception) -> bool:
        tar_errors[0] += 1
        return True

    def keep(sample: dict) -> bool:
        return has_layers(sample) and not is_heldout(asset_of(sample), cfg.val_fraction)

    pipeline = wds.DataPipeline(
        EpochShards(urls, cfg.seed, epoch),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=on_tar_error),
        items if items is not None else wds.select(keep),
        lambda src: _shuffle_and_skip(src, cfg, epoch, skip_batches, tuple(skip_bad)),
        lambda src: _decode_counting(src, cfg, tar_errors, decode),
        wds.batched(cfg.batch_size, partial=False),
    ).with_epoch(math.ceil((cfg.batches_per_epoch - skip_batches) / cfg.workers))
    return torch.utils.data.DataLoader(
        pipeline, batch_size=None, num_workers=cfg.num_workers,
        worker_init_fn=_worker_roles(skip_batches, cfg.workers) if cfg.num_workers else None,
        prefetch_factor=4 if cfg.num_workers else None)


def eval_batches(samples, batch_size: int, image_size: int, num_layers: int, norm: Normalisation | None = None):
    """Decoded batches (dicts of tensors, shapes in the module docstring) of raw samples, in order;
    undecodable samples raise :class:`DataError`."""
    batch = []
    for s in samples:
        batch.append(decode_sample(s, image_size, num_layers, norm))
        if len(batch) == batch_size:
            yield {k: torch.from_numpy(np.stack([b[k] for b in batch])) for k in batch[0]}
            batch = []
    if batch:
        yield {k: torch.from_numpy(np.stack([b[k] for b in batch])) for k in batch[0]}


def layered_samples(urls: list[str], limit: int | None = None):
    """Every layered raw sample of the shards once, in shard order (up to ``limit``)."""
    it = (s for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if has_layers(s))
    return islice(it, limit) if limit else it


def eval_loader(urls: list[str], batch_size: int, image_size: int, num_layers: int, limit: int | None = None,
                norm: Normalisation | None = None):
    """Every layered sample once, in shard order (main process): an iterator of batches."""
    return eval_batches(layered_samples(urls, limit), batch_size, image_size, num_layers, norm)
