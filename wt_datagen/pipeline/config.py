"""Render configs: YAML files read into dataclasses, validated on load.

A config file holds the top-level keys of :class:`RenderConfig`; nested sections are the other dataclasses
here. Every key is optional (the defaults are the ``objects`` preset); an unknown key, a wrong type or a value
out of range raises :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..image.lighting import LightingConfig
from ..image.materials import MaterialConfig


class ConfigError(ValueError):
    """A config file that cannot be used: the message names the file and the key."""


@dataclass(frozen=True)
class CameraConfig:
    """Where the cameras go. Angles in degrees; ranges are ``(low, high)``, sampled uniformly.

    ``mode: object``: a sphere shell around the unit box, looking at its centre (plus ``target_jitter``);
    ``radius`` is the distance in unit-box units, ``elevation_deg`` the angle above the x-z plane (y is up),
    sampled uniform in area (in ``sin(elevation)``).
    ``mode: scene``: metric scale; a share ``inside_fraction`` of views stands inside the scene's bounding box
    at ``eye_height`` (fraction of the box height), looking horizontally at a random yaw and ``pitch_deg``;
    the others orbit the box centre at ``radius_scale`` times its half-diagonal, at ``elevation_deg``.
    """

    mode: Literal["object", "scene"] = "object"
    fov_deg: tuple[float, float] = (35.0, 55.0)
    radius: tuple[float, float] = (1.8, 2.8)
    elevation_deg: tuple[float, float] = (-20.0, 60.0)
    target_jitter: float = 0.05
    inside_fraction: float = 0.5
    eye_height: tuple[float, float] = (0.3, 0.7)
    pitch_deg: tuple[float, float] = (-25.0, 15.0)
    radius_scale: tuple[float, float] = (1.0, 1.6)


@dataclass(frozen=True)
class AssetConfig:
    """How assets are loaded: ``up_axis`` is the assets' up (y: glTF, Objaverse, ShapeNet; z: CAD, robotics,
    pybullet_data), turned to the world's y; ``normalise`` fits each into the unit box; bigger meshes than
    ``max_faces`` triangles (all instances together) are skipped; an asset whose material library or texture
    file is missing is rendered untextured with a warning (``missing_texture: untextured``) or skipped
    (``skip``)."""

    up_axis: str = "y"
    normalise: bool = True
    max_faces: int = 2_000_000
    missing_texture: Literal["untextured", "skip"] = "untextured"


@dataclass(frozen=True)
class ImageConfig:
    """The RGB input. ``renderer``: pyrender (OpenGL rasteriser, the fast default), mitsuba (Mitsuba 3 path
    tracer: the ``mitsuba`` extra) or raytrace (shading of layer 0); where OpenGL is unavailable
    ``fallback: raytrace`` uses the ray tracer instead of pyrender, ``none`` skips the asset.

    ``background``: ``environment`` (the lighting's environment is seen), ``random`` (a colour drawn per
    view), ``transparent`` (an RGBA ``rgb.png`` whose alpha is the coverage) or an RGB triple in 0..255.
    ``spp``, ``max_depth``: Mitsuba's samples per pixel and path length; ``mitsuba_variant``: ``auto``
    (``cuda_ad_rgb`` with a GPU, else ``scalar_rgb``) or a variant by name. ``environments``: a folder of
    equirectangular ``.hdr``/``.exr``/``.png``/``.jpg`` images for the ``image`` environment kind.
    ``lighting``: the per-view lighting (:class:`~wt_datagen.image.lighting.LightingConfig`); ``materials``:
    seeded materials for meshes without any (:class:`~wt_datagen.image.materials.MaterialConfig`)."""

    renderer: Literal["pyrender", "raytrace", "mitsuba"] = "pyrender"
    fallback: Literal["raytrace", "none"] = "raytrace"
    background: tuple[int, int, int] | Literal["environment", "random", "transparent"] = (0, 0, 0)
    spp: int = 12
    max_depth: int = 4
    mitsuba_variant: Literal["auto", "scalar_rgb", "cuda_ad_rgb", "llvm_ad_rgb"] = "auto"
    environments: str = ""
    lighting: LightingConfig = field(default_factory=LightingConfig)
    materials: MaterialConfig = field(default_factory=MaterialConfig)


@dataclass(frozen=True)
class OutputConfig:
    """Optional outputs: ``albedo`` adds the base colour at every crossing to ``layers.npz`` (uint8
    (K, H, W, 3), sRGB-encoded)."""

    albedo: bool = False


@dataclass(frozen=True)
class ShardConfig:
    """Shard limits; a shard rolls between assets once either would be exceeded (an asset never spans two
    shards, so one asset larger than the limits gets a shard of its own)."""

    max_samples: int = 1000
    max_megabytes: float = 1024.0


@dataclass(frozen=True)
class EncodingConfig:
    """Compression levels: ``png_level`` zlib (0-9) for ``rgb.png``, ``npz_level`` ISA-L deflate (0-3) for
    ``layers.npz``; 1 costs a fraction of the time of higher levels for a few % in size."""

    png_level: int = 1
    npz_level: int = 1


@dataclass(frozen=True)
class SequenceConfig:
    """Dynamic assets (mesh sequences, ``scene.json`` scenes): clips, their camera trajectories and tracks.

    Each sequence gives ``clips`` clips of ``clip_length`` frames (0: as many as it holds) every
    ``frame_stride`` frames. ``trajectory``: ``static``, ``orbit``, ``dolly`` (straight line, looking at the
    centre), ``random`` (smooth path), or ``mixed`` (one of these per clip). Distances are in units of the
    sequence's bounding-sphere radius over all frames; ``orbit_deg`` the azimuth swept over a clip,
    ``dolly_factor`` end / start distance. Tracks are seeded on the layered hits of clip frame
    ``query_frame`` every ``query_stride`` pixels, then every ``query_every`` frames (0: that frame only)
    wherever no track of the layer lands within half a stride; ``dynamic_rtol`` times the scene size is the
    motion above which a point is dynamic; ``scene_flow`` stores every crossing's next-frame position;
    ``backfill_memory_mb`` bounds the earlier frames' casters kept to fill tracks seeded later (speed only);
    ``fps`` times mesh sequences (a scene.json or sequence.json gives its own). ``detect``: ``auto`` takes a
    folder's numbered mesh files as a mesh sequence when they hold one face array; ``marked`` only folders
    holding ``sequence.json`` (and ``scene.json`` scenes).
    """

    detect: Literal["auto", "marked"] = "auto"
    clips: int = 1
    clip_length: int = 48
    frame_stride: int = 1
    fps: float = 24.0
    trajectory: Literal["mixed", "static", "orbit", "dolly", "random"] = "mixed"
    distance: tuple[float, float] = (2.0, 3.0)
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    fov_deg: tuple[float, float] = (40.0, 60.0)
    orbit_deg: tuple[float, float] = (30.0, 120.0)
    dolly_factor: tuple[float, float] = (0.6, 0.9)
    random_keypoints: int = 4
    query_stride: int = 8
    query_frame: int = 0
    query_every: int = 1
    dynamic_rtol: float = 1e-5
    scene_flow: bool = False
    backfill_memory_mb: int = 512


@dataclass(frozen=True)
class RenderConfig:
    """A resolved render config. ``workers`` changes only how fast, never what is rendered; ``max_crashes``
    only how often an item that kills its worker process is tried (then it is failed)."""

    name: str = ""
    views: int = 24
    resolution: int = 512
    layers: int = 8
    seed: int = 0
    workers: int = 1
    max_crashes: int = 2
    backend: Literal["open3d", "embree"] = "open3d"
    cameras: CameraConfig = field(default_factory=CameraConfig)
    assets: AssetConfig = field(default_factory=AssetConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        """16 hex digits over every setting that changes the samples (all but ``workers`` and ``max_crashes``)."""
        d = self.to_dict()
        d.pop("workers")
        d.pop("max_crashes")
        d["sequences"].pop("backfill_memory_mb")  # how fast, not what
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path, overrides: dict | None = None) -> RenderConfig:
    """Read ``path`` (YAML) into a validated :class:`RenderConfig`; ``overrides`` (top-level keys, e.g. from
    command-line flags; ``None`` values ignored) take precedence over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    data.setdefault("name", path.stem)
    cfg = _build(RenderConfig, data, "", path)
    _check_values(cfg, path)
    return cfg


