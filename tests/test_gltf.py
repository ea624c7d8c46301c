"""glTF/GLB as Objaverse ships it, written by the tests themselves (pygltflib, DracoPy, trimesh's exporter) and
checked against the glTF 2.0 specification's formulas written out here (node transforms, KHR_texture_transform,
normalised integers, strips and fans), not against the reader's own code."""

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial.transform import Rotation

from tests.gltf_files import Doc, quad
from wt_datagen.camera import Camera
from wt_datagen.geometry.cast import LayeredRaycaster
from wt_datagen.image.rgb import AMBIENT, render_rgb
from wt_datagen.inputs.assets import AssetError, load_asset

# pygltflib warns about images stored in buffer views (no uri), which glTF allows
pytestmark = pytest.mark.filterwarnings("ignore:'NoneType' object value of non-optional type uri")


def trs(t=(0, 0, 0), q=(0, 0, 0, 1), s=(1, 1, 1)) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3] = Rotation.from_quat(q).as_matrix() @ np.diag(s)
    M[:3, 3] = t
    return M


def test_pbr_factors_textures_vertex_colours_and_texture_transform(tmp_path):
    d = Doc()
    v, f, uv0 = quad()
    uv1 = np.array([[0.1, 0.2], [0.7, 0.25], [0.65, 0.9], [0.05, 0.8]], np.float32)
    colour = np.full((4, 8, 8, 4), 255, np.uint8)[0]
    colour[..., :3] = (200, 100, 50)
    base = d.image(colour, {"wrapS": 33071, "wrapT": 33648})  # clamp, mirrored repeat
    mr = d.image(np.full((4, 4, 4), 128, np.uint8))
    emissive = d.image(np.full((4, 4, 4), 255, np.uint8))
    tt = {"offset": [0.25, -0.5], "rotation": 0.6, "scale": [2.0, 0.5]}
    mat = d.material(
        pbrMetallicRoughness={"baseColorFactor": [0.5, 0.8, 1.0, 1.0], "metallicFactor": 0.25,
                              "roughnessFactor": 0.75,
                              "baseColorTexture": {"index": base, "texCoord": 1,
                                                   "extensions": {"KHR_texture_transform": tt}},
                              "metallicRoughnessTexture": {"index": mr, "texCoord": 1,
                                                           "extensions": {"KHR_texture_transform": tt}}},
        emissiveFactor=[0.2, 0.1, 0.0], emissiveTexture={"index": emissive, "texCoord": 0},
        extensions={"KHR_materials_emissive_strength": {"emissiveStrength": 3.0}})
    vc = np.array([[65535, 32768, 0, 65535]] * 4, np.uint16)
    prim = d.primitive(v, f, mat, TEXCOORD_0=(uv0, False), TEXCOORD_1=(uv1, False), COLOR_0=(vc, True))
    d.node(mesh=d.mesh([prim]), name="plate")
    d.doc["extensionsUsed"] = ["KHR_texture_transform", "KHR_materials_emissive_strength"]
    asset = load_asset(d.save_glb(tmp_path / "pbr.glb"), tmp_path)
    (mesh,) = asset.meshes
    assert asset.names == ["plate"] and asset.warnings == []
    # KHR_texture_transform: uv' = T(offset) R(rotation) S(scale) uv on the named set, then v flipped
    c, s = np.cos(0.6), np.sin(0.6)
    M = np.array([[1, 0, 0.25], [0, 1, -0.5], [0, 0, 1]]) @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) @ np.diag(
        [2.0, 0.5, 1])
    expected = (np.column_stack([uv1, np.ones(4)]) @ M.T)[:, :2]
    np.testing.assert_allclose(mesh.visual.uv, np.column_stack([expected[:, 0], 1 - expected[:, 1]]), atol=1e-6)
    m = mesh.visual.material
    np.testing.assert_array_equal(m.baseColorFactor, np.round(np.array([0.5, 0.8, 1.0, 1.0]) * 255))
    assert (m.metallicFactor, m.roughnessFactor) == (0.25, 0.75)
    np.testing.assert_allclose(m.emissiveFactor, [0.6, 0.3, 0.0])  # times the strength
    assert m.metallicRoughnessTexture is not None  # same uv set and transform as the base colour
    assert m.emissiveTexture is None  # another uv set: its factor alone
    assert mesh.metadata["texture_wrap"] == ("clamp", "mirror")
    np.testing.assert_array_equal(mesh.vertex_attributes["color"], [[255, 128, 0, 255]] * 4)
    # the ray-traced image: texel x factor x vertex colour, head-on Lambert (1.0)
    cam = Camera.look_at((0.5, 0.5, 3), (0.5, 0.5, 0), width=16, height=16, fov_y_deg=10)
    hits = LayeredRaycaster(asset.meshes).cast(cam, 1)
    assert hits.valid[0].all()
    rgb = render_rgb(asset.meshes, cam, mode="raytrace", hits=hits).astype(float)
    cos = np.abs(hits.normal[0] @ np.array([0, 0, 1.0]))  # normals are camera space: the view axis is z
    shade = (AMBIENT + (1 - AMBIENT) * cos)[..., None]
    want = np.array([200, 100, 50]) / 255 * np.round(np.array([0.5, 0.8, 1.0]) * 255) / 255 * [1, 128 / 255, 0]
    np.testing.assert_allclose(rgb, np.round(want * 255 * shade), atol=1)


