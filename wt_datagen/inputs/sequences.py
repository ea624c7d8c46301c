"""Dynamic assets: mesh sequences and rigid-motion scenes.

Two kinds of sequence are found in an asset folder next to static assets:

- a *mesh sequence*: mesh files named ``<prefix><frame number>.<ext>`` with one prefix and extension in one
  folder (``frame_0000.obj``, ``frame_0001.obj``, ...), numbered without gaps, with identical face arrays:
  one deforming mesh, vertex i being the same material point in every frame. Found when the files really
  hold one face array (:func:`same_faces`), or when a ``sequence.json`` marks the folder;
- a *rigid-motion scene*: a ``scene.json`` (format in the README) listing meshes with one 4x4 pose per frame
  or keyframes (translation interpolated linearly, rotation by slerp).

A sequence yields world-space instance meshes for any frame; face arrays never change over time, so a
material point (instance, face, barycentric) can be followed through deformation or rigid motion. Clips and
their cameras are the pipeline's (``pipeline.cameras``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation, Slerp

from .assets import MESH_SUFFIXES, AssetError, asset_id_for, file_sha256, load_asset
from .meshes import InputError, mesh_problem

SCENE_FILE = "scene.json"
SEQUENCE_FILE = "sequence.json"  # marks a folder's numbered mesh files as one mesh sequence
_FRAME_STEM = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)$")
_RIGID_ATOL = 1e-5


class SequenceError(InputError):
    """A sequence that cannot be used; the message is one line naming the sequence and the problem."""


@dataclass(frozen=True)
class SequenceSource:
    """Where a sequence lives, found by :func:`find_sequences` without loading any mesh.

    Attributes:
        kind: ``"mesh_sequence"`` or ``"rigid_scene"``.
        path: the frame folder (mesh sequence) or the ``scene.json`` file.
        files: the frame files in frame order (mesh sequence) or ``(scene.json,)``.
        numbers: the frame number parsed from each file name (mesh sequence; empty for a scene).
        pattern: ``""`` when the frames are every mesh file of the folder, else the frames' names as a
            pattern (``frame_*.obj``): a folder may hold other meshes (static assets) or other sequences.
    """

    kind: str
    path: Path
    files: tuple[Path, ...]
    numbers: tuple[int, ...] = ()
    pattern: str = ""

    def rel_path(self, asset_dir: Path) -> str:
        """The item's path relative to ``asset_dir``: the folder, ``folder/pattern`` or ``folder/scene.json``."""
        if self.kind == "rigid_scene":
            return self.path.relative_to(asset_dir).as_posix()
        rel = self.path.relative_to(asset_dir).as_posix() if self.path != Path(asset_dir) else self.path.name
        return f"{rel}/{self.pattern}" if self.pattern else rel


def _visible_files(asset_dir: Path) -> list[Path]:
    return [p for p in sorted(asset_dir.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(asset_dir).parts)]


def find_sequences(asset_dir: Path, detect: str = "auto") -> list[SequenceSource]:
    """Every sequence under ``asset_dir``, sorted by path (hidden files and folders skipped).

    - A folder holding ``scene.json`` is a rigid scene (every file under it belongs to it).
    - A folder holding ``sequence.json`` is a mesh sequence: its mesh files (those matching the file's
      ``frames`` pattern, if given) in frame-number order, whatever their faces (loading checks them).
    - With ``detect="auto"``, the numbered mesh files of a folder sharing one name prefix and extension
      (``frame_0000.obj``, ``frame_0001.obj``...; at least two) are a mesh sequence when they really are
      one: every file holds the same face array (:func:`same_faces`, counts first, cheaply). Numbered but
      unrelated meshes (``chair_0001.off``, ``100026.stl``, ``link1.obj``) stay static assets, every one.
      ``detect="marked"`` takes only folders with ``sequence.json`` or ``scene.json``.
    """
    asset_dir = Path(asset_dir)
    paths = _visible_files(asset_dir)
    found = [SequenceSource("rigid_scene", p, (p,)) for p in paths if p.name == SCENE_FILE]
    scene_dirs = {s.path.parent for s in found}
    marked = {p.parent for p in paths if p.name == SEQUENCE_FILE and not scene_dirs.intersection(
        (p.parent, *p.parents))}
    folders: dict[Path, list[Path]] = {}
    for p in paths:
        if p.suffix.lower() in MESH_SUFFIXES and not scene_dirs.intersection((p.parent, *p.parents)):
            folders.setdefault(p.parent, []).append(p)
    for folder, files in folders.items():
        if folder in marked:
            found.append(_marked_source(folder, files))
        elif detect == "auto":
            found += _detected_sources(files)
    return sorted(found, key=lambda s: (s.path, s.pattern))


