"""The shard schema, in one place: what a sample is, how it is keyed, encoded and decoded.

Writer (``pipeline``), inspector (``inspect``) and loader (``wt_model``) all go through this module: the
schema version, every file and field with its dtype and shape, the key format, the ``meta.json`` and
``cameras.json`` records, the encoder of a sample's files and the one decoder of them. Every file uses a
standard extension, so plain ``webdataset`` with its default decoders reads shards too. Decoding never
unpickles. Only numpy, PIL and ISA-L are needed (no caster, no torch).

Version policy: ``SCHEMA_VERSION`` changes only when a reader written for the previous version would misread
a sample: an existing file or field changing meaning, dtype or shape, or a new required file or field. New
*optional* fields (:data:`LAYER_OPTIONAL`, :data:`TRACK_OPTIONAL`, extra ``meta.json`` keys) keep the
version: readers that do not know them skip them (an older ``inspect --validate`` names them as unexpected,
which is a report, not a misreading). Version 1 gained the motion fields this way.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable, Iterable

import numpy as np
from isal import isal_zlib
from PIL import Image

from .camera import Camera

SCHEMA_VERSION = 1
SCHEMA_VERSIONS = {SCHEMA_VERSION}  # versions this code reads
# The caster's arrays stored per sample, with their dtypes in the shard (README "Shard schema").
LAYER_DTYPES = {
    "depth": np.float32,
    "valid": np.bool_,
    "normal": np.float16,
    "front_facing": np.bool_,
    "face_id": np.int32,
    "instance_id": np.int32,
    "num_hits": np.int32,
}
# Optional layers.npz fields, written for a clip's frames (README "Sequences and tracks"): ``dynamic`` the
# crossing's material point moves in the world between this frame and the next; ``next_world_xyz`` its world
# position at the next frame (``sequences.scene_flow``). A static view has neither. ``albedo`` (config
# ``outputs: {albedo: true}``, views and frames): the base colour at each crossing, sRGB-encoded.
LAYER_OPTIONAL = {"dynamic": np.bool_, "next_world_xyz": np.float32, "albedo": np.uint8}
LAYER_TRAILING = {"normal": (3,), "next_world_xyz": (3,), "albedo": (3,)}  # after (K, H, W); num_hits (H, W)
VIEW_FILES = ("rgb.png", "layers.npz", "camera.json", "meta.json")  # a view (or a clip's frame)
CLIP_FILES = ("tracks.npz", "cameras.json", "meta.json")  # a clip's tracks sample
# required clip track fields; others (query_face, timestamp, ...) are read and allowed
TRACK_FIELDS = ("query_frame", "query_layer", "query_pixel", "world_xyz", "cam_xyz", "uv", "layer_index")
# Optional track fields: name -> (dtype, shape in terms of T frames, N tracks, K layers)
TRACK_OPTIONAL = {
    "world_displacement": (np.float32, ("N",)),  # max over the clip of the distance from the query-frame point
    "dynamic": (np.bool_, ("N",)),  # world_displacement > meta.json dynamic_tolerance
    "coverage": (np.float32, ("T", "K")),  # track_coverage() of each frame and layer (NaN: layer empty)
}
META_KEYS = (  # every view's meta.json; clip frames add SEQUENCE_META_KEYS
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
SEQUENCE_META_KEYS = ("sequence_id", "clip_index", "frame_index", "timestamp")
# written with every view since the image renderers took a lighting (README "meta.json"), absent in older shards
OPTIONAL_META_KEYS = ("image",)
_ZIP_DATE = (1 << 5) | 1  # 1980-01-01 in MS-DOS date format: fixed, so the same arrays give the same bytes


class SchemaError(ValueError):
    """A sample that does not follow the schema; the message is one line naming the file and the problem."""


def _check_id(item_id: str) -> str:
    if "." in item_id:  # webdataset splits file names at the first dot
        raise ValueError(f"sample key: item id {item_id!r} contains a dot")
    return item_id


def sample_key(item_id: str, view_index: int) -> str:
    """A static view: ``{item_id}_v{view:04d}``; keys have no dots."""
    return f"{_check_id(item_id)}_v{view_index:04d}"


def clip_prefix(sequence_id: str, clip_index: int) -> str:
    """``{sequence_id}_c{clip:03d}``: the common prefix of a clip's frame keys and its tracks key."""
    return f"{_check_id(sequence_id)}_c{clip_index:03d}"


