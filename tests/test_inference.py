"""Sliding-window inference against float64 NumPy references built from per-window forward
passes."""

import itertools
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import subprocess_env
from vnet_jax import inference

ROOT = Path(__file__).resolve().parent.parent
WINDOW = (8, 8, 8)


class TinyNet(nn.Module):
  """kernel=1: one pointwise conv, so any tiling and any mirroring gives the full-volume answer.
  kernel=3: a 3^3 conv first, so window borders and flips change the result."""

  num_classes: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x):
    if self.kernel > 1:
      x = nn.relu(nn.Conv(4, (self.kernel,) * 3, padding="SAME")(x))
    return nn.Conv(self.num_classes, (1, 1, 1))(x)


def make_model(kernel, num_classes=3, channels=2, seed=0):
  model = TinyNet(num_classes, kernel)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, *WINDOW, channels)))
  # Jitted: the NumPy references run it window by window, which op by op would be slow.
  return jax.jit(model.apply), variables


def random_volume(shape, channels=2, seed=1):
  return np.random.default_rng(seed).normal(size=(*shape, channels)).astype(np.float32)


def softmax64(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def full_forward(apply_fn, variables, volume):
  return softmax64(apply_fn(variables, jnp.asarray(volume[None]))[0])


def window_probs64(apply_fn, variables, x, tta):
  """float64 softmax of one window, averaged over the 8 mirrorings done in NumPy when tta."""
  flips = [a for r in range(4) for a in itertools.combinations((0, 1, 2), r)] if tta else [()]
  total = 0
  for axes in flips:
    xf = np.flip(x, axes) if axes else x
    total = total + np.flip(full_forward(apply_fn, variables, np.ascontiguousarray(xf)), axes)
  return total / len(flips)


def naive_sliding(apply_fn, variables, volume, window, overlap, tta=False):
  """Whole-volume float64 accumulation, one window at a time: the reference for the slabs."""
  g = inference.gaussian_importance_map(window).astype(np.float64)
  acc = np.zeros(volume.shape[:3] + (3,))
  weight = np.zeros(volume.shape[:3])
  for d, h, w in inference.window_starts(volume.shape, window, overlap):
    sl = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
    acc[sl] += window_probs64(apply_fn, variables, volume[sl], tta) * g[..., None]
    weight[sl] += g
  return acc / weight[..., None]


# ------------------------------------------------------------------------------- Gaussian map


def test_gaussian_importance_map():
  window = (9, 17, 25)
  g = inference.gaussian_importance_map(window)
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
  even = inference.gaussian_importance_map((8, 8, 8))
  assert even.max() == 1.0 and np.array_equal(even, np.flip(even, (0, 1, 2)))
  narrow = inference.gaussian_importance_map((32, 32, 32), sigma_scale=1 / 32)  # would underflow
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
  starts = inference.axis_starts(size, window, overlap)
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
  assert inference.axis_starts(300, 64, 0.5) == [0, 30, 59, 88, 118, 148, 177, 206, 236]
  starts = inference.window_starts((21, 8, 12), WINDOW, 0.5)
  assert starts == sorted(starts)  # D-major: the slab accumulation depends on it
  assert starts[0] == (0, 0, 0) and starts[-1] == (13, 0, 4)
  assert len(starts) == 5 * 1 * 2
  with pytest.raises(ValueError):
    inference.axis_starts(7, 8)


# ------------------------------------------------------------------------------ predictions


def test_single_window_equals_full_forward():
  apply_fn, variables = make_model(kernel=3)
  vol = random_volume(WINDOW)
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  np.testing.assert_allclose(out, full_forward(apply_fn, variables, vol), atol=1e-5)


def test_pointwise_model_any_tiling_is_exact():
  apply_fn, variables = make_model(kernel=1)
  vol = random_volume((21, 13, 10))
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3, windows_per_device=3)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  ref = full_forward(apply_fn, variables, vol)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  out16 = pred.predict_probabilities(vol)
  assert out16.dtype == np.float16
  np.testing.assert_allclose(out16, ref, atol=1e-3)
  labels = pred.predict_labels(vol)
  assert labels.dtype == np.uint8 and labels.shape == vol.shape[:3]
  np.testing.assert_array_equal(labels, ref.argmax(-1))