def _marked_source(folder: Path, files: list[Path]) -> SequenceSource:
    """The mesh sequence a ``sequence.json`` marks (its ``frames`` glob, default every mesh file); frame
    numbers are parsed at loading, which reports names without one."""
    spec = _read_marker(folder / SEQUENCE_FILE, strict=False)
    pattern = spec.get("frames") if isinstance(spec.get("frames"), str) else ""
    chosen = [f for f in files if not pattern or fnmatch.fnmatchcase(f.name, pattern)]
    numbers = [_FRAME_STEM.match(f.stem) for f in chosen]
    order = sorted(range(len(chosen)), key=lambda i: (int(numbers[i]["number"]) if numbers[i] else -1,
                                                        chosen[i].name))
    return SequenceSource("mesh_sequence", folder, tuple(chosen[i] for i in order),
                          tuple(int(numbers[i]["number"]) if numbers[i] else -1 for i in order),
                          pattern if len(chosen) < len(files) else "")


def _detected_sources(files: list[Path]) -> list[SequenceSource]:
    """The mesh sequences among one folder's mesh files: numbered groups (one prefix, one extension, at
    least two files, distinct numbers) whose files hold the same faces."""
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for f in files:
        m = _FRAME_STEM.match(f.stem)
        if m:
            groups.setdefault((m["prefix"], f.suffix.lower()), []).append((int(m["number"]), f))
    out = []
    for (prefix, _), members in sorted(groups.items()):
        members.sort()
        numbers = [n for n, _ in members]
        if len(members) < 2 or len(set(numbers)) != len(numbers):
            continue
        frames = [f for _, f in members]
        if not same_faces(frames):
            continue
        pattern = "" if len(frames) == len(files) else f"{prefix}*{frames[0].suffix}"
        out.append(SequenceSource("mesh_sequence", frames[0].parent, tuple(frames), tuple(numbers), pattern))
    return out


