"""`wt-datagen inspect`: summarise, validate, picture and export WebDataset shards.

Shards are read member by member with the stdlib ``tarfile`` in streaming mode (nothing is extracted to
disk) and decoded with numpy (``allow_pickle=False``), PIL and json. Every defect (a truncated or corrupt
tar, a corrupt npz or png, a missing field, a broken schema rule) becomes one :class:`Problem` line naming
shard, sample key and field; reading carries on with the next member, sample or shard.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from wt_datagen.camera import Camera, depth_to_xyz
from wt_datagen.sample import LAYER_DTYPES, SCHEMA_VERSION

SCHEMA_VERSIONS = {SCHEMA_VERSION}
VIEW_FILES = ("rgb.png", "layers.npz", "camera.json", "meta.json")
CLIP_FILES = ("tracks.npz", "cameras.json", "meta.json")
LAYER_TRAILING = {"normal": (3,)}  # a field's shape after (K, H, W); num_hits alone is per pixel, (H, W)
# required clip track fields; others (query_face, timestamp, ...) are read and allowed
TRACK_FIELDS = ("query_frame", "query_layer", "query_pixel", "world_xyz", "cam_xyz", "uv", "layer_index")
META_KEYS = (
    "schema_version",
    "asset_id",
    "asset_path",
    "asset_sha256",
    "asset_to_world",
    "config_name",
    "config_hash",
    "seed",
    "view_index",
    "num_layers",
    "instance_names",
    "version",
)
REPROJECTION_TOL_PX = 1e-3
NORMAL_TOL = 1e-2  # float16 storage: unit length to about 1e-3
MAX_DRAWN_TRACKS = 2000
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # by float16 bits


class InspectError(ValueError):
    """Bad command-line input (no shard matched a pattern, a chosen key is absent)."""


@dataclass(frozen=True)
class Problem:
    """One defect: ``shard`` path, sample ``key`` ("-" for the whole shard), ``field`` such as
    ``layers.npz:depth`` or ``camera.json``, and what is wrong."""

    shard: str
    key: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key}: {self.field}: {self.message}"


@dataclass
class Sample:
    """One decoded sample. Arrays keep their stored dtypes; a file or field that failed to decode is absent
    (its problem is in ``problems``).

    Attributes:
        files: raw bytes per file name (``rgb.png``, ``layers.npz``, ...).
        rgb: (H, W, 3) uint8 image or None.
        layers: ``layers.npz`` fields (``depth`` (K, H, W) float32 camera z, ``valid`` (K, H, W) bool, ...).
        tracks: ``tracks.npz`` fields of a clip track sample.
        camera: ``camera.json`` dict; cameras: ``cameras.json`` list (clips); meta: ``meta.json`` dict.
    """

    shard: str
    key: str
    files: dict[str, bytes]
    rgb: np.ndarray | None = None
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    tracks: dict[str, np.ndarray] = field(default_factory=dict)
    camera: dict | None = None
    cameras: list | None = None
    meta: dict | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def is_clip(self) -> bool:
        return "tracks.npz" in self.files

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def problem(self, field_name: str, message: str) -> Problem:
        p = Problem(self.shard, self.key, field_name, message)
        self.problems.append(p)
        return p


# ---------------------------------------------------------------------------------------------- reading


def expand_shards(specs: Iterable[str]) -> list[Path]:
    """Files, folders (their ``*.tar``, recursively), globs and brace patterns to a sorted, de-duplicated
    list of shard paths. Raises InspectError naming a spec that matches nothing."""
    out: dict[Path, None] = {}
    for spec in specs:
        matched: list[Path] = []
        for pattern in braceexpand(str(spec)):
            p = Path(pattern)
            if p.is_dir():
                matched += sorted(p.rglob("*.tar"))
            elif p.is_file():
                matched.append(p)
            else:
                matched += [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
        if not matched:
            raise InspectError(f"inspect: {spec}: no shard matches")
        out.update(dict.fromkeys(matched))
    return list(out)


def _end_marker_problem(path: Path, offset: int) -> str | None:
    """A tar that stops at a member boundary, or whose next header is garbage, reads as a clean end in
    ``tarfile``; the end-of-archive marker (two zero blocks) tells them apart."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024:
        return f"truncated tar: no end-of-archive marker at byte {offset}"
    if any(tail):
        return f"corrupt tar: unreadable member header at byte {offset}"
    return None


