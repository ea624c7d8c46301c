"""Mesh assets: discovery, validated loading (visuals kept), ids and the unit-box normalisation.

An asset is one mesh file under an asset folder; a file holding several meshes (a glb scene, an obj with
several objects) is one asset with several instances. ``load_asset`` either returns an :class:`Asset`
whose meshes are safe to cast and render, or raises :class:`AssetError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from .meshes import mesh_problem

# Formats we read (trimesh loads more, e.g. dae through pycollada, but these need no extra dependency).
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


class AssetError(ValueError):
    """A bad asset: the message is one line naming the file and the problem."""


@dataclass
class Asset:
    """A loaded mesh file.

    Attributes:
        asset_id: key derived from ``rel_path``: letters, digits, ``_`` and ``-`` (no dots, no slashes).
        path: the file.
        rel_path: ``path`` relative to the asset folder, POSIX separators.
        sha256: hex digest of the file's bytes.
        meshes: one ``trimesh.Trimesh`` per instance in the asset frame (scene transforms applied), visuals
            (texture + uv, vertex/face colours, material colour) kept.
        names: instance names (scene node or obj object names), one per mesh, sorted.
    """

    asset_id: str
    path: Path
    rel_path: str
    sha256: str
    meshes: list[trimesh.Trimesh]
    names: list[str]

    @property
    def num_faces(self) -> int:
        return sum(len(m.faces) for m in self.meshes)


def asset_id_for(rel_path: str) -> str:
    """``"mugs/mug.obj"`` -> ``"mugs__mug_obj"``: folders joined by ``__``, other characters to ``_``."""
    return "__".join(re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in Path(rel_path).parts)


def discover_assets(asset_dir: str | Path) -> list[Path]:
    """Every mesh file (``MESH_SUFFIXES``, any case) under ``asset_dir``, sorted by relative path.

    Hidden files and folders are skipped; material and texture files are not assets.
    """
    root = Path(asset_dir)
    if not root.is_dir():
        raise AssetError(f"{root}: asset folder does not exist")
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in MESH_SUFFIXES
        and (p.is_file() or p.is_symlink())  # a dangling link is reported when loaded, not hidden
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mtl_textures(obj_path: Path) -> tuple[list[Path], dict[str, Path]]:
    """The obj's material libraries and, per material name, its diffuse texture file (``map_Kd``)."""
    libs, textures = [], {}
    with open(obj_path, errors="replace") as f:
        for line in f:
            if line.startswith("mtllib"):
                libs.append(obj_path.parent / line.split(maxsplit=1)[1].strip())
    for lib in libs:
        if not lib.is_file():
            continue
        material = None
        for line in lib.read_text(errors="replace").splitlines():
            tokens = line.split()
            if len(tokens) >= 2 and tokens[0] == "newmtl":
                material = " ".join(tokens[1:])
            elif len(tokens) >= 2 and tokens[0] == "map_Kd" and material is not None:
                # options (-s 1 1 1 ...) come first; the file name is last
                textures[material] = lib.parent / tokens[-1].replace("\\", "/")
    return libs, textures


def _rgb_texture(image: Image.Image) -> Image.Image:
    """Textures as RGB or RGBA (palette/greyscale/16-bit images confuse GL uploads)."""
    if image.mode in ("RGB", "RGBA"):
        return image
    return image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")