def _read_marker(path: Path, strict: bool = True) -> dict:
    """``sequence.json``: ``{"fps": number, "frames": "glob"}``, both optional. ``strict``: raise
    SequenceError on a bad file (loading); else return what can be read (discovery)."""
    try:
        spec = json.loads(path.read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if strict:
            raise SequenceError(f"{path.parent.name}: cannot parse {SEQUENCE_FILE}: {e}") from None
        return {}
    if not isinstance(spec, dict):
        if strict:
            raise SequenceError(f"{path.parent.name}: {SEQUENCE_FILE} must hold a JSON object")
        return {}
    if strict:
        _check_keys(spec, {"fps", "frames"}, f"{path.parent.name}: {SEQUENCE_FILE}")
        fps = spec.get("fps", 1.0)
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
            raise SequenceError(f"{path.parent.name}: {SEQUENCE_FILE}: fps must be a positive number, got {fps!r}")
        if not isinstance(spec.get("frames", ""), str):
            raise SequenceError(f"{path.parent.name}: {SEQUENCE_FILE}: frames must be a file name pattern")
    return spec


# -- topology check of candidate frames ------------------------------------------------------------------

def face_count(path: Path) -> int | None:
    """The number of face records of a mesh file read from its header (PLY, OFF, binary STL) or by counting
    face lines (OBJ, ASCII STL), without parsing coordinates; None for other formats or unreadable files."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            if suffix == ".ply":
                head = f.read(1 << 16)
                end = head.find(b"end_header")
                m = re.search(rb"^element\s+face\s+(\d+)", head[: end if end >= 0 else None], re.M)
                return int(m.group(1)) if m else None
            if suffix == ".off":
                tokens = []
                for line in f:
                    line = line.split(b"#", 1)[0].strip()
                    if line.upper().startswith(b"OFF"):
                        line = line[3:]
                    tokens += line.split()
                    if len(tokens) >= 2:
                        return int(tokens[1])
                return None
            data = f.read()
    except (OSError, ValueError):
        return None
    if suffix == ".stl":
        if len(data) >= 84 and len(data) == 84 + 50 * struct.unpack_from("<I", data, 80)[0]:
            return struct.unpack_from("<I", data, 80)[0]
        return data.count(b"facet")
    if suffix == ".obj":
        return len(re.findall(rb"^[ \t]*f[ \t]", data, re.M))
    return None


def face_digest(path: Path) -> str:
    """SHA-1 of the face array a frame file loads with (``process=False``, as frames are read): OBJ face
    records (and the lines that order them) are hashed as text, other formats loaded. For STL, whose
    triangles share no vertices, the digest is of the connectivity after merging equal positions."""
    if path.suffix.lower() == ".obj":
        data = path.read_bytes()
        lines = re.findall(rb"^[ \t]*(?:f|usemtl|o|g)[ \t].*$", data, re.M)
        return hashlib.sha1(b"\n".join(b" ".join(line.split()) for line in lines)).hexdigest()
    mesh = trimesh.load(path, force="mesh", process=False)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if path.suffix.lower() == ".stl":
        _, first, inverse = np.unique(np.asarray(mesh.vertices), axis=0, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # merged vertices numbered in order of first use
        faces = rank[inverse.ravel()][faces]
    return hashlib.sha1(str(faces.shape).encode() + faces.tobytes()).hexdigest()


def same_faces(files: list[Path]) -> bool:
    """Whether every file holds the same face array: face counts compared first (headers, no parsing),
    then face digests, stopping at the first difference. A file that cannot be read makes it False (its
    group then renders as static assets, which report it one by one)."""
    counts = [face_count(files[0])]
    for f in files[1:]:
        counts.append(face_count(f))
        if counts[-1] != counts[0]:
            return False
    try:
        first = face_digest(files[0])
        return all(face_digest(f) == first for f in files[1:])
    except Exception:  # any parser failure: not a sequence we can vouch for
        return False


def static_files(paths: list[Path], sources: list[SequenceSource]) -> list[Path]:
    """The mesh files among ``paths`` that belong to no sequence (they are static assets)."""
    claimed = {f for s in sources if s.kind == "mesh_sequence" for f in s.files}
    scene_dirs = {s.path.parent for s in sources if s.kind == "rigid_scene"}
    return [p for p in paths if p not in claimed and not scene_dirs.intersection(p.parents)]


def mesh_sequence_source(folder: Path, frames: tuple[str, ...], pattern: str = "") -> SequenceSource:
    """The mesh sequence of the named frame files of ``folder`` (as planned), in the given order."""
    files = tuple(Path(folder) / f for f in frames)
    numbers = [_FRAME_STEM.match(f.stem) for f in files]
    return SequenceSource("mesh_sequence", Path(folder), files,
                          tuple(int(m["number"]) if m else -1 for m in numbers), pattern)


def source_at(path: Path) -> SequenceSource:
    """The sequence at ``path``: a ``scene.json``, a folder marked with ``sequence.json``, or a folder of
    numbered frame files holding the same faces."""
    path = Path(path)
    if path.name == SCENE_FILE and path.is_file():
        return SequenceSource("rigid_scene", path, (path,))
    files = sorted(p for p in path.glob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    if path.is_dir() and (path / SEQUENCE_FILE).is_file():
        return _marked_source(path, files)
    sources = [s for s in _detected_sources(files) if not s.pattern] if path.is_dir() else []
    if not sources:
        raise SequenceError(f"{path.name}: not a sequence (no {SCENE_FILE}, no {SEQUENCE_FILE}, no numbered "
                            "frame files with one face array)")
    return sources[0]


def frame_count(source: SequenceSource) -> int:
    """The number of frames of a sequence without loading a mesh: its frame files, or ``scene.json``'s
    ``num_frames`` (0 when that cannot be read; loading reports why)."""
    if source.kind == "mesh_sequence":
        return len(source.files)
    try:
        n = json.loads(source.path.read_text()).get("num_frames")
    except (OSError, ValueError, AttributeError):
        return 0
    return n if isinstance(n, int) and n > 0 else 0


def sequence_id(source: SequenceSource, asset_dir: Path) -> str:
    """The item id of a sequence: of its folder relative to ``asset_dir`` (``walk/frames`` ->
    ``walk__frames``), with the frames' pattern when the folder holds more (``walk/frame_*.obj``)."""
    if source.kind == "rigid_scene":
        folder = source.path.parent
        rel = folder.relative_to(asset_dir) if folder != Path(asset_dir) else Path(source.path.name)
        return asset_id_for(rel.as_posix())
    return asset_id_for(source.rel_path(Path(asset_dir)))


@dataclass
class Sequence:
    """A loaded, validated dynamic asset.

    Attributes:
        sequence_id: key-safe id.
        source: where it was loaded from.
        num_frames: number of frames T.
        fps: frames per second (timestamps are ``frame / fps`` seconds).
        instance_names: one per instance; instance order is fixed over time.
        local_bounds: (2, 3) axis-aligned bounds over all frames, before ``asset_to_world``.
        sha256: hex digest over the names and bytes of every file read (frames, or scene.json and meshes).
        asset_to_world: (4, 4) similarity applied to every frame (normalisation chosen by the renderer).
    """

    sequence_id: str
    source: SequenceSource
    num_frames: int
    fps: float
    instance_names: list[str]
    local_bounds: np.ndarray
    sha256: str
    asset_to_world: np.ndarray = field(default_factory=lambda: np.eye(4))

    def meshes(self, frame: int) -> list[trimesh.Trimesh]:
        """World-space instance meshes at ``frame`` (visuals kept); face arrays equal across frames."""
        if not 0 <= frame < self.num_frames:
            raise IndexError(f"{self.sequence_id}: frame {frame} outside 0..{self.num_frames - 1}")
        meshes = self._local_meshes(frame)
        for m, name in zip(meshes, self.instance_names):
            m.apply_transform(self.asset_to_world)
            m.metadata["name"] = name  # the caster's instance names
        return meshes

    def world_bounds(self) -> np.ndarray:
        """(2, 3) bounds over all frames in world coordinates (corners of the local box, transformed)."""
        corners = trimesh.bounds.corners(self.local_bounds)
        world = trimesh.transform_points(corners, self.asset_to_world)
        return np.stack([world.min(0), world.max(0)])

    def _local_meshes(self, frame: int) -> list[trimesh.Trimesh]:
        raise NotImplementedError


@dataclass
class MeshSequence(Sequence):
    """A deforming mesh: one file per frame, identical faces."""

    def _local_meshes(self, frame: int) -> list[trimesh.Trimesh]:
        return [_load_mesh(self.source.files[frame], self.sequence_id)]


@dataclass
class RigidScene(Sequence):
    """Rigid meshes with per-frame poses.

    Attributes:
        object_meshes: one mesh per instance, in its object's frame (a mesh file may hold several).
        poses: (num_instances, T, 4, 4) object-to-scene rigid transforms.
    """

    object_meshes: list[trimesh.Trimesh] = field(default_factory=list)
    poses: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 4, 4)))

    def _local_meshes(self, frame: int) -> list[trimesh.Trimesh]:
        return [m.copy().apply_transform(p[frame]) for m, p in zip(self.object_meshes, self.poses)]


