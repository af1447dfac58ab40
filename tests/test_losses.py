"""Losses against float64 NumPy references written from the seed's
(segmentation_models) formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnet_jax import losses


def _random_case(rng, shape, num_classes, empty_class=None):
  logits = rng.normal(size=shape + (num_classes,))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = rng.integers(0, num_classes, size=shape)
  if empty_class is not None:
    labels[labels == empty_class] = 0
  onehot = np.eye(num_classes)[labels]
  return probs, onehot


def ref_dice(p, g, w=None, s=1e-5):
  p, g = p.astype(np.float64), g.astype(np.float64)
  axes = tuple(range(p.ndim - 1))
  tp = (g * p).sum(axes)
  fp = p.sum(axes) - tp
  fn = g.sum(axes) - tp
  score = (2 * tp + s) / (2 * tp + fn + fp + s)
  if w is not None:
    score = score * np.asarray(w, np.float64)
  return 1 - score.mean()


def ref_focal(p, g, alpha=0.25, gamma=2.0):
  p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
  return np.mean(-g * alpha * (1 - p) ** gamma * np.log(p))


CASES = [((1, 4, 4, 4), 2, None), ((2, 3, 5, 4), 4, 2), ((2, 8, 8, 8), 14, 5)]


@pytest.mark.parametrize("shape,num_classes,empty", CASES)
def test_dice_matches_reference(shape, num_classes, empty):
  rng = np.random.default_rng(0)
  p, g = _random_case(rng, shape, num_classes, empty)
  w = rng.uniform(0.1, 30, num_classes)
  np.testing.assert_allclose(
    losses.dice_loss(jnp.asarray(p, jnp.float32), jnp.asarray(g)), ref_dice(p, g), rtol=1e-5
  )
  np.testing.assert_allclose(
    losses.dice_loss(jnp.asarray(p, jnp.float32), jnp.asarray(g), w),
    ref_dice(p, g, w),
    rtol=1e-5,
    atol=1e-5,
  )


def test_seed_weights_can_make_dice_negative_as_in_seed():
  g = np.eye(4)[np.random.default_rng(1).integers(0, 4, (1, 4, 4, 4))]
  loss = losses.dice_loss(jnp.asarray(g, jnp.float32), jnp.asarray(g), [0.26, 22.53, 22.53, 26.21])
  np.testing.assert_allclose(loss, ref_dice(g, g, [0.26, 22.53, 22.53, 26.21]), rtol=1e-5)
  assert loss < 0


@pytest.mark.parametrize("shape,num_classes,empty", CASES)
def test_focal_matches_reference(shape, num_classes, empty):
  p, g = _random_case(np.random.default_rng(2), shape, num_classes, empty)
  np.testing.assert_allclose(
    losses.focal_loss(jnp.asarray(p, jnp.float32), jnp.asarray(g)), ref_focal(p, g), rtol=1e-5
  )
  np.testing.assert_allclose(
    losses.focal_loss(jnp.asarray(p, jnp.float32), jnp.asarray(g), alpha=0.5, gamma=0.0),
    ref_focal(p, g, 0.5, 0.0),
    rtol=1e-5,
  )


def test_focal_gradient_and_all_zero_rows_match_reference():
  p, g = _random_case(np.random.default_rng(5), (2, 3, 4, 5), 4)
  g[0, 1] = 0.0  # voxels with no class (all-zero rows) add nothing
  alpha, gamma = 0.25, 2.0
  got = jax.jit(jax.grad(losses.focal_loss))(
    jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
  )
  q = np.clip(p, 1e-7, 1 - 1e-7)
  expected = (
    g * (alpha * gamma * (1 - q) ** (gamma - 1) * np.log(q) - alpha * (1 - q) ** gamma / q) / g.size
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(
    losses.focal_loss(jnp.asarray(p, jnp.float32), jnp.asarray(g)), ref_focal(p, g), rtol=1e-5
  )


def test_unclipped_focal_matches_reference_and_keeps_a_gradient_below_the_clip():
  rng = np.random.default_rng(6)
  shape, num_classes = (2, 3, 4, 5), 4
  logits = rng.normal(0, 3, (*shape, num_classes))
  logits[0, 0, 0, 0] = (-30.0, 0.0, 0.0, 0.0)  # true class 0 at p ~ 1e-13, far below the clip
  g = np.eye(num_classes)[rng.integers(0, num_classes, shape)]
  g[0, 0, 0, 0] = np.eye(num_classes)[0]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # float64 log-softmax
  p = np.exp(log_p)
  expected = np.mean(-g * 0.25 * (1 - p) ** 2 * log_p)
  x, onehot = jnp.asarray(logits, jnp.float32), jnp.asarray(g, jnp.float32)

  def loss(z, clip):
    return losses.focal_loss(losses.softmax(z), onehot, clip=clip, logits=z)

  np.testing.assert_allclose(loss(x, None), expected, rtol=1e-5)
  # d loss / d logit of the true class: -alpha (1 - p)^gamma (1 - p) (1 + ...) ~ -alpha / size.
  dead = jax.grad(loss)(x, 1e-7)[0, 0, 0, 0, 0]
  alive = jax.grad(loss)(x, None)[0, 0, 0, 0, 0]
  assert dead == 0.0
  np.testing.assert_allclose(alive, -0.25 / g.size, rtol=1e-4)


def _total(p, g, w=None):
  """The seed's loss at focal weight 1: Dice + focal."""
  return losses.dice_loss(p, g, w) + losses.focal_loss(p, g)