def cube_halves():
    box = trimesh.creation.box(extents=(1, 1, 1))
    return np.asarray(box.vertices, np.float32), np.asarray(box.faces[:6]), np.asarray(box.faces[6:])


def test_node_hierarchy_scales_instancing_and_primitives(tmp_path):
    d = Doc()
    v, fa, fb = cube_halves()
    prims = [d.primitive(v, fa), d.primitive(v, fb)]  # one mesh, two primitives
    mesh = d.mesh(prims)
    q = Rotation.from_euler("z", 90, degrees=True).as_quat()
    child = d.node(root=False, mesh=mesh, name="arm", rotation=q.tolist(), translation=[1, 0, 0])
    d.node(name="base", scale=[2, 2, 2], translation=[0, 5, 0], children=[child])
    mirror = trs(t=(0, 0, -4), s=(-1, 1, 1))
    d.node(name="mirrored", mesh=mesh, matrix=mirror.T.reshape(-1).tolist())  # column-major
    offsets = np.array([[10, 0, 0], [20, 0, 0], [30, 0, 0]], np.float32)
    d.node(name="crowd", mesh=mesh, extensions={"EXT_mesh_gpu_instancing": {
        "attributes": {"TRANSLATION": d.accessor(offsets)}}})
    d.doc["extensionsUsed"] = d.doc["extensionsRequired"] = ["EXT_mesh_gpu_instancing"]
    asset = load_asset(d.save_glb(tmp_path / "tree.glb"), tmp_path)
    expected = {"arm": trs((0, 5, 0), s=(2, 2, 2)) @ trs((1, 0, 0), q), "mirrored": mirror,
                **{f"crowd#{j}": trs(offsets[j]) for j in range(3)}}
    assert sorted(asset.names) == sorted(f"{n}/{k}" for n in expected for k in range(2))
    for name, mesh_ in zip(asset.names, asset.meshes):
        node, k = name.rsplit("/", 1)
        T = expected[node]
        want = v @ T[:3, :3].T + T[:3, 3]
        np.testing.assert_allclose(mesh_.vertices, want, atol=1e-5)
    # winding: each instance's two halves close a cube; its signed volume is positive (outward normals),
    # mirrored included (glTF turns the winding under a negative determinant)
    by_node = {}
    for name, mesh_ in zip(asset.names, asset.meshes):
        by_node.setdefault(name.rsplit("/", 1)[0], []).append(mesh_)
    for node, parts in by_node.items():
        whole = trimesh.util.concatenate(parts)
        whole.merge_vertices()
        scale = abs(np.linalg.det(expected[node][:3, :3]))
        assert whole.is_watertight and np.isclose(whole.volume, scale), (node, whole.volume)


