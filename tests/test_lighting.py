"""Seeded lighting and backgrounds: drawn as a pure function, honoured by both renderers (shadows against
shadow rays of our own caster, colour temperature), recorded in meta.json well enough to re-render; albedo
layers against the texture; transparent images end to end; bad lighting input fails at start-up."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds
from PIL import Image

from wt_datagen import Camera, LayeredRaycaster
from wt_datagen.cli import main as cli_main
from wt_datagen.image.lighting import (
    Background,
    Environment,
    Light,
    Lighting,
    LightingConfig,
    blackbody_rgb,
    direction,
    draw_lighting,
)
from wt_datagen.image.materials import albedo_layers, material_of, srgb_to_linear
from wt_datagen.image.mitsuba import MitsubaScene, finish
from wt_datagen.image.rgb import render_rgb
from wt_datagen.inputs.builtin import make_builtin_assets
from wt_datagen.schema import decode_files

CAMERA = Camera.look_at([0.3, 1.2, 2.2], [0, 0, 0], up=(0, 1, 0), width=80, height=60, fov_y_deg=50)


def test_drawn_lighting_is_a_pure_function_and_round_trips():
    cfg = LightingConfig()
    a = [draw_lighting(cfg, "random", 3, "asset", v, CAMERA, (0, 0, 0), 0.87) for v in range(12)]
    b = [draw_lighting(cfg, "random", 3, "asset", v, CAMERA, (0, 0, 0), 0.87) for v in range(12)]
    assert a == b
    assert all(Lighting.from_json(json.loads(json.dumps(x.to_json()))) == x for x in a)
    assert len({x.environment.kind for x in a}) >= 2 and len({len(x.lights) for x in a}) >= 2
    assert len({x.background.colour for x in a}) == 12  # a random background colour per view
    assert draw_lighting(cfg, "random", 4, "asset", 0, CAMERA, (0, 0, 0), 1) != a[0]
    for x in a:
        for light in x.lights:
            el = np.degrees(np.arcsin(light.direction[1]))
            assert cfg.light_elevation_deg[0] - 1e-6 <= el <= cfg.light_elevation_deg[1] + 1e-6
            assert cfg.light_intensity[0] <= light.intensity <= cfg.light_intensity[1]


def test_blackbody_colours():
    """Planck: warm light is red-heavy, daylight near white, a hot body blue-heavy; luminance 1."""
    warm, day, hot = blackbody_rgb(2700), blackbody_rgb(6500), blackbody_rgb(12000)
    assert warm[0] > 1.5 * warm[2] and hot[2] > 1.2 * hot[0]
    assert np.abs(day / day.max() - 1).max() < 0.1
    for c in (warm, day, hot):
        assert abs(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] - 1) < 1e-9


def _stage():
    """A grey floor (y = 0) and a box standing on it."""
    floor = trimesh.creation.box(extents=(4, 0.02, 4))
    floor.apply_translation([0, -0.01, 0])
    block = trimesh.creation.box(extents=(0.4, 0.6, 0.4))
    block.apply_translation([0, 0.3, 0])
    for m in (floor, block):
        m.visual = trimesh.visual.ColorVisuals(m, face_colors=np.tile([180, 180, 180, 255], (len(m.faces), 1)))
    return [floor, block]


def _sun(temperature=6500.0, elevation=40.0):
    d = tuple(float(x) for x in direction(np.radians(200.0), np.radians(elevation)))  # from behind the box
    return Lighting(Environment("constant", colour=(0.02, 0.02, 0.02)),
                    (Light("directional", d, tuple(blackbody_rgb(temperature)), 2.5, temperature),),
                    Background("colour"), True, (0.0, 0.2, 0.0), 1.0)


@pytest.mark.parametrize("renderer", ["pyrender", "mitsuba"])
def test_shadows_where_our_shadow_rays_are_blocked(renderer):
    """Floor pixels whose point cannot see the light (a shadow ray cast by our own caster is blocked) are
    far darker than floor pixels that can."""
    meshes = _stage()
    lighting = _sun()
    caster = LayeredRaycaster(meshes)
    hits = caster.cast(CAMERA, num_layers=1)
    floor = hits.valid[0] & (hits.instance_id[0] == 0)
    points = CAMERA.camera_to_world(hits.xyz[0][floor])
    d = np.broadcast_to(np.asarray(lighting.lights[0].direction), points.shape)
    blocked = caster.cast_rays(points + 1e-3 * d, d, num_layers=1).valid[0]
    assert 0.05 < blocked.mean() < 0.6  # a real shadow in view, and lit floor too
    if renderer == "pyrender":
        rgb = render_rgb(meshes, CAMERA, lighting=lighting)
    else:
        rgb = finish(MitsubaScene(meshes, [material_of(m) for m in meshes]).render(CAMERA, lighting, 16, 1),
                     lighting)
    grey = rgb[floor].astype(float).mean(-1)
    assert np.median(grey[blocked]) < 0.4 * np.median(grey[~blocked]), (renderer, np.median(grey[blocked]),
                                                                          np.median(grey[~blocked]))


@pytest.mark.parametrize("renderer", ["pyrender", "mitsuba"])
def test_light_colour_follows_its_temperature(renderer):
    meshes = _stage()
    caster = LayeredRaycaster(meshes)
    lit = caster.cast(CAMERA, num_layers=1).valid[0]
    ratios = []
    for temperature in (2700.0, 10000.0):
        lighting = _sun(temperature, elevation=80.0)
        if renderer == "pyrender":
            rgb = render_rgb(meshes, CAMERA, lighting=lighting)
        else:
            rgb = finish(MitsubaScene(meshes, [material_of(m) for m in meshes]).render(CAMERA, lighting, 8, 1),
                         lighting)
        mean = rgb[lit].astype(float).mean(0)
        ratios.append(mean[0] / mean[2])
    assert ratios[0] > 1.3 and ratios[1] < 0.95, ratios


def test_albedo_is_the_texel_on_every_layer():
    """Layer 0 on a textured quad: the texel's own colour at texel centres (the texture is the oracle);
    a hidden face-coloured quad behind it carries its colour on layer 1; nothing where invalid."""
    verts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], float)
    texels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], np.uint8)
    material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(texels), diffuse=[255] * 4)
    front = trimesh.Trimesh(verts, [[0, 1, 2], [0, 2, 3]], process=False,
                            visual=trimesh.visual.TextureVisuals(uv=(verts[:, :2] + 1) / 2, material=material))
    back = trimesh.Trimesh(verts * [2, 2, 1] - [0, 0, 1], [[0, 1, 2], [0, 2, 3]], process=False)
    back.visual = trimesh.visual.ColorVisuals(back, face_colors=[[10, 200, 30, 255]] * 2)
    camera = Camera.look_at([0, 0, 20], [0, 0, 0], up=(0, 1, 0), width=64, height=48, fov_y_deg=6)
    meshes = [front, back]
    hits = LayeredRaycaster(meshes).cast(camera, num_layers=3)
    albedo = albedo_layers([material_of(m) for m in meshes], meshes, hits)
    for (x, y), colour in {(-0.5, 0.5): (255, 0, 0), (0.5, 0.5): (0, 255, 0), (-0.5, -0.5): (0, 0, 255),
                           (0.5, -0.5): (255, 255, 0)}.items():
        u, v = camera.project(camera.world_to_camera([x, y, 0]))
        # the pixel centre lies within 2% of a texel of the texel's centre: compare in linear light
        got = srgb_to_linear(albedo[0, int(v), int(u)] / 255.0)
        assert np.abs(got - np.asarray(colour) / 255.0).max() <= 0.03, (colour, albedo[0, int(v), int(u)])
    behind = hits.valid[1] & (hits.instance_id[1] == 1)
    assert behind.sum() > 100 and (albedo[1][behind] == (10, 200, 30)).all()
    assert not albedo[~hits.valid].any()


def _config(tmp_path: Path, **image) -> Path:
    cfg = {"views": 2, "resolution": 48, "layers": 3, "image": image, "outputs": {"albedo": True},
           "shards": {"max_samples": 100}}
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    make_builtin_assets(out)
    return out


def _samples(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return [dict(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_transparent_images_end_to_end_and_rerendered_from_meta(assets, tmp_path):
    """background: transparent gives RGBA rgb.png whose alpha is layer 0's coverage (pyrender: binary); the
    decoder, the inspector and the model loader take it; meta.json's lighting renders the same bits again."""
    from wt_datagen.inputs.assets import asset_to_world, load_asset
    from wt_datagen.inspect.summary import validate
    from wt_model.data import decode_sample

    out = tmp_path / "out"
    assert cli_main(["render", str(assets), "--config", str(_config(tmp_path, background="transparent")),
                     "--out", str(out), "--limit", "2"]) == 0
    samples = _samples(out)
    assert len(samples) == 4
    for raw in samples:
        files = {k: v for k, v in raw.items() if not k.startswith("__")}
        d = decode_files(files)
        rgba, L = d["rgb"], d["layers"]
        assert rgba.shape == (48, 48, 4) and L["albedo"].shape == (3, 48, 48, 3)
        assert np.array_equal(rgba[..., 3] == 255, L["valid"][0]) and set(np.unique(rgba[..., 3])) <= {0, 255}
        assert decode_sample(raw, 32, 3)["rgb"].shape == (3, 32, 32)
        meta = d["meta"]
        lighting = Lighting.from_json(meta["image"]["lighting"])
        asset = load_asset(assets / meta["asset_path"], assets)
        to_world = asset_to_world(asset.meshes)
        meshes = [m.apply_transform(to_world) for m in asset.meshes]
        camera = Camera.from_json(d["camera"])
        hits = LayeredRaycaster(meshes).cast(camera, num_layers=1)  # the pipeline's near plane comes from them
        again = render_rgb(meshes, camera, lighting=lighting, hits=hits)
        assert np.array_equal(again, rgba), np.abs(again.astype(int) - rgba).max()
    assert validate(out) == []