def test_perfect_and_saturated_probabilities_are_finite():
  g = np.eye(3)[np.random.default_rng(4).integers(0, 3, (1, 4, 4, 4))].astype(np.float32)
  wrong = np.roll(g, 1, -1)  # probability 0 on every true class
  for p in (g, wrong):
    loss, grads = jax.jit(jax.value_and_grad(_total))(jnp.asarray(p), jnp.asarray(g))
    np.testing.assert_allclose(loss, ref_dice(p, g) + ref_focal(p, g), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(grads))


def test_bfloat16_inputs_are_reduced_in_float32():
  p, g = _random_case(np.random.default_rng(5), (1, 8, 8, 8), 4)
  p16, g16 = jnp.asarray(p, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
  dice, focal = losses.dice_loss(p16, g16), losses.focal_loss(p16, g16)
  assert dice.dtype == focal.dtype == jnp.float32
  p_rounded = np.asarray(p16.astype(jnp.float32))
  np.testing.assert_allclose(dice, ref_dice(p_rounded, g), rtol=1e-4)
  np.testing.assert_allclose(focal, ref_focal(p_rounded, g), rtol=1e-4)


def test_softmax_and_its_gradient_match_float64_reference():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 3, 4, 5, 14)) * 3
  # Logits above 88 overflow exp() in float32 unless the class maximum is subtracted.
  logits[..., -1] += 95 * (rng.random(logits.shape[:-1]) < 0.5)
  cotangent = rng.normal(size=logits.shape)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  probs, vjp = jax.vjp(losses.softmax, jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(probs, p, rtol=1e-5, atol=1e-7)
  # d softmax^T r = p * (r - sum_c p_c r_c)
  grad_ref = p * (cotangent - (p * cotangent).sum(-1, keepdims=True))
  np.testing.assert_allclose(
    vjp(jnp.asarray(cotangent, jnp.float32))[0], grad_ref, rtol=1e-4, atol=1e-6
  )


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(1, 3, 3, 3, 3))
  g = np.eye(3)[rng.integers(0, 3, (1, 3, 3, 3))]
  w = np.array([0.5, 2.0, 3.0])

  def ref_total(z):
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return ref_dice(p, g, w) + ref_focal(p, g)

  grad = jax.jit(jax.grad(lambda z: _total(losses.softmax(z), jnp.asarray(g), w)))(
    jnp.asarray(logits, jnp.float32)
  )
  eps = 1e-5
  for idx in [(0, 0, 0, 0, 0), (0, 1, 2, 0, 1), (0, 2, 2, 2, 2), (0, 1, 0, 2, 1)]:
    step = np.zeros_like(logits)
    step[idx] = eps
    numeric = (ref_total(logits + step) - ref_total(logits - step)) / (2 * eps)
    np.testing.assert_allclose(grad[idx], numeric, rtol=1e-3, atol=1e-6)


def test_dice_over_devices_equals_dice_of_the_global_batch():
  # vmap with an axis name runs the collectives pmap would over two devices, in this process.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(4, 4, 4, 4, 3)), jnp.float32)
  g = jax.nn.one_hot(rng.integers(0, 3, (4, 4, 4, 4)), 3)
  w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)

  def loss(w, z, g, axis=None):
    p = losses.softmax(z * w)
    return losses.dice_loss(p, g, [1.0, 2.0, 3.0], axis_name=axis) + losses.focal_loss(p, g)

  def device_step(z, g):
    value, grad = jax.value_and_grad(lambda w: loss(w, z, g, "d"))(w)
    return jax.lax.pmean(value, "d"), jax.lax.pmean(grad, "d")

  shard = lambda a: a.reshape(2, 2, *a.shape[1:])
  value, grad = jax.jit(jax.vmap(device_step, axis_name="d"))(shard(z), shard(g))
  expected_value, expected_grad = jax.jit(jax.value_and_grad(loss))(w, z, g)
  np.testing.assert_allclose(value, [expected_value] * 2, rtol=1e-5)
  np.testing.assert_allclose(grad, [expected_grad] * 2, rtol=1e-4, atol=1e-7)
