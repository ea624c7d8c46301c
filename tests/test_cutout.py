"""Alpha cutouts (glTF alphaMode MASK, and the BLEND policy) in the caster's layers and in the image.

Oracles: a checkerboard alpha texture on stacked quads, where bilinear alpha >= 0.5 holds exactly on the opaque
cells (so counts and depths are known per ray), the wrap modes' closed forms along u, and the image's coverage
and colours against the caster's layer 0 for a glb written here."""

import json

import numpy as np
import pytest
import trimesh
import webdataset as wds
from PIL import Image

from tests.gltf_files import Doc, quad
from wt_datagen.cli import main
from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.geometry.cutout import Cutout, cutouts_for
from wt_datagen.inputs.assets import BLEND_CUTOFF, load_asset

pytestmark = pytest.mark.filterwarnings("ignore:'NoneType' object value of non-optional type uri")
N = 4  # checkerboard cells per side


def checker_alpha() -> np.ndarray:
    i, j = np.meshgrid(range(N), range(N), indexing="ij")
    rgba = np.full((N, N, 4), 255, np.uint8)
    rgba[..., 3] = np.where((i + j) % 2 == 0, 255, 0)  # row i from the top
    return rgba


def textured_quad(z: float, rgba: np.ndarray | None, mode: str = "MASK", uv=None) -> trimesh.Trimesh:
    v = np.array([[0, 0, z], [1, 0, z], [1, 1, z], [0, 1, z]], float)
    m = trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], process=False)
    if rgba is not None:
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(rgba), alphaMode=mode,
                                                       alphaCutoff=0.5)
        m.visual = trimesh.visual.TextureVisuals(uv=v[:, :2].copy() if uv is None else uv, material=material)
    return m


def down_rays(n: int, seed: int = 0):
    xy = np.random.default_rng(seed).random((n, 2)) * 0.98 + 0.01
    xy = xy[(np.abs(xy * N - np.round(xy * N)) > 1e-3).all(1)]  # off the cell borders
    return xy, np.column_stack([xy, np.full(len(xy), 10.0)]), np.tile([0, 0, -1.0], (len(xy), 1))


def test_checkerboard_cutouts_give_exact_counts_depths_and_truncation():
    # five cut-out quads at z = 4..0 above an opaque one at z = -1; rays straight down
    meshes = [textured_quad(float(z), checker_alpha()) for z in range(4, -1, -1)] + [textured_quad(-1.0, None)]
    cutouts = cutouts_for(meshes)
    assert [c is not None for c in cutouts] == [True] * 5 + [False]
    caster = LayeredRaycaster(meshes, cutouts=cutouts)
    xy, o, d = down_rays(4000)
    col, row = np.floor(xy[:, 0] * N).astype(int), np.floor((1 - xy[:, 1]) * N).astype(int)
    opaque = (row + col) % 2 == 0
    for K in (1, 3, 6, 8):
        h = caster.cast_rays(o, d, K)
        assert np.array_equal(h.num_hits, np.where(opaque, 6, 1))  # counted after the cut, before truncation
        assert np.array_equal(h.valid.sum(0), np.minimum(h.num_hits, K))
        np.testing.assert_allclose(h.depth[0], np.where(opaque, 6.0, 11.0), rtol=1e-6)
        assert np.array_equal(h.instance_id[0], np.where(opaque, 0, 5))
        if K >= 6:
            want = np.broadcast_to(np.arange(6, 12)[:, None], (6, opaque.sum()))
            np.testing.assert_allclose(h.depth[:6, opaque], want, rtol=1e-6)
            assert (h.face_id[~h.valid] == -1).all() and (h.depth[~h.valid] == 0).all()
    # without cutouts every quad is crossed
    assert (LayeredRaycaster(meshes).cast_rays(o, d, 2).num_hits == 6).all()


@pytest.mark.parametrize("wrap, keep", [
    ("clamp", lambda u: u <= 0.5),
    ("repeat", lambda u: (u % 1.0) <= 0.5),
    ("mirror", lambda u: np.where((u % 2.0) < 1.0, u % 2.0 <= 0.5, u % 2.0 >= 1.5)),
])
def test_wrap_modes_follow_their_closed_forms(wrap, keep):
    rgba = np.full((1, 2, 4), 255, np.uint8)
    rgba[0, 1, 3] = 0  # left texel opaque, right one transparent: alpha = 0.5 at u = 0.5 (and its images)
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    uv = np.column_stack([v[:, 0] * 4 - 1.5, v[:, 1]])  # u runs from -1.5 to 2.5 across the quad
    mesh = textured_quad(0.0, rgba, uv=uv)
    mesh.metadata["texture_wrap"] = (wrap, "repeat")
    cutout = Cutout.from_mesh(mesh)
    rng = np.random.default_rng(1)
    x = rng.random(3000)
    u = x * 4 - 1.5
    x = x[np.abs(u * 2 - np.round(u * 2)) > 1e-3]  # off the decision points
    o = np.column_stack([x, np.full(len(x), 0.5), np.full(len(x), 1.0)])
    h = LayeredRaycaster([mesh], cutouts=[cutout]).cast_rays(o, np.tile([0, 0, -1.0], (len(x), 1)), 1)
    assert np.array_equal(h.num_hits == 1, keep(x * 4 - 1.5))


