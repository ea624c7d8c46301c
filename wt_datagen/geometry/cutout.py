"""Alpha cutouts (glTF ``alphaMode: MASK``): crossings where the surface's base-colour alpha is below the
material's cutoff are no surface (leaves, fences, hair cards).

A crossing's alpha is the material's base-colour alpha factor times the base-colour texture's alpha, sampled
bilinearly at the crossing's uv (texel centres at (i + 0.5) / size, the sampler's wrap modes), as a GPU
samples a texture without mipmaps; the crossing is kept iff ``factor * alpha >= cutoff`` (glTF: "greater than
or equal to the cutoff is fully opaque"). The caster's face ids and barycentrics give every crossing's uv, so
the decision is exact up to float32 barycentrics. The image (``wt_datagen.image.rgb``) takes the same
:class:`Cutout` for pyrender's material, so layers and image agree.

The caster applies :func:`apply_cutouts` to its resolved crossings before numbering them: cut crossings are
removed, the others keep their order, ``num_hits`` counts the kept ones and truncation to K comes last, so
the result is what a scene without the cut parts of those surfaces would give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trimesh

WRAPS = ("repeat", "mirror", "clamp")
_MAX_SLOTS = 1 << 22  # (layers x rays) re-resolved at once for rays with crossings beyond K


@dataclass
class Cutout:
    """One instance's alpha cutout.

    Attributes:
        uv: (F, 3, 2) float32 uv of each face's corners (v up: trimesh's convention, row 0 of the image at
            v = 1).
        alpha: (h, w) uint8 alpha of the base-colour texture, row 0 at the top, or None (the factor alone).
        factor: base-colour alpha factor in [0, 1].
        cutoff: a crossing is kept iff ``factor * alpha >= cutoff``.
        wrap: (u, v) wrap modes of the texture: "repeat", "mirror" or "clamp".
    """

    uv: np.ndarray
    alpha: np.ndarray | None
    factor: float
    cutoff: float
    wrap: tuple[str, str] = ("repeat", "repeat")

    @classmethod
    def from_mesh(cls, mesh: trimesh.Trimesh) -> Cutout | None:
        """The cutout of a mesh whose material has ``alphaMode`` MASK, or None when it cuts nothing away
        (opaque, a cutoff of 0, or a factor at or above the cutoff without a texture alpha)."""
        material = getattr(mesh.visual, "material", None)
        if not isinstance(material, trimesh.visual.material.PBRMaterial) or material.alphaMode != "MASK":
            return None
        cutoff = 0.5 if material.alphaCutoff is None else float(material.alphaCutoff)
        factor = 1.0 if material.baseColorFactor is None else float(material.baseColorFactor[3]) / 255.0
        if cutoff <= 0:
            return None
        alpha, uv = None, getattr(mesh.visual, "uv", None)
        image = material.baseColorTexture
        if image is not None and uv is not None and len(uv) == len(mesh.vertices) and "A" in image.getbands():
            alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
        if alpha is None:
            if factor >= cutoff:
                return None
            uv = np.zeros((len(mesh.vertices), 2))
        wrap = tuple(mesh.metadata.get("texture_wrap", ("repeat", "repeat")))
        corners = np.asarray(uv, dtype=np.float32)[np.asarray(mesh.faces)]
        return cls(corners, alpha, factor, cutoff, wrap)

    def keep(self, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
        """(N,) bool: whether crossings on (N,) faces at (N, 2) barycentrics (u, v) are surface."""
        if self.alpha is None:
            return np.full(len(face), self.factor >= self.cutoff)
        b = np.asarray(bary, dtype=np.float32)
        w0 = 1.0 - b[:, 0] - b[:, 1]
        c = self.uv[face]  # (N, 3, 2)
        uv = w0[:, None] * c[:, 0] + b[:, :1] * c[:, 1] + b[:, 1:] * c[:, 2]
        alpha = sample_bilinear(self.alpha[..., None].astype(np.float32) / 255.0, uv, self.wrap)[:, 0]
        return self.factor * alpha >= self.cutoff


def cutouts_for(meshes: list[trimesh.Trimesh]) -> list[Cutout | None] | None:
    """One :class:`Cutout` (or None) per mesh, or None when no mesh has one (the caster's opaque path)."""
    cutouts = [Cutout.from_mesh(m) for m in meshes]
    return cutouts if any(c is not None for c in cutouts) else None


def _wrap(index: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Integer texel indices wrapped into [0, size) as GL_REPEAT, GL_MIRRORED_REPEAT or GL_CLAMP_TO_EDGE."""
    if mode == "clamp":
        return np.clip(index, 0, size - 1)
    if mode == "mirror":
        period = index % (2 * size)
        return np.where(period < size, period, 2 * size - 1 - period)
    return index % size


def sample_bilinear(image: np.ndarray, uv: np.ndarray, wrap: tuple[str, str] = ("repeat", "repeat")) -> np.ndarray:
    """(N, C) bilinear samples of an (h, w, C) float32 image at (N, 2) uv (v up, texel centres at
    (i + 0.5) / size), each axis wrapped by its mode ("repeat", "mirror", "clamp"); NaN/inf uv read (0, 0)."""
    h, w = image.shape[:2]
    flat = image.reshape(h * w, -1)
    uv = np.nan_to_num(np.asarray(uv, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None].astype(np.float32), (y - y0)[:, None].astype(np.float32)
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    xa, xb = _wrap(x0, w, wrap[0]), _wrap(x0 + 1, w, wrap[0])
    ya, yb = _wrap(y0, h, wrap[1]), _wrap(y0 + 1, h, wrap[1])
    top = flat[ya * w + xa] * (1 - fx) + flat[ya * w + xb] * fx
    bottom = flat[yb * w + xa] * (1 - fx) + flat[yb * w + xb] * fx
    return top * (1 - fy) + bottom * fy


def keep_mask(cutouts: list[Cutout | None], instance_id: np.ndarray, face_id: np.ndarray,
              bary: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each resolved crossing (instance id, face id in the instance, (N, 2) barycentrics)
    is surface; instances without a cutout keep every crossing."""
    keep = np.ones(len(instance_id), dtype=bool)
    cut = np.flatnonzero([c is not None for c in cutouts])
    sel = np.flatnonzero(np.isin(instance_id, cut))
    if not len(sel):
        return keep
    sel = sel[np.argsort(instance_id[sel], kind="stable")]  # grouped by instance
    groups = np.split(sel, np.flatnonzero(np.diff(instance_id[sel])) + 1)
    for g in groups:
        keep[g] = cutouts[int(instance_id[g[0]])].keep(face_id[g], bary[g])
    return keep


def check_cutouts(cutouts: list[Cutout | None], face_counts: list[int]) -> list[Cutout | None] | None:
    """Validated cutouts for instances with ``face_counts`` faces (None when none cuts anything)."""
    if cutouts is None:
        return None
    cutouts = list(cutouts)
    if len(cutouts) != len(face_counts):
        raise ValueError(f"cutouts: {len(cutouts)} given for {len(face_counts)} instances")
    for i, (c, n) in enumerate(zip(cutouts, face_counts)):
        if c is not None and c.uv.shape != (n, 3, 2):
            raise ValueError(f"cutouts[{i}]: uv shape {c.uv.shape}, expected ({n}, 3, 2)")
        if c is not None and tuple(c.wrap) and not set(c.wrap) <= set(WRAPS):
            raise ValueError(f"cutouts[{i}]: wrap {c.wrap} not in {WRAPS}")
    return cutouts if any(c is not None for c in cutouts) else None


_FIELDS = ("depth", "normal", "front_facing", "face_id", "instance_id", "bary")
_FILL = {"face_id": -1, "instance_id": -1}


def apply_cutouts(out: dict, cutouts: list[Cutout | None], K: int,
                  recast: Callable[[np.ndarray, int], dict]) -> dict:
    """Remove cut crossings from the caster's resolved layers ``out`` (arrays (K, R, ...) and num_hits (R,)).

    Rays whose crossings all fit in K are filtered in place; rays with more (``num_hits > K``) are resolved
    again through ``recast(ray indices, layers)`` with room for every crossing, filtered, and truncated to K.
    ``num_hits`` becomes the number of kept crossings. Returns ``out``.
    """
    num = out["num_hits"]
    has_cut = np.isin(out["instance_id"], np.flatnonzero([c is not None for c in cutouts])).any(axis=0)
    _filter(out, np.flatnonzero(has_cut & (num <= K)), cutouts, K, out)
    deep = np.flatnonzero(num > K)
    if len(deep):
        order = deep[np.argsort(num[deep], kind="stable")]  # similar depths batch together
        start = 0
        while start < len(order):
            k_all = int(num[order[start]])
            stop = start + 1
            while stop < len(order) and int(num[order[stop]]) * (stop + 1 - start) <= _MAX_SLOTS:
                k_all = int(num[order[stop]])
                stop += 1
            sel = order[start:stop]
            full = recast(sel, k_all)
            _filter(full, np.arange(len(sel)), cutouts, K, out, target=sel)
            start = stop
    return out


def _filter(src: dict, rays: np.ndarray, cutouts, K: int, dst: dict, target: np.ndarray | None = None) -> None:
    """Keep the surface crossings of ``src`` rays ``rays`` (all of them resolved in ``src``), first K into
    ``dst`` rays ``target`` (default: the same indices)."""
    if not len(rays):
        return
    target = rays if target is None else target
    n = src["num_hits"][rays]
    Ks = src["depth"].shape[0]
    slots = np.arange(Ks)[:, None] < n[None]  # (Ks, m) resolved crossings
    inst, face = src["instance_id"][:, rays], src["face_id"][:, rays]
    keep = np.zeros_like(slots)
    keep[slots] = keep_mask(cutouts, inst[slots], face[slots], src["bary"][:, rays][slots])
    order = np.argsort(~keep, axis=0, kind="stable")[:K]  # kept crossings first, in their order
    count = keep.sum(axis=0)
    valid = np.arange(order.shape[0])[:, None] < count[None]
    for name in _FIELDS:
        a = src[name][:, rays]
        idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
        taken = np.take_along_axis(a, idx, axis=0)
        fill = _FILL.get(name, 0)
        taken[~valid] = fill
        block = np.full((K,) + a.shape[1:], fill, dtype=a.dtype)
        block[: taken.shape[0]] = taken
        dst[name][:, target] = block
    dst["num_hits"][target] = count
