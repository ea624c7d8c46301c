"""Checks of triangle arrays shared by every input path and the caster: one rule, one message."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Bad input (a file, a mesh, a sequence): the item is *skipped* with this one-line message and not
    retried. Any other exception while rendering an item is unexpected: the item *fails* and is retried."""


class MeshError(InputError):
    """A mesh the caster cannot use; the message is one line naming the mesh and the problem."""


def mesh_problem(vertices, faces) -> str | None:
    """What makes (V, 3) ``vertices`` and (F, 3) integer ``faces`` unusable as a triangle mesh, or None.

    Zero-area faces are allowed (they are never hit); NaN/inf coordinates and indices out of range are not.
    """
    v, f = np.asarray(vertices), np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        return f"has no triangle faces (faces array shape {f.shape})"
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        return f"has no vertices (vertices array shape {v.shape})"
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        return f"NaN/inf vertex coordinates ({int(bad.sum())} of {len(v)} vertices)"
    if not np.issubdtype(f.dtype, np.integer):
        return f"face indices have dtype {f.dtype}, expected integers"
    if f.min() < 0 or f.max() >= len(v):
        return f"face indices out of range: they span [{f.min()}, {f.max()}], outside [0, {len(v) - 1}]"
    return None