def test_draco_compressed_primitives_decode(tmp_path):
    import DracoPy

    sphere = trimesh.creation.icosphere(subdivisions=3)
    pts = np.asarray(sphere.vertices, np.float32)
    uv = (pts[:, :2] * 0.5 + 0.5).astype(np.float32)
    colours = (np.abs(pts) * 255).astype(np.uint8)
    colours = np.column_stack([colours, np.full(len(pts), 255, np.uint8)])
    blob = DracoPy.encode(pts, sphere.faces.astype(np.uint32), preserve_order=True, quantization_bits=16,
                          tex_coord=uv.astype(np.float64), colors=colours)
    ids = {a["attribute_type"]: a["unique_id"] for a in DracoPy.decode(blob).attributes}
    d = Doc()
    view = d.view(blob)
    n, nf = len(pts), len(sphere.faces)
    d.doc["accessors"] += [{"componentType": 5126, "count": n, "type": "VEC3", "min": pts.min(0).tolist(),
                            "max": pts.max(0).tolist()},
                           {"componentType": 5126, "count": n, "type": "VEC2"},
                           {"componentType": 5121, "count": n, "type": "VEC4", "normalized": True},
                           {"componentType": 5125, "count": nf * 3, "type": "SCALAR"}]
    tex = d.image(np.full((4, 4, 4), 255, np.uint8))
    mat = d.material(pbrMetallicRoughness={"baseColorTexture": {"index": tex}})
    prim = {"attributes": {"POSITION": 0, "TEXCOORD_0": 1, "COLOR_0": 2}, "indices": 3, "material": mat,
            "extensions": {"KHR_draco_mesh_compression": {
                "bufferView": view, "attributes": {"POSITION": ids[DracoPy.AttributeType.POSITION],
                                                   "TEXCOORD_0": ids[DracoPy.AttributeType.TEX_COORD],
                                                   "COLOR_0": ids[DracoPy.AttributeType.COLOR]}}}}
    d.node(mesh=d.mesh([prim]), name="ball")
    d.doc["extensionsUsed"] = d.doc["extensionsRequired"] = ["KHR_draco_mesh_compression"]
    asset = load_asset(d.save_glb(tmp_path / "draco.glb"), tmp_path)
    (mesh,) = asset.meshes
    np.testing.assert_array_equal(mesh.faces, sphere.faces)  # order preserved
    step = np.ptp(pts, axis=0).max() / (2**16 - 1)
    assert np.abs(mesh.vertices - pts).max() <= step
    np.testing.assert_allclose(mesh.visual.uv, np.column_stack([uv[:, 0], 1 - uv[:, 1]]), atol=1e-4)
    np.testing.assert_array_equal(mesh.vertex_attributes["color"], colours)
    # trimesh's own Draco exporter (another writer) reads back too
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(extents=(1, 2, 3)), node_name="brick")
    data = trimesh.exchange.gltf.export_glb(scene, extension_draco=True)
    assert b"KHR_draco_mesh_compression" in data
    (tmp_path / "trimesh_draco.glb").write_bytes(data)
    (brick,) = load_asset(tmp_path / "trimesh_draco.glb", tmp_path).meshes
    np.testing.assert_allclose(brick.extents, (1, 2, 3), atol=1e-3)
    assert brick.is_watertight


def test_quantized_sparse_strips_and_fans(tmp_path):
    d = Doc()
    q = np.array([[0, 0, 0], [32767, 0, 0], [0, 32767, 0], [32767, 32767, 0], [0, 0, 32767]], np.int16)
    pos = d.accessor(q, normalized=True)
    d.doc["accessors"][pos]["min"], d.doc["accessors"][pos]["max"] = [0, 0, 0], [32767, 32767, 32767]
    # sparse: vertex 3 moved to (-1, -1, 0) by a sparse substitution
    idx_view = d.view(np.array([3], np.uint16).tobytes())
    val_view = d.view(np.array([[-32767, -32767, 0]], np.int16).tobytes())
    d.doc["accessors"][pos]["sparse"] = {"count": 1, "indices": {"bufferView": idx_view, "componentType": 5123},
                                         "values": {"bufferView": val_view}}
    strip = {"attributes": {"POSITION": pos}, "indices": d.accessor(np.array([0, 1, 2, 3], np.uint16)), "mode": 5}
    fan = {"attributes": {"POSITION": pos}, "indices": d.accessor(np.array([4, 0, 1, 2], np.uint8)), "mode": 6}
    lines = {"attributes": {"POSITION": pos}, "mode": 1}  # no surface: left out
    d.node(mesh=d.mesh([strip, fan, lines]), name="q", scale=[4, 4, 4])
    d.doc["extensionsUsed"] = d.doc["extensionsRequired"] = ["KHR_mesh_quantization"]
    asset = load_asset(d.save_glb(tmp_path / "q.glb"), tmp_path)
    assert asset.names == ["q/0", "q/1"]
    want = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, -1, 0], [0, 0, 1]], float) * 4
    for mesh in asset.meshes:
        np.testing.assert_allclose(mesh.vertices, want, atol=1e-6)
    # strip 0 1 2 3: (0 1 2), then (2 1 3) (every other one reversed); fan 4 0 1 2: (4 0 1), (4 1 2)
    np.testing.assert_array_equal(asset.meshes[0].faces, [[0, 1, 2], [2, 1, 3]])
    np.testing.assert_array_equal(asset.meshes[1].faces, [[4, 0, 1], [4, 1, 2]])