def load_sequence(source: SequenceSource, asset_dir: Path, fps: float = 24.0,
                  max_faces: int | None = None) -> Sequence:
    """Load and validate a sequence; raises :class:`SequenceError` with a one-line reason.

    ``fps`` times mesh sequences (a scene.json gives its own); more than ``max_faces`` triangles (all
    instances together) is an error.
    """
    sid = sequence_id(source, Path(asset_dir))
    if source.kind == "mesh_sequence":
        marker = source.path / SEQUENCE_FILE
        if marker.is_file():
            fps = _read_marker(marker).get("fps", fps)
        return _load_mesh_sequence(source, sid, fps, max_faces)
    return _load_rigid_scene(source, sid, max_faces)


def _check_faces(sid: str, faces: int, max_faces: int | None) -> None:
    if max_faces is not None and faces > max_faces:
        raise SequenceError(f"{sid}: too many triangles ({faces} > cap {max_faces})")


def files_digest(paths: list[Path]) -> str:
    """sha256 over each file's name and sha256."""
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in paths).encode()).hexdigest()


def _load_mesh(path: Path, sid: str) -> trimesh.Trimesh:
    # process=False keeps the vertex order, which is what makes vertex i the same point in every frame
    # (assets.load_asset merges vertices, which could differ between frames).
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise SequenceError(f"{sid}: cannot read {path.name} ({type(e).__name__}: {msg})"[:300]) from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise SequenceError(f"{sid}: {path.name} holds no triangles")
    problem = mesh_problem(mesh.vertices, mesh.faces)
    if problem:
        raise SequenceError(f"{sid}: {path.name}: {problem}")
    return mesh


