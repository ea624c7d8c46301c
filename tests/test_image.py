"""The RGB image lines up with layer 0 (pyrender depth buffer vs the caster); the ray-traced fallback."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pybullet_data
import pytest
import trimesh
from PIL import Image

from wt_datagen import Camera, LayeredRaycaster
from wt_datagen.image.rgb import AMBIENT, GLUnavailable, render_depth, render_rgb
from wt_datagen.inputs.assets import asset_to_world, load_asset
from wt_datagen.inputs.builtin import make_builtin_assets

PYBULLET = Path(pybullet_data.getDataPath())


def normalised_scenes(out: Path) -> dict[str, list[trimesh.Trimesh]]:
    """Unit-box normalised meshes (world frame) of a few built-in and real textured assets, by asset id."""
    paths = {p.parent.name: p for p in make_builtin_assets(out)}
    chosen = [(paths[n], out) for n in ("mug", "table", "torus_knot", "box_in_box", "thin_plate")]
    chosen += [(PYBULLET / "duck.obj", PYBULLET), (PYBULLET / "soccerball.obj", PYBULLET)]
    result = {}
    for path, root in chosen:
        asset = load_asset(path, root)
        T = asset_to_world(asset.meshes)
        result[asset.asset_id] = [m.copy().apply_transform(T) for m in asset.meshes]
    return result


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Unit-box normalised meshes of a few built-in and real textured assets."""
    return normalised_scenes(tmp_path_factory.mktemp("assets"))


def cameras():
    """Square and non-square images, centred and off-centre principal points, a skewed K, an inside view."""
    a = Camera.look_at([1.1, -0.8, 0.9], [0, 0, 0], up=(0, 0, 1), width=96, height=64, fov_y_deg=50)
    b = Camera.look_at([-0.4, 1.3, -0.7], [0.05, 0, 0], up=(0, 1, 0), width=57, height=83, fov_y_deg=45)
    K = b.K.copy()
    K[0, 2] += 9.3  # off-centre principal point, fractional
    K[1, 2] -= 13.7
    K[1, 1] *= 1.1  # non-square pixels
    c = Camera.look_at([0.3, 0.2, 1.6], [0, 0, 0], up=(0, 1, 0), width=80, height=80, fov_y_deg=40)
    Kc = c.K.copy()
    Kc[0, 1] = 6.0  # skew
    return {
        "wide": a,
        "offcentre": Camera(K, b.world_to_cam, b.width, b.height),
        "skew": Camera(Kc, c.world_to_cam, c.width, c.height),
    }


@pytest.mark.parametrize("cam_name", list(cameras()))
def test_pyrender_depth_matches_layer0(scenes, cam_name):
    camera = cameras()[cam_name]
    for name, meshes in scenes.items():
        gl = render_depth(meshes, camera)
        hits = LayeredRaycaster(meshes).cast(camera, num_layers=2)
        d0, v0 = hits.depth[0], hits.valid[0]
        fg = gl > 0
        assert v0.sum() > 0.03 * v0.size, (name, "object barely visible: a useless check")
        iou = (fg & v0).sum() / (fg | v0).sum()
        both = fg & v0
        agree = np.abs(gl[both] - d0[both]) <= 1e-3 * d0[both]
        assert iou >= 0.99, (name, cam_name, iou)
        assert agree.sum() >= 0.99 * v0.sum(), (name, cam_name, agree.mean())


def test_half_pixel_shift_would_fail(scenes):
    """The check above has teeth: the same camera shifted by half a pixel misses the bar on the knot."""
    camera = cameras()["wide"]
    K = camera.K.copy()
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    shifted = Camera(K, camera.world_to_cam, camera.width, camera.height)
    meshes = scenes["torus_knot__torus_knot_obj"]
    gl = render_depth(meshes, shifted) > 0
    v0 = LayeredRaycaster(meshes).cast(camera, num_layers=1).valid[0]
    assert (gl & v0).sum() / (gl | v0).sum() < 0.99


def test_pyrender_rgb_is_lit_textured_and_on_background(scenes):
    camera = cameras()["offcentre"]
    meshes = scenes["duck_obj"]
    rgb = render_rgb(meshes, camera, background=(0, 0, 255))
    assert rgb.shape == (camera.height, camera.width, 3) and rgb.dtype == np.uint8
    v0 = LayeredRaycaster(meshes).cast(camera, num_layers=1).valid[0]
    inner = v0 & np.roll(v0, 1, 0) & np.roll(v0, -1, 0) & np.roll(v0, 1, 1) & np.roll(v0, -1, 1)
    outer = ~v0 & ~np.roll(v0, 1, 0) & ~np.roll(v0, -1, 0) & ~np.roll(v0, 1, 1) & ~np.roll(v0, -1, 1)
    assert (rgb[outer] == (0, 0, 255)).all()
    duck = rgb[inner].astype(float)
    assert duck[:, 0].mean() > 1.5 * duck[:, 2].mean()  # the duck's texture is yellow, not grey or blue
    assert len(np.unique(rgb[inner], axis=0)) > 50  # shaded and textured, not flat


def test_pyrender_camera_looking_away_gives_background(scenes):
    camera = Camera.look_at([0, 0, 3], [0, 0, 10], width=32, height=24)
    meshes = scenes["mug__mug_obj"]
    assert (render_rgb(meshes, camera, background=(10, 20, 30)) == (10, 20, 30)).all()
    assert (render_depth(meshes, camera) == 0).all()