def frame_key(sequence_id: str, clip_index: int, frame_index: int) -> str:
    """A clip's frame: ``{sequence_id}_c{clip:03d}_f{frame:04d}`` (``frame_index`` in the sequence)."""
    return f"{clip_prefix(sequence_id, clip_index)}_f{frame_index:04d}"


def tracks_key(sequence_id: str, clip_index: int) -> str:
    """A clip's tracks sample: ``{sequence_id}_c{clip:03d}_tracks``."""
    return f"{clip_prefix(sequence_id, clip_index)}_tracks"


_CLIP_KEY = re.compile(r"(?P<prefix>.+_c\d{3,})_(?:f(?P<frame>\d{4,})|tracks)")


def parse_clip_key(key: str) -> tuple[str, int | None] | None:
    """The inverse of :func:`frame_key` and :func:`tracks_key`: ``(clip prefix, frame index)`` for a clip's
    frame, ``(clip prefix, None)`` for its tracks sample, None for any other key (a static view)."""
    m = _CLIP_KEY.fullmatch(key)
    if m is None:
        return None
    return m["prefix"], None if m["frame"] is None else int(m["frame"])


def meta_record(*, asset_id: str, asset_path: str, asset_sha256: str, asset_to_world, config_name: str,
                config_hash: str, seed: int, num_layers: int, instance_names: list[str], version: str,
                **extra) -> dict:
    """The ``meta.json`` record shared by every sample of one item (README "Shard schema"); per-sample keys
    (``view_index``; a clip's ``clip_index``, ``frame_index``, ``timestamp``...) are added by the caller,
    ``schema_version`` by the encoder. ``asset_to_world`` is a 4x4 (array or nested lists)."""
    return {"asset_id": asset_id, "asset_path": asset_path, "asset_sha256": asset_sha256,
            "asset_to_world": np.asarray(asset_to_world, dtype=np.float64).tolist(), "config_name": config_name,
            "config_hash": config_hash, "seed": seed, "num_layers": num_layers,
            "instance_names": list(instance_names), "version": version, **extra}


def cameras_record(sequence_id: str, clip_index: int, trajectory: str, fps: float, frame_indices,
                   timestamps, cameras: list[Camera]) -> dict:
    """The ``cameras.json`` record of a clip: one camera per frame, in the sequence's world frame."""
    return {
        "sequence_id": sequence_id,
        "clip_index": clip_index,
        "trajectory": trajectory,
        "fps": fps,
        "frame_index": [int(f) for f in frame_indices],
        "timestamp": [float(s) for s in timestamps],
        "cameras": [c.to_json() for c in cameras],
    }


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """(H, W, 3) uint8 (or (H, W, 4) with straight alpha) to PNG bytes at zlib ``level``."""
    buf = io.BytesIO()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    Image.fromarray(rgb, "RGBA" if rgb.shape[-1] == 4 else "RGB").save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def encode_npz(arrays: dict[str, np.ndarray], level: int = 1) -> bytes:
    """Arrays to ``.npz`` bytes that ``np.load`` reads: a zip of ``.npy`` members, deflated by ISA-L at
    ``level`` (0-3).

    Written by hand rather than through ``zipfile``/``np.savez_compressed`` (stdlib zlib): ISA-L's deflate and
    crc32 take about a tenth of the time of zlib level 1 on these layer stacks, for slightly fewer bytes
    (tests/bench/bench_render.py prints both). Timestamps are fixed, so the same arrays give the same bytes.
    """
    out, central = io.BytesIO(), []
    for name, arr in arrays.items():
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
        head = head.getvalue()
        data = arr.data.cast("B") if arr.size else b""
        crc = isal_zlib.crc32(data, isal_zlib.crc32(head))
        comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)  # raw deflate, as zip stores it
        body = comp.compress(head) + comp.compress(data) + comp.flush()
        size = len(head) + len(data)
        if size >= 0xFFFFFFFF:
            raise ValueError(f"encode_npz: array {name!r} is too large for a zip without zip64")
        fname = (name + ".npy").encode()
        fields = (20, 0, 8, 0, _ZIP_DATE, crc, len(body), size, len(fname), 0)  # version, flags, deflate...
        central.append((fields, fname, out.tell()))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + fname)
        out.write(body)
    start = out.tell()
    for fields, fname, offset in central:
        out.write(struct.pack("<IH", 0x02014B50, 20) + struct.pack("<HHHHHIIIHH", *fields)
                  + struct.pack("<HHHII", 0, 0, 0, 0, offset) + fname)  # comment, disk, attributes
    end = out.tell()
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), end - start, start, 0))
    return out.getvalue()


