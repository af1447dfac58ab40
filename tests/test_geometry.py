"""RAS geometry: (z, y, x) reorientation and its inverse, crop boxes, the preprocessed affine."""

import nibabel as nib
import numpy as np

from tests.nifti_cases import AFFINE, SHAPE
from vnet_jax.data import geometry

ORNT = nib.orientations.io_orientation(AFFINE)


def _meta(crop_box, resampled_shape):
  ras_shape = geometry.ras_zyx(AFFINE, SHAPE, (0.9, 3.0, 1.1))[1]
  return {
    "ornt": ORNT.tolist(),
    "original_affine": AFFINE.tolist(),
    "original_shape": list(SHAPE),
    "ras_shape_zyx": list(ras_shape),
    "crop_box_zyx": crop_box,
    "cropped_shape_zyx": [hi - lo for lo, hi in crop_box],
    "resampled_shape": list(resampled_shape),
  }


def test_ras_zyx_round_trip_and_directions():
  arr = np.arange(np.prod(SHAPE)).reshape(SHAPE)
  ras = geometry.to_ras_zyx(arr, ORNT)
  spacing, shape = geometry.ras_zyx(AFFINE, SHAPE, (0.9, 3.0, 1.1))
  assert ras.shape == shape == (16, 44, 48)
  assert spacing == (3.0, 1.1, 0.9)
  # File axis 0 runs Left, 1 Superior, 2 Posterior: (z, y, x) index (j, n2-1-k, n0-1-i).
  i, j, k = 5, 7, 11
  assert ras[j, SHAPE[2] - 1 - k, SHAPE[0] - 1 - i] == arr[i, j, k]
  back = geometry.from_ras_zyx(ras, _meta([[0, s] for s in shape], shape))
  np.testing.assert_array_equal(back, arr)
  assert back.flags.c_contiguous


def test_bbox():
  mask = np.zeros((6, 5, 8), bool)
  mask[2:5, 1:3, 4:7] = True
  mask[3, 2, 5] = False  # holes do not matter
  assert geometry.bbox(mask) == [[2, 5], [1, 3], [4, 7]]
  assert geometry.bbox(np.zeros((3, 3, 3), bool)) is None


def test_preprocessed_affine_maps_to_the_same_world_point():
  shape = geometry.ras_zyx(AFFINE, SHAPE, (0.9, 3.0, 1.1))[1]
  i, j, k = 5, 7, 11
  world = AFFINE @ [i, j, k, 1]
  zyx = np.array([j, SHAPE[2] - 1 - k, SHAPE[0] - 1 - i, 1.0])
  full = geometry.preprocessed_affine(_meta([[0, s] for s in shape], shape))
  np.testing.assert_allclose(full @ zyx, world, atol=1e-9)
  # Cropped by 2 slices and upsampled 2x in z: z index 2 * (j - 2) + 0.5 is the same point.
  box = [[2, shape[0]], [0, shape[1]], [0, shape[2]]]
  finer = (2 * (shape[0] - 2), shape[1], shape[2])
  a = geometry.preprocessed_affine(_meta(box, finer))
  np.testing.assert_allclose(a @ [2 * (j - 2) + 0.5, *zyx[1:]], world, atol=1e-9)
