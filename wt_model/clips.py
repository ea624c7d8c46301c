"""Clips from shards: a sequence clip's frames grouped into (T, ...) windows, streamed from WebDataset shards.

What the loader assumes, and checks as it reads:
- A clip's samples are consecutive in one shard: its frames ``{prefix}_f{frame}`` in increasing frame order,
  then its tracks sample ``{prefix}_tracks`` (``prefix`` is ``{sequence}_c{clip:03d}``). The renderer writes
  each sequence as one unit and rolls shards only between units (README "What is written").
- The tracks sample's ``cameras.json`` lists the clip's frames (``frame_index``) and each of them came
  before it exactly once.
A clip that breaks this (split across shards, a frame missing, repeated or out of order, frames with no
tracks sample, a tracks sample with no frames) stops the stream with a one-line :class:`DataError` naming the
shard and the clip. Static views in the same shards are passed over. (A clip met again later, a shard read
twice in a row by an endless stream, is simply a new clip.)

Memory: one clip's encoded files at a time (its tracks come last, so a clip is grouped before its windows
are cut); nothing else is held, whatever the dataset's size.

Windows: a clip of n frames gives windows of ``length`` frames taken every ``frame_stride`` frames, starting
at clip positions 0, ``window_stride``, 2 ``window_stride``, ... while the window fits. A clip too short for
one window gives none.

A decoded window (numpy; batches stack these along a leading B axis):
    rgb          (T,3,S,S) float32 in [-1, 1]
    points       (T,K,3,S,S) float32: each frame's points in its own camera, normalised with ONE scale for
                 the window (``data.Normalisation``), missing layers filled as for single views
    valid        (T,K,S,S) bool
    scale        () float32: the median layer-0 depth over every frame of the window (scene units)
    frame_ratio  (T,) float32: ``scale`` over each frame's own median depth (1 for zscore), which turns the
                 window's points into each frame's own normalisation (``flow.rescale_normalised``)
    intrinsics   (T,3,3) float64 at the model's S x S; world_to_cam (T,4,4) float64 (the ground-truth cameras)
    tracks       (with ``with_tracks``) {"uv" (T,N,2) float32 pixel coordinates at S x S (pixel centres at
                 +0.5), "layer_index" (T,N) int8 (0 visible, -1 outside), "world_xyz" (T,N,3) float32}
With T = 1 a window decodes to exactly what ``data.decode_sample`` gives for that frame (plus cameras).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import webdataset as wds

from wt_datagen.camera import Camera
from wt_datagen.schema import SchemaError, decode_files, decode_json, parse_clip_key
from wt_model.data import (
    DataError,
    LoaderConfig,
    Normalisation,
    ShardInfo,
    asset_of,
    decode_view,
    first_heldout,
    is_heldout,
    median_depth,
    train_loader,
    view_arrays,
)


@dataclass(frozen=True)
class ClipConfig:
    """How clips are cut into windows: ``length`` frames (T), ``frame_stride`` clip frames apart, a window
    starting every ``window_stride`` clip frames (0: every ``length`` frames, windows side by side)."""

    length: int = 4
    frame_stride: int = 1
    window_stride: int = 0

    def __post_init__(self) -> None:
        for name in ("length", "frame_stride"):
            if getattr(self, name) < 1:
                raise DataError(f"clips: {name} must be at least 1, got {getattr(self, name)}")
        if self.window_stride < 0:
            raise DataError(f"clips: window stride must be at least 0, got {self.window_stride}")

    @property
    def span(self) -> int:
        """Clip frames covered by one window."""
        return (self.length - 1) * self.frame_stride + 1

    def starts(self, num_frames: int) -> range:
        """Clip positions where windows start in a clip of ``num_frames`` frames."""
        return range(0, num_frames - self.span + 1, self.window_stride or self.length)

    def positions(self, start: int) -> np.ndarray:
        """(T,) clip positions of the window starting at ``start``."""
        return start + self.frame_stride * np.arange(self.length)


@dataclass
class RawClip:
    """A clip's undecoded samples: ``frames`` (webdataset dicts, in frame order), their sequence
    ``frame_index``, and the ``tracks`` sample; ``url`` the shard."""

    url: str
    prefix: str
    frames: list[dict]
    frame_index: list[int]
    tracks: dict


def _frame_range(frames: list[int]) -> str:
    return f"{len(frames)} frame{'s' if len(frames) != 1 else ''} (f{frames[0]:04d}..f{frames[-1]:04d})"


def group_clips(samples: Iterable[dict]) -> Iterator[RawClip]:
    """Raw webdataset samples (``__key__``, ``__url__``, file bytes) in shard order -> complete clips, each
    yielded as soon as its tracks sample is read. Static views are passed over; the assumptions in the module
    docstring are checked (one-line :class:`DataError`)."""
    url, prefix, frames, index = None, None, [], []
    layout = "a clip's frames and tracks sample must be consecutive in one shard (split or incomplete clip)"

    def fail(message: str):
        raise DataError(f"shard {url}: clip {prefix}: {message}")

    for s in samples:
        key = s["__key__"]
        parsed = parse_clip_key(key)
        if s.get("__url__") != url:
            if frames:
                fail(f"{_frame_range(index)} and no tracks sample before the shard ends; {layout}")
            url = s.get("__url__")
        if parsed is None:  # a static view
            if frames:
                fail(f"{_frame_range(index)} followed by {key} instead of its tracks sample; {layout}")
            continue
        if frames and parsed[0] != prefix:
            fail(f"{_frame_range(index)} followed by {key} instead of its tracks sample; {layout}")
        prefix, frame = parsed
        if frame is not None:
            if index and frame <= index[-1]:
                fail(f"frame f{frame:04d} after f{index[-1]:04d}: frames must be in increasing order, each once")
            frames.append(s)
            index.append(frame)
            continue
        if not frames:
            fail(f"tracks sample {key} with no frames before it; {layout}")
        try:
            listed = [int(f) for f in decode_json(s["cameras.json"], "cameras.json")["frame_index"]]
        except (SchemaError, KeyError, TypeError, ValueError) as e:
            fail(f"{key}: cameras.json unreadable ({type(e).__name__}: {e})")
        if listed != index:
            missing = sorted(set(listed) - set(index))
            extra = sorted(set(index) - set(listed))
            what = (f"frames {', '.join(f'f{f:04d}' for f in missing[:4])} are missing" if missing else
                    f"frames {', '.join(f'f{f:04d}' for f in extra[:4])} are not in its tracks"
                    if extra else "frames are in another order than its tracks")
            fail(f"cameras.json lists {len(listed)} frames, the shard holds {_frame_range(index)}: {what}; {layout}")
        yield RawClip(url, prefix, frames, index, s)
        frames, index = [], []
    if frames:
        fail(f"{_frame_range(index)} and no tracks sample before the data ends; {layout}")


def clip_windows(clips: Iterable[RawClip], cfg: ClipConfig) -> Iterator[dict]:
    """Complete clips -> undecoded windows ``{"__key__": "{prefix}_w{start:04d}", "__url__", "frames": [T raw
    samples], "positions": (T,) clip positions, "tracks": raw tracks sample}``."""
    for clip in clips:
        for start in cfg.starts(len(clip.frames)):
            pos = cfg.positions(start)
            yield {"__key__": f"{clip.prefix}_w{start:04d}", "__url__": clip.url,
                   "frames": [clip.frames[p] for p in pos], "positions": pos, "tracks": clip.tracks}


def window_samples(cfg: ClipConfig):
    """A webdataset pipeline stage: raw samples in shard order -> undecoded windows."""

    def stage(src):
        return clip_windows(group_clips(src), cfg)

    return stage


def decode_window(window: dict, image_size: int, num_layers: int, norm: Normalisation | None = None,
                  with_tracks: bool = False) -> dict:
    """An undecoded window -> the arrays described in the module docstring."""
    views = [decode_view(s, image_size, num_layers) for s in window["frames"]]
    scale = median_depth(views)  # one normalisation for the whole window
    frames = [view_arrays(v, scale, norm) for v in views]
    out = {k: np.stack([f[k] for f in frames]) for k in ("rgb", "points", "valid")}
    out["scale"] = np.array(scale, dtype=np.float32)
    own = np.array([median_depth([v]) for v in views])  # each frame's own median-log scale
    ratio = scale / own if (norm or Normalisation()).kind == "median-log" else np.ones_like(own)
    out["frame_ratio"] = ratio.astype(np.float32)  # (T,) shared scale / own scale (flow.rescale_normalised)
    cams = [frame_camera(s, image_size) for s in window["frames"]]
    out["intrinsics"] = np.stack([c.K for c in cams])
    out["world_to_cam"] = np.stack([c.world_to_cam for c in cams])
    out["__key__"] = window["__key__"]
    if with_tracks:
        out["tracks"] = window_tracks(window, image_size)
    return out


def frame_camera(sample: dict, image_size: int) -> Camera:
    """A frame's ``camera.json`` with its intrinsics rescaled to ``image_size`` x ``image_size`` (pixel
    centres kept: u' + 0.5 = (u + 0.5) S / W)."""
    try:
        cam = Camera.from_json(decode_json(sample["camera.json"], "camera.json"))
    except (SchemaError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"shard {sample.get('__url__')} sample {sample.get('__key__')}: camera.json unreadable "
                        f"({type(e).__name__}: {e})") from None
    S = np.diag([image_size / cam.width, image_size / cam.height, 1.0])
    return Camera(S @ cam.K, cam.world_to_cam, image_size, image_size)


