"""The RGB input image, pixel-aligned with layer 0 of the caster.

Two ways to make it:
- ``mode="pyrender"``: lit, textured rasterisation through pyrender, offscreen (OSMesa on a CPU machine,
  EGL where a GPU exists). The OpenCV camera becomes an OpenGL projection with exactly the same intrinsics:
  in both conventions pixel (u, v) has its centre at (u + 0.5, v + 0.5), so no half-pixel shift is needed.
  Lit by a :class:`~.lighting.Lighting` (directional and spot lights with shadow maps, the environment as
  ambient light plus its sun) or, without one, by a head light and ambient.
- ``mode="raytrace"``: shading of the caster's layer 0 (texture looked up through face id + barycentric
  coordinates), a fallback for machines without OpenGL. It needs no GL and never fails on odd visuals.

Both treat every surface as opaque and double-sided, as the caster does, except alpha cutouts (glTF
``alphaMode: MASK``; BLEND is turned into a cutout at load, ``inputs.assets.BLEND_CUTOFF``): pyrender discards
the fragments whose base-colour alpha is below the cutoff (a patched copy of its fragment shader, bilinear
sampling without mipmaps, the sampler's wrap modes), the test the caster applies per crossing
(``geometry.cutout``); the ray tracer shades the caster's layer 0, which is cut already. Vertex colours
multiply the base colour in both.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import trimesh

from ..camera import Camera
from ..geometry.cutout import Cutout
from .lighting import (
    HEADLIGHT_AMBIENT,
    HEADLIGHT_INTENSITY,
    Background,
    Lighting,
    background_image,
    environment_summary,
    headlight,
)
from .materials import DEFAULT_COLOUR, Material, colour_at, material_of

AMBIENT = HEADLIGHT_AMBIENT  # share of light that does not depend on the normal (head-light shading)


class GLUnavailable(RuntimeError):
    """Offscreen OpenGL cannot be used here (no OSMesa/EGL library, no context)."""


def _choose_gl_platform() -> None:
    """Pick a headless PyOpenGL platform unless the user chose one: EGL with a GPU, else OSMesa."""
    if "PYOPENGL_PLATFORM" in os.environ or os.environ.get("DISPLAY"):
        return
    gpu = os.path.exists("/dev/nvidia0") or glob.glob("/dev/dri/renderD*")
    os.environ["PYOPENGL_PLATFORM"] = "egl" if gpu else "osmesa"


def _pyrender():
    _choose_gl_platform()
    try:
        import pyrender
    except Exception as e:  # a missing GL library surfaces as ImportError, AttributeError, OSError...
        raise GLUnavailable(f"pyrender/OpenGL unavailable ({type(e).__name__}: {e})") from None
    return pyrender


_RENDERERS: dict = {}  # (width, height) -> OffscreenRenderer: creating one is slow
# (width, height) -> (meshes, pyrender.Scene) for the last mesh list: views of one asset share its upload
# (GL buffers belong to one renderer's context, hence one scene per renderer)
_SCENES: dict = {}
_OWNER = [os.getpid()]  # a forked worker must not reuse its parent's GL contexts


def _renderer(width: int, height: int):
    pyrender = _pyrender()
    if _OWNER[0] != os.getpid():
        _RENDERERS.clear()
        _SCENES.clear()
        _OWNER[0] = os.getpid()
    key = (width, height)
    if key not in _RENDERERS:
        try:
            renderer = pyrender.OffscreenRenderer(width, height)
            renderer._renderer._program_cache = _program_cache(pyrender)
            _RENDERERS[key] = renderer
        except Exception as e:
            platform = os.environ.get("PYOPENGL_PLATFORM", "default")
            raise GLUnavailable(
                f"no offscreen OpenGL context ({platform}: {type(e).__name__}: {e})"
            ) from None
    return _RENDERERS[key]


# pyrender's fragment shader, patched: (1) MASK cutouts: a negative base-colour alpha factor -0.5 f / c marks a
# cutout of factor f and cutoff c, and a fragment is discarded unless texture alpha * f >= c. A shader holding
# `discard` loses early depth testing (OSMesa's llvmpipe then shades every fragment, hidden ones too), so the
# test is compiled only into the programs of MASK primitives, told apart by a second uv set (TEXCOORD_1_LOC,
# which pyrender defines for primitives with texcoord_1, and which nothing else here sets); (2) glTF's
# metallic-roughness channels (roughness G, metallic B; pyrender reads R, G); (3) the emissive factor applied
# once (pyrender multiplies it twice).
_SHADER_PATCHES = [
    ("""    base_color = base_color * srgb_to_linear(texture(material.base_color_texture, uv_0));
