"""The seeded lighting and background of a view, shared by every image renderer.

:func:`draw_lighting` makes a :class:`Lighting` from the config's ranges, a pure function of (seed, item id,
view) like the cameras: an environment (``constant``, ``gradient`` sky, ``sunsky``, or an equirectangular
``image`` from the user's folder), zero to three extra ``directional`` or ``spot`` lights with an intensity,
a colour temperature and a direction, shadows, and the background (the environment itself, a fixed or a
random colour, or transparent). A Lighting is plain data: ``to_json``/``from_json`` store it in
``meta.json``, so a sample can be re-rendered. Each renderer turns it into what it can do (README "The
image"): Mitsuba everything; pyrender the lights with shadow maps plus the environment as ambient light (and
its sun, or an environment image's brightest region, as a directional light).

Units: radiance and irradiance in the renderers' linear RGB; a light's ``intensity`` is its irradiance at the
object's centre (a white Lambertian surface facing it looks ``intensity / pi`` bright), so directional and
spot lights of the same intensity light the object alike. World y is up; directions point towards the light.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..camera import Camera
from .materials import linear_to_srgb, srgb_to_linear, to_uint8

ENVIRONMENT_KINDS = ("constant", "gradient", "sunsky", "image")
LIGHT_KINDS = ("directional", "spot")
ENVIRONMENT_SUFFIXES = (".hdr", ".exr", ".png", ".jpg", ".jpeg")
SUNSKY_SCALE = 1.5  # Mitsuba's sunsky at scale 1 gives ~1.4 sun irradiance (noon); this times the intensity
HEADLIGHT_INTENSITY, HEADLIGHT_AMBIENT = 3.0, 0.3  # the fixed look of `mode: headlight` (pyrender's before)
MITSUBA_EXTRA = "pip install -e '.[mitsuba]' in the project (or: pip install mitsuba drjit)"


class LightingError(ValueError):
    """Unusable lighting settings or environment images; one line naming the file or key."""


@dataclass(frozen=True)
class LightingConfig:
    """Ranges of the per-view lighting (``image.lighting`` in a render config); ``[low, high]`` uniform.

    ``mode``: ``random`` (drawn per view from the ranges below) or ``headlight`` (every view alike: a light
    at the camera plus ambient, the look before lighting was randomised). ``environment_kinds``: drawn
    uniformly per view (``image`` needs ``image.environments``, and is left out without it).
    ``environment_intensity``: the environment's mean radiance (constant: its value; gradient: the zenith;
    image: the image scaled to this mean luminance; sunsky: the scale of Mitsuba's sun and sky, 1.5 x this).
    ``lights``: how many extra lights, inclusive. ``light_intensity``: irradiance at the object's centre;
    ``light_temperature_k``: colour temperature (kelvin, Planck's law); ``light_elevation_deg`` above the
    horizontal and ``light_azimuth_deg`` about the up axis relative to the camera (0: from behind the
    camera), also used for the sun. ``shadows``: pyrender's shadow maps (Mitsuba always traces shadows).
    """

    mode: Literal["random", "headlight"] = "random"
    environment_kinds: tuple[str, ...] = ENVIRONMENT_KINDS
    environment_intensity: tuple[float, float] = (0.4, 1.0)
    environment_temperature_k: tuple[float, float] = (4500.0, 12000.0)
    turbidity: tuple[float, float] = (2.0, 6.0)
    lights: tuple[int, int] = (0, 3)
    light_kinds: tuple[str, ...] = LIGHT_KINDS
    light_intensity: tuple[float, float] = (0.5, 3.0)
    light_temperature_k: tuple[float, float] = (2700.0, 9000.0)
    light_elevation_deg: tuple[float, float] = (10.0, 75.0)
    light_azimuth_deg: tuple[float, float] = (-150.0, 150.0)
    shadows: bool = True

    def problems(self) -> list[tuple[str, str, object]]:
        """(key, what is wrong, value) for every bad value (the config loader reports the first)."""
        out = []
        for key in ("environment_intensity", "environment_temperature_k", "turbidity", "lights", "light_intensity",
                    "light_temperature_k", "light_elevation_deg", "light_azimuth_deg"):
            a, b = getattr(self, key)
            if not a <= b:
                out.append((key, "must be [low, high] with low <= high", [a, b]))
        if not 0 <= self.lights[0] and self.lights[1] <= 3:
            out.append(("lights", "must lie in [0, 3]", list(self.lights)))
        for key in ("environment_intensity", "light_intensity"):
            if getattr(self, key)[0] < 0:
                out.append((key, "must be non-negative", list(getattr(self, key))))
        for key in ("environment_temperature_k", "light_temperature_k"):
            if not (1000 <= getattr(self, key)[0] and getattr(self, key)[1] <= 40000):
                out.append((key, "must lie in [1000, 40000] kelvin", list(getattr(self, key))))
        if not (1 <= self.turbidity[0] and self.turbidity[1] <= 10):
            out.append(("turbidity", "must lie in [1, 10]", list(self.turbidity)))
        a, b = self.light_elevation_deg
        if not (-90 <= a and b <= 90):
            out.append(("light_elevation_deg", "must lie in [-90, 90]", [a, b]))
        for key, known in (("environment_kinds", ENVIRONMENT_KINDS), ("light_kinds", LIGHT_KINDS)):
            kinds = getattr(self, key)
            if not kinds or any(k not in known for k in kinds):
                out.append((key, f"must be a non-empty list of {list(known)}", list(kinds)))
        return out


@dataclass(frozen=True)
class Light:
    """One extra light. ``direction``: (3,) unit vector from the object's centre towards the light (world);
    ``colour``: (3,) linear RGB of luminance 1 (from ``temperature_k``); ``intensity``: irradiance at the
    centre. A spot sits at ``centre + distance * direction`` aiming at the centre, full within
    ``inner_deg`` of its axis and dark beyond ``outer_deg``."""

    kind: str
    direction: tuple[float, float, float]
    colour: tuple[float, float, float]
    intensity: float
    temperature_k: float
    distance: float = 0.0
    inner_deg: float = 0.0
    outer_deg: float = 0.0

    def position(self, centre) -> np.ndarray:
        return np.asarray(centre, dtype=np.float64) + self.distance * np.asarray(self.direction)


@dataclass(frozen=True)
class Environment:
    """The light from everywhere else. ``kind``: constant (``colour``), gradient (``colour`` at the zenith,
    ``horizon`` and ``ground``), sunsky (``sun_direction``, ``turbidity``, ``scale``), image (``file``
    relative to the environments folder, its ``sha256``, ``rotation_deg`` about the up axis, ``scale``
    multiplying its linear values). ``headlight`` is the constant ambient of ``mode: headlight``."""

    kind: str
    colour: tuple[float, float, float] = (0.0, 0.0, 0.0)
    horizon: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ground: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sun_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    turbidity: float = 3.0
    scale: float = 1.0
    file: str = ""
    sha256: str = ""
    rotation_deg: float = 0.0


@dataclass(frozen=True)
class Background:
    """What is seen where no surface is: ``environment``, ``colour`` (``colour`` RGB 0..255) or
    ``transparent`` (an RGBA image whose alpha is the coverage)."""

    mode: str
    colour: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Lighting:
    """The lighting and background of one view; ``centre`` and ``radius`` (world) locate the object."""

    environment: Environment
    lights: tuple[Light, ...] = ()
    background: Background = field(default_factory=lambda: Background("colour"))
    shadows: bool = True
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radius: float = 1.0
    headlight: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Lighting:
        env = Environment(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["environment"].items()})
        lights = tuple(Light(**{k: tuple(v) if isinstance(v, list) else v for k, v in x.items()})
                       for x in d["lights"])
        bg = Background(d["background"]["mode"], tuple(d["background"]["colour"]))
        return cls(env, lights, bg, bool(d["shadows"]), tuple(d["centre"]), float(d["radius"]),
                   bool(d.get("headlight", False)))


def headlight(background: Background, centre=(0.0, 0.0, 0.0), radius: float = 1.0) -> Lighting:
    """``mode: headlight``: a white directional light from the camera plus a constant ambient."""
    return Lighting(Environment("headlight", colour=(HEADLIGHT_AMBIENT,) * 3), (), background, False,
                    tuple(map(float, centre)), float(radius), headlight=True)


# ------------------------------------------------------------------------------------------ colour


def blackbody_rgb(temperature_k: float) -> np.ndarray:
    """(3,) linear sRGB (Rec. 709 primaries) colour of a black body at ``temperature_k`` kelvin, luminance 1.

    Planck's law integrated against the CIE 1931 2-degree colour matching functions (the multi-lobe Gaussian
    fit of Wyman, Sloan and Shirley 2013), then XYZ to linear sRGB; negative components clipped."""
    lam = np.arange(380.0, 781.0, 5.0)  # nm

    def g(x, mu, s1, s2):
        return np.exp(-0.5 * ((x - mu) / np.where(x < mu, s1, s2)) ** 2)

    xbar = 1.056 * g(lam, 599.8, 37.9, 31.0) + 0.362 * g(lam, 442.0, 16.0, 26.7) - 0.065 * g(lam, 501.1, 20.4, 26.2)
    ybar = 0.821 * g(lam, 568.8, 46.9, 40.5) + 0.286 * g(lam, 530.9, 16.3, 31.1)
    zbar = 1.217 * g(lam, 437.0, 11.8, 36.0) + 0.681 * g(lam, 459.0, 26.0, 13.8)
    m = lam * 1e-9
    planck = 1.0 / (m**5 * np.expm1(1.4387769e-2 / (m * float(temperature_k))))
    xyz = np.array([np.sum(planck * xbar), np.sum(planck * ybar), np.sum(planck * zbar)])
    xyz /= xyz[1]
    rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]) @ xyz
    rgb = np.clip(rgb, 0, None)
    return rgb / (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2])


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luminance of (..., 3) linear RGB."""
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.2126, 0.7152, 0.0722])