@pytest.mark.parametrize("extension, why", [("EXT_meshopt_compression", "meshoptimizer"),
                                            ("KHR_texture_basisu", "KTX2"), ("VENDOR_made_up", "not supported")])
def test_an_unusable_required_extension_is_a_one_line_skip(tmp_path, extension, why):
    d = Doc()
    v, f, _ = quad()
    d.node(mesh=d.mesh([d.primitive(v, f)]))
    d.doc["extensionsUsed"] = d.doc["extensionsRequired"] = [extension]
    with pytest.raises(AssetError) as e:
        load_asset(d.save_glb(tmp_path / "x.glb"), tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"x.glb: unsupported required glTF extension {extension}") and why in msg
    assert "\n" not in msg
    d.doc["extensionsRequired"] = []  # only used: read as plain glTF
    d.doc["extensionsUsed"] = [extension, "KHR_materials_clearcoat"]
    assert load_asset(d.save_glb(tmp_path / "y.glb"), tmp_path).num_faces == 2


def test_face_cap_is_checked_before_anything_is_decoded(tmp_path):
    d = Doc()
    sphere = trimesh.creation.icosphere(subdivisions=3)  # 1280 faces
    mesh = d.mesh([d.primitive(sphere.vertices, sphere.faces)])
    for i in range(100):
        d.node(mesh=mesh, translation=[3.0 * i, 0, 0])
    path = d.save_glb(tmp_path / "forest.glb")
    with pytest.raises(AssetError, match=r"forest.glb: too many triangles \(128000 > cap 100000\)"):
        load_asset(path, tmp_path, max_faces=100_000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the geometry cut off: the count still comes first
    with pytest.raises(AssetError, match=r"too many triangles \(128000 > cap 100000\)"):
        load_asset(path, tmp_path, max_faces=100_000)
    with pytest.raises(AssetError, match="forest.glb: cannot load"):
        load_asset(path, tmp_path, max_faces=200_000)


def test_gltf_with_external_buffer_missing_texture_and_buffer(tmp_path):
    d = Doc()
    v, f, uv = quad()
    d.doc["images"].append({"uri": "textures/gone.png"})
    d.doc["textures"].append({"source": 0})
    mat = d.material(pbrMetallicRoughness={"baseColorTexture": {"index": 0}, "baseColorFactor": [1, 0, 0, 1]})
    d.node(mesh=d.mesh([d.primitive(v, f, mat, TEXCOORD_0=(uv, False))]), name="sheet")
    path = d.save_gltf(tmp_path / "sheet.gltf")
    asset = load_asset(path, tmp_path)
    assert asset.warnings == ["missing texture file textures/gone.png: rendered untextured"]
    assert asset.meshes[0].visual.material.baseColorTexture is None
    np.testing.assert_array_equal(asset.meshes[0].visual.material.baseColorFactor, [255, 0, 0, 255])
    with pytest.raises(AssetError, match="textures/gone.png"):
        load_asset(path, tmp_path, missing_texture="skip")
    (tmp_path / "textures").mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "textures" / "gone.png")
    assert load_asset(path, tmp_path).warnings == []
    path.with_suffix(".bin").unlink()
    with pytest.raises(AssetError, match=r"sheet.gltf: cannot load \(missing buffer file sheet.bin\)"):
        load_asset(path, tmp_path)