#endif
""", """    base_color = base_color * srgb_to_linear(texture(material.base_color_texture, uv_0));
#endif
#ifdef TEXCOORD_1_LOC
    if (material.base_color_factor.a < 0.0) {  // wt_datagen: alphaMode MASK
        if (base_color.a > -0.5) discard;
        base_color.a = 1.0;
    }
#endif
"""),
    ("vec2 mr = texture(material.metallic_roughness_texture, uv_0).rg;",
     "vec2 mr = texture(material.metallic_roughness_texture, uv_0).bg;"),
    ("color.xyz += emissive * material.emissive_factor;", "color.xyz += emissive;"),
]
_SHADER_DIR: list[str] = []


def _patched_shaders(pyrender) -> str:
    """A folder (temporary, one per process) holding pyrender's shaders with :data:`_SHADER_PATCHES`."""
    if _SHADER_DIR:
        return _SHADER_DIR[0]
    source = Path(pyrender.__file__).parent / "shaders"
    folder = tempfile.mkdtemp(prefix="wt-shaders-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for f in source.iterdir():
        shutil.copy(f, folder)
    frag = Path(folder) / "mesh.frag"
    text = frag.read_text()
    for old, new in _SHADER_PATCHES:
        if old not in text:
            raise GLUnavailable(f"pyrender's mesh.frag has changed (no {old.strip()[:50]!r}); cannot patch it")
        text = text.replace(old, new)
    frag.write_text(text)
    _SHADER_DIR.append(folder)
    return folder


def _program_cache(pyrender):
    """A shader program cache over :func:`_patched_shaders`, keyed by shader files and defines only.

    pyrender keys its cache by the GL context object too, which PyOpenGL's OSMesa binding creates anew at
    every call (equal hashes, unequal objects): every primitive of every render compiled its shaders again
    and the cache grew without end (a 127-part asset: 2 s a view). One renderer has one context.
    """
    from pyrender.shader_program import ShaderProgram, ShaderProgramCache

    class Cache(ShaderProgramCache):
        def get_program(self, vertex_shader, fragment_shader, geometry_shader=None, defines=None):
            defines = defines or {}
            key = (vertex_shader, fragment_shader, geometry_shader, tuple(sorted(defines.items())))
            if key not in self._program_cache:
                vs, fs, gs = (os.path.join(self.shader_dir, f) if f else None
                              for f in (vertex_shader, fragment_shader, geometry_shader))
                self._program_cache[key] = ShaderProgram(vertex_shader=vs, fragment_shader=fs, geometry_shader=gs,
                                                         defines=defines)
            return self._program_cache[key]

    return Cache(shader_dir=_patched_shaders(pyrender))


_GL_WRAP = {"repeat": 10497, "mirror": 33648, "clamp": 33071}
_GL_LINEAR = 9729


def _mesh_visuals(pyrender, mesh: trimesh.Trimesh, pm) -> None:
    """Give a pyrender mesh made from ``mesh``'s own visuals what pyrender leaves out: a MASK cutout (the same
    :class:`Cutout` the caster applies), the textures' wrap modes, vertex colours beside a texture."""
    cutout = Cutout.from_mesh(mesh)
    wrap = tuple(mesh.metadata.get("texture_wrap", ("repeat", "repeat")))
    colours = mesh.vertex_attributes.get("color") if mesh.visual.kind == "texture" else None
    for prim in pm.primitives:
        material = prim.material
        filters = (_GL_LINEAR, _GL_LINEAR) if cutout is not None and cutout.alpha is not None else (None, None)
        if wrap != ("repeat", "repeat") or filters[0] is not None:
            for name in ("baseColorTexture", "emissiveTexture", "metallicRoughnessTexture"):
                tex = getattr(material, name, None)
                if tex is not None:
                    tex.sampler = pyrender.Sampler(magFilter=filters[0], minFilter=filters[1],
                                                   wrapS=_GL_WRAP[wrap[0]], wrapT=_GL_WRAP[wrap[1]])
        if cutout is not None and (cutout.alpha is None or prim.texcoord_0 is None):
            pm.is_visible = False  # the factor alone is below the cutoff: nothing of it is surface
        elif cutout is not None:
            factor = np.array(material.baseColorFactor, dtype=np.float32)
            factor[3] = -0.5 * cutout.factor / cutout.cutoff  # the shader's MASK test (see _SHADER_PATCHES)
            material.baseColorFactor = factor
            material.alphaMode = "MASK"
            prim.texcoord_1 = prim.texcoord_0  # selects the program with the test
        if colours is not None and len(colours) == len(prim.positions):
            prim.color_0 = np.asarray(colours, dtype=np.float32) / 255.0


def _scene(meshes: list[trimesh.Trimesh], key: tuple[int, int], materials: list[Material] | None = None):
    """A pyrender scene of the meshes: opaque, double-sided materials; cached for the same mesh objects.
    A randomised material (``source == "random"``) replaces the mesh's own (plain) visuals."""
    cached = _SCENES.get(key)
    mats = list(materials) if materials is not None else [None] * len(meshes)
    if (cached and len(cached[0]) == len(meshes) and all(a is b for a, b in zip(cached[0], meshes))
            and all(a is b for a, b in zip(cached[2], mats))):
        return cached[1]
    pyrender = _pyrender()
    scene = pyrender.Scene(ambient_light=np.full(3, AMBIENT))
    for mesh, material in zip(meshes, mats):
        # face colours cannot be smooth-shaded in pyrender; everything else uses vertex normals
        try:
            if material is not None and material.source == "random":
                pbr = pyrender.MetallicRoughnessMaterial(baseColorFactor=np.asarray(material.base_colour),
                                                         metallicFactor=material.metallic,
                                                         roughnessFactor=material.roughness)
                plain = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
                pm = pyrender.Mesh.from_trimesh(plain, material=pbr, smooth=True)
            else:
                pm = pyrender.Mesh.from_trimesh(mesh, smooth=mesh.visual.kind != "face")
                for prim in pm.primitives:
                    prim.material.alphaMode = "OPAQUE"
                _mesh_visuals(pyrender, mesh, pm)  # MASK cutouts (alphaMode MASK), wrap modes, vertex colours
        except Exception:  # visuals pyrender cannot take (odd materials): the geometry, plain grey
            pm = pyrender.Mesh.from_trimesh(trimesh.Trimesh(mesh.vertices, mesh.faces, process=False))
        for prim in pm.primitives:
            # the caster sees every surface: no transparency (cutouts aside), no back-face culling
            if prim.material.alphaMode != "MASK":
                prim.material.alphaMode = "OPAQUE"
            prim.material.doubleSided = True
        # pyrender's own bounds use np.infty, gone in numpy 2 (its shadow maps ask for the scene's bounds)
        pm._bounds = np.asarray(mesh.bounds, dtype=np.float64)
        scene.add(pm)
    _SCENES[key] = (list(meshes), scene, mats)
    return scene


def _near_far(meshes: list[trimesh.Trimesh], camera: Camera, hits=None) -> tuple[float, float] | None:
    """Clip planes bracketing the meshes' bounding box in camera z (None if it is all behind the camera).

    A tight range keeps the 24-bit depth buffer precise. With ``hits`` the near plane sits just before the
    nearest layer-0 surface; otherwise at most 1000x closer than the far plane.
    """
    lo = np.min([m.bounds[0] for m in meshes], axis=0)
    hi = np.max([m.bounds[1] for m in meshes], axis=0)
    corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), -1).reshape(-1, 3)
    z = camera.world_to_camera(corners)[:, 2]
    far = float(z.max()) * 1.01
    if far <= 0:
        return None
    near = max(float(z.min()) * 0.99, far * 1e-3)
    if hits is not None and hits.valid[0].any():
        near = min(near, float(hits.depth[0][hits.valid[0]].min()) * 0.99)
    return near, far


