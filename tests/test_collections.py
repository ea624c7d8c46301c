"""Collections as people have them: which files are sequences, item ids for any name, OBJ material libraries.

Oracles: the files written here (which meshes share one face array is known by construction), the id rules'
stated properties checked over every pair, and the texture images' own sizes and colours."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from wt_datagen.cli import main
from wt_datagen.inputs.assets import AssetError, asset_id_for, load_asset
from wt_datagen.inputs.sequences import find_sequences, load_sequence
from wt_datagen.pipeline import plan
from wt_datagen.pipeline.plan import PlanError, plan_items


def write(path: Path, mesh: trimesh.Trimesh) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


def deformed(mesh: trimesh.Trimesh, t: float) -> trimesh.Trimesh:
    v = mesh.vertices * (1 + 0.1 * t * np.sin(3 * mesh.vertices[:, :1]))
    return trimesh.Trimesh(v, mesh.faces, process=False)


def test_numbered_unrelated_meshes_are_static_assets_every_one(tmp_path):
    box, cone = trimesh.creation.box(), trimesh.creation.cone(0.5, 1.0, sections=6)
    assert len(box.faces) == len(cone.faces) == 12  # one face count, other faces
    sphere = trimesh.creation.icosphere(subdivisions=1)
    files = [
        write(tmp_path / "modelnet/chair/train/chair_0001.off", box),
        write(tmp_path / "modelnet/chair/train/chair_0002.off", cone),
        write(tmp_path / "modelnet/chair/train/chair_0003.off", sphere),
        write(tmp_path / "thingi/100026.stl", box),
        write(tmp_path / "thingi/100027.stl", cone),  # same triangle count, other connectivity
        write(tmp_path / "thingi/100028.stl", sphere),
        write(tmp_path / "robot/meshes/link1.obj", box),
        write(tmp_path / "robot/meshes/link2.obj", cone),
        write(tmp_path / "robot/meshes/link3.obj", sphere),
        write(tmp_path / "robot/meshes/hand.obj", box),
    ]
    assert find_sequences(tmp_path) == []
    items = plan_items(tmp_path)
    assert [it.kind for it in items] == ["asset"] * len(files)
    assert sorted(it.rel_path for it in items) == sorted(f.relative_to(tmp_path).as_posix() for f in files)


def test_real_sequences_are_found_beside_other_meshes(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    for t in range(4):
        write(tmp_path / f"walk/frame_{t:03d}.obj", deformed(sphere, t))
        write(tmp_path / f"melt/m{t}.stl", deformed(sphere, t))  # STL: connectivity after merging positions
        write(tmp_path / f"melt/drop{t}.ply", deformed(trimesh.creation.box(), t))  # a second group
        write(tmp_path / f"odd/frame_{t:03d}.obj", deformed(sphere, t))
    write(tmp_path / "walk/floor.obj", trimesh.creation.box(extents=(4, 0.1, 4)))
    write(tmp_path / "odd/frame_999.obj", trimesh.creation.box())  # numbered like them, other faces
    items = {it.rel_path: it for it in plan_items(tmp_path)}
    # a group with one odd file is no sequence: its five files are static assets, none lost
    assert {k: it.kind for k, it in items.items()} == {
        "melt/drop*.ply": "sequence", "melt/m*.stl": "sequence", "walk/floor.obj": "asset",
        "walk/frame_*.obj": "sequence", **{f"odd/frame_{t:03d}.obj": "asset" for t in (0, 1, 2, 3, 999)}}
    assert items["walk/frame_*.obj"].frames == tuple(f"frame_{t:03d}.obj" for t in range(4))
    for key in ("melt/m*.stl", "walk/frame_*.obj"):
        seq = load_sequence(plan.sequence_source(items[key]), tmp_path)
        assert seq.num_frames == 4 and seq.sequence_id == items[key].item_id
        assert np.array_equal(seq.meshes(0)[0].faces, seq.meshes(3)[0].faces)


def test_sequence_json_marks_a_folder_and_detect_marked_needs_it(tmp_path):
    box = trimesh.creation.box()
    for t in range(3):
        write(tmp_path / f"anim/pose{t}.ply", deformed(box, t))
    write(tmp_path / "anim/prop.ply", trimesh.creation.icosphere(subdivisions=1))
    for t in range(3):
        write(tmp_path / f"auto/f{t}.ply", deformed(box, t))
    (tmp_path / "anim/sequence.json").write_text(json.dumps({"fps": 12, "frames": "pose*.ply"}))
    items = {it.rel_path: it.kind for it in plan_items(tmp_path)}
    assert items == {"anim/pose*.ply": "sequence", "anim/prop.ply": "asset", "auto": "sequence"}
    marked = {it.rel_path: it.kind for it in plan_items(tmp_path, detect="marked")}
    assert marked == {"anim/pose*.ply": "sequence", "anim/prop.ply": "asset", "auto/f0.ply": "asset",
                      "auto/f1.ply": "asset", "auto/f2.ply": "asset"}
    (source,) = [s for s in find_sequences(tmp_path) if s.path.name == "anim"]
    assert load_sequence(source, tmp_path, fps=24).fps == 12  # sequence.json's fps wins


NAMES = ["mugs/mug.obj", "a.b.stl", "a_b.stl", "a b.stl", "a/b.stl", "a__b.stl", "a_/b.stl", "a/_b.stl",
         "家具/椅子.stl", "家具/桌子.stl", "café.obj", "cafe.obj", "Café.obj", "x.y.z.obj", "x_y.z.obj",
         "frame_*.obj", "ünï/cödé.ply", "-lead.obj", "trail_.obj", "walk_obj", "walk.obj", "blob", "sp ace"]


def test_ids_are_unique_readable_dot_free_and_stable():
    ids = [asset_id_for(n) for n in NAMES]
    assert len(set(ids)) == len(ids), sorted(zip(ids, NAMES))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    assert ids == [asset_id_for(n) for n in NAMES]  # a function of the relative path alone
    readable = dict(zip(NAMES, ids))
    assert readable["mugs/mug.obj"] == "mugs__mug_obj" and readable["a_b.stl"] == "a_b_stl"
    assert readable["blob"] == "blob"
    assert readable["café.obj"].startswith("cafe_obj-") and readable["家具/椅子.stl"].startswith("stl-")


def test_non_ascii_and_folding_names_render_with_their_own_keys(tmp_path, capsys):
    assets = tmp_path / "assets"
    box = trimesh.creation.box()
    for name in ("家具/椅子.stl", "家具/桌子.stl", "a.b.stl", "a_b.stl"):
        write(assets / name, box)
    config = tmp_path / "c.yaml"
    config.write_text("views: 1\nresolution: 16\nlayers: 2\nimage: {renderer: raytrace}\n")
    assert main(["render", str(assets), "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(sorted(map(str, (tmp_path / "out").glob("*.tar"))),
                                                  shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 4
    assert "a_b_stl_v0000" in keys


def test_the_planner_refuses_two_items_with_one_key(tmp_path, monkeypatch, capsys):
    box = trimesh.creation.box()
    write(tmp_path / "assets/a.b.stl", box)
    write(tmp_path / "assets/a_b.stl", box)
    old_rule = lambda rel: "__".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) for p in Path(rel).parts)  # noqa: E731
    monkeypatch.setattr(plan, "asset_id_for", old_rule)  # the rule before unique ids: both give a_b_stl
    with pytest.raises(PlanError, match=r"a.b.stl and a_b.stl would write samples under one key 'a_b_stl'"):
        plan_items(tmp_path / "assets")
    config = tmp_path / "c.yaml"
    config.write_text("views: 1\nresolution: 16\n")
    assert main(["render", str(tmp_path / "assets"), "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "one key" in err and "\n" not in err and not (tmp_path / "o").exists()


def solid(path: Path, size, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


OBJ = """mtllib
mtllib first.mtl second.mtl
mtllib my materials.mtl
v 0 0 0
v 1 0 0
v 1 1 0
v 0 1 0
vt 0 0
vt 1 0
vt 1 1
vt 0 1
o wood
usemtl wood
f 1/1 2/2 3/3
o metal
usemtl metal
f 1/1 3/3 4/4
o paint
usemtl paint
f 2/2 3/3 4/4
"""


def test_obj_material_libraries_spaces_and_sub_folders(tmp_path):
    folder = tmp_path / "chair"
    folder.mkdir()
    (folder / "chair.obj").write_text(OBJ)
    (folder / "first.mtl").write_text("newmtl wood\nKd 1 1 1\nmap_Kd -s 1 1 1 -o 0 0 textures\\wood grain.png\n")
    (folder / "second.mtl").write_text("newmtl metal\nKd 1 1 1\nmap_Kd ../shared/Steel.PNG\n"
                                       "newmtl wood\nmap_Kd nowhere.png\n")  # the first definition wins
    (folder / "my materials.mtl").write_text("newmtl paint\nKd 0.2 0.4 0.6\n")
    solid(folder / "textures" / "wood grain.png", (8, 4), (150, 90, 30))
    solid(tmp_path / "shared" / "steel.png", (4, 2), (200, 200, 210))
    asset = load_asset(folder / "chair.obj", tmp_path)
    assert asset.warnings == []
    materials = {m.visual.material.name: m.visual.material for m in asset.meshes}
    assert materials["wood"].image.size == (8, 4) and materials["metal"].image.size == (4, 2)
    assert materials["paint"].image is None
    np.testing.assert_allclose(np.asarray(materials["paint"].diffuse)[:3], [51, 102, 153], atol=1)
    # a missing texture: rendered untextured with a warning (or skipped, if the config says so)
    (folder / "textures" / "wood grain.png").unlink()
    asset = load_asset(folder / "chair.obj", tmp_path)
    assert asset.warnings == ["missing texture file textures\\wood grain.png (material wood)"]
    assert {m.visual.material.name: m.visual.material.image for m in asset.meshes}["wood"] is None
    with pytest.raises(AssetError, match=r"chair/chair.obj: missing texture file .*wood grain.png"):
        load_asset(folder / "chair.obj", tmp_path, missing_texture="skip")
