"""One sample (one view of one asset) as WebDataset files, and back, in the README's shard schema.

A sample is a dict ``{"__key__": key, "rgb.png": bytes, "layers.npz": bytes, "camera.json": bytes,
"meta.json": bytes}``; every file uses a standard extension, so plain ``webdataset`` with its default decoders
reads it too. Decoding never unpickles.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from isal import isal_zlib
from PIL import Image

from .camera import Camera

SCHEMA_VERSION = 1
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
_ZIP_DATE = (1 << 5) | 1  # 1980-01-01 in MS-DOS date format: fixed, so the same arrays give the same bytes


def sample_key(item_id: str, view_index: int) -> str:
    """``{item_id}_v{view:04d}``; webdataset splits file names at the first dot, so keys have none."""
    if "." in item_id:
        raise ValueError(f"sample key: item id {item_id!r} contains a dot")
    return f"{item_id}_v{view_index:04d}"


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """(H, W, 3) uint8 to PNG bytes at zlib ``level``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, "PNG", compress_level=level)
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
) -> dict[str, bytes]:
    """One sample's files.

    Args:
        rgb: (H, W, 3) uint8 image, pixel-aligned with layer 0.
        hits: the caster's ``Hits`` for ``camera`` (K layers).
        meta: the ``meta.json`` record (README schema); ``schema_version`` is added here.
    """
    return {
        "__key__": key,
        "rgb.png": encode_png(rgb, png_level),
        "layers.npz": encode_npz(layer_arrays(hits), npz_level),
        "camera.json": json.dumps(camera.to_json()).encode(),
        "meta.json": json.dumps({"schema_version": SCHEMA_VERSION, **meta}).encode(),
    }


def decode_sample(sample: dict[str, bytes]) -> dict:
    """Files of one sample (as read from a tar: ``{"__key__": ..., "rgb.png": bytes, ...}``) to Python values:
    ``.png`` -> (H, W, 3) uint8 array, ``.npz`` -> dict of arrays (no pickles), ``.json`` -> dict; other
    entries pass through unchanged."""
    out = {}
    for name, value in sample.items():
        ext = name.rsplit(".", 1)[-1]
        if name.startswith("__"):
            out[name] = value
        elif ext == "png":
            out[name] = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
        elif ext == "npz":
            with np.load(io.BytesIO(value), allow_pickle=False) as z:
                out[name] = {k: z[k] for k in z.files}
        elif ext == "json":
            out[name] = json.loads(value)
        else:
            out[name] = value
    return out
