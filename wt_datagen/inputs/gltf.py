"""glTF 2.0 (``.glb``, ``.gltf``) as Objaverse ships it, read into trimesh meshes with their visuals.

One mesh per (node, primitive[, GPU instance]) in the asset frame (node hierarchy transforms applied, winding
flipped under mirroring transforms), each with a ``trimesh.visual.TextureVisuals`` holding a ``PBRMaterial``:

- base colour, metallic-roughness and emissive factors and textures (``KHR_materials_emissive_strength``
  scales the emissive factor; ``KHR_materials_pbrSpecularGlossiness`` becomes base colour = diffuse,
  metallic 0, roughness 1 - glossiness; ``KHR_materials_unlit`` metallic 0, roughness 1);
- the uv set the base-colour texture names (``texCoord``), with ``KHR_texture_transform`` applied to it
  (offset, rotation, scale, texCoord override); the metallic-roughness and emissive textures are kept when
  they use the same uv set and transform, else their factors alone;
- ``COLOR_0`` vertex colours in ``mesh.vertex_attributes["color"]`` (RGBA uint8; they multiply the base
  colour); the sampler's wrap modes in ``mesh.metadata["texture_wrap"]`` (u, v: repeat | mirror | clamp);
- ``alphaMode`` and ``alphaCutoff`` as written (``inputs.assets`` applies the BLEND policy).

Geometry: triangles, strips and fans (points and lines hold no surface and are left out), indexed or not,
sparse accessors, normalised integer attributes (``KHR_mesh_quantization``), ``KHR_draco_mesh_compression``
(decoded with DracoPy) and ``EXT_mesh_gpu_instancing``. Skins and morph targets are ignored (the bind pose).
A required extension outside :data:`USABLE` raises :class:`GltfError` naming it; textures that cannot be
read (missing file, ``KHR_texture_basisu`` only) leave the material untextured with a warning.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

# component type -> numpy dtype; normalised integers divide by the maximum (signed ones clamp at -1)
_DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NORM = {5120: 127.0, 5121: 255.0, 5122: 32767.0, 5123: 65535.0}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_WRAP = {10497: "repeat", 33648: "mirror", 33071: "clamp"}
_TRIANGLES, _STRIP, _FAN = 4, 5, 6

# Extensions a file may require and still be read as intended (the others end the asset with one line).
USABLE = {
    "KHR_draco_mesh_compression", "KHR_mesh_quantization", "KHR_texture_transform", "EXT_mesh_gpu_instancing",
    "EXT_texture_webp", "KHR_materials_pbrSpecularGlossiness", "KHR_materials_emissive_strength",
    "KHR_materials_unlit", "KHR_lights_punctual", "KHR_materials_variants", "KHR_xmp_json_ld",
    "KHR_animation_pointer",
}
# Shading-only material extensions (clearcoat, sheen, transmission, volume, ior, specular, iridescence,
# anisotropy, dispersion, ...) change neither the geometry nor the base colour: read as plain PBR.
_IGNORABLE_PREFIX = "KHR_materials_"
_WHY = {
    "KHR_texture_basisu": "KTX2/Basis Universal textures cannot be decoded here",
    "EXT_meshopt_compression": "meshoptimizer-compressed buffers cannot be decoded here",
}


class GltfError(ValueError):
    """A glTF file that cannot be used; one line without the file name (the caller adds it)."""


@dataclass
class GltfScene:
    """What :func:`load_gltf` read: instance meshes (asset frame) with unique names, and warnings."""

    names: list[str]
    meshes: list[trimesh.Trimesh]
    warnings: list[str] = field(default_factory=list)


def _unusable(doc: dict) -> str | None:
    for name in doc.get("extensionsRequired", []) or []:
        if name in USABLE or name.startswith(_IGNORABLE_PREFIX):
            continue
        why = _WHY.get(name, "not supported")
        return f"unsupported required glTF extension {name} ({why})"
    return None


class _Document:
    """A parsed glTF: the JSON, its buffers, and cached accessors, images and primitive geometry."""

    def __init__(self, path: Path):
        self.path = path
        data = path.read_bytes()
        self.bin = None
        if data[:4] == b"glTF":
            self.doc = self._parse_glb(data)
        elif path.suffix.lower() == ".glb":
            raise GltfError("cannot load (not a GLB file: no glTF header)")
        else:
            try:
                self.doc = json.loads(data.decode("utf-8-sig"))
            except (UnicodeDecodeError, ValueError) as e:
                raise GltfError(f"cannot load (not glTF JSON: {e})"[:200]) from None
        if not isinstance(self.doc, dict) or not isinstance(self.doc.get("asset", {}), dict):
            raise GltfError("cannot load (not a glTF document)")
        version = str(self.doc.get("asset", {}).get("version", "2.0"))
        if not version.startswith("2"):
            raise GltfError(f"glTF version {version} (only 2.x is read)")
        self._buffers: dict[int, bytes] = {}
        self._accessors: dict[int, np.ndarray] = {}
        self._images: dict[int, Image.Image | None] = {}
        self.warnings: list[str] = []

    def _parse_glb(self, data: bytes) -> dict:
        if len(data) < 20:
            raise GltfError("cannot load (truncated GLB header)")
        _, version, length = struct.unpack_from("<4sII", data)
        if version != 2:
            raise GltfError(f"GLB container version {version} (only 2 is read)")
        doc, offset = None, 12
        end = min(length, len(data))
        while offset + 8 <= end:
            size, kind = struct.unpack_from("<II", data, offset)
            chunk = data[offset + 8: offset + 8 + size]
            if len(chunk) < size and kind == 0x4E4F534A:
                raise GltfError("cannot load (truncated GLB JSON chunk)")
            if kind == 0x4E4F534A:  # JSON
                try:
                    doc = json.loads(chunk.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise GltfError(f"cannot load (GLB JSON chunk does not parse: {e})"[:200]) from None
            elif kind == 0x004E4942 and self.bin is None:  # BIN
                self.bin = bytes(chunk)
            offset += 8 + size + (-size % 4)
        if doc is None:
            raise GltfError("cannot load (GLB without a JSON chunk)")
        return doc

    # -- raw data ----------------------------------------------------------------------------------------

    def _uri_bytes(self, uri: str, what: str) -> bytes:
        if uri.startswith("data:"):
            head, _, payload = uri.partition(",")
            try:
                return base64.b64decode(payload) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(
                    payload)
            except ValueError:
                raise GltfError(f"{what}: bad data URI") from None
        file = self.path.parent / urllib.parse.unquote(uri)
        try:
            return file.read_bytes()
        except OSError:
            raise FileNotFoundError(f"missing {what} file {urllib.parse.unquote(uri)}") from None

    def buffer(self, index: int) -> bytes:
        if index not in self._buffers:
            spec = self._get("buffers", index)
            if "uri" in spec:
                try:
                    self._buffers[index] = self._uri_bytes(spec["uri"], "buffer")
                except FileNotFoundError as e:
                    raise GltfError(str(e)) from None
            elif self.bin is not None and index == 0:
                self._buffers[index] = self.bin
            else:
                raise GltfError(f"buffer {index} has no data")
        return self._buffers[index]

    def view_bytes(self, index: int) -> tuple[bytes, int, int | None]:
        """(buffer bytes, start offset, byteStride) of a bufferView."""
        view = self._get("bufferViews", index)
        data = self.buffer(view["buffer"])
        start = int(view.get("byteOffset", 0))
        if start + int(view["byteLength"]) > len(data):
            raise GltfError(f"bufferView {index} runs past the end of its buffer")
        return data, start, view.get("byteStride")

    def _get(self, key: str, index) -> dict:
        items = self.doc.get(key, [])
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise GltfError(f"{key}[{index}] does not exist")
        return items[index]

    def accessor(self, index: int) -> np.ndarray:
        """(count, width) array of an accessor (float64 for normalised integers), sparse values applied."""
        if index in self._accessors:
            return self._accessors[index]
        acc = self._get("accessors", index)
        ctype, kind, count = acc.get("componentType"), acc.get("type"), int(acc.get("count", 0))
        if ctype not in _DTYPES or kind not in _WIDTH:
            raise GltfError(f"accessor {index}: unsupported layout {kind} of component type {ctype}")
        dtype, width = np.dtype(_DTYPES[ctype]).newbyteorder("<"), _WIDTH[kind]
        if "bufferView" in acc:
            data, start, stride = self.view_bytes(acc["bufferView"])
            start += int(acc.get("byteOffset", 0))
            row = dtype.itemsize * width
            stride = int(stride or row)
            if count and start + stride * (count - 1) + row > len(data):
                raise GltfError(f"accessor {index} runs past the end of its buffer")
            raw = np.frombuffer(data, np.uint8, count=stride * (count - 1) + row if count else 0, offset=start)
            if count:
                raw = np.lib.stride_tricks.as_strided(raw, (count, row), (stride, 1))
            out = np.ascontiguousarray(raw).view(dtype).reshape(count, width)
        else:
            out = np.zeros((count, width), dtype)
        if "sparse" in acc:
            sp = acc["sparse"]
            n = int(sp["count"])
            ind, val = sp["indices"], sp["values"]
            idt = np.dtype(_DTYPES[ind["componentType"]]).newbyteorder("<")
            d, s, _ = self.view_bytes(ind["bufferView"])
            idx = np.frombuffer(d, idt, count=n, offset=s + int(ind.get("byteOffset", 0))).astype(np.int64)
            d, s, _ = self.view_bytes(val["bufferView"])
            values = np.frombuffer(d, dtype, count=n * width, offset=s + int(val.get("byteOffset", 0)))
            if idx.size and (idx.min() < 0 or idx.max() >= count):
                raise GltfError(f"accessor {index}: sparse indices out of range")
            out = out.copy()
            out[idx] = values.reshape(n, width)
        if acc.get("normalized") and ctype in _NORM:
            out = np.maximum(out.astype(np.float64) / _NORM[ctype], -1.0)
        self._accessors[index] = out
        return out

    def image(self, index: int) -> Image.Image | None:
        """The decoded image (RGB or RGBA), or None with a warning when it cannot be read."""
        if index in self._images:
            return self._images[index]
        spec = self._get("images", index)
        label = spec.get("name") or spec.get("uri", f"image {index}")
        image = None
        try:
            if "bufferView" in spec:
                data, start, _ = self.view_bytes(spec["bufferView"])
                blob = data[start: start + int(self.doc["bufferViews"][spec["bufferView"]]["byteLength"])]
            else:
                blob = self._uri_bytes(spec["uri"], "texture")
            image = Image.open(io.BytesIO(blob))
            image.load()
            image = rgb_texture(image)
        except FileNotFoundError as e:
            self.warnings.append(f"{e}: rendered untextured")
        except (OSError, ValueError, KeyError, GltfError) as e:
            self.warnings.append(f"unreadable texture {label} ({type(e).__name__}): rendered untextured")
        self._images[index] = image
        return image


def rgb_texture(image: Image.Image) -> Image.Image:
    """Textures as RGB or RGBA (palette, greyscale and 16-bit images confuse GL uploads)."""
    if image.mode in ("RGB", "RGBA"):
        return image
    return image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")


def _node_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        m = np.asarray(node["matrix"], dtype=np.float64)
        if m.shape != (16,):
            raise GltfError("a node matrix is not 16 numbers")
        return m.reshape(4, 4).T  # column-major
    return _trs(np.asarray(node.get("translation", (0, 0, 0)), float)[None],
                np.asarray(node.get("rotation", (0, 0, 0, 1)), float)[None],
                np.asarray(node.get("scale", (1, 1, 1)), float)[None])[0]


def _trs(t: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(N, 4, 4) matrices T R S from (N, 3) translations, (N, 4) unit quaternions (x, y, z, w), (N, 3) scales."""
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    x, y, z, w = (q / np.where(norm > 0, norm, 1)).T
    R = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], 1)
    M = np.broadcast_to(np.eye(4), (len(t), 4, 4)).copy()
    M[:, :3, :3] = R * s[:, None, :]
    M[:, :3, 3] = t
    return M


