"""Physically based images through Mitsuba 3 (``image.renderer: mitsuba``), pixel-aligned with layer 0.

The scene is built from the very triangles the caster gets (our trimesh meshes: vertex positions, faces,
uv, vertex normals), with each mesh's :class:`~.materials.Material` mapped to Mitsuba's principled BSDF
(base colour texture baked with its factor in linear light, metallic, roughness, their texture, vertex or
face colours through mesh attributes, an area emitter for emissive materials, an opacity mask for glTF
``alphaMode: MASK``), all two-sided like the caster. The camera is Mitsuba's perspective sensor with the
same focal length and principal point (``principal_point_offset_*``), a box pixel filter and no sample
border, so pixel (u, v) integrates exactly the square [u, u + 1) x [v, v + 1) whose centre is the caster's
ray. Mitsuba's sensor has square pixels and no skew: other cameras are refused (:func:`check_camera`).

The variant is chosen once per process (:func:`load_mitsuba`): ``cuda_ad_rgb`` where a CUDA GPU works,
else ``scalar_rgb``. The ``llvm_ad_*`` variants are never chosen automatically (they crash on machines whose
system LLVM is older than Dr.Jit expects, LLVM 15 for instance); ask for one explicitly with
``image.mitsuba_variant``. The sampler's seed is fixed per view, and Mitsuba's image blocks do not overlap
with a box filter, so an image is the same bits whatever the threads or workers.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import trimesh

from ..camera import Camera
from .lighting import (
    HEADLIGHT_INTENSITY,
    MITSUBA_EXTRA,
    Lighting,
    environment_radiance,
    grid_directions,
    read_environment,
)
from .materials import Material, linear_to_srgb, srgb_to_linear, to_uint8

ENVMAP_SIZE = (64, 128)  # rows, columns of the equirectangular map a gradient environment is given as


class MitsubaUnavailable(RuntimeError):
    """Mitsuba cannot be used here (not installed, or the variant does not load); one line naming the fix."""


_STATE: dict = {}  # "mi", "dr", "variant", "threads", "pid"


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or bool(glob.glob("/dev/nvidia[0-9]*"))


def load_mitsuba(variant: str = "auto"):
    """The ``mitsuba`` module with a variant set (once per process): ``auto`` picks ``cuda_ad_rgb`` where a
    CUDA GPU answers, else ``scalar_rgb``. Raises :class:`MitsubaUnavailable` naming the extra to install."""
    if _STATE.get("pid") == os.getpid():
        return _STATE["mi"]
    try:
        import drjit as dr
        import mitsuba as mi
    except ImportError as e:
        raise MitsubaUnavailable(f"image.renderer mitsuba needs Mitsuba 3 and Dr.Jit ({e}); install the "
                                 f"extra: {MITSUBA_EXTRA}") from None
    chosen = variant
    if variant == "auto":
        chosen = "scalar_rgb"
        if gpu_present() and "cuda_ad_rgb" in mi.variants():
            try:
                mi.set_variant("cuda_ad_rgb")
                dr.eval(mi.Float(1.0) + 1.0)  # a kernel launch: the driver and the GPU answer
                chosen = "cuda_ad_rgb"
            except Exception:
                chosen = "scalar_rgb"
    if chosen not in mi.variants():
        raise MitsubaUnavailable(f"image.mitsuba_variant {chosen!r} is not in this Mitsuba build "
                                 f"(has: {', '.join(mi.variants())})")
    try:
        mi.set_variant(chosen)
    except Exception as e:
        raise MitsubaUnavailable(f"Mitsuba variant {chosen} does not load ({type(e).__name__}: {e})") from None
    mi.set_log_level(mi.LogLevel.Error)  # warnings (e.g. about odd sample values) would flood the console
    _STATE.update(mi=mi, dr=dr, variant=chosen, pid=os.getpid())
    return mi


def variant() -> str:
    """The variant this process renders with (after :func:`load_mitsuba`)."""
    return _STATE.get("variant", "")


def set_threads(n: int) -> None:
    """Rendering threads of this process (0: one per core); scalar variants only."""
    mi = load_mitsuba()
    dr = _STATE["dr"]
    n = n or os.cpu_count() or 1
    if _STATE.get("threads") != n and mi.variant().startswith("scalar"):
        dr.set_thread_count(n)
        _STATE["threads"] = n


def check_camera(camera: Camera) -> None:
    """Raise ValueError (one line) for a camera Mitsuba's perspective sensor cannot express: skew, or
    non-square pixels (fx != fy beyond 1e-9 relative)."""
    K = camera.K
    if K[0, 1] != 0:
        raise ValueError(f"mitsuba: camera with skew K[0,1]={K[0, 1]:g} cannot be expressed by Mitsuba's "
                         "perspective sensor (square pixels, no skew); use image.renderer pyrender")
    if abs(K[0, 0] - K[1, 1]) > 1e-9 * K[0, 0]:
        raise ValueError(f"mitsuba: camera with non-square pixels (fx={K[0, 0]:g}, fy={K[1, 1]:g}) cannot be "
                         "expressed by Mitsuba's perspective sensor; use image.renderer pyrender")


# ------------------------------------------------------------------------------------------ scene


def _rgb(mi, value) -> dict:
    return {"type": "rgb", "value": [float(v) for v in np.asarray(value, dtype=np.float64).reshape(3)]}


def _bitmap(mi, array: np.ndarray, filter_type: str = "bilinear") -> dict:
    """A raw (no colour conversion) float bitmap texture, repeating."""
    bmp = mi.Bitmap(np.ascontiguousarray(array, dtype=np.float32))
    return {"type": "bitmap", "bitmap": bmp, "raw": True, "filter_type": filter_type, "wrap_mode": "repeat"}


def _bsdf(mi, material: Material) -> dict:
    """The principled BSDF of a material, two-sided, masked for glTF ``MASK``."""
    factor = np.asarray(material.base_colour, dtype=np.float64)
    if material.texture is not None:
        base = _bitmap(mi, material.texture_linear * factor[:3].astype(np.float32))
    elif material.vertex_colours is not None or material.face_colours is not None:
        # per-vertex (or per-face) linear colours times the factor, attached to the mesh as an attribute
        base = {"type": "mesh_attribute", "name": "vertex_color" if material.vertex_colours is not None
                else "face_color"}
    else:
        base = _rgb(mi, factor[:3])
    bsdf = {"type": "principled", "base_color": base}
    if material.metallic_roughness is not None:
        mr = material.metallic_roughness.astype(np.float32) / 255.0
        bsdf["roughness"] = _bitmap(mi, mr[..., 1:2] * np.float32(material.roughness))
        bsdf["metallic"] = _bitmap(mi, mr[..., 2:3] * np.float32(material.metallic))
    else:
        bsdf["roughness"] = float(np.clip(material.roughness, 0.0, 1.0))
        bsdf["metallic"] = float(np.clip(material.metallic, 0.0, 1.0))
    out = {"type": "twosided", "bsdf": bsdf}
    if material.alpha_mode == "MASK" and material.texture is not None:
        alpha = material.texture[..., 3:4].astype(np.float32) / 255.0 * np.float32(factor[3])
        # thresholded texels, looked up nearest: the cutout edge within half a texel of glTF's (threshold of
        # the filtered alpha), and no partly transparent band where the texture is magnified
        cut = (alpha >= material.alpha_cutoff).astype(np.float32)
        out = {"type": "mask", "opacity": _bitmap(mi, cut, filter_type="nearest"), "bsdf": out}
    return out


def _emitter(mi, material: Material) -> dict | None:
    """An area emitter for an emissive material (emissive factor, times its texture)."""
    emissive = np.asarray(material.emissive, dtype=np.float64)
    if not (emissive > 0).any():
        return None
    if material.emissive_texture is not None:
        tex = srgb_to_linear(material.emissive_texture / np.float32(255.0)) * emissive.astype(np.float32)
        return {"type": "area", "radiance": _bitmap(mi, tex)}
    return {"type": "area", "radiance": _rgb(mi, emissive)}


SMOOTH_MAX_DEG, SMOOTH_MAX_SHARE = 40.0, 0.01


def smooth_normals(mesh: trimesh.Trimesh) -> bool:
    """Whether the mesh's vertex normals make good shading normals: at most 1% of its faces have a corner
    normal more than 40 degrees off the face's normal. Averaged normals across hard edges (a box whose
    corners are shared) bend shading far from the geometry, which a path tracer turns into dark patches
    and noise; such meshes are shaded flat."""
    if len(mesh.faces) == 0:
        return False
    fn = np.asarray(mesh.face_normals, dtype=np.float64)
    vn = np.asarray(mesh.vertex_normals, dtype=np.float64)[np.asarray(mesh.faces)]
    cos = np.einsum("fc,fkc->fk", fn, vn).min(axis=1)
    return bool(np.mean(~(cos >= np.cos(np.radians(SMOOTH_MAX_DEG)))) <= SMOOTH_MAX_SHARE)


def _shape(mi, name: str, mesh: trimesh.Trimesh, material: Material):
    """A Mitsuba mesh of exactly these triangles (float32 vertices, as the caster's engines take them)."""
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    smooth = material.face_colours is None and smooth_normals(mesh)
    uv = material.uv
    props = mi.Properties()
    props["bsdf"] = mi.load_dict(_bsdf(mi, material))
    emitter = _emitter(mi, material)
    if emitter is not None:
        props["emitter"] = mi.load_dict(emitter)
    shape = mi.Mesh(name, len(vertices), len(faces), props, has_vertex_normals=smooth,
                    has_vertex_texcoords=uv is not None)
    params = mi.traverse(shape)
    params["vertex_positions"] = vertices.ravel()
    params["faces"] = faces.ravel()
    if smooth:
        normals = np.asarray(mesh.vertex_normals, dtype=np.float32)
        params["vertex_normals"] = np.nan_to_num(normals).ravel()
    if uv is not None:  # Mitsuba's v runs down the image
        params["vertex_texcoords"] = np.column_stack([uv[:, 0], 1.0 - uv[:, 1]]).astype(np.float32).ravel()
    params.update()
    factor = np.asarray(material.base_colour, dtype=np.float32)[:3]
    if material.vertex_colours is not None:
        colours = srgb_to_linear(material.vertex_colours[:, :3] / np.float32(255.0)) * factor
        shape.add_attribute("vertex_color", 3, np.ascontiguousarray(colours, np.float32).ravel())
    elif material.face_colours is not None:
        colours = srgb_to_linear(material.face_colours[:, :3] / np.float32(255.0)) * factor
        shape.add_attribute("face_color", 3, np.ascontiguousarray(colours, np.float32).ravel())
    return shape


class MitsubaScene:
    """The Mitsuba shapes of a list of world-space meshes and their materials, built once and rendered from
    any number of cameras and lightings."""

    def __init__(self, meshes: list[trimesh.Trimesh], materials: list[Material], variant: str = "auto"):
        self.mi = load_mitsuba(variant)
        self.meshes = list(meshes)
        self.shapes = [_shape(self.mi, f"mesh{i}", m, mat) for i, (m, mat) in enumerate(zip(meshes, materials))]
        lo = np.min([m.bounds[0] for m in meshes], axis=0)
        hi = np.max([m.bounds[1] for m in meshes], axis=0)
        self.corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), -1).reshape(-1, 3)

    def _clip(self, camera: Camera) -> tuple[float, float] | None:
        """Near and far clip: from far below the nearest corner of the bounding box to beyond the farthest.
        The near plane lies before every surface (Mitsuba starts rays on it)."""
        z = camera.world_to_camera(self.corners)[:, 2]
        far = float(z.max()) * 1.01
        if far <= 0:
            return None
        return max(float(z.min()) * 0.5, far * 1e-5), far

    def sensor(self, camera: Camera, spp: int, seed: int, centre_samples: bool = False) -> dict:
        """Mitsuba's perspective sensor for ``camera`` (box filter; ``centre_samples``: one sample at every
        pixel centre exactly, for AOVs, else ``spp`` correlated multi-jittered samples seeded by ``seed``: a third
        of the error of independent samples at 16 spp)."""
        check_camera(camera)
        mi = self.mi
        W, H, K = camera.width, camera.height, camera.K
        near, far = self._clip(camera) or (1e-3, 1.0)
        # Mitsuba's camera looks along +z with x to the left and y up: OpenCV's x and y flipped
        to_world = camera.cam_to_world @ np.diag([-1.0, -1.0, 1.0, 1.0])
        sampler = ({"type": "stratified", "sample_count": 1, "jitter": False} if centre_samples
                   else {"type": "multijitter", "sample_count": int(spp), "seed": int(seed)})
        return {
            "type": "perspective",
            "fov": float(np.degrees(2.0 * np.arctan(W / (2.0 * K[0, 0])))),
            "fov_axis": "x",
            # the offset of the principal point from the image centre, in image sizes, Mitsuba's sign
            "principal_point_offset_x": float(-(K[0, 2] - W / 2.0) / W),
            "principal_point_offset_y": float(-(K[1, 2] - H / 2.0) / H),
            "near_clip": near,
            "far_clip": far,
            "to_world": mi.ScalarTransform4f(to_world.tolist()),
            "film": {"type": "hdrfilm", "width": W, "height": H, "rfilter": {"type": "box"},
                     "pixel_format": "rgba", "sample_border": False},
            "sampler": sampler,
        }

    def _emitters(self, lighting: Lighting, camera: Camera, folder) -> dict:
        mi = self.mi
        env = lighting.environment
        out: dict = {}
        if env.kind in ("constant", "headlight"):
            out["environment"] = {"type": "constant", "radiance": _rgb(mi, env.colour)}
        elif env.kind == "gradient":
            img = environment_radiance(env, grid_directions(*ENVMAP_SIZE))
            out["environment"] = {"type": "envmap", "bitmap": mi.Bitmap(np.ascontiguousarray(img))}
        elif env.kind == "sunsky":
            # Mitsuba's sky is z-up: turn its z to our y; the sun direction is given in world coordinates
            turn = mi.ScalarTransform4f([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
            out["environment"] = {"type": "sunsky", "to_world": turn, "turbidity": float(env.turbidity),
                                  "sun_direction": [float(x) for x in env.sun_direction],
                                  "sun_scale": float(env.scale), "sky_scale": float(env.scale)}
        elif env.kind == "image":
            img = read_environment(os.path.join(folder or "", env.file))
            out["environment"] = {"type": "envmap", "bitmap": mi.Bitmap(np.ascontiguousarray(img)),
                                  "scale": float(env.scale),
                                  "to_world": mi.ScalarTransform4f().rotate([0, 1, 0], float(env.rotation_deg))}
        if lighting.headlight:
            out["headlight"] = {"type": "directional", "direction": [float(x) for x in camera.rotation[2]],
                                "irradiance": _rgb(mi, np.full(3, HEADLIGHT_INTENSITY))}
        centre = np.asarray(lighting.centre, dtype=np.float64)
        for i, light in enumerate(lighting.lights):
            colour = np.asarray(light.colour) * light.intensity
            d = np.asarray(light.direction, dtype=np.float64)
            if light.kind == "directional":
                out[f"light{i}"] = {"type": "directional", "direction": [float(x) for x in -d],
                                    "irradiance": _rgb(mi, colour)}
            else:
                pos = light.position(centre)
                up = [0, 0, 1] if abs(d[1]) > 0.99 else [0, 1, 0]
                out[f"light{i}"] = {
                    "type": "spot", "to_world": mi.ScalarTransform4f().look_at(origin=pos.tolist(),
                                                                                target=centre.tolist(), up=up),
                    "intensity": _rgb(mi, colour * light.distance**2),  # irradiance at the centre: I / d^2
                    "cutoff_angle": float(light.outer_deg), "beam_width": float(light.inner_deg)}
        return out

    def render(self, camera: Camera, lighting: Lighting, spp: int, seed: int, max_depth: int = 6,
               folder=None) -> np.ndarray:
        """(H, W, 4) float32 linear RGBA: colour premultiplied by the alpha (coverage) unless the background
        is the environment (then alpha is 1 and the environment is seen).

        Mitsuba's ``hide_emitters`` hides the environment from camera rays, but emissive surfaces too; with
        an emissive mesh in view the image is rendered with the environment seen, the coverage by a second
        pass without emitters at the same sample positions, and the environment along each pixel's centre
        ray taken off where it was seen (exact but for the environment's variation across a pixel)."""
        mi = self.mi
        hide = lighting.background.mode != "environment"
        emissive = hide and any(s.is_emitter() for s in self.shapes)
        shapes = {f"shape{i}": s for i, s in enumerate(self.shapes)}
        scene = {"type": "scene", "sensor": self.sensor(camera, spp, seed),
                 "integrator": {"type": "path", "max_depth": int(max_depth), "hide_emitters": hide and not emissive},
                 **self._emitters(lighting, camera, folder), **shapes}
        img = np.array(mi.render(mi.load_dict(scene), seed=int(seed)), dtype=np.float32)
        if emissive:
            bare = {"type": "scene", "sensor": self.sensor(camera, spp, seed),
                    "integrator": {"type": "path", "max_depth": 1}, **shapes}
            cover = np.array(mi.render(mi.load_dict(bare), seed=int(seed)), dtype=np.float32)[..., 3]
            _, rays = camera.world_rays()
            seen = environment_radiance(lighting.environment, rays, folder) * (1.0 - cover)[..., None]
            img[..., :3] = np.maximum(img[..., :3] - seen, 0.0)
            img[..., 3] = cover
        return img

    def aovs(self, camera: Camera, names: str = "dd.y:depth") -> np.ndarray:
        """(H, W, C) float32 Mitsuba AOVs (``aov`` integrator syntax) sampled at every pixel centre."""
        mi = self.mi
        scene = {"type": "scene", "sensor": self.sensor(camera, 1, 0, centre_samples=True),
                 "integrator": {"type": "aov", "aovs": names}}
        scene.update({f"shape{i}": s for i, s in enumerate(self.shapes)})
        return np.array(mi.render(mi.load_dict(scene)), dtype=np.float32)

    def depth(self, camera: Camera) -> np.ndarray:
        """(H, W) float32 camera z of the first surface at every pixel centre from Mitsuba's own depth AOV
        (0 for background). Mitsuba measures along the unit ray from the near plane: z = t / |ray| + near."""
        t = self.aovs(camera, "dd.y:depth")[..., 0]
        near = self._clip(camera)
        if near is None:
            return np.zeros_like(t)
        rays = camera.pixel_rays()  # z == 1
        z = t / np.linalg.norm(rays, axis=-1) + near[0]
        return np.where(t > 0, z, 0.0).astype(np.float32)


def finish(rgba: np.ndarray, lighting: Lighting) -> np.ndarray:
    """Mitsuba's linear RGBA to the stored image: (H, W, 3) uint8 sRGB over the background colour (linear
    compositing of the coverage), or (H, W, 4) uint8 with straight alpha for a transparent background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    mode = lighting.background.mode
    if mode == "environment":
        return to_uint8(linear_to_srgb(rgb))
    if mode == "transparent":
        straight = np.where(alpha > 0, rgb / np.maximum(alpha, 1e-8), 0.0)
        return np.concatenate([to_uint8(linear_to_srgb(straight)), to_uint8(np.clip(alpha, 0, 1))], axis=-1)
    bg = srgb_to_linear(np.asarray(lighting.background.colour, dtype=np.float32) / 255.0)
    return to_uint8(linear_to_srgb(rgb + (1.0 - np.clip(alpha, 0, 1)) * bg))


_SCENES: dict = {}  # "key": (meshes, materials), "scene": MitsubaScene; the last mesh list's scene


def scene_for(meshes: list[trimesh.Trimesh], materials: list[Material], variant: str = "auto") -> MitsubaScene:
    """The :class:`MitsubaScene` of these mesh and material objects, kept for the next call with the same
    ones (views of one asset share it)."""
    key = _SCENES.get("key")
    same = (key and _SCENES.get("pid") == os.getpid() and len(key[0]) == len(meshes)
            and all(a is b for a, b in zip(key[0], meshes)) and all(a is b for a, b in zip(key[1], materials)))
    if not same:
        _SCENES.update(key=(list(meshes), list(materials)), scene=MitsubaScene(meshes, materials, variant),
                       pid=os.getpid())
    return _SCENES["scene"]