def config_from_dict(data: dict, source: str = "<dict>") -> RenderConfig:
    """A validated config from a plain dict (as stored in a manifest)."""
    cfg = _build(RenderConfig, data, "", Path(source))
    _check_values(cfg, Path(source))
    return cfg


def _build(cls, data, prefix: str, path: Path):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", path)
    return cls(**kwargs)


def _coerce(tp, value, key: str, path: Path):
    """``value`` checked against the type hint ``tp`` (scalars, Literal, fixed tuples, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", path)
    if origin is Literal:
        choices = list(typing.get_args(tp))
        if value not in choices:
            raise ConfigError(f"{path}: key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # a list of any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{path}: key '{key}' must be a list, got {value!r}")
            return tuple(_coerce(args[0], v, key, path) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: key '{key}' must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, key, path) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):  # one of a few plain forms (e.g. a name or an RGB triple)
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key, path)
            except ConfigError:
                continue
        forms = " or ".join(_describe(option) for option in typing.get_args(tp))
        raise ConfigError(f"{path}: key '{key}' must be {forms}, got {value!r}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{path}: key '{key}' must be {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + str(list(typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return getattr(tp, "__name__", str(tp))


def _check_values(cfg: RenderConfig, path: Path) -> None:
    def need(cond: bool, key: str, what: str, value) -> None:
        if not cond:
            raise ConfigError(f"{path}: key '{key}' {what}, got {value!r}")

    for key in ("views", "resolution", "layers", "workers", "max_crashes"):
        need(getattr(cfg, key) >= 1, key, "must be at least 1", getattr(cfg, key))
    need(cfg.seed >= 0, "seed", "must be non-negative", cfg.seed)
    c = cfg.cameras
    for key in ("fov_deg", "radius", "elevation_deg", "eye_height", "pitch_deg", "radius_scale"):
        a, b = getattr(c, key)
        need(a <= b, f"cameras.{key}", "must be [low, high] with low <= high", [a, b])
    need(0 < c.fov_deg[0] and c.fov_deg[1] < 180, "cameras.fov_deg", "must lie in (0, 180)", list(c.fov_deg))
    need(c.radius[0] > 0, "cameras.radius", "must be positive", list(c.radius))
    need(c.radius_scale[0] > 0, "cameras.radius_scale", "must be positive", list(c.radius_scale))
    need(0 <= c.eye_height[0] and c.eye_height[1] <= 1, "cameras.eye_height", "must lie in [0, 1]",
         list(c.eye_height))
    # |angle| < 90 keeps the viewing direction off the up axis (look_at needs them apart)
    for key in ("elevation_deg", "pitch_deg"):
        a, b = getattr(c, key)
        need(-90 < a and b < 90, f"cameras.{key}", "must lie in (-90, 90)", [a, b])
    need(0 <= c.inside_fraction <= 1, "cameras.inside_fraction", "must be in [0, 1]", c.inside_fraction)
    need(c.target_jitter >= 0, "cameras.target_jitter", "must be non-negative", c.target_jitter)
    im = cfg.image
    if not isinstance(im.background, str):
        need(all(0 <= v <= 255 for v in im.background), "image.background", "must be 3 values in 0..255",
             list(im.background))
    need(im.spp >= 1, "image.spp", "must be at least 1", im.spp)
    need(im.max_depth >= 1, "image.max_depth", "must be at least 1", im.max_depth)
    for key, what, value in im.lighting.problems():
        need(False, f"image.lighting.{key}", what, value)
    need(not (set(im.lighting.environment_kinds) == {"image"} and not im.environments),
         "image.lighting.environment_kinds", "holds only 'image', which needs image.environments (a folder)",
         list(im.lighting.environment_kinds))
    for key in ("saturation", "value", "roughness", "metallic"):
        a, b = getattr(im.materials, key)
        need(0 <= a <= b <= 1, f"image.materials.{key}", "must be [low, high] within [0, 1]", [a, b])
    need(cfg.assets.max_faces >= 1, "assets.max_faces", "must be at least 1", cfg.assets.max_faces)
    need(cfg.assets.up_axis in ("y", "z"), "assets.up_axis", "must be y or z", cfg.assets.up_axis)
    need(cfg.shards.max_samples >= 1, "shards.max_samples", "must be at least 1", cfg.shards.max_samples)
    need(cfg.shards.max_megabytes > 0, "shards.max_megabytes", "must be positive", cfg.shards.max_megabytes)
    need(0 <= cfg.encoding.png_level <= 9, "encoding.png_level", "must be in 0..9", cfg.encoding.png_level)
    need(0 <= cfg.encoding.npz_level <= 3, "encoding.npz_level", "must be in 0..3", cfg.encoding.npz_level)
    # sequences
    q = cfg.sequences
    for key, low in (("clips", 1), ("frame_stride", 1), ("query_stride", 1), ("random_keypoints", 2),
                     ("clip_length", 0), ("query_frame", 0), ("query_every", 0), ("backfill_memory_mb", 0)):
        need(getattr(q, key) >= low, f"sequences.{key}", f"must be at least {low}", getattr(q, key))
    need(q.fps > 0, "sequences.fps", "must be positive", q.fps)
    need(0 < q.dynamic_rtol < 1, "sequences.dynamic_rtol", "must lie in (0, 1) (a fraction of the scene size)",
         q.dynamic_rtol)
    for key in ("distance", "elevation_deg", "fov_deg", "orbit_deg", "dolly_factor"):
        a, b = getattr(q, key)
        need(a <= b, f"sequences.{key}", "must be [low, high] with low <= high", [a, b])
    need(q.distance[0] > 1, "sequences.distance", "must exceed 1 (bounding-sphere radii)", list(q.distance))
    a, b = q.elevation_deg
    need(-90 < a and b < 90, "sequences.elevation_deg", "must lie in (-90, 90)", [a, b])
    a, b = q.fov_deg
    need(0 < a and b < 180, "sequences.fov_deg", "must lie in (0, 180)", [a, b])
    need(q.dolly_factor[0] > 0, "sequences.dolly_factor", "must be positive", list(q.dolly_factor))
    need(q.clip_length == 0 or q.query_frame < q.clip_length, "sequences.query_frame",
         "must be less than clip_length", q.query_frame)
