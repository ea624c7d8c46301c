"""Asset discovery, validated loading (one-line reasons), normalisation and the built-in assets."""

import argparse
import os
from pathlib import Path

import numpy as np
import pybullet_data
import pytest
import trimesh
from PIL import Image

from wt_datagen import LayeredRaycaster
from wt_datagen.inputs.assets import AssetError, asset_id_for, asset_to_world, discover_assets, load_asset
from wt_datagen.inputs.builtin import make_builtin_assets, run

PYBULLET = Path(pybullet_data.getDataPath())
TRI = "v 0 0 0\nv 1 0 0\nv 0 1 0\n"

# file name -> (contents, words the one-line reason must contain)
BAD = {
    "nan.obj": ("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n", "NaN"),
    "inf.ply": (
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0\n1 0 inf\n0 1 0\n3 0 1 2\n",
        "NaN/inf",
    ),
    "range.ply": (
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
        "out of range",
    ),
    "range.obj": (TRI + "f 1 2 9\n", "out of range"),
    "empty.obj": ("", "no triangles"),
    "points.obj": (TRI, "no triangles"),
    "empty.stl": ("solid x\nendsolid x\n", "no triangles"),
    "junk.glb": ("this is not a glb file", "cannot load"),
    "short.ply": (
        "ply\nformat binary_little_endian 1.0\nelement vertex 300\nproperty float x\nend_header\n\x01",
        "cannot load",
    ),
    "nomtl.obj": ("mtllib gone.mtl\n" + TRI + "f 1 2 3\n", "missing material library gone.mtl"),
    "notex.obj": (
        "mtllib notex.mtl\n" + TRI + "vt 0 0\nvt 1 0\nvt 0 1\nusemtl a\nf 1/1 2/2 3/3\n",
        "missing texture file gone.png",
    ),
    "zero.obj": ("v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n", "zero size"),
}


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    return out, make_builtin_assets(out)


def test_discover_finds_mesh_files_only_sorted(tmp_path):
    for rel in [
        "b/z.obj",
        "b/z.mtl",
        "b/tex.png",
        "a.GLB",
        "c/d/e.ply",
        "s.stl",
        "o.off",
        "g.gltf",
        "x.bin",
        "notes.txt",
        ".hidden/h.obj",
        "c/.h.obj",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "link.obj").symlink_to(tmp_path / "nowhere.obj")  # reported when loaded, not hidden
    found = [p.relative_to(tmp_path).as_posix() for p in discover_assets(tmp_path)]
    assert found == ["a.GLB", "b/z.obj", "c/d/e.ply", "g.gltf", "link.obj", "o.off", "s.stl"]
    with pytest.raises(AssetError, match="does not exist"):
        discover_assets(tmp_path / "missing")
    with pytest.raises(AssetError, match="link.obj: file not found"):
        load_asset(tmp_path / "link.obj", tmp_path)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_asset_one_line_reason(tmp_path, name):
    text, reason = BAD[name]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / name).write_bytes(text.encode("latin-1"))
    (tmp_path / "sub" / "notex.mtl").write_text("newmtl a\nKd 1 1 1\nmap_Kd -s 1 1 1 gone.png\n")
    with pytest.raises(AssetError) as info:  # "skip": a missing texture is an error too
        load_asset(tmp_path / "sub" / name, tmp_path, missing_texture="skip")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg and msg.startswith(f"sub/{name}: ") and reason in msg, msg


