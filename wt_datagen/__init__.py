"""Layered ray-traced ground truth: every front-to-back surface crossing of every pixel's ray.

The package is laid out by the stages of the data's path (README "Layout"): ``inputs`` -> ``geometry`` ->
``image`` -> ``pipeline`` -> shards -> ``inspect``, with the contract every stage shares at the top
(``camera``, ``schema``, ``reader``, ``console``). Importing the package loads nothing heavy: the names below
are resolved on first use, so ``import wt_datagen.schema`` needs only numpy and PIL.
"""

import importlib
import os

# Open3D and numba each run an OpenMP pool; busy-waiting idle threads of one slow down the other's work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY = {
    "Camera": "wt_datagen.camera",
    "depth_to_xyz": "wt_datagen.camera",
    "Hits": "wt_datagen.geometry.cast",
    "LayeredRaycaster": "wt_datagen.geometry.cast",
    "MeshError": "wt_datagen.inputs.meshes",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wt_datagen' has no attribute {name!r}")
