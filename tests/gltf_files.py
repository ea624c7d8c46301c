"""Writing glTF files for tests: a JSON document and one binary buffer built from numpy arrays, saved as GLB
by pygltflib (an independent writer), or as .gltf with an external buffer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pygltflib
from PIL import Image

COMPONENT = {np.dtype(np.int8): 5120, np.dtype(np.uint8): 5121, np.dtype(np.int16): 5122,
             np.dtype(np.uint16): 5123, np.dtype(np.uint32): 5125, np.dtype(np.float32): 5126}
TYPE = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4", 16: "MAT4"}


class Doc:
    """A glTF document under construction."""

    def __init__(self):
        self.blob = bytearray()
        self.doc = {"asset": {"version": "2.0"}, "scenes": [{"nodes": []}], "scene": 0, "nodes": [], "meshes": [],
                    "accessors": [], "bufferViews": [], "materials": [], "textures": [], "images": [],
                    "samplers": []}

    def view(self, data: bytes) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        self.doc["bufferViews"].append({"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)})
        self.blob += data
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, array: np.ndarray, normalized: bool = False, with_bounds: bool = False) -> int:
        a = np.ascontiguousarray(array)
        width = 1 if a.ndim == 1 else a.shape[1]
        acc = {"bufferView": self.view(a.tobytes()), "componentType": COMPONENT[a.dtype], "count": len(a),
               "type": TYPE[width]}
        if normalized:
            acc["normalized"] = True
        if with_bounds:
            acc["min"] = a.reshape(len(a), -1).min(0).tolist()
            acc["max"] = a.reshape(len(a), -1).max(0).tolist()
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def image(self, rgba: np.ndarray, sampler: dict | None = None) -> int:
        """A PNG texture; returns the texture index."""
        buf = io.BytesIO()
        Image.fromarray(rgba).save(buf, format="PNG")
        self.doc["images"].append({"bufferView": self.view(buf.getvalue()), "mimeType": "image/png"})
        tex = {"source": len(self.doc["images"]) - 1}
        if sampler is not None:
            self.doc["samplers"].append(sampler)
            tex["sampler"] = len(self.doc["samplers"]) - 1
        self.doc["textures"].append(tex)
        return len(self.doc["textures"]) - 1

    def material(self, **fields) -> int:
        self.doc["materials"].append(fields)
        return len(self.doc["materials"]) - 1

    def mesh(self, primitives: list[dict], name: str | None = None) -> int:
        self.doc["meshes"].append({"primitives": primitives, **({"name": name} if name else {})})
        return len(self.doc["meshes"]) - 1

    def primitive(self, positions, faces=None, material: int | None = None, **attributes) -> dict:
        prim = {"attributes": {"POSITION": self.accessor(np.asarray(positions, np.float32), with_bounds=True)}}
        if faces is not None:
            prim["indices"] = self.accessor(np.asarray(faces, np.uint32).reshape(-1))
        for name, (array, normalized) in attributes.items():
            prim["attributes"][name] = self.accessor(array, normalized)
        if material is not None:
            prim["material"] = material
        return prim

    def node(self, root: bool = True, **fields) -> int:
        self.doc["nodes"].append(fields)
        index = len(self.doc["nodes"]) - 1
        if root:
            self.doc["scenes"][0]["nodes"].append(index)
        return index

    def finished(self) -> dict:
        doc = {k: v for k, v in self.doc.items() if v != []}
        doc["buffers"] = [{"byteLength": len(self.blob)}]
        return doc

    def save_glb(self, path: Path) -> Path:
        gltf = pygltflib.GLTF2().from_dict(self.finished())
        gltf.set_binary_blob(bytes(self.blob))
        gltf.save_binary(str(path))
        return path

    def save_gltf(self, path: Path) -> Path:
        doc = self.finished()
        doc["buffers"][0]["uri"] = path.with_suffix(".bin").name
        path.with_suffix(".bin").write_bytes(bytes(self.blob))
        path.write_text(json.dumps(doc))
        return path


def quad(size: float = 1.0, z: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(4, 3) corners of a square in the z plane, (2, 3) faces (normal +z), (4, 2) glTF uv (v down)."""
    v = np.array([[0, 0, z], [size, 0, z], [size, size, z], [0, size, z]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32)  # image row 0 at the top (y = size)
    return v, f, uv