def window_tracks(window: dict, image_size: int) -> dict:
    """The window's frames of its clip's tracks, with pixel coordinates rescaled to ``image_size``."""
    key = window["tracks"]["__key__"]
    try:
        d = decode_files(window["tracks"], check_files=False)
        tracks, cams = d["tracks"], d["cameras"]["cameras"]
    except (SchemaError, KeyError, TypeError) as e:
        raise DataError(f"shard {window.get('__url__')} sample {key}: unreadable ({e})") from None
    pos = window["positions"]
    if tracks["uv"].shape[0] <= pos[-1]:
        raise DataError(f"shard {window.get('__url__')} sample {key}: tracks hold {tracks['uv'].shape[0]} frames, "
                        f"the window needs clip frame {pos[-1]}")
    size = np.array([[image_size / cams[p]["width"], image_size / cams[p]["height"]] for p in pos])  # (T,2)
    return {"uv": (tracks["uv"][pos] * size[:, None, :]).astype(np.float32),
            "layer_index": tracks["layer_index"][pos], "world_xyz": tracks["world_xyz"][pos]}


def probe_clips(urls: list[str], image_size: int, cfg: ClipConfig) -> ShardInfo:
    """Read the shards in order up to the first window and decode it, so that bad input (no clips, clips too
    short, another schema version, a split clip before the first window) fails with one line before any
    worker starts."""
    seen = 0
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    for clip in group_clips(pipeline):
        seen += 1
        for window in clip_windows([clip], cfg):
            decode_window(window, image_size, 1)  # raises DataError on another schema version, a bad file
            k, h, w = decode_files(window["frames"][0], layer_fields=("valid",),
                                   check_files=False)["layers"]["valid"].shape
            return ShardInfo(w, h, k, (h, w) != (image_size, image_size))
    if not seen:
        raise DataError(f"shards ({len(urls)} files from {urls[0]}): no clip (no {{sequence}}_c{{clip}}_tracks "
                        "sample); render dynamic assets (README 'Sequences and tracks') to train on clips")
    raise DataError(f"shards ({len(urls)} files from {urls[0]}): none of the {seen} clips has the {cfg.span} frames "
                    f"a window needs (length {cfg.length}, frame stride {cfg.frame_stride})")


