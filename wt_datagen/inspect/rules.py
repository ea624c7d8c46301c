"""The schema's rules, checked on one decoded sample: each rule one vectorised pass, each broken rule one
:class:`~wt_datagen.reader.Problem` naming the field, how many entries break it and where the first is."""

from __future__ import annotations

import numpy as np

from ..camera import Camera
from ..reader import Problem, Sample
from ..schema import (
    LAYER_DTYPES,
    LAYER_OPTIONAL,
    LAYER_TRAILING,
    META_KEYS,
    TRACK_FIELDS,
    TRACK_OPTIONAL,
    track_displacement,
)

REPROJECTION_TOL_PX = 1e-3
NORMAL_TOL = 1e-2  # float16 storage: unit length to about 1e-3
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # by float16 bits


def _first(mask: np.ndarray, axes: tuple[str, ...] | None) -> str:
    """Where the first True of ``mask`` is: 'layer k pixel (u, v)' for (K, H, W) or (H, W) layer masks
    (``axes`` None), else each axis named, e.g. 'frame 3 track 17'."""
    idx = np.unravel_index(int(np.argmax(mask)), mask.shape)
    if axes is not None:
        return " ".join(f"{a} {i}" for a, i in zip(axes, idx))
    loc = f"pixel (u={idx[-1]}, v={idx[-2]})"
    return f"layer {idx[0]} {loc}" if mask.ndim == 3 else loc


def _count(s: Sample, name: str, mask: np.ndarray, what: str, axes: tuple[str, ...] | None = None) -> None:
    """One problem for all the True entries of ``mask``: how many, and where the first is."""
    n = int(np.count_nonzero(mask))
    if n:
        s.problem(name, f"{what} at {n} entries (first: {_first(mask, axes)})")


def shape_ok(s: Sample) -> bool:
    """dtype and shape of every layers.npz field; True when all fields are present and agree."""
    L = s.layers
    depth = L.get("depth")
    if depth is None or depth.ndim != 3:
        if depth is not None:
            s.problem("layers.npz:depth", f"shape {depth.shape}, expected (K, H, W)")
        return False
    ok = all(name in L for name in LAYER_DTYPES)
    for name, dtype in {**LAYER_DTYPES, **LAYER_OPTIONAL}.items():
        a = L.get(name)
        if a is None:
            continue
        want = depth.shape[1:] if name == "num_hits" else depth.shape + LAYER_TRAILING.get(name, ())
        bad = False
        if a.dtype != dtype:
            s.problem(f"layers.npz:{name}", f"dtype {a.dtype}, expected {np.dtype(dtype)}")
            bad = True
        if a.shape != want:
            s.problem(f"layers.npz:{name}", f"shape {a.shape}, expected {want}")
            bad = True
        if bad and name in LAYER_OPTIONAL:
            del L[name]  # an optional field that is malformed is left out of the value rules
        ok &= not bad or name in LAYER_OPTIONAL
    return ok


def camera_of(s: Sample, d, name: str) -> Camera | None:
    try:
        return Camera.from_json(d)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e).removeprefix("camera: ")
        s.problem(name, msg)
        return None