def _instances(d: _Document) -> list[tuple[int, str, np.ndarray]]:
    """(mesh index, name, 4x4 asset-frame transform) for every mesh placement in the default scene."""
    doc = d.doc
    nodes = doc.get("nodes", [])
    scenes = doc.get("scenes", [])
    if scenes:
        roots = scenes[doc.get("scene", 0) if 0 <= doc.get("scene", 0) < len(scenes) else 0].get("nodes", [])
    else:  # no scene: every node nobody names as a child
        children = {c for n in nodes for c in n.get("children", [])}
        roots = [i for i in range(len(nodes)) if i not in children]
    out, seen = [], set()
    stack = [(r, np.eye(4)) for r in reversed(roots)]
    while stack:
        index, parent = stack.pop()
        if index in seen:
            raise GltfError(f"node {index} appears twice in the node hierarchy")
        seen.add(index)
        node = d._get("nodes", index)
        world = parent @ _node_matrix(node)
        if "mesh" in node:
            name = str(node.get("name") or f"node{index}")
            inst = (node.get("extensions") or {}).get("EXT_mesh_gpu_instancing")
            if inst:
                attrs = inst.get("attributes", {})
                n = max(len(d.accessor(a)) for a in attrs.values()) if attrs else 0
                t = d.accessor(attrs["TRANSLATION"]) if "TRANSLATION" in attrs else np.zeros((n, 3))
                r = d.accessor(attrs["ROTATION"]) if "ROTATION" in attrs else np.tile([0.0, 0, 0, 1], (n, 1))
                s = d.accessor(attrs["SCALE"]) if "SCALE" in attrs else np.ones((n, 3))
                for j, m in enumerate(_trs(t.astype(float), r.astype(float), s.astype(float))):
                    out.append((node["mesh"], f"{name}#{j}", world @ m))
            else:
                out.append((node["mesh"], name, world))
        stack.extend((c, world) for c in reversed(node.get("children", [])))
    return out


