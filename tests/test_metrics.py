"""Metrics against float64 NumPy references written from the Keras /
segmentation_models definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax import metrics


def _probs(rng, shape, c):
  z = rng.normal(size=shape + (c,)) * 2
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("shape,c", [((1, 4, 4, 4), 2), ((2, 3, 4, 5), 5), ((1, 6, 6, 6), 14)])
def test_accuracy_and_iou_score(shape, c):
  rng = np.random.default_rng(0)
  p = _probs(rng, shape, c)
  labels = rng.integers(0, c, shape)
  g = np.eye(c)[labels]
  np.testing.assert_allclose(
    metrics.accuracy(jnp.asarray(p), jnp.asarray(g)), np.mean(p.argmax(-1) == labels), rtol=1e-6
  )
  pb = (p > 0.5).astype(np.float64)
  axes = (0, 1, 2, 3)
  tp = (pb * g).sum(axes)
  fp = pb.sum(axes) - tp
  fn = g.sum(axes) - tp
  expected = np.mean((tp + 1e-5) / (tp + fp + fn + 1e-5))
  np.testing.assert_allclose(metrics.iou_score(jnp.asarray(p), jnp.asarray(g)), expected, rtol=1e-5)


def test_iou_score_perfect_prediction_and_empty_class():
  labels = np.random.default_rng(1).integers(0, 2, (1, 4, 4, 4))  # class 2 never present
  g = np.eye(3)[labels]
  np.testing.assert_allclose(metrics.iou_score(jnp.asarray(g), jnp.asarray(g)), 1.0, rtol=1e-6)


def test_iou_score_over_devices_equals_iou_of_the_global_batch():
  # vmap with an axis name runs the collectives pmap would over two devices, in this process.
  rng = np.random.default_rng(2)
  p, labels = _probs(rng, (4, 3, 4, 5), 3), rng.integers(0, 3, (4, 3, 4, 5))
  g = np.eye(3)[labels]
  shard = lambda a: jnp.asarray(a.reshape(2, 2, *a.shape[1:]))
  iou = jax.jit(jax.vmap(lambda p, g: metrics.iou_score(p, g, axis_name="d"), axis_name="d"))
  expected = metrics.iou_score(jnp.asarray(p), jnp.asarray(g))
  np.testing.assert_allclose(iou(shard(p), shard(g)), [expected] * 2, rtol=1e-6)


def test_ignored_voxels_count_for_neither_accuracy_nor_iou():
  rng = np.random.default_rng(3)
  p, labels = _probs(rng, (2, 3, 4, 5), 4), rng.integers(0, 4, (2, 3, 4, 5))
  keep = rng.random(labels.shape) < 0.7
  g = np.eye(4)[labels] * keep[..., None]  # as one_hot gives them: all zero where ignored
  mask = keep.astype(np.float32)
  np.testing.assert_allclose(
    metrics.accuracy(jnp.asarray(p), jnp.asarray(g), jnp.asarray(mask)),
    np.mean((p.argmax(-1) == labels)[keep]),
    rtol=1e-6,
  )
  # The kept voxels alone, as a batch of their own.
  kept = lambda a: jnp.asarray(a[keep][None, None, None])
  np.testing.assert_allclose(
    metrics.iou_score(jnp.asarray(p), jnp.asarray(g), mask=jnp.asarray(mask)),
    metrics.iou_score(kept(p), kept(g)),
    rtol=1e-6,
  )
