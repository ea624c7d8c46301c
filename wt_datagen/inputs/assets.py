"""Mesh assets: discovery, validated loading (visuals kept), ids and the unit-box normalisation.

An asset is one mesh file under an asset folder; a file holding several meshes (a glb scene, an obj with
several objects) is one asset with several instances. ``load_asset`` either returns an :class:`Asset`
whose meshes are safe to cast and render, or raises :class:`AssetError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import trimesh
from PIL import Image

from .gltf import GltfError, load_gltf, rgb_texture
from .meshes import InputError, mesh_problem

# Formats we read (trimesh loads more, e.g. dae through pycollada, but these need no extra dependency).
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


class AssetError(InputError):
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
        warnings: one line each: what was read differently from the file's intent (a missing texture...).
    """

    asset_id: str
    path: Path
    rel_path: str
    sha256: str
    meshes: list[trimesh.Trimesh]
    names: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_faces(self) -> int:
        return sum(len(m.faces) for m in self.meshes)


def asset_id_for(rel_path: str) -> str:
    """The key of an item: unique, readable, dot-free and stable for any relative path.

    A plain path (ASCII letters, digits, ``-`` and single inner ``_`` in every name; a file with one
    alphanumeric extension; a folder item without ``_`` in its last name) keeps the readable fold:
    folders joined by ``__``, the extension dot turned to ``_`` (``mugs/mug.obj`` -> ``mugs__mug_obj``).
    That fold is one-to-one on plain paths. Any other path (non-ASCII, other characters, several dots,
    ``__``...) folds the same way (accents stripped, other runs of characters to ``_``) and gets ``-`` and the
    first 10 hex digits of the SHA-256 of the relative path appended (``家具/椅子.stl`` ->
    ``stl-4b2e1c0d9a``), which no plain path's id can end with.
    """
    parts = PurePosixPath(rel_path).parts
    if parts and all(_PLAIN_NAME.fullmatch(p) for p in parts[:-1]) and (
        _PLAIN_FILE.fullmatch(parts[-1]) or _PLAIN_FOLDER.fullmatch(parts[-1])
    ):
        return "__".join(p.replace(".", "_") for p in parts)
    folded = [re.sub(r"[^A-Za-z0-9-]+", "_", unicodedata.normalize("NFKD", p).encode("ascii", "ignore")
                     .decode()).strip("_") for p in parts]
    digest = hashlib.sha256(rel_path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return "__".join(p for p in folded if p) + f"-{digest}"


_NAME = r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*"  # no leading, trailing or doubled "_"
_PLAIN_NAME = re.compile(_NAME)
_PLAIN_FILE = re.compile(_NAME + r"\.[A-Za-z0-9]+")
_PLAIN_FOLDER = re.compile(r"[A-Za-z0-9]+")


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


# -- OBJ material libraries --------------------------------------------------------------------------------

_MTLLIB = re.compile(r"^[ \t]*mtllib\b[ \t]*(.*?)[ \t]*$", re.M)
# map_Kd options and how many values each takes (-o, -s, -t take one to three numbers)
_MAP_OPTIONS = {"-blendu": 1, "-blendv": 1, "-bm": 1, "-boost": 1, "-cc": 1, "-clamp": 1, "-imfchan": 1,
                "-mm": 2, "-texres": 1, "-type": 1, "-o": 3, "-s": 3, "-t": 3}
_TEX_KEY = "__wt_texture_{}"


def _find_file(name: str, folders: list[Path]) -> Path | None:
    """``name`` (backslashes as separators, quotes stripped) under the first folder holding it; else a
    case-insensitive match there (assets authored on Windows); else, for a path that does not resolve (an
    absolute path from the author's machine, ``D:\\models\\car\\tex\\paint.png``), its trailing components
    (``tex/paint.png``, then ``paint.png``) under the folders and their parents."""
    name = name.strip().strip('"').replace("\\", "/")
    if not name:
        return None
    for folder in folders:
        p = folder / name
        if p.is_file():
            return p
    for folder in folders:
        p = folder / name
        if p.parent.is_dir():
            lower = p.name.lower()
            for q in p.parent.iterdir():
                if q.name.lower() == lower and q.is_file():
                    return q
    parts = [q for q in PurePosixPath(name).parts if q not in ("/", "..", ".") and not q.endswith(":")]
    for k in range(len(parts) - 1, 0, -1):
        tail = Path(*parts[-k:])
        for folder in [f for d in folders for f in (d, d.parent)]:
            if (folder / tail).is_file():
                return folder / tail
    return None


def _split_libraries(rest: str, folder: Path) -> tuple[list[Path], list[str]]:
    """The files of one ``mtllib`` line (several names, names with spaces): (found, missing names)."""
    if not rest.strip():
        return [], []
    whole = _find_file(rest, [folder])
    if whole is not None:
        return [whole], []
    found, missing, current = [], [], []
    for token in rest.split():
        current.append(token)
        p = _find_file(" ".join(current), [folder])
        if p is not None:
            found.append(p)
            current = []
        elif token.lower().endswith(".mtl"):
            missing.append(" ".join(current))
            current = []
    if current:
        missing.append(" ".join(current))
    return found, missing


def _texture_name(line: str) -> str:
    """The file name of a ``map_Kd`` line: options skipped, the rest (spaces allowed) is the name."""
    tokens = line.split()[1:]
    i = 0
    while i < len(tokens) - 1 and tokens[i].lower() in _MAP_OPTIONS:
        option = tokens[i].lower()
        i += 1
        if option in ("-o", "-s", "-t"):  # one to three numbers
            for _ in range(3):
                if i < len(tokens) - 1 and _is_number(tokens[i]):
                    i += 1
        else:
            i += min(_MAP_OPTIONS[option], len(tokens) - 1 - i)
    return " ".join(tokens[i:])


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


class _ObjResolver(trimesh.resolvers.Resolver):
    """Hands trimesh's OBJ reader our merged material library (for whatever its ``mtllib`` line names) and
    the texture files we resolved (under keys we wrote into that library)."""

    def __init__(self, library: bytes, textures: dict[str, bytes]):  # noqa: D107 (Resolver.__init__ raises)
        self.library, self.textures = library, textures

    def get(self, key):
        return self.textures.get(key, self.library)

    def keys(self):
        return list(self.textures)

    def write(self, name, data):
        raise OSError("read-only")

    def namespaced(self, namespace):
        return self


def _obj_materials(obj_path: Path) -> tuple[_ObjResolver, list[str]]:
    """Every material library the obj names (several per line, names with spaces), merged into one with
    their texture files resolved (relative to the library, then the obj; sub-folders, backslashes); returns
    the resolver for trimesh and the warnings (missing libraries and textures, which render untextured)."""
    with open(obj_path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    warnings, libs = [], []
    for match in _MTLLIB.finditer(text):
        found, missing = _split_libraries(match.group(1), obj_path.parent)
        libs += [p for p in found if p not in libs]
        warnings += [f"missing material library {m}" for m in missing]
    merged, textures, names, material = [], {}, set(), None
    for lib in libs:
        skipping = False
        for line in lib.read_text(errors="replace").splitlines():
            tokens = line.split()
            key = tokens[0].lower() if tokens else ""
            if key == "newmtl":
                name = " ".join(tokens[1:])
                skipping = name in names  # the first library defining a name wins
                names.add(name)
                material = name
            if skipping:
                continue
            if key == "map_kd":
                tex_name = _texture_name(line)
                tex = _find_file(tex_name, [lib.parent, obj_path.parent])
                if tex is None:
                    warnings.append(f"missing texture file {tex_name} (material {material})")
                    continue
                data = tex.read_bytes()
                try:
                    Image.open(io.BytesIO(data))
                except OSError as e:
                    warnings.append(f"unreadable texture {tex.name} ({type(e).__name__})")
                    continue
                key_name = _TEX_KEY.format(len(textures))
                textures[key_name] = data
                line = f"map_Kd {key_name}"
            merged.append(line)
    return _ObjResolver("\n".join(merged).encode(), textures), warnings


# -- loading ---------------------------------------------------------------------------------------------

# BLEND policy: a texel (times the factor) this transparent or more is a hole, as under MASK; every other
# BLEND surface is a surface, drawn opaque (glass, alpha 0.3, is crossed; foliage cards with alpha 0 holes
# are cut). 0.5 / 255: below the first non-zero 8-bit alpha.
BLEND_CUTOFF = 0.5 / 255


def load_asset(path: str | Path, asset_dir: str | Path, max_faces: int | None = None,
               missing_texture: str = "untextured") -> Asset:
    """Load and validate one mesh file. Raises :class:`AssetError` (one line) for a bad asset.

    Rejected: unreadable or corrupt files, no triangles, NaN/inf vertices, face indices out of range,
    zero size, more than ``max_faces`` triangles in total (counted before instances are copied), a glTF
    requiring an extension that cannot be used. A missing material library or texture file renders the
    asset untextured with a warning (``Asset.warnings``), or, with ``missing_texture="skip"``, rejects it.
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

    suffix = path.suffix.lower()
    if suffix in (".glb", ".gltf"):
        try:
            loaded = load_gltf(path, max_faces)
        except GltfError as e:
            raise bad(str(e)) from None
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:  # malformed JSON fields
            raise bad(f"corrupt glTF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:300]) \
                from None
        warnings = loaded.warnings
        pairs = sorted(zip(loaded.names, loaded.meshes), key=lambda nm: nm[0])
    else:
        warnings, kwargs = [], {}
        if suffix == ".obj":
            kwargs["resolver"], warnings = _obj_materials(path)
        try:
            # process=False: trimesh would otherwise silently drop NaN vertices and the faces using them
            scene = trimesh.load(path, force="scene", process=False, split_objects=True, group_material=False,
                                 **kwargs)
        except Exception as e:  # any parser failure is a corrupt file
            msg = str(e).splitlines()[0] if str(e) else ""
            what = "corrupt, an index is out of range" if isinstance(e, IndexError) else "cannot load"
            raise bad(f"{what} ({type(e).__name__}: {msg})"[:300]) from None
        nodes = [(str(n), *scene.graph[n]) for n in scene.graph.nodes_geometry]
        nodes = [(n, T, scene.geometry.get(g)) for n, T, g in nodes]
        nodes = [(n, T, g) for n, T, g in nodes if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        total = sum(len(g.faces) for _, _, g in nodes)  # before any instance is copied
        if max_faces is not None and total > max_faces:
            raise bad(f"too many triangles ({total} > cap {max_faces})")
        pairs = []
        for node, transform, geom in sorted(nodes, key=lambda x: x[0]):  # a stable order: ids are stored
            problem = mesh_problem(geom.vertices, geom.faces)
            if problem:
                raise bad(f"{problem} in {node!r}")
            mesh = geom.copy()
            mesh.apply_transform(transform)
            mesh.merge_vertices()  # keeps uv seams (merge_tex=False); keeps face order
            pairs.append((node, mesh))
    if warnings and missing_texture == "skip":
        raise bad(f"{warnings[0]} (assets.missing_texture: skip)")
    if not pairs:
        raise bad("no triangles")
    names, meshes = [n for n, _ in pairs], [m for _, m in pairs]
    for name, mesh in pairs:
        problem = mesh_problem(mesh.vertices, mesh.faces)
        if problem:
            raise bad(f"{problem} in {name!r}")
    bounds = np.array([m.bounds for m in meshes])
    if np.ptp(np.concatenate([bounds[:, 0], bounds[:, 1]]), axis=0).max() <= 0:
        raise bad("zero size (all vertices coincide)")

    for mesh in meshes:
        material = getattr(mesh.visual, "material", None)
        if isinstance(material, trimesh.visual.material.PBRMaterial):
            if material.baseColorTexture is not None:
                material.baseColorTexture = rgb_texture(material.baseColorTexture)
            if material.alphaMode == "BLEND":
                material.alphaMode, material.alphaCutoff = "MASK", BLEND_CUTOFF
        elif isinstance(material, trimesh.visual.material.SimpleMaterial) and material.image is not None:
            material.image = rgb_texture(material.image)

    return Asset(asset_id_for(rel_path), path, rel_path, sha, meshes, names, warnings)


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
