"""The configured loss (seed's Dice + focal, nnU-Net's Dice + CE) with ignored voxels, and deep
supervision, against float64 NumPy references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vnet_jax import losses
from vnet_jax import model as model_lib
from vnet_jax.errors import ConfigError
from vnet_jax.experiments import base


def _config(name: str) -> ml_collections.ConfigDict:
  c = base.get_config().loss
  c.name = name
  return c


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference(logits, labels, num_classes, name, weights=None, c=None):
  """float64: only voxels with labels >= 0 exist."""
  c = c or _config(name)
  keep = labels >= 0
  z = logits[keep].astype(np.float64)  # (V, C)
  p = _softmax(z)
  g = np.eye(num_classes)[labels[keep]]
  tp, sp, sg = (g * p).sum(0), p.sum(0), g.sum(0)
  score = (2 * tp + c.smooth) / (sp + sg + c.smooth)
  if name == "dice_focal":
    if weights is not None:
      score = score * weights
    dice = 1 - score.mean()
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    focal = np.mean(-g * c.focal_alpha * (1 - pc) ** c.focal_gamma * np.log(pc))
    return dice + c.focal_weight * focal
  dice = 1 - score[1:].mean()
  log_p = z - z.max(-1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
  return dice + c.ce_weight * -(g * log_p).sum(-1).mean()


@pytest.mark.parametrize("name", losses.LOSSES)
@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_loss_matches_reference_and_ignores_negative_labels(name, ignored):
  rng = np.random.default_rng(0)
  num_classes = 4
  logits = rng.normal(size=(2, 4, 6, 5, num_classes)).astype(np.float32) * 2
  labels = rng.integers(0, num_classes, (2, 4, 6, 5))
  labels[rng.uniform(size=labels.shape) < ignored] = -1
  weights = np.array([0.5, 2.0, 1.0, 3.0]) if name == "dice_focal" else None
  value, probs, parts = losses.segmentation_loss(
    jnp.asarray(logits), jnp.asarray(labels), num_classes, _config(name), weights
  )
  expected = _reference(logits, labels, num_classes, name, weights)
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
  assert set(parts) == {"dice_loss", "focal_loss" if name == "dice_focal" else "ce_loss"}
  np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64)), rtol=1e-5, atol=1e-7)


def test_ignored_voxels_get_no_gradient():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 4, 4, 4, 3)), jnp.float32)
  labels = rng.integers(0, 3, (1, 4, 4, 4))
  labels[0, :2] = -1
  for name in losses.LOSSES:
    grad = jax.grad(
      lambda z, name=name: losses.segmentation_loss(z, jnp.asarray(labels), 3, _config(name))[0]
    )(logits)
    assert np.all(np.asarray(grad)[0, :2] == 0)
    assert np.any(np.asarray(grad)[0, 2:] != 0)


def test_an_unknown_loss_is_a_config_error():
  with pytest.raises(ConfigError, match="config.loss.name"):
    losses.segmentation_loss(
      jnp.zeros((1, 2, 2, 2, 3)), jnp.zeros((1, 2, 2, 2), int), 3, _config("x")
    )


def test_deep_supervision_weights_and_label_sampling():
  np.testing.assert_allclose(model_lib.deep_supervision_weights(3), [4 / 7, 2 / 7, 1 / 7])
  assert model_lib.deep_supervision_weights(1) == (1.0,)
  labels = np.arange(2 * 8 * 8 * 8).reshape(2, 8, 8, 8)
  half = model_lib.downsample_labels(jnp.asarray(labels), 2)
  np.testing.assert_array_equal(half, labels[:, 1::2, 1::2, 1::2])
  quarter = model_lib.downsample_labels(jnp.asarray(labels), 4)
  np.testing.assert_array_equal(quarter, labels[:, 2::4, 2::4, 2::4])


@pytest.mark.slow
def test_deep_supervision_heads_are_training_only():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 8, 1)), jnp.float32)
  ds = model_lib.VNet(num_classes=3, filters=(2, 2, 2, 2), deep_supervision=True)
  variables = ds.init(jax.random.PRNGKey(0), x)
  outputs = ds.apply(variables, x)
  # Three decoder levels: heads at full and half resolution, none at the coarsest (1/4).
  assert [o.shape for o in outputs] == [(1, 8, 8, 8, 3), (1, 4, 4, 4, 3)]
  # The inference model reads the same parameters and gives the full-resolution head.
  plain = ds.clone(deep_supervision=False).apply(variables, x)
  np.testing.assert_array_equal(plain, outputs[0])
  assert {k for k in variables["params"] if k.startswith("ds_")} == {"ds_head_1"}