def _look_from(position, target) -> np.ndarray:
    """(4, 4) pose of an OpenGL-style light or camera at ``position`` whose -z axis points at ``target``."""
    position, target = np.asarray(position, dtype=np.float64), np.asarray(target, dtype=np.float64)
    z = position - target
    z /= np.linalg.norm(z)
    up = np.array([0.0, 0.0, 1.0]) if abs(z[1]) > 0.99 else np.array([0.0, 1.0, 0.0])
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, np.cross(z, x), z, position
    return pose


def _light_nodes(pyrender, scene, lighting: Lighting, camera_pose: np.ndarray, folder) -> list:
    """Add the lighting's lights to ``scene`` (ambient from the environment, its sun, the extra lights);
    returns the nodes to remove after rendering."""
    if lighting.headlight:
        scene.ambient_light = np.full(3, HEADLIGHT_AMBIENT)
        return [scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=HEADLIGHT_INTENSITY),
                          pose=camera_pose)]
    ambient, env_lights = environment_summary(lighting.environment, folder)
    scene.ambient_light = np.asarray(ambient, dtype=np.float64)
    centre = np.asarray(lighting.centre, dtype=np.float64)
    nodes = []
    for light in (*env_lights, *lighting.lights):
        colour = np.asarray(light.colour, dtype=np.float64)
        peak = float(colour.max()) or 1.0  # pyrender wants colours in 0..1: the rest goes to the intensity
        if light.kind == "directional":
            pose = _look_from(centre + np.asarray(light.direction), centre)
            node = pyrender.DirectionalLight(color=colour / peak, intensity=light.intensity * peak)
        else:
            pose = _look_from(light.position(centre), centre)
            node = pyrender.SpotLight(color=colour / peak, intensity=light.intensity * peak * light.distance**2,
                                      innerConeAngle=np.radians(light.inner_deg),
                                      outerConeAngle=np.radians(light.outer_deg))
        nodes.append(scene.add(node, pose=pose))
    return nodes