def load_asset(path: str | Path, asset_dir: str | Path, max_faces: int | None = None) -> Asset:
    """Load and validate one mesh file. Raises :class:`AssetError` (one line) for a bad asset.

    Rejected: unreadable or corrupt files, no triangles, NaN/inf vertices, face indices out of range,
    an obj whose material library or diffuse texture is missing, zero size, more than ``max_faces``
    triangles in total.
    """
    path, asset_dir = Path(path), Path(asset_dir)
    # the path as found under the folder (a symlinked file keeps its own name), else the resolved one
    rel_path = path.name
    for p, d in ((path.absolute(), asset_dir.absolute()), (path.resolve(), asset_dir.resolve())):
        if p.is_relative_to(d):
            rel_path = p.relative_to(d).as_posix()
            break

    def bad(problem: str) -> AssetError:
        return AssetError(f"{rel_path}: {problem}")

    if not path.is_file():
        raise bad("file not found")
    try:
        sha = file_sha256(path)
    except OSError as e:
        raise bad(f"unreadable ({e.strerror or e})") from None

    textures: dict[str, Path] = {}
    if path.suffix.lower() == ".obj":
        libs, textures = _mtl_textures(path)
        for lib in libs:
            if not lib.is_file():
                raise bad(f"missing material library {lib.name}")
        for material, tex in textures.items():
            if not tex.is_file():
                raise bad(f"missing texture file {tex.name} (material {material})")

    try:
        # process=False: trimesh would otherwise silently drop NaN vertices and the faces using them
        scene = trimesh.load(path, force="scene", process=False, split_objects=True, group_material=False)
    except Exception as e:  # any parser failure is a corrupt file
        msg = str(e).splitlines()[0] if str(e) else ""
        what = "corrupt, an index is out of range" if isinstance(e, IndexError) else "cannot load"
        raise bad(f"{what} ({type(e).__name__}: {msg})"[:300]) from None

    meshes, names = [], []
    for node in sorted(scene.graph.nodes_geometry, key=str):  # a stable instance order: ids are stored
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
            continue  # point clouds, paths and empty meshes hold no surface
        problem = mesh_problem(geom.vertices, geom.faces)
        if problem:
            raise bad(f"{problem} in {node!r}")
        mesh = geom.copy()
        mesh.apply_transform(transform)
        mesh.merge_vertices()  # keeps uv seams (merge_tex=False); keeps face order
        meshes.append(mesh)
        names.append(str(node))
    if not meshes:
        raise bad("no triangles")
    total = sum(len(m.faces) for m in meshes)
    if max_faces is not None and total > max_faces:
        raise bad(f"too many triangles ({total} > cap {max_faces})")
    bounds = np.array([m.bounds for m in meshes])
    if np.ptp(np.concatenate([bounds[:, 0], bounds[:, 1]]), axis=0).max() <= 0:
        raise bad("zero size (all vertices coincide)")

    for mesh in meshes:
        material = getattr(mesh.visual, "material", None)
        if isinstance(material, trimesh.visual.material.PBRMaterial):
            if material.baseColorTexture is not None:
                material.baseColorTexture = _rgb_texture(material.baseColorTexture)
        elif isinstance(material, trimesh.visual.material.SimpleMaterial):
            # trimesh does not follow some texture paths (e.g. "../cube.png"); we checked they exist
            if material.image is None and material.name in textures:
                try:
                    material.image = Image.open(textures[material.name])
                    material.image.load()
                except OSError as e:
                    raise bad(f"unreadable texture {textures[material.name].name} ({e})") from None
            if material.image is not None:
                material.image = _rgb_texture(material.image)

    return Asset(asset_id_for(rel_path), path, rel_path, sha, meshes, names)


# Turns a z-up asset y-up (a -90 degree rotation about x): (x, y, z) -> (x, z, -y).
Z_UP_TO_Y_UP = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])


def asset_to_world(meshes: list[trimesh.Trimesh], up_axis: str = "y", normalise: bool = True) -> np.ndarray:
    """(4, 4) transform of an asset into the world (y up): ``up_axis`` "z" assets are turned y-up, then,
    with ``normalise``, the result is centred and scaled into the unit box."""
    T = Z_UP_TO_Y_UP.copy() if up_axis == "z" else np.eye(4)
    if normalise:
        lo = np.min([trimesh.transform_points(m.bounds, T).min(0) for m in meshes], axis=0)
        hi = np.max([trimesh.transform_points(m.bounds, T).max(0) for m in meshes], axis=0)
        T = _unit_box(lo, hi) @ T
    return T


def _unit_box(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(4, 4) transform taking the box [lo, hi] to one centred at the origin with longest side 1."""
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 0:
        raise ValueError("asset_to_world: meshes have zero or non-finite size")
    T = np.eye(4)
    T[:3, :3] /= size
    T[:3, 3] = -(lo + hi) / 2 / size
    return T