def direction(azimuth_rad, elevation_rad) -> np.ndarray:
    """(..., 3) unit vectors, y up: azimuth about y from +z, elevation above the xz plane."""
    a, e = np.asarray(azimuth_rad, dtype=np.float64), np.asarray(elevation_rad, dtype=np.float64)
    return np.stack([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)], axis=-1)


# ------------------------------------------------------------------------------ environment images


@dataclass(frozen=True)
class EnvironmentFile:
    """An environment image of the user's folder: ``path``, ``name`` relative to the folder, ``sha256``,
    ``mean`` linear luminance over the sphere (solid-angle weighted)."""

    path: str
    name: str
    sha256: str
    mean: float


_ENV_CACHE: dict[str, np.ndarray] = {}


def read_environment(path: str | Path) -> np.ndarray:
    """(h, w, 3) float32 linear RGB of an equirectangular image: ``.png``/``.jpg`` (8-bit sRGB, through
    PIL), ``.hdr``/``.exr`` (through Mitsuba's Bitmap: needs the mitsuba extra). Kept per process.
    Raises :class:`LightingError` (one line) if it cannot be read."""
    key = str(path)
    if key in _ENV_CACHE:
        return _ENV_CACHE[key]
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(p) as im:
                img = srgb_to_linear(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        elif suffix in (".hdr", ".exr"):
            try:
                import mitsuba as mi

                if not mi.variant():
                    mi.set_variant("scalar_rgb")
            except ImportError:
                raise LightingError(f"{p}: reading {suffix} environment images needs Mitsuba: {MITSUBA_EXTRA}") \
                    from None
            bmp = mi.Bitmap(str(p)).convert(mi.Bitmap.PixelFormat.RGB, mi.Struct.Type.Float32, srgb_gamma=False)
            img = np.array(bmp, dtype=np.float32).reshape(bmp.height(), bmp.width(), 3)
        else:
            raise LightingError(f"{p}: not an environment image (expected one of {', '.join(ENVIRONMENT_SUFFIXES)})")
    except LightingError:
        raise
    except Exception as e:  # PIL and Mitsuba raise many kinds for damaged files
        raise LightingError(f"{p}: unreadable environment image ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    if img.ndim != 3 or img.shape[0] < 2 or img.shape[1] < 2 or not np.isfinite(img).all() or img.min() < 0:
        raise LightingError(f"{p}: unusable environment image (empty, negative or non-finite values)")
    _ENV_CACHE[key] = img
    return img


def _solid_angle_weights(h: int, w: int) -> np.ndarray:
    """(h, 1) solid angle of each row's texels of an equirectangular image (sum over all: 4 pi)."""
    theta = (np.arange(h) + 0.5) * np.pi / h
    return (np.sin(theta) * (np.pi / h) * (2 * np.pi / w))[:, None]


class Environments:
    """The environment images under a folder (sorted by relative path, hidden files skipped), listed at
    once; each is read when first drawn (:meth:`info`), or all at once by :meth:`check` (start-up).
    Raises :class:`LightingError` naming the folder if it does not exist or holds no image."""

    def __init__(self, folder: str | Path):
        self.root = Path(folder)
        if not self.root.is_dir():
            raise LightingError(f"{self.root}: environments folder does not exist")
        self.paths = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in ENVIRONMENT_SUFFIXES
                             and p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(self.root).parts)),
                            key=lambda p: p.relative_to(self.root).as_posix())
        if not self.paths:
            raise LightingError(f"{self.root}: no environment images ({', '.join(ENVIRONMENT_SUFFIXES)}) "
                                "in the folder")
        self._info: dict[int, EnvironmentFile] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def info(self, i: int) -> EnvironmentFile:
        """Name, sha256 and mean luminance of image ``i`` (read once per process)."""
        if i not in self._info:
            p = self.paths[i]
            img = read_environment(p)
            wgt = _solid_angle_weights(*img.shape[:2])
            mean = float((luminance(img) * wgt).sum() / (wgt.sum() * img.shape[1]))
            if not mean > 0:
                raise LightingError(f"{p}: environment image is black")
            self._info[i] = EnvironmentFile(str(p), p.relative_to(self.root).as_posix(),
                                            hashlib.sha256(p.read_bytes()).hexdigest(), mean)
        return self._info[i]

    def check(self) -> None:
        """Read every image (start-up: an unreadable one is an error now, not half-way through a run)."""
        for i, p in enumerate(self.paths):
            self.info(i)
            _ENV_CACHE.pop(str(p), None)  # checked; the images drawn are read again when needed