def _render_gl(meshes, camera: Camera, background, depth_only: bool, hits=None, lighting: Lighting | None = None,
               materials=None, folder=None):
    pyrender = _pyrender()
    renderer = _renderer(camera.width, camera.height)
    clip = _near_far(meshes, camera, hits)
    if clip is None:  # nothing in front of the camera
        return None
    scene = _scene(meshes, (camera.width, camera.height), materials)
    scene.bg_color = np.append(np.asarray(background, dtype=np.float64) / 255.0, 1.0)
    K = camera.K
    cam = pyrender.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], znear=clip[0], zfar=clip[1])
    if K[0, 1] != 0:  # skew: pyrender's projection has no term for it
        projection = cam.get_projection_matrix(camera.width, camera.height)
        projection[0, 1] = -2.0 * K[0, 1] / camera.width  # OpenGL y is OpenCV -y
        cam.get_projection_matrix = lambda width=None, height=None: projection
    # OpenCV (x right, y down, z forward) to OpenGL camera axes (x right, y up, z backward)
    pose = camera.cam_to_world @ np.diag([1.0, -1.0, -1.0, 1.0])
    nodes = [scene.add(cam, pose=pose)]
    scene.main_camera_node = nodes[0]
    flags = pyrender.RenderFlags.SKIP_CULL_FACES
    if depth_only:
        flags |= pyrender.RenderFlags.DEPTH_ONLY
    else:
        lighting = lighting if lighting is not None else headlight(Background("colour"))
        try:
            nodes += _light_nodes(pyrender, scene, lighting, pose, folder)
        except Exception:
            for node in nodes:
                scene.remove_node(node)
            raise
        if lighting.shadows and not lighting.headlight:
            flags |= pyrender.RenderFlags.SHADOWS_DIRECTIONAL | pyrender.RenderFlags.SHADOWS_SPOT
    try:
        return renderer.render(scene, flags=flags)
    except Exception as e:
        raise GLUnavailable(f"offscreen OpenGL render failed ({type(e).__name__}: {e})") from None
    finally:
        for node in nodes:
            scene.remove_node(node)


def composite(rgb: np.ndarray, covered: np.ndarray, lighting: Lighting | None, camera: Camera,
              folder=None) -> np.ndarray:
    """The stored image from a rendering ``rgb`` (H, W, 3) uint8 and its (H, W) bool coverage: the
    environment painted where nothing is (``environment``), an RGBA image (``transparent``), or ``rgb``
    as it is (a colour background was rendered already)."""
    mode = "colour" if lighting is None else lighting.background.mode
    if mode == "environment":
        return np.where(covered[..., None], rgb, background_image(lighting, camera, folder))
    if mode == "transparent":
        return np.concatenate([rgb, np.where(covered, 255, 0).astype(np.uint8)[..., None]], axis=-1)
    return rgb


