"""Pinhole cameras in the OpenCV convention.

Camera space: x right, y down, z forward (depth). Pixel (u, v) has its centre at (u + 0.5, v + 0.5);
the ray of pixel (u, v) is ``K^-1 @ (u + 0.5, v + 0.5, 1)`` in camera space, a direction whose z is 1, so a
point at depth ``z`` on it is ``xyz = z * K^-1 @ (u + 0.5, v + 0.5, 1)``. Extrinsics are 4x4 world-to-camera
matrices: ``x_cam = world_to_cam @ x_world`` in homogeneous coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """A pinhole camera.

    Attributes:
        K: (3, 3) float64 intrinsics, pixels.
        world_to_cam: (4, 4) float64 rigid world-to-camera transform (OpenCV axes).
        width, height: image size in pixels.
    """

    K: np.ndarray
    world_to_cam: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        T = np.asarray(self.world_to_cam, dtype=np.float64)
        if K.shape != (3, 3) or T.shape != (4, 4):
            raise ValueError(f"camera: K must be 3x3 and world_to_cam 4x4, got {K.shape} and {T.shape}")
        if not (np.isfinite(K).all() and np.isfinite(T).all()):
            raise ValueError("camera: K or world_to_cam has NaN/inf entries")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"camera: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
        if K[1, 0] != 0 or K[2, 0] != 0 or K[2, 1] != 0 or K[2, 2] != 1:
            raise ValueError("camera: K must be upper triangular with K[2, 2] == 1")
        R = T[:3, :3]
        if not np.allclose(T[3], (0, 0, 0, 1)):
            raise ValueError("camera: world_to_cam last row must be (0, 0, 0, 1)")
        if abs(np.linalg.det(R)) < 1e-12:
            raise ValueError("camera: world_to_cam is singular")
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-5) or np.linalg.det(R) < 0:
            raise ValueError("camera: world_to_cam rotation is not a proper rotation (orthonormal, det +1)")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"camera: image size must be positive, got {self.width}x{self.height}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "world_to_cam", T)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    @classmethod
    def look_at(
        cls,
        eye,
        target,
        up=(0.0, 1.0, 0.0),
        width: int = 256,
        height: int = 256,
        fov_y_deg: float = 60.0,
    ) -> Camera:
        """A camera at ``eye`` looking at ``target``; ``up`` points up in the image (world units)."""
        eye = np.asarray(eye, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        up = np.asarray(up, dtype=np.float64)
        if not 0 < fov_y_deg < 180:
            raise ValueError(f"camera: fov_y_deg must be in (0, 180), got {fov_y_deg}")
        z = target - eye
        if np.linalg.norm(z) == 0:
            raise ValueError("camera: eye and target coincide")
        z = z / np.linalg.norm(z)
        x = np.cross(z, up)  # right = forward x up; OpenCV's y (down) then completes the frame
        if np.linalg.norm(x) < 1e-9:
            raise ValueError("camera: up vector is parallel to the viewing direction")
        x = x / np.linalg.norm(x)
        y = np.cross(z, x)
        R = np.stack([x, y, z])  # rows: camera axes in world coordinates
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = -R @ eye
        f = 0.5 * height / np.tan(np.radians(fov_y_deg) / 2)
        K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float64)
        return cls(K, T, width, height)

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) world-to-camera rotation."""
        return self.world_to_cam[:3, :3]

    @property
    def center(self) -> np.ndarray:
        """(3,) camera centre in world coordinates."""
        return -self.rotation.T @ self.world_to_cam[:3, 3]

    @property
    def cam_to_world(self) -> np.ndarray:
        """(4, 4) camera-to-world transform."""
        T = np.eye(4)
        T[:3, :3] = self.rotation.T
        T[:3, 3] = self.center
        return T

    def pixel_rays(self) -> np.ndarray:
        """(H, W, 3) float64 camera-space ray directions through pixel centres, z == 1."""
        return self.unproject(*np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5))

    def unproject(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(...) pixel coordinates to (..., 3) camera-space directions ``K^-1 (u, v, 1)``, z exactly 1."""
        (fx, s, cx), (_, fy, cy) = self.K[0], self.K[1]
        y = (np.asarray(v, dtype=np.float64) - cy) / fy
        x = (np.asarray(u, dtype=np.float64) - cx - s * y) / fx
        return np.stack([x, y, np.ones_like(x)], axis=-1)

    def world_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Camera centre (3,) and (H, W, 3) world-space directions; a point at depth z is centre + z * dir."""
        return self.center, _apply(self.rotation.T, self.pixel_rays())

    def project(self, xyz_cam: np.ndarray) -> np.ndarray:
        """(..., 3) camera-space points to (..., 2) continuous pixel coordinates (u, v), pixel centres at +0.5."""
        xyz_cam = np.asarray(xyz_cam, dtype=np.float64)
        p = _apply(self.K, xyz_cam)
        return p[..., :2] / p[..., 2:3]

    def world_to_camera(self, xyz_world: np.ndarray) -> np.ndarray:
        """(..., 3) world points to camera space."""
        xyz_world = np.asarray(xyz_world, dtype=np.float64)
        return _apply(self.rotation, xyz_world) + self.world_to_cam[:3, 3]

    def camera_to_world(self, xyz_cam: np.ndarray) -> np.ndarray:
        """(..., 3) camera-space points to world space."""
        return _apply(self.rotation.T, np.asarray(xyz_cam, dtype=np.float64)) + self.center

    def to_json(self) -> dict:
        """The ``camera.json`` record: plain lists, OpenCV convention."""
        return {
            "K": self.K.tolist(),
            "world_to_cam": self.world_to_cam.tolist(),
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_json(cls, d: dict) -> Camera:
        return cls(np.asarray(d["K"]), np.asarray(d["world_to_cam"]), int(d["width"]), int(d["height"]))


def _apply(M: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x @ M.T`` for (..., 3) points and a 3x3 matrix, without BLAS: for a (N, 3) x (3, 3) product a
    multi-threaded BLAS spends far longer starting threads than multiplying (10x on a busy 2-core machine)."""
    return np.einsum("ij,...j->...i", M, x)


def depth_to_xyz(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(..., H, W) camera-z depth to (..., H, W, 3) camera-space points: ``z * K^-1 (u + .5, v + .5, 1)``."""
    H, W = depth.shape[-2:]
    cam = Camera(K, np.eye(4), W, H)
    return (depth[..., None] * cam.pixel_rays()).astype(np.float32)
