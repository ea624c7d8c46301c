"""Samples as a Rerun recording (``.rrd``), to look at in 3D with the Rerun viewer (``rerun FILE.rrd``).

Rerun (the ``rerun-sdk`` package, optional extra ``rerun``) is imported only here and only when asked for;
writing a file needs neither a viewer process nor a network. Every sample is logged under its own root
``/{key}`` in its world frame (y up, the render configs' convention):

- ``/{key}/camera``: the camera pose, ``Transform3D`` camera -> world (rotation ``R^T``, translation the
  camera centre), so everything below it is in camera space (OpenCV axes);
- ``/{key}/camera/image``: a ``Pinhole`` with the sample's ``K`` and size, ``camera_xyz = RDF`` (x right,
  y down, z forward), and ``/{key}/camera/image/rgb`` the image;
- ``/{key}/camera/layers/{k}``: layer k's valid hits as camera-space points ``depth * K^-1 (u + .5, v + .5, 1)``,
  one entity per layer (all K, an empty one where a layer has no hit), coloured by ``layer`` (one colour per
  layer), ``normal`` (camera-space normal, xyz -> rgb), ``facing`` (entering vs exiting crossings) or
  ``image`` (the pixel's colour).

A clip (its ``{seq}_c{clip}_tracks`` sample) is logged on the ``frame`` timeline (the frame's position in the
clip, 0..T-1): the camera of each frame (``cameras.json``), the image and layered points of each of its frame
samples ``{seq}_c{clip}_f{frame}`` found in the clip's shard (an asset never spans two shards), and its tracks
in world space: ``/{key}/tracks/{visible,hidden,outside}`` line strips, one 2-point strip per track and frame
step over the last ``trail`` steps, grouped by the track's ``layer_index`` at the step's end (0 visible, > 0
hidden behind that many crossings, -1 outside the image), and ``/{key}/tracks/points`` the tracks' current
positions in the same colours. At most :data:`~wt_datagen.inspect.pictures.MAX_DRAWN_TRACKS` tracks are drawn,
spread evenly, as on the contact sheet.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..camera import Camera
from ..reader import Sample, decode, iter_raw
from ..schema import decode_json
from .export import hit_points
from .pictures import drawn_tracks, layer_colours
from .rules import clip_cameras

COLOURINGS = ("layer", "normal", "facing", "image")
ENTERING = np.array([31, 119, 180], np.uint8)  # blue: the ray enters the surface (front_facing)
EXITING = np.array([255, 127, 14], np.uint8)  # orange: it leaves it
TRACK_STATES = {  # entity name -> (colour, which layer_index values)
    "visible": (np.array([44, 160, 44], np.uint8), lambda li: li == 0),
    "hidden": (np.array([214, 39, 40], np.uint8), lambda li: li > 0),
    "outside": (np.array([127, 127, 127], np.uint8), lambda li: li < 0),
}
TRAIL_FRAMES = 8  # frame steps of track lines kept behind the current frame
TIMELINE = "frame"  # a clip's frames by position (0..T-1); the "time" timeline holds their timestamps
APPLICATION = "wt-datagen inspect"
INSTALL_HINT = "pip install 'world-tracing[rerun]' (or pip install rerun-sdk)"


class ViewerUnavailable(RuntimeError):
    """rerun-sdk is not installed; the message is one line naming the extra that brings it."""


def require_rerun():
    """The ``rerun`` module, or :class:`ViewerUnavailable` with a one-line message: rerun-sdk missing (naming
    the extra) or its logging switched off (``RERUN=off``)."""
    try:
        import rerun
    except ImportError:
        raise ViewerUnavailable(f"--rerun needs rerun-sdk, the optional extra `rerun`: {INSTALL_HINT}") from None
    if not rerun.RecordingStream(APPLICATION, recording_id="probe", send_properties=False).is_enabled():
        raise ViewerUnavailable("--rerun: rerun logging is switched off in this environment (RERUN=off)")
    return rerun


@dataclass
class Recording:
    """What :func:`write_rrd` logged: the file, the samples logged (keys), points logged per sample key, clip
    frames found per clip key, and one line per sample that could not be logged."""

    path: Path
    keys: list[str] = field(default_factory=list)
    points: dict[str, int] = field(default_factory=dict)
    frames: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _colours(sample: Sample, colour: str, k, v, u) -> np.ndarray:
    """(M, 3) uint8 colours of the hits at layer/row/column ``k, v, u``."""
    L = sample.layers
    if colour == "layer":
        return layer_colours(L["depth"].shape[0])[k]
    if colour == "normal":
        n = L["normal"][k, v, u].astype(np.float32)
        return np.rint(np.clip((n + 1) * 127.5, 0, 255)).astype(np.uint8)
    if colour == "facing":
        return np.where(L["front_facing"][k, v, u][:, None], ENTERING, EXITING)
    if sample.rgb is None:
        raise ValueError("rgb.png unreadable, cannot colour by image")
    return sample.rgb[v, u]


def _log_camera(rr, rec, root: str, cam: Camera, plane: float, static: bool = False) -> None:
    """The camera pose (camera -> world) and its pinhole in OpenCV axes; the image plane at ``plane``."""
    rec.log(f"{root}/camera", rr.Transform3D(translation=cam.center, mat3x3=cam.rotation.T), static=static)
    rec.log(f"{root}/camera/image", rr.Pinhole(image_from_camera=cam.K, resolution=[cam.width, cam.height],
                                               camera_xyz=rr.ViewCoordinates.RDF, image_plane_distance=plane),
            static=static)


def _near(d: np.ndarray) -> float:
    """An image plane distance for the pinhole: half the nearest finite distance in ``d``, else 1."""
    d = d[np.isfinite(d) & (d > 0)]
    return 0.5 * float(d.min()) if d.size else 1.0


def _log_view(rr, rec, root: str, sample: Sample, colour: str, static: bool = False,
              with_camera: bool = True) -> int:
    """A view (or a clip's frame): camera, image and one points entity per layer. Returns the points logged."""
    xyz, k, v, u = hit_points(sample)
    K = sample.layers["depth"].shape[0]
    rgb = _colours(sample, colour, k, v, u)
    if with_camera:
        _log_camera(rr, rec, root, Camera.from_json(sample.camera), _near(xyz[k == 0, 2]), static)
    if sample.rgb is not None:
        rec.log(f"{root}/camera/image/rgb", rr.Image(sample.rgb), static=static)
    cuts = np.searchsorted(k, np.arange(K + 1))
    for layer in range(K):
        a, b = cuts[layer], cuts[layer + 1]
        rec.log(f"{root}/camera/layers/{layer}", rr.Points3D(xyz[a:b], colors=rgb[a:b]), static=static)
    return len(xyz)


def track_segments(tracks: dict[str, np.ndarray], t: int, trail: int = TRAIL_FRAMES) -> dict[str, np.ndarray]:
    """The drawn tracks' world-space steps shown at clip frame ``t``: per state (visible, hidden, outside) a
    (S, 2, 3) float32 array of segments ``world_xyz[s - 1] -> world_xyz[s]`` for ``s`` in
    ``max(1, t - trail + 1) .. t``, grouped by ``layer_index[s]`` (non-finite ends dropped)."""
    wx, li = tracks["world_xyz"], tracks["layer_index"]
    pick = drawn_tracks(wx.shape[1])
    steps = np.arange(max(1, t - trail + 1), t + 1)
    seg = np.stack([wx[steps - 1][:, pick], wx[steps][:, pick]], axis=2).reshape(-1, 2, 3)
    state = li[steps][:, pick].ravel()
    ok = np.isfinite(seg).all(axis=(1, 2))
    return {name: seg[ok & test(state)].astype(np.float32) for name, (_, test) in TRACK_STATES.items()}


def _log_clip(rr, rec, root: str, sample: Sample, trail: int) -> None:
    """A clip's cameras and tracks on the frame timeline (its frames' images and points: :func:`_log_frame`)."""
    t_ = sample.tracks
    wx, li = t_["world_xyz"], t_["layer_index"]
    if wx.ndim != 3 or li.shape != wx.shape[:2]:
        raise ValueError(f"tracks.npz: world_xyz {wx.shape} and layer_index {li.shape} do not match")
    cams = [Camera.from_json(c) for c in clip_cameras(sample)]
    if len(cams) != wx.shape[0]:
        raise ValueError(f"cameras.json: {len(cams)} cameras for {wx.shape[0]} frames")
    pick = drawn_tracks(wx.shape[1])
    colours = {name: c for name, (c, _) in TRACK_STATES.items()}
    for t, cam in enumerate(cams):
        _at(rec, sample, t)
        _log_camera(rr, rec, root, cam, _near(cam.world_to_camera(wx[t])[:, 2]))
        for name, seg in track_segments(t_, t, trail).items():
            rec.log(f"{root}/tracks/{name}", rr.LineStrips3D(seg, colors=colours[name]))
        state = li[t, pick]
        rgb = np.zeros((len(pick), 3), np.uint8)
        for c, test in TRACK_STATES.values():
            rgb[test(state)] = c
        rec.log(f"{root}/tracks/points", rr.Points3D(wx[t, pick], colors=rgb))
    rec.reset_time()


def _at(rec, clip: Sample, t: int) -> None:
    """Set the clock to the clip's frame ``t``: its position and, if stored, its timestamp (seconds)."""
    rec.set_time(TIMELINE, sequence=t)
    ts = clip.tracks.get("timestamp")
    if ts is not None and ts.shape == clip.tracks["world_xyz"].shape[:1] and np.isfinite(ts[t]):
        rec.set_time("time", duration=float(ts[t]))


def _clip_id(meta) -> tuple | None:
    return (meta.get("sequence_id"), meta.get("clip_index")) if isinstance(meta, dict) else None


def _log_frames(rr, rec, clips: dict[tuple, tuple[str, Sample]], colour: str, rec_out: Recording) -> None:
    """Find the frame samples of ``clips`` ((sequence id, clip index) -> (root, tracks sample)) in the clips'
    shards and log each at its position in the clip (``meta.json`` ``view_index``)."""
    by_shard = defaultdict(set)
    for cid, (_, s) in clips.items():
        by_shard[s.shard].add(cid)
    for shard, wanted in by_shard.items():
        for item in iter_raw([Path(shard)]):
            if not isinstance(item, Sample) or item.is_clip or "meta.json" not in item.files:
                continue
            cid = _clip_id(decode_json(item.files["meta.json"], "meta.json", report=lambda *a: None))
            if cid not in wanted:
                continue
            root, clip = clips[cid]
            T = clip.tracks["world_xyz"].shape[0]
            decode(item)
            t = item.meta.get("view_index") if isinstance(item.meta, dict) else None
            why = item.problems[0].message if item.problems else None
            if why is None and not (isinstance(t, int) and 0 <= t < T):
                why = f"view_index {t!r} is not a frame of the clip's {T}"
            if why is None:
                _at(rec, clip, t)
                try:
                    n = _log_view(rr, rec, root, item, colour, with_camera=False)  # the clip logs cameras
                    rec_out.points[clip.key] = rec_out.points.get(clip.key, 0) + n
                    rec_out.frames[clip.key] = rec_out.frames.get(clip.key, 0) + 1
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    why = f"{type(e).__name__}: {e}"
                rec.reset_time()
            if why is not None:
                rec_out.skipped.append(f"{item.shard}: {item.key}: frame of {clip.key} not logged ({why})")


def write_rrd(samples: list[Sample], out_rrd, colour: str = "layer", trail: int = TRAIL_FRAMES,
              on_skip: Callable[[str], None] | None = None) -> Recording:
    """Log decoded ``samples`` (views and clip track samples; see the module docstring for the entities) to
    the Rerun file ``out_rrd``, with a blueprint holding one tab per sample (its 3D view and its image).

    A sample that cannot be logged (a malformed field) is left out with one line passed to ``on_skip`` and
    kept in ``Recording.skipped``; the others are written. Raises :class:`ViewerUnavailable` without rerun.
    """
    if colour not in COLOURINGS:
        raise ValueError(f"rerun: colour must be one of {'|'.join(COLOURINGS)}, got {colour!r}")
    rr = require_rerun()
    import rerun.blueprint as rrb

    out_rrd = Path(out_rrd)
    out_rrd.parent.mkdir(parents=True, exist_ok=True)
    roots = {s.key: "/" + rr.escape_entity_path_part(s.key) for s in samples}
    blueprint = rrb.Blueprint(rrb.Tabs(*[
        rrb.Horizontal(rrb.Spatial3DView(origin=roots[s.key], name=s.key),
                       rrb.Spatial2DView(origin=f"{roots[s.key]}/camera/image", name=f"{s.key} image"),
                       column_shares=[3, 2])
        for s in samples]))
    rec = rr.RecordingStream(APPLICATION, recording_id=f"{APPLICATION} {out_rrd.name}")
    rec.set_log_time_enabled(False)  # the shards' content only: no wall-clock timeline
    rec.save(out_rrd, default_blueprint=blueprint)
    out = Recording(out_rrd)
    clips: dict[tuple, tuple[str, Sample]] = {}
    with rec:
        for s in samples:
            root = roots[s.key]
            try:
                rec.log(root, rr.ViewCoordinates.RIGHT_HAND_Y_UP, static=True)
                if isinstance(s.meta, dict):
                    rec.log(f"{root}/meta", rr.TextDocument(json.dumps(s.meta, indent=1)), static=True)
                if s.is_clip:
                    _log_clip(rr, rec, root, s, trail)
                    cid = _clip_id(s.meta)
                    if cid is not None and cid[0] is not None:
                        clips[cid] = (root, s)
                else:
                    out.points[s.key] = _log_view(rr, rec, root, s, colour, static=True)
                out.keys.append(s.key)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                out.skipped.append(f"{s.shard}: {s.key}: not logged to {out_rrd} ({type(e).__name__}: {e})")
                rec.reset_time()
        _log_frames(rr, rec, clips, colour, out)
    rec.disconnect()
    if on_skip is not None:
        for line in out.skipped:
            on_skip(line)
    return out
