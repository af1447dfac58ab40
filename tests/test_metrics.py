"""Metrics against float64 NumPy references written from the Keras / FACTS.md definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax import metrics


def _probs(rng, shape, c):
  z = rng.normal(size=shape + (c,)) * 2
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def ref_confusion(pred, true, c):
  cm = np.zeros((c, c), np.float64)
  for t, p in zip(true.ravel(), pred.ravel()):
    cm[t, p] += 1
  return cm


def ref_mean_iou(pred, true, c):
  cm = ref_confusion(pred, true, c)
  ious = []
  for k in range(c):
    denom = cm[k, :].sum() + cm[:, k].sum() - cm[k, k]
    if denom > 0:
      ious.append(cm[k, k] / denom)
  return np.mean(ious)


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


@pytest.mark.parametrize("c", [2, 4, 14])
def test_confusion_matrix_and_mean_iou(c):
  rng = np.random.default_rng(c)
  true = rng.integers(0, c, (2, 5, 5, 5))
  pred = np.where(rng.random(true.shape) < 0.6, true, rng.integers(0, c, true.shape))
  true[true == c - 1] = 0  # one class absent from the reference
  np.testing.assert_array_equal(
    metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(true), c), ref_confusion(pred, true, c)
  )
  np.testing.assert_allclose(
    metrics.mean_iou(jnp.asarray(pred), jnp.asarray(true), c),
    ref_mean_iou(pred, true, c),
    rtol=1e-6,
  )


def test_mean_iou_skips_classes_absent_from_both():
  true = np.array([0, 0, 1, 1])
  pred = np.array([0, 1, 1, 1])
  # class 2 never appears: Keras leaves it out, so the mean is over classes 0 and 1 only.
  np.testing.assert_allclose(
    metrics.mean_iou(jnp.asarray(pred), jnp.asarray(true), 3), (1 / 2 + 2 / 3) / 2
  )


def test_dice_per_class():
  rng = np.random.default_rng(3)
  c = 4
  true = rng.integers(0, c - 1, (1, 6, 6, 6))  # class 3 absent from both
  pred = np.where(rng.random(true.shape) < 0.7, true, rng.integers(0, c - 1, true.shape))
  expected = []
  for k in range(c):
    t, p = true == k, pred == k
    denom = t.sum() + p.sum()
    expected.append(1.0 if denom == 0 else 2 * (t & p).sum() / denom)
  got = jax.jit(metrics.dice_per_class, static_argnums=2)(jnp.asarray(pred), jnp.asarray(true), c)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got[3] == 1.0


def test_class_weights_from_labels():
  rng = np.random.default_rng(4)
  vols = [rng.choice(4, size=(5, 6, 7), p=[0.85, 0.05, 0.05, 0.05]) for _ in range(3)]
  vols[0][0, 0, :4] = [0, 1, 2, 3]
  counts = np.bincount(np.concatenate([v.ravel() for v in vols]), minlength=5)
  w = metrics.class_weights_from_labels(vols, 5)
  np.testing.assert_allclose(w[:4], counts[:4].sum() / (5 * counts[:4]))
  assert w[4] == 0.0  # absent class
  assert w[0] < 1 < w[1]
  with pytest.raises(ValueError, match="num_classes"):
    metrics.class_weights_from_labels([np.array([0, 7])], 4)