def layer_arrays(hits) -> dict[str, np.ndarray]:
    """The stored subset of a caster ``Hits``, in the schema's dtypes."""
    out = {name: np.asarray(getattr(hits, name)).astype(dtype, copy=False) for name, dtype in LAYER_DTYPES.items()
           if name != "normal"}
    # float32 -> float16 is the costly conversion: layers past the deepest hit are zeros, so skip them
    # (validity is monotone along K, so the layers holding any hit come first)
    normal = np.asarray(hits.normal)
    used = int(out["valid"].any(axis=(1, 2)).sum())
    out["normal"] = np.zeros(normal.shape, np.float16)
    out["normal"][:used] = normal[:used]
    return {name: out[name] for name in LAYER_DTYPES}


def encode_sample(
    key: str,
    rgb: np.ndarray,
    hits,
    camera: Camera,
    meta: dict,
    png_level: int = 1,
    npz_level: int = 1,
    extra_layers: dict[str, np.ndarray] | None = None,
) -> dict[str, bytes]:
    """One sample's files.

    Args:
        rgb: (H, W, 3) uint8 image, pixel-aligned with layer 0; (H, W, 4) with alpha (coverage).
        hits: the caster's ``Hits`` for ``camera`` (K layers).
        meta: the ``meta.json`` record (README schema); ``schema_version`` is added here.
        extra_layers: optional ``layers.npz`` fields (:data:`LAYER_OPTIONAL`), stored in their schema dtypes.
    """
    arrays = layer_arrays(hits)
    for name, a in (extra_layers or {}).items():
        if name not in LAYER_OPTIONAL:
            raise ValueError(f"encode_sample: {name!r} is not an optional layers.npz field ({sorted(LAYER_OPTIONAL)})")
        arrays[name] = np.asarray(a).astype(LAYER_OPTIONAL[name], copy=False)
    return {
        "__key__": key,
        "rgb.png": encode_png(rgb, png_level),
        "layers.npz": encode_npz(arrays, npz_level),
        "camera.json": encode_json(camera.to_json()),
        "meta.json": encode_json({"schema_version": SCHEMA_VERSION, **meta}),
    }


def encode_json(record) -> bytes:
    return json.dumps(record).encode()


# ------------------------------------------------------------------------------------ what fields mean
# Definitions that the writer (which stores them) and the inspector (which checks them) must share.


def track_displacement(world_xyz: np.ndarray, query_frame: np.ndarray) -> np.ndarray:
    """(N,) float64 ``world_displacement``: for each track, the largest distance over the clip's frames from
    its position at its own query frame. ``world_xyz`` (T, N, 3) as stored (float32), ``query_frame`` (N,)."""
    w = np.asarray(world_xyz, dtype=np.float64)
    if w.shape[1] == 0:
        return np.zeros(0)
    ref = w[np.asarray(query_frame, dtype=np.int64), np.arange(w.shape[1])]
    return np.sqrt(((w - ref) ** 2).sum(-1)).max(0)