def _face_count(d: _Document, prim: dict) -> int:
    """Triangles a primitive will give, from its accessor counts alone (nothing decoded)."""
    mode = prim.get("mode", _TRIANGLES)
    if mode not in (_TRIANGLES, _STRIP, _FAN):
        return 0
    key = prim.get("indices", prim.get("attributes", {}).get("POSITION"))
    n = int(d._get("accessors", key).get("count", 0)) if key is not None else 0
    return n // 3 if mode == _TRIANGLES else max(n - 2, 0)


@dataclass
class _Geometry:
    vertices: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64
    attributes: dict[str, np.ndarray]  # TEXCOORD_n, COLOR_0 as float arrays


def _decode_draco(d: _Document, prim: dict, ext: dict) -> _Geometry:
    import DracoPy  # optional at import time: only Draco files need it

    data, start, _ = d.view_bytes(ext["bufferView"])
    length = int(d.doc["bufferViews"][ext["bufferView"]]["byteLength"])
    try:
        mesh = DracoPy.decode(data[start: start + length])
    except Exception as e:  # DracoPy raises its own types for corrupt data
        raise GltfError(f"Draco data does not decode ({type(e).__name__})") from None
    attrs = {}
    for name, uid in ext.get("attributes", {}).items():
        found = mesh.get_attribute_by_unique_id(uid)
        if found is None:
            raise GltfError(f"Draco data lacks attribute {name}")
        values = np.asarray(found["data"])
        acc = d.doc["accessors"][prim["attributes"][name]] if name in prim.get("attributes", {}) else {}
        if acc.get("normalized") and acc.get("componentType") in _NORM and values.dtype.kind in "iu":
            values = np.maximum(values.astype(np.float64) / _NORM[acc["componentType"]], -1.0)
        attrs[name] = values.reshape(len(values), -1)
    if "POSITION" not in attrs:
        raise GltfError("Draco primitive without POSITION")
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    return _Geometry(attrs.pop("POSITION").astype(np.float64), faces, attrs)