def test_mitsuba_shards_identical_for_one_or_two_workers(assets, tmp_path):
    cfg = _config(tmp_path, renderer="mitsuba", spp=4, background="random")
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert cli_main(["render", str(assets), "--config", str(cfg), "--out", str(out), "--limit", "2",
                         "--workers", workers]) == 0
        outs.append(out)
    tars = [sorted(o.glob("shard-*.tar")) for o in outs]
    assert [p.name for p in tars[0]] == [p.name for p in tars[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*tars))
    meta = json.loads(_samples(outs[0])[0]["meta.json"])
    assert meta["image"]["renderer"] == "mitsuba" and meta["image"]["variant"] == "scalar_rgb"


def test_bad_lighting_input_fails_at_start_up_in_one_line(assets, tmp_path, capsys):
    envs = tmp_path / "envs"
    envs.mkdir()
    Image.fromarray(np.full((8, 16, 3), 128, np.uint8)).save(envs / "good.png")
    (envs / "broken.hdr").write_bytes(b"#?RADIANCE\nnot really\n")
    code = cli_main(["render", str(assets), "--config", str(_config(tmp_path, environments=str(envs))),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "broken.hdr" in err[0] and "environment image" in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("shard-*"))
    code = cli_main(["render", str(assets), "--config", str(_config(tmp_path, environments=str(tmp_path / "no"))),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    code = cli_main(["render", str(assets), "--config", str(_config(tmp_path, renderer="blender")),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "image.renderer" in err[0]


def test_environment_images_light_the_view(assets, tmp_path):
    """An image environment is drawn from the folder, recorded by name and hash, and lights the object:
    a red-above / blue-below map makes surfaces facing up redder than those facing down, in Mitsuba and
    pyrender alike (pyrender: the map's mean as ambient plus its brightest region as a directional light)."""
    envs = tmp_path / "envs"
    envs.mkdir()
    img = np.zeros((16, 32, 3), np.uint8)
    img[:8, :, 0] = 255
    img[8:, :, 2] = 255
    Image.fromarray(img).save(envs / "red_sky.png")
    sphere = tmp_path / "sphere"
    shutil.copytree(assets / "nested_shells", sphere / "nested_shells")  # normals every way
    for renderer in ("pyrender", "mitsuba"):
        cfg = _config(tmp_path, renderer=renderer, environments=str(envs), spp=8, background="environment",
                      lighting={"environment_kinds": ["image"], "lights": [0, 0]})
        out = tmp_path / renderer
        assert cli_main(["render", str(sphere), "--config", str(cfg), "--out", str(out)]) == 0
        checked = 0
        for raw in _samples(out):
            d = decode_files({k: v for k, v in raw.items() if not k.startswith("__")})
            env = d["meta"]["image"]["lighting"]["environment"]
            assert env["kind"] == "image" and env["file"] == "red_sky.png" and len(env["sha256"]) == 64
            normal, valid = d["layers"]["normal"][0].astype(float), d["layers"]["valid"][0]
            R = np.asarray(d["camera"]["world_to_cam"])[:3, :3]
            ny = (normal @ R)[..., 1]  # world y of the normal
            up, down = valid & (ny > 0.5), valid & (ny < -0.5)
            rgb = d["rgb"].astype(float) + 1.0
            if up.sum() > 5 and down.sum() > 5:  # facing the red sky: redder than facing the blue ground
                ratio_up = np.median(rgb[up][:, 0] / rgb[up][:, 2])
                ratio_down = np.median(rgb[down][:, 0] / rgb[down][:, 2])
                assert ratio_up > 1.3 * ratio_down, (renderer, ratio_up, ratio_down)
                checked += 1
        assert checked >= 1, renderer
