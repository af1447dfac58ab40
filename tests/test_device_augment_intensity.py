"""JAX augmentation, the intensity transforms (vnet_jax.augment_intensity) against float64
NumPy and SciPy references, and the noise's standard deviation."""

import numpy as np
import pytest
from scipy import ndimage

from tests.device_augment_cases import only, run_many
from vnet_jax import augment_intensity


def _x(seed=0, shape=(5, 6, 7, 2)):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * [1.0, 3.0] + [0.5, -2.0]).astype(np.float32)


def test_brightness_and_contrast_against_numpy():
  x = _x()
  f = np.array([0.8, 1.2], np.float32)
  np.testing.assert_allclose(
    augment_intensity.brightness(x, f), x.astype(np.float64) * f, rtol=1e-6
  )
  x64 = x.astype(np.float64)
  mean, lo, hi = x64.mean((0, 1, 2)), x64.min((0, 1, 2)), x64.max((0, 1, 2))
  want = np.clip((x64 - mean) * f + mean, lo, hi)
  got = np.asarray(augment_intensity.contrast(x, f))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert (got[..., 1] == hi[1]).any()  # the stronger contrast did clip


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_against_numpy_keeps_mean_and_std(invert):
  x = _x(1)
  g = np.array([0.7, 1.5], np.float32)
  x64 = -x.astype(np.float64) if invert else x.astype(np.float64)
  axes = (0, 1, 2)
  lo, hi = x64.min(axes), x64.max(axes)
  y = ((x64 - lo) / (hi - lo)) ** g * (hi - lo) + lo
  y = (y - y.mean(axes)) / y.std(axes) * x64.std(axes) + x64.mean(axes)
  want = -y if invert else y
  got = np.asarray(augment_intensity.gamma(x, g, invert=invert), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.mean(axes), x.mean(axes), atol=1e-4)
  np.testing.assert_allclose(got.std(axes), x.std(axes), rtol=1e-4)
  order = np.argsort(x[..., 0], axis=None)
  assert np.all(np.diff(got[..., 0].reshape(-1)[order]) >= -1e-5)  # a monotone map


def test_blur_against_scipy():
  x = _x(2, shape=(7, 8, 9, 2))
  sigma = np.array([[0.5, 0.8, 1.0], [1.0, 0.6, 0.7]], np.float32)
  got = np.asarray(augment_intensity.blur(x, sigma, radius=3))
  for c in range(2):
    want = x[..., c].astype(np.float64)
    for a in range(3):
      # scipy's "mirror" is torch's "reflect" (edge not repeated).
      want = ndimage.gaussian_filter1d(want, float(sigma[c, a]), axis=a, mode="mirror", radius=3)
    np.testing.assert_allclose(got[..., c], want, rtol=1e-5, atol=1e-5)


def _torch_like_low_resolution(x, zoom):
  """Two resizes, as torch's interpolate: nearest-exact down to round(n * zoom), then linear
  (align_corners=False) back to n; separable, so one axis at a time."""
  x = x.astype(np.float64)
  for a in range(x.ndim):
    n = x.shape[a]
    m = max(int(np.round(n * zoom)), 1)
    down = np.take(x, np.minimum(np.floor((np.arange(m) + 0.5) * n / m), n - 1).astype(int), a)
    p = np.maximum((np.arange(n) + 0.5) * m / n - 0.5, 0)
    j0 = np.floor(p).astype(int)
    j1 = np.minimum(j0 + 1, m - 1)
    t = (p - j0).reshape([-1 if b == a else 1 for b in range(x.ndim)])
    x = np.take(down, j0, a) * (1 - t) + np.take(down, j1, a) * t
  return x


@pytest.mark.parametrize("zoom", [0.5, 0.62, 0.8, 1.0])
def test_low_resolution_against_two_resizes(zoom):
  x = _x(3, shape=(8, 10, 13, 2))
  got = np.asarray(augment_intensity.low_resolution(x, np.array([zoom, 1.0], np.float32)))
  for c, z in enumerate([zoom, 1.0]):
    want = _torch_like_low_resolution(x[..., c], z)
    np.testing.assert_allclose(got[..., c], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[..., 1], x[..., 1])  # zoom 1 is exact


def test_noise_std_is_the_square_root_of_the_variance():
  image = np.zeros((8, 8, 8, 1), np.float32)
  label = np.zeros((8, 8, 8), np.int32)
  cfg = only(noise_prob=1.0, noise_variance=(0.04, 0.04))
  images, _ = run_many(cfg, image, label, 8)
  assert abs(images.std() - 0.2) < 0.01 and abs(images.mean()) < 0.01