def _geometry(d: _Document, prim: dict) -> _Geometry | None:
    """A primitive's triangles and attributes, or None for points and lines."""
    mode = prim.get("mode", _TRIANGLES)
    if mode not in (_TRIANGLES, _STRIP, _FAN):
        return None
    attributes = prim.get("attributes", {})
    if "POSITION" not in attributes:
        raise GltfError("a primitive has no POSITION")
    draco = (prim.get("extensions") or {}).get("KHR_draco_mesh_compression")
    if draco is not None:
        geom = _decode_draco(d, prim, draco)
        index = geom.faces.reshape(-1)
    else:
        wanted = [k for k in attributes if k.startswith("TEXCOORD_") or k == "COLOR_0"]
        geom = _Geometry(d.accessor(attributes["POSITION"]).astype(np.float64), np.zeros((0, 3), np.int64),
                         {k: d.accessor(attributes[k]) for k in wanted})
        index = (d.accessor(prim["indices"]).reshape(-1).astype(np.int64) if "indices" in prim
                 else np.arange(len(geom.vertices), dtype=np.int64))
    if mode == _TRIANGLES:
        faces = index[: len(index) // 3 * 3].reshape(-1, 3)
    else:
        n = max(len(index) - 2, 0)
        i = np.arange(n)
        if mode == _STRIP:  # every other triangle reversed to keep the winding
            faces = np.stack([index[i + (i % 2)], index[i + 1 - (i % 2)], index[i + 2]], 1)
        else:
            faces = np.stack([np.full(n, index[0] if len(index) else 0), index[i + 1], index[i + 2]], 1)
    geom.faces = faces
    if geom.vertices.shape[1:] != (3,):
        raise GltfError("POSITION is not VEC3")
    return geom


def _texture_transform(info: dict) -> tuple[int, np.ndarray | None]:
    """(uv set, 3x3 KHR_texture_transform matrix in glTF uv space or None) of a textureInfo."""
    tt = (info.get("extensions") or {}).get("KHR_texture_transform")
    uv_set = int(info.get("texCoord", 0))
    if not tt:
        return uv_set, None
    ox, oy = tt.get("offset", (0.0, 0.0))
    r = float(tt.get("rotation", 0.0))
    sx, sy = tt.get("scale", (1.0, 1.0))
    c, s = np.cos(r), np.sin(r)
    T = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], float)
    R = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], float)
    S = np.diag([sx, sy, 1.0])
    return int(tt.get("texCoord", uv_set)), T @ R @ S


