"""Post-processing of predictions: the flying-point filter on analytic layers and intrinsics recovered from
points projected by a known camera."""

from __future__ import annotations

import numpy as np
import pytest

from wt_datagen.camera import Camera
from wt_model.postprocess import (
    FlyingPointFilter,
    filter_flying_points,
    flying_points,
    intrinsics_from_points,
    local_median_depth,
)

K_TRUE = np.array([[52.0, 0, 30.5], [0, 47.0, 26.0], [0, 0, 1]])


def plane_layers(H=40, W=48, K=2):
    """Two tilted planes (z = 2 + 0.3 x_ray and 3 + 0.2 y_ray) seen by K_TRUE: (K,H,W,3) points, masks."""
    rays = Camera(K_TRUE, np.eye(4), W, H).pixel_rays()  # (H,W,3), z = 1
    z0 = 2.0 / (1 - 0.3 * rays[..., 0])
    z1 = 3.0 / (1 - 0.2 * rays[..., 1])
    pts = np.stack([z0[..., None] * rays, z1[..., None] * rays])[:K]
    return pts, np.ones(pts.shape[:3], bool)


def test_local_median_by_brute_force():
    rng = np.random.default_rng(0)
    z, valid = rng.uniform(1, 2, (9, 11)), rng.random((9, 11)) > 0.3
    med = local_median_depth(z, valid, 5)
    for y, x in zip(*np.nonzero(valid)):
        window = z[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3][valid[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]]
        assert med[y, x] == pytest.approx(np.median(window))
    assert np.isnan(med[~valid]).all()


def test_smooth_layers_keep_every_point_and_flying_points_go():
    pts, valid = plane_layers()
    assert not flying_points(pts, valid).any()  # tilted smooth planes: nothing is a flyer
    spiky = pts.copy()
    spiky[0, 10, 12] *= 1.2  # a depth spike (20 % along its ray)
    spiky[1, 30, 5, 1] += 4.0  # a point thrown off the surface at the same depth: only the kNN test sees it
    drop = flying_points(spiky, valid)
    assert drop[0, 10, 12] and drop[1, 30, 5]
    assert drop.sum() == 2
    edge_only = flying_points(spiky, valid, FlyingPointFilter(n_mad=1e9))  # the kNN test off
    assert edge_only[0, 10, 12] and not edge_only[1, 30, 5]
    kept = filter_flying_points(spiky, valid)
    assert not kept[0, 10, 12] and not kept[1, 10, 12]  # masks stay monotone along K
    assert kept.sum() == valid.sum() - 3


def test_speckled_depth_spikes_go_and_both_sides_of_a_real_edge_stay():
    pts, valid = plane_layers(K=1)
    pts[0, :, 24:] *= 0.5  # the right half is a surface at half the depth: a true depth edge
    rng = np.random.default_rng(3)
    spikes = (rng.random(valid.shape) < 0.03) & valid
    spikes[:, :, 23:25] = False
    noisy = pts.copy()
    noisy[spikes] *= rng.choice([0.7, 1.3], size=(spikes.sum(), 1))  # moved 30 % along their rays
    drop = flying_points(noisy, valid, FlyingPointFilter(n_mad=1e9))  # the depth-edge test alone
    assert np.array_equal(drop, spikes)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_intrinsics_from_projected_points(scale):
    pts, valid = plane_layers()
    K = intrinsics_from_points(scale * pts[0], valid[0])
    assert np.allclose(K, K_TRUE, atol=1e-8)
    partial = valid[0].copy()
    partial[:, :20] = False
    assert np.allclose(intrinsics_from_points(pts[0], partial), K_TRUE, atol=1e-8)
    one_row = np.zeros_like(valid[0])
    one_row[3] = True
    assert intrinsics_from_points(pts[0], one_row) is None