_ENVIRONMENTS: dict[str, Environments] = {}


def environments(folder: str | Path) -> Environments:
    """The :class:`Environments` of ``folder``, kept per process."""
    key = str(folder)
    if key not in _ENVIRONMENTS:
        _ENVIRONMENTS[key] = Environments(folder)
    return _ENVIRONMENTS[key]


def equirect_uv(d: np.ndarray, rotation_deg: float = 0.0) -> np.ndarray:
    """(..., 2) texture coordinates (u right, v down, in [0, 1)) of world directions in an equirectangular
    image with y up, turned by ``rotation_deg`` about y: Mitsuba's ``envmap`` convention (u = 0 looks
    along -z, u = 0.25 along +x; v = 0 is the zenith)."""
    a = np.radians(rotation_deg)
    x = np.cos(a) * d[..., 0] - np.sin(a) * d[..., 2]  # the inverse of the environment's turn about y
    z = np.sin(a) * d[..., 0] + np.cos(a) * d[..., 2]
    u = np.mod(np.arctan2(x, -z) / (2 * np.pi), 1.0)
    v = np.arccos(np.clip(d[..., 1] / np.maximum(np.linalg.norm(d, axis=-1), 1e-30), -1, 1)) / np.pi
    return np.stack([u, v], axis=-1)