@dataclass
class _Material:
    kwargs: dict
    uv_set: int | None  # the uv set the kept textures use (None: no texture)
    uv_transform: np.ndarray | None
    wrap: tuple[str, str]


def _material(d: _Document, index: int | None, cache: dict) -> _Material | None:
    if index is None:
        return None
    if index in cache:
        return cache[index]
    mat = d._get("materials", index)
    ext = mat.get("extensions") or {}
    pbr = dict(mat.get("pbrMetallicRoughness") or {})
    sg = ext.get("KHR_materials_pbrSpecularGlossiness")
    if sg is not None and "pbrMetallicRoughness" not in mat:
        pbr = {"baseColorFactor": sg.get("diffuseFactor", (1, 1, 1, 1)), "metallicFactor": 0.0,
               "roughnessFactor": 1.0 - float(sg.get("glossinessFactor", 1.0))}
        if "diffuseTexture" in sg:
            pbr["baseColorTexture"] = sg["diffuseTexture"]
    if "KHR_materials_unlit" in ext:
        pbr["metallicFactor"], pbr["roughnessFactor"] = 0.0, 1.0
    emissive = np.asarray(mat.get("emissiveFactor", (0, 0, 0)), float)
    emissive = emissive * float((ext.get("KHR_materials_emissive_strength") or {}).get("emissiveStrength", 1.0))
    kwargs = {
        "name": mat.get("name"),
        "baseColorFactor": np.clip(np.asarray(pbr.get("baseColorFactor", (1, 1, 1, 1)), float), 0, 1),
        "metallicFactor": float(pbr.get("metallicFactor", 1.0)),
        "roughnessFactor": float(pbr.get("roughnessFactor", 1.0)),
        "emissiveFactor": np.clip(emissive, 0, None) if emissive.any() else None,
        "alphaMode": mat.get("alphaMode", "OPAQUE") if mat.get("alphaMode") in ("OPAQUE", "MASK", "BLEND")
        else "OPAQUE",
        "alphaCutoff": float(mat.get("alphaCutoff", 0.5)),
        "doubleSided": bool(mat.get("doubleSided", False)),
    }
    # textures: the first present slot fixes the uv set and transform; the others must agree to be kept
    slots = [("baseColorTexture", pbr.get("baseColorTexture")), ("emissiveTexture", mat.get("emissiveTexture")),
             ("metallicRoughnessTexture", pbr.get("metallicRoughnessTexture"))]
    uv_set, transform, wrap = None, None, ("repeat", "repeat")
    for key, info in slots:
        if not isinstance(info, dict) or "index" not in info:
            continue
        image, tex_wrap = _texture(d, info["index"])
        if image is None:
            continue
        s, t = _texture_transform(info)
        if uv_set is None:
            uv_set, transform, wrap = s, t, tex_wrap
        elif s != uv_set or not (transform is None and t is None or transform is not None and t is not None
                                 and np.allclose(transform, t)):
            continue  # another uv set or transform than the base colour's: its factor alone
        kwargs[key] = image
    out = _Material(kwargs, uv_set, transform, wrap)
    cache[index] = out
    return out


def _texture(d: _Document, index: int) -> tuple[Image.Image | None, tuple[str, str]]:
    tex = d._get("textures", index)
    ext = tex.get("extensions") or {}
    source = tex.get("source")
    webp = (ext.get("EXT_texture_webp") or {}).get("source")
    if webp is not None:
        from PIL import features

        if features.check("webp") or source is None:
            source = webp
    if source is None:
        if "KHR_texture_basisu" in ext:
            d.warnings.append(f"texture {index} is KTX2/Basis only (KHR_texture_basisu), which cannot be decoded: "
                              "rendered untextured")
        return None, ("repeat", "repeat")
    sampler = d._get("samplers", tex["sampler"]) if "sampler" in tex else {}
    wrap = (_WRAP.get(sampler.get("wrapS", 10497), "repeat"), _WRAP.get(sampler.get("wrapT", 10497), "repeat"))
    return d.image(source), wrap


