"""Sliding-window inference on the devices (models, folds, mirror TTA, devices) against float64
NumPy references built from per-window forward passes; the NumPy tiling and accumulation are
tested in test_sliding_window.py."""

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
from tests.test_sliding_window import check_outputs
from vnet_jax import inference, sliding_window

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
  g = sliding_window.gaussian_importance_map(window).astype(np.float64)
  acc = np.zeros(volume.shape[:3] + (3,))
  weight = np.zeros(volume.shape[:3])
  for d, h, w in sliding_window.window_starts(volume.shape, window, overlap):
    sl = (slice(d, d + window[0]), slice(h, h + window[1]), slice(w, w + window[2]))
    acc[sl] += window_probs64(apply_fn, variables, volume[sl], tta) * g[..., None]
    weight[sl] += g
  return acc / weight[..., None]


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
  check_outputs(pred, vol, full_forward(apply_fn, variables, vol))


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


@pytest.mark.parametrize("overlap,tta,per_device", [(0.5, False, 3), (0.5, True, 2)])
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


def test_fold_ensemble_averages_the_folds_probabilities_in_one_compile():
  apply_fn, _ = make_model(kernel=3)
  folds = [make_model(kernel=3, seed=seed)[1] for seed in range(2)]
  tta = True
  traces = []

  def counting_apply(v, x):
    traces.append(x.shape)  # Python side effect: runs only while tracing
    return apply_fn(v, x)

  runner = inference.WindowRunner(counting_apply, folds, 3, tta=tta, windows_per_device=2)
  windows = random_volume((2, *WINDOW))
  out = np.asarray(runner(windows))
  assert out.shape == (2, *WINDOW, 3) and out.dtype == np.float32
  per_fold = [[window_probs64(apply_fn, v, w, tta) for w in windows] for v in folds]
  np.testing.assert_allclose(out, np.mean(per_fold, axis=0), atol=1e-5)
  assert np.abs(np.asarray(per_fold[0]) - np.mean(per_fold, axis=0)).max() > 1e-3
  # The folds are a loop inside one program: the model is traced once per mirroring.
  assert len(traces) == len(inference.MIRROR_AXES)
  runner(windows)
  runner.set_variables(folds[::-1])
  np.testing.assert_allclose(np.asarray(runner(windows)), out, atol=1e-6)
  assert len(runner._step._executables) == 1
  with pytest.raises(ValueError, match=r"1 fold\(s\) given, built for 2"):
    runner.set_variables(folds[:1])


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
from vnet_jax import inference, sliding_window
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