# ------------------------------------------------------------------------------ sun and sky tables

# Mitsuba 3.9's `sunsky` at scale 1 (turned y-up), measured with its path tracer (2048 spp on a white
# Lambertian plane): the sun's irradiance on a surface facing it and the sky's mean radiance (horizontal
# irradiance / pi), by sun elevation (rows, degrees) and turbidity (columns). pyrender draws the sun as a
# directional light and the sky as ambient light from these.
_SUN_ELEVATION = np.array([5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0])
_TURBIDITY = np.array([2.0, 4.0, 6.0, 8.0])
SUNSKY_MIN_ELEVATION = 5.0  # below it Mitsuba's sky model gives negative values
# Per elevation, two lines: the sun's RGB irradiance for each turbidity, then the sky's RGB mean radiance.
_SUNSKY = np.array("""
    0.763 0.346 0.046 0.482 0.21 0.029 0.282 0.117 0.016 0.104 0.039 0.006
        0.0213 0.0286 0.0334 0.0281 0.0325 0.0338 0.0334 0.0352 0.0339 0.0379 0.0369 0.0332
    1.087 0.664 0.236 0.857 0.513 0.185 0.652 0.382 0.14 0.397 0.223 0.085
        0.0259 0.0396 0.0539 0.0382 0.048 0.0557 0.0492 0.0544 0.057 0.0598 0.0595 0.0574
    1.339 0.99 0.562 1.188 0.868 0.496 1.035 0.746 0.429 0.804 0.564 0.33
        0.032 0.0535 0.0832 0.052 0.0689 0.0888 0.0711 0.0817 0.0934 0.0929 0.0948 0.0984
    1.433 1.131 0.752 1.321 1.033 0.69 1.202 0.931 0.625 1.011 0.77 0.522
        0.0362 0.0622 0.1045 0.0617 0.083 0.1147 0.0864 0.1025 0.1246 0.1204 0.1276 0.1372
    1.497 1.232 0.906 1.413 1.156 0.853 1.322 1.074 0.795 1.17 0.939 0.7
        0.0398 0.0697 0.1271 0.0695 0.0958 0.1448 0.1002 0.1238 0.1631 0.1497 0.168 0.1904
    1.526 1.28 0.985 1.456 1.215 0.937 1.379 1.144 0.885 1.248 1.025 0.798
        0.0425 0.074 0.1391 0.0717 0.1026 0.1627 0.1056 0.1341 0.186 0.1608 0.187 0.223
    1.544 1.309 1.035 1.482 1.252 0.992 1.414 1.188 0.944 1.297 1.08 0.862
        0.047 0.0849 0.146 0.0803 0.1077 0.1596 0.1144 0.1416 0.1711 0.1594 0.1721 0.1929
""".split(), dtype=np.float64).reshape(len(_SUN_ELEVATION), 2, len(_TURBIDITY), 3)
_SUN_E, _SKY_L = _SUNSKY[:, 0], _SUNSKY[:, 1]  # (elevation, turbidity, RGB)


