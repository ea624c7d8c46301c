"""Mitsuba images line up with layer 0, checked by Mitsuba itself (its depth AOV, its coverage); the albedo
layers against Mitsuba's own texture lookup and against the texture; materials, masks, determinism."""

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pybullet_data
import pytest
import trimesh
from PIL import Image

from tests.test_image import normalised_scenes
from wt_datagen import Camera, LayeredRaycaster
from wt_datagen.image.lighting import Background, Environment, Lighting, LightingConfig, draw_lighting
from wt_datagen.image.materials import albedo_layers, linear_to_srgb, material_of, to_uint8
from wt_datagen.image.mitsuba import MitsubaScene, check_camera, finish, set_threads

PYBULLET = Path(pybullet_data.getDataPath())
DARK = Lighting(Environment("constant"), (), Background("transparent"))  # nothing lights the scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Unit-box normalised meshes and their materials: built-in and pybullet_data assets."""
    return {k: (meshes, [material_of(m) for m in meshes])
            for k, meshes in normalised_scenes(tmp_path_factory.mktemp("assets")).items()}


def offcentre(width=160, height=120, dx=9.3, dy=-13.7, eye=(1.1, 0.8, 1.6)):
    """A camera whose principal point is off the image centre by a fractional (dx, dy) pixels."""
    cam = Camera.look_at(eye, [0.02, -0.03, 0], up=(0, 1, 0), width=width, height=height, fov_y_deg=45)
    K = cam.K.copy()
    K[0, 2] += dx
    K[1, 2] += dy
    return Camera(K, cam.world_to_cam, width, height)


def test_depth_aov_alpha_and_albedo_match_layer0(scenes):
    """Mitsuba's own depth AOV (at pixel centres) against the caster's layer 0: relative error < 1e-4 on at
    least 99% of foreground pixels; the rendered image's alpha (coverage at 16 spp) against valid[0]:
    IoU >= 0.99; Mitsuba's albedo AOV (its texture lookup) against our albedo layer 0: equal in 8 bits."""
    set_threads(0)
    camera = offcentre()
    lighting = Lighting(Environment("constant", colour=(0.5, 0.5, 0.5)), (), Background("transparent"))
    for name, (meshes, materials) in scenes.items():
        hits = LayeredRaycaster(meshes).cast(camera, num_layers=2)
        v0, d0 = hits.valid[0], hits.depth[0]
        assert v0.sum() > 0.03 * v0.size, (name, "object barely visible: a useless check")
        scene = MitsubaScene(meshes, materials)
        z = scene.depth(camera)
        fg = z > 0
        assert (fg & v0).sum() / (fg | v0).sum() >= 0.99, name
        both = fg & v0
        rel = np.abs(z[both] - d0[both]) / d0[both]
        assert (rel < 1e-4).sum() >= 0.99 * v0.sum(), (name, np.median(rel))
        alpha = scene.render(camera, lighting, 16, 7)[..., 3] >= 0.5
        iou = (alpha & v0).sum() / (alpha | v0).sum()
        assert iou >= 0.99, (name, iou)
        theirs = to_uint8(linear_to_srgb(scene.aovs(camera, "a:albedo")))
        ours = albedo_layers(materials, meshes, hits)[0]
        diff = np.abs(ours.astype(int) - theirs.astype(int)).max(-1)[both]
        assert (diff <= 1).mean() >= 0.99, (name, np.percentile(diff, 99))


def test_half_pixel_shift_would_fail(scenes):
    """The alignment check has teeth: Mitsuba's sensor given a principal point half a pixel off misses."""
    meshes, materials = scenes["torus_knot__torus_knot_obj"]
    camera = offcentre(96, 64)
    shifted = offcentre(96, 64, 9.3 + 0.5, -13.7 + 0.5)
    v0 = LayeredRaycaster(meshes).cast(camera, num_layers=1).valid[0]
    fg = MitsubaScene(meshes, materials).depth(shifted) > 0
    assert (fg & v0).sum() / (fg | v0).sum() < 0.99


def test_cameras_mitsuba_cannot_express_are_refused(scenes):
    meshes, materials = scenes["duck_obj"]
    cam = offcentre(32, 24)
    for change, what in (((0, 1), "skew"), ((1, 1), "non-square pixels")):
        K = cam.K.copy()
        K[change] += 2.0
        bad = Camera(K, cam.world_to_cam, 32, 24)
        with pytest.raises(ValueError, match=what) as e:
            MitsubaScene(meshes, materials).render(bad, DARK, 1, 0)
        assert len(str(e.value).splitlines()) == 1
    check_camera(cam)  # an off-centre principal point is fine


def test_same_bits_whatever_the_threads(scenes):
    meshes, materials = scenes["duck_obj"]
    camera = offcentre(64, 48)
    lighting = draw_lighting(LightingConfig(lights=(2, 2)), "environment", 0, "duck", 1, camera, (0, 0, 0), 0.8)
    digests = set()
    for threads in (1, 2, 3):
        set_threads(threads)
        digests.add(hashlib.sha256(MitsubaScene(meshes, materials).render(camera, lighting, 4, 11).tobytes()).digest())
    set_threads(0)
    assert len(digests) == 1