def iter_raw(paths: Iterable[Path]) -> Iterator[Sample | Problem]:
    """Undecoded samples (``files`` filled) in shard order, and a Problem for each unreadable tar part.

    Members are grouped into samples as webdataset does (consecutive members sharing the basename up to
    the first dot). A sample cut short by a damaged tar is dropped and named in the tar problem.
    """
    for path in paths:
        shard = str(path)
        key, files = None, {}
        try:
            with tarfile.open(path, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base, ext = base_plus_ext(member.name)
                    if base is None:
                        yield Problem(shard, member.name, "-", "tar member without an extension")
                        continue
                    if base != key:
                        if key is not None:
                            yield Sample(shard, key, files)
                        key, files = base, {}
                    files[ext] = tf.extractfile(member).read()
                offset = tf.offset
        except (tarfile.TarError, OSError, EOFError) as e:
            where = f"in sample {key}" if key is not None else "before the first sample"
            yield Problem(
                shard, key or "-", "tar", f"truncated or corrupt tar ({e}) {where}; rest of shard lost"
            )
            continue
        if path.suffix == ".tar":
            bad = _end_marker_problem(path, offset)
            if bad:
                yield Problem(shard, key or "-", "tar", f"{bad}; samples after {key} lost")
                continue
        if key is not None:
            yield Sample(shard, key, files)


def _load_npz(s: Sample, name: str, expected: Iterable[str], extras: bool = False) -> dict[str, np.ndarray]:
    """The ``expected`` fields of an npz file (and any others if ``extras``); problems go to ``s``."""
    out: dict[str, np.ndarray] = {}
    try:
        npz = np.load(io.BytesIO(s.files[name]), allow_pickle=False)
    except Exception as e:  # a damaged zip raises zipfile, zlib, ValueError or OSError errors
        s.problem(name, f"corrupt npz ({type(e).__name__}: {e})")
        return out
    with npz:
        expected = list(expected)
        others = sorted(set(npz.files) - set(expected))
        for f in expected + others:
            if f not in npz.files or (f in others and not extras):
                s.problem(f"{name}:{f}", "missing field" if f not in npz.files else "unexpected field")
                continue
            try:
                out[f] = npz[f]
            except Exception as e:
                s.problem(f"{name}:{f}", f"corrupt array ({type(e).__name__}: {e})")
    return out


def _load_json(s: Sample, name: str):
    try:
        return json.loads(s.files[name])
    except (ValueError, UnicodeDecodeError) as e:
        s.problem(name, f"corrupt json ({e})")
        return None


def decode(s: Sample) -> Sample:
    """Decode ``s.files`` in place; missing files and decoding failures go to ``s.problems``."""
    required = CLIP_FILES if s.is_clip else VIEW_FILES
    for name in required:
        if name not in s.files:
            s.problem(name, "missing file")
    for name in sorted(set(s.files) - set(required)):
        s.problem(name, "unexpected file")
    if "rgb.png" in s.files and not s.is_clip:
        try:
            with Image.open(io.BytesIO(s.files["rgb.png"])) as im:
                im.load()
                s.rgb = np.asarray(im)
                if im.mode != "RGB":
                    s.problem("rgb.png", f"image mode {im.mode}, expected RGB")
        except Exception as e:  # PIL raises many types for damaged data
            s.problem("rgb.png", f"corrupt png ({type(e).__name__}: {e})")
    if "layers.npz" in s.files and not s.is_clip:
        s.layers = _load_npz(s, "layers.npz", LAYER_DTYPES)
    if s.is_clip:
        s.tracks = _load_npz(s, "tracks.npz", TRACK_FIELDS, extras=True)
    for name in ("camera.json", "cameras.json", "meta.json"):
        if name in s.files and name in required:
            setattr(s, name.split(".")[0], _load_json(s, name))
    return s


def read_samples(paths: Iterable[Path]) -> Iterator[Sample | Problem]:
    """Decoded samples and tar-level problems, in shard order. The next sample is decoded in a thread while
    the caller works on this one: inflating and the numpy checks both run mostly outside the GIL."""
    with ThreadPoolExecutor(1) as pool:
        ahead = None
        for item in iter_raw(paths):
            nxt = pool.submit(decode, item) if isinstance(item, Sample) else item
            if ahead is not None:
                yield ahead.result() if isinstance(ahead, Future) else ahead
            ahead = nxt
        if ahead is not None:
            yield ahead.result() if isinstance(ahead, Future) else ahead


# ------------------------------------------------------------------------------------------- validation


def _first(mask: np.ndarray, axes: tuple[str, ...] | None) -> str:
    """Where the first True of ``mask`` is: 'layer k pixel (u, v)' for (K, H, W) or (H, W) layer masks
    (``axes`` None), else each axis named, e.g. 'frame 3 track 17'."""
    idx = np.unravel_index(int(np.argmax(mask)), mask.shape)
    if axes is not None:
        return " ".join(f"{a} {i}" for a, i in zip(axes, idx))
    loc = f"pixel (u={idx[-1]}, v={idx[-2]})"
    return f"layer {idx[0]} {loc}" if mask.ndim == 3 else loc


def _count(s: Sample, name: str, mask: np.ndarray, what: str, axes: tuple[str, ...] | None = None) -> None:
    """One problem for all the True entries of ``mask``: how many, and where the first is."""
    n = int(np.count_nonzero(mask))
    if n:
        s.problem(name, f"{what} at {n} entries (first: {_first(mask, axes)})")


def _shape_ok(s: Sample) -> bool:
    """dtype and shape of every layers.npz field; True when all fields are present and agree."""
    L = s.layers
    depth = L.get("depth")
    if depth is None or depth.ndim != 3:
        if depth is not None:
            s.problem("layers.npz:depth", f"shape {depth.shape}, expected (K, H, W)")
        return False
    ok = len(L) == len(LAYER_DTYPES)
    for name, dtype in LAYER_DTYPES.items():
        a = L.get(name)
        if a is None:
            continue
        want = depth.shape[1:] if name == "num_hits" else depth.shape + LAYER_TRAILING.get(name, ())
        if a.dtype != dtype:
            s.problem(f"layers.npz:{name}", f"dtype {a.dtype}, expected {np.dtype(dtype)}")
            ok = False
        if a.shape != want:
            s.problem(f"layers.npz:{name}", f"shape {a.shape}, expected {want}")
            ok = False
    return ok


def _camera(s: Sample, d, name: str) -> Camera | None:
    try:
        return Camera.from_json(d)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e).removeprefix("camera: ")
        s.problem(name, msg)
        return None