def sunsky_summary(env: Environment) -> tuple[np.ndarray, np.ndarray]:
    """(3,) sun irradiance and (3,) mean sky radiance of a sunsky environment (scale included), from the
    table measured on Mitsuba."""
    el = np.degrees(np.arcsin(np.clip(env.sun_direction[1], -1, 1)))
    i = np.clip(np.interp(el, _SUN_ELEVATION, np.arange(len(_SUN_ELEVATION))), 0, len(_SUN_ELEVATION) - 1)
    j = np.clip(np.interp(env.turbidity, _TURBIDITY, np.arange(len(_TURBIDITY))), 0, len(_TURBIDITY) - 1)

    def bilinear(t):
        i0, j0 = int(min(i, len(_SUN_ELEVATION) - 2)), int(min(j, len(_TURBIDITY) - 2))
        fi, fj = i - i0, j - j0
        return ((1 - fi) * ((1 - fj) * t[i0, j0] + fj * t[i0, j0 + 1])
                + fi * ((1 - fj) * t[i0 + 1, j0] + fj * t[i0 + 1, j0 + 1]))

    sun = bilinear(_SUN_E) * env.scale if el > 0 else np.zeros(3)
    return sun, bilinear(_SKY_L) * env.scale


# ------------------------------------------------------------------------------ radiance and summary