def test_face_cap_and_good_small_files(tmp_path):
    (tmp_path / "ok.obj").write_text(TRI + "v 1 1 0\nf 1 2 3\nf 2 4 3\n")
    (tmp_path / "ok.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    assert load_asset(tmp_path / "ok.obj", tmp_path, max_faces=2).num_faces == 2
    with pytest.raises(AssetError, match=r"ok.obj: too many triangles \(2 > cap 1\)"):
        load_asset(tmp_path / "ok.obj", tmp_path, max_faces=1)
    a = load_asset(tmp_path / "ok.off", tmp_path)
    assert a.asset_id == "ok_off" and len(a.meshes) == 1 and len(a.sha256) == 64


def test_asset_ids_are_keys():
    assert asset_id_for("mugs/mug.obj") == "mugs__mug_obj"
    assert asset_id_for("a b/c.d.glb").startswith("a_b__c_d_glb-")  # not plain: a hash of the path appended
    assert asset_id_for("x.obj") != asset_id_for("x.ply")


def test_obj_groups_and_glb_nodes_are_instances(tmp_path):
    (tmp_path / "two.obj").write_text(
        "o first\n" + TRI + "f 1 2 3\no second\nv 0 0 1\nv 1 0 1\nv 0 1 1\nf 4 5 6\n"
    )
    a = load_asset(tmp_path / "two.obj", tmp_path)
    assert a.names == ["first", "second"]
    assert [m.bounds[0, 2] for m in a.meshes] == [0, 1]
    # a glb scene with one geometry instanced twice under different transforms
    scene = trimesh.Scene()
    box = trimesh.creation.box(extents=(1, 1, 1))
    scene.add_geometry(
        box,
        node_name="left",
        geom_name="box",
        transform=trimesh.transformations.translation_matrix([-2, 0, 0]),
    )
    scene.add_geometry(
        box,
        node_name="right",
        geom_name="box",
        transform=trimesh.transformations.translation_matrix([3, 0, 0]),
    )
    scene.export(tmp_path / "two.glb")
    b = load_asset(tmp_path / "two.glb", tmp_path)
    assert sorted(b.names) == ["left", "right"]
    centres = sorted(m.bounds.mean(axis=0)[0] for m in b.meshes)
    np.testing.assert_allclose(centres, [-2, 3], atol=1e-6)
    T = asset_to_world(b.meshes)
    lo = np.min([m.copy().apply_transform(T).bounds[0] for m in b.meshes], axis=0)
    hi = np.max([m.copy().apply_transform(T).bounds[1] for m in b.meshes], axis=0)
    np.testing.assert_allclose(lo + hi, 0, atol=1e-9)
    assert np.isclose((hi - lo).max(), 1.0)
    np.testing.assert_allclose(hi - lo, [1, 1 / 6, 1 / 6], atol=1e-9)


@pytest.mark.parametrize(
    "rel, size",
    [
        ("duck.obj", (512, 512)),
        ("soccerball.obj", (256, 256)),
        ("textured_sphere_smooth.obj", (256, 256)),
        ("torus/torus_textured.obj", (256, 256)),
    ],  # its mtl names "../cube.png": trimesh alone drops it
)
def test_pybullet_textured_assets_keep_textures(rel, size):
    a = load_asset(PYBULLET / rel, PYBULLET)
    assert a.rel_path == rel and a.asset_id == asset_id_for(rel)
    (mesh,) = a.meshes
    assert mesh.visual.kind == "texture"
    image = mesh.visual.material.image
    assert image.size == size and image.mode in ("RGB", "RGBA")  # the gif's palette was converted
    uv = mesh.visual.uv
    assert uv.shape == (len(mesh.vertices), 2) and np.isfinite(uv).all()


def test_builtin_assets_are_what_they_claim(builtin):
    out, paths = builtin
    assert [p.relative_to(out).as_posix() for p in discover_assets(out)] == sorted(
        p.relative_to(out).as_posix() for p in paths
    )
    loaded = {p.parent.name: load_asset(p, out, max_faces=20_000) for p in paths}
    expected_instances = {
        "nested_shells": 3,
        "table": 5,
        "box_in_box": 2,
        "mug": 2,
        "thin_plate": 1,
        "torus_knot": 1,
    }
    assert {k: len(a.meshes) for k, a in loaded.items()} == expected_instances
    assert {p.suffix for p in paths} == {".obj", ".glb"}
    for name, a in loaded.items():
        textured = [
            m
            for m in a.meshes
            if getattr(m.visual.material, "baseColorTexture", None) is not None
            or getattr(m.visual.material, "image", None) is not None
        ]
        assert textured, f"{name} has no texture"
        for inst, m in zip(a.names, a.meshes):
            # geometry only: texture seams split vertices, so merge by position before asking
            g = trimesh.Trimesh(m.vertices, m.faces)
            g.merge_vertices()
            assert g.is_watertight and g.is_winding_consistent, (name, inst)
            assert g.volume > 0, (name, inst)  # outward normals
    legs = [m for n, m in zip(loaded["table"].names, loaded["table"].meshes) if n.startswith("leg")]
    assert (
        len({tuple(np.round(m.bounds.mean(axis=0), 6)) for m in legs}) == 4
    )  # instanced, transforms applied
    sizes = sorted((m.extents.max() for m in loaded["nested_shells"].meshes), reverse=True)
    np.testing.assert_allclose(sizes, [2.0, 1.4, 0.8], rtol=1e-6)  # radii 1, 0.7, 0.4


@pytest.mark.parametrize(
    "name, origin, direction, crossings",
    [
        ("nested_shells", (0, 0, -5), (0, 0, 1), 6),  # three spheres, in and out of each
        ("box_in_box", (-5, 0.01, 0.02), (1, 0, 0), 6),  # the outer shell's two walls, then the inner box
        ("mug", (-5, 0.01, 0.5), (1, 0, 0), 6),  # both walls twice, then the handle's tube
        ("mug", (0.01, 0.02, 5), (0, 0, -1), 2),  # down the opening: the floor only
        ("table", (0.5, 0.3, 5), (0, 0, -1), 4),  # the top, then a leg
        ("thin_plate", (0.1, 0.1, 5), (0, 0, -1), 2),
    ],
)
def test_builtin_assets_have_many_layers(builtin, name, origin, direction, crossings):
    out, paths = builtin
    (path,) = [p for p in paths if p.parent.name == name]
    asset = load_asset(path, out)
    z_up_to_y_up = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # rays given in the z-up modelling frame
    hits = LayeredRaycaster(asset.meshes).cast_rays(
        np.array([origin], float) @ z_up_to_y_up.T, np.array([direction], float) @ z_up_to_y_up.T, 16
    )
    assert hits.num_hits[0] == crossings


def test_make_assets_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    from wt_datagen.inputs.builtin import add_arguments

    add_arguments(parser)
    assert run(parser.parse_args([str(tmp_path / "out")])) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(os.path.isfile(p) for p in printed)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(parser.parse_args([str(blocker / "out")])) == 1
    assert "make-assets: cannot write" in capsys.readouterr().err


def test_texture_files_written_with_obj(builtin):
    out, paths = builtin
    for p in paths:
        if p.suffix == ".obj":
            mtl = p.with_suffix(".mtl")
            assert mtl.is_file()
            pngs = list(p.parent.glob("*.png"))
            assert pngs and all(Image.open(f).size == (256, 256) for f in pngs)


def test_asset_to_world_turns_z_up_assets_y_up():
    tall = trimesh.creation.box(extents=(1.0, 2.0, 4.0))  # z-up: tallest along z
    tall.apply_translation((3, 1, 2))
    T = asset_to_world([tall], up_axis="z")
    lo, hi = trimesh.transform_points(tall.bounds, T)
    np.testing.assert_allclose(np.abs(hi - lo), [0.25, 1.0, 0.5])  # tallest along y now, longest side 1
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(T[:3, :3]), 0.25**3)  # a rotation (det +1) times the scale
    np.testing.assert_allclose(asset_to_world([tall], up_axis="y", normalise=False), np.eye(4))