def test_blend_policy_and_material_factors(tmp_path):
    d = Doc()
    v, f, uv = quad()
    half = np.full((2, 8, 4), 255, np.uint8)
    half[:, 4:, 3] = 0  # the right half fully transparent
    glass = d.material(alphaMode="BLEND", pbrMetallicRoughness={"baseColorFactor": [1, 1, 1, 0.3]})
    leaves = d.material(alphaMode="BLEND", pbrMetallicRoughness={
        "baseColorTexture": {"index": d.image(half, {"wrapS": 33071, "wrapT": 33071})}})
    faint = d.material(alphaMode="MASK", alphaCutoff=0.6, pbrMetallicRoughness={"baseColorFactor": [1, 1, 1, 0.5]})
    d.node(mesh=d.mesh([d.primitive(v, f, glass, TEXCOORD_0=(uv, False))]), name="a_glass")
    d.node(mesh=d.mesh([d.primitive(v, f, leaves, TEXCOORD_0=(uv, False))]), name="b_leaves",
           translation=[0, 0, -1])
    d.node(mesh=d.mesh([d.primitive(v, f, faint)]), name="c_faint", translation=[0, 0, -2])
    asset = load_asset(d.save_glb(tmp_path / "blend.glb"), tmp_path)
    assert asset.names == ["a_glass", "b_leaves", "c_faint"]
    glass_c, leaves_c, faint_c = (Cutout.from_mesh(m) for m in asset.meshes)
    assert glass_c is None  # alpha 0.3: a surface (the policy cuts only fully transparent texels)
    assert leaves_c is not None and leaves_c.cutoff == BLEND_CUTOFF
    assert faint_c is not None and faint_c.alpha is None  # 0.5 < 0.6: no surface at all
    xy, o, dirs = down_rays(2000)
    # texel x = 8u - 0.5: alpha falls from 1 at x = 3 to 0 at x = 4 (then 0, clamped), kept while >= cutoff
    edge = (4 - BLEND_CUTOFF + 0.5) / 8
    off = np.abs(xy[:, 0] - edge) > 1e-4
    h = LayeredRaycaster(asset.meshes, cutouts=cutouts_for(asset.meshes)).cast_rays(o[off], dirs[off], 4)
    assert np.array_equal(h.num_hits, np.where(xy[off, 0] < edge, 2, 1))


@pytest.fixture(scope="module")
def mask_asset(tmp_path_factory):
    """A red quad with checkerboard holes (MASK) before a green box, as a glb."""
    root = tmp_path_factory.mktemp("mask")
    d = Doc()
    v, f, uv = quad(2.0, 0.6)
    v[:, :2] -= 1.0
    rgba = np.zeros((8, 8, 4), np.uint8)
    i, j = np.meshgrid(range(8), range(8), indexing="ij")
    rgba[..., 0], rgba[..., 3] = 255, np.where((i + j) % 2 == 0, 255, 0)
    red = d.material(alphaMode="MASK", alphaCutoff=0.5, doubleSided=True,
                     pbrMetallicRoughness={"baseColorTexture": {"index": d.image(rgba)}, "metallicFactor": 0.0})
    d.node(mesh=d.mesh([d.primitive(v, f, red, TEXCOORD_0=(uv, False))]), name="fence")
    box = trimesh.creation.box(extents=(1.5, 1.5, 0.5))
    green = d.material(pbrMetallicRoughness={"baseColorFactor": [0, 1, 0, 1], "metallicFactor": 0.0})
    d.node(mesh=d.mesh([d.primitive(box.vertices, box.faces, green)]), name="wall")
    d.save_glb(root / "fence.glb")
    return root


@pytest.mark.parametrize("renderer", ["pyrender", "raytrace"])
def test_image_coverage_matches_layer_zero_through_cutouts(mask_asset, tmp_path, renderer):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"views": 4, "resolution": 64, "layers": 4, "image": {"renderer": renderer},
                                  "cameras": {"elevation_deg": [-15, 15], "radius": [1.6, 2.0]}}))
    out = tmp_path / "out"
    assert main(["render", str(mask_asset), "--config", str(config), "--out", str(out)]) == 0
    samples = list(wds.WebDataset(sorted(map(str, out.glob("*.tar"))), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 4
    inter = union = agree = total = holes = 0
    for s in samples:
        rgb, L = s["rgb.png"], s["layers.npz"]
        names = s["meta.json"]["instance_names"]
        fg, v0 = rgb.any(-1), L["valid"][0]
        inter += (fg & v0).sum()
        union += (fg | v0).sum()
        fence = L["instance_id"][0] == names.index("fence")
        red = rgb[..., 0].astype(int) > rgb[..., 1]
        agree += (red == fence)[v0].sum()
        total += v0.sum()
        holes += (v0 & ~fence & (L["num_hits"] >= 1)).sum()
    assert holes > 0.1 * total  # the wall is seen through the holes
    if renderer == "raytrace":
        assert inter == union and agree == total  # a shading of layer 0: exact
    else:
        assert inter / union >= 0.99 and agree / total >= 0.97, (inter / union, agree / total)