def clip_train_loader(urls: list[str], cfg: LoaderConfig, clips: ClipConfig, epoch: int, skip_batches: int = 0,
                      skip_bad: tuple[int, ...] = ()):
    """The training stream of windows (:func:`wt_model.data.train_loader` with windows for views: the same
    shuffling, splitting, resumption and bad-sample counting; ``epoch_samples`` and ``batch`` count windows).
    Batches hold ``rgb`` (B,T,3,S,S), ``points`` (B,T,K,3,S,S), ``valid``, ``scale`` (B,), the cameras; windows
    of held-out sequences (``cfg.val_fraction``, by asset) never enter."""

    def items(src):
        for w in window_samples(clips)(src):
            if not is_heldout(asset_of(w["frames"][0]), cfg.val_fraction):
                yield w

    def decode(window):
        return decode_window(window, cfg.image_size, cfg.num_layers, cfg.norm)

    return train_loader(urls, cfg, epoch, skip_batches, skip_bad, items=items, decode=decode)


def heldout_windows(urls: list[str], clips: ClipConfig, fraction: float, limit: int) -> tuple[list[dict], int]:
    """The first ``limit`` decodable undecoded windows of held-out sequences, in shard order (kept for the
    evaluations), and the number of undecodable ones skipped."""
    windows = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), window_samples(clips))
    return first_heldout(windows, lambda w: asset_of(w["frames"][0]), lambda w: decode_window(w, 8, 1),
                         fraction, limit)


def window_batches(windows, batch_size: int, image_size: int, num_layers: int, norm: Normalisation | None = None,
                   with_tracks: bool = True):
    """Decoded batches of undecoded windows, in order: tensors stacked along B, ``tracks`` a list of dicts of
    arrays, ``__key__`` a list."""
    batch = []

    def collate():
        out = {k: torch.from_numpy(np.stack([w[k] for w in batch])) for k in batch[0] if k not in ("tracks", "__key__")}
        out["__key__"] = [w["__key__"] for w in batch]
        if with_tracks:
            out["tracks"] = [w["tracks"] for w in batch]
        return out

    for w in windows:
        batch.append(decode_window(w, image_size, num_layers, norm, with_tracks))
        if len(batch) == batch_size:
            yield collate()
            batch = []
    if batch:
        yield collate()


def clip_eval_loader(urls: list[str], batch_size: int, image_size: int, num_layers: int, cfg: ClipConfig,
                     limit: int | None = None, norm: Normalisation | None = None):
    """Every window once, in shard order, with its tracks (main process): batches as :func:`window_batches`."""
    windows = clip_windows(group_clips(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())), cfg)
    return window_batches(islice(windows, limit) if limit else windows, batch_size, image_size, num_layers, norm)
