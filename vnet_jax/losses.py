"""The seed's losses (segmentation_models 3D definitions), channels-last, probabilities in.

All reductions run in float32 whatever the model's compute dtype, so bfloat16 training keeps
loss precision. Definitions: ../shared/reference/FACTS.md section 2.
"""

import jax
import jax.numpy as jnp
from jax import lax

_SPATIAL_AND_BATCH = (0, 1, 2, 3)  # (N, D, H, W); classes stay separate


@jax.custom_vjp
def softmax(logits):
  """jax.nn.softmax over the last (class) axis, with its gradient's class sum as a matrix-vector
  product.

  XLA:CPU (YNNPACK reductions) took 17 ms of a 64^3 step for that sum over the short class
  axis. Head, loss and their gradient at 64^3 x 14 classes: 27-31 ms against 40-43 with
  jax.nn.softmax (docs/performance.md). The forward's own sum stays a reduction, which is
  faster there.
  """
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(logits):
  probs = softmax(logits)
  return probs, probs


def _softmax_bwd(probs, grad):
  # HIGHEST keeps GPUs from summing in TF32.
  class_sum = lax.dot_general(
    probs * grad,
    jnp.ones(probs.shape[-1:], probs.dtype),
    (((probs.ndim - 1,), (0,)), ((), ())),
    precision=lax.Precision.HIGHEST,
  )
  return (probs * (grad - class_sum[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dice_loss(
  probs, onehot, class_weights=None, smooth: float = 1e-5, axis_name: str | None = None
):
  """1 - mean_c(w_c * (2 tp_c + s) / (2 tp_c + fp_c + fn_c + s)), sums over batch and space.

  Under pmap, `axis_name` sums tp/fp/fn over every device's share of the batch, so the loss
  (and its gradient) is that of the whole global batch, as on one device.
  """
  probs = probs.astype(jnp.float32)
  onehot = onehot.astype(jnp.float32)
  sums = (
    jnp.sum(onehot * probs, axis=_SPATIAL_AND_BATCH),
    jnp.sum(probs, axis=_SPATIAL_AND_BATCH),
    jnp.sum(onehot, axis=_SPATIAL_AND_BATCH),
  )
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  tp, sum_p, sum_g = sums
  fp = sum_p - tp
  fn = sum_g - tp
  score = (2.0 * tp + smooth) / (2.0 * tp + fn + fp + smooth)
  if class_weights is not None:
    score = score * jnp.asarray(class_weights, jnp.float32)
  return 1.0 - jnp.mean(score)


def focal_loss(probs, onehot, alpha: float = 0.25, gamma: float = 2.0):
  """Mean over every element (N, D, H, W, C) of -g * alpha * (1 - p)^gamma * log(p), p clipped.

  `onehot` rows are one-hot (or all zero), so each voxel has one non-zero term: it is evaluated
  on the true class's probability alone, not on all C (a third of the loss's time at 14 classes).
  """
  g = onehot.astype(jnp.float32)
  p = jnp.clip(jnp.sum(g * probs.astype(jnp.float32), axis=-1), 1e-7, 1.0 - 1e-7)
  return jnp.sum(jnp.sum(g, axis=-1) * -alpha * (1.0 - p) ** gamma * jnp.log(p)) / g.size


def total_loss(
  probs,
  onehot,
  class_weights=None,
  focal_weight: float = 1.0,
  smooth: float = 1e-5,
  alpha: float = 0.25,
  gamma: float = 2.0,
  axis_name: str | None = None,
):
  """Dice + focal_weight * focal, the seed's total loss."""
  return dice_loss(probs, onehot, class_weights, smooth, axis_name) + focal_weight * focal_loss(
    probs, onehot, alpha, gamma
  )