def test_small_receptive_field_close_to_full_forward():
  apply_fn, variables = make_model(kernel=3)
  vol = random_volume((16, 16, 12))
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3, windows_per_device=2)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  ref = full_forward(apply_fn, variables, vol)
  # Only window-border voxels see different zero padding, and the Gaussian all but ignores them
  # wherever another window covers the voxel nearer its centre (a 3D weight floor would not).
  diff = np.abs(out - ref)
  assert diff.mean() < 3e-4 and diff.max() < 5e-3
  top2 = np.sort(ref, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-2  # the random tiny model has many near-ties
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(pred.predict_labels(vol)[clear], ref.argmax(-1)[clear])


def test_bfloat16_logits_are_softmaxed_in_float32():
  apply_fn, variables = make_model(kernel=1)
  bf16_apply = lambda v, x: apply_fn(v, x).astype(jnp.bfloat16)
  vol = random_volume((12, 8, 9))
  pred = inference.SlidingWindowPredictor(bf16_apply, variables, WINDOW, 3)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  ref = softmax64(np.asarray(bf16_apply(variables, jnp.asarray(vol[None]))[0], np.float32))
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_volume_smaller_than_window_is_padded_centred_and_cropped():
  apply_fn, variables = make_model(kernel=3)
  vol = random_volume((5, 12, 3))  # D and W below the window, H above
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  assert out.shape == (5, 12, 3, 3)
  assert pred.predict_labels(vol).shape == (5, 12, 3)
  # Reference: pad with 0 centred (nnU-Net's pad_nd_image), tile the padded volume, crop.
  padded = np.pad(vol, [(1, 2), (0, 0), (2, 3), (0, 0)])
  ref = naive_sliding(apply_fn, variables, padded, WINDOW, 0.5)[1:6, :, 2:5]
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize(
  "overlap,tta,per_device", [(0.5, False, 3), (0.25, False, 1), (0.5, True, 2)]
)
def test_slab_accumulation_equals_naive_full_accumulation(overlap, tta, per_device):
  apply_fn, variables = make_model(kernel=3)
  vol = random_volume(
    (21, 13, 10)
  )  # uneven D steps (0, 3, 6, 10, 13 at 0.5) and a padded last group
  pred = inference.SlidingWindowPredictor(
    apply_fn, variables, WINDOW, 3, overlap=overlap, tta=tta, windows_per_device=per_device
  )
  ref = naive_sliding(apply_fn, variables, vol, WINDOW, overlap, tta)
  np.testing.assert_allclose(pred.predict_probabilities(vol, dtype=np.float32), ref, atol=1e-5)
  labels = pred.predict_labels(vol)
  top2 = np.sort(ref, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # ignore float near-ties
  np.testing.assert_array_equal(labels[clear], ref.argmax(-1)[clear])


def test_tta_symmetric_model_equals_plain():
  apply_fn, variables = make_model(kernel=1)
  vol = random_volume((12, 9, 8))
  predict = lambda tta: inference.SlidingWindowPredictor(
    apply_fn, variables, WINDOW, 3, tta=tta
  ).predict_probabilities(vol, dtype=np.float32)
  plain, tta = predict(False), predict(True)
  np.testing.assert_allclose(tta, plain, atol=2e-6)


def test_tta_asymmetric_model_averages_flipped_predictions():
  apply_fn, variables = make_model(kernel=3)
  vol = random_volume(WINDOW)
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3, tta=True)
  out = pred.predict_probabilities(vol, dtype=np.float32)
  ref = window_probs64(apply_fn, variables, vol, tta=True)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # and it really differs from the plain prediction, or the test would prove nothing
  assert np.abs(ref - full_forward(apply_fn, variables, vol)).max() > 1e-3


def test_compiles_once_for_all_volume_sizes():
  apply_fn, variables = make_model(kernel=3)
  traces = []

  def counting_apply(v, x):
    traces.append(x.shape)  # Python side effect: runs only while tracing
    return apply_fn(v, x)

  pred = inference.SlidingWindowPredictor(
    counting_apply, variables, WINDOW, 3, windows_per_device=2
  )
  for shape in [(8, 8, 8), (19, 11, 9), (5, 12, 3)]:
    pred.predict_labels(random_volume(shape))
  pred.predict_probabilities(random_volume((10, 10, 10)))
  assert len(traces) == 1 and traces[0] == (2, *WINDOW, 2)


def test_rejects_bad_input():
  apply_fn, variables = make_model(kernel=1)
  pred = inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3)
  with pytest.raises(ValueError):
    pred.predict_labels(np.zeros((8, 8, 8), np.float32))
  with pytest.raises(ValueError):
    inference.SlidingWindowPredictor(apply_fn, variables, WINDOW, 3, overlap=1.0)


_TWO_DEVICE_SCRIPT = r"""
import functools, jax, numpy as np
assert jax.local_device_count() == 2, jax.devices()
sys_path = __import__("sys").path
sys_path.insert(0, "tests")
from test_inference import make_model, random_volume, WINDOW
from vnet_jax import inference
apply_fn, variables = make_model(kernel=3)
vol = random_volume((21, 13, 10))  # 10 windows: the last group of 2 x 3 is padded
for tta in (False, True):
  predictor = functools.partial(
      inference.SlidingWindowPredictor, apply_fn, variables, WINDOW, 3, tta=tta)
  two = predictor(windows_per_device=3)
  one = predictor(devices=jax.devices()[:1])
  assert two.num_devices == 2 and one.num_devices == 1
  np.testing.assert_allclose(two.predict_probabilities(vol, np.float32),
                             one.predict_probabilities(vol, np.float32), atol=1e-6)
  np.testing.assert_array_equal(two.predict_labels(vol), one.predict_labels(vol))
print("OK")
"""


@pytest.mark.slow
def test_two_devices_match_one_device():
  out = subprocess.run(
    [sys.executable, "-c", _TWO_DEVICE_SCRIPT],
    env=subprocess_env(devices=2),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
