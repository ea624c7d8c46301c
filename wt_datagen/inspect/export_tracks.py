"""`wt-datagen export-tracks`: clips' tracks in the layouts 3D point trackers read.

``--format tapvid3d`` writes one ``{sequence}_c{clip}.npz`` per clip with the keys TAPVid-3D's evaluation
code (google-deepmind/tapnet, ``tapvid3d/evaluation/evaluate_model.py``) loads; its README names two of them
differently (``tracks_xyz``, ``intrinsics``), the code's names are used:

- ``tracks_XYZ`` (T, N, 3) float32: each track in each frame's own camera (OpenCV axes: x right, y down,
  z forward), our ``cam_xyz``;
- ``visibility`` (T, N) bool: True where the point is the visible surface, our ``layer_index == 0`` (hidden
  behind any crossing, outside the image or behind the camera: False; the position is still given);
- ``queries_xyt`` (N, 3) float32: query pixel position and clip frame; positions are raster coordinates with
  pixel centres at +0.5, so a query on pixel (u, v) is (u + 0.5, v + 0.5), which is also TAPVid-3D's
  convention (``u = fx X / Z + cx``);
- ``fx_fy_cx_cy`` (4,) float64: the clip's intrinsics (a clip with varying intrinsics or skew is refused);
- ``extrinsics_w2c`` (T, 4, 4) float64: world-to-camera per frame.

The frames go beside the npz as ``{sequence}_c{clip}/{t:05d}.png`` (our ``rgb.png`` bytes, unchanged).
TAPVid-3D stores them in the npz as ``images_jpeg_bytes``, an object array (its readers load the file with
pickle allowed); ``--images-jpeg-bytes`` adds that field (JPEG, ``--jpeg-quality``) for tools that need
it (``evaluate_model.py`` reads the frame size from it) as a fixed-width bytes array (``S`` dtype): their
readers get each frame's bytes as before, and the file still loads with ``allow_pickle=False``.

``--format pointodyssey`` writes PointOdyssey v1.2's per-sequence layout: ``{sequence}_c{clip}/anno.npz``
with ``trajs_2d`` (T, N, 2) float32 pixels (centres at +0.5), ``trajs_3d`` (T, N, 3) float32 world,
``visibs`` (T, N) bool (``layer_index == 0``), ``valids`` (T, N) bool (in front of the camera),
``intrinsics`` (T, 3, 3) float32, ``extrinsics`` (T, 4, 4) float32 world-to-camera; frames as
``rgbs/rgb_{t:05d}.jpg``. Depth maps are not written (``layers.npz`` holds them losslessly).

Units: positions are in the shard's world frame (``--units world``): unit-box units when the sequence was
rendered with ``assets.normalise: true`` (the default), the asset files' own units (metres for metric
assets) with ``assets.normalise: false``. ``--units asset`` undoes the normalisation from each clip's
``meta.json`` ``asset_to_world`` (a similarity): world points map back to asset coordinates and camera-space
points shrink by its scale, so projections are unchanged. TAPVid-3D's metrics are metric only with
``use_fixed_metric_threshold``; its default thresholds scale with depth / focal and its default median
scaling makes them scale-free.

Shards are read with :mod:`wt_datagen.reader` only; frames are matched to their clip's tracks sample by
``sequence_id``, ``clip_index`` and ``view_index`` (the frame's index in the clip).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..camera import Camera
from ..console import Progress
from ..reader import Problem, Sample, ShardError, decode, expand_shards, iter_raw
from ..schema import clip_prefix, decode_json, is_clip

FORMATS = ("tapvid3d", "pointodyssey")


class ExportError(ValueError):
    """A clip that cannot be exported in the asked format; one line naming the clip and the problem."""


@dataclass
class _Pending:
    """A clip being gathered: frames seen (and their JPEG bytes when the npz must hold them), its tracks."""

    prefix: str
    seen: set[int] = field(default_factory=set)
    jpegs: dict[int, bytes] = field(default_factory=dict)
    tracks: Sample | None = None


def _jpeg(png: bytes, quality: int) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def clip_arrays(s: Sample, units: str = "world") -> dict[str, np.ndarray]:
    """A decoded tracks sample's arrays in the chosen units: ``world_xyz`` (T, N, 3), ``cam_xyz`` (T, N, 3),
    ``uv`` (T, N, 2), ``layer_index`` (T, N), ``query_xyt`` (N, 3), ``K`` (T, 3, 3), ``w2c`` (T, 4, 4).
    Raises :class:`ExportError`."""
    t = s.tracks
    cams = s.cameras.get("cameras") if isinstance(s.cameras, dict) else s.cameras
    T = t["world_xyz"].shape[0]
    if not isinstance(cams, list) or len(cams) != T:
        raise ExportError(f"{s.key}: cameras.json does not hold {T} cameras")
    cams = [Camera.from_json(c) for c in cams]
    world = t["world_xyz"].astype(np.float64)
    cam = t["cam_xyz"].astype(np.float64)
    w2c = np.stack([c.world_to_cam for c in cams]).astype(np.float64)
    if units == "asset":
        A = np.asarray(s.meta.get("asset_to_world") if isinstance(s.meta, dict) else None, dtype=np.float64)
        if A.shape != (4, 4) or not np.isfinite(A).all() or np.linalg.det(A[:3, :3]) <= 0:
            raise ExportError(f"{s.key}: meta.json has no usable asset_to_world for --units asset")
        scale = float(np.cbrt(np.linalg.det(A[:3, :3])))
        world = world @ np.linalg.inv(A)[:3, :3].T + np.linalg.inv(A)[:3, 3]
        cam = cam / scale
        w2c = np.diag([1 / scale, 1 / scale, 1 / scale, 1.0]) @ w2c @ A
    elif units != "world":
        raise ExportError(f"units must be world or asset, got {units!r}")
    qf = np.broadcast_to(t["query_frame"], t["query_layer"].shape).astype(np.float32)
    return {
        "world_xyz": world.astype(np.float32),
        "cam_xyz": cam.astype(np.float32),
        "uv": t["uv"].astype(np.float32),
        "layer_index": t["layer_index"],
        "query_xyt": np.column_stack([t["query_pixel"].astype(np.float32) + 0.5, qf]),
        "K": np.stack([c.K for c in cams]),
        "w2c": w2c,
    }


def tapvid3d_arrays(s: Sample, units: str = "world") -> dict[str, np.ndarray]:
    """The TAPVid-3D npz arrays of a tracks sample (module docstring), frames excluded."""
    a = clip_arrays(s, units)
    K = a["K"]
    if not np.allclose(K, K[0], rtol=0, atol=1e-9 * np.abs(K[0]).max()) or K[0, 0, 1] != 0:
        raise ExportError(f"{s.key}: TAPVid-3D has one set of intrinsics (fx, fy, cx, cy) per clip; this clip's "
                          "intrinsics vary over frames or have skew")
    return {
        "tracks_XYZ": a["cam_xyz"],
        "visibility": a["layer_index"] == 0,
        "queries_xyt": a["query_xyt"],
        "fx_fy_cx_cy": np.array([K[0, 0, 0], K[0, 1, 1], K[0, 0, 2], K[0, 1, 2]], dtype=np.float64),
        "extrinsics_w2c": a["w2c"],
    }


def pointodyssey_arrays(s: Sample, units: str = "world") -> dict[str, np.ndarray]:
    """PointOdyssey ``anno.npz`` arrays of a tracks sample (module docstring)."""
    a = clip_arrays(s, units)
    return {
        "trajs_2d": a["uv"],
        "trajs_3d": a["world_xyz"],
        "visibs": a["layer_index"] == 0,
        "valids": (a["cam_xyz"][..., 2] > 0) & np.isfinite(a["uv"]).all(-1),
        "intrinsics": a["K"].astype(np.float32),
        "extrinsics": a["w2c"].astype(np.float32),
    }


class _Writer:
    """Writes frames as they come and each clip's npz once its tracks sample and every frame are in."""

    def __init__(self, out: Path, fmt: str, images_jpeg_bytes: bool, units: str, jpeg_quality: int):
        if fmt not in FORMATS:
            raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if images_jpeg_bytes and fmt != "tapvid3d":
            raise ExportError("--images-jpeg-bytes is a TAPVid-3D field; use it with --format tapvid3d")
        self.out, self.fmt, self.embed, self.units, self.quality = out, fmt, images_jpeg_bytes, units, jpeg_quality
        self.pending: dict[tuple, _Pending] = {}
        self.written: list[Path] = []
        self.problems: list[str] = []

    def _frame_path(self, prefix: str, t: int) -> Path:
        if self.fmt == "tapvid3d":
            return self.out / prefix / f"{t:05d}.png"
        return self.out / prefix / "rgbs" / f"rgb_{t:05d}.jpg"

    def frame(self, s: Sample) -> None:
        meta = decode_json(s.files["meta.json"], "meta.json", lambda w, m: None)
        if not isinstance(meta, dict) or meta.get("sequence_id") is None or "rgb.png" not in s.files:
            return  # a static view
        t = meta.get("view_index")
        if not isinstance(t, int) or not isinstance(meta.get("clip_index"), int):
            self.problems.append(f"{s.shard}: {s.key}: meta.json: a clip frame without view_index/clip_index")
            return
        cid = (meta["sequence_id"], meta["clip_index"])
        p = self.pending.setdefault(cid, _Pending(clip_prefix(*cid)))
        png = s.files["rgb.png"]
        if self.fmt == "tapvid3d":
            data = png
            if self.embed:
                p.jpegs[t] = _jpeg(png, self.quality)
        else:
            data = _jpeg(png, self.quality)
        path = self._frame_path(p.prefix, t)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        p.seen.add(t)
        self._maybe_finish(cid)

    def tracks(self, s: Sample) -> None:
        s = decode(s)
        if s.problems or not isinstance(s.meta, dict):
            self.problems += [str(p) for p in s.problems] or [f"{s.shard}: {s.key}: meta.json: unreadable"]
            return
        cid = (s.meta.get("sequence_id"), s.meta.get("clip_index"))
        p = self.pending.setdefault(cid, _Pending(clip_prefix(*cid) if None not in cid else s.key))
        p.tracks = s
        self._maybe_finish(cid)

    def _maybe_finish(self, cid: tuple, final: bool = False) -> None:
        p = self.pending[cid]
        if p.tracks is None:
            if final:
                self.problems.append(f"{p.prefix}: {len(p.seen)} frames but no tracks sample; frames written only")
            return
        T = p.tracks.tracks["world_xyz"].shape[0]
        missing = sorted(set(range(T)) - p.seen)
        if missing and not final:
            return
        del self.pending[cid]
        try:
            if missing:
                raise ExportError(f"{p.prefix}: {len(missing)} of {T} frames missing (first: {missing[0]})")
            self.written.append(self._write(p))
        except (ExportError, ValueError, KeyError, TypeError) as e:
            self.problems.append(f"{p.tracks.shard}: {p.tracks.key}: not exported ({e})")

    def _write(self, p: _Pending) -> Path:
        if self.fmt == "pointodyssey":
            path = self.out / p.prefix / "anno.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **pointodyssey_arrays(p.tracks, self.units))
            return path
        arrays = tapvid3d_arrays(p.tracks, self.units)
        if self.embed:
            # fixed-width bytes, not TAPVid-3D's object array: loads without pickle, and each element is bytes
            # to their readers (np.bytes_ drops trailing NULs; a JPEG ends with its EOI marker FF D9)
            arrays["images_jpeg_bytes"] = np.array([p.jpegs[t] for t in range(len(p.jpegs))], dtype=np.bytes_)
        path = self.out / f"{p.prefix}.npz"
        np.savez(path, **arrays)
        return path

    def finish(self) -> None:
        for cid in list(self.pending):
            self._maybe_finish(cid, final=True)


