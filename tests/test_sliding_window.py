"""The NumPy sliding window against float64 whole-volume references, with NumPy window models."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from vnet_jax import sliding_window as sw

WINDOW = (8, 8, 8)
CLASSES = 3


def softmax64(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def pointwise64(x, weights):
  """A per-voxel 'model': any tiling of it gives the whole-volume answer."""
  return softmax64(np.asarray(x, np.float64) @ weights)


def blurred64(x, weights):
  """A 3^3 box filter with zero padding first: window borders change the result."""
  x = np.asarray(x, np.float64)
  x = np.stack(
    [ndimage.uniform_filter(x[..., c], 3, mode="constant") for c in range(x.shape[-1])], -1
  )
  return softmax64(x @ weights)


def runner(model, weights, calls=None):
  """run_group of a window model, as float32, recording the group shapes it gets."""

  def run_group(windows):
    if calls is not None:
      calls.append(windows.shape)
    return np.stack([model(w, weights) for w in windows]).astype(np.float32)

  return run_group


def random_volume(shape, channels=2, seed=1):
  return np.random.default_rng(seed).normal(size=(*shape, channels)).astype(np.float32)


WEIGHTS = np.random.default_rng(0).normal(size=(2, CLASSES)) * 2


def naive_sliding64(model, volume, window, overlap, gaussian=True):
  """Whole-volume float64 accumulation, one window at a time: the reference for the slabs."""
  g = sw.gaussian_importance_map(window).astype(np.float64) if gaussian else np.ones(window)
  acc = np.zeros(volume.shape[:3] + (CLASSES,))
  weight = np.zeros(volume.shape[:3])
  for d, h, w in sw.window_starts(volume.shape, window, overlap):
    sl = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
    acc[sl] += model(volume[sl], WEIGHTS) * g[..., None]
    weight[sl] += g
  return acc / weight[..., None]


# ------------------------------------------------------------------------------- Gaussian map


def test_gaussian_importance_map():
  window = (9, 17, 25)
  g = sw.gaussian_importance_map(window)
  assert g.shape == window and g.dtype == np.float32
  assert g.max() == 1.0 and g[4, 8, 12] == 1.0
  assert np.all(g > 0)
  # corners keep their relative weight (no 3D clamp): exp(-8) per axis at sigma = size / 8
  np.testing.assert_allclose(
    g[0, 0, 0], np.exp(-0.5 * 16 * sum(((s - 1) / s) ** 2 for s in window)), rtol=1e-5
  )
  for axes in [(0,), (1,), (2,), (0, 1, 2)]:
    np.testing.assert_array_equal(g, np.flip(g, axes))
  # sigma = size / 8 per axis, checked along each axis through the centre
  for axis, size in enumerate(window):
    idx = [4, 8, 12]
    k = np.arange(size)
    idx[axis] = k
    expected = np.exp(-0.5 * ((k - (size - 1) / 2) / (size / 8)) ** 2)
    np.testing.assert_allclose(g[tuple(idx)], expected, rtol=1e-6)
  even = sw.gaussian_importance_map((8, 8, 8))
  assert even.max() == 1.0 and np.array_equal(even, np.flip(even, (0, 1, 2)))
  narrow = sw.gaussian_importance_map((32, 32, 32), sigma_scale=1 / 32)  # would underflow
  assert narrow.min() == pytest.approx(1e-12, rel=1e-5) and narrow.max() == 1.0


# ------------------------------------------------------------------------------ window starts


@pytest.mark.parametrize(
  "size,window,overlap",
  [
    (8, 8, 0.5),
    (9, 8, 0.5),
    (21, 8, 0.5),
    (300, 64, 0.5),
    (512, 128, 0.5),
    (100, 64, 0.25),
    (37, 5, 0.0),
    (50, 7, 0.8),
  ],
)
def test_axis_starts_cover_and_step(size, window, overlap):
  starts = sw.axis_starts(size, window, overlap)
  assert starts[0] == 0 and starts[-1] == size - window
  assert starts == sorted(set(starts))
  covered = np.zeros(size, bool)
  for s in starts:
    covered[s : s + window] = True
  assert covered.all()
  steps = np.diff(starts)
  target = window * (1 - overlap)
  assert np.all(steps <= np.ceil(target))  # np.round of evenly spread real steps
  # fewest steps with the (unrounded) step at most the target, as nnU-Net
  assert len(starts) == int(np.ceil((size - window) / target)) + 1


def test_window_starts_nnunet_values_and_order():
  assert sw.axis_starts(300, 64, 0.5) == [0, 30, 59, 88, 118, 148, 177, 206, 236]
  starts = sw.window_starts((21, 8, 12), WINDOW, 0.5)
  assert starts == sorted(starts)  # D-major: the slab accumulation depends on it
  assert starts[0] == (0, 0, 0) and starts[-1] == (13, 0, 4)
  assert len(starts) == 5 * 1 * 2
  with pytest.raises(ValueError):
    sw.axis_starts(7, 8)


# ------------------------------------------------------------------------------ predictions


def test_pointwise_model_any_tiling_is_exact():
  vol = random_volume((21, 13, 10))
  window = sw.SlidingWindow(runner(pointwise64, WEIGHTS), WINDOW, CLASSES, group_size=3)
  check_outputs(window, vol, pointwise64(vol, WEIGHTS))


def check_outputs(window, vol, ref) -> None:
  """float32 and float16 probabilities and uint8 labels of a sliding window against `ref`."""
  np.testing.assert_allclose(window.predict_probabilities(vol, np.float32), ref, atol=2e-6)
  out16 = window.predict_probabilities(vol)
  assert out16.dtype == np.float16
  np.testing.assert_allclose(out16, ref, atol=1e-3)
  labels = window.predict_labels(vol)
  assert labels.dtype == np.uint8 and labels.shape == vol.shape[:3]
  np.testing.assert_array_equal(labels, ref.argmax(-1))


@pytest.mark.parametrize("overlap,group", [(0.5, 3), (0.25, 1), (0.5, 4)])
def test_slab_accumulation_equals_naive_gaussian_weighted_accumulation(overlap, group):
  # Uneven D steps (0, 3, 6, 10, 13 at 0.5), windows whose borders matter, a padded last group.
  vol = random_volume((21, 13, 10))
  calls = []
  window = sw.SlidingWindow(
    runner(blurred64, WEIGHTS, calls), WINDOW, CLASSES, group_size=group, overlap=overlap
  )
  ref = naive_sliding64(blurred64, vol, WINDOW, overlap)
  np.testing.assert_allclose(window.predict_probabilities(vol, np.float32), ref, atol=1e-5)
  # Every call gets a full group (one compiled shape), and the weighting matters here.
  assert set(calls) == {(group, *WINDOW, 2)}
  assert np.abs(naive_sliding64(blurred64, vol, WINDOW, overlap, gaussian=False) - ref).max() > 1e-3
  top2 = np.sort(ref, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # ignore float near-ties
  np.testing.assert_array_equal(window.predict_labels(vol)[clear], ref.argmax(-1)[clear])


def test_volume_smaller_than_window_is_padded_centred_and_cropped():
  vol = random_volume((5, 12, 3))  # D and W below the window, H above
  window = sw.SlidingWindow(runner(blurred64, WEIGHTS), WINDOW, CLASSES)
  out = window.predict_probabilities(vol, dtype=np.float32)
  assert out.shape == (5, 12, 3, 3)
  assert window.predict_labels(vol).shape == (5, 12, 3)
  # Reference: pad with 0 centred (nnU-Net's pad_nd_image), tile the padded volume, crop.
  padded = np.pad(vol, [(1, 2), (0, 0), (2, 3), (0, 0)])
  ref = naive_sliding64(blurred64, padded, WINDOW, 0.5)[1:6, :, 2:5]
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_a_group_is_read_only_after_the_next_one_is_handed_over():
  events = []

  class Lazy:
    def __init__(self, index, value):
      self.index, self.value = index, value

    def __array__(self, dtype=None, copy=None):
      events.append(("read", self.index))
      return self.value

  count = itertools.count()
  run = runner(pointwise64, WEIGHTS)

  def lazy_group(windows):
    i = next(count)
    events.append(("run", i))
    return Lazy(i, run(windows))

  vol = random_volume((21, 13, 10))
  out = sw.SlidingWindow(lazy_group, WINDOW, CLASSES, group_size=4).predict_probabilities(
    vol, np.float32
  )
  np.testing.assert_allclose(out, pointwise64(vol, WEIGHTS), atol=2e-6)
  groups = next(count)
  assert groups == -(-len(sw.window_starts(vol.shape, WINDOW)) // 4) > 2
  expected = [("run", 0)]
  for i in range(1, groups):
    expected += [("run", i), ("read", i - 1)]
  assert events == expected + [("read", groups - 1)]


def test_rejects_bad_input_and_bad_runner_output():
  window = sw.SlidingWindow(runner(pointwise64, WEIGHTS), WINDOW, CLASSES)
  with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
    window.predict_labels(np.zeros((8, 8, 8), np.float32))
  with pytest.raises(ValueError, match="overlap"):
    sw.SlidingWindow(runner(pointwise64, WEIGHTS), WINDOW, CLASSES, overlap=1.0)
  wrong = sw.SlidingWindow(runner(pointwise64, WEIGHTS), WINDOW, CLASSES + 1)
  with pytest.raises(ValueError, match="run_group returned shape"):
    wrong.predict_probabilities(random_volume(WINDOW))