def environment_radiance(env: Environment, d: np.ndarray, folder: str | Path | None = None) -> np.ndarray:
    """(..., 3) float32 linear radiance of ``env`` seen along world directions ``d`` (..., 3).

    Exact for constant, gradient and image environments (what Mitsuba is given); for sunsky an
    approximation (a gradient of the sky's mean colour and a sun disk of 2 degrees), used for pyrender's
    backgrounds and contact sheets. ``folder``: where an image environment's ``file`` lies."""
    d = np.asarray(d, dtype=np.float64)
    n = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-30)
    up = n[..., 1:2]
    if env.kind in ("constant", "headlight"):
        out = np.broadcast_to(np.asarray(env.colour), n.shape)
    elif env.kind == "gradient":
        zenith, horizon, ground = (np.asarray(c) for c in (env.colour, env.horizon, env.ground))
        t = np.sqrt(np.clip(up, 0, 1))
        sky = horizon + (zenith - horizon) * t
        below = horizon + (ground - horizon) * np.clip(-up * 4.0, 0, 1)
        out = np.where(up >= 0, sky, below)
    elif env.kind == "sunsky":
        sun, sky = sunsky_summary(env)
        t = np.sqrt(np.clip(up, 0, 1))
        out = np.where(up >= 0, sky * (1.4 - 0.8 * t), sky * 0.3)
        cos = n @ np.asarray(env.sun_direction, dtype=np.float64)
        disk = np.cos(np.radians(2.0))
        solid = 2 * np.pi * (1 - disk)
        out = out + (cos[..., None] >= disk) * sun / solid
    elif env.kind == "image":
        if folder is None:
            raise LightingError(f"environment image {env.file}: no environments folder given")
        img = read_environment(Path(folder) / env.file)
        h, w = img.shape[:2]
        uv = equirect_uv(n, env.rotation_deg)
        # bilinear on texel centres, u wrapping (as Mitsuba's envmap filters)
        x, y = uv[..., 0] * w - 0.5, np.clip(uv[..., 1] * h - 0.5, 0, h - 1)
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = (x - x0)[..., None], (y - y0)[..., None]
        x0, y0 = x0.astype(np.int64) % w, y0.astype(np.int64)
        x1, y1 = (x0 + 1) % w, np.minimum(y0 + 1, h - 1)
        out = ((img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy)
               + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy) * env.scale
    else:
        raise LightingError(f"unknown environment kind {env.kind!r}")
    return np.asarray(out, dtype=np.float32)


def background_image(lighting: Lighting, camera: Camera, folder: str | Path | None = None) -> np.ndarray:
    """(H, W, 3) uint8 sRGB: the environment seen through every pixel centre of ``camera``."""
    _, d = camera.world_rays()
    return to_uint8(linear_to_srgb(environment_radiance(lighting.environment, d, folder)))