def export_tracks(shards, fmt: str, out, images_jpeg_bytes: bool = False, units: str = "world",
                  jpeg_quality: int = 95, progress: bool = False) -> tuple[list[Path], list[str]]:
    """Export every clip in ``shards`` (specs as on the command line) to ``out`` in format ``fmt``
    (``tapvid3d`` or ``pointodyssey``). Returns the npz files written and one line per problem (a damaged
    shard, a clip that cannot be exported); clips are independent, so one bad clip loses nothing else."""
    paths = expand_shards(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out, fmt, images_jpeg_bytes, units, jpeg_quality)
    shard = None
    quiet = None if progress else io.StringIO()
    with Progress(len(paths), "shard", "export-tracks", stream=quiet, bar=None if progress else False) as bar:
        for item in iter_raw(paths):
            where = item.shard if isinstance(item, (Sample, Problem)) else None
            if where != shard:
                bar.update(shard is not None)
                shard = where
            if isinstance(item, Problem):
                w.problems.append(str(item))
            elif is_clip(item.files):
                w.tracks(item)
            elif "meta.json" in item.files:
                w.frame(item)
        bar.update(shard is not None)
    w.finish()
    return w.written, w.problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS",
                        help="shard files, folders, globs or brace patterns (out/shard-{000000..000009}.tar)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="tapvid3d: one npz per clip; "
                        "pointodyssey: a folder per clip with anno.npz and rgbs/")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--images-jpeg-bytes", action="store_true",
                        help="tapvid3d: also store the frames (JPEG) in the npz as TAPVid-3D's images_jpeg_bytes "
                             "(a fixed-width bytes array: no pickle needed); default: files beside it")
    parser.add_argument("--units", choices=("world", "asset"), default="world",
                        help="world: the shard's world frame (unit box when assets.normalise was on); asset: "
                             "undo the normalisation (the asset files' own units)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of encoded frames (default 95)")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.jpeg_quality <= 100:
        print(f"export-tracks: --jpeg-quality must be in 1..100, got {args.jpeg_quality}", file=sys.stderr)
        return 2
    try:
        written, problems = export_tracks(args.shards, args.format, args.out, args.images_jpeg_bytes, args.units,
                                          args.jpeg_quality, progress=True)
    except (ShardError, ExportError) as e:
        print(f"export-tracks: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"export-tracks: cannot write to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    print(f"export-tracks: {len(written)} clips written to {args.out} ({args.format}), {len(problems)} problems")
    return 1 if problems else 0