def _spread(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """``a`` (bool) OR-ed over the window ``i - r .. i + r`` along ``axis``: windows double in length
    (1, 2, 4, ...) up to w <= 2r + 1, then two overlapping ones cover the window (O(log r) passes)."""
    n, length = a.shape[axis], 2 * r + 1
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    m, w = np.pad(a, pad), 1

    def part(x, lo, hi):
        return x[(slice(None),) * axis + (slice(lo, hi),)]

    while 2 * w <= length:
        m, w = part(m, 0, m.shape[axis] - w) | part(m, w, None), 2 * w
    return part(m, 0, n) | part(m, length - w, length - w + n)


def track_coverage(valid: np.ndarray, uv: np.ndarray, layer: np.ndarray, radius: int) -> np.ndarray:
    """(K,) float64 ``coverage`` of one frame: for each layer k, the fraction of its valid pixels that have a
    track on layer k in a pixel at most ``radius`` rows and columns away (the track's pixel is
    ``floor(uv)``); NaN for a layer without valid pixels.

    Args:
        valid: (K, H, W) bool, the frame's layer mask.
        uv: (N, 2) continuous pixel coordinates of the tracks in this frame (pixel centres at +0.5).
        layer: (N,) the tracks' ``layer_index`` in this frame (-1 and values >= K are on no layer).
        radius: in pixels (the clip's ``query_stride``).
    """
    K, H, W = valid.shape
    uv = np.asarray(uv, dtype=np.float64)
    layer = np.asarray(layer)
    with np.errstate(invalid="ignore"):
        col, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        on = (layer >= 0) & (layer < K) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    near = np.zeros((K, H, W), dtype=bool)
    near[layer[on].astype(np.int64), row[on].astype(np.int64), col[on].astype(np.int64)] = True
    near = _spread(_spread(near, int(radius), 2), int(radius), 1)  # a track within radius columns, then rows
    n = valid.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (valid & near).sum((1, 2)) / n, np.nan)


# ------------------------------------------------------------------------------------------- decoding

Report = Callable[[str, str], object]  # (file or file:field, what is wrong)


def _raise(where: str, message: str):
    raise SchemaError(f"{where}: {message}")