def _load_mesh_sequence(source: SequenceSource, sid: str, fps: float, max_faces: int | None) -> MeshSequence:
    if len(source.files) < 2:
        raise SequenceError(f"{sid}: a mesh sequence needs at least two frame files, found {len(source.files)}")
    unnumbered = [f.name for f, n in zip(source.files, source.numbers) if n < 0]
    if unnumbered:
        raise SequenceError(f"{sid}: frame file {unnumbered[0]} has no frame number at the end of its name")
    numbers = np.asarray(source.numbers)
    expected = np.arange(numbers[0], numbers[0] + len(numbers))
    if len(np.unique(numbers)) != len(numbers):
        raise SequenceError(f"{sid}: duplicate frame numbers in {source.path.name}")
    if not np.array_equal(numbers, expected):
        missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers.tolist()))
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise SequenceError(f"{sid}: missing frames {shown} (frames must be numbered without gaps)")
    # One pass over the files: check topology against the first frame, keep only bounds (memory bounded in T).
    faces0 = None
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for path in source.files:
        mesh = _load_mesh(path, sid)
        if faces0 is None:
            faces0, first = mesh.faces, path.name
            _check_faces(sid, len(faces0), max_faces)
        elif mesh.faces.shape != faces0.shape or not np.array_equal(mesh.faces, faces0):
            what = (f"{len(mesh.faces)} faces vs {len(faces0)}" if mesh.faces.shape != faces0.shape
                    else "same face count, different vertex indices")
            raise SequenceError(f"{sid}: {path.name} has different faces from {first} ({what}); "
                                "a mesh sequence needs identical topology in every frame")
        lo, hi = np.minimum(lo, mesh.bounds[0]), np.maximum(hi, mesh.bounds[1])
    return MeshSequence(sid, source, len(source.files), float(fps), [source.path.name], np.stack([lo, hi]),
                        files_digest(list(source.files)))


_SCENE_KEYS = {"fps", "num_frames", "objects"}
_OBJECT_KEYS = {"name", "mesh", "poses", "keyframes"}
_KEYFRAME_KEYS = {"frame", "pose"}


def _load_rigid_scene(source: SequenceSource, sid: str, max_faces: int | None) -> RigidScene:
    path = source.path
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SequenceError(f"{sid}: cannot parse {path.name}: {e}") from None
    if not isinstance(spec, dict):
        raise SequenceError(f"{sid}: {path.name} must hold a JSON object")
    _check_keys(spec, _SCENE_KEYS, f"{sid}: {path.name}")
    T, fps, objects = spec.get("num_frames"), spec.get("fps"), spec.get("objects")
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise SequenceError(f"{sid}: {path.name}: num_frames must be a positive integer, got {T!r}")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
        raise SequenceError(f"{sid}: {path.name}: fps must be a positive number, got {fps!r}")
    if not isinstance(objects, list) or not objects:
        raise SequenceError(f"{sid}: {path.name}: objects must be a non-empty list")
    names, meshes, poses, files = [], [], [], [path]
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise SequenceError(f"{sid}: {path.name}: objects[{i}] must be an object")
        name = str(obj.get("name", f"object_{i}"))
        what = f"{sid}: {path.name}: object '{name}'"
        _check_keys(obj, _OBJECT_KEYS, what)
        if not isinstance(obj.get("mesh"), str):
            raise SequenceError(f"{what}: 'mesh' must be a path relative to {path.name}")
        mesh_path = path.parent / obj["mesh"]
        if not mesh_path.is_file():
            raise SequenceError(f"{what}: mesh file {obj['mesh']} does not exist")
        try:
            asset = load_asset(mesh_path, path.parent)
        except AssetError as e:
            raise SequenceError(f"{what}: {e}") from None
        object_poses = _object_poses(obj, T, what)
        for node, mesh in zip(asset.names, asset.meshes):
            corners = trimesh.bounds.corners(mesh.bounds)
            moved = np.einsum("tij,cj->tci", object_poses[:, :3, :3], corners) + object_poses[:, None, :3, 3]
            lo, hi = np.minimum(lo, moved.min((0, 1))), np.maximum(hi, moved.max((0, 1)))
            names.append(name if len(asset.meshes) == 1 else f"{name}/{node}")
            meshes.append(mesh)
            poses.append(object_poses)
        files.append(mesh_path)
    if len(set(names)) != len(names):
        raise SequenceError(f"{sid}: {path.name}: object names must be unique")
    _check_faces(sid, sum(len(m.faces) for m in meshes), max_faces)
    return RigidScene(sid, source, T, float(fps), names, np.stack([lo, hi]), files_digest(files),
                      object_meshes=meshes, poses=np.stack(poses))