def _at(mask: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """A mask shaped like ``mask`` that is True where ``mask`` is and the compact ``sel`` (one entry per True
    of ``mask``, in C order) is; built only to name a problem's first location."""
    out = np.zeros(mask.shape, dtype=bool)
    out[mask] = sel
    return out


def _check_layers(s: Sample, cam: Camera | None) -> None:
    """Value rules of the layer stack, each one vectorised pass. Per-hit rules work on the compact valid
    entries (a fraction of K*H*W) and avoid ``@``: BLAS-threaded (N, 3) x (3, 3) matmuls crawl on a busy
    machine."""
    L = s.layers
    depth, valid, nh = L["depth"], L["valid"], L["num_hits"]
    K = depth.shape[0]
    invalid = ~valid
    d = depth[valid]
    good = (d > 0) & (d < np.inf)  # NaN fails both
    if not good.all():  # rare: say which way it is wrong
        _count(s, "layers.npz:depth", _at(valid, ~np.isfinite(d)), "non-finite depth where valid")
        _count(s, "layers.npz:depth", _at(valid, d <= 0), "non-positive depth where valid")
    _count(s, "layers.npz:depth", invalid & (depth != 0), "nonzero depth where invalid")
    monotone = "non-monotone validity (valid after an invalid layer)"  # layer k+1 valid only if layer k is
    _count(s, "layers.npz:valid", valid[1:] & invalid[:-1], monotone)
    _count(s, "layers.npz:depth", valid[1:] & (depth[1:] < depth[:-1]), "depth decreasing across layers")
    _count(s, "layers.npz:num_hits", nh < 0, "negative num_hits")
    count_wrong = np.minimum(nh, K) != valid.sum(0, dtype=np.int32)
    _count(s, "layers.npz:num_hits", count_wrong, "min(num_hits, K) != valid layer count")
    for name in ("face_id", "instance_id"):
        a = L[name]
        _count(s, f"layers.npz:{name}", (a < 0) != invalid, "id < 0 where valid or != -1 where invalid")
        _count(s, f"layers.npz:{name}", a < -1, "id below -1")
    _count(s, "layers.npz:front_facing", invalid & L["front_facing"], "front_facing where invalid")
    # float16 bits without the sign are 0 exactly for +-0; integer ORs of the three components are far
    # cheaper than float16 maths or a reduction over the short last axis
    bits = L["normal"].view(np.uint16)
    nonzero = ((bits[..., 0] | bits[..., 1] | bits[..., 2]) & 0x7FFF) != 0
    _count(s, "layers.npz:normal", invalid & nonzero, "nonzero normal where invalid")
    n = _F16_TO_F32[bits[valid]].T  # (3, M) float32, the valid hits in C order; a table beats astype 5x
    unit = np.abs(n[0] * n[0] + n[1] * n[1] + n[2] * n[2] - 1) <= 2 * NORMAL_TOL
    if not unit.all():
        _count(s, "layers.npz:normal", _at(valid, ~unit), "non-unit normal where valid")
    if cam is None or cam.height != depth.shape[1] or cam.width != depth.shape[2]:
        return
    # each hit's pixel-centre ray K^-1 (u + .5, v + .5, 1), computed here independently of the writer
    k, v, u = np.nonzero(valid)
    uc, vc = u.astype(np.float32) + 0.5, v.astype(np.float32) + 0.5
    Ki = np.linalg.inv(cam.K).astype(np.float32)
    rays = Ki[:, :1] * uc + Ki[:, 1:2] * vc + Ki[:, 2:]  # (3, M)
    # an entering crossing has its normal against the ray; skip grazing hits where float16 normals blur it
    cos = n[0] * rays[0] + n[1] * rays[1] + n[2] * rays[2]
    wrong = ((cos < 0) != L["front_facing"][valid]) & (np.abs(cos) > NORMAL_TOL)
    if wrong.any():
        _count(s, "layers.npz:front_facing", _at(valid, wrong), "disagrees with the normal's orientation")
    # layer-0 points xyz = depth * ray must project (K xyz / z) back onto their own pixel centres
    first = (k == 0) & good
    xyz = (d[first] * rays[:, first]).astype(np.float64)
    p = np.einsum("ij,jn->in", cam.K, xyz)
    err = np.maximum(np.abs(p[0] / p[2] - uc[first]), np.abs(p[1] / p[2] - vc[first]))
    off = np.zeros(len(k), dtype=bool)
    off[first] = ~(err <= REPROJECTION_TOL_PX)
    if off.any():
        what = f"layer-0 point reprojects more than {REPROJECTION_TOL_PX} px off its pixel"
        _count(s, "layers.npz:depth", _at(valid, off), what)


def _check_meta(s: Sample, K: int | None, max_instance: int | None) -> None:
    m = s.meta
    if not isinstance(m, dict):
        s.problem("meta.json", "not a JSON object")
        return
    keys = ("schema_version",) if s.is_clip else META_KEYS
    for k in keys:
        if k not in m:
            s.problem(f"meta.json:{k}", "missing field")
    if "schema_version" in m and m["schema_version"] not in SCHEMA_VERSIONS:
        s.problem("meta.json:schema_version", f"unsupported version {m['schema_version']!r}")
    if K is not None and "num_layers" in m and m["num_layers"] != K:
        s.problem("meta.json:num_layers", f"{m['num_layers']!r} but layers.npz holds K={K}")
    names = m.get("instance_names")
    if max_instance is not None and isinstance(names, list) and max_instance >= len(names):
        s.problem("meta.json:instance_names", f"{len(names)} names but instance_id reaches {max_instance}")


def _check_view(s: Sample, shape_ok: bool) -> None:
    cam = _camera(s, s.camera, "camera.json") if s.camera is not None else None
    K = max_inst = None
    if shape_ok:
        K, H, W = s.layers["depth"].shape
        if cam is not None and (cam.height, cam.width) != (H, W):
            s.problem("camera.json", f"size {cam.width}x{cam.height} but layers.npz is {W}x{H}")
        _check_layers(s, cam)
        inst = s.layers["instance_id"]
        max_inst = int(inst.max()) if inst.size else None
    if s.rgb is not None and cam is not None:
        if s.rgb.dtype != np.uint8 or s.rgb.shape != (cam.height, cam.width, 3):
            s.problem(
                "rgb.png", f"{s.rgb.dtype} {s.rgb.shape}, expected uint8 ({cam.height}, {cam.width}, 3)"
            )
    if s.meta is not None:
        _check_meta(s, K, max_inst)


def clip_cameras(s: Sample) -> list | None:
    """Per-frame camera dicts of ``cameras.json``: a list, or a record holding a ``cameras`` list."""
    c = s.cameras
    return c.get("cameras") if isinstance(c, dict) else c


def _check_clip(s: Sample) -> None:
    if s.meta is not None:
        _check_meta(s, None, None)
    t = s.tracks
    wx = t.get("world_xyz")
    if wx is None or wx.ndim != 3 or wx.shape[-1] != 3:
        if wx is not None:
            s.problem("tracks.npz:world_xyz", f"shape {wx.shape}, expected (T, N, 3)")
        return
    T, N = wx.shape[:2]
    want = {  # name -> (shape, dtype or dtype kind); query_frame is a scalar or one per query
        "world_xyz": ((T, N, 3), "f4"),
        "cam_xyz": ((T, N, 3), "f4"),
        "uv": ((T, N, 2), "f"),
        "layer_index": ((T, N), "i1"),
        "query_pixel": ((N, 2), "i"),
        "query_layer": ((N,), "i"),
        "query_frame": (None, "i"),
    }
    ok = all(name in t for name in TRACK_FIELDS)
    for name, (shape, kind) in want.items():
        a = t.get(name)
        if a is None:
            continue
        dt_ok = a.dtype == np.dtype(kind) if len(kind) > 1 else a.dtype.kind == kind
        shape_ok = a.shape in ((), (N,)) if shape is None else a.shape == shape
        if not dt_ok:
            s.problem(f"tracks.npz:{name}", f"dtype {a.dtype}, expected {kind}")
        if not shape_ok:
            s.problem(f"tracks.npz:{name}", f"shape {a.shape}, expected {shape or '() or (N,)'}")
        ok &= dt_ok and shape_ok
    _count(s, "tracks.npz:world_xyz", ~np.isfinite(wx).all(-1), "non-finite point", ("frame", "track"))
    cams = clip_cameras(s)
    if s.cameras is not None and not isinstance(cams, list):
        s.problem("cameras.json", "neither a list of cameras nor a record with a 'cameras' list")
        return
    if not ok or cams is None:
        return
    if len(cams) != T:
        s.problem("cameras.json", f"{len(cams)} cameras for {T} frames")
        return
    cams = [_camera(s, c, f"cameras.json[{i}]") for i, c in enumerate(cams)]
    if any(c is None for c in cams):
        return
    R = np.stack([c.rotation for c in cams])  # (T, 3, 3)
    tr = np.stack([c.world_to_cam[:3, 3] for c in cams])
    cam_xyz = np.einsum("tij,tnj->tni", R, wx.astype(np.float64)) + tr[:, None]
    scale = max(float(np.abs(cam_xyz[np.isfinite(cam_xyz)]).max(initial=0)), 1e-6)
    bad = ~(np.abs(cam_xyz - t["cam_xyz"]).max(-1) <= 1e-5 * scale)
    _count(s, "tracks.npz:cam_xyz", bad, "disagrees with world_to_cam @ world_xyz", ("frame", "track"))
    # image-plane checks use the stored cam_xyz/uv: in front of the camera and inside the image (with a
    # float32 rounding margin) is where layer_index may be >= 0, and where uv must be the projection
    z = t["cam_xyz"][..., 2].astype(np.float64)
    uv = t["uv"].astype(np.float64)
    wh = np.array([[c.width, c.height] for c in cams], dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        inside = (z > 0) & (uv >= -REPROJECTION_TOL_PX).all(-1) & (uv < wh + REPROJECTION_TOL_PX).all(-1)
        p = np.einsum("tij,tnj->tni", np.stack([c.K for c in cams]), t["cam_xyz"].astype(np.float64))
        proj = p[..., :2] / np.where(inside[..., None], p[..., 2:3], 1.0)
        off = np.abs(proj - uv).max(-1) > REPROJECTION_TOL_PX
    _count(s, "tracks.npz:uv", inside & off, "disagrees with the projection of cam_xyz", ("frame", "track"))
    li = t["layer_index"]
    _count(
        s,
        "tracks.npz:layer_index",
        (li >= 0) & ~inside,
        "layer >= 0 for a point outside the image",
        ("frame", "track"),
    )
    _count(s, "tracks.npz:layer_index", li < -1, "layer below -1", ("frame", "track"))
    qf = np.broadcast_to(t["query_frame"], (N,)).astype(np.int64)
    if ((qf < 0) | (qf >= T)).any():
        s.problem("tracks.npz:query_frame", f"outside 0..{T - 1}")
        return
    n = np.arange(N)
    _count(
        s,
        "tracks.npz:layer_index",
        li[qf, n] != t["query_layer"],
        "at the query frame != query_layer",
        ("track",),
    )
    off = ~(np.abs(uv[qf, n] - (t["query_pixel"] + 0.5)).max(-1) <= REPROJECTION_TOL_PX)
    _count(s, "tracks.npz:uv", off, "at the query frame off the query pixel centre", ("track",))


def check(s: Sample, shape_ok: bool | None = None) -> list[Problem]:
    """Every schema rule for one decoded sample; returns ``s.problems`` (decoding problems included).
    ``shape_ok``: the result of an earlier ``_shape_ok(s)``, so its problems are not reported twice."""
    if s.is_clip:
        _check_clip(s)
    else:
        _check_view(s, _shape_ok(s) if shape_ok is None else shape_ok)
    return s.problems


# ------------------------------------------------------------------------------------------- summary


@dataclass
class _Stats:
    """Running totals over decoded samples; arrays grow to the largest K seen."""

    views: int = 0
    clips: int = 0
    payload_bytes: int = 0
    malformed: int = 0
    tracks: int = 0
    per_asset: Counter = field(default_factory=Counter)
    res_k: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    layer_hist: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # pixels with exactly k
    dmin: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dmax: np.ndarray = field(default_factory=lambda: np.zeros(0))
    truncated: int = 0

    def add(self, s: Sample, shape_ok: bool) -> None:
        self.payload_bytes += s.nbytes
        meta = s.meta if isinstance(s.meta, dict) else {}
        self.per_asset[str(meta.get("asset_id", meta.get("sequence_id", "?")))] += 1
        self.versions[str(meta.get("schema_version", "?"))] += 1
        if s.is_clip:
            self.clips += 1
            wx = s.tracks.get("world_xyz")
            self.tracks += int(wx.shape[1]) if wx is not None and wx.ndim == 3 else 0
            return
        self.views += 1
        if not shape_ok:
            self.malformed += 1
            return
        depth, valid = s.layers["depth"], s.layers["valid"]
        K, H, W = depth.shape
        self.res_k[f"{W}x{H} K={K}"] += 1
        self._grow(K)
        self.layer_hist[: K + 1] += np.bincount(valid.sum(0).ravel(), minlength=K + 1)
        with np.errstate(invalid="ignore"):
            self.dmin[:K] = np.fmin(self.dmin[:K], np.where(valid, depth, np.inf).min(axis=(1, 2)))
            self.dmax[:K] = np.fmax(self.dmax[:K], np.where(valid, depth, -np.inf).max(axis=(1, 2)))
        self.truncated += int(np.count_nonzero(s.layers["num_hits"] > K))

    def _grow(self, K: int) -> None:
        n = len(self.dmin)
        if K > n:
            self.layer_hist = np.concatenate([self.layer_hist, np.zeros(K - n, np.int64)])
            self.dmin = np.concatenate([self.dmin, np.full(K - n, np.inf)])
            self.dmax = np.concatenate([self.dmax, np.full(K - n, -np.inf)])

    def report(self, paths: list[Path], problems: list[Problem]) -> dict:
        pixels = int(self.layer_hist.sum())
        at_least = np.cumsum(self.layer_hist[::-1])[::-1][1:] / max(pixels, 1)  # index k-1: >= k layers
        counts = sorted(self.per_asset.values())
        return {
            "shards": len(paths),
            "shard_bytes": int(sum(p.stat().st_size for p in paths)),
            "samples": self.views + self.clips,
            "views": self.views,
            "clips": self.clips,
            "tracks": self.tracks,
            "payload_bytes": self.payload_bytes,
            "assets": len(self.per_asset),
            "samples_per_asset": dict(sorted(self.per_asset.items())),
            "samples_per_asset_min_median_max": [counts[0], counts[len(counts) // 2], counts[-1]]
            if counts
            else [],
            "resolution_and_K": dict(self.res_k),
            "pixels": pixels,
            "fraction_at_least_k_layers": {str(k + 1): float(f) for k, f in enumerate(at_least)},
            "depth_range_per_layer": [
                [float(a), float(b)] if a <= b else None for a, b in zip(self.dmin, self.dmax)
            ],
            "truncated_ray_fraction": self.truncated / max(pixels, 1),
            "schema_versions": dict(self.versions),
            "unreadable_views": self.malformed,
            "problems": [str(p) for p in problems],
        }


def scan(paths: list[Path], validate: bool = False, keep=None) -> tuple[dict, list[Problem], list[Sample]]:
    """One pass over ``paths``: summary dict, problems (decoding ones always, schema ones if ``validate``)
    and the samples for which ``keep(index, sample)`` is true. Duplicate keys are problems."""
    stats, problems, kept, seen = _Stats(), [], [], {}
    index = 0
    for item in read_samples(paths):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        if item.key in seen:
            item.problem("-", f"duplicate sample key (first in {seen[item.key]})")
        seen.setdefault(item.key, item.shard)
        try:
            shape_ok = item.is_clip or _shape_ok(item)
            if validate:
                check(item, shape_ok)
            stats.add(item, shape_ok)
        except Exception as e:  # data malformed in a way no rule foresaw: still one line, and go on
            item.problem("-", f"could not be checked ({type(e).__name__}: {e})")
        problems += item.problems
        if keep is not None and keep(index, item):
            kept.append(item)
        index += 1
    return stats.report(paths, problems), problems, kept


def summarise(paths) -> dict:
    """Summary of the shards in ``paths`` (specs as on the command line); see :func:`format_summary`."""
    return scan(expand_shards([str(p) for p in paths]))[0]


def validate(paths) -> list[Problem]:
    """Every problem in the shards in ``paths``: unreadable parts and broken schema rules."""
    return scan(expand_shards([str(p) for p in paths]), validate=True)[1]


def format_summary(d: dict) -> str:
    """The summary dict as a small text table."""
    mb = d["shard_bytes"] / 1e6
    per = d["payload_bytes"] / max(d["samples"], 1) / 1e6
    lines = [
        f"shards            {d['shards']} ({mb:.1f} MB)",
        f"samples           {d['samples']} ({d['views']} views, {d['clips']} clips with "
        f"{d['tracks']} tracks; {per:.2f} MB per sample)",
        f"assets            {d['assets']} (samples per asset min/median/max: "
        f"{'/'.join(map(str, d['samples_per_asset_min_median_max']))})",
    ]
    if d["assets"] <= 10:
        width = max(map(len, d["samples_per_asset"]), default=0) + 2
        lines += [f"  {a:<{width}}{n}" for a, n in d["samples_per_asset"].items()]
    lines += [
        f"resolution, K     {', '.join(f'{k}: {n}' for k, n in d['resolution_and_K'].items()) or '-'}",
        f"schema versions   {', '.join(f'{k}: {n}' for k, n in d['schema_versions'].items()) or '-'}",
        f"truncated rays    {100 * d['truncated_ray_fraction']:.3f}% (num_hits > K)",
        "layer  pixels with >= layer+1 valid layers  depth min   depth max",
    ]
    for i, (k, f) in enumerate(d["fraction_at_least_k_layers"].items()):
        rng = d["depth_range_per_layer"][int(k) - 1]
        lo, hi = (f"{rng[0]:10.4g}", f"{rng[1]:10.4g}") if rng else ("         -", "         -")
        lines.append(f"{i:>5}  {100 * f:34.2f}%  {lo}  {hi}")
    lines.append(
        f"problems          {len(d['problems'])}"
        + (f" ({d['unreadable_views']} views unreadable)" if d["unreadable_views"] else "")
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- pictures, PLY


def _panel_grid(n: int, ncols: int = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    return plt, fig, list(axes.ravel())


def _show(ax, img, title: str, **kw):
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    return im


def _layer_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per layer index (tab10 cycled)."""
    import matplotlib

    return (np.asarray(matplotlib.colormaps["tab10"](np.arange(n) % 10))[:, :3] * 255).astype(np.uint8)


def contact_sheet(sample: Sample, out_png, background: np.ndarray | None = None) -> Path:
    """Write one labelled contact sheet PNG for a decoded sample and return its path.

    A view shows the RGB image, each layer's depth in one shared colour scale, layer-0 normals, the entering
    and exiting crossings per pixel and the per-pixel layer count. A clip track sample shows its 2D tracks
    over ``background`` (the clip's first frame, (H, W, 3) uint8, if known) coloured by layer index, and
    the share of tracks on each layer over time.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    title = f"{sample.key}  ({Path(sample.shard).name})"
    if sample.is_clip:
        _clip_sheet(sample, out_png, background, title)
        return out_png
    L = sample.layers
    have = {"depth", "valid"} <= L.keys() and L["depth"].ndim == 3 and L["valid"].shape == L["depth"].shape
    K = L["depth"].shape[0] if have else 0
    plt, fig, axes = _panel_grid(1 + K + 4)
    if sample.rgb is not None:
        _show(axes[0], sample.rgb, "rgb.png")
    else:
        axes[0].set_title("rgb.png: unreadable", fontsize=9)
    if not have:
        axes[1].set_title("layers.npz: unreadable", fontsize=9)
    else:
        depth, valid = L["depth"], L["valid"]
        vals = depth[valid & np.isfinite(depth)]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        for k in range(K):
            im = _show(
                axes[1 + k],
                np.where(valid[k], depth[k], np.nan),
                f"depth layer {k} (camera z)",
                cmap="turbo",
                vmin=lo,
                vmax=hi,
            )
        fig.colorbar(im, ax=axes[K], shrink=0.8, label="depth, all layers")  # one shared scale
        i = 1 + K
        if "normal" in L and L["normal"].shape == depth.shape + (3,):
            n0 = L["normal"][0].astype(np.float32)
            _show(
                axes[i],
                np.where(valid[0][..., None], (n0 + 1) / 2, 1).clip(0, 1),
                "normal layer 0 (xyz->rgb)",
            )
        if "front_facing" in L and L["front_facing"].shape == depth.shape:
            ff = L["front_facing"]
            cmax = max(int(valid.sum(0).max()), 1)
            im = _show(
                axes[i + 1],
                (valid & ff).sum(0),
                "entering crossings per pixel",
                cmap="viridis",
                vmin=0,
                vmax=cmax,
            )
            _show(
                axes[i + 2],
                (valid & ~ff).sum(0),
                "exiting crossings per pixel",
                cmap="viridis",
                vmin=0,
                vmax=cmax,
            )
            fig.colorbar(im, ax=axes[i + 2], shrink=0.8, label="crossings")  # shared by both panels
        im = _show(axes[i + 3], valid.sum(0), f"valid layers per pixel (K={K})", cmap="magma", vmin=0, vmax=K)
        fig.colorbar(im, ax=axes[i + 3], shrink=0.6)
    fig.suptitle(title)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _clip_sheet(sample: Sample, out_png: Path, background, title: str) -> None:
    from matplotlib.collections import LineCollection

    t = sample.tracks
    plt, fig, axes = _panel_grid(2, ncols=2)
    uv, li = t.get("uv"), t.get("layer_index")
    cams = clip_cameras(sample)
    cams = cams if isinstance(cams, list) and cams and isinstance(cams[0], dict) else [{}]
    W, H = int(cams[0].get("width", 1)), int(cams[0].get("height", 1))
    ax = axes[0]
    if background is not None:
        ax.imshow(background, alpha=0.5)  # dimmed so the tracks stand out
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_on()
    ax.set_title("2D tracks on frame 0 (colour: layer index)", fontsize=9)
    if uv is None or li is None or uv.ndim != 3 or li.shape != uv.shape[:2]:
        ax.set_title("tracks.npz: unreadable", fontsize=9)
    else:
        T, N = li.shape
        pick = np.linspace(0, N - 1, min(N, MAX_DRAWN_TRACKS)).astype(int) if N else np.zeros(0, int)
        seg = np.stack([uv[:-1, pick], uv[1:, pick]], axis=2).reshape(-1, 2, 2)  # (T-1)*n segments
        lay = li[:-1, pick].ravel()
        shown = (lay >= 0) & np.isfinite(seg).all(axis=(1, 2))
        nl = int(li.max()) + 1 if li.size else 1
        colours = _layer_colours(max(nl, 1)) / 255.0
        ax.add_collection(LineCollection(seg[shown], colors=colours[lay[shown]], linewidths=0.6))
        for k in range(nl):
            ax.plot([], [], color=colours[k], label=f"layer {k}")
        if nl:
            ax.legend(fontsize=7, loc="upper right")
        share = np.stack([(li == k).mean(1) for k in range(-1, nl)], 1) if N else np.zeros((T, nl + 1))
        ax2 = axes[1]
        ax2.set_axis_on()
        ax2.stackplot(
            np.arange(T),
            share.T,
            labels=["outside"] + [f"layer {k}" for k in range(nl)],
            colors=[(0.7, 0.7, 0.7)] + list(colours[:nl]),
        )
        ax2.set_xlabel("frame")
        ax2.set_ylabel("share of tracks")
        ax2.set_title("layer index of the tracks over time", fontsize=9)
        ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def layered_points(
    sample: Sample, frame: str = "camera", colour: str = "layer"
) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) float32 points of every valid hit (all layers; a clip: its query points at the query frame)
    in the ``camera`` or ``world`` frame, and (M, 3) uint8 colours by ``layer`` index or ``image`` colour."""
    if frame not in ("camera", "world") or colour not in ("layer", "image"):
        raise ValueError(f"export: frame must be camera|world and colour layer|image, got {frame}, {colour}")
    if sample.is_clip:
        t = sample.tracks
        qf = np.broadcast_to(t["query_frame"], t["query_layer"].shape).astype(np.int64)
        n = np.arange(len(qf))
        xyz = (t["cam_xyz"] if frame == "camera" else t["world_xyz"])[qf, n].astype(np.float32)
        return xyz, _layer_colours(int(t["query_layer"].max(initial=0)) + 1)[t["query_layer"]]
    cam = Camera.from_json(sample.camera)
    depth, valid = sample.layers["depth"], sample.layers["valid"]
    k, v, u = np.nonzero(valid)
    xyz = depth_to_xyz(depth, cam.K)[k, v, u]
    if frame == "world":
        xyz = (xyz @ cam.cam_to_world[:3, :3].T + cam.cam_to_world[:3, 3]).astype(np.float32)
    if colour == "image":
        if sample.rgb is None:
            raise ValueError(f"export: {sample.key}: rgb.png unreadable, cannot colour by image")
        rgb = sample.rgb[v, u]
    else:
        rgb = _layer_colours(depth.shape[0])[k]
    return xyz, rgb


def export_ply(sample: Sample, out_ply, frame: str = "camera", colour: str = "layer") -> int:
    """Write the sample's layered points as a binary PLY (x, y, z float; red, green, blue, alpha uchar),
    readable by Open3D and MeshLab. Returns the number of points."""
    import trimesh

    xyz, rgb = layered_points(sample, frame, colour)
    out_ply = Path(out_ply)
    out_ply.parent.mkdir(parents=True, exist_ok=True)
    out_ply.write_bytes(trimesh.PointCloud(xyz, colors=rgb).export(file_type="ply"))
    return len(xyz)


def first_frame_rgb(paths: list[Path], clip: Sample) -> np.ndarray | None:
    """The RGB image of the first frame of ``clip`` (its sequence and clip index; ``view_index`` 0 is the clip's
    first frame, which need not be the sequence's frame 0), if a shard holds it."""
    m = clip.meta if isinstance(clip.meta, dict) else {}
    want = (m.get("sequence_id"), m.get("clip_index"))
    if want[0] is None:
        return None
    for item in iter_raw(paths):
        if not isinstance(item, Sample) or "meta.json" not in item.files or item.is_clip:
            continue
        try:
            fm = json.loads(item.files["meta.json"])
        except ValueError:
            continue
        if (
            isinstance(fm, dict)
            and (fm.get("sequence_id"), fm.get("clip_index")) == want
            and fm.get("view_index") == 0
        ):
            return decode(item).rgb
    return None


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "shards",
        nargs="+",
        metavar="SHARDS",
        help="shard files, folders, globs or brace patterns (out/shard-{000000..000009}.tar)",
    )
    parser.add_argument("--validate", action="store_true", help="check every sample against the schema")
    parser.add_argument(
        "--show",
        nargs="+",
        metavar="N|KEY",
        help="samples to picture/export: a count N (the first N) or sample keys",
    )
    parser.add_argument(
        "--out", default="inspect_out", help="folder for contact sheets (default: inspect_out)"
    )
    parser.add_argument(
        "--export-ply",
        metavar="DIR",
        help="write the chosen samples' layered points as PLY (default choice: the first sample)",
    )
    parser.add_argument("--ply-frame", choices=("camera", "world"), default="camera")
    parser.add_argument("--ply-colour", choices=("layer", "image"), default="layer")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _chooser(show: list[str] | None, export: bool):
    """keep(index, sample) for --show: a single integer N picks the first N samples, otherwise keys."""
    if not show:
        return (lambda i, s: i == 0) if export else None
    if len(show) == 1 and show[0].isdigit():
        n = int(show[0])
        return lambda i, s: i < n
    keys = set(show)
    return lambda i, s: s.key in keys


def run(args: argparse.Namespace) -> int:
    try:
        paths = expand_shards(args.shards)
    except InspectError as e:
        print(e, file=sys.stderr)
        return 2
    summary, problems, kept = scan(
        paths, validate=args.validate, keep=_chooser(args.show, bool(args.export_ply))
    )
    if args.show and not (len(args.show) == 1 and args.show[0].isdigit()):
        for missing in sorted(set(args.show) - {s.key for s in kept}):
            print(f"inspect: --show: no sample with key {missing}", file=sys.stderr)
            problems.append(Problem("-", missing, "--show", "no such sample"))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        for p in problems:
            print(p)
    for s in kept:
        if args.show:
            bg = first_frame_rgb(paths, s) if s.is_clip else None
            print(f"contact sheet: {contact_sheet(s, Path(args.out) / f'{s.key}.png', bg)}", file=sys.stderr)
        if args.export_ply:
            out = Path(args.export_ply) / f"{s.key}.ply"
            try:
                n = export_ply(s, out, args.ply_frame, args.ply_colour)
                print(f"ply: {out} ({n} points)", file=sys.stderr)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                print(f"inspect: {s.shard}: {s.key}: export skipped ({e})", file=sys.stderr)
    return 1 if problems else 0