def render_rgb(
    meshes: list[trimesh.Trimesh],
    camera: Camera,
    background=(0, 0, 0),
    mode: str = "pyrender",
    hits=None,
    lighting: Lighting | None = None,
    materials: list[Material] | None = None,
    folder=None,
) -> np.ndarray:
    """(H, W, 3) uint8 image of the meshes (world coordinates) seen by ``camera``; (H, W, 4) for a
    transparent background.

    background: RGB in 0..255 (without ``lighting``; with one, its background rules). mode: "pyrender"
    (needs OpenGL; raises :class:`GLUnavailable` without it) or "raytrace" (needs ``hits``, the caster's
    :class:`~wt_datagen.cast.Hits` for this camera and these meshes, in the same order). lighting: the
    view's :class:`~.lighting.Lighting` (None: head light and ambient); materials: the meshes'
    :class:`~.materials.Material` (randomised ones are drawn with their drawn colour); folder: the
    environments folder of an image environment. pyrender keeps the uploaded scene for the same mesh
    objects, so do not modify meshes in place between calls (transform copies, or transform before the first
    call).
    """
    if lighting is not None and lighting.background.mode == "colour":
        background = lighting.background.colour
    bg = np.clip(np.asarray(background, dtype=np.float64).reshape(3), 0, 255)
    if lighting is not None and lighting.background.mode != "colour":
        bg = np.zeros(3)
    if mode == "raytrace":
        if hits is None:
            raise ValueError("render_rgb: mode 'raytrace' needs the caster's hits")
        rgb = shade_layer0(meshes, camera, hits, bg, materials)
        return composite(rgb, np.asarray(hits.valid[0], dtype=bool), lighting, camera, folder)
    if mode != "pyrender":
        raise ValueError(f"render_rgb: mode must be 'pyrender' or 'raytrace', got {mode!r}")
    out = _render_gl(meshes, camera, bg, depth_only=False, hits=hits, lighting=lighting, materials=materials,
                     folder=folder)
    if out is None:
        rgb = np.broadcast_to(bg.round().astype(np.uint8), (camera.height, camera.width, 3)).copy()
        return composite(rgb, np.zeros(rgb.shape[:2], bool), lighting, camera, folder)
    return composite(np.ascontiguousarray(out[0][..., :3]), out[1] > 0, lighting, camera, folder)


_GL_FAILED = False  # this process found OpenGL unusable once: go straight to the fallback afterwards


def view_image(meshes, camera: Camera, hits, renderer: str = "pyrender", fallback: str = "raytrace",
               background=(0, 0, 0), lighting: Lighting | None = None, materials: list[Material] | None = None,
               folder=None) -> tuple[np.ndarray, str]:
    """(H, W, 3) (or (H, W, 4) transparent) uint8 image of a view and the renderer that made it:
    ``renderer`` ("pyrender" or "raytrace"), falling back to ray tracing when OpenGL is unusable and
    ``fallback`` is "raytrace"; with ``fallback`` "none" that raises ValueError (a per-item problem)."""
    global _GL_FAILED
    kw = {"background": background, "hits": hits, "lighting": lighting, "materials": materials, "folder": folder}
    if renderer == "pyrender" and not _GL_FAILED:
        try:
            return render_rgb(meshes, camera, mode="pyrender", **kw), "pyrender"
        except GLUnavailable as e:
            if fallback == "none":
                raise ValueError(f"OpenGL unavailable and image.fallback is none ({e})") from None
            _GL_FAILED = True
    return render_rgb(meshes, camera, mode="raytrace", **kw), "raytrace"


def render_depth(meshes: list[trimesh.Trimesh], camera: Camera) -> np.ndarray:
    """(H, W) float32 camera z from pyrender's depth buffer, 0 for background (for alignment checks)."""
    out = _render_gl(meshes, camera, (0, 0, 0), depth_only=True)
    if out is None:
        return np.zeros((camera.height, camera.width), np.float32)
    return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Ray-traced fallback


def shade_layer0(meshes: list[trimesh.Trimesh], camera: Camera, hits, background,
                 materials: list[Material] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 Lambert shading (head light, ``AMBIENT`` ambient) of the caster's layer 0.

    hits: the caster's Hits for ``camera`` on ``meshes`` (instance ids index ``meshes``). background: RGB
    0..255 for pixels without a hit. Colours: :func:`~.materials.surface_colour` in display values.
    """
    H, W = camera.height, camera.width
    valid = np.asarray(hits.valid[0], dtype=bool)
    materials = [material_of(m) for m in meshes] if materials is None else materials
    colour = np.broadcast_to(np.asarray(DEFAULT_COLOUR), (H, W, 3)).copy()
    bary = np.nan_to_num(np.asarray(hits.bary[0], dtype=np.float64).reshape(H, W, 2))
    colour[valid] = colour_at(materials, meshes, np.asarray(hits.instance_id[0])[valid],
                              np.asarray(hits.face_id[0])[valid], bary[valid])
    rays = camera.pixel_rays()
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    cosine = np.abs(np.sum(np.nan_to_num(np.asarray(hits.normal[0], dtype=np.float64)) * rays, axis=-1))
    rgb = colour * (AMBIENT + (1 - AMBIENT) * np.clip(cosine, 0, 1))[..., None] * 255.0
    rgb[~valid] = np.asarray(background, dtype=np.float64)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)
