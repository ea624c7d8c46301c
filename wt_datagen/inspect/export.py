"""Point clouds out of samples: every valid hit of every layer as PLY (Open3D and MeshLab read it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..camera import Camera, depth_to_xyz
from ..reader import Sample
from .pictures import layer_colours


def hit_points(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A view's valid hits: (M, 3) float32 camera-space points ``depth * K^-1 (u + .5, v + .5, 1)`` and their
    layer, row and column indices ``k, v, u`` ((M,) int64 each), layer by layer (``k`` is sorted)."""
    cam = Camera.from_json(sample.camera)
    depth, valid = sample.layers["depth"], sample.layers["valid"]
    k, v, u = np.nonzero(valid)
    return depth_to_xyz(depth, cam.K)[k, v, u], k, v, u


def layered_points(
    sample: Sample, frame: str = "camera", colour: str = "layer"
) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) float32 points of every valid hit (all layers; a clip: its query points at the query frame)
    in the ``camera`` or ``world`` frame, and (M, 3) uint8 colours by ``layer`` index or ``image`` colour."""
    if frame not in ("camera", "world") or colour not in ("layer", "image"):
        raise ValueError(f"export: frame must be camera|world and colour layer|image, got {frame}, {colour}")
    if sample.is_clip:
        t = sample.tracks
        qf = np.broadcast_to(t["query_frame"], t["query_layer"].shape).astype(np.int64)
        n = np.arange(len(qf))
        xyz = (t["cam_xyz"] if frame == "camera" else t["world_xyz"])[qf, n].astype(np.float32)
        return xyz, layer_colours(int(t["query_layer"].max(initial=0)) + 1)[t["query_layer"]]
    xyz, k, v, u = hit_points(sample)
    if frame == "world":
        cam = Camera.from_json(sample.camera)
        xyz = (xyz @ cam.cam_to_world[:3, :3].T + cam.cam_to_world[:3, 3]).astype(np.float32)
    if colour == "image":
        if sample.rgb is None:
            raise ValueError(f"export: {sample.key}: rgb.png unreadable, cannot colour by image")
        rgb = sample.rgb[v, u]
    else:
        rgb = layer_colours(sample.layers["depth"].shape[0])[k]
    return xyz, rgb


def export_ply(sample: Sample, out_ply, frame: str = "camera", colour: str = "layer") -> int:
    """Write the sample's layered points as a binary PLY (x, y, z float; red, green, blue, alpha uchar),
    readable by Open3D and MeshLab. Returns the number of points."""
    import trimesh

    xyz, rgb = layered_points(sample, frame, colour)
    out_ply = Path(out_ply)
    out_ply.parent.mkdir(parents=True, exist_ok=True)
    out_ply.write_bytes(trimesh.PointCloud(xyz, colors=rgb).export(file_type="ply"))
    return len(xyz)