def _at(mask: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """A mask shaped like ``mask`` that is True where ``mask`` is and the compact ``sel`` (one entry per True
    of ``mask``, in C order) is; built only to name a problem's first location."""
    out = np.zeros(mask.shape, dtype=bool)
    out[mask] = sel
    return out


def _check_layers(s: Sample, cam: Camera | None) -> None:
    """Value rules of the layer stack, each one vectorised pass. Per-hit rules work on the compact valid
    entries (a fraction of K*H*W) and avoid ``@``: BLAS-threaded (N, 3) x (3, 3) matmuls crawl on a busy
    machine."""
    L = s.layers
    depth, valid, nh = L["depth"], L["valid"], L["num_hits"]
    K = depth.shape[0]
    invalid = ~valid
    d = depth[valid]
    good = (d > 0) & (d < np.inf)  # NaN fails both
    if not good.all():  # rare: say which way it is wrong
        _count(s, "layers.npz:depth", _at(valid, ~np.isfinite(d)), "non-finite depth where valid")
        _count(s, "layers.npz:depth", _at(valid, d <= 0), "non-positive depth where valid")
    _count(s, "layers.npz:depth", invalid & (depth != 0), "nonzero depth where invalid")
    monotone = "non-monotone validity (valid after an invalid layer)"  # layer k+1 valid only if layer k is
    _count(s, "layers.npz:valid", valid[1:] & invalid[:-1], monotone)
    _count(s, "layers.npz:depth", valid[1:] & (depth[1:] < depth[:-1]), "depth decreasing across layers")
    _count(s, "layers.npz:num_hits", nh < 0, "negative num_hits")
    count_wrong = np.minimum(nh, K) != valid.sum(0, dtype=np.int32)
    _count(s, "layers.npz:num_hits", count_wrong, "min(num_hits, K) != valid layer count")
    for name in ("face_id", "instance_id"):
        a = L[name]
        _count(s, f"layers.npz:{name}", (a < 0) != invalid, "id < 0 where valid or != -1 where invalid")
        _count(s, f"layers.npz:{name}", a < -1, "id below -1")
    _count(s, "layers.npz:front_facing", invalid & L["front_facing"], "front_facing where invalid")
    if "albedo" in L:  # optional (outputs: albedo): colour exactly where there is a crossing
        _count(s, "layers.npz:albedo", invalid & L["albedo"].any(axis=-1), "nonzero albedo where invalid")
    _check_motion_masks(s, invalid)
    # float16 bits without the sign are 0 exactly for +-0; integer ORs of the three components are far
    # cheaper than float16 maths or a reduction over the short last axis
    bits = L["normal"].view(np.uint16)
    nonzero = ((bits[..., 0] | bits[..., 1] | bits[..., 2]) & 0x7FFF) != 0
    _count(s, "layers.npz:normal", invalid & nonzero, "nonzero normal where invalid")
    n = _F16_TO_F32[bits[valid]].T  # (3, M) float32, the valid hits in C order; a table beats astype 5x
    unit = np.abs(n[0] * n[0] + n[1] * n[1] + n[2] * n[2] - 1) <= 2 * NORMAL_TOL
    if not unit.all():
        _count(s, "layers.npz:normal", _at(valid, ~unit), "non-unit normal where valid")
    if cam is None or cam.height != depth.shape[1] or cam.width != depth.shape[2]:
        return
    # each hit's pixel-centre ray K^-1 (u + .5, v + .5, 1), computed here independently of the writer
    k, v, u = np.nonzero(valid)
    uc, vc = u.astype(np.float32) + 0.5, v.astype(np.float32) + 0.5
    Ki = np.linalg.inv(cam.K).astype(np.float32)
    rays = Ki[:, :1] * uc + Ki[:, 1:2] * vc + Ki[:, 2:]  # (3, M)
    # an entering crossing has its normal against the ray; skip grazing hits where float16 normals blur it
    cos = n[0] * rays[0] + n[1] * rays[1] + n[2] * rays[2]
    wrong = ((cos < 0) != L["front_facing"][valid]) & (np.abs(cos) > NORMAL_TOL)
    if wrong.any():
        _count(s, "layers.npz:front_facing", _at(valid, wrong), "disagrees with the normal's orientation")
    # layer-0 points xyz = depth * ray must project (K xyz / z) back onto their own pixel centres
    first = (k == 0) & good
    xyz = (d[first] * rays[:, first]).astype(np.float64)
    p = np.einsum("ij,jn->in", cam.K, xyz)
    err = np.maximum(np.abs(p[0] / p[2] - uc[first]), np.abs(p[1] / p[2] - vc[first]))
    off = np.zeros(len(k), dtype=bool)
    off[first] = ~(err <= REPROJECTION_TOL_PX)
    if off.any():
        what = f"layer-0 point reprojects more than {REPROJECTION_TOL_PX} px off its pixel"
        _count(s, "layers.npz:depth", _at(valid, off), what)
    if "next_world_xyz" in L and "dynamic" in L:
        xyz = d[None] * rays  # (3, M) camera space, float32
        world = cam.rotation.T.astype(np.float32) @ (xyz - cam.world_to_cam[:3, 3:].astype(np.float32))
        _check_flow(s, valid, world)


def _check_motion_masks(s: Sample, invalid: np.ndarray) -> None:
    """The optional motion fields are empty where there is no crossing, and positions are finite."""
    L = s.layers
    if "dynamic" in L:
        _count(s, "layers.npz:dynamic", invalid & L["dynamic"], "dynamic where invalid")
    if "next_world_xyz" in L:
        nw = L["next_world_xyz"]
        _count(s, "layers.npz:next_world_xyz", invalid & (nw != 0).any(-1), "nonzero where invalid")
        _count(s, "layers.npz:next_world_xyz", ~invalid & ~np.isfinite(nw).all(-1), "non-finite where valid")


def _check_flow(s: Sample, valid: np.ndarray, world: np.ndarray) -> None:
    """``dynamic`` says whether the point moves more than ``meta.json``'s ``dynamic_tolerance`` between this
    frame and the next: it must agree with the distance from the crossing's world point (from depth) to
    ``next_world_xyz``, except within float32 rounding of the tolerance."""
    tol = s.meta.get("dynamic_tolerance") if isinstance(s.meta, dict) else None
    if not isinstance(tol, (int, float)):
        return
    nxt = s.layers["next_world_xyz"][valid].T  # (3, M)
    moved = np.sqrt(((nxt - world) ** 2).sum(0))
    margin = 1e-5 * max(float(np.abs(world).max(initial=0)), float(np.abs(nxt).max(initial=0)), 1e-6)
    with np.errstate(invalid="ignore"):
        wrong = (s.layers["dynamic"][valid] != (moved > tol)) & (np.abs(moved - tol) > margin)
    if wrong.any():
        _count(s, "layers.npz:dynamic", _at(valid, wrong),
               f"disagrees with |next_world_xyz - point| > dynamic_tolerance ({tol:.3g})")


def _check_meta(s: Sample, K: int | None, max_instance: int | None) -> None:
    m = s.meta
    if not isinstance(m, dict):
        s.problem("meta.json", "not a JSON object")
        return
    for k in () if s.is_clip else META_KEYS:
        if k not in m and k != "schema_version":  # the decoder checks the version
            s.problem(f"meta.json:{k}", "missing field")
    if K is not None and "num_layers" in m and m["num_layers"] != K:
        s.problem("meta.json:num_layers", f"{m['num_layers']!r} but layers.npz holds K={K}")
    names = m.get("instance_names")
    if max_instance is not None and isinstance(names, list) and max_instance >= len(names):
        s.problem("meta.json:instance_names", f"{len(names)} names but instance_id reaches {max_instance}")


def _check_view(s: Sample, shape_ok: bool) -> None:
    cam = camera_of(s, s.camera, "camera.json") if s.camera is not None else None
    K = max_inst = None
    if shape_ok:
        K, H, W = s.layers["depth"].shape
        if cam is not None and (cam.height, cam.width) != (H, W):
            s.problem("camera.json", f"size {cam.width}x{cam.height} but layers.npz is {W}x{H}")
        _check_layers(s, cam)
        inst = s.layers["instance_id"]
        max_inst = int(inst.max()) if inst.size else None
    if s.rgb is not None and cam is not None:
        if s.rgb.dtype != np.uint8 or s.rgb.shape not in ((cam.height, cam.width, 3), (cam.height, cam.width, 4)):
            s.problem(
                "rgb.png", f"{s.rgb.dtype} {s.rgb.shape}, expected uint8 ({cam.height}, {cam.width}, 3 or 4)"
            )
    if s.meta is not None:
        _check_meta(s, K, max_inst)


def clip_cameras(s: Sample) -> list | None:
    """Per-frame camera dicts of ``cameras.json``: a list, or a record holding a ``cameras`` list."""
    c = s.cameras
    return c.get("cameras") if isinstance(c, dict) else c


def _check_clip(s: Sample) -> None:
    if s.meta is not None:
        _check_meta(s, None, None)
    t = s.tracks
    wx = t.get("world_xyz")
    if wx is None or wx.ndim != 3 or wx.shape[-1] != 3:
        if wx is not None:
            s.problem("tracks.npz:world_xyz", f"shape {wx.shape}, expected (T, N, 3)")
        return
    T, N = wx.shape[:2]
    want = {  # name -> (shape, dtype or dtype kind); query_frame is a scalar or one per query
        "world_xyz": ((T, N, 3), "f4"),
        "cam_xyz": ((T, N, 3), "f4"),
        "uv": ((T, N, 2), "f"),
        "layer_index": ((T, N), "i1"),
        "query_pixel": ((N, 2), "i"),
        "query_layer": ((N,), "i"),
        "query_frame": (None, "i"),
    }
    ok = all(name in t for name in TRACK_FIELDS)
    for name, (shape, kind) in want.items():
        a = t.get(name)
        if a is None:
            continue
        dt_ok = a.dtype == np.dtype(kind) if len(kind) > 1 else a.dtype.kind == kind
        shape_ok = a.shape in ((), (N,)) if shape is None else a.shape == shape
        if not dt_ok:
            s.problem(f"tracks.npz:{name}", f"dtype {a.dtype}, expected {kind}")
        if not shape_ok:
            s.problem(f"tracks.npz:{name}", f"shape {a.shape}, expected {shape or '() or (N,)'}")
        ok &= dt_ok and shape_ok
    _count(s, "tracks.npz:world_xyz", ~np.isfinite(wx).all(-1), "non-finite point", ("frame", "track"))
    cams = clip_cameras(s)
    if s.cameras is not None and not isinstance(cams, list):
        s.problem("cameras.json", "neither a list of cameras nor a record with a 'cameras' list")
        return
    if not ok or cams is None:
        return
    if len(cams) != T:
        s.problem("cameras.json", f"{len(cams)} cameras for {T} frames")
        return
    cams = [camera_of(s, c, f"cameras.json[{i}]") for i, c in enumerate(cams)]
    if any(c is None for c in cams):
        return
    R = np.stack([c.rotation for c in cams])  # (T, 3, 3)
    tr = np.stack([c.world_to_cam[:3, 3] for c in cams])
    cam_xyz = np.einsum("tij,tnj->tni", R, wx.astype(np.float64)) + tr[:, None]
    scale = max(float(np.abs(cam_xyz[np.isfinite(cam_xyz)]).max(initial=0)), 1e-6)
    bad = ~(np.abs(cam_xyz - t["cam_xyz"]).max(-1) <= 1e-5 * scale)
    _count(s, "tracks.npz:cam_xyz", bad, "disagrees with world_to_cam @ world_xyz", ("frame", "track"))
    # image-plane checks use the stored cam_xyz/uv: in front of the camera and inside the image (with a
    # float32 rounding margin) is where layer_index may be >= 0, and where uv must be the projection
    z = t["cam_xyz"][..., 2].astype(np.float64)
    uv = t["uv"].astype(np.float64)
    wh = np.array([[c.width, c.height] for c in cams], dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        inside = (z > 0) & (uv >= -REPROJECTION_TOL_PX).all(-1) & (uv < wh + REPROJECTION_TOL_PX).all(-1)
        p = np.einsum("tij,tnj->tni", np.stack([c.K for c in cams]), t["cam_xyz"].astype(np.float64))
        proj = p[..., :2] / np.where(inside[..., None], p[..., 2:3], 1.0)
        off = np.abs(proj - uv).max(-1) > REPROJECTION_TOL_PX
    _count(s, "tracks.npz:uv", inside & off, "disagrees with the projection of cam_xyz", ("frame", "track"))
    li = t["layer_index"]
    _count(
        s,
        "tracks.npz:layer_index",
        (li >= 0) & ~inside,
        "layer >= 0 for a point outside the image",
        ("frame", "track"),
    )
    _count(s, "tracks.npz:layer_index", li < -1, "layer below -1", ("frame", "track"))
    qf = np.broadcast_to(t["query_frame"], (N,)).astype(np.int64)
    if ((qf < 0) | (qf >= T)).any():
        s.problem("tracks.npz:query_frame", f"outside 0..{T - 1}")
        return
    n = np.arange(N)
    _check_track_motion(s, T, N, qf)
    _count(
        s,
        "tracks.npz:layer_index",
        li[qf, n] != t["query_layer"],
        "at the query frame != query_layer",
        ("track",),
    )
    off = ~(np.abs(uv[qf, n] - (t["query_pixel"] + 0.5)).max(-1) <= REPROJECTION_TOL_PX)
    _count(s, "tracks.npz:uv", off, "at the query frame off the query pixel centre", ("track",))


def _check_track_motion(s: Sample, T: int, N: int, qf: np.ndarray) -> None:
    """The optional per-track motion fields and the coverage claims' shape and range."""
    t = s.tracks
    ok = {}
    for name, (dtype, dims) in TRACK_OPTIONAL.items():
        a = t.get(name)
        if a is None:
            continue
        shape = tuple({"T": T, "N": N}.get(d, a.shape[i] if i < a.ndim else -1) for i, d in enumerate(dims))
        ok[name] = a.dtype == dtype and a.shape == shape
        if not ok[name]:
            s.problem(f"tracks.npz:{name}", f"{a.dtype} {a.shape}, expected {np.dtype(dtype)} {dims}")
    if ok.get("coverage"):
        c = t["coverage"]
        K = s.meta.get("num_layers") if isinstance(s.meta, dict) else None
        if isinstance(K, int) and c.shape[1] != K:
            s.problem("tracks.npz:coverage", f"{c.shape[1]} layers but meta.json num_layers is {K}")
        with np.errstate(invalid="ignore"):
            _count(s, "tracks.npz:coverage", (c < 0) | (c > 1), "outside [0, 1]", ("frame", "layer"))
    if not ok.get("world_displacement") and not ok.get("dynamic"):
        return
    d = track_displacement(t["world_xyz"], qf)
    scale = max(float(np.abs(t["world_xyz"]).max(initial=0)), 1e-6)
    if ok.get("world_displacement"):
        off = ~(np.abs(t["world_displacement"] - d) <= 1e-6 * scale)
        _count(s, "tracks.npz:world_displacement", off, "disagrees with world_xyz (largest distance from the "
               "query-frame point)", ("track",))
    tol = s.meta.get("dynamic_tolerance") if isinstance(s.meta, dict) else None
    if ok.get("dynamic") and isinstance(tol, (int, float)):
        _count(s, "tracks.npz:dynamic", t["dynamic"] != (d > tol),
               f"disagrees with the displacement in world_xyz > dynamic_tolerance ({tol:.3g})", ("track",))


def check(s: Sample, shape_ok: bool | None = None) -> list[Problem]:
    """Every schema rule for one decoded sample; returns ``s.problems`` (decoding problems included).
    ``shape_ok``: the result of an earlier ``shape_ok(s)``, so its problems are not reported twice."""
    if s.is_clip:
        _check_clip(s)
    else:
        _check_view(s, shape_ok(s) if shape_ok is None else shape_ok)
    return s.problems