def decode_npz(data: bytes, name: str, expected: Iterable[str] | None = None, others: str = "read",
               report: Report = _raise, optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """An npz file's arrays (never unpickled). ``expected``: the fields it must hold (None: whatever it has);
    ``optional``: fields read when present, never reported; ``others``, for any other field: ``"read"`` it
    too, ``"skip"`` it (not inflated), or ``"report"`` it as unexpected. Problems go to ``report(where,
    message)``; the default raises :class:`SchemaError`."""
    out: dict[str, np.ndarray] = {}
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # a damaged zip raises zipfile, zlib, ValueError or OSError errors
        report(name, f"corrupt npz ({type(e).__name__}: {e})")
        return out
    with npz:
        expected = list(npz.files if expected is None else expected)
        present = [f for f in optional if f in npz.files and f not in expected]
        extra = sorted(set(npz.files) - set(expected) - set(present))
        for f in expected + present + (extra if others != "skip" else []):
            if f not in npz.files or (f in extra and others == "report"):
                report(f"{name}:{f}", "missing field" if f not in npz.files else "unexpected field")
                continue
            try:
                out[f] = npz[f]
            except Exception as e:
                report(f"{name}:{f}", f"corrupt array ({type(e).__name__}: {e})")
    return out


def decode_png(data: bytes, name: str = "rgb.png", report: Report = _raise) -> np.ndarray | None:
    """(H, W, 3) uint8 from PNG bytes, or (H, W, 4) for an RGBA image (a transparent background: alpha is
    the coverage); another mode is reported and converted to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA"):
                report(name, f"image mode {im.mode}, expected RGB or RGBA")
                im = im.convert("RGB")
            return np.asarray(im)
    except SchemaError:
        raise
    except Exception as e:  # PIL raises many types for damaged data
        report(name, f"corrupt png ({type(e).__name__}: {e})")
        return None


def decode_json(data: bytes, name: str, report: Report = _raise):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        report(name, f"corrupt json ({e})")
        return None


def is_clip(files: Iterable[str]) -> bool:
    """A clip's tracks sample (``tracks.npz``) rather than a view."""
    return "tracks.npz" in files


def decode_files(files: dict[str, bytes], report: Report = _raise, layer_fields: Iterable[str] | None = None,
                 check_files: bool = True) -> dict:
    """The one decoder of a sample: file bytes (``{"rgb.png": bytes, ...}``, webdataset's names without the
    key) to ``{"rgb": (H, W, 3) uint8 (or (H, W, 4) RGBA), "layers": {field: array}, "camera": dict,
    "meta": dict}`` for a view, ``{"tracks": {...}, "cameras": record, "meta": dict}`` for a clip's tracks
    sample.

    ``layer_fields``: the ``layers.npz`` fields to read (default all of :data:`LAYER_DTYPES`, each required,
    and the :data:`LAYER_OPTIONAL` ones present); a loader that needs two fields inflates two.
    ``check_files``: missing and unexpected files are problems. ``meta.json``'s ``schema_version`` must be
    one this code reads. Every problem goes to ``report(where, message)``, which by default raises
    :class:`SchemaError` (so a decoded sample is complete); the inspector passes a collector and gets what
    could be decoded.
    """
    clip = is_clip(files)
    required = CLIP_FILES if clip else VIEW_FILES
    if check_files:
        for name in required:
            if name not in files:
                report(name, "missing file")
        for name in sorted(set(files) - set(required)):
            if not name.startswith("__"):
                report(name, "unexpected file")
    out: dict = {}
    if clip:
        if "tracks.npz" in files:
            out["tracks"] = decode_npz(files["tracks.npz"], "tracks.npz", TRACK_FIELDS, "read", report)
    else:
        if "rgb.png" in files:
            out["rgb"] = decode_png(files["rgb.png"], "rgb.png", report)
        if "layers.npz" in files:
            fields, others, optional = ((LAYER_DTYPES, "report", LAYER_OPTIONAL) if layer_fields is None
                                        else (layer_fields, "skip", ()))
            out["layers"] = decode_npz(files["layers.npz"], "layers.npz", fields, others, report, optional)
    for name in ("camera.json", "cameras.json", "meta.json"):
        if name in files and name in required:
            out[name.split(".")[0]] = decode_json(files[name], name, report)
    meta = out.get("meta")
    if isinstance(meta, dict) and meta.get("schema_version") not in SCHEMA_VERSIONS:
        report("meta.json:schema_version", f"schema_version {meta.get('schema_version')!r}, expected "
               f"{SCHEMA_VERSION}" if "schema_version" in meta else "missing field")
    return out


def decode_sample(sample: dict) -> dict:
    """A webdataset-style sample (``{"__key__": key, "rgb.png": bytes, ...}``) to Python values by file:
    ``.png`` -> (H, W, 3) or (H, W, 4) uint8, ``.npz`` -> dict of arrays, ``.json`` -> parsed; ``__*__`` entries pass
    through. No schema rules (see :func:`decode_files`); never unpickles."""
    out = {}
    for name, value in sample.items():
        ext = name.rsplit(".", 1)[-1]
        if name.startswith("__"):
            out[name] = value
        elif ext == "png":
            out[name] = decode_png(value, name)
        elif ext == "npz":
            out[name] = decode_npz(value, name)
        elif ext == "json":
            out[name] = decode_json(value, name)
        else:
            out[name] = value
    return out