def _quadrant_quad():
    """A 2x2 quad in the z=0 plane, uv = (x+1)/2, (y+1)/2, with a 2x2 texture of four colours."""
    verts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    uv = (verts[:, :2] + 1) / 2
    # image rows go down; uv v goes up: the top row of the image is v = 1 (y = +1)
    texels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(texels), diffuse=[255] * 4)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(verts, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False)


def test_raytrace_texture_colours_where_expected():
    quad = _quadrant_quad()
    # far, narrow, head-on camera with y up in the image: cos(normal, ray) ~ 1 everywhere
    camera = Camera.look_at([0, 0, 20], [0, 0, 0], up=(0, 1, 0), width=64, height=48, fov_y_deg=6)
    hits = LayeredRaycaster([quad]).cast(camera, num_layers=2)
    rgb = render_rgb([quad], camera, mode="raytrace", hits=hits, background=(7, 7, 7))
    # where each quadrant's centre (x, y = +-0.5) lands, the texel's own colour (texel centres sit there)
    expect = {
        (-0.5, 0.5): (255, 0, 0),
        (0.5, 0.5): (0, 255, 0),
        (-0.5, -0.5): (0, 0, 255),
        (0.5, -0.5): (255, 255, 0),
    }
    for (x, y), colour in expect.items():
        u, v = camera.project(camera.world_to_camera([x, y, 0]))
        assert np.abs(rgb[int(v), int(u)].astype(int) - colour).max() <= 6, ((x, y), rgb[int(v), int(u)])
    assert (rgb[~hits.valid[0]] == 7).all() and (~hits.valid[0]).any()
    # pyrender agrees on which colour is where (uv orientation), if not on the exact shade
    gl = render_rgb([quad], camera).astype(int)
    for (x, y), colour in expect.items():
        u, v = camera.project(camera.world_to_camera([x, y, 0]))
        on = np.array(colour) > 0
        assert gl[int(v), int(u)][on].min() > 2 * gl[int(v), int(u)][~on].max() + 10, (
            (x, y),
            gl[int(v), int(u)],
        )


def test_raytrace_lambert_and_visual_kinds():
    box = trimesh.creation.box(extents=(1, 1, 1))
    vertex = box.copy()
    vertex.visual = trimesh.visual.ColorVisuals(vertex, vertex_colors=np.tile([0, 200, 0, 255], (8, 1)))
    face = box.copy()
    face.visual = trimesh.visual.ColorVisuals(face, face_colors=np.tile([200, 0, 0, 255], (12, 1)))
    plain = box.copy()
    material_only = box.copy()
    blue = trimesh.visual.material.PBRMaterial(baseColorFactor=[0, 0, 255, 255])
    material_only.visual = trimesh.visual.TextureVisuals(material=blue)
    offsets = [(-3, 0, 0), (-1.5, 0, 0), (0, 0, 0), (1.5, 0, 0)]
    meshes = [m.apply_translation(o) for m, o in zip([vertex, face, plain, material_only], offsets)]
    camera = Camera.look_at([-0.75, 0, 8], [-0.75, 0, 0], up=(0, 1, 0), width=120, height=40, fov_y_deg=20)
    hits = LayeredRaycaster(meshes).cast(camera, num_layers=1)
    rgb = render_rgb(meshes, camera, mode="raytrace", hits=hits).astype(int)
    rays = camera.pixel_rays()
    cos = np.abs(rays[..., 2]) / np.linalg.norm(rays, axis=-1)  # front faces' normals are +-z
    shade = AMBIENT + (1 - AMBIENT) * cos
    want = {0: (0, 200, 0), 1: (200, 0, 0), 2: (204, 204, 204), 3: (0, 0, 255)}
    for i, colour in want.items():
        sel = hits.valid[0] & (hits.instance_id[0] == i) & (np.abs(hits.normal[0][..., 2]) > 0.999)
        assert sel.sum() > 20
        np.testing.assert_allclose(rgb[sel], np.outer(shade[sel], colour), atol=1.01)


def test_raytrace_survives_odd_inputs():
    quad = _quadrant_quad()
    camera = Camera.look_at([0, 0, 3], [0, 0, 0], width=16, height=16)
    hits = LayeredRaycaster([quad]).cast(camera, num_layers=1)
    hits.bary[0][:2] = np.nan  # garbage coordinates must not crash the fallback
    hits.face_id[0][hits.valid[0]] = 99
    quad.visual.uv[:] = np.nan
    rgb = render_rgb([quad], camera, mode="raytrace", hits=hits)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    with pytest.raises(ValueError, match="needs the caster's hits"):
        render_rgb([quad], camera, mode="raytrace")
    with pytest.raises(ValueError, match="mode must be"):
        render_rgb([quad], camera, mode="vulkan")


def test_gl_unavailable_is_a_clear_error():
    code = """
import trimesh
from wt_datagen import Camera
from wt_datagen.image.rgb import render_rgb, GLUnavailable
try:
    render_rgb([trimesh.creation.box()], Camera.look_at([3, 3, 3], [0, 0, 0], width=8, height=8))
except GLUnavailable as e:
    print("GLUnavailable", e)
"""
    env = dict(os.environ, PYOPENGL_PLATFORM="no-such-platform")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("GLUnavailable") and len(out.stdout.strip().splitlines()) == 1, out
    assert issubclass(GLUnavailable, RuntimeError)
