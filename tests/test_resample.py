"""Resampling: trilinear images and per-class labels on the shared-extent grid convention."""

import numpy as np
from scipy import ndimage

from vnet_jax.data import resample


def _zoom(x, out):
  return ndimage.zoom(x, np.divide(out, x.shape), order=1, grid_mode=True, mode="nearest")


def test_resample_linear_matches_scipy_zoom():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 9, 11)).astype(np.float32)
  for out in [(5, 13, 11), (14, 4, 20)]:
    np.testing.assert_allclose(resample.resample_linear(x, out), _zoom(x, out), atol=1e-5)


def test_resample_linear_in_blocks_matches_whole(monkeypatch):
  x = np.random.default_rng(1).normal(size=(6, 5, 7)).astype(np.float32)
  whole = resample.resample_linear(x, (11, 3, 9))
  monkeypatch.setattr(resample, "CHUNK_ELEMS", 20)  # a block of one output slice at a time
  # Equal up to rounding: the axis order of the separable passes depends on the block shape.
  np.testing.assert_allclose(resample.resample_linear(x, (11, 3, 9)), whole, atol=1e-6)


def test_resample_labels_is_argmax_of_interpolated_one_hot():
  # Per-class linear + argmax restricted to class boxes == the same on whole volumes.
  lab = np.zeros((9, 10, 12), np.uint8)
  lab[2:6, 3:8, 1:5], lab[4:9, 1:4, 6:11], lab[5, 5, 5] = 1, 2, 3
  out = (13, 7, 17)
  onehot = np.stack([_zoom((lab == c).astype(np.float32), out) for c in range(4)])
  got = resample.resample_labels(lab, out)
  assert got.dtype == np.uint8 and got.shape == out
  assert np.all(onehot[got, *np.indices(out)] >= onehot.max(0) - 1e-5)  # got is an argmax
  assert set(np.unique(got)) == {0, 1, 2}  # the single voxel of class 3 is outvoted
  same = resample.resample_labels(lab, lab.shape)
  np.testing.assert_array_equal(same, lab)
  assert same is not lab


def test_nearest_index_inverts_the_grid():
  np.testing.assert_array_equal(resample.nearest_index(3, 6), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(resample.nearest_index(6, 3), [1, 3, 5])
  np.testing.assert_array_equal(resample.nearest_index(4, 4), np.arange(4))