def environment_thumbnail(env: Environment, folder: str | Path | None = None, height: int = 16) -> np.ndarray:
    """(height, 2 height, 3) uint8 sRGB latitude-longitude picture of the environment (Mitsuba's convention:
    u = 0 looks along -z, v = 0 at the zenith), for ``meta.json`` and contact sheets."""
    return to_uint8(linear_to_srgb(environment_radiance(env, grid_directions(height, 2 * height), folder)))


def environment_summary(env: Environment, folder: str | Path | None = None) -> tuple[np.ndarray, list[Light]]:
    """What a rasteriser can use of ``env``: (3,) ambient radiance and directional lights.

    sunsky: the sky's mean radiance (table measured on Mitsuba) and the sun. Otherwise the environment is
    integrated over the sphere (a 128 x 256 grid): ``d`` is the direction of its luminance-weighted mean
    (its irradiance vector), ``E+`` and ``E-`` the irradiance it gives a surface facing ``d`` and one facing
    away; ambient ``E- / pi`` plus a directional light of irradiance ``E+ - E-`` along ``d`` give both of
    those surfaces exactly what the environment gives them (and a sun in an image becomes that light)."""
    if env.kind == "sunsky":
        sun, sky = sunsky_summary(env)
        lights = []
        if luminance(sun) > 0:
            lum = float(luminance(sun))
            lights.append(Light("directional", tuple(env.sun_direction), tuple(sun / lum), lum, 5778.0))
        return sky, lights
    h, w = 128, 256
    dirs = grid_directions(h, w)
    radiance = environment_radiance(env, dirs, folder).astype(np.float64)  # (h, w, 3)
    solid = np.broadcast_to(_solid_angle_weights(h, w), (h, w))[..., None]
    vector = ((luminance(radiance)[..., None] * solid) * dirs).sum(axis=(0, 1))
    if np.linalg.norm(vector) < 1e-12:
        return (radiance * solid).sum(axis=(0, 1)).astype(np.float32) / (4 * np.pi), []
    d = vector / np.linalg.norm(vector)
    cos = dirs @ d
    front = (radiance * solid * np.clip(cos, 0, None)[..., None]).sum(axis=(0, 1))
    back = (radiance * solid * np.clip(-cos, 0, None)[..., None]).sum(axis=(0, 1))
    directional = np.clip(front - back, 0, None)
    lights = []
    lum = float(luminance(directional))
    if lum > 1e-6:
        lights.append(Light("directional", tuple(float(x) for x in d), tuple(directional / lum), lum, 0.0))
    return (back / np.pi).astype(np.float32), lights


def grid_directions(h: int, w: int) -> np.ndarray:
    """(h, w, 3) world directions of the texel centres of an equirectangular image (Mitsuba's convention)."""
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    phi = u[None, :] * 2 * np.pi
    theta = v[:, None] * np.pi
    # inverse of equirect_uv: u = atan2(x, -z) / 2pi, v = acos(y) / pi
    x = np.sin(theta) * np.sin(phi)
    z = -np.sin(theta) * np.cos(phi)
    y = np.broadcast_to(np.cos(theta), x.shape)
    return np.stack([x, y, z], axis=-1)


# ------------------------------------------------------------------------------------------ drawing


