"""Built-in assets: small procedural, textured meshes (static) and two dynamic assets, for the demo and the
tests; ``wt-datagen make-assets``. Every instance is watertight with outward normals; all are written y-up."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from .assets import Z_UP_TO_Y_UP
from .sequences import SCENE_FILE


def _grid_mesh(points: np.ndarray, closed_v: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (nu+1, nv(+1), 3) grid of points (the u seam duplicated) to vertices, faces, uv.

    Column ``nu`` repeats column 0 so the texture wraps without a smeared seam; rows along v are closed
    (last row joined to the first) when ``closed_v``. Triangles of zero area (at poles) are dropped.
    """
    nu1, nv = points.shape[:2]
    if closed_v:  # duplicate the first row too: a uv seam in v as well
        points = np.concatenate([points, points[:, :1]], axis=1)
        nv += 1
    uu, vv = np.meshgrid(np.linspace(0, 1, nu1), np.linspace(0, 1, nv), indexing="ij")
    idx = np.arange(nu1 * nv).reshape(nu1, nv)
    a, b = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel()
    c, d = idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    verts = points.reshape(-1, 3)
    tri = verts[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    faces = faces[area > 1e-12]
    uv = np.stack([uu.ravel(), vv.ravel()], 1)
    return verts, faces, uv


def _textured(verts, faces, uv, texture: Image.Image) -> trimesh.Trimesh:
    # a white diffuse factor: renderers multiply the texture by it (trimesh's default is a dim grey)
    material = trimesh.visual.material.SimpleMaterial(image=texture, diffuse=[255, 255, 255, 255])
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(verts, faces, visual=visual, process=False)


def _revolve(profile: np.ndarray, texture: Image.Image, segments: int, closed: bool) -> trimesh.Trimesh:
    """Surface of revolution about +z of an (n, 2) polyline of (r, z); ``closed`` joins its ends.

    Which way the normals point depends on the profile's orientation: callers check the volume's sign.
    """
    theta = np.linspace(0, 2 * np.pi, segments + 1)[:, None]
    r, z = profile[None, :, 0], profile[None, :, 1]
    pts = np.stack([r * np.cos(theta), r * np.sin(theta), np.broadcast_to(z, (len(theta), z.shape[1]))], -1)
    return _textured(*_grid_mesh(pts, closed_v=closed), texture)


def _sphere(radius: float, texture: Image.Image, rings: int = 32) -> trimesh.Trimesh:
    phi = np.linspace(-np.pi / 2, np.pi / 2, rings + 1)
    profile = np.stack([radius * np.cos(phi), radius * np.sin(phi)], 1)
    profile[[0, -1], 0] = 0.0  # exact poles
    return _revolve(profile, texture, segments=2 * rings, closed=False)


def _box(extents, texture: Image.Image, center=(0, 0, 0)) -> trimesh.Trimesh:
    """A box with its own four vertices per side, each side mapped to the whole texture."""
    normals = np.eye(3)
    verts, faces, uv = [], [], []
    for axis in range(3):
        for sign in (1.0, -1.0):
            n = sign * normals[axis]
            t = normals[(axis + 1) % 3]
            b = np.cross(n, t)
            corners = np.array([n - t - b, n + t - b, n + t + b, n - t + b]) * np.asarray(extents) / 2
            k = len(verts) * 4
            verts.append(corners)
            faces.append([[k, k + 1, k + 2], [k, k + 2, k + 3]])
            uv.append([[0, 0], [1, 0], [1, 1], [0, 1]])
    return _textured(np.concatenate(verts) + center, np.concatenate(faces), np.concatenate(uv), texture)


def _tube(centre: np.ndarray, normal: np.ndarray, radius: float, texture, caps: bool) -> trimesh.Trimesh:
    """A tube of ``radius`` along the (n, 3) points ``centre`` with (n, 3) unit normals of the path.

    A closed path repeats its first point last. ``caps`` closes the two ends with triangle fans.
    """
    if np.allclose(centre[0], centre[-1]):  # closed: central differences across the seam
        loop = centre[:-1]
        tangent = np.roll(loop, -1, axis=0) - np.roll(loop, 1, axis=0)
        tangent = np.concatenate([tangent, tangent[:1]])
    else:
        tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = normal - np.sum(normal * tangent, axis=1, keepdims=True) * tangent
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    s = np.linspace(0, 2 * np.pi, 24 + 1)[:-1]
    ring = np.cos(s)[None, :, None] * normal[:, None] + np.sin(s)[None, :, None] * binormal[:, None]
    verts, faces, uv = _grid_mesh(centre[:, None] + radius * ring, closed_v=True)
    if caps:
        n_ring = len(s) + 1  # the grid repeats the ring's first point
        # the grid's faces point into the tube; a fan (centre, ring k, ring k+1) points along the path,
        # i.e. into the tube at the far end: flip the near one. The volume check below turns all outward.
        for end, flip in ((0, False), (len(centre) - 1, True)):
            k = len(verts)
            rim = np.arange(n_ring - 1) + end * n_ring
            fan = np.stack([np.full(len(rim), k), rim, np.roll(rim, -1)], 1)
            faces = np.concatenate([faces, fan[:, ::-1] if flip else fan])
            verts = np.concatenate([verts, centre[end][None]])
            uv = np.concatenate([uv, [[0.5, 0.5]]])
    mesh = _textured(verts, faces, uv, texture)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def _torus_knot(texture: Image.Image, p: int = 2, q: int = 3, tube: float = 0.12) -> trimesh.Trimesh:
    t = np.linspace(0, 2 * np.pi, 256 + 1)
    r = 1 + 0.4 * np.cos(q * t)
    c = np.stack([r * np.cos(p * t), r * np.sin(p * t), 0.4 * np.sin(q * t)], -1)
    c[-1] = c[0]  # the seam must close exactly
    # the position vector is never along the tangent on this knot: a smooth, periodic frame
    normal = np.cross(np.gradient(c, axis=0), c)
    normal[-1] = normal[0]
    return _tube(c, normal, tube, texture, caps=False)


def _texture(kind: str, size: int = 256) -> Image.Image:
    """Procedural RGB textures with features in both directions (so misaligned uvs show)."""
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "checker":
        c = ((x * 8).astype(int) + (y * 8).astype(int)) % 2
        rgb = np.stack([0.2 + 0.7 * c, 0.3 + 0.5 * x, 0.9 - 0.6 * c * y], -1)
    elif kind == "stripes":
        s = 0.5 + 0.5 * np.sin(2 * np.pi * 10 * x)
        rgb = np.stack([0.9 * s + 0.1, 0.4 + 0.4 * y, 0.8 * (1 - s) + 0.1], -1)
    elif kind == "wood":
        r = np.sqrt((x - 0.3) ** 2 + (y - 1.4) ** 2)
        rings = 0.5 + 0.5 * np.sin(2 * np.pi * 18 * r + 3 * np.sin(6 * x))
        rgb = np.stack([0.45 + 0.3 * rings, 0.28 + 0.18 * rings, 0.12 + 0.08 * rings], -1)
    elif kind == "dots":
        d = np.hypot((x * 6) % 1 - 0.5, (y * 6) % 1 - 0.5) < 0.3
        rgb = np.stack([0.95 - 0.8 * d, 0.85 - 0.2 * d + 0.1 * y, 0.3 + 0.6 * d], -1)
    else:  # "grid": uv debugging grid, red = u, green = v
        lines = ((x * 16) % 1 < 0.08) | ((y * 16) % 1 < 0.08)
        rgb = np.stack([x, 1 - y, 0.5 * np.ones_like(x)], -1) * (1 - 0.7 * lines[..., None])
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def _mug(texture: Image.Image) -> dict[str, trimesh.Trimesh]:
    # (r, z) counter-clockwise: outer wall up, rim, inner wall down, inner floor to the axis, bottom back out
    profile = np.array(
        [[0.0, 0.0], [0.4, 0.0], [0.4, 1.0], [0.33, 1.0], [0.33, 0.08], [0.0, 0.08]], dtype=np.float64
    )
    # the closing segment lies on the axis (r = 0): its triangles have zero area and are dropped
    body = _revolve(profile, texture, segments=64, closed=True)
    if body.volume < 0:
        body.invert()
    # handle: a capped half torus (watertight) in the xz plane whose ends sit inside the wall
    a = np.linspace(-np.pi / 2, np.pi / 2, 33)
    arc = np.stack([0.365 + 0.22 * np.cos(a), np.zeros_like(a), 0.5 + 0.22 * np.sin(a)], 1)
    handle = _tube(arc, np.tile([0.0, 1.0, 0.0], (len(a), 1)), 0.03, texture, caps=True)
    red = trimesh.visual.material.SimpleMaterial(diffuse=[200, 60, 40, 255])
    handle.visual = trimesh.visual.TextureVisuals(material=red)  # a material colour, no texture
    return {"body": body, "handle": handle}


def _builtin_scenes() -> dict[str, tuple[str, dict[str, tuple[trimesh.Trimesh, np.ndarray]]]]:
    """name -> (format, {instance: (mesh, transform)})."""
    eye = np.eye(4)
    shells = {
        f"shell_{i}": (_sphere(r, _texture(kind)), eye)
        for i, (r, kind) in enumerate([(1.0, "checker"), (0.7, "stripes"), (0.4, "dots")])
    }
    wood = _texture("wood")
    leg = _box([0.08, 0.08, 0.7], wood)
    table = {"top": (_box([1.2, 0.8, 0.06], wood, center=(0, 0, 0.73)), eye)}
    for i, (x, y) in enumerate([(-0.5, -0.3), (0.5, -0.3), (0.5, 0.3), (-0.5, 0.3)]):
        table[f"leg_{i}"] = (leg, trimesh.transformations.translation_matrix([x, y, 0.35]))
    grid = _texture("grid")
    a, b = _box([1, 1, 1], grid), _box([0.9, 0.9, 0.9], grid)
    # a closed shell 0.05 thick: the inner box turned inside out, sharing the texture
    outer = _textured(
        np.concatenate([a.vertices, b.vertices]),
        np.concatenate([a.faces, b.faces[:, ::-1] + len(a.vertices)]),
        np.concatenate([a.visual.uv, b.visual.uv]),
        grid,
    )
    box_in_box = {"outer_shell": (outer, eye), "inner_box": (_box([0.4, 0.4, 0.4], _texture("dots")), eye)}
    mug = {k: (m, eye) for k, m in _mug(_texture("stripes")).items()}
    plate = {"plate": (_box([1.0, 0.7, 0.01], _texture("checker")), eye)}
    knot = {"torus_knot": (_torus_knot(_texture("grid")), eye)}
    return {
        "nested_shells": ("glb", shells),
        "table": ("glb", table),
        "box_in_box": ("glb", box_in_box),
        "mug": ("obj", mug),
        "thin_plate": ("obj", plate),
        "torus_knot": ("obj", knot),
    }


def make_builtin_assets(out_dir: str | Path) -> list[Path]:
    """Write the built-in procedural textured assets, one subfolder each; returns the mesh files.

    nested_shells (3 concentric spheres), table (top + 4 instanced legs), box_in_box (a closed box shell
    around a box) as glb; mug (body + handle objects), thin_plate, torus_knot as obj + mtl + png.
    Every instance is watertight (vertices merged by position) and at most a few thousand triangles. They
    are modelled z-up and written y-up, the glTF convention and the renderer's (``views``: world y is up).
    """
    out_dir = Path(out_dir)
    written = []
    for name, (fmt, parts) in _builtin_scenes().items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        scene = trimesh.Scene()
        for inst, (mesh, T) in parts.items():
            scene.add_geometry(mesh, node_name=inst, geom_name=inst, transform=Z_UP_TO_Y_UP @ T)
        path = folder / f"{name}.{fmt}"
        if fmt == "glb":
            scene.export(path)
        else:
            files = trimesh.exchange.obj.export_obj(scene, mtl_name=f"{name}.mtl", return_texture=True)
            text, extra = files
            path.write_text(text)
            for fname, data in extra.items():
                (folder / fname).write_bytes(data)
        written.append(path)
    return written


def make_builtin_sequences(out_dir: str | Path, num_frames: int = 24) -> list[Path]:
    """Write two dynamic assets (y up) and return the paths that identify them.

    ``wobble/frame_NNNN.obj``: an icosphere breathing and bending, vertex i the same material point in every
    frame; ``passing/scene.json``: a box sliding past a spinning torus (keyframes), with their meshes.
    """
    out = Path(out_dir)
    wobble = out / "wobble"
    wobble.mkdir(parents=True, exist_ok=True)
    rest = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    for f in range(num_frames):
        phase = 2 * np.pi * f / num_frames
        v = rest.vertices * (1 + 0.15 * np.sin(phase) * rest.vertices[:, 1:2] / 0.5)  # breathe along y
        v[:, 0] += 0.2 * np.sin(phase) * (v[:, 1] / 0.5) ** 2  # bend
        frame = trimesh.Trimesh(v, rest.faces, process=False)
        frame.export(wobble / f"frame_{f:04d}.obj")
    passing = out / "passing"
    passing.mkdir(parents=True, exist_ok=True)
    trimesh.creation.torus(0.4, 0.12, major_sections=48, minor_sections=16).export(passing / "torus.obj")
    trimesh.creation.box(extents=(0.4, 0.4, 0.4)).export(passing / "box.obj")

    def pose(angle_y: float = 0.0, t=(0.0, 0.0, 0.0)) -> list:
        T = trimesh.transformations.rotation_matrix(angle_y, (0, 1, 0))
        T[:3, 3] = t
        return T.tolist()

    scene = {
        "fps": 24,
        "num_frames": num_frames,
        "objects": [
            {"name": "torus", "mesh": "torus.obj",
             "keyframes": [{"frame": 0, "pose": pose()}, {"frame": num_frames - 1, "pose": pose(np.pi * 0.9)}]},
            {"name": "box", "mesh": "box.obj",
             "keyframes": [{"frame": 0, "pose": pose(t=(-1.2, 0, 0.6))},
                           {"frame": num_frames - 1, "pose": pose(0.5, t=(1.2, 0, 0.6))}]},
        ],
    }
    (passing / SCENE_FILE).write_text(json.dumps(scene, indent=1))
    return [wobble, passing / SCENE_FILE]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="folder to write the assets into (created)")
    parser.add_argument("--sequences", action="store_true",
                        help="also write the built-in dynamic assets (a deforming mesh sequence, a rigid scene)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = make_builtin_assets(args.out_dir)
        if args.sequences:
            paths += make_builtin_sequences(args.out_dir)
    except OSError as e:
        print(f"make-assets: cannot write to {args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0