def _total(d: _Document, placements) -> int:
    meshes = d.doc.get("meshes", [])
    per_mesh = {}
    for m, _, _ in placements:
        if m not in per_mesh:
            per_mesh[m] = sum(_face_count(d, p) for p in d._get("meshes", m).get("primitives", []))
    return sum(per_mesh[m] for m, _, _ in placements) if meshes else 0


def load_gltf(path: str | Path, max_faces: int | None = None) -> GltfScene:
    """Every mesh placement of a glTF file's default scene as trimesh meshes in the asset frame.

    Raises :class:`GltfError` (one line) for a file that cannot be used, including a required extension
    outside :data:`USABLE` and more than ``max_faces`` triangles (checked before any geometry is decoded).
    """
    d = _Document(Path(path))
    problem = _unusable(d.doc)
    if problem:
        raise GltfError(problem)
    placements = _instances(d)
    total = _total(d, placements)
    if max_faces is not None and total > max_faces:
        raise GltfError(f"too many triangles ({total} > cap {max_faces})")
    try:
        return _decode(d, placements)
    except GltfError as e:
        raise GltfError(str(e) if str(e).startswith("cannot load") else f"cannot load ({e})") from None


def _decode(d: _Document, placements) -> GltfScene:
    geoms: dict[tuple[int, int], _Geometry | None] = {}
    materials: dict[int, _Material] = {}
    names, meshes, used = [], [], {}
    for mesh_index, name, matrix in placements:
        prims = d._get("meshes", mesh_index).get("primitives", [])
        for k, prim in enumerate(prims):
            key = (mesh_index, k)
            if key not in geoms:
                geoms[key] = _geometry(d, prim)
            geom = geoms[key]
            if geom is None or len(geom.faces) == 0:
                continue
            label = name if len(prims) == 1 else f"{name}/{k}"
            used[label] = used.get(label, 0) + 1
            if used[label] > 1:
                label = f"{label}_{used[label] - 1}"
            names.append(label)
            meshes.append(_mesh(geom, _material(d, prim.get("material"), materials), matrix))
    return GltfScene(names, meshes, d.warnings)


def _mesh(geom: _Geometry, material: _Material | None, matrix: np.ndarray) -> trimesh.Trimesh:
    vertices = geom.vertices @ matrix[:3, :3].T + matrix[:3, 3]
    faces = geom.faces
    if np.linalg.det(matrix[:3, :3]) < 0:  # a mirroring transform turns the winding (glTF spec 3.7.4)
        faces = faces[:, ::-1]
    mesh = trimesh.Trimesh(vertices, np.ascontiguousarray(faces), process=False)
    colour = geom.attributes.get("COLOR_0")
    if colour is not None and len(colour) == len(vertices):
        c = colour.astype(np.float64)
        if colour.dtype.kind in "iu":  # not normalised: spec says they are; take them as 0..max
            c = c / (255.0 if colour.dtype.itemsize == 1 else 65535.0)
        if c.shape[1] == 3:
            c = np.column_stack([c, np.ones(len(c))])
        rgba = np.clip(np.round(c * 255), 0, 255).astype(np.uint8)
        if material is None:
            mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
        else:
            mesh.vertex_attributes["color"] = rgba
    if material is None:
        return mesh
    uv = None
    if material.uv_set is not None:
        raw = geom.attributes.get(f"TEXCOORD_{material.uv_set}")
        if raw is not None and len(raw) == len(vertices) and raw.shape[1] == 2:
            uv = raw.astype(np.float64)
            if material.uv_transform is not None:
                uv = uv @ material.uv_transform[:2, :2].T + material.uv_transform[:2, 2]
            uv = np.column_stack([uv[:, 0], 1.0 - uv[:, 1]])  # glTF v runs down the image; trimesh's up
    kwargs = dict(material.kwargs)
    if uv is None:  # textures without coordinates cannot be placed
        for key in ("baseColorTexture", "emissiveTexture", "metallicRoughnessTexture"):
            kwargs.pop(key, None)
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.PBRMaterial(**kwargs))
    if uv is not None and material.wrap != ("repeat", "repeat"):
        mesh.metadata["texture_wrap"] = material.wrap
    return mesh