def _check_keys(d: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        allowed_list = ", ".join(sorted(allowed))
        raise SequenceError(f"{what}: unknown key(s) {', '.join(unknown)} (allowed: {allowed_list})")


def _object_poses(obj: dict, T: int, what: str) -> np.ndarray:
    """(T, 4, 4) poses of one scene.json object: explicit, keyframed, or identity when neither is given."""
    if "poses" in obj and "keyframes" in obj:
        raise SequenceError(f"{what}: give either 'poses' or 'keyframes', not both")
    if "poses" in obj:
        poses = obj["poses"]
        if not isinstance(poses, list) or len(poses) != T:
            n = len(poses) if isinstance(poses, list) else type(poses).__name__
            raise SequenceError(f"{what}: 'poses' must list one 4x4 matrix per frame ({T}), got {n}")
        return np.stack([_rigid_pose(p, f"{what} frame {t}") for t, p in enumerate(poses)])
    if "keyframes" in obj:
        keys = obj["keyframes"]
        if not isinstance(keys, list) or not keys:
            raise SequenceError(f"{what}: 'keyframes' must be a non-empty list of {{frame, pose}}")
        frames, mats = [], []
        for j, key in enumerate(keys):
            if not isinstance(key, dict) or set(key) != _KEYFRAME_KEYS:
                raise SequenceError(f"{what}: keyframes[{j}] must be {{\"frame\": int, \"pose\": 4x4}}")
            frame = key["frame"]
            if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < T:
                raise SequenceError(f"{what}: keyframes[{j}] frame must be an integer in 0..{T - 1}")
            frames.append(frame)
            mats.append(_rigid_pose(key["pose"], f"{what} keyframe {frame}"))
        if np.any(np.diff(frames) <= 0):
            raise SequenceError(f"{what}: keyframe frames must be strictly increasing")
        return interpolate_poses(np.asarray(frames), np.stack(mats), T)
    return np.broadcast_to(np.eye(4), (T, 4, 4)).copy()


def _rigid_pose(value, what: str) -> np.ndarray:
    """A validated (4, 4) rigid transform (rotation + translation, no scale or shear)."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SequenceError(f"{what}: pose is not a 4x4 matrix of numbers") from None
    if m.shape != (4, 4):
        raise SequenceError(f"{what}: pose must be 4x4, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise SequenceError(f"{what}: pose has NaN/inf entries")
    if not np.allclose(m[3], (0, 0, 0, 1), atol=_RIGID_ATOL):
        raise SequenceError(f"{what}: non-rigid pose, last row must be (0, 0, 0, 1)")
    R = m[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=_RIGID_ATOL) or np.linalg.det(R) < 0:
        raise SequenceError(f"{what}: non-rigid pose, the rotation block is not orthonormal with det +1 "
                            "(scale, shear or reflection)")
    return m


def interpolate_poses(key_frames: np.ndarray, key_poses: np.ndarray, num_frames: int) -> np.ndarray:
    """(T, 4, 4) poses from keyframes: translation linear, rotation slerp, held before the first and after
    the last keyframe. ``key_frames`` (M,) strictly increasing ints, ``key_poses`` (M, 4, 4) rigid."""
    t = np.clip(np.arange(num_frames, dtype=np.float64), key_frames[0], key_frames[-1])
    out = np.broadcast_to(np.eye(4), (num_frames, 4, 4)).copy()
    out[:, :3, 3] = np.stack([np.interp(t, key_frames, key_poses[:, i, 3]) for i in range(3)], axis=-1)
    rotations = Rotation.from_matrix(key_poses[:, :3, :3])
    if len(key_frames) == 1:
        out[:, :3, :3] = rotations.as_matrix()[0]
    else:
        out[:, :3, :3] = Slerp(key_frames.astype(np.float64), rotations)(t).as_matrix()
    return out
