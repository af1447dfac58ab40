"""The synthetic phantom (`make_case`) and its shapes: geometry, anatomy, HU, determinism."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vnet_jax.data import phantom
from vnet_jax.data.phantom_shapes import Phantom, smooth_field
from vnet_jax.errors import DataError

NUM_CASES = 6


@pytest.fixture(scope="module")
def cases():
  # The canonical cases of a default-geometry synthetic dataset with seed 0.
  return [phantom.make_case(np.random.default_rng([0, i])) for i in range(NUM_CASES)]


def _world_centroid(label, affine, organ):
  idx = np.argwhere(label == organ).mean(0)
  return nib.affines.apply_affine(affine, idx)


def test_default_geometry_dtypes_and_affine(cases):
  for i, (image, label, affine) in enumerate(cases):
    assert image.dtype == np.int16 and label.dtype == np.uint8, i
    assert image.shape == label.shape, i
    assert set(np.unique(label)) <= set(range(14)), i
    # Canonical RAS+ grid: a diagonal affine with the spacing on it.
    assert nib.aff2axcodes(affine) == ("R", "A", "S"), i
    np.testing.assert_array_equal(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))
    # Default geometry: 96-128 voxels of 0.7-0.9 mm in-plane, 24-48 slices of 2.5-5 mm.
    x, y, z = image.shape
    sx, sy, sz = np.diag(affine)[:3]
    assert 96 <= x <= 128 and 96 <= y <= 128 and 24 <= z <= 48, (i, image.shape)
    assert 0.7 <= sx <= 0.9 and 0.7 <= sy <= 0.9 and 2.5 <= sz <= 5.0, (i, (sx, sy, sz))


def test_explicit_geometry():
  image, label, affine = phantom.make_case(np.random.default_rng(1), (48, 40, 12), (0.8, 0.7, 3))
  assert image.shape == label.shape == (48, 40, 12)
  np.testing.assert_allclose(np.diag(affine)[:3], (0.8, 0.7, 3.0))


@pytest.mark.parametrize(
  "shape, spacing, match",
  [
    ((31, 40, 12), None, "synthetic size"),
    ((40, 40, 7), None, "synthetic size"),
    ((40, 40, 12), (0.8, 0.0, 3.0), "synthetic spacing"),
  ],
)
def test_bad_geometry_is_a_data_error(shape, spacing, match):
  with pytest.raises(DataError, match=match):
    phantom.make_case(np.random.default_rng(0), shape, spacing)


def test_anatomy_sides(cases):
  """RAS+ world coordinates: x grows towards the patient's right, y anterior, z superior."""
  for i, (_, label, affine) in enumerate(cases):
    c = {k: _world_centroid(label, affine, k) for k in range(1, 14)}
    right_of = lambda a, b, c=c: c[a][0] > c[b][0] + 5  # mm
    assert right_of(phantom.LIVER, phantom.SPLEEN), i
    assert right_of(phantom.RIGHT_KIDNEY, phantom.LEFT_KIDNEY), i
    assert right_of(phantom.RIGHT_ADRENAL, phantom.LEFT_ADRENAL), i
    assert right_of(phantom.IVC, phantom.AORTA), i
    assert right_of(phantom.GALLBLADDER, phantom.STOMACH), i
    # Kidneys lie behind the pancreas; the gallbladder is in front of the aorta.
    assert c[phantom.RIGHT_KIDNEY][1] < c[phantom.PANCREAS][1], i
    assert c[phantom.LEFT_KIDNEY][1] < c[phantom.PANCREAS][1], i
    assert c[phantom.GALLBLADDER][1] > c[phantom.AORTA][1], i
    # Esophagus and liver above the kidneys; adrenals above the kidneys.
    assert c[phantom.ESOPHAGUS][2] > c[phantom.LIVER][2] > c[phantom.RIGHT_KIDNEY][2], i
    assert c[phantom.RIGHT_ADRENAL][2] > c[phantom.RIGHT_KIDNEY][2], i
    assert c[phantom.LEFT_ADRENAL][2] > c[phantom.LEFT_KIDNEY][2], i


def test_every_organ_present_with_enough_voxels(cases):
  small = {
    phantom.RIGHT_ADRENAL: 30,
    phantom.LEFT_ADRENAL: 30,
    phantom.GALLBLADDER: 80,
    phantom.ESOPHAGUS: 120,
  }
  for i, (_, label, _) in enumerate(cases):
    counts = np.bincount(label.ravel(), minlength=14)
    for organ in range(1, 14):
      assert counts[organ] >= small.get(organ, 250), (i, organ, counts[organ])
    assert counts[phantom.LIVER] == counts[1:].max(), i
    assert counts[0] > 0.8 * label.size, i


def test_intensities(cases):
  for i, (image, label, _) in enumerate(cases):
    # Air outside the body, bone in the spine.
    assert image.min() >= -1024 and np.median(image[label == 0]) < -500, i
    assert (image > 400).sum() > 100, i
    means = {}
    for organ in range(1, 14):
      # Interior voxels only: the partial-volume blur mixes the boundary with its neighbours.
      inner = ndimage.binary_erosion(label == organ, structure=np.ones((3, 3, 1), bool))
      assert inner.sum() >= 10, (i, organ)
      tol = 30 if organ in (phantom.AORTA, phantom.IVC) else 20
      means[organ] = float(image[inner].mean())
      assert abs(means[organ] - phantom.ORGAN_HU[organ]) < tol, (i, organ, means[organ])
    # Contrast-filled aorta brightest; fluid-filled gallbladder darker than solid organs.
    assert max(means, key=means.get) == phantom.AORTA, (i, means)
    solid = (phantom.LIVER, phantom.SPLEEN, phantom.PANCREAS, phantom.RIGHT_KIDNEY)
    assert means[phantom.GALLBLADDER] < min(means[k] for k in solid) - 15, (i, means)


def test_determinism():
  a = phantom.make_case(np.random.default_rng(7), shape=(40, 40, 10))
  b = phantom.make_case(np.random.default_rng(7), shape=(40, 40, 10))
  c = phantom.make_case(np.random.default_rng(8), shape=(40, 40, 10))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_smooth_field_is_standardised():
  f = smooth_field(np.random.default_rng(0), (30, 20, 10), (5, 4, 3))
  assert f.shape == (30, 20, 10) and f.dtype == np.float32
  assert abs(float(f.mean())) < 1e-5 and abs(float(f.std()) - 1) < 1e-4


def test_shapes_land_where_asked():
  ph = Phantom(np.random.default_rng(0), (64, 64, 24), (1.0, 1.0, 4.0))
  center = (0.3, -0.2, 1.0)
  ball = ph.ellipsoid(center, (0.2, 0.2, 0.4), amp=0.0, jitter=False)
  # The deformation moves the centre by a few hundredths of the body's half-width at most.
  np.testing.assert_allclose(ph.centroid(ball), center, atol=0.08)
  tube = ph.tube([(-0.3, 0.0, 0.4), (-0.3, 0.0, 1.6)], [0.1, 0.1], amp=0.0, jitter=False)
  assert tube.any() and not (tube & ball).any()
  np.testing.assert_allclose(ph.centroid(tube), (-0.3, 0.0, 1.0), atol=0.08)