def _quad(texels: np.ndarray, **pbr) -> trimesh.Trimesh:
    """A 2x2 quad in the z=0 plane, uv = (x+1)/2, (y+1)/2, with a PBR texture."""
    verts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texels), **pbr)
    visual = trimesh.visual.TextureVisuals(uv=(verts[:, :2] + 1) / 2, material=material)
    return trimesh.Trimesh(verts, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False)


def test_mask_cutout_and_emission():
    """glTF MASK: texels below the cutoff are holes (alpha 0 there); an emissive factor makes light."""
    texels = np.zeros((2, 2, 4), np.uint8)
    texels[..., :3] = 255
    texels[:, 0, 3] = 0  # left column (x < 0) cut out
    texels[:, 1, 3] = 255
    camera = Camera.look_at([0, 0, 6], [0, 0, 0], up=(0, 1, 0), width=40, height=40, fov_y_deg=10)
    u, v = np.meshgrid(np.arange(40) + 0.5, np.arange(40) + 0.5)
    x = camera.unproject(u, v)[..., 0] * 6  # world x on the plane (camera x is world x here)
    left, right = (x < -0.1) & (x > -0.9), (x > 0.1) & (x < 0.9)
    masked = _quad(texels, alphaMode="MASK", alphaCutoff=0.5)
    alpha = MitsubaScene([masked], [material_of(masked)]).render(camera, DARK, 8, 1)[..., 3]
    assert alpha[left].max() == 0 and alpha[right].min() == 1
    glowing = _quad(texels, emissiveFactor=[1.0, 0.0, 0.0])
    rgba = MitsubaScene([glowing], [material_of(glowing)]).render(camera, DARK, 8, 1)
    red = rgba[..., :3][left | right]
    assert (rgba[..., 3][left | right] == 1).all()  # seen (not hidden with the environment)
    assert (red[:, 0] > 0.9).all() and (red[:, 1:] < 0.05).all()  # lit by nothing but itself, red


def test_environment_image_orientation_agrees_with_ours(tmp_path):
    """The background Mitsuba shows of an equirectangular image (turned about y) is what our own lookup
    of the same file gives for each pixel's ray (used by pyrender's backgrounds and the light summary)."""
    from wt_datagen.image.lighting import Environments, background_image

    h, w = 32, 64
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(w) * 4)[None, :]  # red ramps with azimuth
    img[..., 1] = (np.arange(h) * 8)[:, None]  # green with polar angle
    img[:, : w // 4, 2] = 255  # one quarter blue
    Image.fromarray(img).save(tmp_path / "env.png")
    envs = Environments(tmp_path)
    info = envs.info(0)
    env = Environment("image", file=info.name, scale=1.0, rotation_deg=70.0)
    lighting = Lighting(env, (), Background("environment"))
    camera = Camera.look_at([0, 0, 0], [0.3, 0.2, -1.0], up=(0, 1, 0), width=48, height=32, fov_y_deg=100)
    box = trimesh.creation.box(extents=(0.01, 0.01, 0.01))
    box.apply_translation([0, -50, 0])  # out of view: only the environment is seen
    ours = background_image(lighting, camera, tmp_path).astype(int)
    theirs = finish(MitsubaScene([box], [material_of(box)]).render(camera, lighting, 16, 3, folder=tmp_path),
                    lighting).astype(int)
    diff = np.abs(ours - theirs).max(-1)
    assert np.median(diff) <= 3 and (diff <= 12).mean() > 0.9, np.percentile(diff, [50, 90])


def test_missing_mitsuba_is_a_one_line_error_naming_the_extra(tmp_path):
    code = """
import sys
sys.modules["mitsuba"] = None  # as if not installed
from wt_datagen.pipeline.config import ConfigError, RenderConfig, ImageConfig
from wt_datagen.pipeline.items import check_image_setup
try:
    check_image_setup(RenderConfig(image=ImageConfig(renderer="mitsuba")))
except ConfigError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and ".[mitsuba]" in lines[0], out


def test_randomised_material_only_for_bare_meshes():
    from wt_datagen.image.materials import MaterialConfig, material_rng, randomised

    bare = trimesh.creation.box()
    painted = bare.copy()
    painted.visual = trimesh.visual.ColorVisuals(painted, face_colors=np.tile([200, 0, 0, 255], (12, 1)))
    cfg = MaterialConfig(randomise=True, roughness=(0.3, 0.4))
    a = randomised(material_of(bare), cfg, material_rng(0, "x", 0))
    b = randomised(material_of(bare), cfg, material_rng(0, "x", 0))
    c = randomised(material_of(bare), cfg, material_rng(0, "x", 1))
    assert a.source == "random" and np.array_equal(a.base_colour, b.base_colour) and 0.3 <= a.roughness <= 0.4
    assert not np.array_equal(a.base_colour, c.base_colour)
    assert randomised(material_of(painted), cfg, material_rng(0, "x", 0)).source == "face"
    assert dataclasses.replace(cfg, randomise=False) and randomised(material_of(bare), MaterialConfig(),
                                                                     material_rng(0, "x", 0)).source == "none"
