"""Surface materials from trimesh visuals, shared by every image renderer and the per-layer albedo.

:func:`material_of` reads a mesh's visuals once into a :class:`Material` (PBR parameters, base colour texture
and uv, vertex or face colours); :func:`surface_colour` looks its base colour up at (face, barycentric)
points, vectorised (texture through uv, bilinear, repeating, times the factor; vertex, face or material colour
otherwise). The ray-traced fallback, the Mitsuba renderer's texture baking and the ``albedo`` layers all go
through these two, so the three agree on where a texel lands.

Colour spaces: textures, vertex and face colours are 8-bit sRGB (as glTF and image files store them); factors
(``baseColorFactor``, ``emissiveFactor``, an obj's ``Kd``) are linear, as glTF defines them. ``linear=True``
lookups decode sRGB first and interpolate in linear light (what a physically based renderer does);
``linear=False`` is the fallback's display-space lookup (interpolating the stored 8-bit values).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import trimesh

from ..geometry.cutout import sample_bilinear

DEFAULT_COLOUR = (0.8, 0.8, 0.8)  # surfaces without colour (pyrender's default material is white-ish too)
DEFAULT_ROUGHNESS = 0.5  # materials that do not say (obj without Ns, vertex and face colours)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in 0..1 to linear light (IEC 61966-2-1), elementwise, float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light (clipped to 0..1) to sRGB-encoded values in 0..1, elementwise, float32."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in 0..1 to uint8 (rounded, clipped)."""
    return np.clip(np.asarray(x, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class MaterialConfig:
    """Seeded materials for meshes that carry none (no texture, no colours, no material):
    ``randomise`` them per (seed, asset, instance) with a base colour of hue uniform in [0, 1),
    ``saturation`` and ``value`` (HSV, sRGB) and ``roughness``, ``metallic`` drawn from these ranges."""

    randomise: bool = False
    saturation: tuple[float, float] = (0.1, 0.9)
    value: tuple[float, float] = (0.3, 0.95)
    roughness: tuple[float, float] = (0.2, 0.9)
    metallic: tuple[float, float] = (0.0, 0.0)


@dataclass(eq=False)
class Material:
    """What the renderers and the albedo need to know about one mesh's surface.

    Attributes:
        source: where the base colour comes from: "texture", "vertex", "face", "material" (a plain colour),
            "none" (the mesh has no visuals: ``DEFAULT_COLOUR``) or "random" (drawn, see :func:`randomised`).
        base_colour: (4,) RGBA factor in 0..1 (linear), multiplied with the texture.
        texture: (h, w, 4) uint8 sRGB RGBA base colour texture, or None.
        uv: (V, 2) float64 per-vertex texture coordinates (v up), or None.
        vertex_colours: (V, 4) uint8 sRGB, or None; face_colours: (F, 4) uint8 sRGB, or None.
        metallic, roughness: factors in 0..1; metallic_roughness: (h, w, 3) uint8 texture (G roughness,
            B metallic, linear), or None.
        emissive: (3,) linear RGB factor; emissive_texture: (h, w, 3) uint8 sRGB, or None.
        alpha_mode: "OPAQUE", "MASK" or "BLEND" (glTF); alpha_cutoff: MASK threshold.
        wrap: the textures' (u, v) wrap modes: "repeat", "mirror" or "clamp" (glTF samplers).
    Beside a texture, ``vertex_colours`` multiply it (glTF ``COLOR_0``).
    """

    source: str
    base_colour: np.ndarray
    texture: np.ndarray | None = None
    uv: np.ndarray | None = None
    vertex_colours: np.ndarray | None = None
    face_colours: np.ndarray | None = None
    metallic: float = 0.0
    roughness: float = DEFAULT_ROUGHNESS
    metallic_roughness: np.ndarray | None = None
    emissive: np.ndarray = field(default_factory=lambda: np.zeros(3))
    emissive_texture: np.ndarray | None = None
    alpha_mode: str = "OPAQUE"
    alpha_cutoff: float = 0.5
    wrap: tuple[str, str] = ("repeat", "repeat")

    @cached_property
    def texture_linear(self) -> np.ndarray:
        """(h, w, 3) float32 linear base colour texture (decoded once, on first use)."""
        return srgb_to_linear(self.texture[..., :3] / np.float32(255.0))

    @cached_property
    def texture_display(self) -> np.ndarray:
        """(h, w, 3) float32 base colour texture in 0..1 as stored (sRGB-encoded)."""
        return self.texture[..., :3].astype(np.float32) / 255.0

    def record(self) -> dict:
        """The scalar parameters (for ``meta.json``: enough to re-render a randomised material)."""
        return {"source": self.source, "base_colour": [round(float(c), 6) for c in self.base_colour],
                "metallic": round(float(self.metallic), 6), "roughness": round(float(self.roughness), 6),
                "emissive": [round(float(c), 6) for c in self.emissive], "alpha_mode": self.alpha_mode}


def _image_array(image, channels: int) -> np.ndarray | None:
    """A PIL image (or None) as (h, w, channels) uint8."""
    if image is None:
        return None
    mode = {3: "RGB", 4: "RGBA"}[channels]
    try:
        return np.asarray(image.convert(mode), dtype=np.uint8)
    except Exception:  # an unreadable or odd image: treated as absent
        return None


def material_of(mesh: trimesh.Trimesh) -> Material:
    """The :class:`Material` of a mesh's visuals (PBR material, obj material converted the way pyrender does
    it, vertex colours, face colours; ``source="none"`` without any)."""
    visual = mesh.visual
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        return Material("vertex", np.ones(4), vertex_colours=np.asarray(visual.vertex_colors, np.uint8)[:, :4])
    if kind == "face":
        return Material("face", np.ones(4), face_colours=np.asarray(visual.face_colors, np.uint8)[:, :4])
    if kind != "texture":
        return Material("none", np.append(DEFAULT_COLOUR, 1.0))
    material = visual.material
    metallic_default = 1.0  # glTF's default metallicFactor
    if isinstance(material, trimesh.visual.material.SimpleMaterial):
        material = material.to_pbr()  # as pyrender does: Kd -> baseColorFactor, Ns -> roughness
        metallic_default = 0.0  # an obj material is a dielectric
    if not isinstance(material, trimesh.visual.material.PBRMaterial):
        return Material("none", np.append(DEFAULT_COLOUR, 1.0))
    factor = material.baseColorFactor
    factor = np.ones(4) if factor is None else np.asarray(factor, dtype=np.float64)[:4] / 255.0
    if len(factor) == 3:
        factor = np.append(factor, 1.0)
    uv = visual.uv
    uv = None if uv is None or len(uv) != len(mesh.vertices) else np.asarray(uv, dtype=np.float64)
    texture = _image_array(material.baseColorTexture, 4) if uv is not None else None
    emissive = np.zeros(3) if material.emissiveFactor is None else np.asarray(material.emissiveFactor, float)[:3]
    mr = _image_array(material.metallicRoughnessTexture, 3) if uv is not None else None
    colours = mesh.vertex_attributes.get("color")  # glTF COLOR_0 beside a material (inputs.gltf)
    colours = None if colours is None or len(colours) != len(mesh.vertices) else np.asarray(colours, np.uint8)
    return Material(
        "texture" if texture is not None else "material", factor, texture=texture, uv=uv,
        metallic=metallic_default if material.metallicFactor is None else float(material.metallicFactor),
        roughness=DEFAULT_ROUGHNESS if material.roughnessFactor is None else float(material.roughnessFactor),
        metallic_roughness=mr, emissive=emissive,
        emissive_texture=_image_array(material.emissiveTexture, 3) if uv is not None else None,
        alpha_mode=str(material.alphaMode or "OPAQUE").upper(),
        alpha_cutoff=0.5 if material.alphaCutoff is None else float(material.alphaCutoff),
        vertex_colours=None if colours is None else colours[:, :4],
        wrap=tuple(mesh.metadata.get("texture_wrap", ("repeat", "repeat"))))


def material_rng(seed: int, item_id: str, instance: int) -> np.random.Generator:
    """A generator seeded by a hash of ``(seed, item_id, "material", instance)`` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}/{item_id}/material/{instance}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def randomised(material: Material, cfg: MaterialConfig, rng: np.random.Generator) -> Material:
    """``material`` itself if it has colour of its own or ``cfg.randomise`` is off; else a plain material
    with a drawn base colour (HSV in sRGB, stored linear), roughness and metallic."""
    if not cfg.randomise or material.source != "none":
        return material
    import colorsys

    h, s, v = rng.uniform(0, 1), rng.uniform(*cfg.saturation), rng.uniform(*cfg.value)
    rgb = srgb_to_linear(np.asarray(colorsys.hsv_to_rgb(h, s, v)))
    return Material("random", np.append(rgb, 1.0), roughness=float(rng.uniform(*cfg.roughness)),
                    metallic=float(rng.uniform(*cfg.metallic)))


def surface_colour(material: Material, faces: np.ndarray, face: np.ndarray, bary: np.ndarray,
                   linear: bool = False) -> np.ndarray:
    """(N, 3) float RGB in 0..1: the base colour at (N,) faces and (N, 2) barycentric coordinates.

    faces: the mesh's (F, 3) vertex indices. The texture (through uv, bilinear, the material's wrap modes)
    times the factor and the vertex colours if any; vertex colours interpolated; face colours; the material's
    colour otherwise. ``linear``: decode sRGB before interpolating and return linear light; else display
    values (the 8-bit numbers over 255).
    """
    n = len(face)
    face = np.clip(face, 0, max(len(faces) - 1, 0))
    w = np.column_stack([1.0 - bary[:, 0] - bary[:, 1], bary[:, 0], bary[:, 1]])  # (N, 3) vertex weights
    tri = np.asarray(faces)[face]  # (N, 3) vertex indices
    factor = np.asarray(material.base_colour, dtype=np.float64)[:3]
    tint = 1.0
    if material.vertex_colours is not None:
        colours = material.vertex_colours[:, :3] / np.float32(255.0)
        colours = srgb_to_linear(colours) if linear else colours
        tint = np.einsum("nkc,nk->nc", colours[tri], w)
    if material.texture is not None:
        texels = material.texture_linear if linear else material.texture_display
        uv_hit = np.einsum("nkc,nk->nc", material.uv[tri], w)
        return sample_bilinear(texels, uv_hit, material.wrap) * factor * tint
    if material.vertex_colours is not None:
        return tint * factor
    if material.face_colours is not None:
        colours = material.face_colours[face, :3] / np.float32(255.0)
        return (srgb_to_linear(colours) if linear else colours) * factor
    return np.broadcast_to(factor, (n, 3)).copy()


def colour_at(materials: list[Material], meshes: list[trimesh.Trimesh], inst: np.ndarray, face: np.ndarray,
              bary: np.ndarray, linear: bool = False) -> np.ndarray:
    """(N, 3) float32 base colour of (N,) crossings given by instance (indexing ``materials`` and ``meshes``),
    face and (N, 2) barycentric coordinates (:func:`surface_colour`, grouped by instance in one sort)."""
    colour = np.zeros((len(inst), 3), np.float32)
    order = np.argsort(inst, kind="stable")
    ids, starts = np.unique(inst[order], return_index=True)
    for i, lo, hi in zip(ids, starts, np.append(starts[1:], len(order))):
        if 0 <= i < len(materials):
            sel = order[lo:hi]
            colour[sel] = surface_colour(materials[i], meshes[i].faces, face[sel], bary[sel], linear)
    return colour


def albedo_layers(materials: list[Material], meshes: list[trimesh.Trimesh], hits) -> np.ndarray:
    """(K, H, W, 3) uint8 base colour at every crossing of the caster's ``hits`` (instance ids index
    ``materials`` and ``meshes``): linear lookup (:func:`surface_colour`), stored sRGB-encoded; 0 where
    invalid. Layers past the deepest crossing are not looked at."""
    valid = np.asarray(hits.valid, dtype=bool)
    out = np.zeros(valid.shape + (3,), np.uint8)
    used = int(valid.any(axis=(1, 2)).sum())
    if used == 0:
        return out
    v = valid[:used]
    bary = np.nan_to_num(np.asarray(hits.bary[:used], dtype=np.float64)[v])
    colour = colour_at(materials, meshes, np.asarray(hits.instance_id[:used])[v],
                       np.asarray(hits.face_id[:used])[v], bary, linear=True)
    out[:used][v] = to_uint8(linear_to_srgb(colour))
    return out