def lighting_rng(seed: int, item_id: str, index: int) -> np.random.Generator:
    """A generator seeded by a hash of ``(seed, item_id, "lighting", index)`` (stable across runs), separate
    from the camera's stream so that adding lighting did not move any camera."""
    digest = hashlib.blake2b(f"{seed}/{item_id}/lighting/{index}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sampler_seed(seed: int, key: str) -> int:
    """A renderer's sampler seed for the sample ``key``, in [0, 2^31)."""
    digest = hashlib.blake2b(f"{seed}/{key}/sampler".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def background_of(spec, rng: np.random.Generator) -> Background:
    """The config's ``image.background`` (``environment``, ``random``, ``transparent`` or an RGB triple)."""
    if isinstance(spec, str):
        if spec == "random":
            return Background("colour", tuple(int(c) for c in rng.integers(0, 256, 3)))
        return Background(spec)
    return Background("colour", tuple(int(c) for c in spec))


def draw_lighting(cfg: LightingConfig, background, seed: int, item_id: str, index: int, camera: Camera,
                  centre, radius: float, envs: Environments | None = None) -> Lighting:
    """The lighting of one view (or one clip: ``index`` is the clip), a pure function of its arguments.

    background: ``image.background`` of the config. camera: the view's (the first frame's for a clip);
    azimuths are relative to it. centre (3,), radius: the object's bounding sphere (world). envs: the
    environments folder's images (the ``image`` kind is drawn only if given).
    """
    rng = lighting_rng(seed, item_id, index)
    bg = background_of(background, rng)
    centre = tuple(float(c) for c in np.asarray(centre, dtype=np.float64))
    radius = float(max(radius, 1e-9))
    if cfg.mode == "headlight":
        return headlight(bg, centre, radius)
    forward = camera.rotation[2]  # the camera's viewing direction in world coordinates
    view_azimuth = np.arctan2(-forward[0], -forward[2])  # azimuth of the direction back to the camera

    def towards(elevation_deg: tuple[float, float]) -> tuple[float, float, float]:
        az = view_azimuth + np.radians(rng.uniform(*cfg.light_azimuth_deg))
        el = np.radians(rng.uniform(*elevation_deg))
        return tuple(float(x) for x in direction(az, el))

    kinds = [k for k in cfg.environment_kinds if k != "image" or envs]
    kind = str(kinds[int(rng.integers(len(kinds)))])
    intensity = float(rng.uniform(*cfg.environment_intensity))
    tint = blackbody_rgb(rng.uniform(*cfg.environment_temperature_k))
    if kind == "constant":
        env = Environment("constant", colour=_t(intensity * tint))
    elif kind == "gradient":
        horizon = intensity * float(rng.uniform(0.6, 1.2)) * blackbody_rgb(rng.uniform(4000, 7000))
        ground = intensity * float(rng.uniform(0.05, 0.4)) * np.array([1.0, 0.9, 0.75])
        env = Environment("gradient", colour=_t(intensity * tint), horizon=_t(horizon), ground=_t(ground))
    elif kind == "sunsky":
        low = SUNSKY_MIN_ELEVATION
        sun = towards((max(cfg.light_elevation_deg[0], low), max(cfg.light_elevation_deg[1], low)))
        env = Environment("sunsky", sun_direction=sun, turbidity=float(rng.uniform(*cfg.turbidity)),
                          scale=SUNSKY_SCALE * intensity)
    else:
        f = envs.info(int(rng.integers(len(envs))))
        env = Environment("image", file=f.name, sha256=f.sha256, rotation_deg=float(rng.uniform(0, 360)),
                          scale=intensity / f.mean)
    lights = []
    for _ in range(int(rng.integers(cfg.lights[0], cfg.lights[1] + 1))):
        lk = str(cfg.light_kinds[int(rng.integers(len(cfg.light_kinds)))])
        d = towards(cfg.light_elevation_deg)
        temp = float(rng.uniform(*cfg.light_temperature_k))
        power = float(rng.uniform(*cfg.light_intensity))
        if lk == "spot":
            dist = float(rng.uniform(2.5, 4.0)) * radius
            outer = float(np.degrees(np.arctan2(1.3 * radius, dist)))
            lights.append(Light("spot", d, _t(blackbody_rgb(temp)), power, temp, dist, 0.6 * outer, outer))
        else:
            lights.append(Light("directional", d, _t(blackbody_rgb(temp)), power, temp))
    return Lighting(env, tuple(lights), bg, cfg.shadows, centre, radius)


def _t(x) -> tuple[float, float, float]:
    return tuple(float(round(v, 7)) for v in np.asarray(x, dtype=np.float64).reshape(3))
