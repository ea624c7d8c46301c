"""Layered ray-traced ground truth: every front-to-back surface crossing of every pixel's ray."""

import os

# Open3D and numba each run an OpenMP pool; busy-waiting idle threads of one slow down the other's work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .camera import Camera, depth_to_xyz
from .cast import Hits, LayeredRaycaster, MeshError

__version__ = "0.1.0"
__all__ = ["Camera", "Hits", "LayeredRaycaster", "MeshError", "depth_to_xyz", "__version__"]
