"""JAX augmentation, the spatial transforms (vnet_jax.augment_spatial): rotation, warping
against NumPy and SciPy, labels and the ignore value, scaling, elastic fields, mirroring, the
in-plane mode."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from tests.device_augment_cases import ALL_ON, only, patch, run, run_many
from vnet_jax import augment_spatial

# Rotation by +90 degrees about each axis, as np.rot90 (from the first axis towards the second).
ROT90_PLANES = {0: (2, 1), 1: (2, 0), 2: (1, 0)}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quarter_turn_about_each_axis_is_rot90(axis):
  image, label = patch(shape=(6, 6, 6), channels=2, seed=axis)
  angles = np.zeros(3, np.float32)
  angles[axis] = math.pi / 2
  matrix = augment_spatial.rotation_matrix(angles)
  want_image = np.rot90(image, 1, axes=ROT90_PLANES[axis])
  want_label = np.rot90(label, 1, axes=ROT90_PLANES[axis])
  out_image, out_label = jax.jit(augment_spatial.warp)(image, label, matrix)
  np.testing.assert_array_equal(out_label, want_label)  # cos(pi/2) is 4e-8 in float32
  np.testing.assert_allclose(out_image, want_image, atol=1e-5)
  # With the exact integer matrix the resampling is exact.
  out_image, out_label = jax.jit(augment_spatial.warp)(image, label, jnp.round(matrix))
  np.testing.assert_array_equal(out_image, want_image)
  np.testing.assert_array_equal(out_label, want_label)


def test_rotation_matrix_is_orthonormal_and_composes_d_h_w():
  angles = np.array([0.3, -0.7, 1.1], np.float32)
  m = np.asarray(augment_spatial.rotation_matrix(angles), np.float64)
  np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-6)
  parts = [np.asarray(augment_spatial.rotation_matrix(np.eye(3)[a] * angles[a])) for a in range(3)]
  np.testing.assert_allclose(m, parts[0] @ parts[1] @ parts[2], atol=1e-6)


def _source_coords(shape, matrix):
  centre = (np.asarray(shape, np.float64) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) - centre
  return grid @ np.asarray(matrix, np.float64).T + centre  # (D, H, W, 3)


def test_warp_against_numpy_outside_is_minus_one_and_zero():
  image, label = patch(shape=(8, 10, 12), channels=2, seed=1)
  matrix = np.asarray(augment_spatial.rotation_matrix(np.array([0.4, -0.3, 0.2]))) / 0.8  # zoom out
  out_image, out_label = (
    np.asarray(o) for o in jax.jit(augment_spatial.warp)(image, label, matrix)
  )
  src = _source_coords(label.shape, matrix)
  n = np.asarray(label.shape)
  outside = ((src < -0.5) | (src >= n - 0.5)).any(-1)
  # float32 vs float64 coordinates: leave out voxels within 1e-4 of a border or a rounding tie.
  tie = (np.abs(np.abs(src - np.round(src)) - 0.5) < 1e-4).any(-1)
  clear = ~tie & ~(np.abs(src + 0.5) < 1e-4).any(-1) & ~(np.abs(src - (n - 0.5)) < 1e-4).any(-1)
  assert outside.sum() > 100 and (~outside).sum() > 100
  np.testing.assert_array_equal((out_label == -1)[clear], outside[clear])
  assert set(np.unique(out_label)) <= set(np.unique(label)) | {-1}
  np.testing.assert_array_equal(out_image[out_label == -1], 0.0)
  # Inside: labels nearest, image trilinear with edge values (scipy, float64).
  nearest = np.clip(np.floor(src + 0.5).astype(int), 0, n - 1)
  want_label = label[nearest[..., 0], nearest[..., 1], nearest[..., 2]]
  keep = clear & ~outside
  np.testing.assert_array_equal(out_label[keep], want_label[keep])
  coords = np.moveaxis(src, -1, 0)
  for c in range(image.shape[-1]):
    want = ndimage.map_coordinates(
      image[..., c].astype(np.float64), coords, order=1, mode="nearest"
    )
    np.testing.assert_allclose(out_image[..., c][~outside], want[~outside], atol=1e-5)


@pytest.mark.slow
def test_augmented_labels_stay_in_the_label_set():
  image, label = patch()
  cfg = dataclasses.replace(ALL_ON, elastic_alpha=1.5)
  images, labels = run_many(cfg, image, label, 16)
  assert set(np.unique(labels)) <= set(np.unique(label)) | {-1}
  assert (labels == -1).any()
  np.testing.assert_array_equal(images[labels == -1][..., 0] * 0, 0)  # finite
  spatial = only(rotation_prob=1.0, scaling_prob=1.0, elastic_prob=1.0)
  images, labels = run_many(spatial, image, label, 16, seed=1)
  np.testing.assert_array_equal(images[labels == -1], 0.0)


def test_scaling_above_one_zooms_in():
  shape = (9, 9, 9)
  image = np.zeros(shape + (1,), np.float32)
  label = np.zeros(shape, np.int32)
  label[3:6, 3:6, 3:6] = 1  # a 3-voxel cube at the centre
  image[..., 0] = label
  cfg = only(scaling_prob=1.0, scaling_range=(2.0, 2.0))
  _, out_label = run(cfg, image, label)
  assert (out_label == 1).sum() > 100 and (out_label == -1).sum() == 0
  cfg = only(scaling_prob=1.0, scaling_range=(0.5, 0.5))
  _, out_label = run(cfg, image, label)
  assert (out_label == 1).sum() < 10 and (out_label == -1).sum() > 0


def test_elastic_field_is_smooth_and_bounded():
  field = np.asarray(augment_spatial._smooth_field(jax.random.key(0), (16, 16, 16), 3.0, 3))
  np.testing.assert_allclose(np.abs(field).max(axis=(1, 2, 3)), 1.0, rtol=1e-6)
  step = np.abs(np.diff(field, axis=1)).max()
  assert step < 0.5, step  # neighbours move together
  image, label = patch(shape=(8, 8, 8), channels=1)
  cfg = only(elastic_prob=1.0, elastic_alpha=1.0, elastic_sigma=3.0)
  out_image, out_label = run(cfg, image, label)
  assert not np.array_equal(out_image, image)
  # At most one voxel of displacement: a voxel's label is one of its 3^3 neighbourhood's.
  pad = np.pad(label, 1, constant_values=-1)
  near = np.stack(
    [
      pad[1 + i : 9 + i, 1 + j : 9 + j, 1 + k : 9 + k]
      for i in (-1, 0, 1)
      for j in (-1, 0, 1)
      for k in (-1, 0, 1)
    ]
  )
  assert ((near == out_label[None]).any(0) | (out_label == -1)).all()


def test_mirroring_moves_image_and_label_together():
  image, label = patch(channels=1)
  cfg = only(mirror_prob=0.5, mirror_axes=(0, 1, 2))
  images, labels = run_many(cfg, image, label, 64)
  seen = set()
  for out_image, out_label in zip(images, labels):
    flips = [
      axes
      for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
      if np.array_equal(out_image, np.flip(image, axes))
    ]
    assert len(flips) == 1
    np.testing.assert_array_equal(out_label, np.flip(label, flips[0]))
    seen.add(flips[0])
  assert len(seen) >= 6


def test_in_plane_mode_leaves_the_d_axis_alone():
  shape = (6, 12, 12)
  rng = np.random.default_rng(2)
  d = np.arange(shape[0], dtype=np.float32)[:, None, None]
  image = (100 * d + rng.uniform(0, 1, shape)).astype(np.float32)[..., None]
  label = np.broadcast_to(d.astype(np.int32), shape).copy()
  spatial = only(rotation_prob=1.0, scaling_prob=1.0, elastic_prob=1.0)
  lowres = only(lowres_prob=1.0, lowres_channel_prob=1.0, lowres_zoom=(0.5, 0.5))
  for cfg in (spatial, lowres):
    images, labels = run_many(cfg, image, label, 8, anisotropic=True)
    for out_image, out_label in zip(images, labels):
      assert not np.array_equal(out_image, image)
      inside = out_label != -1
      np.testing.assert_array_equal(out_label[inside], np.broadcast_to(d, shape)[inside])
      # Each output slice holds values of its own input slice only (in [100 d, 100 d + 1]).
      v = (out_image[..., 0] - 100 * d)[inside]
      assert (v >= -1e-3).all() and (v <= 1 + 1e-3).all()
  # The same transform in 3D does mix slices.
  _, labels = run_many(spatial, image, label, 8, anisotropic=False)
  assert any((lab[lab != -1] != np.broadcast_to(d, shape)[lab != -1]).any() for lab in labels)
